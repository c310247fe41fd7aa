"""Bring your own model: a user's ONNX classifier added with `ics models add` and used by
name through `ics classify` and `ics serve`, as real processes.

The user's model is built here from a small real network: the bundled EfficientNet-Lite0
backbone with a new 3-class head (the ImageNet rows of espresso, tabby cat and tripod, so
it answers sensibly), exported with torch.onnx once per session at a small input size;
an NHWC export of the same network with the softmax inside checks that the card's layout
and outputs are honoured.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from cli import ics_process, pythonpath_with
from serving import serve_process

pytestmark = pytest.mark.slow

LABELS = ("espresso", "tabby", "tripod")
#: Their rows in the ImageNet-1k classifier.
IMAGENET_ROWS = [967, 281, 872]
SIZE = 160


@pytest.fixture(scope="session")
def user_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """model.onnx (NCHW, logits), nhwc.onnx (NHWC, probabilities) and labels.txt."""
    import torch

    from ics_service.models.prepare import load_torch_efficientnet_lite

    folder = tmp_path_factory.mktemp("user-model")
    net = load_torch_efficientnet_lite("efficientnet-lite0")
    head = torch.nn.Linear(net._fc.in_features, len(LABELS))
    with torch.no_grad():
        head.weight.copy_(net._fc.weight[IMAGENET_ROWS])
        head.bias.copy_(net._fc.bias[IMAGENET_ROWS])
    net._fc = head

    class Nhwc(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.net(x.permute(0, 3, 1, 2)), dim=1)

    def export(model: torch.nn.Module, shape: tuple[int, ...], path: Path) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (torch.zeros(*shape),),
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=["pixels"],
                output_names=["scores"],
                dynamic_axes={"pixels": {0: "batch"}, "scores": {0: "batch"}},
            )

    export(net, (1, 3, SIZE, SIZE), folder / "model.onnx")
    export(Nhwc().eval(), (1, SIZE, SIZE, 3), folder / "nhwc.onnx")
    (folder / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return {
        "onnx": folder / "model.onnx",
        "nhwc": folder / "nhwc.onnx",
        "labels": folder / "labels.txt",
    }


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh ICS_HOME of its own (models added here stay here)."""
    home = tmp_path / "home"
    home.mkdir()
    for var in list(os.environ):
        if (
            var.startswith("ICS_")
            and not var.startswith("ICS_TEST_")
            and var != "ICS_SKIP_POSTGRES"
        ):
            monkeypatch.delenv(var)
    monkeypatch.setenv("ICS_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    yield home


def run_ok(*args: str, env: dict[str, str] | None = None) -> str:
    proc = ics_process(*args, env=env)
    assert proc.returncode == 0, f"ics {' '.join(args)}: {proc.returncode}\n{proc.stderr}"
    return proc.stdout


def refused(*args: str) -> str:
    proc = ics_process(*args)
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc.stderr


def test_a_card_reads_back_from_its_toml_and_bad_fields_say_what_to_fix(tmp_path: Path) -> None:
    from ics_service.errors import ConfigError
    from ics_service.modelcard import ModelCard

    (tmp_path / "labels.txt").write_text("a\nb\n")
    card = ModelCard(
        name="m",
        version="1",
        description='quotes " and \\ and ü',
        input_size=96,
        layout="NHWC",
        scale=1 / 255,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        resize=110,
        resize_mode="squash",
        channels="BGR",
        threshold=0.8,
        labels_path=str(tmp_path / "labels.txt"),
        model_path=str(tmp_path / "model.onnx"),
        source={"sha256": "ab", "added_at": "2026-01-01T00:00:00Z"},
    )
    back = ModelCard.from_toml(card.to_toml(), tmp_path)
    assert back == replace(card, labels_file="labels.txt")  # the name of the file beside it
    assert back.labels == ("a", "b") and back.input_shape == (96, 96, 3)
    assert back.resize_size == 110
    with pytest.raises(ConfigError, match=r"layout must be one of NCHW, NHWC, not 'nhwc'"):
        ModelCard.from_toml('name = "m"\ninput_size = 96\nlayout = "nhwc"\n', tmp_path)
    with pytest.raises(ConfigError, match=r"unknown field\(s\) colour"):
        ModelCard.from_toml('name = "m"\ninput_size = 96\ncolour = 1\n', tmp_path)
    with pytest.raises(ConfigError, match=r"threshold must be at least 0 and at most 1"):
        ModelCard.from_toml('name = "m"\ninput_size = 96\nthreshold = 2\n', tmp_path)


def test_added_model_classifies_and_serves(
    home: Path, user_models: dict[str, Path], photos: Path
) -> None:
    out = run_ok(
        "models", "add", "barista", "--onnx", str(user_models["onnx"]),
        "--labels", str(user_models["labels"]), "--threshold", "0.6",
    )  # fmt: skip
    assert "added barista" in out
    folder = home / "models" / "barista"
    assert sorted(p.name for p in folder.iterdir()) == ["card.toml", "labels.txt", "model.onnx"]

    info = json.loads(run_ok("models", "info", "barista", "--json"))
    import hashlib

    digest = hashlib.sha256(user_models["onnx"].read_bytes()).hexdigest()
    assert info["source"]["sha256"] == digest
    assert info["version"] == digest[:12]
    assert info["input_size"] == SIZE  # taken from the model's input
    assert info["num_classes"] == 3 and info["threshold"] == 0.6
    assert info["origin"] == str(user_models["onnx"].resolve())
    assert run_ok("models", "info", "barista", "--labels").splitlines() == list(LABELS)
    listed = {d["name"]: d for d in json.loads(run_ok("models", "list", "--json"))}
    assert listed["barista"]["origin"] == str(user_models["onnx"].resolve())
    assert listed["efficientnet-lite0"]["origin"] == "bundled"

    # classify: the card's threshold is the default; a flag still wins.
    results = home / "r.jsonl"
    run_ok(
        "classify", str(photos), "--model", "barista", "-o", str(results), "--json",
    )  # fmt: skip
    rows = {Path(r["uri"]).name: r for r in map(json.loads, results.read_text().splitlines())}
    coffee = rows["coffee.jpg"]
    assert coffee["label"] == "espresso" and coffee["confidence"] > 0.9
    assert coffee["model"] == {"name": "barista", "version": digest[:12]}
    assert coffee["threshold"] == 0.6 and coffee["status"] == "SUCCEEDED"
    assert rows["chelsea.jpg"]["label"] == "tabby"
    assert {p["label"] for p in coffee["top_k"]} == set(LABELS)
    # A threshold of the environment (or a flag) wins over the card's: one that turns the
    # least confident photo's decision around.
    least = min(rows.values(), key=lambda r: r["confidence"])
    flip = least["confidence"] / 2 if least["status"] == "LOW_CONFIDENCE" else 1.0
    run_ok(
        "classify", least["uri"], "--model", "barista", "-o", str(results),
        env={"ICS_THRESHOLD": str(flip)},
    )  # fmt: skip
    (row,) = map(json.loads, results.read_text().splitlines())
    assert row["threshold"] == flip and row["status"] != least["status"], row
    shown = json.loads(run_ok("config", "show", "--json", env={"ICS_MODEL": "barista"}))
    assert shown["settings"]["threshold"] == {"value": 0.6, "source": "card barista"}

    # serve: a real HTTP request to a real process.
    with serve_process("--model", "barista", env={**os.environ}) as served:
        r = httpx.post(
            f"{served.url}/v1/classify",
            content=(photos / "coffee.jpg").read_bytes(),
            headers={"Content-Type": "image/jpeg"},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["label"] == "espresso" and doc["model"]["name"] == "barista"
        assert doc["threshold"] == 0.6
        assert doc["confidence"] == pytest.approx(coffee["confidence"], abs=1e-5)

    run_ok("models", "remove", "barista")
    assert not folder.exists()
    assert "unknown model 'barista'" in refused(
        "classify", str(photos / "coffee.jpg"), "-m", "barista"
    )


def test_layout_scale_and_outputs_are_honoured(
    home: Path, user_models: dict[str, Path], photos: Path
) -> None:
    labels = str(user_models["labels"])
    run_ok("models", "add", "base", "--onnx", str(user_models["onnx"]), "--labels", labels)
    # The same network fed NHWC, softmax inside; the layout is read from the model's input.
    proc = ics_process(
        "models", "add", "nhwc", "--onnx", str(user_models["nhwc"]), "--labels", labels,
        "--outputs", "probabilities",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "layout NHWC" in proc.stderr
    # The same preprocessing written as 0..1 pixels: (x/255 - 0.5) / (128/255).
    run_ok(
        "models", "add", "scaled", "--onnx", str(user_models["onnx"]), "--labels", labels,
        "--scale", "1/255", "--mean", "0.5", "--std", str(128 / 255),
    )  # fmt: skip
    # --like takes a registered card's preprocessing.
    run_ok(
        "models",
        "add",
        "like",
        "--like",
        "nhwc",
        "--onnx",
        str(user_models["nhwc"]),
        "--labels",
        labels,
    )
    assert json.loads(run_ok("models", "info", "like", "--json"))["layout"] == "NHWC"

    # A card.toml of its own, its files named relative to it.
    card = user_models["nhwc"].parent / "card.toml"
    card.write_text(
        'model_file = "nhwc.onnx"\nlabels_file = "labels.txt"\nlayout = "NHWC"\n'
        'outputs = "probabilities"\ninput_size = 160\nthreshold = 0.7\nversion = "2024.1"\n'
    )
    run_ok("models", "add", "carded", "--card", str(card))
    carded = json.loads(run_ok("models", "info", "carded", "--json"))
    assert (carded["layout"], carded["threshold"], carded["version"]) == ("NHWC", 0.7, "2024.1")
    assert carded["source"]["card"] == str(card)

    answers = {}
    for name in ("base", "nhwc", "scaled", "like", "carded"):
        out = home / f"{name}.jsonl"
        run_ok("classify", str(photos), "--model", name, "-o", str(out), "--json")
        answers[name] = {
            Path(r["uri"]).name: (r["label"], r["confidence"])
            for r in map(json.loads, out.read_text().splitlines())
        }
    for name in ("nhwc", "scaled", "like", "carded"):
        for photo, (label, confidence) in answers["base"].items():
            assert answers[name][photo][0] == label, (name, photo)
            assert answers[name][photo][1] == pytest.approx(confidence, abs=1e-4), (name, photo)


def small_onnx(folder: Path, what: str) -> Path:
    """A tiny real ONNX model: "nan" answers NaN for 3 classes (the square root of a negative
    number); "rank2" takes (N, 3) numbers instead of images."""
    import onnx
    from onnx import TensorProto, helper

    if what == "nan":
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])
        nodes = [
            helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=0),
            helper.make_node("Abs", ["m"], ["a"]),
            helper.make_node("Add", ["a", "one"], ["b"]),
            helper.make_node("Neg", ["b"], ["c"]),
            helper.make_node("Sqrt", ["c"], ["y"]),
        ]
        inits = [
            helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3]),
            helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
        ]
    else:
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
        nodes = [helper.make_node("Identity", ["x"], ["y"])]
        inits = []
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
    graph = helper.make_graph(nodes, what, [x], [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    path = folder / f"{what}.onnx"
    onnx.save(model, str(path))
    return path


def test_bad_models_are_refused_with_what_to_fix(
    home: Path, user_models: dict[str, Path], tmp_path: Path
) -> None:
    onnx, labels = str(user_models["onnx"]), str(user_models["labels"])
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("espresso\ntabby\n")
    err = refused("models", "add", "m", "--onnx", onnx, "--labels", str(wrong))
    assert "has 3 classes but the labels file" in err and "has 2 labels" in err

    not_onnx = tmp_path / "model.onnx"
    not_onnx.write_bytes(b"this is not a model\n")
    err = refused("models", "add", "m", "--onnx", str(not_onnx), "--labels", labels)
    assert "is not an ONNX model" in err

    err = refused("models", "add", "m", "--onnx", onnx, "--labels", labels, "--layout", "NHWC")
    assert "give --layout NCHW" in err
    err = refused("models", "add", "m", "--onnx", onnx, "--labels", labels, "--size", "224")
    assert f"give --size {SIZE}" in err
    err = refused(
        "models", "add", "m", "--onnx", onnx, "--labels", labels, "--outputs", "probabilities",
    )  # fmt: skip
    assert "give --outputs logits" in err
    err = refused(
        "models", "add", "m", "--onnx", str(small_onnx(tmp_path, "nan")), "--labels", labels
    )
    assert "NaN or infinite scores" in err
    err = refused(
        "models", "add", "m", "--onnx", str(small_onnx(tmp_path, "rank2")), "--labels", labels
    )
    assert "has rank 2" in err

    assert "bundled" in refused(
        "models", "add", "efficientnet-lite0", "--onnx", onnx, "--labels", labels
    )
    assert "bad model name" in refused("models", "add", "../up", "--onnx", onnx, "--labels", labels)
    assert "stands for every registered model" in refused(
        "models", "add", "All", "--onnx", onnx, "--labels", labels
    )
    assert "cannot be removed" in refused("models", "remove", "efficientnet-lite0")
    # Nothing was left behind by the refusals.
    assert not (home / "models").exists() or not any((home / "models").iterdir())

    run_ok("models", "add", "m", "--onnx", onnx, "--labels", labels)
    assert "--replace" in refused("models", "add", "m", "--onnx", onnx, "--labels", labels)
    run_ok(
        "models", "add", "m", "--onnx", onnx, "--labels", labels, "--replace", "--threshold", "0.5"
    )
    assert json.loads(run_ok("models", "info", "m", "--json"))["threshold"] == 0.5
    # One folder on a file system that does not tell case apart: refused on every system.
    err = refused("models", "add", "M", "--onnx", onnx, "--labels", labels, "--replace")
    assert "M differs only in case from the model m in" in err
    assert "`ics models add m --replace ...`" in err


# --- Python models ------------------------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def colour_images(folder: Path) -> Path:
    """Three PNGs, each of one colour, and a JPEG that is mostly green with a red square."""
    from PIL import Image

    folder.mkdir()
    for name, rgb in (("red", (220, 30, 20)), ("green", (10, 200, 40)), ("blue", (0, 20, 230))):
        Image.new("RGB", (120, 80), rgb).save(folder / f"{name}.png")
    img = Image.new("RGB", (300, 200), (20, 180, 30))
    img.paste((230, 0, 0), (0, 0, 60, 60))
    img.save(folder / "mostly-green.jpg", quality=90)
    return folder


def with_path(*folders: Path) -> dict[str, str]:
    return {"PYTHONPATH": pythonpath_with(*folders)}


def test_python_model_added_by_class_runs_through_the_engine_and_the_server(
    home: Path, tmp_path: Path
) -> None:
    images = colour_images(tmp_path / "colours")
    spec = "dominant_colour:DominantColour"
    out = run_ok("models", "add", "colours", "--python", spec, env=with_path(EXAMPLES))
    assert "added colours (python" in out
    info = json.loads(run_ok("models", "info", "colours", "--json"))
    assert info["kind"] == "python" and info["source"]["python"] == spec
    assert info["source"]["path"] == str(EXAMPLES)  # later runs import it from there
    assert info["input_size"] == 64 and info["threshold"] == 0.5
    assert run_ok("models", "info", "colours", "--labels").split() == ["red", "green", "blue"]

    # No PYTHONPATH now: the card says where the class is.
    results = home / "colours.jsonl"
    run_ok("classify", str(images), "--model", "colours", "-o", str(results))
    rows = {Path(r["uri"]).name: r for r in map(json.loads, results.read_text().splitlines())}
    assert {name: r["label"] for name, r in rows.items()} == {
        "red.png": "red",
        "green.png": "green",
        "blue.png": "blue",
        "mostly-green.jpg": "green",
    }
    assert all(r["status"] == "SUCCEEDED" and r["threshold"] == 0.5 for r in rows.values())
    assert rows["red.png"]["model"]["name"] == "colours"

    with serve_process("--model", "colours") as served:
        r = httpx.post(
            f"{served.url}/v1/classify",
            content=(images / "blue.png").read_bytes(),
            headers={"Content-Type": "image/png"},
            timeout=30,
        )
        assert r.status_code == 200, r.text
        assert r.json()["label"] == "blue"


def test_a_python_model_whose_module_changed_since_it_was_added_is_refused(
    home: Path, tmp_path: Path
) -> None:
    """Its results would name the version (the module's sha256) it was added with."""
    folder = tmp_path / "mine"
    folder.mkdir()
    module = folder / "my_colours.py"
    module.write_text((EXAMPLES / "dominant_colour.py").read_text())
    images = colour_images(tmp_path / "colours")
    run_ok("models", "add", "mine", "--python", "my_colours:DominantColour", env=with_path(folder))
    run_ok("classify", str(images / "red.png"), "--model", "mine", "--json")
    module.write_text(module.read_text() + "\n# changed\n")
    proc = ics_process("classify", str(images / "red.png"), "--model", "mine", "--json")
    assert proc.returncode == 2, proc.stderr
    assert f"model mine's file {module} has sha256" in proc.stderr
    assert "as when it was added: it was changed or replaced since" in proc.stderr
    assert "`ics models add mine --replace ...`" in proc.stderr


def test_python_model_of_an_entry_point_and_broken_classes(home: Path, tmp_path: Path) -> None:
    images = colour_images(tmp_path / "colours")
    # What `pip install` of a package declaring the entry point leaves on sys.path.
    site = tmp_path / "site"
    dist = site / "ics_colour_models-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ics-colour-models\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[ics.models]\ndominant-colour = dominant_colour:DominantColour\n"
    )
    (site / "broken_models.py").write_text(
        "import numpy as np\n"
        "class NaNs:\n"
        "    card = {'classes': ['a', 'b']}\n"
        "    def load(self, card): pass\n"
        "    def predict(self, batch): return np.full((len(batch), 2), np.nan)\n"
        "class Narrow:\n"
        "    card = {'classes': ['a', 'b', 'c']}\n"
        "    def load(self, card): pass\n"
        "    def predict(self, batch): return np.ones((len(batch), 2)) / 2\n"
        "class Crashes:\n"
        "    card = {'classes': ['a', 'b']}\n"
        "    def load(self, card): raise RuntimeError('no weights here')\n"
        "    def predict(self, batch): pass\n"
        "class NoPredict:\n"
        "    def load(self, card): pass\n"
    )
    env = with_path(site, EXAMPLES)
    listed = {
        d["name"]: d for d in json.loads(ics_process("models", "list", "--json", env=env).stdout)
    }
    assert listed["dominant-colour"]["kind"] == "python"
    assert listed["dominant-colour"]["source"]["distribution"] == "ics-colour-models"
    results = home / "ep.jsonl"
    proc = ics_process(
        "classify", str(images / "red.png"), "-m", "dominant-colour", "-o", str(results), env=env
    )
    assert proc.returncode == 0, proc.stderr
    (row,) = map(json.loads, results.read_text().splitlines())
    assert row["label"] == "red" and row["model"]["name"] == "dominant-colour"

    def refused_with(spec: str) -> str:
        proc = ics_process("models", "add", "x", "--python", spec, env=env)
        assert proc.returncode == 2, proc.stderr
        return proc.stderr

    assert "NaN or infinite scores" in refused_with("broken_models:NaNs")
    assert "answered 2 scores per image but has 3 labels" in refused_with("broken_models:Narrow")
    assert "failed to load: RuntimeError: no weights here" in refused_with("broken_models:Crashes")
    assert "has no predict method" in refused_with("broken_models:NoPredict")
    assert "cannot import 'no_such_module'" in refused_with("no_such_module:Model")
    assert "write it as module:Class" in refused_with("broken_models")


def test_labels_two_classes_share_are_added_with_a_warning(
    home: Path, user_models: dict[str, Path], tmp_path: Path
) -> None:
    # As ImageNet's own list does ("crane" twice): a fine-tune keeping its labels is added.
    dupes = tmp_path / "dupes.txt"
    dupes.write_text("espresso\ntabby\nespresso\n")
    proc = ics_process(
        "models", "add", "m", "--onnx", str(user_models["onnx"]), "--labels", str(dupes)
    )
    assert proc.returncode == 0, proc.stderr
    assert "label 'espresso' is the 1st and the 3rd label" in proc.stderr
    assert "label_index tells them apart" in proc.stderr
