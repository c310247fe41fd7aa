"""`ics watch`: classify new files in watched folders, in micro-batches, each exactly once."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

import click

from ..config import default
from ..errors import ExitCode, UsageError
from ..logs import printable
from ..types import Execution, ExecutionStatus
from .alerts import notify_option
from .app import (
    common_options,
    device_option,
    load_cli_settings,
    low_confidence_option,
    main,
    open_runner,
    signal_guard,
)
from .capture import capture_options
from .classify import results_path_of

if TYPE_CHECKING:
    from ..engine import ExecutionRunner
    from ..engine.recording import ResultSink


class WatchCommand(click.Command):
    """`ics watch SOURCE...`, and `ics watch forget NAME` when the first word is `forget`
    (a folder named so is `./forget`): a group could not also take SOURCE arguments."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        if args and args[0] == "forget":
            return watch_forget.make_context(f"{info_name} forget", args[1:], parent, **extra)
        return super().make_context(info_name, args, parent, **extra)


@main.command(cls=WatchCommand)
@click.argument("sources", nargs=-1, required=True)
@click.option(
    "--name",
    "watcher_name",
    help="Watcher name: its state (what it has classified) is kept under it in the store. "
    "Default: the folder's name and a hash of the sources, the same on every start.",
)
@click.option(
    "--once",
    is_flag=True,
    help="Classify what is there and what completes meanwhile, then exit (for cron).",
)
@click.option(
    "--max-items",
    "watch_max_items",
    type=int,
    help=f"Most files per micro-batch (default {default('watch_max_items')}).",
)
@click.option(
    "--max-wait",
    "watch_max_wait_s",
    type=float,
    help="Most seconds a new file waits for its micro-batch to fill up "
    f"(default {default('watch_max_wait_s')}).",
)
@click.option(
    "--settle",
    "watch_settle_s",
    type=float,
    help="Seconds a file must stay unchanged before it is read "
    f"(default {default('watch_settle_s')}).",
)
@click.option(
    "--poll-interval",
    "watch_poll_interval_s",
    type=float,
    help=f"Seconds between listings when polling (default {default('watch_poll_interval_s')}).",
)
@click.option(
    "--polling",
    "watch_polling",
    is_flag=True,
    default=None,
    help="List the folders every --poll-interval instead of using filesystem events "
    "(network file systems send none); S3 prefixes are always polled.",
)
@click.option(
    "-t",
    "--threshold",
    type=float,
    help="Top confidence needed to SUCCEED (default: the model card's threshold, else "
    f"{default('threshold')}).",
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
@device_option
@low_confidence_option
@click.option(
    "--tolerated-failure-percentage",
    type=float,
    help="Percentage of failed items a micro-batch tolerates before it FAILS (FAILED items; "
    "LOW_CONFIDENCE ones too with --low-confidence fail).",
)
@click.option(
    "--tolerated-failure-count",
    type=int,
    help="Number of failed items a micro-batch tolerates before it FAILS (FAILED items; "
    "LOW_CONFIDENCE ones too with --low-confidence fail).",
)
@click.option("--json", "as_json", is_flag=True, help="Print each micro-batch as a JSON line.")
@capture_options
@notify_option
@common_options
def watch(
    sources: tuple[str, ...],
    watcher_name: str | None,
    once: bool,
    as_json: bool,
    **kwargs: Any,
) -> None:
    """Classify new images as they arrive in folders or S3 prefixes, each exactly once.

    SOURCE is a folder, watched recursively (hidden files skipped), or s3://BUCKET/PREFIX,
    listed every --poll-interval seconds. New files are classified in micro-batches
    (--max-items, --max-wait), each one execution named watch-NAME-N with its results in
    HOME/results/EXECUTION_ID.jsonl; a line per micro-batch is printed. A file is read
    once its size and modification time have not changed for --settle seconds, so files
    still being written are not read half-way; an S3 object, once it is --settle seconds
    old.

    What was classified is kept in the execution store under the watcher's name: a
    restart (even after a crash) skips what is registered, resumes an unfinished
    micro-batch (one ended FAILED by an error, such as a full disk, included; one
    cancelled by `ics executions cancel` stays cancelled), and classifies what arrived
    meanwhile. A file replaced with new content is classified again. `ics watch forget
    NAME` deletes that state (a folder named forget is ./forget here).

    \b
    Exit codes:
      0    stopped by SIGINT or SIGTERM between micro-batches; with --once, every
           micro-batch SUCCEEDED
      1    with --once: a micro-batch FAILED (more FAILED items than tolerated;
           LOW_CONFIDENCE ones count too with --low-confidence fail)
      2    usage or configuration error
      3    internal error: a bug in ICS
      4    environment unavailable: the store or the results disk cannot be used
      130  a signal stopped a micro-batch midway: it is ABORTED, and the next start
           of the watcher finishes it
    """
    from ..capture import check_capture_folder
    from ..engine.feeds import feed_for
    from ..engine.watch import Watcher, check_watcher_name, default_name

    guard = signal_guard()
    settings = load_cli_settings(kwargs).settings
    check_capture_folder(settings)
    name = watcher_name or default_name(sources)
    check_watcher_name(name)
    feeds = [
        feed_for(
            spec,
            settle_s=settings.watch_settle_s,
            poll_s=settings.watch_poll_interval_s,
            polling=settings.watch_polling,
        )
        for spec in sources
    ]
    with open_runner(settings) as runner:

        def on_batch(execution: Execution, resumed: bool) -> None:
            _print_batch(runner, execution, resumed, as_json)

        watcher = Watcher(
            runner, name, feeds, sinks=lambda e: _results_file(runner, e), on_batch=on_batch
        )
        click.echo(
            printable(f"watching {' '.join(f.spec for f in feeds)} as watcher {name!r}"),
            err=True,
        )
        stop = guard.cooperate()
        ran = watcher.run(stop, once=once)
    if once and not ran:
        click.echo("nothing new to classify", err=True)
    # A batch cancelled by request (`ics executions cancel`) is ABORTED too: not a signal.
    if guard.received and any(e.status is ExecutionStatus.ABORTED for e in ran):
        sys.exit(ExitCode.INTERRUPTED)
    if guard.received:
        click.echo("stopped between micro-batches", err=True)
    if once and any(e.status is ExecutionStatus.FAILED for e in ran):
        sys.exit(ExitCode.FAILED)


def _results_file(runner: ExecutionRunner, execution: Execution) -> list[ResultSink]:
    """The micro-batch's results file, as `ics classify` writes it; for a resumed one,
    rebuilt from the store first (a crash may have cut it)."""
    from ..outputs import rebuilt_writer

    path = results_path_of(runner.settings, execution)
    return [rebuilt_writer(path, None, runner.store.results(execution.id))]


def _print_batch(
    runner: ExecutionRunner, execution: Execution, resumed: bool, as_json: bool
) -> None:
    path = results_path_of(runner.settings, execution)
    if as_json:
        doc = {**execution.to_dict(), "resumed": resumed, "results": path}
        doc.pop("params", None)
        click.echo(json.dumps(doc, default=str))
        return
    c = execution.counts
    click.echo(
        printable(
            f"{execution.name} {execution.id} {execution.status.value}"
            f"{' (resumed)' if resumed else ''}: {c.total} items, {c.succeeded} succeeded, "
            f"{c.low_confidence} low confidence, {c.failed} failed; results {path}"
        )
    )


@click.command("forget")
@click.argument("name")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@common_options
def watch_forget(name: str, yes: bool, **kwargs: Any) -> None:
    """Forget what watcher NAME has registered, so that its next start classifies every
    file it finds again (the store keeps a row per file a watcher has seen).

    Its micro-batch executions and their results stay; so does its batch counter (new
    micro-batches get new names). Refused while the watcher runs (it records its process
    and a heartbeat in the store): stop it first. Asks for confirmation unless --yes.
    """
    from ..engine.lifecycle import owner_gone
    from ..engine.watch import check_watcher_name
    from ..store.watched import WatchState
    from .app import open_store

    check_watcher_name(name)
    with open_store(kwargs) as store:
        state = WatchState(store, name)
        count = state.count()
        if count and not yes:
            if not sys.stdin.isatty():
                raise UsageError(
                    f"forgetting watcher {name} deletes what it registered ({count} files): "
                    "confirm with --yes"
                )
            click.confirm(
                printable(
                    f"forget the {count} files watcher {name} registered? Its next start "
                    "classifies them all again"
                ),
                abort=True,
            )
        forgotten = state.forget(owner_gone)  # refused while the watcher runs
        unfinished = state.unfinished()
    if not forgotten:
        click.echo(printable(f"watcher {name} has registered nothing: nothing to forget"))
        return
    click.echo(
        printable(
            f"watcher {name}: forgot {forgotten} registered files; its next start classifies "
            "every file it finds again"
        )
    )
    if unfinished:
        click.echo(
            printable(
                f"note: {len(unfinished)} micro-batches of {name} are unfinished "
                f"({', '.join(e.id for e in unfinished[:5])}"
                f"{', ...' if len(unfinished) > 5 else ''}); its next start finishes them"
            ),
            err=True,
        )
