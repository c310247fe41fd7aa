"""The workflow's rules, below every feature package: retrying and the threshold decision.

Retries follow Step Functions' Retry fields (ErrorEquals, IntervalSeconds, ...):
`States.ALL` matches every error; `States.Transient` matches the errors marked retryable
(`SourceUnavailable`, `ModelUnavailable`: timeouts, connection errors, throttling) and
never deterministic ones such as InvalidImage or ImageTooLarge.

FilterLowConfidence (`decide`) turns class probabilities into a status, a label and the
top k.

Which failed outbound calls are worth making again is one rule for every caller (HTTP
sources, webhooks and other HTTP alert channels, object storage): an HTTP answer is
transient when it is a 5xx or one of `TRANSIENT_4XX` (any other 4xx is a refusal that the
same request meets again); timeouts and lost or refused connections are transient.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from .config import RetryPolicy
from .errors import IcsError
from .types import ItemStatus, LabelScore, Prediction

T = TypeVar("T")

#: 4xx answers that may pass when sent again: the server's own request timeout, a conflict,
#: too early, too many requests.
TRANSIENT_4XX = frozenset({408, 409, 425, 429})


def transient_status(status: int) -> bool:
    """Whether an HTTP answer that is not a success may pass if the request is made again."""
    return status >= 500 or status in TRANSIENT_4XX


def transient_error(error: BaseException) -> bool:
    """Whether an exception (not an HTTP answer) is a timeout or a lost connection."""
    return isinstance(error, TimeoutError | ConnectionError)


ALL = "States.ALL"
TRANSIENT = "States.Transient"


def matches(policy: RetryPolicy, error: BaseException) -> bool:
    name = error.type if isinstance(error, IcsError) else type(error).__name__
    for pattern in policy.error_equals:
        if pattern in (ALL, name):
            return True
        if pattern == TRANSIENT and getattr(error, "retryable", False):
            return True
    return False


def delay_seconds(policy: RetryPolicy, retry_number: int, rng: random.Random) -> float:
    """Wait before retry number n (1-based): interval × backoff^(n-1), capped, jittered."""
    delay = policy.interval_seconds * policy.backoff_rate ** (retry_number - 1)
    if policy.max_delay_seconds is not None:
        delay = min(delay, policy.max_delay_seconds)
    if policy.jitter == "FULL":
        delay = rng.uniform(0, delay)
    return delay


#: Jitter for the retries of every thread: seeding a generator per call would cost more
#: than most calls that never retry.
_JITTER = random.Random()

OnRetry = Callable[[BaseException, int, float], None]


def call_with_retry(
    fn: Callable[[], T],
    policy: RetryPolicy,
    *,
    stop: threading.Event,
    on_retry: OnRetry | None = None,
    rng: random.Random | None = None,
) -> tuple[T, int]:
    """Call fn, retrying matching errors per the policy; returns (value, attempts).

    The last error is raised with an `attempts` attribute. A set `stop` ends the waiting
    (and the retrying) at once.
    """
    attempt = 1
    while True:
        try:
            return fn(), attempt
        except Exception as e:
            if attempt > policy.max_attempts or stop.is_set() or not matches(policy, e):
                e.attempts = attempt  # type: ignore[attr-defined]
                raise
            delay = delay_seconds(policy, attempt, rng or _JITTER)
            if on_retry is not None:
                on_retry(e, attempt, delay)
            if stop.wait(delay):
                e.attempts = attempt  # type: ignore[attr-defined]
                raise
            attempt += 1


# --- FilterLowConfidence ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Decision:
    status: ItemStatus
    label: str
    index: int
    confidence: float
    top_k: list[Prediction]
    #: A multi-label decision's labels at or over their thresholds; None for single-label.
    over: list[LabelScore] | None = None


def decide(
    probs: np.ndarray,
    *,
    threshold: float,
    top_k: int,
    labels: tuple[str, ...],
    label_thresholds: Sequence[float] | None = None,
) -> list[Decision]:
    """One decision per row of probs (N, C).

    Single-label (`label_thresholds` None): SUCCEEDED when the top confidence >= threshold.
    Multi-label (one threshold per label; `threshold` is then unused): every label at or
    over its own threshold is kept; SUCCEEDED when there is one, its label the most
    confident of them; LOW_CONFIDENCE when none reached its threshold, its label the top one.
    """
    if label_thresholds is not None:
        return _decide_multi(probs, top_k=top_k, labels=labels, thresholds=label_thresholds)
    n, c = probs.shape
    k = min(top_k, c)
    if k < c:
        part = np.argpartition(-probs, k - 1, axis=1)[:, :k]
    else:
        part = np.broadcast_to(np.arange(c), (n, c))
    out = []
    for row, idx in zip(probs, part, strict=True):
        order = idx[np.argsort(-row[idx], kind="stable")]
        preds = [Prediction(label=labels[i], index=int(i), confidence=float(row[i])) for i in order]
        best = preds[0]
        # Compared in float64 on the float32 value reported, so a threshold equal to a
        # reported confidence counts as reached.
        status = ItemStatus.SUCCEEDED if best.confidence >= threshold else ItemStatus.LOW_CONFIDENCE
        out.append(Decision(status, best.label, best.index, best.confidence, preds))
    return out


def _decide_multi(
    probs: np.ndarray, *, top_k: int, labels: tuple[str, ...], thresholds: Sequence[float]
) -> list[Decision]:
    limits = np.asarray(thresholds, dtype=np.float64)
    out = []
    for d, row in zip(decide(probs, threshold=0.0, top_k=top_k, labels=labels), probs, strict=True):
        # float64 on the float32 values reported, as for one label.
        reached = np.flatnonzero(row.astype(np.float64) >= limits)
        order = reached[np.argsort(-row[reached], kind="stable")]
        over = [LabelScore(labels[i], int(i), float(row[i]), float(limits[i])) for i in order]
        if over:
            best = over[0]
            out.append(
                Decision(
                    ItemStatus.SUCCEEDED, best.label, best.index, best.confidence, d.top_k, over
                )
            )
        else:
            out.append(
                Decision(ItemStatus.LOW_CONFIDENCE, d.label, d.index, d.confidence, d.top_k, [])
            )
    return out
