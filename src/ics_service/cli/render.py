"""What the commands print: summaries, result tables, progress bars."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..errors import INTERNAL_ERROR
from ..logs import printable
from ..types import Execution, ItemResult
from .app import stderr_console, stdout_console

# Rich is imported where something is printed with it: `--json` and no progress bar (a
# pipe, a script) do without it.
if TYPE_CHECKING:
    from rich.text import Text


def outside(text: str) -> Text:
    """Text from outside (file names, messages, names) as Rich shows it: never markup."""
    from rich.text import Text

    return Text(printable(text))


@contextmanager
def progress_bar(
    enabled: bool | None,
    total: int | None,
    done: int = 0,
    listed: Callable[[], tuple[int, bool] | None] | None = None,
) -> Iterator[Advance]:
    """A progress bar on stderr; `advance(n)` counts n more items done.

    `total` None: the items are still being listed, and `listed()` says how many are known
    so far and whether the listing has ended. Until it has, the total grows (shown as
    "120/350+"), and neither a percentage nor an ETA is shown, as neither would be one.
    """
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield Advance(lambda _n: None, lambda _total: None)
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    count, percent, eta = _total_columns()
    bar = Progress(
        TextColumn("classifying"),
        BarColumn(),
        count,
        percent,
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        eta,
        console=stderr_console(),
        transient=False,
    )
    final = total is not None or listed is None
    task = bar.add_task("classify", total=total, completed=done, rate="", final=final)
    started = time.perf_counter()
    processed = 0

    def advance(n: int) -> None:
        nonlocal processed
        processed += n
        rate = processed / max(time.perf_counter() - started, 1e-9)
        bar.update(task, advance=n, rate=f"{rate:,.0f} img/s")

    ended = threading.Event()

    def follow() -> None:
        """The total as the listing grows it, until the listing has ended."""
        while listed is not None:
            state = listed()
            if state is not None:
                known, complete = state
                bar.update(task, total=known, final=complete)
                if complete:
                    return
            if ended.wait(0.1):
                return

    def settle(known: int) -> None:
        ended.set()
        if follower is not None:
            follower.join()
        bar.update(task, total=known, final=True)

    follower = None
    if not final:
        follower = threading.Thread(target=follow, name="ics-progress-total", daemon=True)
        follower.start()
    try:
        with bar:
            yield Advance(advance, settle)
    finally:
        ended.set()
        if follower is not None:
            follower.join()


class Advance:
    """What `progress_bar` yields: `advance(n)` counts n more items done; `settle(total)`
    gives the final total once the run has ended."""

    def __init__(self, advance: Callable[[int], None], settle: Callable[[int], None]) -> None:
        self._advance = advance
        self.settle = settle

    def __call__(self, n: int) -> None:
        self._advance(n)


def _total_columns() -> tuple[Any, Any, Any]:
    """Columns for a total that may still grow: done/total, percentage, ETA."""
    import datetime as dt

    from rich.progress import ProgressColumn, Task
    from rich.text import Text

    def final(task: Task) -> bool:
        return bool(task.fields.get("final")) and task.total is not None

    class Count(ProgressColumn):
        def render(self, task: Task) -> Text:
            if task.total is None:
                return Text(f"{task.completed:.0f}/?", style="progress.download")
            more = "" if final(task) else "+"
            return Text(f"{task.completed:.0f}/{task.total:.0f}{more}", style="progress.download")

    class Percent(ProgressColumn):
        def render(self, task: Task) -> Text:
            if not final(task):
                return Text("")
            return Text(f"{task.percentage:>3.0f}%", style="progress.percentage")

    class Eta(ProgressColumn):
        # Rich's own remaining-time column would guess from a total that may still grow.
        def render(self, task: Task) -> Text:
            if not final(task):
                return Text("listing", style="progress.remaining")
            remaining = task.time_remaining
            if remaining is None:
                return Text("ETA -:--:--", style="progress.remaining")
            shown = dt.timedelta(seconds=max(0, round(remaining)))
            return Text(f"ETA {shown}", style="progress.remaining")

    return Count(), Percent(), Eta()


def summary_doc(
    execution: Execution,
    elapsed: float | None,
    results_path: str | None,
    processed: int | None = None,
) -> dict[str, Any]:
    doc = execution.to_dict()
    doc.pop("params", None)
    if elapsed is not None:
        n = execution.counts.done if processed is None else processed
        doc["elapsed_s"] = round(elapsed, 3)
        doc["images_per_s"] = round(n / elapsed, 2) if elapsed > 0 else None
    doc["results"] = results_path
    return doc


def print_summary(
    execution: Execution,
    elapsed: float | None,
    results_path: str | None,
    *,
    as_json: bool,
    to_stderr: bool = False,
    processed: int | None = None,
    failure_types: dict[str, int] | None = None,
    first_result_s: float | None = None,
    reader_left_after: int | None = None,
    duplicates: int | None = None,
) -> None:
    doc = summary_doc(execution, elapsed, results_path, processed)
    if duplicates is not None:
        # Items that SOURCEs named more than once (`a/ a/*.jpg`): classified once each.
        doc["duplicates_dropped"] = duplicates
    if reader_left_after is not None:
        # `-o -` whose reader closed stdout early (`| head`): how many records it took.
        doc["reader_left_after"] = reader_left_after
    if first_result_s is not None:
        # From the process's start: what a person waits for, imports and model load included.
        doc["first_result_s"] = round(first_result_s, 3)
    internal = (failure_types or {}).get(INTERNAL_ERROR, 0)
    if failure_types is not None:
        doc["failures_by_type"] = failure_types
    if as_json:
        click.echo(json.dumps(doc, indent=2), err=to_stderr)
        return
    from rich.table import Table
    from rich.text import Text

    console = stderr_console() if to_stderr else stdout_console()
    c = execution.counts
    t = Table(show_header=False, box=None, padding=(0, 2))
    t.add_row(
        "execution", outside(execution.id + (f"  ({execution.name})" if execution.name else ""))
    )
    t.add_row("status", styled_status(execution.status.value))
    # LOW_CONFIDENCE items are flagged unless the execution ran with --low-confidence fail
    # (executions recorded before that setting existed ran under the strict rule).
    flagged = " (flagged)" if execution.params.get("low_confidence", "fail") == "flag" else ""
    t.add_row(
        "items",
        f"{c.total} total: {c.succeeded} SUCCEEDED, {c.low_confidence} LOW_CONFIDENCE"
        f"{flagged}, {c.failed} FAILED",
    )
    if duplicates:
        t.add_row("duplicates", f"{duplicates} named again by another SOURCE: classified once")
    if internal:
        t.add_row(
            "internal errors",
            Text(
                f"{internal} FAILED through a bug in ICS ({INTERNAL_ERROR}), not a bad image: "
                "the log has the traceback at --log-level DEBUG; please report it",
                style="red",
            ),
        )
    if elapsed is not None:
        t.add_row("elapsed", f"{elapsed:.2f} s ({doc['images_per_s'] or 0:,.1f} images/s)")
    if first_result_s is not None:
        t.add_row("first result", f"{first_result_s:.2f} s after the process started")
    if execution.error is not None:
        t.add_row("reason", outside(f"{execution.error.type}: {execution.error.message}"))
    if results_path:
        t.add_row("results", outside(results_path))
    if reader_left_after is not None:
        t.add_row(
            "",
            f"stdout's reader left after {reader_left_after} results; every result is in the "
            f"store (`ics executions show {execution.id} --results`)",
        )
    console.print(t)


def styled_status(status: str) -> Text:
    from rich.text import Text

    style = {
        "SUCCEEDED": "green",
        "LOW_CONFIDENCE": "yellow",
        "FAILED": "red",
        "ABORTED": "magenta",
        "RUNNING": "cyan",
    }.get(status, "")
    return Text(status, style=style)


def print_results_table(results: Sequence[ItemResult], to_stderr: bool = False) -> None:
    from rich.table import Table

    console = stderr_console() if to_stderr else stdout_console()
    t = Table(title="results", title_justify="left")
    t.add_column("item", justify="right")
    t.add_column("image")
    t.add_column("status")
    t.add_column("label")
    t.add_column("confidence", justify="right")
    t.add_column("error")
    for r in results:
        t.add_row(
            r.item_id,
            outside(short_uri(r.uri)),
            styled_status(r.status.value),
            outside(r.label or ""),
            "" if r.confidence is None else f"{r.confidence:.3f}",
            outside("" if r.error is None else f"{r.error.type}: {r.error.message}"),
        )
    console.print(t)


def short_uri(uri: str) -> str:
    try:
        return str(Path(uri).relative_to(Path.cwd()))
    except ValueError:
        return uri
