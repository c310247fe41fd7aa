"""Delivering the outbox: a thread apart from the pipeline, with retries, leases, digests
and rate limits.

Every process that runs executions starts one (`Alerting`); every other command that opens
the store drains what is due in the background for at most `notify_drain_s`; `ics alerts
dispatch` drains on demand. A channel that fails or hangs only delays its own deliveries:
classification never waits for it.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import socket
import threading
import time

from ..config import Settings
from ..store import Store
from ..store.outbox import Delivery, NewAlert, Outbox
from ..types import Step, utcnow
from . import documents
from .channels import Channel, DeliveryError, channel_for
from .planner import Planner
from .subscriptions import Subscription

log = logging.getLogger(__name__)

#: How often an idle dispatcher looks for due deliveries.
POLL_S = 0.5
#: Added to the channel timeout for a delivery's lease: a sender that holds one longer
#: has died, and another process may send it again.
LEASE_SLACK_S = 5.0


class Dispatcher:
    """Sends due deliveries of one store; `drain` once, or `start`/`stop` a thread."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.outbox = Outbox(store)
        self.settings = settings
        self.policy = settings.retry[Step.NOTIFY]
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.lease = dt.timedelta(seconds=settings.notify_timeout_s + LEASE_SLACK_S)
        # Digests and notices only need the documents, not this process's subscriptions.
        self.builder = Planner([], settings.public_url)
        self._subs: dict[str, Subscription] = {}
        self._channels: dict[str, Channel] = {}
        self._rng = random.Random()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._until: float | None = None
        self._wait_retries = True
        self._thread: threading.Thread | None = None
        self.sent = self.failed = 0

    # --- one pass -------------------------------------------------------------------

    def drain(self, until: float | None = None) -> int:
        """Send what is due now (until the monotonic deadline, if any); returns how many
        were sent."""
        sent_before = self.sent
        self._roll_up_overdue()
        self._notices()
        while not self._past(until):
            progressed = False
            for d in self.outbox.due():
                if self._past(until):
                    break
                if self.outbox.claim(d.id, self.owner, self.lease):
                    progressed = True
                    self._deliver(d)
            if not progressed:
                break
        return self.sent - sent_before

    def _past(self, until: float | None) -> bool:
        limit = until if until is not None else self._until
        return limit is not None and time.monotonic() >= limit

    def _subscription(self, d: Delivery) -> Subscription:
        sub = self._subs.get(d.subscription_id)
        if sub is None:
            sub = self._subs[d.subscription_id] = Subscription.model_validate_json(d.spec)
        return sub

    def _channel(self, subscription_id: str, sub: Subscription) -> Channel:
        channel = self._channels.get(subscription_id)
        if channel is None:
            channel = channel_for(
                sub.channel_url, timeout_s=self.settings.notify_timeout_s, settings=self.settings
            )
            self._channels[subscription_id] = channel
        return channel

    def _deliver(self, d: Delivery) -> None:
        try:
            sub = self._subscription(d)
            rate = sub.rate
            if rate is not None and d.kind != "suppressed":
                count, period = rate
                since = utcnow() - dt.timedelta(seconds=period)
                if self.outbox.sent_since(d.subscription_id, since) >= count:
                    self.outbox.suppress(d.id)
                    return
            channel = self._channel(d.subscription_id, sub)
            channel.send(d.document, documents.title_of(d.document), documents.body_of(d.document))
        except DeliveryError as e:
            self._failed(d, str(e), transient=e.transient)
            return
        except Exception as e:  # a channel that cannot be built here, or a bug in one
            self._failed(d, f"{type(e).__name__}: {e}", transient=False)
            return
        self.outbox.sent(d.id)
        self.sent += 1
        log.info("alert %s (%s) sent to %s", d.alert_id, d.kind, d.shown)

    def _failed(self, d: Delivery, error: str, *, transient: bool) -> None:
        from ..engine.retry import delay_seconds

        self.failed += 1
        attempt = d.attempts + 1
        if not transient or attempt > self.policy.max_attempts:
            self.outbox.failed(d.id, error, retry_at=None)
            log.error(
                "alert %s to %s dead-lettered after %d attempt(s): %s; `ics alerts retry %s` "
                "sends it again",
                d.alert_id,
                d.shown,
                attempt,
                error,
                d.alert_id,
            )
            return
        delay = delay_seconds(self.policy, attempt, self._rng)
        self.outbox.failed(d.id, error, retry_at=utcnow() + dt.timedelta(seconds=delay))
        log.warning(
            "alert %s to %s failed (attempt %d): %s; retrying in %.1f s",
            d.alert_id,
            d.shown,
            attempt,
            error,
            delay,
        )

    def _roll_up_overdue(self) -> None:
        """Digests of executions that hold alerts longer than the digest window (a server's
        daily real-time execution, a long batch, one whose process died)."""
        cutoff = utcnow() - dt.timedelta(seconds=self.settings.notify_digest_window_s)
        for subscription_id, execution_id in self.outbox.overdue_held(cutoff):
            self.outbox.roll_up(self.builder, execution_id, subscription_id)

    def _notices(self) -> None:
        """One "N more suppressed" notice per subscription once its rate allows a send."""
        for subscription_id, text in self.outbox.suppressed_waiting():
            spec = Subscription.model_validate_json(text)
            rate = spec.rate
            if rate is None:
                continue
            count, period = rate
            since = utcnow() - dt.timedelta(seconds=period)
            if self.outbox.sent_since(subscription_id, since) >= count:
                continue

            def build(
                alert_id: str,
                n: int,
                sub: Subscription = spec,
                sub_id: str = subscription_id,
                per: float = period,
            ) -> NewAlert:
                doc = documents.suppressed(alert_id, n, sub.shown(), per)
                return NewAlert(alert_id, "suppressed", doc, send_to=(sub_id,))

            self.outbox.notice(subscription_id, build)

    # --- as a thread ----------------------------------------------------------------

    def start(self) -> Dispatcher:
        self._thread = threading.Thread(target=self._loop, name="ics-alerts", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while True:
            try:
                self.drain()
            except Exception as e:  # a busy or lost store: try again at the next poll
                log.warning("delivering alerts: %s", e)
            if self._stop.is_set():
                pause = self._retry_pause()
                if pause is None:
                    return
                time.sleep(pause)
                continue
            self._wake.wait(POLL_S)
            self._wake.clear()

    def _retry_pause(self) -> float | None:
        """While stopping: how long until the next retry falls due, if that is before the
        deadline (else None: stop now)."""
        try:
            when = self.outbox.next_due_at()
        except Exception:
            return None
        if when is None or self._until is None or not self._wait_retries:
            return None
        pause = max((when - utcnow()).total_seconds(), 0.1)
        return pause if time.monotonic() + pause < self._until else None

    def stop(self, deadline_s: float, *, wait_retries: bool = True) -> None:
        """Deliver what is due, and retries falling due, for at most deadline_s more, then
        stop; what is left (later retries, a hanging channel) waits in the outbox for the
        next ICS process on the store. wait_retries=False: only what is due now."""
        if self._thread is None:
            return
        self._wait_retries = wait_retries
        self._until = time.monotonic() + deadline_s
        self._stop.set()
        self._wake.set()
        self._thread.join(deadline_s + 1.0)
        if self._thread.is_alive():
            log.warning(
                "alerts still being sent after %.0f s; the next ICS command on this store "
                "delivers them",
                deadline_s,
            )


class Alerting:
    """Alerts for a process that runs executions: the subscriptions checked at start, the
    store writing alerts with results, and a dispatcher thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.subscriptions = list(settings.notify)
        # Built once here so that a URL that cannot work is a usage error before any work.
        for sub in self.subscriptions:
            channel_for(sub.channel_url, timeout_s=settings.notify_timeout_s, settings=settings)
        self.dispatcher: Dispatcher | None = None

    def attach(self, store: Store) -> Alerting:
        if self.subscriptions:
            Outbox(store).register(
                [(s.id, s.shown(), s.model_dump_json()) for s in self.subscriptions]
            )
            store.alert_planner = Planner(self.subscriptions, self.settings.public_url)
        # Started even without subscriptions here: it delivers what other processes left.
        self.dispatcher = Dispatcher(store, self.settings).start()
        return self

    def close(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.stop(self.settings.notify_drain_s)
