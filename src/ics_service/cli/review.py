"""`ics review`: people's reviews of LOW_CONFIDENCE items (made in `ics serve`'s console at
/review), exported as a labelled dataset."""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from ..errors import UsageError
from .app import common_options, load_cli_settings, main, open_store

FORMATS = ("sagemaker-ground-truth", "csv", "imagefolder")


@main.group()
def review() -> None:
    """People's reviews of LOW_CONFIDENCE items.

    Reviews are made in the web console of `ics serve` (/review): the model's label
    accepted, another label of the model's, or none of them. They are store rows, read
    here from the same store.
    """


@review.command("export")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    required=True,
    help="sagemaker-ground-truth: a Ground Truth output manifest (JSON Lines, image "
    "classification); csv: uri,label lines; imagefolder: a folder per label holding a copy "
    "of each image.",
)
@click.option(
    "--out",
    "-o",
    "out",
    required=True,
    type=click.Path(path_type=Path),
    help="The file (manifest, CSV) or folder (imagefolder) to write; it must not exist.",
)
@click.option("--execution", help="Only the items of this execution (id, start of it, or name).")
@click.option(
    "--attribute",
    default="ics-review",
    show_default=True,
    help="The label attribute name of the Ground Truth manifest.",
)
@common_options
def review_export(
    fmt: str, out: Path, execution: str | None, attribute: str, **kwargs: Any
) -> None:
    """Export the reviewed items as a labelled dataset.

    Items answered "none of these" carry no label: they are left out (the summary counts
    them). Each image of an imagefolder export is read again from its URI.
    """
    from .. import sources
    from ..store.reviews import Reviews

    if out.exists():
        raise UsageError(f"{out} exists: give a new path (an export never overwrites)")
    settings = load_cli_settings(dict(kwargs)).settings
    with open_store(kwargs) as store:
        execution_id = None if execution is None else store.get_execution(execution).id
        answered = list(Reviews(store).answered(execution_id=execution_id))
    labelled = [r for r in answered if r.review.label is not None]
    if fmt == "imagefolder":
        sources.configure(settings)
        _image_folder(labelled, out, settings.max_bytes)
    else:
        tmp = out.with_name(f".{out.name}.part")
        with tmp.open("w", newline="", encoding="utf-8") as f:
            if fmt == "csv":
                writer = csv.writer(f)
                writer.writerow(["uri", "label"])
                for r in labelled:
                    writer.writerow([r.result.uri, r.review.label])
            else:
                for r in labelled:
                    f.write(json.dumps(_ground_truth(r, attribute)) + "\n")
        os.replace(tmp, out)
    click.echo(
        f"{len(labelled)} labelled items written to {out}"
        + (
            f"; {len(answered) - len(labelled)} answered 'none of these' left out"
            if len(answered) > len(labelled)
            else ""
        ),
        err=True,
    )


def _ground_truth(r: Any, attribute: str) -> dict[str, Any]:
    """One line of a Ground Truth image-classification output manifest."""
    review = r.review
    return {
        "source-ref": r.result.uri,
        attribute: review.label_index,
        f"{attribute}-metadata": {
            "class-name": review.label,
            "confidence": 1.0,
            "type": "groundtruth/image-classification",
            "job-name": f"labeling-job/{attribute}",
            "human-annotated": "yes",
            "creation-date": review.reviewed_at.strftime("%Y-%m-%dT%H:%M:%S.%f"),
            "reviewer": review.reviewer,
            "ics-execution-id": review.execution_id,
            "ics-item-id": review.item_id,
        },
    }


def _image_folder(labelled: list[Any], out: Path, max_bytes: int) -> None:
    """OUT/LABEL/EXECUTION-ITEM-NAME for each labelled item (names never collide)."""
    from .. import sources
    from ..errors import ItemError

    tmp = out.with_name(f".{out.name}.part")
    tmp.mkdir(parents=True)
    missing = 0
    for r in labelled:
        folder = tmp / _safe(r.review.label)
        folder.mkdir(exist_ok=True)
        name = _safe(r.result.uri.rstrip("/").rsplit("/", 1)[-1]) or "image"
        try:
            data = sources.read(r.result.uri, max_bytes)
        except ItemError as e:
            missing += 1
            click.echo(f"not copied: {r.result.uri}: {e}", err=True)
            continue
        (folder / f"{r.review.execution_id}-{r.review.item_id}-{name}").write_bytes(data)
    os.replace(tmp, out)
    if missing:
        click.echo(f"{missing} images could not be read again and are missing", err=True)
        sys.exit(1)


def _safe(name: str) -> str:
    """A file name of its own: no separators, no dot-only names."""
    cleaned = "".join("_" if c in "/\\\0:" else c for c in name).strip()
    return cleaned if cleaned.strip(".") else "_"
