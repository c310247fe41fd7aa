"""index.html: a short summary and every chart of the report, self-contained (no scripts)."""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .build import Chart

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #212121; }
table { border-collapse: collapse; margin-bottom: 1.5rem; }
td { padding: 0.2rem 1rem 0.2rem 0; }
figure { margin: 0 0 2rem 0; }
img { max-width: 100%; border: 1px solid #e0e0e0; }
.drift { font-weight: bold; padding: 0.5rem; background: #ffebee; }
.stable { font-weight: bold; padding: 0.5rem; background: #e8f5e9; }
"""


def write_index(path: Path, summary: dict[str, Any], shown: list[Chart]) -> None:
    statuses = summary["statuses"]
    mean = summary["mean_confidence"]
    facts = [
        ("Source", summary["source"]),
        ("Items", f"{summary['rows']:,}"),
        *((status, f"{n:,}") for status, n in statuses.items()),
        ("Mean top confidence", "n/a" if mean is None else f"{mean:.3f}"),
        ("Threshold", f"{summary['threshold']:g}"),
        ("From", summary["first"] or "n/a"),
        ("To", summary["last"] or "n/a"),
    ]
    if summary["skipped"]:
        facts.append(("Records skipped (unreadable)", f"{summary['skipped']:,}"))
    rows = "\n".join(
        f"<tr><td>{escape(name)}</td><td>{escape(str(value))}</td></tr>" for name, value in facts
    )
    drift = summary["drift"]
    drift_html = ""
    if drift is not None:
        kind = "drift" if drift["drifted"] else "stable"
        drift_html = (
            f'<p class="{kind}">{escape(drift["line"])} against {escape(drift["baseline"])}</p>'
        )
    figures = "\n".join(
        f'<figure><h2>{escape(c.title)}</h2><img src="{escape(c.file)}" alt="{escape(c.title)}">'
        f"<figcaption>{escape(c.caption)}</figcaption></figure>"
        for c in shown
    )
    path.write_text(
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>ICS report: {escape(summary['source'])}</title><style>{_STYLE}</style></head>\n"
        f"<body><h1>ICS report</h1>\n<table>{rows}</table>\n{drift_html}\n{figures}\n"
        "</body></html>\n",
        encoding="utf-8",
    )
