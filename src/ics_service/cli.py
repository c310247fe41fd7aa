"""The `ics` command."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from . import __version__
from .config import LoadedSettings, Settings, load_settings
from .errors import IcsError
from .logs import configure_logging
from .types import Execution, ExecutionStatus, ItemResult, ItemStatus, isoformat

F = TypeVar("F", bound=Callable[..., Any])

#: Exit codes: 0 the execution SUCCEEDED, 1 it FAILED, 2 usage or configuration error,
#: 130 ABORTED (interrupted), 3 an internal error (a bug: please report it).
EXIT_ABORTED = 130
EXIT_INTERNAL = 3
_EXIT_BY_STATUS = {
    ExecutionStatus.SUCCEEDED: 0,
    ExecutionStatus.FAILED: 1,
    ExecutionStatus.ABORTED: EXIT_ABORTED,
    ExecutionStatus.RUNNING: 1,
}


class CliError(click.ClickException):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # click reads it per instance


class IcsGroup(click.Group):
    """Maps ICS errors to their exit codes and one-line messages (no traceback)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except IcsError as e:
            raise CliError(str(e), e.exit_code) from None


def common_options(f: F) -> F:
    """--config, --store, --home and the logging options, on every command."""
    options = [
        click.option(
            "--config",
            "config_file",
            type=click.Path(dir_okay=False),
            help="Settings file (default: ./ics.toml if present, or $ICS_CONFIG).",
        ),
        click.option("--store", help="Execution store URL (sqlite:///PATH or postgresql://...)."),
        click.option("--home", help="ICS home folder: model cache, default store and results."),
        click.option(
            "--log-format", type=click.Choice(["text", "json"]), help="Log line format on stderr."
        ),
        click.option(
            "--log-level",
            type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
            help="Lowest level of log lines shown (default WARNING).",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _load(kwargs: dict[str, Any]) -> LoadedSettings:
    """Build the settings from --config and the flags that are settings; set up logging."""
    overrides = dict(kwargs)
    config_file = overrides.pop("config_file", None)
    loaded = load_settings(config_file, overrides)
    configure_logging(loaded.settings.log_level, loaded.settings.log_format)
    return loaded


def _json_out(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, default=str))


def _stderr_console() -> Console:
    return Console(file=sys.stderr, highlight=False)


def _stdout_console() -> Console:
    return Console(file=sys.stdout, highlight=False, soft_wrap=False)


@click.group(cls=IcsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ics")
def main() -> None:
    """ICS, the Image Classification Service.

    Classify images from files, folders, globs and lists through a fixed workflow:
    read and decode, classify, compare the top confidence with a threshold, record
    every result. Every run is an execution recorded in a store (SQLite by default).

    \b
    Start with:
      ics classify photos/            classify a folder (recursive)
      ics executions list             past executions
      ics models list                 models and whether they are prepared
      ics config show                 the effective settings and where each came from
    """


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
    "--threads", "inference_threads", type=int, help="Inference threads (default: all cores)."
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
    from .engine import ExecutionRunner
    from .models import get_card, load_runtime
    from .outputs import ResultsWriter, format_for
    from .store import Store

    settings = _load(kwargs).settings
    card = get_card(settings.model)
    if output is not None:
        format_for(output, output_format)  # a bad name is a usage error before any work
    runtime = load_runtime(card, settings.models_dir, threads=settings.inference_threads)
    store = Store(settings.store_url)
    try:
        runner = ExecutionRunner(settings, store, runtime)
        execution, created = runner.start(list(sources), name=name, output=output)
        results_path = output or str(settings.results_dir / f"{execution.id}.jsonl")
        if not created:
            click.echo(
                f"execution named {name!r} already exists: {execution.id} ({execution.status})",
                err=True,
            )
            _print_summary(execution, None, None, as_json=as_json)
            sys.exit(_EXIT_BY_STATUS[execution.status])
        writer = ResultsWriter(results_path, output_format)
        summary_to_stderr = output == "-"
        shown: list[ItemResult] = []
        stop = threading.Event()
        started = time.perf_counter()
        with _progress_bar(progress, execution.counts.total) as advance, _stop_on_signals(stop):

            def on_results(results: Sequence[ItemResult]) -> None:
                advance(len(results))
                if table:
                    shown.extend(results)

            finished = runner.run(execution, sinks=[writer], on_results=on_results, stop=stop)
        elapsed = time.perf_counter() - started
        if table:
            _print_results_table(sorted(shown, key=lambda r: int(r.item_id)), summary_to_stderr)
        _print_summary(
            finished, elapsed, results_path, as_json=as_json, to_stderr=summary_to_stderr
        )
        sys.exit(_EXIT_BY_STATUS[finished.status])
    finally:
        store.close()


@contextmanager
def _progress_bar(enabled: bool | None, total: int) -> Iterator[Callable[[int], None]]:
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield lambda _n: None
        return
    bar = Progress(
        TextColumn("classifying"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=_stderr_console(),
        transient=False,
    )
    task = bar.add_task("classify", total=total, rate="")
    started = time.perf_counter()
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        rate = done / max(time.perf_counter() - started, 1e-9)
        bar.update(task, advance=n, rate=f"{rate:,.0f} img/s")

    with bar:
        yield advance


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
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


def _summary_doc(
    execution: Execution, elapsed: float | None, results_path: str | None
) -> dict[str, Any]:
    doc = execution.to_dict()
    doc.pop("params", None)
    if elapsed is not None:
        doc["elapsed_s"] = round(elapsed, 3)
        doc["images_per_s"] = round(execution.counts.done / elapsed, 2) if elapsed > 0 else None
    doc["results"] = results_path
    return doc


def _print_summary(
    execution: Execution,
    elapsed: float | None,
    results_path: str | None,
    *,
    as_json: bool,
    to_stderr: bool = False,
) -> None:
    doc = _summary_doc(execution, elapsed, results_path)
    if as_json:
        click.echo(json.dumps(doc, indent=2), err=to_stderr)
        return
    console = _stderr_console() if to_stderr else _stdout_console()
    c = execution.counts
    t = Table(show_header=False, box=None, padding=(0, 2))
    t.add_row("execution", execution.id + (f"  ({execution.name})" if execution.name else ""))
    t.add_row("status", _styled_status(execution.status.value))
    t.add_row(
        "items",
        f"{c.total} total: {c.succeeded} SUCCEEDED, {c.low_confidence} LOW_CONFIDENCE, "
        f"{c.failed} FAILED",
    )
    if elapsed is not None:
        t.add_row("elapsed", f"{elapsed:.2f} s ({doc['images_per_s'] or 0:,.1f} images/s)")
    if execution.error is not None:
        t.add_row("reason", f"{execution.error.type}: {execution.error.message}")
    if results_path:
        t.add_row("results", results_path)
    console.print(t)


def _styled_status(status: str) -> str:
    style = {
        "SUCCEEDED": "green",
        "LOW_CONFIDENCE": "yellow",
        "FAILED": "red",
        "ABORTED": "magenta",
        "RUNNING": "cyan",
    }.get(status, "")
    return f"[{style}]{status}[/{style}]" if style else status


def _print_results_table(results: Sequence[ItemResult], to_stderr: bool = False) -> None:
    console = _stderr_console() if to_stderr else _stdout_console()
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
            _short_uri(r.uri),
            _styled_status(r.status.value),
            r.label or "",
            "" if r.confidence is None else f"{r.confidence:.3f}",
            "" if r.error is None else f"{r.error.type}: {r.error.message}",
        )
    console.print(t)


def _short_uri(uri: str) -> str:
    try:
        return str(Path(uri).relative_to(Path.cwd()))
    except ValueError:
        return uri


# --- executions -----------------------------------------------------------------------


@main.group()
def executions() -> None:
    """Inspect recorded executions."""


@executions.command("list")
@click.option("--limit", type=int, default=20, show_default=True, help="Most recent first.")
@click.option(
    "--status",
    type=click.Choice([s.value for s in ExecutionStatus]),
    help="Only executions with this status.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@common_options
def executions_list(limit: int, status: str | None, as_json: bool, **kwargs: Any) -> None:
    """List executions: id, name, status, counts, started and finished."""
    with _store(kwargs) as store:
        rows = store.list_executions(
            limit=limit, status=None if status is None else ExecutionStatus(status)
        )
    if as_json:
        _json_out([_summary_doc(e, None, None) for e in rows])
        return
    t = Table()
    for col in (
        "execution",
        "name",
        "status",
        "total",
        "ok",
        "low",
        "failed",
        "started",
        "finished",
    ):
        t.add_column(col, justify="right" if col in ("total", "ok", "low", "failed") else "left")
    for e in rows:
        c = e.counts
        t.add_row(
            e.id,
            e.name or "",
            _styled_status(e.status.value),
            str(c.total),
            str(c.succeeded),
            str(c.low_confidence),
            str(c.failed),
            isoformat(e.started_at) or "",
            isoformat(e.finished_at) or "",
        )
    _stdout_console().print(t)


@executions.command("show")
@click.argument("execution_id")
@click.option("--results", "with_results", is_flag=True, help="Also list every item's result.")
@click.option(
    "--status",
    type=click.Choice([s.value for s in ItemStatus]),
    help="With --results: only items of this status.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@common_options
def executions_show(
    execution_id: str, with_results: bool, status: str | None, as_json: bool, **kwargs: Any
) -> None:
    """Show one execution (a unique prefix of its id is enough)."""
    with _store(kwargs) as store:
        e = store.get_execution(execution_id)
        results = (
            list(store.results(e.id, status=None if status is None else ItemStatus(status)))
            if with_results
            else []
        )
    if as_json:
        doc = e.to_dict()
        if with_results:
            doc["results"] = [r.to_dict() for r in results]
        _json_out(doc)
        return
    _print_summary(e, None, None, as_json=False)
    t = Table(show_header=False, box=None, padding=(0, 2))
    t.add_row("started", isoformat(e.started_at) or "")
    t.add_row("finished", isoformat(e.finished_at) or "")
    for key, value in e.params.items():
        t.add_row(key, json.dumps(value) if not isinstance(value, str) else value)
    _stdout_console().print(t)
    if with_results:
        _print_results_table(results)


@contextmanager
def _store(kwargs: dict[str, Any]) -> Iterator[Any]:
    from .store import Store

    settings = _load(kwargs).settings
    store = Store(settings.store_url)
    try:
        yield store
    finally:
        store.close()


# --- models ---------------------------------------------------------------------------


@main.group()
def models() -> None:
    """List, inspect and prepare models."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@common_options
def models_list(as_json: bool, **kwargs: Any) -> None:
    """Models ICS knows and whether each is prepared (its ONNX file cached)."""
    from .models import MODELS

    settings = _load(kwargs).settings
    docs = [_model_doc(name, settings) for name in MODELS]
    if as_json:
        _json_out(docs)
        return
    t = Table()
    for col in ("name", "version", "input", "classes", "prepared", "description"):
        t.add_column(col)
    for d in docs:
        t.add_row(
            d["name"],
            d["version"],
            f"{d['input_size']}×{d['input_size']}",
            str(d["num_classes"]),
            "yes" if d["prepared"] else "no",
            d["description"],
        )
    _stdout_console().print(t)


@models.command("info")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@common_options
def models_info(name: str, as_json: bool, **kwargs: Any) -> None:
    """A model's card: input size, preprocessing, labels, and its ONNX file's path."""
    settings = _load(kwargs).settings
    doc = _model_doc(name, settings)
    if as_json:
        _json_out(doc)
        return
    t = Table(show_header=False, box=None, padding=(0, 2))
    for key, value in doc.items():
        t.add_row(key, str(value))
    _stdout_console().print(t)


def _model_doc(name: str, settings: Settings) -> dict[str, Any]:
    from .models import get_card
    from .models.prepare import is_prepared, onnx_path

    card = get_card(name)
    path = onnx_path(card, settings.models_dir)
    prepared = is_prepared(card, settings.models_dir)
    return {
        **card.to_dict(),
        "path": str(path),
        "prepared": prepared,
        "size_bytes": path.stat().st_size if prepared else None,
    }


@models.command("prepare")
@click.argument("names", nargs=-1)
@click.option("--force", is_flag=True, help="Rebuild even when the ONNX file exists.")
@common_options
def models_prepare(names: tuple[str, ...], force: bool, **kwargs: Any) -> None:
    """Build models' ONNX files once (default: every model). Needs the `convert` extra."""
    from .models import MODELS, get_card
    from .models.prepare import is_prepared, prepare

    settings = _load(kwargs).settings
    for name in names or tuple(MODELS):
        card = get_card(name)
        if is_prepared(card, settings.models_dir) and not force:
            click.echo(f"{name}: already prepared")
            continue
        click.echo(f"{name}: preparing...", err=True)
        started = time.perf_counter()
        path = prepare(card, settings.models_dir, force=force)
        click.echo(f"{name}: prepared {path} in {time.perf_counter() - started:.1f} s")


# --- config ---------------------------------------------------------------------------


@main.group()
def config() -> None:
    """Inspect the effective settings."""


@config.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@common_options
def config_show(as_json: bool, **kwargs: Any) -> None:
    """Every setting, its effective value, and where it came from."""
    loaded = _load(kwargs)
    values = loaded.settings.model_dump(mode="json")
    if as_json:
        _json_out(
            {
                "config_file": None if loaded.config_file is None else str(loaded.config_file),
                "settings": {
                    k: {"value": v, "source": loaded.sources[k]} for k, v in values.items()
                },
            }
        )
        return
    t = Table()
    t.add_column("setting")
    t.add_column("value")
    t.add_column("source")
    for key, value in values.items():
        t.add_row(key, json.dumps(value), loaded.sources[key])
    _stdout_console().print(t)


def run() -> None:
    """Entry point that also turns unexpected errors into one line and exit code 3."""
    try:
        main(standalone_mode=True)
    except SystemExit:
        raise
    except Exception as e:
        click.echo(f"internal error: {type(e).__name__}: {e} (please report it)", err=True)
        sys.exit(EXIT_INTERNAL)
