"""`ics classify`, and running an execution with progress and a summary."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

from ..config import Settings, default
from ..logs import printable
from ..startup import closed_for_exit, process_age_s
from ..types import Execution, ExecutionStatus, ItemResult
from .alerts import notify_option
from .app import (
    EXIT_BY_STATUS,
    common_options,
    device_option,
    executor_options,
    load_cli_settings,
    low_confidence_option,
    main,
    open_runner,
    signal_guard,
)
from .capture import capture_options
from .render import print_results_table, print_summary, progress_bar

if TYPE_CHECKING:
    from ..engine import ExecutionRunner

log = logging.getLogger("ics_service.cli")

# --- classify -------------------------------------------------------------------------


@main.command()
@click.argument("sources", nargs=-1, required=True)
@click.option(
    "-o",
    "--output",
    help="Results file: .jsonl, .csv or .parquet; '-' for JSON Lines on stdout; or an "
    "object such as s3://BUCKET/results/run.jsonl (uploaded when the run ends). "
    "Default: HOME/results/EXECUTION_ID.jsonl.",
)
@click.option(
    "--output-format",
    type=click.Choice(["jsonl", "csv", "parquet"]),
    help="Results format when the file name does not tell.",
)
@click.option(
    "-t",
    "--threshold",
    type=float,
    help="Top confidence needed to SUCCEED (default: the model card's threshold, else "
    f"{default('threshold')}).",
)
@click.option(
    "-k", "--top-k", type=int, help=f"Predictions kept per image (default {default('top_k')})."
)
@click.option(
    "-m",
    "--model",
    help=f"Model name (default {default('model')}; see `ics models list`), or a remote "
    "model: sagemaker:ENDPOINT[/VARIANT] or v2:http(s)://HOST:PORT/v2/models/NAME.",
)
@click.option(
    "--labels",
    type=click.Path(dir_okay=False),
    help="Labels file (one class a line) of a remote --model sagemaker:... or v2:... whose "
    "endpoint answers bare probabilities.",
)
@click.option(
    "--batch-size", type=int, help=f"Images per inference batch (default {default('batch_size')})."
)
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
@click.option(
    "--max-pixels",
    type=int,
    help=f"Refuse images with more pixels (default {default('max_pixels'):,}).",
)
@click.option(
    "--max-bytes",
    type=int,
    help=f"Refuse files larger than this (default {default('max_bytes'):,}).",
)
@click.option(
    "--decode-memory",
    type=int,
    help="Bytes that images being decoded may take at once, all decode threads together "
    f"(default {default('decode_memory'):,}); bigger images wait their turn.",
)
@device_option
@executor_options
@low_confidence_option
@click.option(
    "--tolerated-failure-percentage",
    type=float,
    help="Percentage of failed items tolerated before the execution FAILS (FAILED items; "
    "LOW_CONFIDENCE ones too with --low-confidence fail).",
)
@click.option(
    "--tolerated-failure-count",
    type=int,
    help="Number of failed items tolerated before the execution FAILS (FAILED items; "
    "LOW_CONFIDENCE ones too with --low-confidence fail).",
)
@click.option(
    "--include",
    multiple=True,
    help="Only items matching this glob (repeatable): '*.jpg' matches names in any folder, "
    "'2024/**/*.png' paths under the SOURCE folder or prefix.",
)
@click.option("--exclude", multiple=True, help="Leave out items matching this glob (repeatable).")
@click.option("--name", help="Execution name; a name already used returns that execution.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON document.")
@click.option("--table", is_flag=True, help="Also print a table of every item's result.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bar on stderr (default: when stderr is a terminal).",
)
@capture_options
@notify_option
@common_options
def classify(
    sources: tuple[str, ...],
    output: str | None,
    output_format: str | None,
    name: str | None,
    as_json: bool,
    table: bool,
    progress: bool | None,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    **kwargs: Any,
) -> None:
    """Classify images and record one result per image.

    SOURCE is an image file, a folder (searched recursively; images are recognised by
    content, and files with an image extension are always included so broken ones are
    reported), a glob such as 'photos/**/*.jpg', or @list.txt (one path per line).
    @items.csv (a 'uri' column) and @items.jsonl (objects with 'uri') are manifests whose
    other fields become each result's metadata; any manifest may be on S3 (@s3://B/m.csv).
    s3://BUCKET/PREFIX lists every image object under the prefix (an image extension or
    none); s3://BUCKET/KEY names one object. --include/--exclude filter what is listed.

    \b
    Exit codes:
      0    the execution SUCCEEDED
      1    it FAILED: more FAILED items than tolerated (by default any at all);
           LOW_CONFIDENCE items count too with --low-confidence fail
      2    usage or configuration error (nothing was run)
      3    internal error: a bug in ICS
      4    environment unavailable: the store or the results disk cannot be used
      130  interrupted (the execution is ABORTED; finished items are kept)
    """
    from ..capture import check_capture_folder
    from ..outputs import check_output
    from ..sources import configure

    guard = signal_guard()
    settings = load_cli_settings(kwargs).settings
    configure(settings)  # an s3:// output is checked with the storage settings
    # A results path that cannot be written is a usage error before any work is done.
    check_output(output, output_format, settings.results_dir)
    check_capture_folder(settings)
    with open_runner(settings) as runner:
        execution, created = runner.start(
            list(sources),
            name=name,
            cooperate=guard.cooperate,
            output=output,
            output_format=output_format,
            **({"include": list(include)} if include else {}),
            **({"exclude": list(exclude)} if exclude else {}),
        )
        if not created:
            click.echo(
                printable(f"execution named {name!r} already exists: {execution.id} ")
                + f"({execution.status}){name_hint(execution)}",
                err=True,
            )
            print_summary(execution, None, None, as_json=as_json)
            sys.exit(EXIT_BY_STATUS[execution.status])
        run_and_report(
            runner, execution, as_json=as_json, table=table, progress=progress, stop=guard.stop
        )


def name_hint(execution: Execution) -> str:
    """What to do about an execution that a reused --name returned."""
    from ..engine.lifecycle import is_orphaned

    if execution.status is ExecutionStatus.RUNNING and not is_orphaned(execution):
        return (
            f"; it is still running (in {execution.owner}): wait for it, or stop it with "
            f"`ics executions cancel {execution.id}`"
        )
    if execution.status in (ExecutionStatus.RUNNING, ExecutionStatus.ABORTED):
        return f"; `ics executions resume {execution.id}` continues it"
    return "; choose another --name to start a new execution"


def results_path_of(settings: Settings, execution: Execution) -> str:
    output = execution.params.get("output")
    return str(output) if output else str(settings.results_dir / f"{execution.id}.jsonl")


def run_and_report(
    runner: ExecutionRunner,
    execution: Execution,
    *,
    as_json: bool,
    table: bool,
    progress: bool | None,
    stop: threading.Event,
    resumed: bool = False,
) -> None:
    """Run the execution with a progress bar and a results file, print the summary, exit."""
    from ..outputs import rebuilt_writer

    settings = runner.settings
    results_path = results_path_of(settings, execution)
    with runner.ending_on_error(execution.id):
        # A resumed execution's file is rebuilt from the store, the source of truth.
        writer = rebuilt_writer(
            results_path,
            execution.params.get("output_format"),
            runner.store.results(execution.id) if resumed else (),
            stop=stop,
        )
    summary_to_stderr = results_path == "-"
    shown: list[ItemResult] = []
    started = time.perf_counter()
    total, done = execution.counts.total, execution.counts.done
    # Still being listed (it is registered as it runs): no total to show yet.
    shown_total = total if execution.items_listed else None
    first_result: list[float] = []  # seconds since the process started, when one came
    with progress_bar(
        progress, shown_total, done, listed=lambda: runner.listed_so_far(execution.id)
    ) as advance:

        def on_results(results: Sequence[ItemResult]) -> None:
            if not first_result and results:
                first_result.append(process_age_s())
                log.info("first result recorded %.3f s after the process started", first_result[0])
            advance(len(results))
            if table:
                shown.extend(results)

        finished = runner.run(execution, sinks=[writer], on_results=on_results, stop=stop)
        advance.settle(finished.counts.total)
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
        failure_types=runner.store.failure_types(finished.id),
        first_result_s=first_result[0] if first_result else None,
        reader_left_after=writer.count if writer.reader_gone else None,
        duplicates=runner.duplicates_dropped(finished.id),
    )
    # A reader of `-o -` that left early (`| head`) is no failure: the exit status is the
    # execution's, whose every result is in the store.
    closed_for_exit()  # once the runner's store, model and files are closed (open_runner)
    sys.exit(EXIT_BY_STATUS[finished.status])
