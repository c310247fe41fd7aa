"""Adding a user's model to the model home, and removing it: `ics models add/remove`.

A model is checked before it is added: its ONNX input against the card (rank, layout,
size, float type), its output width against the labels, and one real inference on a
sample photo (a batch of two, through the card's own preprocessing) whose answers must be
finite scores of the card's kind. Then its files are copied into `<models_dir>/<name>/`
with a card.toml that records where they came from and the model's sha256, in one rename.
"""

from __future__ import annotations

import datetime
import logging
import shutil
import tempfile
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import __version__
from ..config import ALL_MODELS
from ..errors import ConfigError, EndpointUnavailable, ModelError, ModelNotFound, UsageError
from ..modelcard import CARD_FILE, ModelCard, read_labels
from ..samples import sample_photo
from .answers import check_scores
from .digests import sha256_of
from .prepare import current_umask
from .registry import added_card, bundled_name, check_name, get_card

if TYPE_CHECKING:
    from .remote import RemoteOptions

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
LABELS_FILE = "labels.txt"
#: The fields `--like MODEL` takes from a registered card: how its inputs are made and what
#: its outputs are (a fine-tuned variant of it is fed the same way).
PREPROCESSING = (
    "input_size",
    "crop_pct",
    "resize",
    "resize_mode",
    "interpolation",
    "mean",
    "std",
    "scale",
    "layout",
    "channels",
    "jpeg_quality",
    "reduced_decode",
    "outputs",
)


class ModelRejected(UsageError):
    """A model that `ics models add` refused: the message says what to fix."""


@dataclass
class AddRequest:
    """What `ics models add` was given: files, and card fields that override the card's."""

    name: str
    onnx: Path | None = None
    labels: Path | None = None
    card_file: Path | None = None
    like: str | None = None
    #: A Python model's class, "module:Class" (instead of an ONNX file).
    python: str | None = None
    replace_existing: bool = False
    #: Card fields given as options (None: not given).
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class Draft:
    """The card's fields as the request gives them, before the model completes them."""

    values: dict[str, Any]
    #: The ONNX file (None for a Python model).
    onnx: Path | None
    #: The labels file (None for a Python model whose class names its classes).
    labels: Path | None
    #: Whether the layout was given (by an option, --card or --like), not assumed.
    layout_given: bool


def draft_card(req: AddRequest, models_dir: Path) -> Draft:
    """The card the request describes: --card's, then --like's preprocessing, then options."""
    values: dict[str, Any] = {}
    onnx, labels = req.onnx, req.labels
    if req.python is not None:
        from .python import class_card_fields, load_class

        values = {"outputs": "probabilities", "input_size": 224}
        declared = class_card_fields(load_class(req.python), req.python)
        values.update({k: v for k, v in declared.items() if k in CARD_FIELDS})
    if req.card_file is not None:
        try:
            text = req.card_file.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read the card {req.card_file}: {e}") from None
        where = f"card {req.card_file}"
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{where} is not valid TOML: {e}") from None
        data["name"] = req.name
        # Checked as a card; the size may be left to the model's input shape.
        checked = {"input_size": 224, **data}
        base = ModelCard.from_mapping(checked, req.card_file.resolve().parent, where=where)
        values.update({k: getattr(base, k) for k in data if k in CARD_FIELDS})
        if onnx is None and base.model_path is not None:
            onnx = Path(base.model_path)
        if labels is None and base.labels_path is not None:
            labels = Path(base.labels_path)
    if req.like is not None:
        like = get_card(req.like, models_dir)
        values.update({k: getattr(like, k) for k in PREPROCESSING})
    values.update({k: v for k, v in req.fields.items() if v is not None})
    if req.python is not None:
        if onnx is not None:
            raise UsageError("give --python or --onnx, not both")
        if labels is None and not values.get("classes"):
            raise UsageError(f"no labels: give --labels FILE (or `classes` in {req.python}.card)")
    else:
        if onnx is None:
            raise UsageError("no model file: give --onnx FILE (or model_file in --card's card)")
        if labels is None:
            raise UsageError("no labels: give --labels FILE (or labels_file in --card's card)")
    if labels is not None:
        values.pop("classes", None)
    for key in ("labels_file", "labels_path", "model_path", "build", "source", "kind"):
        values.pop(key, None)
    values["name"] = req.name
    return Draft(values, onnx, labels, layout_given="layout" in values)


#: The fields of a card.
CARD_FIELDS = frozenset(f.name for f in fields(ModelCard))


def add_model(req: AddRequest, models_dir: Path) -> tuple[ModelCard, list[str]]:
    """Check the model and copy it into `<models_dir>/<name>/`; its card and notes of what
    was taken from the model itself (input size, layout)."""
    check_new_name(req.name, models_dir, replace_existing=req.replace_existing)
    draft = draft_card(req, models_dir)
    labels = _check_labels(draft.labels) if draft.labels is not None else None
    common = {
        **({"labels": str(draft.labels.resolve())} if draft.labels else {}),
        **({"card": str(req.card_file.resolve())} if req.card_file else {}),
        **({"like": req.like} if req.like else {}),
        **added_stamp(),
    }
    if req.python is not None:
        from .python import python_source

        source = python_source(req.python)
        draft.values.setdefault("version", source.get("sha256", "")[:12] or "1")
        draft.values.setdefault("description", f"Python model {req.python}")
        draft.values["source"] = {**source, **common}
        card, notes = check_python(draft, labels)
        return install(card, None, labels, models_dir), notes
    assert draft.onnx is not None and labels is not None
    digest = sha256_of(draft.onnx) if draft.onnx.is_file() else ""
    # The content hash's start: results name the exact weights they were decided with.
    draft.values.setdefault("version", digest[:12])
    draft.values.setdefault("description", f"added from {draft.onnx.name}")
    draft.values["source"] = {"onnx": str(draft.onnx.resolve()), "sha256": digest, **common}
    card, notes = check_onnx(draft, labels)
    return install(card, draft.onnx, labels, models_dir), notes


def added_stamp() -> dict[str, str]:
    """What an added model's card.toml records of its adding: when, and by which ICS."""
    now = datetime.datetime.now(datetime.UTC)
    return {"added_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "ics_version": __version__}


def check_new_name(name: str, models_dir: Path, *, replace_existing: bool) -> None:
    """UsageError unless a model may be added under `name`."""
    check_name(name)
    if name.casefold() == ALL_MODELS:
        raise UsageError(
            f"{name} stands for every registered model (`ics serve --model {ALL_MODELS}`): "
            "choose another name for yours"
        )
    bundled = bundled_name(name)
    if bundled is not None:
        raise UsageError(
            f"{name} is a bundled model's name ({bundled}, whatever the case): choose "
            "another name for yours (bundled models cannot be replaced)"
        )
    folded = name.casefold()
    twin = next(
        (p.name for p in _listed(models_dir) if p.name != name and p.name.casefold() == folded),
        None,
    )
    if twin is not None:
        raise UsageError(
            f"{name} differs only in case from the model {twin} in {models_dir}: on a file "
            "system that does not tell case apart both would be one folder; choose another "
            f"name (or `ics models add {twin} --replace ...`)"
        )
    folder = models_dir / name
    if folder.exists() and not replace_existing:
        what = "an added model" if (folder / CARD_FILE).is_file() else "a folder"
        raise UsageError(
            f"{name} is already {what} in {models_dir}: give --replace to replace it, "
            "or choose another name"
        )


def _listed(folder: Path) -> list[Path]:
    """The entries of a folder; none when it does not exist yet."""
    try:
        return list(folder.iterdir())
    except FileNotFoundError:
        return []


def _check_labels(path: Path) -> tuple[str, ...]:
    if not path.is_file():
        raise ModelRejected(f"labels file {path} does not exist (or is not a file)")
    labels = read_labels(path)
    if not labels:
        raise ModelRejected(f"labels file {path} has no labels: write one class name a line")
    _check_label_list(labels, f"labels file {path}")
    return labels


def _check_label_list(labels: tuple[str, ...], where: str) -> None:
    """A warning for each name that two classes share (ImageNet's own list names two
    classes "crane"): results tell them apart by `label_index`, names alone do not."""
    seen: dict[str, int] = {}
    for i, label in enumerate(labels, 1):
        if label in seen:
            log.warning(
                "%s: label %r is the %s and the %s label: results name both %r (their "
                "label_index tells them apart); give each class a name of its own if that "
                "is not what you want",
                where,
                label,
                _nth(seen[label]),
                _nth(i),
                label,
            )
        else:
            seen[label] = i


def _nth(i: int) -> str:
    suffix = "th" if 10 <= i % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(i % 10, "th")
    return f"{i}{suffix}"


def check_onnx(draft: Draft, labels: tuple[str, ...]) -> tuple[ModelCard, list[str]]:
    """The card, completed from the model's input (size, and layout when not given) and
    checked against the model by one real inference; ModelRejected says what to fix."""
    import onnxruntime as ort

    from .runtime import onnx_session

    path = draft.onnx
    assert path is not None and draft.labels is not None
    if not path.is_file():
        raise ModelRejected(f"model file {path} does not exist (or is not a file)")
    try:
        session = onnx_session(path, threads=1)
    except Exception as e:  # onnxruntime raises its own types for files it cannot load
        raise ModelRejected(
            f"{path} is not an ONNX model that onnxruntime {ort.__version__} can open: "
            f"{_first_line(e)}"
        ) from None
    inputs = session.get_inputs()
    if len(inputs) != 1:
        names = ", ".join(f"{i.name} {i.shape}" for i in inputs)
        raise ModelRejected(
            f"{path} has {len(inputs)} inputs ({names}); ICS feeds one image tensor: export "
            "the model with a single input"
        )
    inp = inputs[0]
    if inp.type != "tensor(float)":
        raise ModelRejected(
            f"{path}'s input {inp.name} is {inp.type}; ICS feeds float32 images "
            "(tensor(float)): export the model with a float32 input"
        )
    shape = list(inp.shape)
    if len(shape) != 4:
        raise ModelRejected(
            f"{path}'s input {inp.name} has rank {len(shape)} (shape {shape}); ICS feeds "
            "images as (N, 3, H, W) or (N, H, W, 3): a rank-4 input with a batch axis"
        )
    notes: list[str] = []
    values = draft.values
    if not draft.layout_given and shape[3] == 3 and shape[1] != 3:
        values["layout"] = "NHWC"
        notes.append(f"layout NHWC (the model's input {inp.name} is {shape})")
    layout = values.get("layout", "NCHW")
    channels = shape[1] if layout == "NCHW" else shape[3]
    if isinstance(channels, int) and channels != 3:
        other = "NHWC" if layout == "NCHW" else "NCHW"
        fits_other = shape[3 if layout == "NCHW" else 1] == 3
        hint = f": give --layout {other}" if fits_other else ": ICS feeds 3 colour channels"
        raise ModelRejected(
            f"{path}'s input {inp.name} is {shape}, not {layout} with 3 channels "
            f"({_shape_text(layout)}){hint}"
        )
    hw = shape[2:4] if layout == "NCHW" else shape[1:3]
    fixed = [d for d in hw if isinstance(d, int) and d > 0]
    if "input_size" not in values:
        if len(fixed) != 2 or fixed[0] != fixed[1]:
            raise ModelRejected(
                f"{path}'s input {inp.name} is {shape}: it does not say a square image size, "
                "so give --size PIXELS"
            )
        values["input_size"] = fixed[0]
        notes.append(f"input size {fixed[0]} (the model's input {inp.name} is {shape})")
    for d in fixed:
        if d != values["input_size"]:
            raise ModelRejected(
                f"{path}'s input {inp.name} is {shape} but the card says "
                f"{values['input_size']}×{values['input_size']}: give --size {d}"
            )
    batch = shape[0]
    if isinstance(batch, int) and batch > 0:
        raise ModelRejected(
            f"{path}'s input {inp.name} has a fixed batch size {batch} (shape {shape}); ICS "
            "runs batches of several images: export it with a dynamic batch axis (torch: "
            "dynamic_axes={'input': {0: 'batch'}})"
        )
    outputs = session.get_outputs()
    if len(outputs) != 1:
        raise ModelRejected(_outputs_message(path, outputs))
    out = outputs[0]
    if len(out.shape) != 2:
        raise ModelRejected(
            f"{path}'s output {out.name} has shape {out.shape}; ICS reads (N, classes) scores"
        )
    width = out.shape[1]
    if isinstance(width, int) and width != len(labels):
        raise ModelRejected(_width_message(path, out.name, width, draft.labels, len(labels)))
    try:
        card = ModelCard(
            **values,
            kind="onnx",
            labels_path=str(draft.labels.resolve()),
            model_path=str(path.resolve()),
        )
    except (ConfigError, TypeError) as e:
        raise ModelRejected(str(e)) from None
    card.decision_thresholds(0.5)  # a label threshold for a label it has not is refused
    _check_inference(card, session, inp.name, out.name, path, draft.labels, len(labels))
    return card, notes


def _outputs_message(path: Path | str, outputs: list[Any]) -> str:
    names = ", ".join(f"{o.name} {o.shape}" for o in outputs)
    return (
        f"{path} has {len(outputs)} outputs ({names}); ICS reads one output of (N, classes) "
        "scores: export the model with that output only"
    )


def _shape_text(layout: str) -> str:
    return "N, 3, H, W" if layout == "NCHW" else "N, H, W, 3"


def _width_message(path: Path, out: str, width: int, labels: Path, n: int) -> str:
    return (
        f"{path}'s output {out} has {width} classes but the labels file {labels} has {n} "
        f"labels: give a labels file of {width} lines, one class name a line, in the model's "
        "output order"
    )


def _sample_batch(pre: Any) -> np.ndarray:
    """The sample photo and its mirror image (two different inputs: a batch axis that
    works), through `pre` (a Preprocessor)."""
    img, _ = pre.decode(sample_photo())
    rgb = np.asarray(img)
    return np.stack([pre.input_of(rgb), pre.input_of(np.ascontiguousarray(rgb[:, ::-1]))])


def _check_inference(
    card: ModelCard,
    session: Any,
    in_name: str,
    out_name: str,
    path: Path,
    labels: Path,
    n_labels: int,
) -> None:
    from ..imaging import Limits, Preprocessor

    batch = _sample_batch(Preprocessor(card, Limits()))
    try:
        out = np.asarray(session.run([out_name], {in_name: batch})[0])
    except Exception as e:
        raise ModelRejected(
            f"{path} failed on a sample photo preprocessed as the card says "
            f"({_shape_text(card.layout)} = {list(batch.shape)}, float32): {_first_line(e)}"
        ) from None
    if out.ndim == 2 and out.shape[0] == 2 and out.shape[1] != n_labels:
        raise ModelRejected(_width_message(path, out_name, out.shape[1], labels, n_labels))
    _check_scores(card, out, str(path), n_labels)


def _check_scores(card: ModelCard, out: np.ndarray, what: str, n_labels: int) -> None:
    if out.ndim != 2 or out.shape[0] != 2:
        raise ModelRejected(
            f"{what} answered a batch of 2 images with shape {list(out.shape)}; ICS reads "
            "(N, classes) scores, one row per image"
        )
    if out.shape[1] != n_labels:
        raise ModelRejected(
            f"{what} answered {out.shape[1]} scores per image but has {n_labels} labels: "
            "give as many labels as the model has classes"
        )
    check_scores(card, out, where=f"{what} (given a sample photo)", error=ModelRejected)


def check_python(draft: Draft, labels: tuple[str, ...] | None) -> tuple[ModelCard, list[str]]:
    """The Python model's card, checked by loading the model and one real prediction."""
    from ..imaging import Limits, Preprocessor
    from .python import open_python_model

    try:
        card = ModelCard(
            **draft.values,
            kind="python",
            labels_path=str(draft.labels.resolve()) if draft.labels else None,
        )
    except (ConfigError, TypeError) as e:
        raise ModelRejected(str(e)) from None
    spec = card.source["python"]
    if labels is None:
        _check_label_list(card.labels, f"{spec}.card's classes")
    try:
        runtime = open_python_model(card)
    except ConfigError:
        raise
    except Exception as e:
        raise ModelRejected(f"{spec} failed to load: {type(e).__name__}: {e}") from None
    try:
        batch = _sample_batch(Preprocessor.for_runtime(runtime, Limits()))
        out = np.asarray(runtime.model.predict(batch), dtype=np.float32)
    except Exception as e:
        raise ModelRejected(
            f"{spec} failed on a sample photo ({_shape_text(card.layout)}, "
            f"{card.input_size}×{card.input_size}): {type(e).__name__}: {e}"
        ) from None
    finally:
        runtime.close()
    _check_scores(card, out, spec, len(card.labels))
    return card, []


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def install(
    card: ModelCard, onnx: Path | None, labels: tuple[str, ...] | None, models_dir: Path
) -> ModelCard:
    """Write the model's folder (its model file, none for a Python or remote model; its
    labels, none for a Python model naming its classes; its card) next to its place and
    rename it there (a replaced model's folder is moved aside first, then deleted); the
    card as the registry now reads it."""
    models_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".adding-{card.name}-", dir=models_dir))
    try:
        staging.chmod(0o777 & ~current_umask())
        final = models_dir / card.name
        changes: dict[str, Any] = {}
        if onnx is not None:
            shutil.copyfile(onnx, staging / MODEL_FILE)
            if sha256_of(staging / MODEL_FILE) != card.source["sha256"]:
                raise ModelRejected(f"{onnx} changed while it was being added: add it again")
            changes["model_path"] = str(final / MODEL_FILE)
        if labels is not None:
            (staging / LABELS_FILE).write_text("\n".join(labels) + "\n", encoding="utf-8")
            changes.update(labels_path=str(final / LABELS_FILE), labels_file=LABELS_FILE)
        installed = replace(card, **changes)
        (staging / CARD_FILE).write_text(installed.to_toml(), encoding="utf-8")
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".removing-{card.name}-", dir=models_dir))
            final.rename(old / card.name)
        staging.rename(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    added = added_card(card.name, models_dir)
    assert added is not None
    return added


def remove_model(name: str, models_dir: Path) -> str:
    """Delete an added model's folder (even when its card cannot be read); bundled models
    are refused. Says what was removed."""
    bundled = bundled_name(name)
    if bundled is not None:
        raise UsageError(
            f"{name} is bundled with ICS ({bundled}) and cannot be removed (its prepared "
            f"files are in {models_dir / bundled}; `ics models prepare --force {bundled}` "
            "rebuilds them)"
        )
    check_name(name)
    folder = models_dir / name
    if not (folder / CARD_FILE).is_file():
        get_card(name, models_dir)  # ModelNotFound, naming the models there are
        raise ModelNotFound(f"{name} was not added with `ics models add` (see `ics models list`)")
    try:
        card = added_card(name, models_dir)
        what = f"{name} (version {card.version})" if card is not None else name
    except ConfigError as e:
        what = f"{name} (its card could not be read: {e})"
    trash = Path(tempfile.mkdtemp(prefix=f".removing-{name}-", dir=models_dir))
    folder.rename(trash / name)
    shutil.rmtree(trash, ignore_errors=True)
    return what


def add_remote(
    name: str,
    spec: str,
    *,
    labels: Path | None,
    models_dir: Path,
    options: RemoteOptions,
    fields: dict[str, Any],
    replace_existing: bool = False,
) -> ModelCard:
    """`ics models add NAME --sagemaker ... / --v2 ...`: the card checked against the endpoint
    (its metadata, one real inference of the sample photo, the labels' count), then written
    to `<models_dir>/<NAME>/` with its labels."""
    from .remote import FITTED, open_remote, remote_card

    check_new_name(name, models_dir, replace_existing=replace_existing)
    draft = remote_card(spec, name=name, labels=labels, **fields)
    draft = replace(
        draft,
        source={
            **draft.source,
            **({"labels": str(labels.resolve())} if labels is not None else {}),
            **added_stamp(),
        },
    )
    if labels is not None:
        if not labels.is_file():
            raise ModelRejected(f"labels file {labels} does not exist (or is not a file)")
        read_labels(labels)
    # What was not given is taken from the model's metadata (a v2 model taking tensors).
    fit = tuple(k for k in FITTED if fields.get(k) is None)
    runtime: Any = open_remote(draft, models_dir, options, fit=fit)
    try:
        card: ModelCard = runtime.card
        image = sample_photo()
        try:
            if runtime.takes == "bytes":
                runtime.predict_bytes([image], content_types=["image/jpeg"])
            else:
                from ..imaging import Limits, Preprocessor

                tensor, _ = Preprocessor(card, Limits())(image)
                runtime.predict(tensor[None])
        except (ModelError, EndpointUnavailable) as e:
            raise ModelRejected(f"{e} (classifying the sample photo, to check the model)") from None
        labels_named = card.labels
    finally:
        runtime.close()
    return install(replace(card, classes=None), None, labels_named, models_dir)
