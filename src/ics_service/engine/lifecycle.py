"""An execution's life: its end status, which process owns it, and cancelling it."""

from __future__ import annotations

import datetime as dt
import os
import socket
import time
from typing import TYPE_CHECKING

from ..config import Settings
from ..config import owner_id as owner_id  # re-exported: where executions import it
from ..config import owner_of as owner_of
from ..types import Counts, ErrorInfo, Execution, ExecutionStatus, utcnow

if TYPE_CHECKING:  # annotations only: importing the engine leaves SQLAlchemy unimported
    from ..store import Store


def final_status(counts: Counts, settings: Settings) -> tuple[ExecutionStatus, ErrorInfo | None]:
    """SUCCEEDED unless the failures exceed the tolerated ones.

    Failures are the FAILED items, and the LOW_CONFIDENCE ones too with
    `low_confidence = "fail"`; by default (`"flag"`) those are only flagged. As in Step
    Functions: with neither tolerance set, no failure is tolerated; with one or both set,
    exceeding either fails the execution.
    """
    strict = settings.low_confidence == "fail"
    failures = counts.failed + (counts.low_confidence if strict else 0)
    pct = settings.tolerated_failure_percentage
    cnt = settings.tolerated_failure_count
    exceeded = []
    if pct is None and cnt is None:
        if failures:
            exceeded.append("no failures tolerated")
    else:
        if cnt is not None and failures > cnt:
            exceeded.append(f"more than {cnt} tolerated")
        if pct is not None and counts.total and failures * 100.0 / counts.total > pct:
            exceeded.append(f"more than {pct:g}% tolerated")
    if not exceeded:
        return ExecutionStatus.SUCCEEDED, None
    if strict:
        message = (
            f"{failures} of {counts.total} items LOW_CONFIDENCE or FAILED "
            f"({counts.low_confidence} low confidence, {counts.failed} failed): "
        )
    else:
        message = f"{failures} of {counts.total} items FAILED: "
    return ExecutionStatus.FAILED, ErrorInfo(
        type="States.ExceedToleratedFailureThreshold", message=message + ", ".join(exceeded)
    )


#: How often a running execution tells the store it is alive (and checks for a cancel).
HEARTBEAT_SECONDS = 2.0
#: A RUNNING execution not heard from for this long is taken as interrupted.
STALE_AFTER_SECONDS = 30.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_orphaned(execution: Execution, stale_after: float = STALE_AFTER_SECONDS) -> bool:
    """RUNNING, but the process that ran it is gone (killed, crashed, machine restarted)."""
    if execution.status is not ExecutionStatus.RUNNING:
        return False
    return owner_gone(execution.owner, execution.heartbeat_at or execution.started_at, stale_after)


def owner_gone(
    owner: str | None, heartbeat_at: dt.datetime | None, stale_after: float = STALE_AFTER_SECONDS
) -> bool:
    """Whether the process `owner` (an `owner_id`, or a replica id), last heard of at
    heartbeat_at, is gone: a dead process of this host, or no heartbeat for stale_after
    seconds (the only sign of a replica named by its `replica_id`, or of another host)."""
    if owner:
        host, _, pid = owner.rpartition(":")
        if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
            return True
    if heartbeat_at is None:
        return True
    return (utcnow() - heartbeat_at).total_seconds() > stale_after


def record_end(
    store: Store, execution_id: str, status: ExecutionStatus, error: ErrorInfo | None
) -> Execution:
    finished = store.finish_execution(execution_id, status, error)
    event = {
        ExecutionStatus.SUCCEEDED: "ExecutionSucceeded",
        ExecutionStatus.FAILED: "ExecutionFailed",
        ExecutionStatus.ABORTED: "ExecutionAborted",
    }[status]
    store.append_events(
        execution_id,
        [
            (
                event,
                None,
                {
                    "counts": finished.counts.to_dict(),
                    "error": None if error is None else error.type,
                    "cause": None if error is None else error.message,
                },
            )
        ],
    )
    return finished


def cancel_execution(store: Store, execution_id: str, *, wait_s: float = 30.0) -> Execution:
    """Ask a running execution to stop; returns it ABORTED, or still RUNNING if it was slow.

    An execution whose process is gone is recorded ABORTED at once.
    """
    execution = store.get_execution(execution_id)
    if execution.status.finished:
        return execution
    store.request_cancel(execution.id)
    if is_orphaned(execution):
        return record_end(
            store,
            execution.id,
            ExecutionStatus.ABORTED,
            ErrorInfo("States.Aborted", "cancelled; the process running it was gone"),
        )
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        execution = store.get_execution(execution.id)
        if execution.status.finished:
            break
        time.sleep(0.2)
    return execution
