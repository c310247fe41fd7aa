"""`ics executions`: list, show, history, cancel, resume."""

from __future__ import annotations

import json
from typing import Any

import click

from ..types import ExecutionStatus, ItemStatus, isoformat
from .alerts import notify_option
from .app import (
    common_options,
    device_option,
    executor_options,
    json_out,
    load_cli_settings,
    main,
    open_runner,
    open_store,
    signal_guard,
    stdout_console,
)
from .capture import capture_options
from .classify import run_and_report
from .render import outside, print_results_table, print_summary, styled_status, summary_doc

# --- executions -----------------------------------------------------------------------


@main.group()
def executions() -> None:
    """Inspect, cancel and resume executions.

    EXECUTION_ID is an execution's id, a unique start of it, or the execution's name.
    """


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
    with open_store(kwargs) as store:
        rows = store.list_executions(
            limit=limit, status=None if status is None else ExecutionStatus(status)
        )
    if as_json:
        json_out([summary_doc(e, None, None) for e in rows])
        return
    from rich.table import Table

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
            outside(e.name or ""),
            styled_status(e.status.value),
            str(c.total),
            str(c.succeeded),
            str(c.low_confidence),
            str(c.failed),
            isoformat(e.started_at) or "",
            isoformat(e.finished_at) or "",
        )
    stdout_console().print(t)


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
    """Show one execution: EXECUTION_ID is its id, a unique start of it, or its name."""
    with open_store(kwargs) as store:
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
        json_out(doc)
        return
    print_summary(e, None, None, as_json=False)
    from rich.table import Table

    t = Table(show_header=False, box=None, padding=(0, 2))
    t.add_row("started", isoformat(e.started_at) or "")
    t.add_row("finished", isoformat(e.finished_at) or "")
    for key, value in e.params.items():
        t.add_row(key, outside(json.dumps(value) if not isinstance(value, str) else value))
    stdout_console().print(t)
    if with_results:
        print_results_table(results)


@executions.command("history")
@click.argument("execution_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@common_options
def executions_history(execution_id: str, as_json: bool, **kwargs: Any) -> None:
    """An execution's event history, oldest first.

    Execution events, failed and low-confidence items (MapIterationFailed) and retries
    (TaskRetried) are always recorded; with the setting history = "full", every item's
    MapIterationStarted, TaskStateEntered/Exited and MapIterationSucceeded too.
    """
    with open_store(kwargs) as store:
        e = store.get_execution(execution_id)
        events = [ev.to_dict() for ev in store.history(e.id)]
    if as_json:
        json_out(events)
        return
    from rich.table import Table

    t = Table()
    for col in ("id", "timestamp", "type", "item", "details"):
        t.add_column(col)
    for ev in events:
        t.add_row(
            str(ev["id"]),
            ev["timestamp"],
            ev["type"],
            ev["item_id"] or "",
            outside(json.dumps(ev["details"]) if ev["details"] else ""),
        )
    stdout_console().print(t)


@executions.command("cancel")
@click.argument("execution_id")
@click.option(
    "--wait", type=float, default=30.0, show_default=True, help="Seconds to wait for it to stop."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@common_options
def executions_cancel(execution_id: str, wait: float, as_json: bool, **kwargs: Any) -> None:
    """Stop a running execution: it ends ABORTED and keeps every finished item."""
    from ..engine import cancel_execution

    with open_store(kwargs) as store:
        e = cancel_execution(store, execution_id, wait_s=wait)
    if as_json:
        json_out(summary_doc(e, None, None))
    elif e.status is ExecutionStatus.RUNNING:
        click.echo(f"cancel requested: {e.id} is still stopping (owner {e.owner})")
    else:
        click.echo(f"{e.id}: {e.status.value}")


@executions.command("resume")
@click.argument("execution_id")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--table", is_flag=True, help="Also print a table of the items run now.")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr.")
@click.option("--workers", "decode_workers", type=int, help="Decode threads.")
@click.option("--threads", "inference_threads", type=int, help="onnxruntime threads per batch.")
@click.option("--inference-workers", type=int, help="Batches run at once on the model.")
@device_option
@executor_options
@capture_options
@notify_option
@common_options
def executions_resume(
    execution_id: str, as_json: bool, table: bool, progress: bool | None, **kwargs: Any
) -> None:
    """Continue an interrupted execution (killed, crashed, cancelled).

    Items with a recorded result are not redone; every other item is. The execution's
    own settings (model, threshold, top k, limits, tolerances) are used again, and its
    results file is rebuilt from the store and completed. Capture is not recorded with
    the execution: give --capture again to capture the items run now. Alerts go to the
    subscriptions the execution started with, or to those of --notify when given.
    """
    from .. import sources
    from ..capture import check_capture_folder
    from ..engine.execution import settings_for
    from ..outputs import check_output
    from ..store import Store

    guard = signal_guard()
    settings = load_cli_settings(kwargs).settings
    store = Store(settings.store_url, create=False)
    try:
        execution = store.get_execution(execution_id)
        if kwargs.get("notify") is None and "subscriptions" in execution.params:
            from ..alerts.dispatcher import recorded_subscriptions

            # Without --notify, the subscriptions the execution started with.
            notify = recorded_subscriptions(store, execution.params["subscriptions"])
            settings = settings.model_copy(update={"notify": notify})
    finally:
        store.close()
    settings = settings_for(execution, settings)
    sources.configure(settings)  # an s3:// output is checked with the storage settings
    check_output(
        execution.params.get("output"), execution.params.get("output_format"), settings.results_dir
    )
    check_capture_folder(settings)
    with open_runner(settings) as runner:
        execution = runner.prepare_resume(execution.id, cooperate=guard.cooperate)
        click.echo(
            f"resuming {execution.id}: {execution.counts.total - execution.counts.done} "
            f"of {execution.counts.total} items left",
            err=True,
        )
        run_and_report(
            runner,
            execution,
            as_json=as_json,
            table=table,
            progress=progress,
            stop=guard.stop,
            resumed=True,
        )
