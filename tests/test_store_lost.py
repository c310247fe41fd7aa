"""A SQLite store deleted or replaced under a running `ics classify` ends it loudly (exit 4,
a message that says what happened), never with exit 0 and the records gone."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

import imagefiles as f
from cli import ICS_BIN
from ics_service.errors import ExitCode, StoreLost
from ics_service.store import Store
from ics_service.types import ModelRef


@pytest.fixture
def many(tmp_path: Path, photos: Path) -> Path:
    """3,000 images (hard links to the photos): a run that lasts a while."""
    originals = sorted(photos.iterdir())
    folder = tmp_path / "many"
    f.linked_copies([originals[i % len(originals)] for i in range(3000)], folder)
    return folder


def test_a_store_deleted_or_replaced_under_an_open_store_is_store_lost(tmp_path: Path) -> None:
    db = tmp_path / "ics.db"
    store = Store(f"sqlite:///{db}")
    try:
        execution, _ = store.create_execution(params={}, model=ModelRef("m", "1"), threshold=0.5)
        store.verify()
        db.unlink()
        with pytest.raises(StoreLost, match="was deleted while this process used it"):
            store.verify()
        # Every use of the store says so, reads and writes alike.
        with pytest.raises(StoreLost):
            store.get_execution(execution.id)
        with pytest.raises(StoreLost):
            store.heartbeat(execution.id)
    finally:
        store.close()

    store = Store(f"sqlite:///{db}")
    try:
        other = tmp_path / "other.db"
        Store(f"sqlite:///{other}").close()
        os.replace(other, db)
        with pytest.raises(StoreLost, match="was replaced by another file"):
            store.list_executions()
    finally:
        store.close()


@pytest.mark.slow
def test_deleting_the_sqlite_file_mid_run_fails_the_run_loudly(
    ics_home: Path, many: Path, tmp_path: Path
) -> None:
    db = ics_home / "ics.db"
    results = tmp_path / "out.jsonl"
    log = tmp_path / "classify.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(ICS_BIN), "classify", str(many), "-o", str(results)],
            env={**os.environ, "ICS_HOME": str(ics_home)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while not (results.exists() and results.stat().st_size > 0):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "no result within 120 s"
            time.sleep(0.05)
        assert db.exists()
        db.unlink()
        code = proc.wait(300)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    output = log.read_text()
    assert code == ExitCode.ENVIRONMENT, output
    assert f"the execution store sqlite:///{db} was deleted while this process used it" in (
        output
    ), output
    # It stopped soon after: far fewer results than items.
    assert len(results.read_text().splitlines()) < 3000
