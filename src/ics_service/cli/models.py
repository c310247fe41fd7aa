"""`ics models`: list, info, prepare."""

from __future__ import annotations

import time
from typing import Any

import click

from ..config import Settings
from .app import common_options, json_out, load_cli_settings, main, stdout_console

# --- models ---------------------------------------------------------------------------


@main.group()
def models() -> None:
    """List, inspect and prepare models."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@common_options
def models_list(as_json: bool, **kwargs: Any) -> None:
    """Models ICS knows and whether each is prepared (its ONNX file cached)."""
    from ..models import MODELS

    settings = load_cli_settings(kwargs).settings
    docs = [model_doc(name, settings) for name in MODELS]
    if as_json:
        json_out(docs)
        return
    from rich.table import Table

    t = Table()
    for col in ("name", "version", "input", "classes", "prepared", "description"):
        t.add_column(col)
    for d in docs:
        t.add_row(
            d["name"],
            d["version"],
            f"{d['input_size']}×{d['input_size']}",
            str(d["num_classes"]),
            "yes" if d["prepared"] else "no",
            d["description"],
        )
    stdout_console().print(t)


@models.command("info")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@common_options
def models_info(name: str, as_json: bool, **kwargs: Any) -> None:
    """A model's card: input size, preprocessing, labels, and its ONNX file's path."""
    settings = load_cli_settings(kwargs).settings
    doc = model_doc(name, settings)
    if as_json:
        json_out(doc)
        return
    from rich.table import Table

    t = Table(show_header=False, box=None, padding=(0, 2))
    for key, value in doc.items():
        t.add_row(key, str(value))
    stdout_console().print(t)


def model_doc(name: str, settings: Settings) -> dict[str, Any]:
    from ..models import get_card
    from ..models.prepare import is_prepared, onnx_path

    card = get_card(name)
    path = onnx_path(card, settings.models_dir)
    prepared = is_prepared(card, settings.models_dir)
    return {
        **card.to_dict(),
        "path": str(path),
        "prepared": prepared,
        "size_bytes": path.stat().st_size if prepared else None,
    }


@models.command("prepare")
@click.argument("names", nargs=-1)
@click.option("--force", is_flag=True, help="Rebuild even when the ONNX file exists.")
@common_options
def models_prepare(names: tuple[str, ...], force: bool, **kwargs: Any) -> None:
    """Build models' ONNX files once (default: every model). Needs the `convert` extra."""
    from ..models import MODELS, get_card
    from ..models.prepare import is_prepared, prepare

    settings = load_cli_settings(kwargs).settings
    for name in names or tuple(MODELS):
        card = get_card(name)
        if is_prepared(card, settings.models_dir) and not force:
            click.echo(f"{name}: already prepared")
            continue
        click.echo(f"{name}: preparing...", err=True)
        started = time.perf_counter()
        path = prepare(card, settings.models_dir, force=force)
        click.echo(f"{name}: prepared {path} in {time.perf_counter() - started:.1f} s")
