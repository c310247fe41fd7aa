"""The report's matplotlib charts, one PNG each. matplotlib is imported here only, on use,
and drawn through its Agg canvas (no pyplot, no display, no global figure state; only the
text settings below are set, for the time a chart is drawn).

Labels, error types and file names come from the records read: every chart is drawn with
mathtext and TeX off (`plain_text`), so a label like `$\\frac{` is drawn as the text it is
instead of being parsed as a formula (which raised, or drew something else).
"""

from __future__ import annotations

import functools
import itertools
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import numpy as np

from .drift import CONFIDENCE_BINS, OTHER, Drift, confidence_bins, kept_labels, label_bins
from .stats import HISTOGRAM_BINS, Stats, TimelinePoint

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

STATUS_COLOURS = {"SUCCEEDED": "#2e7d32", "LOW_CONFIDENCE": "#f9a825", "FAILED": "#c62828"}
THRESHOLD_COLOUR = "#c62828"
DPI = 100
#: Labels shown in the most-frequent-labels chart.
TOP_LABELS = 20


P = ParamSpec("P")
R = TypeVar("R")


def plain_text(chart: Callable[P, R]) -> Callable[P, R]:
    """Draw `chart` with every string drawn as text: no mathtext ($...$), no TeX. Text
    objects take parse_math when they are created, and tick labels are created while the
    figure is saved, so the whole chart runs inside the setting."""

    @functools.wraps(chart)
    def drawn(*args: P.args, **kwargs: P.kwargs) -> R:
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
            return chart(*args, **kwargs)

    return drawn


def _figure(width: float = 8.0, height: float = 4.5) -> tuple[Figure, Axes]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    return fig, fig.subplots()


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, format="png")


def _no_data(ax: Axes, message: str) -> None:
    """Say there is nothing to draw, instead of an empty frame."""
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=13, color="#555555")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_facecolor("#f4f4f4")


def _whole_numbers(axis: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


@plain_text
def confidence_histogram(stats: Stats, threshold: float, path: Path) -> None:
    fig, ax = _figure()
    ax.set_title("Top confidence per classified item")
    if not stats.classified:
        _no_data(ax, "no classified items: no confidences to show")
    else:
        edges = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
        colours = [
            STATUS_COLOURS["SUCCEEDED" if left >= threshold else "LOW_CONFIDENCE"]
            for left in edges[:-1]
        ]
        ax.bar(edges[:-1], stats.histogram, width=1.0 / HISTOGRAM_BINS, align="edge", color=colours)
        ax.axvline(
            threshold, color=THRESHOLD_COLOUR, linestyle="--", label=f"threshold {threshold:g}"
        )
        ax.set_xlim(0.0, 1.0)
        ax.set_xlabel("confidence")
        ax.set_ylabel("items")
        _whole_numbers(ax.yaxis)
        ax.legend(loc="upper left")
    _save(fig, path)


def _bars(ax: Axes, counts: list[tuple[str, int]], colours: list[str] | None = None) -> None:
    names = [n for n, _ in counts][::-1]
    values = [v for _, v in counts][::-1]
    bars = ax.barh(names, values, color=(colours or ["#1565c0"] * len(values))[::-1])
    ax.bar_label(bars, padding=3)
    ax.set_xlim(0, max(values) * 1.15)
    ax.set_xlabel("items")
    _whole_numbers(ax.xaxis)


def status_order(stats: Stats) -> list[str]:
    """The statuses seen, the known ones first in their usual order, then any other."""
    known = [s for s in STATUS_COLOURS if s in stats.statuses]
    return known + sorted(set(stats.statuses) - set(known))


@plain_text
def status_counts(stats: Stats, path: Path) -> None:
    fig, ax = _figure(8.0, 3.0)
    ax.set_title("Items by status")
    if not stats.rows:
        _no_data(ax, "no items")
    else:
        order = status_order(stats)
        counts = [(s, stats.statuses[s]) for s in order]
        _bars(ax, counts, [STATUS_COLOURS.get(s, "#757575") for s in order])
    _save(fig, path)


@plain_text
def top_labels(stats: Stats, path: Path) -> None:
    fig, ax = _figure(8.0, 6.0)
    ax.set_title(f"The {TOP_LABELS} most frequent labels")
    if not stats.labels:
        _no_data(ax, "no classified items: no labels to show")
    else:
        _bars(ax, stats.labels.most_common(TOP_LABELS))
    _save(fig, path)


@plain_text
def failures(stats: Stats, path: Path) -> None:
    fig, ax = _figure(8.0, 3.5)
    ax.set_title("Failures by error type")
    if not stats.errors:
        _no_data(ax, "no failures")
    else:
        _bars(ax, stats.errors.most_common(), [STATUS_COLOURS["FAILED"]] * len(stats.errors))
    _save(fig, path)


@plain_text
def timeline(stats: Stats, threshold: float, path: Path) -> None:
    """Confidence of the inferences over time against the threshold (the original design's
    plot), on a uniform sample of at most TIMELINE_POINTS rows."""
    fig, ax = _figure(9.0, 4.5)
    ax.set_title("Confidence over time")
    points = sorted(stats.timeline, key=lambda p: p[0])
    if not points:
        _no_data(ax, "no classified items: nothing to plot over time")
        _save(fig, path)
        return
    timed = all(p[1] is not None for p in points)
    if timed:
        points.sort(key=lambda p: (p[1], p[0]))
    xs: list[Any] = [p[1] if timed else p[0] for p in points]
    ys = [p[2] for p in points]
    for status, colour in STATUS_COLOURS.items():
        chosen = [i for i, p in enumerate(points) if p[3] == status]
        if chosen:
            ax.scatter(
                [xs[i] for i in chosen],
                [ys[i] for i in chosen],
                s=12,
                color=colour,
                label=status,
                zorder=3,
            )
    for segment in segments(points, timed):
        ax.plot(
            [xs[i] for i in segment],
            [ys[i] for i in segment],
            color="#90a4ae",
            linewidth=0.8,
            zorder=2,
        )
    ax.axhline(threshold, color=THRESHOLD_COLOUR, linestyle="--", label=f"threshold {threshold:g}")
    ax.set_ylim(-0.02, 1.02)
    ax.set_ylabel("confidence")
    ax.set_xlabel("time (UTC)" if timed else "row")
    if timed:
        from matplotlib.dates import AutoDateLocator, ConciseDateFormatter

        locator = AutoDateLocator()  # type: ignore[no-untyped-call]
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]
    ax.legend(loc="lower left", fontsize=8)
    _save(fig, path)


#: A pause this many times the typical one between a run's points breaks its line.
GAP_FACTOR = 10.0


def segments(points: Sequence[TimelinePoint], timed: bool) -> list[list[int]]:
    """Indexes into `points` (in plotting order) of the points a line may join: those of
    one run (execution), broken where the run paused far longer than it usually did."""
    by_run: dict[str | None, list[int]] = {}
    for i, p in enumerate(points):
        by_run.setdefault(p[4], []).append(i)
    out: list[list[int]] = []
    for indexes in by_run.values():
        if timed:
            steps = [
                (points[b][1] - points[a][1]).total_seconds()  # type: ignore[operator]
                for a, b in itertools.pairwise(indexes)
            ]
            positive = sorted(s for s in steps if s > 0)
            typical = positive[len(positive) // 2] if positive else 0.0
            limit = max(typical * GAP_FACTOR, 1.0)
            broken = [step > limit for step in steps]
        else:  # rows without times: a run's points are joined in row order
            broken = [False] * (len(indexes) - 1)
        current = [indexes[0]]
        for index, brk in zip(indexes[1:], broken, strict=True):
            if brk:
                out.append(current)
                current = []
            current.append(index)
        out.append(current)
    return [segment for segment in out if len(segment) > 1]


@plain_text
def drift(baseline: Stats, current: Stats, result: Drift, path: Path) -> None:
    """The confidence and label distributions of both sources, side by side."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12.0, 5.0), dpi=DPI, layout="constrained")
    left, right = fig.subplots(1, 2)
    fig.suptitle(result.line())
    _shares(
        left,
        confidence_bins(baseline),
        confidence_bins(current),
        [f"{i / CONFIDENCE_BINS:.1f}" for i in range(CONFIDENCE_BINS)],
        f"Confidence (PSI {result.confidence_psi:.3f})",
    )
    # The bins the label PSI is computed over: the baseline's most frequent labels, the rest.
    b_labels, c_labels = label_bins(baseline.labels, current.labels)
    _shares(
        right,
        b_labels,
        c_labels,
        [*kept_labels(baseline.labels), OTHER],
        f"Labels, the baseline's most frequent (PSI {result.label_psi:.3f})",
        horizontal=True,
    )
    _save(fig, path)


def _shares(
    ax: Axes,
    baseline: Counter[str],
    current: Counter[str],
    bins: list[str],
    title: str,
    *,
    horizontal: bool = False,
) -> None:
    ax.set_title(title)
    b_total, c_total = sum(baseline.values()), sum(current.values())
    if not bins or not b_total or not c_total:
        _no_data(ax, "no classified items in one of the sources")
        return
    at = np.arange(len(bins))
    b = [baseline.get(k, 0) / b_total for k in bins]
    c = [current.get(k, 0) / c_total for k in bins]
    if horizontal:
        ax.barh(at - 0.2, b, height=0.4, label="baseline", color="#90a4ae")
        ax.barh(at + 0.2, c, height=0.4, label="current", color="#1565c0")
        ax.set_yticks(at, bins, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("share of classified items")
    else:
        ax.bar(at - 0.2, b, width=0.4, label="baseline", color="#90a4ae")
        ax.bar(at + 0.2, c, width=0.4, label="current", color="#1565c0")
        ax.set_xticks(at, bins)
        ax.set_xlabel("confidence bin (lower edge)")
        ax.set_ylabel("share of classified items")
    ax.legend()
