"""The webhook channel: POST the alert's JSON document.

Headers: `Idempotency-Key: <alert_id>` always; with a secret (`ics-secret` on the URL,
removed before sending) `X-ICS-Timestamp: <unix seconds>` and
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
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import httpx

from .. import __version__
from ..errors import UsageError
from .channels import DeliveryError
from .subscriptions import SECRET_PARAM
from .urls import hide_secrets

#: 4xx answers worth trying again: a timeout on the receiver's side, throttling.
_TRANSIENT_4XX = {408, 429}


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """The X-ICS-Signature value of a body sent at timestamp."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


class WebhookChannel:
    def __init__(self, url: str, *, timeout_s: float) -> None:
        parts = urlsplit(url)
        if not parts.hostname:
            raise UsageError(f"webhook URL {hide_secrets(url)} has no host")
        query = parse_qsl(parts.query, keep_blank_values=True)
        secrets = [v for k, v in query if k == SECRET_PARAM]
        self.secret = secrets[-1] if secrets else None
        kept = [(k, v) for k, v in query if k != SECRET_PARAM]
        self.url = urlunsplit(parts._replace(query=urlencode(kept)))
        self.timeout_s = timeout_s
        self._shown = hide_secrets(self.url) + (
            ("&" if kept else "?") + SECRET_PARAM + "=***" if self.secret else ""
        )

    def shown(self) -> str:
        return self._shown

    def send(self, alert: Mapping[str, Any], title: str, body: str) -> None:
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
            response = httpx.post(
                self.url, content=payload, headers=headers, timeout=self.timeout_s
            )
        except httpx.TimeoutException:
            raise DeliveryError(f"no answer within {self.timeout_s:g} s") from None
        except httpx.HTTPError as e:
            raise DeliveryError(f"{type(e).__name__}: {e}") from None
        status = response.status_code
        if 200 <= status < 300:
            return
        transient = status >= 500 or status in _TRANSIENT_4XX
        raise DeliveryError(
            f"HTTP {status} {response.reason_phrase}".rstrip()
            + ("" if transient else " (refused: not retried)"),
            transient=transient,
        )
