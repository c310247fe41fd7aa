"""Prometheus metrics of one server: requests, batches, items, confidence, queue depth, and
each model's inference statistics.

Each app has its own registry, so tests (and several apps in one process) never share
counters. The model metrics have a `model` label: the name of a served model, so its values
are bounded by the models registered (a request naming another is refused before it counts).
The Open Inference Protocol's statistics (Triton's `/v2/models/NAME/stats`) are read from
these same counters (`model_counters`): there is no second count.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from ..engine.batcher import BatchTimes
from ..types import ItemResult

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.94, 0.97, 0.99, 1.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST

#: The methods counted by name; any other is counted as "other", so that a client cannot
#: add label sets (a stranger's request is counted before it is refused).
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})

#: Why a request or connection was refused before it reached the app (connections.py).
REFUSALS = ("malformed", "header_timeout", "header_too_large", "connection_limit", "idle_closed")


#: The phases of a model run, as Triton's statistics name them (compute_input, ...).
PHASES = ("input", "infer", "output")


@dataclass
class Duration:
    """A count and the seconds it took in all (Triton's duration statistic)."""

    count: int = 0
    seconds: float = 0.0


@dataclass
class RunCounters:
    """The successful model runs of one batch size."""

    count: int = 0
    #: Seconds of each phase (PHASES) over those runs.
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))


@dataclass
class ModelCounters:
    """What the metrics counted of one model, as the statistics read it."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    #: Seconds the inputs of successful runs waited in the queue, summed.
    queued_s: float = 0.0
    #: Successful runs by batch size.
    runs: dict[int, RunCounters] = field(default_factory=dict)
    #: When an input of the model last finished (seconds since the epoch), 0 for never.
    last_inference_s: float = 0.0


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ics_http_requests",
            "HTTP requests answered, by route template ('unmatched' for none), method (one of "
            "GET HEAD POST PUT DELETE PATCH OPTIONS, else 'other') and status class (2xx...).",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "ics_http_request_duration_seconds",
            "Time to answer an HTTP request, by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.refused = Counter(
            "ics_http_refused",
            "Requests and connections refused before they reach the app (so not in "
            "ics_http_requests), by reason: malformed (HTTP that cannot be parsed, 400), "
            "header_timeout (408), header_too_large (431), connection_limit (a connection over "
            "max_connections, 503), idle_closed (an idle connection closed to make room).",
            ["reason"],
            registry=r,
        )
        for reason in REFUSALS:
            self.refused.labels(reason)
        self.connections = Gauge(
            "ics_http_connections", "HTTP connections open at the scrape.", registry=r
        )
        self.batch_size = Histogram(
            "ics_batch_size",
            "Inputs per model run, by model.",
            ["model"],
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
            registry=r,
        )
        self.inference = Histogram(
            "ics_inference_duration_seconds",
            "Time of one model run (a whole batch), by model.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.items = Counter(
            "ics_items", "Items classified, by model and status.", ["model", "status"], registry=r
        )
        self.confidence = Histogram(
            "ics_confidence",
            "Top confidence of classified items, by model.",
            ["model"],
            buckets=_CONFIDENCE_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "ics_queue_depth", "Inputs waiting for the model, by model.", ["model"], registry=r
        )
        self.input_duration = Histogram(
            "ics_model_input_duration_seconds",
            "Time from an input's arrival (its decode included) to its probabilities "
            "(outcome success) or its error (fail), by model: each image or tensor row of a "
            "request counts once, in every protocol.",
            ["model", "outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.last_inference = Gauge(
            "ics_model_last_inference_timestamp_seconds",
            "When an input of the model last finished, by model (seconds since the epoch).",
            ["model"],
            registry=r,
        )
        self.runs = Counter(
            "ics_model_runs",
            "Successful model runs, by model and batch size.",
            ["model", "batch_size"],
            registry=r,
        )
        self.run_seconds = Counter(
            "ics_model_run_seconds",
            "Time of successful model runs, by model, batch size and phase: input (copying "
            "the inputs into the batch), infer (the model), output (splitting its outputs).",
            ["model", "batch_size", "phase"],
            registry=r,
        )
        self.queued_seconds = Counter(
            "ics_model_queue_seconds",
            "Time the inputs of successful model runs waited for the model, summed, by model.",
            ["model"],
            registry=r,
        )
        self.capture_dropped = Counter(
            "ics_capture_dropped",
            "Sampled requests not captured: the capture queue was full, or the writer failed.",
            ["reason"],
            registry=r,
        )
        self.variant_invocations = Counter(
            "ics_sagemaker_variant_invocations",
            "SageMaker invocations routed to each production variant (by TargetVariant, or "
            "at random by weight), by variant: its configured names only.",
            ["variant"],
            registry=r,
        )
        self.capture_failed = Gauge(
            "ics_capture_failed", "1 once data capture has stopped on an error.", registry=r
        )

    def track_variants(self, names: Iterable[str]) -> None:
        """Show each production variant's invocations from 0 on."""
        for name in names:
            self.variant_invocations.labels(name)

    def observe_batch(self, model: str, times: BatchTimes) -> None:
        self.batch_size.labels(model).observe(times.size)
        self.inference.labels(model).observe(times.infer_s)
        size = str(times.size)
        self.runs.labels(model, size).inc()
        for phase, seconds in zip(
            PHASES, (times.input_s, times.infer_s, times.output_s), strict=True
        ):
            self.run_seconds.labels(model, size, phase).inc(seconds)
        self.queued_seconds.labels(model).inc(times.queued_s)

    def observe_input(self, model: str, ok: bool, seconds: float) -> None:
        """Count one input of a model that got its probabilities (`ok`) or failed."""
        self.input_duration.labels(model, "success" if ok else "fail").observe(seconds)
        self.last_inference.labels(model).set(time.time())

    def model_counters(self, model: str) -> ModelCounters:
        """What these metrics counted of `model` (zeros for one never used)."""
        out = ModelCounters()
        for sample in _samples(self.input_duration, model, "_count", "_sum"):
            duration = out.success if sample.labels["outcome"] == "success" else out.fail
            if sample.name.endswith("_count"):
                duration.count = round(sample.value)
            else:
                duration.seconds = sample.value
        for sample in _samples(self.runs, model, "_total"):
            size = int(sample.labels["batch_size"])
            out.runs.setdefault(size, RunCounters()).count = round(sample.value)
        for sample in _samples(self.run_seconds, model, "_total"):
            size = int(sample.labels["batch_size"])
            out.runs.setdefault(size, RunCounters()).seconds[sample.labels["phase"]] = sample.value
        for sample in _samples(self.queued_seconds, model, "_total"):
            out.queued_s = sample.value
        for sample in _samples(self.last_inference, model, ""):
            out.last_inference_s = sample.value
        return out

    def observe_result(self, result: ItemResult) -> None:
        model = result.model.name
        self.items.labels(model, result.status.value).inc()
        if result.confidence is not None:
            self.confidence.labels(model).observe(result.confidence)

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count a request; `route` is the matched route's template or "unmatched"."""
        method = method if method in METHODS else "other"
        self.requests.labels(route, method, f"{status // 100}xx").inc()
        self.latency.labels(route).observe(seconds)

    def track_queue(self, model: str, depth: Callable[[], int]) -> None:
        """Report `depth()` as the model's queue depth at each scrape."""
        self.queue_depth.labels(model).set_function(lambda: float(depth()))

    def untrack_queue(self, model: str) -> None:
        """Stop reporting the queue of a model no longer served."""
        with contextlib.suppress(KeyError):
            self.queue_depth.remove(model)

    def track_connections(self, count: Callable[[], int]) -> None:
        """Report `count()` as the open connections at each scrape."""
        self.connections.set_function(lambda: float(count()))

    def track_capture(self, failed: Callable[[], bool]) -> None:
        """Report `failed()` as the capture's failure flag at each scrape."""
        self.capture_failed.set_function(lambda: float(failed()))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _samples(metric: Counter | Gauge | Histogram, model: str, *suffixes: str) -> Iterator[Any]:
    """The samples of `metric` for `model` whose names end in one of `suffixes`."""
    for family in metric.collect():
        for sample in family.samples:
            if sample.labels.get("model") == model and any(
                sample.name == family.name + suffix for suffix in suffixes
            ):
                yield sample
