"""`ics classify`, and running an execution with progress and a summary."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import click

from ..config import Settings
from ..types import Execution, ItemResult
from .app import EXIT_BY_STATUS, common_options, load_cli_settings, main, open_runner
from .render import print_results_table, print_summary, progress_bar

# --- classify -------------------------------------------------------------------------


@main.command()
@click.argument("sources", nargs=-1, required=True)
@click.option(
    "-o",
    "--output",
    help="Results file: .jsonl, .csv or .parquet; '-' for JSON Lines on stdout. "
    "Default: HOME/results/EXECUTION_ID.jsonl.",
)
@click.option(
    "--output-format",
    type=click.Choice(["jsonl", "csv", "parquet"]),
    help="Results format when the file name does not tell.",
)
@click.option(
    "-t", "--threshold", type=float, help="Top confidence needed to SUCCEED (default 0.94)."
)
@click.option("-k", "--top-k", type=int, help="Predictions kept per image (default 5).")
@click.option(
    "-m", "--model", help="Model name (default efficientnet-lite0; see `ics models list`)."
)
@click.option("--batch-size", type=int, help="Images per inference batch (default 8).")
@click.option("--workers", "decode_workers", type=int, help="Decode threads (default: automatic).")
@click.option(
    "--threads",
    "inference_threads",
    type=int,
    help="onnxruntime threads per batch (default: 1 per inference worker).",
)
@click.option(
    "--inference-workers",
    type=int,
    help="Batches run at once on the model (default: one per core).",
)
@click.option("--max-pixels", type=int, help="Refuse images with more pixels (default 64,000,000).")
@click.option("--max-bytes", type=int, help="Refuse files larger than this (default 50,000,000).")
@click.option(
    "--tolerated-failure-percentage",
    type=float,
    help="Percentage of LOW_CONFIDENCE/FAILED items tolerated before the execution FAILS.",
)
@click.option(
    "--tolerated-failure-count",
    type=int,
    help="Number of LOW_CONFIDENCE/FAILED items tolerated before the execution FAILS.",
)
@click.option("--name", help="Execution name; a name already used returns that execution.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON document.")
@click.option("--table", is_flag=True, help="Also print a table of every item's result.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bar on stderr (default: when stderr is a terminal).",
)
@common_options
def classify(
    sources: tuple[str, ...],
    output: str | None,
    output_format: str | None,
    name: str | None,
    as_json: bool,
    table: bool,
    progress: bool | None,
    **kwargs: Any,
) -> None:
    """Classify images and record one result per image.

    SOURCE is an image file, a folder (searched recursively; images are recognised by
    content, and files with an image extension are always included so broken ones are
    reported), a glob such as 'photos/**/*.jpg', or @list.txt (one path per line).

    \b
    Exit codes:
      0  the execution SUCCEEDED
      1  it FAILED: more LOW_CONFIDENCE or FAILED items than tolerated
         (by default any at all)
      2  usage or configuration error
      130  interrupted (the execution is ABORTED; finished items are kept)
    """
    from ..outputs import format_for

    settings = load_cli_settings(kwargs).settings
    if output is not None:
        format_for(output, output_format)  # a bad name is a usage error before any work
    with open_runner(settings) as runner:
        execution, created = runner.start(
            list(sources), name=name, output=output, output_format=output_format
        )
        if not created:
            hint = "" if execution.status.finished else "; `ics executions resume` continues it"
            click.echo(
                f"execution named {name!r} already exists: {execution.id} "
                f"({execution.status}){hint}",
                err=True,
            )
            print_summary(execution, None, None, as_json=as_json)
            sys.exit(EXIT_BY_STATUS[execution.status])
        run_and_report(runner, execution, as_json=as_json, table=table, progress=progress)


def results_path_of(settings: Settings, execution: Execution) -> str:
    output = execution.params.get("output")
    return str(output) if output else str(settings.results_dir / f"{execution.id}.jsonl")


def run_and_report(
    runner: Any,
    execution: Execution,
    *,
    as_json: bool,
    table: bool,
    progress: bool | None,
    resumed: bool = False,
) -> None:
    """Run the execution with a progress bar and a results file, print the summary, exit."""
    from ..outputs import ResultsWriter

    settings: Settings = runner.settings
    results_path = results_path_of(settings, execution)
    writer = ResultsWriter(results_path, execution.params.get("output_format"))
    if resumed:
        # The file is rebuilt from the store, the source of truth: a crash may have cut it.
        batch: list[ItemResult] = []
        for r in runner.store.results(execution.id):
            batch.append(r)
            if len(batch) >= 1000:
                writer.write(batch)
                batch = []
        writer.write(batch)
    summary_to_stderr = results_path == "-"
    shown: list[ItemResult] = []
    stop = threading.Event()
    started = time.perf_counter()
    total, done = execution.counts.total, execution.counts.done
    with progress_bar(progress, total, done) as advance, stop_on_signals(stop):

        def on_results(results: Sequence[ItemResult]) -> None:
            advance(len(results))
            if table:
                shown.extend(results)

        finished = runner.run(execution, sinks=[writer], on_results=on_results, stop=stop)
    elapsed = time.perf_counter() - started
    if table:
        print_results_table(sorted(shown, key=lambda r: int(r.item_id)), summary_to_stderr)
    print_summary(
        finished,
        elapsed,
        results_path,
        as_json=as_json,
        to_stderr=summary_to_stderr,
        processed=finished.counts.done - done,
    )
    sys.exit(EXIT_BY_STATUS[finished.status])


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT/SIGTERM stop the execution cleanly; a second SIGINT interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        click.echo(f"\n{signal.Signals(signum).name}: stopping; finished items are kept", err=True)
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
