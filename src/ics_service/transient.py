"""Which failed calls are worth making again: one rule for every outbound call ICS makes
(HTTP sources, webhooks and other HTTP alert channels, object storage).

An HTTP answer is transient when it is a 5xx or one of `TRANSIENT_4XX`; any other 4xx is a
refusal that the same request meets again. Timeouts and lost or refused connections are
transient; an address refused by ICS itself, a stop, or a malformed answer is not.
"""

from __future__ import annotations

#: 4xx answers that may pass when sent again: the server's own request timeout, a conflict,
#: too early, too many requests.
TRANSIENT_4XX = frozenset({408, 409, 425, 429})


def transient_status(status: int) -> bool:
    """Whether an HTTP answer that is not a success may pass if the request is made again."""
    return status >= 500 or status in TRANSIENT_4XX


def transient_error(error: BaseException) -> bool:
    """Whether an exception (not an HTTP answer) is a timeout or a lost connection."""
    return isinstance(error, TimeoutError | ConnectionError)
