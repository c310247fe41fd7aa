"""`ics alerts`: the alert outbox (list, retry, dispatch), and the --notify option."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import click

from ..errors import UsageError
from .app import common_options, json_out, main, open_store, stdout_console
from .render import outside

F = TypeVar("F", bound=Callable[..., Any])


def _subscriptions(_ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]) -> Any:
    # No --notify at all leaves the configured subscriptions; any replaces them.
    return list(value) or None


def notify_option(f: F) -> F:
    """--notify URL (repeatable): the alert subscriptions of a command that runs executions."""
    return click.option(
        "--notify",
        multiple=True,
        metavar="URL",
        callback=_subscriptions,
        help="Send alerts (LOW_CONFIDENCE and FAILED items, FAILED executions) to URL: "
        "https://... (webhook), file:///PATH.jsonl, sns://arn:aws:sns:..., or an apprise "
        "URL (mailto://, slack://...). Options ride as query parameters ICS removes: "
        "ics-kinds=low_confidence,item_failed,execution_failed, ics-mode=each|digest, "
        "ics-rate=10/1m, ics-secret=KEY (signs webhooks). Repeatable; replaces the "
        "configured `notify` subscriptions.",
    )(f)


@main.group()
def alerts() -> None:
    """The alert outbox: alerts, their deliveries, and sending them.

    Alerts are stored in the execution store with the results that raise them, then sent
    by a dispatcher (retried with the Notify retry policy, then dead-lettered). Every
    command that opens the store also delivers what is due.
    """


@alerts.command("list")
@click.option("--failed", is_flag=True, help="Only alerts with a dead or failing delivery.")
@click.option("--limit", type=int, default=50, show_default=True, help="Most recent first.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (documents included).")
@common_options
def alerts_list(failed: bool, limit: int, as_json: bool, **kwargs: Any) -> None:
    """List alerts, newest first, with each delivery's status."""
    from ..store.outbox import Outbox

    with open_store(kwargs) as store:
        rows = Outbox(store).list(failed=failed, limit=limit)
    if as_json:
        json_out(rows)
        return
    from rich.table import Table

    t = Table()
    for col in ("alert", "kind", "execution", "item", "created", "deliveries"):
        t.add_column(col)
    for a in rows:
        shown = []
        for d in a["deliveries"]:
            line = f"{d['status']} x{d['attempts']} {d['subscription']}"
            if d["last_error"] and d["status"] != "SENT":
                line += f" ({d['last_error']})"
            shown.append(line)
        t.add_row(
            a["alert_id"],
            a["kind"],
            a["execution_id"] or "",
            a["item_id"] or "",
            a["created_at"] or "",
            outside("\n".join(shown)),
        )
    stdout_console().print(t)


@alerts.command("retry")
@click.argument("alert_ids", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@common_options
def alerts_retry(alert_ids: tuple[str, ...], as_json: bool, **kwargs: Any) -> None:
    """Send dead-lettered alerts again (these ALERT_IDS or prefixes; none: every one).

    Their deliveries become due now with fresh attempts, and are sent before the command
    ends (within notify_drain_s) or by the next ICS process on the store.
    """
    from ..alerts.dispatcher import Dispatcher
    from ..store import Store
    from ..store.outbox import Outbox
    from .app import load_cli_settings

    settings = load_cli_settings(kwargs).settings
    store = Store(settings.store_url, create=False)
    try:
        n = Outbox(store).retry(alert_ids)
        # What it made due is sent now, as far as notify_drain_s allows.
        dispatcher = Dispatcher(store, settings).start_if_due(settings.notify_drain_s)
        dispatcher.stop(settings.notify_drain_s, wait_retries=False)
    finally:
        store.close()
    if alert_ids and n == 0:
        raise UsageError(
            f"no dead-lettered delivery for {' '.join(alert_ids)}: "
            "`ics alerts list --failed` shows the alerts that have one"
        )
    if as_json:
        json_out({"requeued": n})
    else:
        click.echo(f"{n} dead-lettered deliveries due again")


@alerts.command("dispatch")
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="Most seconds spent sending; what is left stays due.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@common_options
def alerts_dispatch(wait: float, as_json: bool, **kwargs: Any) -> None:
    """Deliver every alert due now (a cron job can call this)."""
    from ..alerts.dispatcher import Dispatcher
    from ..store import Store
    from .app import load_cli_settings

    settings = load_cli_settings(kwargs).settings
    store = Store(settings.store_url, create=False)
    try:
        dispatcher = Dispatcher(store, settings)
        try:
            dispatcher.drain(until=time.monotonic() + wait)
        finally:
            dispatcher.close()
    finally:
        store.close()
    doc = {"sent": dispatcher.sent, "failed": dispatcher.failed}
    if as_json:
        json_out(doc)
    else:
        click.echo(f"{doc['sent']} alerts sent, {doc['failed']} failed attempts")
