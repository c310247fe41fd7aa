"""`ics models`: list, info, prepare, add, remove."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from ..config import Settings
from ..errors import UsageError
from .app import common_options, json_out, load_cli_settings, main, stdout_console

# --- models ---------------------------------------------------------------------------


@main.group()
def models() -> None:
    """List, inspect, prepare, add and remove models."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@common_options
def models_list(as_json: bool, **kwargs: Any) -> None:
    """Models ICS knows: the bundled ones (and whether each is prepared: its ONNX file
    cached) and those added with `ics models add` (and where each came from)."""
    from ..models import all_cards

    settings = load_cli_settings(kwargs).settings
    unreadable: dict[str, str] = {}
    docs = [model_doc(card.name, settings) for card in all_cards(settings, unreadable)]
    docs += [
        {"name": name, "kind": None, "origin": "added", "prepared": False, "unreadable": why}
        for name, why in sorted(unreadable.items())
    ]
    if as_json:
        json_out(docs)
        return
    from rich.table import Table

    t = Table()
    for col in ("name", "kind", "version", "input", "classes", "ready", "from", "description"):
        t.add_column(col)
    for d in docs:
        if "unreadable" in d:
            t.add_row(d["name"], "?", "", "", "", "no", "added", f"unreadable: {d['unreadable']}")
            continue
        t.add_row(
            d["name"],
            d["kind"],
            d["version"],
            f"{d['input_size']}×{d['input_size']} {d['layout']}",
            str(d["num_classes"]),
            "yes" if d["prepared"] else "no",
            d["origin"],
            d["description"],
        )
    stdout_console().print(t)


@models.command("info")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--labels", "labels", is_flag=True, help="Print the labels, one per line.")
@common_options
def models_info(name: str, as_json: bool, labels: bool, **kwargs: Any) -> None:
    """A model's card (input size, preprocessing, threshold), its model file's path and
    content hash, and where it came from."""
    from ..models import get_card

    settings = load_cli_settings(kwargs).settings
    if labels:
        for label in get_card(name, settings).labels:
            click.echo(label)
        return
    doc = model_doc(name, settings)
    if as_json:
        json_out(doc)
        return
    from rich.table import Table

    t = Table(show_header=False, box=None, padding=(0, 2))
    for key, value in doc.items():
        if isinstance(value, dict):
            for k, v in value.items():
                t.add_row(f"{key}.{k}", str(v))
        else:
            t.add_row(key, str(value))
    stdout_console().print(t)


def model_doc(name: str, settings: Settings) -> dict[str, Any]:
    from ..models import get_card
    from ..models.factory import onnx_file

    card = get_card(name, settings)
    path = onnx_file(card, settings.models_dir) if card.kind == "onnx" else None
    prepared = path.is_file() if path is not None else True
    if card.added:
        origin = str(
            card.source.get("onnx")
            or card.source.get("python")
            or card.source.get("spec")
            or "added"
        )
    else:
        origin = "bundled"
    return {
        **card.to_dict(),
        "origin": origin,
        "path": str(path) if path is not None else None,
        "prepared": prepared,
        "size_bytes": path.stat().st_size if path is not None and prepared else None,
    }


@models.command("prepare")
@click.argument("names", nargs=-1)
@click.option("--force", is_flag=True, help="Rebuild even when the ONNX file exists.")
@common_options
def models_prepare(names: tuple[str, ...], force: bool, **kwargs: Any) -> None:
    """Build bundled models' ONNX files once (default: every bundled model whose extra is
    installed). The EfficientNet-Lite models need the `convert` extra, open-nsfw the
    `moderation` one."""
    from ..errors import install_hint
    from ..models import MODELS, get_card
    from ..models.prepare import is_prepared, missing_extra, prepare

    settings = load_cli_settings(kwargs).settings
    for name in names or tuple(MODELS):
        card = get_card(name, settings)
        if card.added:
            click.echo(f"{name}: not a bundled model, nothing to prepare")
            continue
        extra = None if names else missing_extra(card)
        if extra is not None:
            click.echo(f"{name}: skipped, it needs the {extra} extra: {install_hint(extra)}")
            continue
        if is_prepared(card, settings.models_dir) and not force:
            click.echo(f"{name}: already prepared")
            continue
        click.echo(f"{name}: preparing...", err=True)
        started = time.perf_counter()
        path = prepare(card, settings.models_dir, force=force)
        click.echo(f"{name}: prepared {path} in {time.perf_counter() - started:.1f} s")


def _triple(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """'0.485,0.456,0.406' (or one number for all three channels) → 3 floats."""
    if value is None:
        return None
    parts = [p.strip() for p in value.split(",")]
    try:
        numbers = tuple(_number(p) for p in parts)
    except ValueError:
        raise click.BadParameter(f"{value!r}: give 3 numbers separated by commas") from None
    if len(numbers) == 1:
        return numbers * 3
    if len(numbers) != 3:
        raise click.BadParameter(f"{value!r}: give 3 numbers (one per channel), or one")
    return numbers


def _fraction(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    try:
        return _number(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: give a number such as 0.00392 or 1/255") from None


def _label_thresholds(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> dict[str, float] | None:
    out: dict[str, float] = {}
    for item in value:
        label, sep, number = item.rpartition("=")
        try:
            threshold = float(number)
        except ValueError:
            threshold = -1.0
        if not sep or not label.strip() or not 0.0 <= threshold <= 1.0:
            raise click.BadParameter(f"{item!r}: give LABEL=THRESHOLD, a threshold 0 to 1")
        out[label.strip()] = threshold
    return out or None


def _number(text: str) -> float:
    if "/" in text:
        num, den = text.split("/", 1)
        return float(num) / float(den)
    return float(text)


@models.command("add")
@click.argument("name")
@click.option(
    "--onnx",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The model's ONNX file: one float32 image input, (N, classes) scores out.",
)
@click.option(
    "--sagemaker",
    metavar="ENDPOINT[/VARIANT]",
    help="A SageMaker endpoint (boto3's sagemaker-runtime, its standard chain of region, "
    "endpoint URL and credentials), sent each image's bytes.",
)
@click.option(
    "--target-model",
    help="With --sagemaker: the model of a multi-model endpoint (boto3's TargetModel).",
)
@click.option(
    "--v2",
    "v2_url",
    metavar="URL",
    help="A model of an Open Inference Protocol server: http(s)://HOST:PORT/v2/models/NAME.",
)
@click.option(
    "--labels",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Class names, one per line, in the order of the model's outputs (a remote model "
    "that names its classes needs none).",
)
@click.option(
    "--card",
    "card_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A card.toml with the card's fields (model_file and labels_file relative to it); "
    "options given beside it win over its fields.",
)
@click.option(
    "--python",
    "python_class",
    metavar="MODULE:CLASS",
    help="A Python model: a class with load(card) and predict(batch) (see docs/models.md), "
    "importable by ICS (installed, or on PYTHONPATH when added).",
)
@click.option(
    "--like",
    help="Take a registered model's preprocessing and outputs (a fine-tuned variant of it).",
)
@click.option("--size", type=int, help="Side of the square input (default: the model's).")
@click.option(
    "--resize", type=int, help="Side resized to before the centre crop (default: size / crop)."
)
@click.option(
    "--resize-mode",
    type=click.Choice(["shorter", "squash"]),
    help="Resize the shorter side keeping the aspect ratio (shorter, the default), or both "
    "sides (squash).",
)
@click.option(
    "--crop", type=float, help="Centre-crop fraction: resize to size / crop (default 0.875)."
)
@click.option("--interpolation", type=click.Choice(["bilinear", "bicubic"]))
@click.option(
    "--mean",
    callback=_triple,
    help="Per-channel mean subtracted after --scale: 'R,G,B' or one number (default 127.5).",
)
@click.option(
    "--std",
    callback=_triple,
    help="Per-channel divisor after the mean: 'R,G,B' or one number (default 128).",
)
@click.option(
    "--scale",
    callback=_fraction,
    help="Pixel values 0..255 are multiplied by it first: 1/255 for 0..1 (default 1).",
)
@click.option(
    "--layout",
    type=click.Choice(["NCHW", "NHWC"]),
    help="Input tensor layout (default: NCHW, or NHWC when the model's input says so).",
)
@click.option("--channels", type=click.Choice(["RGB", "BGR"]), help="Channel order (default RGB).")
@click.option(
    "--outputs",
    type=click.Choice(["logits", "probabilities", "sigmoid"]),
    help="What the model outputs: logits (softmax is applied; the default), probabilities, or "
    "sigmoid: independent per-label probabilities of a multi-label model (each label decided "
    "against its own threshold).",
)
@click.option(
    "--label-threshold",
    "label_thresholds",
    multiple=True,
    callback=_label_thresholds,
    metavar="LABEL=THRESHOLD",
    help="A multi-label model's threshold for one label (repeatable); the others use the "
    "model's threshold.",
)
@click.option(
    "--threshold",
    "card_threshold",
    type=float,
    help="The model's default threshold (a threshold setting or flag still wins).",
)
@click.option("--description", help="One line about the model, shown by `ics models list`.")
@click.option(
    "--model-version",
    "model_version",
    help="The version results record (default: the start of the model's sha256).",
)
@click.option("--replace", "replace_existing", is_flag=True, help="Replace an added model.")
@click.option("--json", "as_json", is_flag=True, help="Print the added card as JSON.")
@common_options
def models_add(
    name: str,
    onnx: Path | None,
    sagemaker: str | None,
    target_model: str | None,
    v2_url: str | None,
    labels: Path | None,
    card_file: Path | None,
    like: str | None,
    python_class: str | None,
    replace_existing: bool,
    as_json: bool,
    **kwargs: Any,
) -> None:
    """Add a model of your own under NAME: an ONNX file or a Python class, checked (input and
    output shapes against the card and labels, one real inference on a sample photo), then
    copied into the model home with its card and content hash. Use it with --model NAME.

    A remote model (--sagemaker ENDPOINT[/VARIANT], --v2 URL) is checked by classifying the
    sample photo through it; its card and labels (from --labels, or named by the endpoint)
    are written to the model home."""
    from ..models.added import AddRequest, add_model

    card_fields = {
        "input_size": kwargs.pop("size"),
        "resize": kwargs.pop("resize"),
        "resize_mode": kwargs.pop("resize_mode"),
        "crop_pct": kwargs.pop("crop"),
        "interpolation": kwargs.pop("interpolation"),
        "mean": kwargs.pop("mean"),
        "std": kwargs.pop("std"),
        "scale": kwargs.pop("scale"),
        "layout": kwargs.pop("layout"),
        "channels": kwargs.pop("channels"),
        "outputs": kwargs.pop("outputs"),
        "label_thresholds": kwargs.pop("label_thresholds"),
        "threshold": kwargs.pop("card_threshold"),
        "description": kwargs.pop("description"),
        "version": kwargs.pop("model_version"),
    }
    settings = load_cli_settings(kwargs).settings
    if sagemaker is not None or v2_url is not None or target_model is not None:
        if onnx is not None or card_file is not None or like is not None or python_class:
            raise UsageError(
                "a remote model (--sagemaker, --v2) has no --onnx, --python, --card or --like"
            )
        card = _add_remote(
            name, sagemaker, target_model, v2_url, labels, settings, card_fields, replace_existing
        )
        if as_json:
            json_out(model_doc(card.name, settings))
            return
        click.echo(
            f"added {card.name} ({card.kind} {card.source['spec'].partition(':')[2]}, "
            f"{len(card.labels)} classes) in {settings.models_dir / card.name}; use it with "
            f"--model {card.name}"
        )
        return
    if onnx is None and card_file is None and python_class is None:
        raise UsageError("give the model: --onnx FILE, --python MODULE:CLASS or --card CARD.toml")
    req = AddRequest(
        name=name,
        onnx=onnx,
        labels=labels,
        card_file=card_file,
        like=like,
        python=python_class,
        replace_existing=replace_existing,
        fields=card_fields,
    )
    card, notes = add_model(req, settings.models_dir)
    if as_json:
        json_out(model_doc(card.name, settings))
        return
    for note in notes:
        click.echo(f"from the model: {note}", err=True)
    digest = card.source.get("sha256")
    click.echo(
        f"added {card.name} ({card.kind}, version {card.version}, {len(card.labels)} classes"
        + (f", sha256 {digest[:16]}..." if digest else "")
        + f") in {settings.models_dir / card.name}; use it with --model {card.name}"
    )


def _add_remote(
    name: str,
    sagemaker: str | None,
    target_model: str | None,
    v2_url: str | None,
    labels: Path | None,
    settings: Settings,
    card_fields: dict[str, Any],
    replace_existing: bool,
) -> Any:
    from ..models.added import add_remote
    from ..models.remote import RemoteOptions
    from ..models.sagemaker import PREFIX, endpoint_of, parse_spec

    if sagemaker is not None and v2_url is not None:
        raise UsageError("give --sagemaker or --v2, not both")
    if sagemaker is not None:
        endpoint = parse_spec(PREFIX + sagemaker.removeprefix(PREFIX))
        if target_model is not None:
            if endpoint.target_model is not None:
                raise UsageError("give the target model once: --target-model or ?target_model=")
            endpoint = endpoint_of(endpoint.name, endpoint.variant, target_model)
        spec = str(endpoint)
    elif v2_url is None:
        raise UsageError("--target-model goes with --sagemaker ENDPOINT")
    else:
        if target_model is not None:
            raise UsageError("--target-model goes with --sagemaker, not --v2")
        spec = "v2:" + v2_url.removeprefix("v2:")
    return add_remote(
        name,
        spec,
        labels=labels,
        models_dir=settings.models_dir,
        options=RemoteOptions.of(settings),
        fields=card_fields,
        replace_existing=replace_existing,
    )


@models.command("remove")
@click.argument("name")
@common_options
def models_remove(name: str, **kwargs: Any) -> None:
    """Remove a model added with `ics models add` (bundled models cannot be removed)."""
    from ..models.added import remove_model

    settings = load_cli_settings(kwargs).settings
    click.echo(f"removed {remove_model(name, settings.models_dir)}")
