"""Which alerts results and execution ends raise, and for which subscriptions.

The Store calls it inside the transaction that records the results, so an alert exists
exactly when the result that raised it does.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..store.outbox import Held, NewAlert
from ..subscriptions import Subscription
from ..types import Execution, ExecutionStatus, ItemResult
from . import documents


class Planner:
    def __init__(self, subscriptions: Sequence[Subscription], public_url: str | None) -> None:
        self.subscriptions = list(subscriptions)
        self.public_url = public_url

    def _targets(self, kind: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(subscriptions sent each alert of this kind, those holding it for a digest)."""
        wanting = [s for s in self.subscriptions if s.wants(kind)]
        return (
            tuple(s.id for s in wanting if s.mode == "each"),
            tuple(s.id for s in wanting if s.mode == "digest"),
        )

    def for_results(self, execution_id: str, results: Sequence[ItemResult]) -> list[NewAlert]:
        alerts = []
        for r in results:
            kind = documents.ITEM_KIND.get(r.status)
            if kind is None:
                continue
            send_to, hold_for = self._targets(kind)
            if not send_to and not hold_for:
                continue
            doc = documents.item_alert(r, self.public_url)
            alerts.append(
                NewAlert(
                    alert_id=doc["alert_id"],
                    kind=kind,
                    document=doc,
                    execution_id=execution_id,
                    item_seq=int(r.item_id),
                    confidence=r.confidence,
                    send_to=send_to,
                    hold_for=hold_for,
                )
            )
        return alerts

    def for_end(self, execution: Execution) -> list[NewAlert]:
        if execution.status is not ExecutionStatus.FAILED:
            return []
        send_to, hold_for = self._targets("execution_failed")
        doc = documents.execution_alert(execution, self.public_url)
        return [
            NewAlert(
                alert_id=doc["alert_id"],
                kind="execution_failed",
                document=doc,
                execution_id=execution.id,
                send_to=send_to,
                hold_for=hold_for,
            )
        ]

    def digest(self, alert_id: str, held: Held) -> NewAlert:
        doc = documents.digest(alert_id, held, self.public_url)
        return NewAlert(
            alert_id=alert_id,
            kind="digest",
            document=doc,
            execution_id=None if held.execution is None else held.execution.id,
            send_to=(held.subscription_id,),
        )
