"""The errors every alert channel raises when a delivery fails, and what all of them
retry."""

from __future__ import annotations

#: HTTP answers worth trying again, for every channel that speaks HTTP (webhooks, apprise):
#: any 5xx, and these 4xx (a timeout on the receiver's side, a conflict, too early, too
#: many requests). Any other 4xx is a refusal: dead-lettered at once.
RETRYABLE_4XX = frozenset({408, 409, 425, 429})


def retryable_status(status: int) -> bool:
    """Whether an HTTP answer that is not a success may pass if sent again."""
    return status >= 500 or status in RETRYABLE_4XX


class DeliveryError(Exception):
    """A delivery that failed. transient=True: retried with the Notify policy; False:
    dead-lettered at once."""

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


class NotFromHere(DeliveryError):
    """This process cannot deliver to the channel (no credentials, a folder or a config it
    lacks): another process on the store may. The delivery is left to it, not counted."""
