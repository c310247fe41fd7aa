"""The default model: conversion fidelity, real-photo answers, model commands."""

from __future__ import annotations

import ast
import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import ics_service
from ics_service.cli import main
from ics_service.errors import ModelNotFound
from ics_service.imaging import Limits, Preprocessor
from ics_service.models import get_card
from ics_service.models.runtime import OnnxRuntime
from ics_service.samples import load_photo

PACKAGE = Path(ics_service.__path__[0])

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def _classify(runtime: OnnxRuntime, arr: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    x, _ = Preprocessor(runtime.card, Limits())(buf.getvalue())
    probs: np.ndarray = runtime.predict(x[None])[0]
    return probs


def test_onnx_matches_torch(runtime: OnnxRuntime) -> None:
    torch = pytest.importorskip("torch")
    from ics_service.models.prepare import load_torch_efficientnet_lite

    model = load_torch_efficientnet_lite("efficientnet-lite0")
    rng = np.random.default_rng(0)
    batch = rng.standard_normal((3, 3, 224, 224)).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(load_photo("coffee")).save(buf, "PNG")
    batch[0] = Preprocessor(runtime.card, Limits())(buf.getvalue())[0]
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    got = runtime.session.run(None, {runtime.input_name: batch})[0]
    assert np.abs(expected - got).max() < 1e-4


def test_espresso_is_confident(runtime: OnnxRuntime) -> None:
    probs = _classify(runtime, load_photo("coffee"))
    assert runtime.card.labels[int(probs.argmax())] == "espresso"
    assert probs.max() > 0.94
    assert probs.sum() == pytest.approx(1.0, abs=1e-4)


def test_tabby_cat_is_a_cat(runtime: OnnxRuntime) -> None:
    probs = _classify(runtime, load_photo("chelsea"))
    assert int(probs.argmax()) in CAT_CLASSES
    assert probs[list(CAT_CLASSES)].sum() > 0.8


def test_card_drives_preprocessing() -> None:
    card = get_card("efficientnet-lite0")
    assert card.input_size == 224
    assert card.resize_size == 256
    assert len(card.labels) == 1000
    assert card.labels[967] == "espresso"


def test_unknown_model_names_the_known_ones() -> None:
    with pytest.raises(ModelNotFound, match="efficientnet-lite0"):
        get_card("resnet-9000")


def test_models_list_and_info(ics_home: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["models", "list", "--json"])
    assert res.exit_code == 0, res.output
    docs = {d["name"]: d for d in json.loads(res.output)}
    assert docs["efficientnet-lite0"]["prepared"] is True

    res = runner.invoke(main, ["models", "info", "efficientnet-lite0", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert Path(info["path"]).is_file()
    assert info["input_size"] == 224 and info["mean"] == [127.5] * 3 and info["std"] == [128.0] * 3

    res = runner.invoke(main, ["models", "info", "nope"])
    assert res.exit_code == 2
    assert "unknown model 'nope'" in res.output


def test_models_prepare_builds_into_a_fresh_home(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        main, ["models", "prepare", "efficientnet-lite0", "--home", str(tmp_path)]
    )
    assert res.exit_code == 0, res.output
    onnx_file = tmp_path / "models" / "efficientnet-lite0" / "1" / "model.onnx"
    assert onnx_file.stat().st_size > 1_000_000
    meta = json.loads((onnx_file.parent / "model.json").read_text())
    assert meta["card"]["name"] == "efficientnet-lite0"
    res = CliRunner().invoke(
        main, ["models", "prepare", "efficientnet-lite0", "--home", str(tmp_path)]
    )
    assert "already prepared" in res.output


def _import_graph() -> dict[str, set[str]]:
    """Module → the ics_service modules it imports, at the top or inside functions."""
    files = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph: dict[str, set[str]] = {}
    for name, f in files.items():
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from .models import get_card` names a module or a name in one.
                targets = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def test_models_modules_import_without_cycles() -> None:
    # Lazy imports count: prepare reached quantize lazily while quantize imported runtime,
    # which imported prepare; such a cycle breaks as soon as one import moves to the top.
    graph = _import_graph()
    assert "ics_service.models.quantize" in graph
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep) :], dep])
            elif dep not in state:
                visit(dep)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    through_models = [c for c in cycles if any(m.startswith("ics_service.models") for m in c)]
    assert not through_models, "\n".join(" -> ".join(c) for c in through_models)


def test_running_a_model_needs_nothing_that_builds_one() -> None:
    graph = _import_graph()
    seen: set[str] = set()
    todo = ["ics_service.models.runtime"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph[module])
    assert not seen & {"ics_service.models.prepare", "ics_service.models.quantize"}, seen
