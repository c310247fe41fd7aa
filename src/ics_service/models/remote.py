"""Remote models: the cards of `sagemaker:` and `v2:` models (ad hoc, from a spec such as
`sagemaker:ENDPOINT/VARIANT` or `v2:http://HOST:PORT/v2/models/NAME`, or added by name with
`ics models add NAME --sagemaker ... / --v2 ...`), and opening their runtimes.

A remote model's labels come from a labels file, or from the endpoint itself where it names
them: a SageMaker answer with `labels`, a v2 server with the classification extension (ICS,
Triton with a labels file). Labels learned so are the card's `classes` while it runs, and
an added model's labels file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import (
    ConfigError,
    EndpointUnavailable,
    EnvironmentUnavailable,
    ModelError,
    UsageError,
)
from ..modelcard import REMOTE_PREFIXES, ModelCard

if TYPE_CHECKING:
    from ..config import Settings
    from .runtime import ModelRuntime

#: The card kinds served by a remote endpoint, and the prefix of each one's ad hoc spec.
PREFIXES = dict(zip(("sagemaker", "v2"), REMOTE_PREFIXES, strict=True))
#: The input size a remote card gets when nothing says otherwise: the engine decodes every
#: image at it (a check that it decodes) before sending the encoded bytes.
DEFAULT_INPUT_SIZE = 224


@dataclass(frozen=True)
class RemoteOptions:
    """The settings remote runtimes run with (read once from the settings, passed down)."""

    timeout_s: float = 30.0
    concurrency: int = 8

    @classmethod
    def of(cls, settings: Settings) -> RemoteOptions:
        return cls(timeout_s=settings.remote_timeout_s, concurrency=settings.remote_concurrency)


def is_remote_spec(name: str) -> bool:
    """Whether a model name is an ad hoc remote model (`sagemaker:...`, `v2:...`)."""
    return name.startswith(tuple(PREFIXES.values()))


def remote_source(spec: str) -> tuple[str, dict[str, Any]]:
    """(kind, source) of a remote spec; UsageError saying what is wrong with it."""
    if spec.startswith(PREFIXES["sagemaker"]):
        from .sagemaker import parse_spec

        endpoint = parse_spec(spec)
        source: dict[str, Any] = {"spec": str(endpoint), "endpoint": endpoint.name}
        if endpoint.variant:
            source["variant"] = endpoint.variant
        if endpoint.target_model:
            source["target_model"] = endpoint.target_model
        return "sagemaker", source
    if spec.startswith(PREFIXES["v2"]):
        from .v2remote import parse_url

        model = parse_url(spec)
        return "v2", {"spec": PREFIXES["v2"] + model.url, "url": model.url}
    raise UsageError(
        f"{spec!r} is not a remote model: write sagemaker:ENDPOINT[/VARIANT] or "
        "v2:http(s)://HOST:PORT/v2/models/NAME"
    )


def remote_card(
    spec: str, *, name: str | None = None, labels: Path | str | None = None, **fields: Any
) -> ModelCard:
    """The card of a remote model: `name` (default: the spec itself, for an ad hoc model),
    labels from `labels` (or, when None, from the endpoint once it is opened), and any other
    card fields given (a threshold, and for a v2 model taking tensors its preprocessing)."""
    kind, source = remote_source(spec)
    if name is None:
        source["ad_hoc"] = True
    values: dict[str, Any] = {
        "name": name or source["spec"],
        "version": source.get("variant", "endpoint") if kind == "sagemaker" else "1",
        "description": f"{'SageMaker endpoint' if kind == 'sagemaker' else 'v2 model'} "
        f"{source['spec'].partition(':')[2]}",
        "input_size": DEFAULT_INPUT_SIZE,
        "outputs": "probabilities",
        **{k: v for k, v in fields.items() if v is not None},
        "kind": kind,
        "labels_file": "",
        "labels_path": None if labels is None else str(Path(labels).resolve()),
        "source": source,
    }
    if kind == "v2":
        from .v2remote import parse_url

        values["version"] = fields.get("version") or parse_url(source["url"]).version or "1"
    return ModelCard(**values)


#: The fields of a v2 card that the model's metadata can say (a tensor input's size, layout).
FITTED = ("input_size", "layout")


def open_remote(
    card: ModelCard, models_dir: Path, options: RemoteOptions, *, fit: Sequence[str] = ()
) -> ModelRuntime:
    """The runtime of a remote card, its labels learned from the endpoint when the card has
    no labels file (ConfigError when the endpoint cannot name them). The `fit` fields of a
    v2 card (all of FITTED for an ad hoc one) are taken from the model's metadata first."""
    runtime: Any
    if card.kind == "sagemaker":
        from .sagemaker import SageMakerRuntime, endpoint_of

        endpoint = endpoint_of(
            card.source["endpoint"], card.source.get("variant"), card.source.get("target_model")
        )
        runtime = SageMakerRuntime(
            card, endpoint, timeout_s=options.timeout_s, concurrency=options.concurrency
        )
    else:
        from .v2remote import V2Runtime, parse_url

        runtime = V2Runtime(card, parse_url(card.source["url"]), timeout_s=options.timeout_s)
    try:
        fit = FITTED if card.source.get("ad_hoc") else fit
        if fit:
            runtime.card = card = _fitted(runtime, card, fit)
        if card.labels_path is None and card.classes is None:
            runtime.card = replace(card, classes=tuple(learn_labels(runtime, card)))
        if card.kind == "v2":
            runtime.check_card(runtime.card)
    except BaseException:
        runtime.close()
        raise
    return runtime  # type: ignore[no-any-return]


def _fitted(runtime: Any, card: ModelCard, fit: Sequence[str] = FITTED) -> ModelCard:
    """A v2 card fitted to what the model's metadata says of the `fit` fields: its input's
    size and layout (a tensor input)."""
    if card.kind != "v2":
        return card
    meta = runtime.meta
    changes: dict[str, Any] = {}
    if meta.input_size is not None:
        said = {"input_size": meta.input_size, "layout": meta.layout}
        changes.update({k: v for k, v in said.items() if k in fit})
    return replace(card, **changes) if changes else card


def learn_labels(runtime: Any, card: ModelCard) -> list[str]:
    """The labels an endpoint names itself, asked with one inference of the sample photo;
    ConfigError saying to give a labels file when it does not name them."""
    from ..samples import sample_photo

    where = runtime.endpoint.describe() if card.kind == "sagemaker" else runtime.where
    try:
        if card.kind == "sagemaker":
            classes, labels = runtime.labels_of_endpoint(sample_photo())
        else:
            labels = runtime.labels_of_server(sample_photo())
            classes = runtime.meta.classes
    except EndpointUnavailable as e:
        raise EnvironmentUnavailable(
            f"{e}; ICS asks it for its labels before it classifies (or give --labels FILE)"
        ) from None
    except ModelError as e:
        raise ConfigError(f"{e}; give its labels file with --labels FILE") from None
    if not labels:
        count = f" ({classes} classes)" if classes else ""
        raise ConfigError(
            f"{where} answers bare probabilities{count} and names no classes: give its "
            f"labels file, one class a line, with --labels FILE (model {card.name})"
        )
    return list(labels)
