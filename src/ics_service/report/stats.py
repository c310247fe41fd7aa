"""Streaming statistics of report rows, in memory bounded whatever the number of rows.

Counters and a fixed histogram grow with the number of distinct labels, statuses and error
types, not rows; the contact sheet keeps the N lowest-confidence rows in a heap; the time
series is a fixed-size uniform sample of the rows (reservoir sampling, seeded, so a report
of the same input is the same report).
"""

from __future__ import annotations

import datetime as dt
import heapq
import random
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .rows import ReportRow

#: Bins of the confidence histogram over [0, 1].
HISTOGRAM_BINS = 50
#: Points of the confidence-over-time chart.
TIMELINE_POINTS = 5000


#: A point of the confidence-over-time chart: (row number, time, confidence, status, run).
TimelinePoint = tuple[int, dt.datetime | None, float, str, str | None]


@dataclass
class Stats:
    lowest_n: int = 24
    rows: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    labels: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(HISTOGRAM_BINS, np.int64))
    confidence_sum: float = 0.0
    first: dt.datetime | None = None
    last: dt.datetime | None = None
    #: The threshold the rows were decided with (the first one recorded).
    threshold: float | None = None
    #: (row number, time, confidence, status, run): a uniform sample of the classified rows.
    timeline: list[TimelinePoint] = field(default_factory=list)
    _classified: int = 0
    #: Max-heap (by negated confidence) of the lowest-confidence rows.
    _lowest: list[tuple[float, int, ReportRow]] = field(default_factory=list)
    _random: random.Random = field(default_factory=lambda: random.Random(0))

    def add(self, row: ReportRow) -> None:
        self.rows += 1
        self.statuses[row.status] += 1
        if row.error_type:
            self.errors[row.error_type] += 1
        if row.threshold is not None and self.threshold is None:
            self.threshold = row.threshold
        if row.time is not None:
            self.first = row.time if self.first is None else min(self.first, row.time)
            self.last = row.time if self.last is None else max(self.last, row.time)
        if row.confidence is None:
            return
        if row.label:
            self.labels[row.label] += 1
        c = min(max(row.confidence, 0.0), 1.0)
        self.histogram[min(int(c * HISTOGRAM_BINS), HISTOGRAM_BINS - 1)] += 1
        self.confidence_sum += c
        self._sample((self.rows, row.time, c, row.status, row.run))
        entry = (-c, -self.rows, row)
        if len(self._lowest) < self.lowest_n:
            heapq.heappush(self._lowest, entry)
        elif entry > self._lowest[0]:
            heapq.heapreplace(self._lowest, entry)

    def _sample(self, point: TimelinePoint) -> None:
        self._classified += 1
        if len(self.timeline) < TIMELINE_POINTS:
            self.timeline.append(point)
            return
        j = self._random.randrange(self._classified)
        if j < TIMELINE_POINTS:
            self.timeline[j] = point

    @property
    def classified(self) -> int:
        """Rows with a confidence (SUCCEEDED and LOW_CONFIDENCE)."""
        return self._classified

    @property
    def mean_confidence(self) -> float | None:
        return self.confidence_sum / self._classified if self._classified else None

    def lowest(self) -> list[ReportRow]:
        """The lowest-confidence rows, lowest first (the earlier row first on a tie)."""
        return [row for _, _, row in sorted(self._lowest, reverse=True)]
