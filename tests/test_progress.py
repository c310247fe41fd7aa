"""The progress bar of `ics classify` while a folder is still being listed: its total grows
("120/350+"), and it shows no percentage or ETA until the total is final."""

from __future__ import annotations

import io
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ics_service import sources
from ics_service.cli.render import progress_bar
from ics_service.engine.listing import BackgroundListing
from ics_service.store import Store
from ics_service.types import ModelRef


class Terminal(io.StringIO):
    """stderr as a terminal: Rich draws its live frames, which the test reads back."""

    def isatty(self) -> bool:
        return True


def frames(text: str) -> list[str]:
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
    return [line.strip() for line in re.split(r"[\r\n]", plain) if "classifying" in line]


def test_the_total_grows_with_a_real_listing_and_the_eta_waits_for_it(
    ics_home: Path, photos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = ics_home / "folder"
    folder.mkdir()
    for i, p in enumerate(sorted(photos.iterdir()) * 3):
        (folder / f"{i:03d}-{p.name}").write_bytes(p.read_bytes())
    n = len(list(folder.iterdir()))
    half = threading.Event()
    go_on = threading.Event()

    def gated() -> Iterator[tuple[str, dict[str, Any] | None]]:
        """The folder's real listing, held half-way until the test has seen the bar."""
        for i, entry in enumerate(sources.expand_items([str(folder)])):
            if i == n // 2:
                half.set()
                assert go_on.wait(30)
            yield entry

    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    store = Store(f"sqlite:///{ics_home / 'ics.db'}")
    try:
        execution, _ = store.create_execution(
            params={"sources": [str(folder)]}, model=ModelRef("m", "1"), threshold=0.5
        )
        listing = BackgroundListing(store, execution.id, gated())
        with progress_bar(
            True, None, 0, listed=lambda: (listing.total, listing.done.is_set())
        ) as advance:
            listing.start()
            assert half.wait(30)
            advance(3)
            time.sleep(0.5)  # a few frames at the half-way total
            growing = frames(screen.getvalue())
            go_on.set()
            listing.wait()
            advance(n - 3)
            time.sleep(0.5)
    finally:
        go_on.set()
        store.close()
    assert listing.complete and listing.total == n
    assert any(f"3/{n // 2}+" in f for f in growing), growing
    done = frames(screen.getvalue())
    for frame in done:
        if "+" in frame:  # a total still growing: no percentage, no ETA
            assert "ETA" not in frame and "%" not in frame and "listing" in frame, frame
        if "ETA" in frame:
            assert "+" not in frame, frame
    assert f"{n}/{n}" in done[-1] and "100%" in done[-1] and "ETA" in done[-1], done[-1]
