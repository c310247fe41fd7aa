"""`ics report`: read a SOURCE once, streaming, and write its charts and index.html."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import Settings
from ..errors import OutputError, UsageError
from ..imaging import Limits, Preprocessor
from ..models import get_card
from ..types import isoformat
from . import charts, page, pictures
from .drift import Drift, compare
from .rows import RowStream
from .stats import Stats


@dataclass(frozen=True)
class Chart:
    file: str
    title: str
    caption: str


def check_out(out: Path) -> None:
    """Create the report folder, or say why it cannot be written (before reading anything)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder for the report")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise UsageError(f"cannot write the report to {out}: {e.strerror or e}") from None


def collect(stream: RowStream, lowest_n: int, on_row: Callable[[], None] | None = None) -> Stats:
    stats = Stats(lowest_n=lowest_n)
    for row in stream.rows:
        stats.add(row)
        if on_row is not None:
            on_row()
    return stats


def render(
    stream: RowStream,
    stats: Stats,
    out: Path,
    settings: Settings,
    *,
    threshold: float | None = None,
    baseline: tuple[RowStream, Stats] | None = None,
    psi_limit: float = 0.2,
) -> dict[str, Any]:
    """Write every chart and index.html to `out`; the summary as a JSON-ready dict.

    `threshold` is the line drawn: by default the one the rows were decided with, else
    the threshold setting.
    """
    line = threshold if threshold is not None else stats.threshold
    line = settings.threshold if line is None else line
    preprocessor = Preprocessor(get_card(settings.model, settings), Limits.from_settings(settings))
    drift: Drift | None = None
    shown = [
        Chart("status.png", "Items by status", "SUCCEEDED, LOW_CONFIDENCE and FAILED items."),
        Chart(
            "confidence.png",
            "Confidence histogram",
            f"Top confidence of each classified item; the dashed line is the threshold ({line:g}).",
        ),
        Chart(
            "timeline.png",
            "Confidence over time",
            f"Each point an inference ({len(stats.timeline):,} of the {stats.classified:,} "
            "classified items: all of them, or a uniform sample) against the threshold.",
        ),
        Chart(
            "labels.png",
            "Most frequent labels",
            f"The {charts.TOP_LABELS} most frequent top labels.",
        ),
        Chart(
            "lowest.png",
            "Lowest-confidence images",
            f"The {min(stats.lowest_n, stats.classified)} lowest-confidence items with their "
            "top 3 labels, as the model saw them (resized and centre-cropped).",
        ),
        Chart("failures.png", "Failures by error type", "FAILED items by error type."),
    ]
    try:
        out.mkdir(parents=True, exist_ok=True)
        charts.status_counts(stats, out / "status.png")
        charts.confidence_histogram(stats, line, out / "confidence.png")
        charts.timeline(stats, line, out / "timeline.png")
        charts.top_labels(stats, out / "labels.png")
        pictures.contact_sheet(stats.lowest(), preprocessor, out / "lowest.png")
        charts.failures(stats, out / "failures.png")
        if baseline is not None:
            drift = compare(baseline[1], stats, psi_limit)
            charts.drift(baseline[1], stats, drift, out / "drift.png")
            shown.append(
                Chart(
                    "drift.png",
                    "Drift against the baseline",
                    f"Confidence and label shares of {baseline[0].description} (baseline) "
                    "and this source; PSI = Σ (a − e) · ln(a / e) over the bins.",
                )
            )
        summary = _summary(stream, stats, line, out, shown, baseline, drift)
        page.write_index(out / "index.html", summary, shown)
    except OSError as e:
        raise OutputError(f"cannot write the report to {out}: {e.strerror or e}") from None
    return summary


def _summary(
    stream: RowStream,
    stats: Stats,
    threshold: float,
    out: Path,
    shown: list[Chart],
    baseline: tuple[RowStream, Stats] | None,
    drift: Drift | None,
) -> dict[str, Any]:
    mean = stats.mean_confidence
    return {
        "source": stream.description,
        "out": str(out),
        "rows": stats.rows,
        "skipped": stream.skipped.count,
        "statuses": {s: stats.statuses[s] for s in charts.status_order(stats)},
        "classified": stats.classified,
        "mean_confidence": None if mean is None else round(mean, 4),
        "threshold": threshold,
        "first": isoformat(stats.first),
        "last": isoformat(stats.last),
        "failures_by_type": dict(stats.errors.most_common()),
        "charts": [c.file for c in shown] + ["index.html"],
        "drift": None
        if drift is None or baseline is None
        else {
            "baseline": baseline[0].description,
            "baseline_rows": baseline[1].rows,
            "confidence_psi": round(drift.confidence_psi, 4),
            "label_psi": round(drift.label_psi, 4),
            "psi": round(drift.psi, 4),
            "limit": drift.limit,
            "drifted": drift.drifted,
            "line": drift.line(),
        },
    }
