"""Drift between two sources: the population stability index (PSI).

    PSI = Σ_i (a_i − e_i) · ln(a_i / e_i)

over bins i, where e_i is the baseline's share of rows in bin i and a_i the current
source's. A share of 0 is replaced by EPSILON, so an empty bin adds a large but finite
term. Confidence uses CONFIDENCE_BINS equal-width bins over [0, 1] (the last one closed);
labels use one bin for each of the baseline's most frequent labels (at most LABEL_BINS,
each holding at least LABEL_MIN_SHARE of its classified rows) and one, OTHER, for every
other label: with one bin per label (up to 1,000), two samples of a single distribution
differ in most bins by chance alone and read as drift. Common reading: below 0.1 no
shift, 0.1 to 0.2 a moderate shift, above 0.2 a significant one. A source with no
classified rows cannot be compared: that is drift too.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .stats import HISTOGRAM_BINS, Stats

#: Equal-width confidence bins over [0, 1] for the PSI.
CONFIDENCE_BINS = 10
#: The share an empty bin counts as, so that ln(a/e) stays finite.
EPSILON = 1e-4
#: Labels with a bin of their own: the baseline's most frequent, each with at least this
#: share of its rows (the usual rule for PSI bins); the rest share OTHER.
LABEL_BINS = 20
LABEL_MIN_SHARE = 0.05
OTHER = "(other labels)"


def psi(expected: Mapping[str, int], actual: Mapping[str, int]) -> float:
    """PSI of two distributions given as counts per bin (bins missing from one count 0)."""
    bins = sorted(set(expected) | set(actual))
    e_total, a_total = sum(expected.values()), sum(actual.values())
    if not bins or not e_total or not a_total:
        return 0.0
    e = np.array([expected.get(b, 0) / e_total for b in bins])
    a = np.array([actual.get(b, 0) / a_total for b in bins])
    e = np.maximum(e, EPSILON)
    a = np.maximum(a, EPSILON)
    return float(np.sum((a - e) * np.log(a / e)))


def confidence_bins(stats: Stats) -> Counter[str]:
    """The fine histogram of the stats regrouped into CONFIDENCE_BINS bins, by lower edge."""
    per_bin = HISTOGRAM_BINS // CONFIDENCE_BINS
    grouped = stats.histogram.reshape(CONFIDENCE_BINS, per_bin).sum(axis=1)
    return Counter({f"{i / CONFIDENCE_BINS:.1f}": int(n) for i, n in enumerate(grouped)})


def kept_labels(baseline: Counter[str]) -> list[str]:
    """The labels with a bin of their own, most frequent first."""
    total = sum(baseline.values())
    return [
        name
        for name, n in baseline.most_common(LABEL_BINS)
        if total and n / total >= LABEL_MIN_SHARE
    ]


def label_bins(baseline: Counter[str], current: Counter[str]) -> tuple[Counter[str], Counter[str]]:
    """Both label counts over the baseline's frequent labels (kept_labels) and OTHER."""
    kept = set(kept_labels(baseline))

    def binned(counts: Counter[str]) -> Counter[str]:
        out: Counter[str] = Counter()
        for name, n in counts.items():
            out[name if name in kept else OTHER] += n
        return out

    return binned(baseline), binned(current)


@dataclass(frozen=True)
class Drift:
    confidence_psi: float
    label_psi: float
    limit: float
    #: Why the sources cannot be compared (one has no classified rows); "" when they can.
    not_comparable: str = ""

    @property
    def psi(self) -> float:
        return max(self.confidence_psi, self.label_psi)

    @property
    def drifted(self) -> bool:
        return bool(self.not_comparable) or self.psi > self.limit

    def line(self) -> str:
        if self.not_comparable:
            return f"DRIFT: not comparable: {self.not_comparable}"
        verdict = "DRIFT" if self.drifted else "no drift"
        return (
            f"{verdict}: PSI confidence {self.confidence_psi:.3f}, labels {self.label_psi:.3f} "
            f"(limit {self.limit:g})"
        )


def compare(baseline: Stats, current: Stats, limit: float) -> Drift:
    empty = [
        name for name, s in (("the baseline", baseline), ("SOURCE", current)) if not s.classified
    ]
    return Drift(
        confidence_psi=psi(confidence_bins(baseline), confidence_bins(current)),
        label_psi=psi(*label_bins(baseline.labels, current.labels)),
        limit=limit,
        not_comparable=f"{' and '.join(empty)} {'have' if len(empty) > 1 else 'has'} no "
        "classified rows"
        if empty
        else "",
    )
