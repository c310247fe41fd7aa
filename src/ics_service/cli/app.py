"""The `ics` command group: shared options, settings, error mapping and the entry point."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

import click

from .. import __version__
from ..config import LoadedSettings, Settings, load_settings
from ..errors import ExitCode, IcsError, Interrupted, permission_denied
from ..logs import configure_logging, printable
from ..startup import end_process, pause_gc
from ..types import ExecutionStatus
from .signals import SignalGuard, guarded

if TYPE_CHECKING:  # Rich is imported when something is printed with it
    from rich.console import Console

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("ics_service.cli")

EXIT_BY_STATUS = {
    ExecutionStatus.SUCCEEDED: ExitCode.OK,
    ExecutionStatus.FAILED: ExitCode.FAILED,
    ExecutionStatus.ABORTED: ExitCode.INTERRUPTED,
    ExecutionStatus.RUNNING: ExitCode.FAILED,
}
_GUARD = "ics.signals"


class CliError(click.ClickException):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # click reads it per instance


class IcsGroup(click.Group):
    """Maps ICS errors and signals to their exit codes and one-line messages (no traceback)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except IcsError as e:
            raise CliError(printable(str(e)), e.exit_code) from None
        except PermissionError as e:  # a file of another user's: not a bug
            denied = permission_denied(e)
            raise CliError(printable(str(denied)), denied.exit_code) from None
        except (Interrupted, KeyboardInterrupt) as e:  # SIGINT or SIGTERM
            raise CliError(
                printable(f"interrupted: {str(e) or 'stopped by a signal'}"),
                ExitCode.INTERRUPTED,
            ) from None


def signal_guard() -> SignalGuard:
    """The running command's handler of SIGINT and SIGTERM (see signals.py)."""
    guard = click.get_current_context().find_root().meta.get(_GUARD)
    return guard if isinstance(guard, SignalGuard) else SignalGuard()


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


def low_confidence_option(f: F) -> F:
    """--low-confidence flag|fail: whether LOW_CONFIDENCE items can fail the execution."""
    return click.option(
        "--low-confidence",
        type=click.Choice(["flag", "fail"]),
        help="LOW_CONFIDENCE items are flagged: alerted and counted, but only FAILED items "
        "can fail the execution (flag, the default); or they count as failures too (fail).",
    )(f)


def executor_options(f: F) -> F:
    """--executor local|ray, --ray-address, --ray-replicas, --ray-num-cpus."""
    options = [
        click.option(
            "--executor",
            type=click.Choice(["local", "ray"]),
            help="Where the items run: local (this process, the default) or ray (Ray actors "
            "on a Ray cluster; needs the ics-service[ray] extra).",
        ),
        click.option(
            "--ray-address",
            metavar="ADDRESS",
            help="Ray cluster to run on (HOST:PORT, auto, ray://...; default $RAY_ADDRESS, "
            "else a Ray started for the run).",
        ),
        click.option(
            "--ray-replicas", type=int, help="Model replicas on Ray (default: one per CPU)."
        ),
        click.option("--ray-num-cpus", type=float, help="CPUs Ray reserves per replica."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def device_option(f: F) -> F:
    """--device cpu|cuda[:N]|auto: where the model runs."""
    return click.option(
        "--device",
        metavar="cpu|cuda[:N]|auto",
        help="Where the model runs: cpu (the default), cuda or cuda:N (GPU N, with the "
        "onnxruntime-gpu package; missing: exit 4, no fallback), or auto (CUDA when "
        "onnxruntime has it, else the CPU; says which).",
    )(f)


def load_cli_settings(kwargs: dict[str, Any]) -> LoadedSettings:
    """Build the settings from --config and the flags that are settings; set up logging."""
    overrides = dict(kwargs)
    config_file = overrides.pop("config_file", None)
    loaded = load_settings(config_file, overrides, flag_names=_flag_names())
    configure_logging(loaded.settings.log_level, loaded.settings.log_format)
    return with_card_threshold(loaded)


def with_card_threshold(loaded: LoadedSettings) -> LoadedSettings:
    """The model card's own threshold as the default threshold: a threshold set in the
    file, the environment or a flag still wins. A model that cannot be found leaves the
    settings as they are (the command that uses it says what is wrong)."""
    if loaded.sources["threshold"] != "default":
        return loaded
    from ..errors import UsageError
    from ..models import get_card

    settings = loaded.settings
    try:
        card = get_card(settings.model, settings)
    except UsageError:
        return loaded
    if card.threshold is None:
        return loaded
    return replace(
        loaded,
        settings=settings.model_copy(update={"threshold": card.threshold}),
        sources={**loaded.sources, "threshold": f"card {card.name}"},
    )


def _flag_names() -> dict[str, str]:
    """Setting name → the flag of the running command that sets it (`--workers`)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return {}
    return {
        p.name: max(p.opts, key=len)
        for p in ctx.command.params
        if isinstance(p, click.Option) and p.name
    }


def json_out(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, default=str))


#: Width of tables written to a file or a pipe, where no terminal says how wide to be.
PIPE_WIDTH = 160


def _console(file: Any) -> Console:
    from rich.console import Console

    width = None if file.isatty() or os.environ.get("COLUMNS") else PIPE_WIDTH
    return Console(file=file, highlight=False, width=width)


def stderr_console() -> Console:
    return _console(sys.stderr)


def stdout_console() -> Console:
    return _console(sys.stdout)


@click.group(cls=IcsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ics")
@click.pass_context
def main(ctx: click.Context) -> None:
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

    \b
    Exit codes:
      0    the execution SUCCEEDED (or the command did what was asked)
      1    the execution FAILED: more FAILED items than tolerated (LOW_CONFIDENCE
           ones are flagged, and count too with --low-confidence fail)
      2    usage or configuration error: fix the command line or the settings
      3    internal error: a bug in ICS (see the message to report it)
      4    environment unavailable: the store, the disk, the port or the --device
           cannot be used
      5    drift: `ics report --baseline` found a PSI over the limit
      130  interrupted by SIGINT or SIGTERM (the execution is ABORTED)
    """
    ctx.meta[_GUARD] = ctx.with_resource(guarded())


@contextmanager
def open_runner(settings: Settings) -> Iterator[Any]:
    from ..engine import ExecutionRunner
    from ..engine.executor import check_executor
    from ..engine.pipeline import plan_inference
    from ..models import get_card
    from ..models.background import RuntimeLoading
    from ..models.device import device_for
    from ..models.remote import RemoteOptions

    check_executor(settings)  # before the model opens: a missing package fails at once
    card = get_card(settings.model, settings)
    device = device_for(card.kind, card.name, settings.device)
    threads, _ = plan_inference(settings.inference_threads, settings.inference_workers)
    # The model opens on a thread while this one imports SQLAlchemy (with the alerts, below).
    loading = RuntimeLoading(
        card,
        settings.models_dir,
        threads=threads,
        device=device,
        remote=RemoteOptions.of(settings),
    )
    from ..alerts.dispatcher import Alerting
    from ..store import Store

    alerting = Alerting(settings)  # a subscription that cannot work: a usage error now
    runtime = loading.result()
    store = Store(settings.store_url)
    ended = False
    try:
        alerting.attach(store)
        try:
            yield ExecutionRunner(settings, store, runtime)
        except SystemExit:
            ended = True
            raise
        ended = True
    finally:
        try:
            alerting.close()
        finally:
            try:
                if ended:
                    # The run's end was recorded: is the store that holds it still there?
                    store.verify()
            finally:
                store.close()
                close = getattr(runtime, "close", None)  # a remote model's connections
                if close is not None:
                    close()


@contextmanager
def open_store(kwargs: dict[str, Any]) -> Iterator[Any]:
    """The store of the settings, for commands that only read it: it must exist already.

    Alerts due in its outbox (left by a process that died, or retries) are delivered
    meanwhile, within notify_drain_s of opening it; when none is due this costs one query.
    """
    from ..alerts.dispatcher import Dispatcher
    from ..store import Store

    settings = load_cli_settings(kwargs).settings
    store = Store(settings.store_url, create=False)
    # Only when something is due, and only what is due: never retries nor new alerts.
    dispatcher = Dispatcher(store, settings).start_if_due(settings.notify_drain_s)
    try:
        yield store
    finally:
        dispatcher.stop(settings.notify_drain_s, wait_retries=False)
        store.close()


def run() -> None:
    """Entry point: a bug becomes one line and exit code 3, its traceback a DEBUG log line."""
    pause_gc()  # a process of its own: its start-up need not be scanned for garbage
    try:
        # The command installs its own handlers; these cover what runs around it.
        with guarded():
            main(standalone_mode=True)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            end_process(e.code or 0)
        raise
    except Interrupted as e:
        click.echo(printable(f"interrupted: {e}"), err=True)
        sys.exit(ExitCode.INTERRUPTED)
    except Exception as e:
        log.debug("internal error", exc_info=True)
        click.echo(
            f"internal error: {printable(f'{type(e).__name__}: {e}')}\nThis is a bug in "
            "ICS. Run the command again with --log-level DEBUG and report it with that output.",
            err=True,
        )
        sys.exit(ExitCode.INTERNAL)
