"""The Channel contract, and the factory that builds one from a subscription URL.

`http(s)://` is a webhook, `file://` a JSON Lines file, `sns://arn:aws:sns:...` an SNS
topic, and any other scheme goes to apprise (chat and e-mail). The SNS and apprise channels
are imported only when a URL asks for them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from ..errors import UsageError
from ..redact import hide_secrets
from .delivery import DeliveryError, NotFromHere

if TYPE_CHECKING:
    from ..config import Settings
    from ..subscriptions import Subscription


class Channel(Protocol):
    def send(
        self, alert: Mapping[str, Any], title: str, body: str, *, timeout_s: float | None = None
    ) -> None:
        """Deliver one alert within the channel's timeout (or timeout_s, when shorter and
        the channel can bound it); raises DeliveryError (NotFromHere: not from here)."""
        ...

    def shown(self) -> str:
        """Its URL with secrets hidden, for logs and `ics alerts list`."""
        ...

    def close(self) -> None:
        """Release its connections."""
        ...


def channel_of(sub: Subscription, settings: Settings) -> Channel:
    """The channel of a subscription, with the Notify timeout and its webhook secret."""
    return channel_for(
        sub.url, timeout_s=settings.notify_timeout_s, settings=settings, secret=sub.secret
    )


def channel_for(
    url: str, *, timeout_s: float, settings: Settings, secret: str | None = None
) -> Channel:
    """The channel of a subscription URL (secret: a webhook's HMAC key); UsageError for an
    unknown scheme or a bad URL."""
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError as e:
        raise UsageError(f"bad subscription URL {hide_secrets(url)}: {e}") from None
    if scheme in ("http", "https"):
        from .webhook import WebhookChannel

        return WebhookChannel(url, timeout_s=timeout_s, secret=secret)
    if scheme == "file":
        from .file import FileChannel

        return FileChannel(url)
    if scheme == "sns":
        from .sns import SnsChannel

        return SnsChannel(url, timeout_s=timeout_s, endpoint_url=settings.notify_sns_endpoint_url)
    if not scheme:
        raise UsageError(
            f"subscription {hide_secrets(url)} is not a URL: it needs a scheme "
            "(https://, file://, sns://, mailto://...)"
        )
    from .chat import AppriseChannel

    return AppriseChannel(url, timeout_s=timeout_s)


__all__ = ["Channel", "DeliveryError", "NotFromHere", "channel_for", "channel_of"]
