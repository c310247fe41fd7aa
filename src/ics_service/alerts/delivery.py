"""The errors every alert channel raises when a delivery fails. Which failures are retried
is the rule of `ics_service.policies.transient_status`, shared with the sources."""

from __future__ import annotations


class DeliveryError(Exception):
    """A delivery that failed. transient=True: retried with the Notify policy; False:
    dead-lettered at once."""

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


class NotFromHere(DeliveryError):
    """This process cannot deliver to the channel (no credentials, a folder or a config it
    lacks): another process on the store may. The delivery is left to it, not counted."""
