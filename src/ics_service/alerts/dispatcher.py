"""Delivering the outbox: a thread apart from the pipeline, with retries, leases, digests
and rate limits.

Every process that runs executions starts one (`Alerting`); commands that only read the
store deliver what is due now, if anything, for at most `notify_drain_s` (`deliver_due`);
`ics alerts dispatch` drains on demand. A channel that fails or hangs only delays its own
deliveries: after a failure its subscription waits for its retry time in this process while
the others are sent, and classification never waits for any of them.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Mapping, Sequence

from ..config import Settings
from ..policies import delay_seconds
from ..store import Store
from ..store.outbox import Delivery, NewAlert, Outbox
from ..subscriptions import Subscription
from ..types import Step, utcnow
from . import documents
from .channels import Channel, DeliveryError, NotFromHere, channel_of
from .planner import Planner

log = logging.getLogger(__name__)

#: How often an idle dispatcher looks for due deliveries.
POLL_S = 0.5
#: A delivery's lease is LEASE_FACTOR times the channel timeout plus LEASE_SLACK_S: a
#: webhook times its connect, write and read phases at half the timeout each (1.5 times in
#: all), SNS its connect and read. A sender that holds a lease longer has died, and another
#: process may send the delivery again.
LEASE_FACTOR = 2.0
LEASE_SLACK_S = 5.0
#: The least time a send is given when a deadline is near.
MIN_SEND_S = 0.1


class Dispatcher:
    """Sends due deliveries of one store; `drain` once, or `start`/`stop` a thread."""

    def __init__(
        self, store: Store, settings: Settings, channels: Mapping[str, Channel] | None = None
    ) -> None:
        self.outbox = Outbox(store)
        self.settings = settings
        self.policy = settings.retry[Step.NOTIFY]
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.lease = dt.timedelta(seconds=settings.notify_timeout_s * LEASE_FACTOR + LEASE_SLACK_S)
        # Digests and notices only need the documents, not this process's subscriptions.
        self.builder = Planner([], settings.public_url)
        self._subs: dict[str, Subscription] = {}
        #: Channels by subscription id: those Alerting built at start, then those built here.
        self._channels: dict[str, Channel] = dict(channels or {})
        #: Subscriptions this process cannot deliver to (left to other processes).
        self._elsewhere: set[str] = set()
        #: Subscription → monotonic time before which this process does not try it again
        #: (after a failure), so a channel that is down or hangs delays only itself.
        self._resting: dict[str, float] = {}
        self._rng = random.Random()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._until: float | None = None
        self._wait_retries = True
        self._once = False
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
            for d in self.outbox.due(skip=self._elsewhere | self._rested()):
                if self._past(until):
                    break
                if d.subscription_id in self._elsewhere or d.subscription_id in self._rested():
                    continue  # it failed earlier in this pass
                if self.outbox.claim(d.id, self.owner, self.lease):
                    progressed = True
                    self._deliver(d, until)
            if not progressed:
                break
        return self.sent - sent_before

    def _rested(self) -> set[str]:
        now = time.monotonic()
        return {sub for sub, until in self._resting.items() if until > now}

    def _deadline(self, until: float | None) -> float | None:
        return until if until is not None else self._until

    def _past(self, until: float | None) -> bool:
        limit = self._deadline(until)
        return limit is not None and time.monotonic() >= limit

    def _subscription(self, subscription_id: str, spec: str) -> Subscription:
        sub = self._subs.get(subscription_id)
        if sub is None:
            sub = self._subs[subscription_id] = Subscription.model_validate_json(spec)
        return sub

    def _channel(self, subscription_id: str, sub: Subscription) -> Channel:
        channel = self._channels.get(subscription_id)
        if channel is None:
            channel = self._channels[subscription_id] = channel_of(sub, self.settings)
        return channel

    def _rate_full(self, subscription_id: str, sub: Subscription) -> bool:
        """Whether the subscription sent as many as its rate limit allows in the last
        period (by this count, notices included)."""
        rate = sub.rate
        if rate is None:
            return False
        count, period = rate
        since = utcnow() - dt.timedelta(seconds=period)
        return self.outbox.sent_since(subscription_id, since) >= count

    def _deliver(self, d: Delivery, until: float | None) -> None:
        sub = self._subscription(d.subscription_id, d.spec)
        if self._rate_full(d.subscription_id, sub):
            if d.kind == "suppressed":
                # The notice takes the next free slot: it waits rather than being counted.
                period = sub.rate[1] if sub.rate else POLL_S
                later = utcnow() + dt.timedelta(seconds=min(period, 60.0) / 10)
                self.outbox.release(d.id, self.owner, next_at=later)
            else:
                self.outbox.suppress(d.id, self.owner)
            return
        try:
            channel = self._channel(d.subscription_id, sub)
        except Exception as e:  # a folder, a config, a package this process lacks
            self._not_from_here(d, f"{type(e).__name__}: {e}")
            return
        limit = self._deadline(until)
        timeout = None if limit is None else max(limit - time.monotonic(), MIN_SEND_S)
        try:
            channel.send(
                d.document,
                documents.title_of(d.document),
                documents.body_of(d.document),
                timeout_s=timeout,
            )
        except NotFromHere as e:
            self._not_from_here(d, str(e))
            return
        except DeliveryError as e:
            self._failed(d, str(e), transient=e.transient)
            return
        except Exception as e:  # a bug in a channel: retried, then dead-lettered
            self._failed(d, f"{type(e).__name__}: {e}", transient=True)
            return
        self.sent += 1
        if self.outbox.sent(d.id, self.owner):
            log.info("alert %s (%s) sent to %s", d.alert_id, d.kind, d.shown)
        else:
            self._lease_lost(d)

    def _lease_lost(self, d: Delivery) -> None:
        log.warning(
            "alert %s to %s took longer than its lease (%.0f s): another process may send it again",
            d.alert_id,
            d.shown,
            self.lease.total_seconds(),
        )

    def _not_from_here(self, d: Delivery, why: str) -> None:
        """Leave the subscription's deliveries to another process on the store: no attempt
        counted, and this process does not try it again."""
        self.outbox.release(d.id, self.owner)
        if d.subscription_id not in self._elsewhere:
            self._elsewhere.add(d.subscription_id)
            log.info(
                "alerts to %s are left to other ICS processes on the store: this one cannot "
                "send them (%s)",
                d.shown,
                why,
            )

    def _failed(self, d: Delivery, error: str, *, transient: bool) -> None:
        self.failed += 1
        attempt = d.attempts + 1
        if not transient or attempt > self.policy.max_attempts:
            if not self.outbox.failed(d.id, self.owner, error, retry_at=None):
                self._lease_lost(d)
                return
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
        self._resting[d.subscription_id] = time.monotonic() + delay
        retry_at = utcnow() + dt.timedelta(seconds=delay)
        if not self.outbox.failed(d.id, self.owner, error, retry_at=retry_at):
            self._lease_lost(d)
            return
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
        for subscription_id, spec, shown in self.outbox.suppressed_waiting():
            sub = self._subscription(subscription_id, spec)
            if sub.rate is None or self._rate_full(subscription_id, sub):
                continue
            period = sub.rate[1]

            def build(
                alert_id: str,
                n: int,
                sub_id: str = subscription_id,
                shown: str = shown,
                per: float = period,
            ) -> NewAlert:
                doc = documents.suppressed(alert_id, n, shown, per)
                return NewAlert(alert_id, "suppressed", doc, send_to=(sub_id,))

            self.outbox.notice(subscription_id, build)

    # --- as a thread ----------------------------------------------------------------

    def start(self) -> Dispatcher:
        self._thread = threading.Thread(target=self._loop, name="ics-alerts", daemon=True)
        self._thread.start()
        return self

    def start_if_due(self, within_s: float) -> Dispatcher:
        """For a command that only reads the store: if anything is due (one query), send
        it in the background within within_s from now, without waiting for retries or
        new alerts; nothing else when nothing is due."""
        if self.outbox.anything_due():
            self._once = True
            self._until = time.monotonic() + within_s
            self.start()
        return self

    def _loop(self) -> None:
        while True:
            try:
                self.drain()
            except Exception as e:  # a busy or lost store: try again at the next poll
                log.warning("delivering alerts: %s", e)
            if self._once:
                return
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
        next ICS process on the store. wait_retries=False: only what is due now. A
        dispatcher from start_if_due keeps its own deadline."""
        if self._thread is None:
            self.close()
            return
        self._wait_retries = wait_retries
        if not self._once:
            self._until = time.monotonic() + deadline_s
        until = self._until if self._until is not None else time.monotonic() + deadline_s
        self._stop.set()
        self._wake.set()
        # Every send is bounded by the time left (SNS by its own timeout): a small margin.
        self._thread.join(max(until - time.monotonic(), 0.0) + 0.5)
        if self._thread.is_alive():
            log.warning(
                "alerts still being sent after %.0f s; the next ICS command on this store "
                "delivers them",
                deadline_s,
            )
            return  # its channels are still in use
        self.close()

    def close(self) -> None:
        """Close the channels' connections."""
        for channel in self._channels.values():
            try:
                channel.close()
            except Exception as e:  # closing must not fail the command
                log.debug("closing an alert channel: %s", e)


def recorded_subscriptions(store: Store, ids: list[str]) -> list[Subscription]:
    """The subscriptions an execution recorded (by id) when it started, as the store keeps
    them; those it no longer knows are left out."""
    specs = {sub.id: sub for sub in map(Subscription.model_validate_json, Outbox(store).specs(ids))}
    return [specs[i] for i in ids if i in specs]


class Alerting:
    """Alerts for a process that runs executions: the subscriptions checked at start, the
    store writing alerts with results, and a dispatcher thread.

    `direct` subscriptions get only the alerts written for them by id (SageMaker's
    asynchronous inference notifications), not those results and execution ends raise."""

    def __init__(self, settings: Settings, direct: Sequence[Subscription] = ()) -> None:
        self.settings = settings
        self.subscriptions = list(settings.notify)
        known = {s.id for s in self.subscriptions}
        self.direct = [s for s in dict((s.id, s) for s in direct).values() if s.id not in known]
        # Built here so that a URL that cannot work is a usage error before any work; the
        # dispatcher sends through them.
        self.channels = {
            sub.id: channel_of(sub, settings) for sub in (*self.subscriptions, *self.direct)
        }
        self.dispatcher: Dispatcher | None = None

    def attach(self, store: Store) -> Alerting:
        everyone = [*self.subscriptions, *self.direct]
        if everyone:
            Outbox(store).register(
                [
                    (s.id, s.shown(self.channels[s.id].shown()), s.model_dump_json())
                    for s in everyone
                ]
            )
        if self.subscriptions:
            store.alert_planner = Planner(self.subscriptions, self.settings.public_url)
        # Started even without subscriptions here: it delivers what other processes left.
        self.dispatcher = Dispatcher(store, self.settings, self.channels).start()
        return self

    def close(self) -> None:
        if self.dispatcher is not None:
            self.dispatcher.stop(self.settings.notify_drain_s)
        else:
            for channel in self.channels.values():
                channel.close()
