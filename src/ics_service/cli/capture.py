"""`ics capture`: read data capture files back, write ground truth; and the --capture flags
of the commands that classify."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import mimetypes
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ..config import default
from ..errors import ExitCode, UsageError
from .app import common_options, load_cli_settings, main, stdout_console
from .render import outside

if TYPE_CHECKING:
    from ..capture import CaptureRecord
    from ..types import Prediction

F = TypeVar("F", bound=Callable[..., Any])


def capture_options(f: F) -> F:
    """--capture and its companions, on every command that classifies."""
    options = [
        click.option(
            "--capture",
            metavar="DEST",
            help="Capture every classified image and its class probabilities to this local "
            "folder, as SageMaker Model Monitor data capture (JSON Lines in hourly folders "
            "DEST/ENDPOINT/VARIANT/yyyy/mm/dd/hh); s3:// destinations are not supported yet.",
        ),
        click.option(
            "--capture-sampling",
            type=float,
            metavar="PERCENT",
            help="Percentage of items captured, 0 to 100 (default "
            f"{default('capture_sampling'):g}); chosen per item from its inference id, so a "
            "resume captures the same items.",
        ),
        click.option(
            "--capture-mode",
            type=click.Choice(["input", "output", "input_and_output"]),
            help=f"What a record holds (default {default('capture_mode')}).",
        ),
        click.option(
            "--capture-endpoint",
            help=f"Endpoint name, a folder of the layout (default {default('capture_endpoint')}).",
        ),
        click.option(
            "--capture-variant",
            help=f"Variant name, a folder of the layout (default {default('capture_variant')}).",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


# --- ics capture ----------------------------------------------------------------------


@main.group()
def capture() -> None:
    """Read data capture (`--capture` of classify, resume and serve); write ground truth."""


@capture.command("read")
@click.argument("path", type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per record.")
@click.option(
    "--save-images",
    metavar="DIR",
    type=click.Path(file_okay=False),
    help="Write each captured input image to DIR, named after its inference id.",
)
@click.option(
    "-m",
    "--model",
    help="Model whose labels name the probabilities' classes (default "
    f"{default('model')}): capture records do not say which model answered.",
)
@click.option(
    "-k", "--top-k", type=int, help="Predictions listed per record with --json (default 5)."
)
@common_options
def capture_read(path: str, as_json: bool, save_images: str | None, **kwargs: Any) -> None:
    """Print captured records as result rows, oldest first.

    PATH is one capture file or a folder (every complete *.jsonl under it; hidden
    in-progress files are skipped). Labels and confidences are computed from the
    captured probabilities with the labels of --model. Lines that are not capture
    records are skipped with a warning.
    """
    from ..capture import iter_records
    from ..capture.reader import BadRecord
    from ..models import get_card
    from ..types import isoformat

    settings = load_cli_settings(kwargs).settings
    labels = get_card(settings.model, settings).labels
    out_dir = Path(save_images) if save_images else None
    if out_dir is not None:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageError(f"cannot create --save-images {out_dir}: {e.strerror}") from None
    table = None
    if not as_json:
        from rich.table import Table

        table = Table(title="captured", title_justify="left")
        for col in ("time", "inference id", "type", "label", "confidence"):
            table.add_column(col, justify="right" if col == "confidence" else "left")
    count = saved = skipped = 0
    names: set[str] = set()
    for record in iter_records(path):
        top = _top(record.probabilities, labels, settings.top_k)
        data = None
        if out_dir is not None or as_json:  # the table shows no image: decode none
            try:
                data = record.input_bytes
            except BadRecord as e:
                click.echo(f"{record.path}:{record.line}: {e}; record skipped", err=True)
                skipped += 1
                continue
        count += 1
        if out_dir is not None and data is not None and _save(out_dir, record, data, names):
            saved += 1
        if table is not None:
            table.add_row(
                isoformat(record.inference_time),
                outside(record.inference_id),
                outside(record.content_type or ""),
                outside(top[0].label if top else ""),
                f"{top[0].confidence:.3f}" if top else "",
            )
            continue
        click.echo(
            json.dumps(
                {
                    "event_id": record.event_id,
                    "inference_id": record.inference_id,
                    "inference_time": isoformat(record.inference_time),
                    "content_type": record.content_type,
                    "image": None
                    if data is None
                    else {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()},
                    "label": top[0].label if top else None,
                    "label_index": top[0].index if top else None,
                    "confidence": top[0].confidence if top else None,
                    "top_k": [
                        {"label": p.label, "index": p.index, "confidence": p.confidence}
                        for p in top
                    ],
                }
            )
        )
    if table is not None:
        stdout_console().print(table)
    note = f"{count} records"
    if skipped:
        note += f", {skipped} skipped"
    if out_dir is not None:
        note += f", {saved} images written to {out_dir}"
    click.echo(note, err=True)


def _top(probs: list[float] | None, labels: tuple[str, ...], k: int) -> list[Prediction]:
    if not probs:
        return []
    if len(probs) != len(labels):  # another model's capture: name the classes by index
        labels = tuple(f"class {i}" for i in range(len(probs)))
    import numpy as np

    from ..policies import decide

    (decision,) = decide(np.asarray([probs]), threshold=0.0, top_k=k, labels=labels)
    return decision.top_k


def _save(out_dir: Path, record: CaptureRecord, data: bytes, names: set[str]) -> bool:
    """Write one image, named by its inference id; a name already taken (the same item
    captured twice, or two ids that differ only in characters a file name cannot hold)
    gets the record's eventId added; a file already there is kept (False)."""
    ext = mimetypes.guess_extension(record.content_type or "") or ".bin"
    ext = {".jpe": ".jpg", ".jpeg": ".jpg"}.get(ext, ext)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", record.inference_id).lstrip(".") or "image"
    if name + ext in names:
        event = re.sub(r"[^A-Za-z0-9._-]", "_", record.event_id)
        name = f"{name}-{event}"
    names.add(name + ext)
    try:
        with (out_dir / (name + ext)).open("xb") as f:
            f.write(data)
    except FileExistsError:
        click.echo(f"{out_dir / (name + ext)} already exists; image not written", err=True)
        return False
    except OSError as e:
        raise UsageError(f"cannot write to --save-images {out_dir}: {e.strerror}") from None
    return True


@capture.command("ground-truth")
@click.argument("labels_csv", metavar="LABELS.csv", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder of the ground-truth records (written under yyyy/mm/dd/hh of now, UTC).",
)
@common_options
def capture_ground_truth(labels_csv: str, out: str, **kwargs: Any) -> None:
    """Write SageMaker ground-truth records from a CSV of item_id,label.

    item_id is the captured record's inferenceId (EXECUTION_ID/ITEM_ID, as `ics capture
    read` shows it); a first row `item_id,label` is a header. Each row becomes one
    record {"groundTruthData": {"data": LABEL, "encoding": "CSV"}, "eventMetadata":
    {"eventId": ITEM_ID}, "eventVersion": "0"}, which SageMaker merges with the capture by
    that id. The file is written complete or not at all.

    \b
    Exit codes:
      0    every row was written
      1    some rows were not (each is named on stderr); the others were
      2    the CSV cannot be read or the folder cannot be written
    """
    from ..capture.writer import file_name, hour_folder, part_of

    load_cli_settings(kwargs)
    now = dt.datetime.now(dt.UTC)
    # Named and published as the capture writer does: the same tools read both.
    folder = Path(out) / hour_folder(now)
    name = file_name(now)
    part = part_of(folder / name)
    written = bad = 0
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with (
            open(labels_csv, newline="", encoding="utf-8-sig") as src,
            part.open("x", encoding="utf-8") as dst,
        ):
            for n, row in enumerate(csv.reader(src), start=1):
                cells = [c.strip() for c in row]
                if n == 1 and [c.lower() for c in cells] == ["item_id", "label"]:
                    continue
                if not cells or cells == [""]:
                    continue
                problem = _bad_row(cells)
                if problem:
                    click.echo(f"{labels_csv}:{n}: {problem}; row skipped", err=True)
                    bad += 1
                    continue
                item_id, label = cells
                record = {
                    "groundTruthData": {"data": label, "encoding": "CSV"},
                    "eventMetadata": {"eventId": item_id},
                    "eventVersion": "0",
                }
                dst.write(json.dumps(record) + "\n")
                written += 1
        if written:
            os.replace(part, folder / name)
        else:
            part.unlink()
    except UnicodeDecodeError as e:
        part.unlink(missing_ok=True)
        raise UsageError(f"{labels_csv} is not UTF-8 text (byte {e.start})") from None
    except (OSError, csv.Error) as e:
        part.unlink(missing_ok=True)
        raise UsageError(f"cannot write ground truth to {out}: {e}") from None
    where = folder / name if written else "nothing written"
    click.echo(f"{written} ground-truth records: {where}", err=True)
    if bad:
        sys.exit(ExitCode.FAILED)


def _bad_row(cells: list[str]) -> str:
    if len(cells) != 2:
        return f"expected 2 columns (item_id,label), found {len(cells)}"
    if not cells[0]:
        return "empty item_id"
    if not cells[1]:
        return "empty label"
    return ""
