"""`ics report` (charts of results, drift against a baseline) and `ics show` (one image)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from ..config import default
from ..errors import ExitCode, ItemError
from ..logs import printable
from .app import (
    common_options,
    device_option,
    load_cli_settings,
    main,
    stderr_console,
    stdout_console,
)
from .render import outside, styled_status


@contextmanager
def _progress(enabled: bool | None, what: str, total: int | None) -> Iterator[Callable[[], None]]:
    """A Rich progress bar on stderr (by default only when stderr is a terminal)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn(printable(f"reading {what}")),
        BarColumn(),
        MofNCompleteColumn() if total else TextColumn("{task.completed:,.0f} rows"),
        TimeElapsedColumn(),
        console=stderr_console(),
    )
    task = bar.add_task("read", total=total)
    # Redrawing per row would cost more than the row: advance in steps.
    pending = 0

    def advance() -> None:
        nonlocal pending
        pending += 1
        if pending >= 1000:
            bar.advance(task, pending)
            pending = 0

    with bar:
        yield advance
        bar.advance(task, pending)


@main.command()
@click.argument("source")
@click.option("-o", "--out", required=True, help="Folder to write into (created if need be).")
@click.option(
    "--baseline",
    help="Another SOURCE to compare with: label and confidence drift (PSI) is drawn and "
    "reported, and the command exits 5 when it is over --psi-limit.",
)
@click.option(
    "--psi-limit",
    "drift_psi_limit",
    type=float,
    help=f"PSI above which --baseline reports drift (default {default('drift_psi_limit')}).",
)
@click.option(
    "-t",
    "--threshold",
    type=float,
    help="Threshold line drawn, and capture records are decided with (default: the one "
    "results were decided with; for captures, the one their run recorded in the store, else "
    f"the setting, {default('threshold')}).",
)
@click.option(
    "-m",
    "--model",
    help="Model whose labels name a capture's probabilities (default: the setting).",
)
@click.option(
    "--lowest",
    type=click.IntRange(1, 200),
    default=24,
    show_default=True,
    help="Lowest-confidence images on the contact sheet.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON document.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Progress bar on stderr (default: when stderr is a terminal).",
)
@common_options
def report(
    source: str,
    out: str,
    baseline: str | None,
    lowest: int,
    as_json: bool,
    progress: bool | None,
    **kwargs: Any,
) -> None:
    """Draw charts of results and write them with an index.html to OUT.

    SOURCE is a results file of `ics classify` (.jsonl, .csv, .parquet), a folder or
    .jsonl file of SageMaker data capture records, or an execution id (a unique prefix
    is enough). The input is read once, streaming: memory stays bounded however many
    rows it has. Records that cannot be read are skipped and counted.

    \b
    Charts: items by status, a confidence histogram with the threshold, confidence
    over time against the threshold, the 20 most frequent labels, a contact sheet of
    the lowest-confidence images with their top 3 labels, failures by error type;
    with --baseline, both sources' label and confidence distributions.

    \b
    Drift: PSI = sum over bins of (a - e) * ln(a / e), with e the baseline's share of
    a bin and a this source's, an empty bin counting 0.0001; confidence in 10 equal
    bins over [0, 1], labels one bin each.

    \b
    Exit codes:
      0    the report is written (no drift over the limit, with --baseline)
      2    usage error: SOURCE missing or unreadable, OUT not writable
      4    environment unavailable: the store or the disk
      5    drift: PSI over --psi-limit against --baseline
    """
    from .. import sources
    from ..report import check_out, collect, open_rows, render

    loaded = load_cli_settings(kwargs)
    settings = loaded.settings
    sources.configure(settings)  # the contact sheet reads S3 or HTTP images with these
    # A threshold given here is drawn; otherwise the one the results were decided with.
    threshold = settings.threshold if loaded.sources["threshold"] == "flag" else None
    folder = Path(out)
    check_out(folder)
    stream = open_rows(source, settings, threshold=threshold)
    # The baseline is opened before the long read, so a bad one fails at once.
    other = open_rows(baseline, settings, threshold=threshold) if baseline is not None else None
    with _progress(progress, source, stream.total) as advance:
        stats = collect(stream, lowest, advance)
    base = None
    if other is not None:
        with _progress(progress, baseline or "", other.total) as advance:
            base = (other, collect(other, lowest, advance))
    summary = render(
        stream,
        stats,
        folder,
        settings,
        threshold=threshold,
        baseline=base,
        psi_limit=settings.drift_psi_limit,
    )
    drift = summary["drift"]
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    if drift is not None and drift["drifted"]:
        sys.exit(ExitCode.DRIFT)


def _print_summary(summary: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(show_header=False, box=None, padding=(0, 2))
    t.add_row("source", outside(summary["source"]))
    counts = ", ".join(f"{n} {s}" for s, n in summary["statuses"].items())
    t.add_row("items", f"{summary['rows']} total" + (f": {counts}" if counts else ""))
    if summary["skipped"]:
        t.add_row("skipped", f"{summary['skipped']} records that could not be read (see the log)")
    drift = summary["drift"]
    if drift is not None:
        t.add_row("drift", outside(f"{drift['line']} against {drift['baseline']}"))
    t.add_row("report", outside(str(Path(summary["out"]) / "index.html")))
    stdout_console().print(t)


@main.command()
@click.argument("image")
@click.option(
    "-o",
    "--out",
    type=click.Path(dir_okay=False),
    help="Annotated image to write (PNG). Default: IMAGE's name + '.annotated.png', here.",
)
@click.option("-k", "--top-k", type=int, help=f"Predictions shown (default {default('top_k')}).")
@click.option("-t", "--threshold", type=float, help="Top confidence needed to SUCCEED.")
@click.option("-m", "--model", help=f"Model name (default {default('model')}).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON document.")
@device_option
@common_options
def show(image: str, out: str | None, as_json: bool, **kwargs: Any) -> None:
    """Classify one image, print its top-k labels and write it annotated with them.

    The annotated PNG shows the image, its status and label, and a bar chart of its
    top-k confidences. Exit code 1 when the image cannot be read or decoded.
    """
    from .. import sources
    from ..report.show import classify_one, draw

    settings = load_cli_settings(kwargs).settings
    sources.configure(settings)  # an s3:// or https:// IMAGE is read with these
    name = Path(image).name or image
    target = Path(out) if out else Path(f"{Path(name).stem}.annotated.png")
    if not target.parent.is_dir():
        raise click.UsageError(f"cannot write {target}: the folder {target.parent} does not exist")
    try:
        shown, data = classify_one(image, settings)
    except ItemError as e:
        click.echo(printable(f"{image}: FAILED, {e.type}: {e}"), err=True)
        sys.exit(ExitCode.FAILED)
    try:
        draw(shown, data, name, target)
    except OSError as e:
        raise click.UsageError(f"cannot write {target}: {e.strerror or e}") from None
    d = shown.decision
    if as_json:
        doc = {
            "image": image,
            "status": d.status.value,
            "label": d.label,
            "confidence": d.confidence,
            "top_k": [
                {"label": p.label, "index": p.index, "confidence": p.confidence} for p in d.top_k
            ],
            "threshold": settings.threshold,
            "annotated": str(target),
        }
        click.echo(json.dumps(doc, indent=2))
        return
    from rich.table import Table

    t = Table(title=printable(f"{name}: {d.status.value}"), title_justify="left")
    t.add_column("#", justify="right")
    t.add_column("label")
    t.add_column("confidence", justify="right")
    for i, p in enumerate(d.top_k, 1):
        t.add_row(str(i), outside(p.label), f"{p.confidence:.4f}")
    console = stdout_console()
    console.print(t)
    console.print(styled_status(d.status.value), outside(f"annotated image: {target}"))
