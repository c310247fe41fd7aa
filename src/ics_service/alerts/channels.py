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
from .urls import hide_secrets

if TYPE_CHECKING:
    from ..config import Settings


class DeliveryError(Exception):
    """A delivery that failed. transient=True: retried with the Notify policy; False: dead-lettered at once."""  # noqa: E501

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


class Channel(Protocol):
    def send(self, alert: Mapping[str, Any], title: str, body: str) -> None:
        """Deliver one alert, within the channel's own timeout; raises DeliveryError."""
        ...

    def shown(self) -> str:
        """Its URL with secrets hidden, for logs and `ics alerts list`."""
        ...


def channel_for(url: str, *, timeout_s: float, settings: Settings) -> Channel:
    """The channel of a subscription URL; UsageError for an unknown scheme or a bad URL."""
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError as e:
        raise UsageError(f"bad subscription URL {hide_secrets(url)}: {e}") from None
    if scheme in ("http", "https"):
        from .webhook import WebhookChannel

        return WebhookChannel(url, timeout_s=timeout_s)
    if scheme == "file":
        from .file import FileChannel

        return FileChannel(url)
    if scheme == "sns":
        try:
            from .sns import SnsChannel  # type: ignore[import-not-found,unused-ignore]
        except ModuleNotFoundError as e:
            raise _missing(url, e) from None
        channel: Channel = SnsChannel(
            url, timeout_s=timeout_s, endpoint_url=settings.notify_sns_endpoint_url
        )
        return channel
    if not scheme:
        raise UsageError(
            f"subscription {hide_secrets(url)} is not a URL: it needs a scheme "
            "(https://, file://, sns://, mailto://...)"
        )
    try:
        from .chat import AppriseChannel  # type: ignore[import-not-found,unused-ignore]
    except ModuleNotFoundError as e:
        raise _missing(url, e) from None
    other: Channel = AppriseChannel(url, timeout_s=timeout_s)
    return other


def _missing(url: str, e: ModuleNotFoundError) -> UsageError:
    return UsageError(
        f"subscription {hide_secrets(url)}: this kind of channel needs {e.name}, which this "
        "installation of ICS lacks"
    )
