"""The webhook channel: POST the alert's JSON document.

Headers: `Idempotency-Key: <alert_id>` always; with a secret (the subscription's
`ics-secret`, never sent) `X-ICS-Timestamp: <unix seconds>` and
`X-ICS-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>." + body>`, so a receiver can
refuse a replayed old request as well as a forged one.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from .. import __version__, fetch
from ..errors import UsageError
from ..policies import transient_status
from ..redact import hide_secrets
from .delivery import DeliveryError

#: The most of a receiver's answer read (its body is not used; a receiver that sends more
#: is not waited for).
MAX_ANSWER_BYTES = 64 * 1024
#: The most seconds spent reading the body of an answer whose status has arrived.
DRAIN_S = 1.0


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """The X-ICS-Signature value of a body sent at timestamp."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


class WebhookChannel:
    def __init__(self, url: str, *, timeout_s: float, secret: str | None = None) -> None:
        if not urlsplit(url).hostname:
            raise UsageError(f"webhook URL {hide_secrets(url)} has no host")
        self.url = url
        self.secret = secret
        self.timeout_s = timeout_s
        # The secret is the subscription's to show (Subscription.shown), not part of the URL.
        self._shown = hide_secrets(url)
        # One connection pool (and SSL context) for every send of the channel. Webhook URLs
        # are the operator's own settings, so any address may be one.
        self._fetcher = fetch.Fetcher(allow_link_local=True, user_agent=f"ics/{__version__}")

    def shown(self) -> str:
        return self._shown

    def close(self) -> None:
        self._fetcher.close()

    def send(
        self, alert: Mapping[str, Any], title: str, body: str, *, timeout_s: float | None = None
    ) -> None:
        """POST the document, within timeout_s (at most the channel's own timeout). The
        status line decides: 2xx is delivered, whatever the body that follows it does."""
        limit = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)
        payload = json.dumps(alert, separators=(",", ":"), default=str).encode()
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": str(alert["alert_id"]),
        }
        if self.secret is not None:
            ts = str(int(time.time()))
            headers["X-ICS-Timestamp"] = ts
            headers["X-ICS-Signature"] = signature(self.secret, ts, payload)
        deadline = fetch.Deadline(limit)
        try:
            with self._fetcher.open(
                "POST", self.url, deadline=deadline, headers=headers, content=payload
            ) as reply:
                status, reason = reply.status, reply.reason
                deadline.narrow(DRAIN_S)
                _drain(reply)
        except fetch.TimedOut:
            raise DeliveryError(f"no whole answer within {limit:g} s") from None
        except fetch.FetchError as e:
            raise DeliveryError(f"{type(e).__name__}: {e}", transient=e.transient) from None
        if 200 <= status < 300:
            return
        transient = transient_status(status)
        raise DeliveryError(
            f"HTTP {status} {reason}".rstrip() + ("" if transient else " (refused: not retried)"),
            transient=transient,
        )


def _drain(reply: fetch.Reply) -> None:
    """Read a short answer's body within the deadline left (at most DRAIN_S), so that the
    connection can be used again; a longer or slower one is not waited for (its connection
    is closed): the status has said what happened."""
    with contextlib.suppress(fetch.FetchError):
        reply.body(MAX_ANSWER_BYTES)
