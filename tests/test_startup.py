"""Start-up: what `ics` imports before it needs it, and the time to first result it reports.

No timing is asserted (the figures depend on the machine and its load): the tests check
which modules a real process has imported, which is what start-up time is made of.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
    assert loaded(modules, NEVER_AT_START + RUN_ONLY) == []


def test_one_image_imports_only_what_it_uses_and_reports_first_result(
    ics_home: Path, photos: Path, tmp_path: Path
) -> None:
    modules, proc = imported_by(tmp_path, "classify", str(photos / "coffee.jpg"), "--json")
    assert proc.returncode == 0, proc.stderr
    # It did run: the model and the store were loaded...
    assert loaded(modules, RUN_ONLY) == list(RUN_ONLY)
    # ...and nothing that a local file, no subscription and no capture leave unused.
    assert loaded(modules, NEVER_AT_START) == []
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
