"""Start-up: what `ics` imports before it needs it, and the time to first result it reports.

No timing is asserted (the figures depend on the machine and its load): the tests check
which modules a real process has imported, which is what start-up time is made of.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ics_service import startup
from ics_service.errors import ModelNotPrepared
from ics_service.imaging import Limits, Preprocessor
from ics_service.models import get_card
from ics_service.models.background import RuntimeLoading
from ics_service.models.prepare import onnx_path
from ics_service.models.runtime import OnnxRuntime

#: Imported by no command's start-up: each costs tens of milliseconds, and only some
#: sources, channels, reports or `ics serve` use them.
NEVER_AT_START = (
    "fsspec",
    "s3fs",
    "boto3",
    "botocore",
    "aiobotocore",
    "httpx",
    "apprise",
    "matplotlib",
    "fastapi",
    "starlette",
    "uvicorn",
    "watchdog",
    "pyarrow",
    "jsonschema",
    "torch",
    "onnx",
    "ics_service.server",
    "ics_service.report",
    "ics_service.alerts.sns",
    "ics_service.alerts.chat",
    # Pillow's plugins of formats ICS does not decode (Image.init() imports them all).
    "PIL.PdfImagePlugin",
    "PIL.EpsImagePlugin",
    "PIL.PsdImagePlugin",
)
#: What only running something needs: `import ics_service.cli` (every `ics --help`, every
#: usage error) does without them.
RUN_ONLY = ("sqlalchemy", "numpy", "onnxruntime", "PIL", "asyncio", "ics_service.store")
#: What a one-image `ics classify --json` on a SQLite store does without too: Rich (imported
#: to print a table or a progress bar) and SQLAlchemy's PostgreSQL dialect.
NOT_FOR_JSON_ON_SQLITE = (
    "rich",
    "sqlalchemy.dialects.postgresql",
    "sqlalchemy.dialects.postgresql.base",
)

#: Runs `ics ARGS` in a real process and writes the names of the modules it imported.
_RUN_AND_LIST = """
import atexit, json, sys
out, args = sys.argv[1], sys.argv[2:]
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(sys.modules))))
from ics_service.cli import run
sys.argv = ["ics", *args]
run()
"""


def imported_by(tmp_path: Path, *args: str) -> tuple[set[str], subprocess.CompletedProcess[str]]:
    listing = tmp_path / "modules.json"
    proc = subprocess.run(
        [sys.executable, "-c", _RUN_AND_LIST, str(listing), *args],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert listing.exists(), proc.stderr
    return set(json.loads(listing.read_text())), proc


def loaded(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return [n for n in names if n in modules]


def test_help_lists_every_command_without_heavy_imports(ics_home: Path, tmp_path: Path) -> None:
    from ics_service.cli import main

    modules, proc = imported_by(tmp_path, "--help")
    assert proc.returncode == 0, proc.stderr
    for command in main.commands:
        assert f"  {command} " in proc.stdout, f"`ics --help` does not list {command}"
    assert loaded(modules, NEVER_AT_START + RUN_ONLY + NOT_FOR_JSON_ON_SQLITE) == []


def test_one_image_imports_only_what_it_uses_and_reports_first_result(
    ics_home: Path, photos: Path, tmp_path: Path
) -> None:
    modules, proc = imported_by(tmp_path, "classify", str(photos / "coffee.jpg"), "--json")
    assert proc.returncode == 0, proc.stderr
    # It did run: the model and the store were loaded...
    assert loaded(modules, RUN_ONLY) == list(RUN_ONLY)
    # ...and nothing that a local file, no subscription and no capture leave unused.
    assert loaded(modules, NEVER_AT_START + NOT_FOR_JSON_ON_SQLITE) == []
    summary = json.loads(proc.stdout)
    assert summary["status"] == "SUCCEEDED"
    # From the process's start, so it includes the imports and the model load that the
    # execution's own elapsed_s leaves out.
    assert summary["elapsed_s"] < summary["first_result_s"] < 120


def test_text_summary_shows_first_result(ics_home: Path, photos: Path) -> None:
    from cli import ics

    res = ics("classify", str(photos / "coffee.jpg"))
    assert res.exit_code == 0, res.output
    row = next(line for line in res.output.splitlines() if "first result" in line)
    assert float(row.split()[2]) > 0, row


def test_a_model_opened_on_a_thread_classifies_like_one_opened_directly(
    models_dir: Path, photos: Path
) -> None:
    card = get_card("efficientnet-lite0")
    x, _ = Preprocessor(card, Limits())((photos / "coffee.jpg").read_bytes())
    opened = RuntimeLoading(card, models_dir, threads=1).result()
    direct = OnnxRuntime(card, onnx_path(card, models_dir), threads=1)
    probs = opened.predict(x[None])[0]
    assert card.labels[int(probs.argmax())] == "espresso"
    np.testing.assert_allclose(probs, direct.predict(x[None])[0], atol=1e-6)


def test_a_model_that_cannot_open_raises_the_same_error_from_the_thread(tmp_path: Path) -> None:
    card = get_card("efficientnet-lite0")
    path = onnx_path(card, tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not an ONNX file")
    with pytest.raises(Exception) as direct:
        OnnxRuntime(card, path)
    loading = RuntimeLoading(card, tmp_path)  # returns: the error waits for result()
    with pytest.raises(type(direct.value), match=r"(?i)protobuf|load model"):
        loading.result()


def test_a_model_not_prepared_is_prepared_by_result_not_at_once(tmp_path: Path) -> None:
    # A card with nothing to build it from: preparing it fails at once, where it is tried.
    card = replace(get_card("efficientnet-lite0"), name="unbuildable", build={})
    loading = RuntimeLoading(card, tmp_path)
    with pytest.raises(ModelNotPrepared, match="no way to build one"):
        loading.result()


def test_the_garbage_collector_pauses_for_start_up_then_runs_again() -> None:
    import ics_service.cli  # noqa: F401  # imported without collecting, then left as it was

    assert gc.isenabled()
    try:
        startup.pause_gc(0.05)
        assert not gc.isenabled()
        deadline = time.monotonic() + 30
        while not gc.isenabled() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gc.isenabled(), "the collector did not run again after the pause"
        assert gc.get_freeze_count() > 0  # start-up's objects are left out of its scans
    finally:
        gc.unfreeze()  # this test process goes on: scan them again
        gc.enable()


def test_the_engine_imports_without_sqlalchemy(tmp_path: Path) -> None:
    # open_runner starts opening the model before the store's import: if importing the
    # engine imported SQLAlchemy, the model would open only after it, and nothing overlaps.
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, ics_service.engine, ics_service.models.background;"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sqlalchemy', 'rich')))",
        ],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


#: Runs `ics ARGS` in a real process with an exit handler and a non-daemon thread of its own.
_RUN_WITH_HANDLERS = """
import atexit, sys, threading, time
handler_out, thread_out, args = sys.argv[1], sys.argv[2], sys.argv[3:]
atexit.register(lambda: open(handler_out, "w").write("ran"))
def late():
    time.sleep(1.0)
    open(thread_out, "w").write("finished")
if thread_out != "-":
    threading.Thread(target=late).start()
from ics_service.cli import run
sys.argv = ["ics", *args]
run()
"""


@pytest.mark.parametrize("with_thread", [False, True])
def test_a_classify_exits_with_its_status_after_its_exit_handlers_and_threads(
    ics_home: Path, photos: Path, tmp_path: Path, with_thread: bool
) -> None:
    handler, thread = tmp_path / "handler", tmp_path / "thread"
    results = tmp_path / "results.jsonl"
    for strict, status in (("flag", 0), ("fail", 1)):
        for f in (handler, thread, results):
            f.unlink(missing_ok=True)
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                _RUN_WITH_HANDLERS,
                str(handler),
                str(thread) if with_thread else "-",
                "classify",
                str(photos / "chelsea.jpg"),  # LOW_CONFIDENCE: fails the strict run
                "-o",
                str(results),
                "--low-confidence",
                strict,
                "--json",
            ],
            env=dict(os.environ),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == status, proc.stderr
        # Everything was written and flushed: the summary, the results file.
        assert json.loads(proc.stdout)["counts"]["total"] == 1
        assert len(results.read_text().splitlines()) == 1
        # The exit handlers ran (a coverage tool's, logging's), and a thread still running
        # was waited for, as by an ordinary exit.
        assert handler.read_text() == "ran"
        assert thread.exists() is with_thread
