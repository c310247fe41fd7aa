"""The error every alert channel raises when a delivery fails."""

from __future__ import annotations


class DeliveryError(Exception):
    """A delivery that failed. transient=True: retried with the Notify policy; False:
    dead-lettered at once."""

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient
