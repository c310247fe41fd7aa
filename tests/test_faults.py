"""Faults of the environment and of users: signals at any moment, every way out of an
execution, unwritable results, a lost store, text from outside on the terminal, and the
table of exit codes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from cli import ICS_BIN, ics
from ics_service import sources
from ics_service.cli import app
from ics_service.config import load_settings
from ics_service.engine import ExecutionRunner
from ics_service.errors import INTERNAL_ERROR, ExitCode
from ics_service.models.runtime import OnnxRuntime
from ics_service.store import Store
from ics_service.types import Execution, ExecutionStatus, ItemResult, ModelRef
from store_backends import drop_database

EXIT_CODES_PAGE = Path(__file__).resolve().parents[1] / "docs" / "classify.md"


def wait_for(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.02)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:  # a thread that ended meanwhile
        return ""


def executions_in(home: Path) -> list[Execution]:
    db = home / "ics.db"
    if not db.exists():
        return []
    store = Store(f"sqlite:///{db}")
    try:
        return store.list_executions()
    finally:
        store.close()


def only_execution(home: Path) -> Execution:
    found = executions_in(home)
    assert len(found) == 1, found
    return found[0]


def start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(ICS_BIN), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A background job of a non-interactive shell starts with SIGINT ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def finish(proc: subprocess.Popen[str], timeout: float = 60.0) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"ics did not stop within {timeout} s; stderr:\n{err}")
    assert "Traceback" not in err, err
    return proc.returncode, err


@pytest.fixture
def many_photos(tmp_path: Path, photos: Path) -> Path:
    """400 real photos (hard links to the sample JPEGs): a few seconds of work."""
    folder = tmp_path / "many"
    folder.mkdir()
    originals = sorted(photos.glob("*.jpg"))
    for i in range(400):
        os.link(originals[i % len(originals)], folder / f"{i:04d}.jpg")
    return folder


# --- signals --------------------------------------------------------------------------


def test_signal_during_startup_exits_130_and_creates_no_execution(
    ics_home: Path, photos: Path, tmp_path: Path
) -> None:
    # A config file that is a FIFO blocks the start-up in open() until the signal.
    fifo = tmp_path / "ics.toml"
    os.mkfifo(fifo)
    proc = start("classify", str(photos), "--config", str(fifo))
    wchan = Path(f"/proc/{proc.pid}/wchan")
    wait_for(lambda: wchan.read_text() == "wait_for_partner", "ics to block opening the FIFO")
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc)
    assert code == ExitCode.INTERRUPTED, err
    assert "interrupted: stopped by SIGTERM" in err
    assert executions_in(ics_home) == []


def test_signal_while_registering_items_aborts_the_execution(
    ics_home: Path, photos: Path, tmp_path: Path
) -> None:
    photo = str(next(photos.glob("*.jpg")))
    many = tmp_path / "many.txt"
    many.write_text(f"{photo}\n" * 200_000)
    proc = start("classify", f"@{many}")
    wait_for(lambda: bool(executions_in(ics_home)), "the execution to be created")
    proc.send_signal(signal.SIGINT)
    code, err = finish(proc)
    assert code == ExitCode.INTERRUPTED, err
    execution = only_execution(ics_home)
    assert execution.status is ExecutionStatus.ABORTED
    assert not execution.items_listed, "the signal came after the listing: test not effective"
    assert execution.error is not None and "listing" in execution.error.message


def test_two_signals_while_classifying_stop_once_and_cleanly(
    ics_home: Path, many_photos: Path
) -> None:
    proc = start("classify", str(many_photos), "--batch-size", "2")

    def some_done() -> bool:
        found = executions_in(ics_home)
        return bool(found) and found[0].counts.done > 0

    wait_for(some_done, "the first results")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc)
    assert code == ExitCode.INTERRUPTED, err
    assert "already stopping" in err
    execution = only_execution(ics_home)
    assert execution.status is ExecutionStatus.ABORTED
    assert 0 < execution.counts.done < execution.counts.total


def test_a_third_signal_stops_a_blocked_listing_at_once(
    ics_home: Path, photos: Path, tmp_path: Path
) -> None:
    # The first item is found, so the execution exists; then reading the next list blocks
    # in a FIFO with no writer, where only stopping at once can help.
    fifo = tmp_path / "more.txt"
    os.mkfifo(fifo)
    proc = start("classify", str(next(photos.glob("*.jpg"))), f"@{fifo}")
    # The listing runs in a thread of its own (the run classifies behind it).
    wchans = Path(f"/proc/{proc.pid}/task")

    def blocked() -> bool:
        return any(_read(w) == "wait_for_partner" for w in wchans.glob("*/wchan"))

    wait_for(blocked, "ics to block opening the FIFO")
    assert executions_in(ics_home), "the execution should exist before the blocked listing"
    for signum in (signal.SIGINT, signal.SIGINT, signal.SIGTERM):
        proc.send_signal(signum)
        time.sleep(0.1)
    # At once: the listing blocked in the FIFO is not waited for (it was, 30 s).
    code, err = finish(proc, timeout=15)
    assert code == ExitCode.INTERRUPTED, err
    assert "a third signal stops at once" in err
    execution = only_execution(ics_home)
    assert execution.status is ExecutionStatus.ABORTED
    assert not execution.items_listed


# --- every way out of an execution ends it --------------------------------------------


def test_disk_full_while_writing_results_fails_the_execution(ics_home: Path, photos: Path) -> None:
    res = ics("classify", str(photos), "-o", "/dev/full", "--output-format", "jsonl")
    assert res.exit_code == ExitCode.ENVIRONMENT, res.output
    assert "cannot write results to /dev/full: No space left on device" in res.output
    execution = only_execution(ics_home)
    assert execution.status is ExecutionStatus.FAILED
    assert execution.error is not None and "/dev/full" in execution.error.message


def test_a_bug_while_recording_ends_the_execution_failed(
    ics_home: Path, photos: Path, runtime: OnnxRuntime
) -> None:
    class BrokenSink:
        def write(self, results: Sequence[ItemResult]) -> None:
            raise RuntimeError("a bug in a sink")

        def close(self) -> None:
            pass

    settings = load_settings(environ={"ICS_HOME": str(ics_home)}).settings
    store = Store(settings.store_url)
    try:
        runner = ExecutionRunner(settings, store, runtime)
        execution, _ = runner.start([str(photos)])
        with pytest.raises(RuntimeError, match="a bug in a sink"):
            runner.run(execution, sinks=[BrokenSink()])
        ended = store.get_execution(execution.id)
    finally:
        store.close()
    assert ended.status is ExecutionStatus.FAILED
    assert ended.error is not None
    assert ended.error.type == INTERNAL_ERROR
    assert "RuntimeError: a bug in a sink" in ended.error.message


class BuggySource:
    """A source whose reads hit a bug (not a bad image): the item is an InternalError."""

    def list(self, spec: str) -> Iterator[str]:
        yield spec

    def read(self, uri: str, max_bytes: int) -> bytes:
        cache: dict[str, bytes] = {}
        return cache[uri]


@pytest.fixture
def buggy_source() -> Iterator[None]:
    sources.register("buggy", BuggySource())
    yield
    sources.unregister("buggy")


def test_an_item_failing_through_a_bug_is_an_internal_error_counted_apart(
    ics_home: Path, photos: Path, buggy_source: None
) -> None:
    photo = str(next(photos.glob("*.jpg")))
    args = ("classify", "buggy://x.jpg", photo, "--tolerated-failure-percentage", "100")
    res = ics(*args, "--json", "-o", "out.jsonl")
    assert res.exit_code == ExitCode.OK, res.output
    assert json.loads(res.stdout)["failures_by_type"] == {INTERNAL_ERROR: 1}
    rows = [json.loads(line) for line in Path("out.jsonl").read_text().splitlines()]
    bug = next(r for r in rows if r["uri"] == "buggy://x.jpg")
    assert bug["status"] == "FAILED"
    assert bug["error"] == {"type": INTERNAL_ERROR, "message": "KeyError: 'buggy://x.jpg'"}
    res = ics(*args)
    assert res.exit_code == ExitCode.OK, res.output
    assert re.search(r"internal errors\s+1 FAILED through a bug in ICS", res.stdout), res.stdout


@pytest.mark.postgres
def test_a_lost_store_ends_the_run_with_a_clear_message(
    ics_home: Path, many_photos: Path, postgres_admin: Engine
) -> None:
    name = f"ics_lost_{os.getpid()}"
    with postgres_admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = postgres_admin.url.set(database=name).render_as_string(hide_password=False)
    try:
        proc = start("classify", str(many_photos), "--store", url, "--batch-size", "2")

        def some_done() -> bool:
            store = Store(url)
            try:
                found = store.list_executions()
            finally:
                store.close()
            return bool(found) and found[0].counts.done > 0

        wait_for(some_done, "the first results")
        drop_database(postgres_admin, name, if_exists=False)
        code, err = finish(proc)
    finally:
        drop_database(postgres_admin, name)
    assert code == ExitCode.ENVIRONMENT, err
    assert f"/{name}" in err  # the store is named...
    assert ":ics@" not in err and "***" in err  # ...without its password
    assert not re.search(r"\b(SELECT|UPDATE|INSERT)\b", err), err  # and no SQL


# --- results paths --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("missing/out.jsonl", "the folder missing does not exist; create it first"),
        (".", "results path . is a folder; give a file name"),
        ("/sys/kernel/ics-results.jsonl", "cannot write results to /sys/kernel/ics-results"),
        ("out.txt", "cannot tell the results format of 'out.txt'"),
    ],
)
def test_unwritable_results_path_is_a_usage_error_before_any_work(
    ics_home: Path, photos: Path, output: str, message: str
) -> None:
    res = ics("classify", str(photos), "-o", output)
    assert res.exit_code == ExitCode.USAGE, res.output
    assert message in res.output
    assert executions_in(ics_home) == []


# --- text from outside on the terminal ------------------------------------------------


def test_file_names_are_printed_as_they_are_never_as_markup_or_control(
    ics_home: Path, photos: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "odd"
    folder.mkdir()
    photo = next(photos.glob("*.jpg"))
    (folder / "a[").mkdir()
    for name in ["a[/x].jpg", "[bold]b.jpg", "c\x1b[31mred.jpg"]:
        shutil.copy(photo, folder / name)
    # Relative to the working folder, the first prints as "odd/a[/x].jpg": Rich would read
    # "[/x]" as a closing tag and crash.
    os.chdir(tmp_path)
    res = ics("classify", "odd", "--table", "--tolerated-failure-percentage", "100")
    assert res.exit_code == ExitCode.OK, res.output
    assert "a[/x].jpg" in res.stdout
    assert "[bold]b.jpg" in res.stdout
    assert "\x1b" not in res.stdout
    assert "c\\x1b[31mred.jpg" in res.stdout


# --- names, stores, exit codes --------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize(
    ("owner_pid", "hint"),
    [
        (
            os.getpid(),
            "it is still running (in {owner}): wait for it, or stop it with "
            "`ics executions cancel {id}`",
        ),
        (_dead_pid(), "`ics executions resume {id}` continues it"),
    ],
    ids=["running", "orphaned"],
)
def test_a_reused_name_says_what_to_do(
    ics_home: Path, photos: Path, owner_pid: int, hint: str
) -> None:
    store = Store(f"sqlite:///{ics_home / 'ics.db'}")
    try:
        execution, _ = store.create_execution(
            params={"sources": [str(photos)]}, model=ModelRef("m", "1"), threshold=0.9, name="n"
        )
        owner = f"{socket.gethostname()}:{owner_pid}"
        store.claim(execution.id, owner)
    finally:
        store.close()
    res = ics("classify", str(photos), "--name", "n")
    assert res.exit_code == ExitCode.FAILED, res.output
    assert hint.format(owner=owner, id=execution.id) in res.stderr.replace("\n", " ")


def test_read_only_commands_do_not_create_a_store(ics_home: Path, tmp_path: Path) -> None:
    db = tmp_path / "nowhere" / "ics.db"
    for args in (["list"], ["show", "x"], ["history", "x"], ["cancel", "x"], ["resume", "x"]):
        res = ics("executions", *args, "--store", f"sqlite:///{db}")
        assert res.exit_code == ExitCode.ENVIRONMENT, res.output
        assert "no execution store at" in res.output
    assert not db.parent.exists()


class BrokenLister:
    """A source whose listing hits a bug: the command itself fails (exit 3)."""

    def list(self, spec: str) -> Iterator[str]:
        raise ZeroDivisionError("a bug in listing")

    def read(self, uri: str, max_bytes: int) -> bytes:
        raise AssertionError("never read")


@pytest.mark.parametrize("debug", [False, True], ids=["default", "debug"])
def test_an_internal_error_exits_3_and_says_how_to_report_it(
    ics_home: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    debug: bool,
) -> None:
    sources.register("broken", BrokenLister())
    try:
        argv = ["ics", "classify", "broken://x.jpg", *(["--log-level", "DEBUG"] * debug)]
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as exit_:
            app.run()  # the console script's entry point, through Click
    finally:
        sources.unregister("broken")
    assert exit_.value.code == ExitCode.INTERNAL
    err = capsys.readouterr().err
    assert "internal error: ZeroDivisionError: a bug in listing" in err
    assert "--log-level DEBUG and report it" in err
    # The traceback goes to the log at DEBUG only.
    assert ("Traceback (most recent call last)" in err) is debug
    assert executions_in(ics_home) == []


def test_the_docs_and_help_document_every_exit_code() -> None:
    section = EXIT_CODES_PAGE.read_text().split("## Exit codes", 1)[1].split("\n#", 1)[0]
    documented = {int(code) for code in re.findall(r"^\| `(\d+)` \|", section, re.M)}
    assert documented == {code.value for code in ExitCode}
    res = ics("--help")
    for code in ExitCode:
        assert re.search(rf"^\s+{code.value}\s+\S", res.stdout, re.M), code
