"""logs.Throttle: the first lines of a message per window, then one line that counts the rest."""

from __future__ import annotations

import logging

import pytest

from ics_service.logs import Throttle


def test_a_repeated_message_is_let_through_then_counted(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    throttle = Throttle(burst=3, window_s=60.0, clock=lambda: now[0])
    log = logging.getLogger("ics_test.throttled")
    log.addFilter(throttle)
    try:
        with caplog.at_level(logging.WARNING, logger="ics_test.throttled"):
            for i in range(10):
                log.warning("bad request %d", i)
            log.warning("another kind")  # a message of its own: its own count
            assert [r.getMessage() for r in caplog.records] == [
                "bad request 0",
                "bad request 1",
                "bad request 2",
                "another kind",
            ]
            caplog.clear()
            now[0] = 61.0  # the window has ended: the summary, then three more one by one
            for i in range(4):
                log.warning("bad request %d", 10 + i)
            messages = [r.getMessage() for r in caplog.records]
            assert messages[0] == (
                "7 more like this in the last 61 s, not logged one by one: bad request 9"
            )
            assert messages[1:] == ["bad request 10", "bad request 11", "bad request 12"]
            caplog.clear()
            throttle.close()  # at the end, whatever is held back is counted at once
            assert [r.getMessage() for r in caplog.records] == [
                "1 more like this in the last 0 s, not logged one by one: bad request 13"
            ]
    finally:
        log.removeFilter(throttle)
        throttle.close()
