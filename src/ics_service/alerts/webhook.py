"""The webhook channel: POST the alert's JSON document.

Headers: `Idempotency-Key: <alert_id>` always; with a secret (the subscription's
`ics-secret`, never sent) `X-ICS-Timestamp: <unix seconds>` and
`X-ICS-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>." + body>`, so a receiver can
refuse a replayed old request as well as a forged one.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx

from .. import __version__
from ..errors import UsageError
from ..redact import hide_secrets
from .delivery import DeliveryError, retryable_status


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """The X-ICS-Signature value of a body sent at timestamp."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def _phases(total_s: float) -> httpx.Timeout:
    """httpx times each phase (connect, each write, each read) on its own: halves keep a
    request that answers in one read within total_s."""
    return httpx.Timeout(total_s / 2)


class WebhookChannel:
    def __init__(self, url: str, *, timeout_s: float, secret: str | None = None) -> None:
        if not urlsplit(url).hostname:
            raise UsageError(f"webhook URL {hide_secrets(url)} has no host")
        self.url = url
        self.secret = secret
        self.timeout_s = timeout_s
        # The secret is the subscription's to show (Subscription.shown), not part of the URL.
        self._shown = hide_secrets(url)
        # One client (its connection pool and SSL context) for every send of the channel.
        self._client = httpx.Client(timeout=_phases(timeout_s))

    def shown(self) -> str:
        return self._shown

    def close(self) -> None:
        self._client.close()

    def send(
        self, alert: Mapping[str, Any], title: str, body: str, *, timeout_s: float | None = None
    ) -> None:
        """POST the document, within timeout_s (at most the channel's own timeout)."""
        limit = self.timeout_s if timeout_s is None else min(timeout_s, self.timeout_s)
        payload = json.dumps(alert, separators=(",", ":"), default=str).encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"ics/{__version__}",
            "Idempotency-Key": str(alert["alert_id"]),
        }
        if self.secret is not None:
            ts = str(int(time.time()))
            headers["X-ICS-Timestamp"] = ts
            headers["X-ICS-Signature"] = signature(self.secret, ts, payload)
        try:
            response = self._client.post(
                self.url, content=payload, headers=headers, timeout=_phases(limit)
            )
        except httpx.TimeoutException:
            raise DeliveryError(f"no answer within {limit:g} s") from None
        except httpx.HTTPError as e:
            raise DeliveryError(f"{type(e).__name__}: {e}") from None
        status = response.status_code
        if 200 <= status < 300:
            return
        transient = retryable_status(status)
        raise DeliveryError(
            f"HTTP {status} {response.reason_phrase}".rstrip()
            + ("" if transient else " (refused: not retried)"),
            transient=transient,
        )
