"""Models' edge cases found in review: real (tiny) ONNX models built with onnx.helper, real
Python model classes imported from files, the real registry and `ics models` commands."""

from __future__ import annotations

import importlib.metadata
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ics_service.errors import ModelNotPrepared
from ics_service.modelcard import ModelCard
from ics_service.models.added import AddRequest, ModelRejected, add_model


def two_output_onnx(folder: Path) -> Path:
    """(N, 3, 16, 16) → "scores": softmax of the channel means (N, 3), and "features":
    the means themselves (N, 3)."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])
    nodes = [
        helper.make_node("ReduceMean", ["x", "axes"], ["features"], keepdims=0),
        helper.make_node("Softmax", ["features"], ["scores"], axis=1),
    ]
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])
    outs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 3])
        for n in ("scores", "features")
    ]
    graph = helper.make_graph(nodes, "two-outputs", [x], outs, initializer=[axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    path = folder / "two.onnx"
    onnx.save(model, str(path))
    return path


def test_an_onnx_model_with_two_outputs_is_refused_at_add_and_at_open(tmp_path: Path) -> None:
    from ics_service.models.runtime import OnnxRuntime

    onnx = two_output_onnx(tmp_path)
    labels = tmp_path / "labels.txt"
    labels.write_text("r\ng\nb\n")
    req = AddRequest("two", onnx=onnx, labels=labels, fields={"outputs": "probabilities"})
    with pytest.raises(ModelRejected, match=r"has 2 outputs \(scores .*, features .*\)"):
        add_model(req, tmp_path / "models")
    assert not (tmp_path / "models" / "two").exists()

    # A card written by hand, not by `ics models add`: refused when opened, not per item.
    card = ModelCard(
        name="two", version="1", description="", input_size=16, outputs="probabilities",
        labels_path=str(labels), model_path=str(onnx),
    )  # fmt: skip
    with pytest.raises(ModelNotPrepared, match=r"has 2 outputs .*--replace"):
        OnnxRuntime(card, onnx)


@pytest.fixture
def on_path(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "site"
    folder.mkdir()
    sys.path.insert(0, str(folder))
    try:
        yield folder
    finally:
        sys.path.remove(str(folder))


def test_an_entry_point_class_whose_card_is_a_model_card(on_path: Path) -> None:
    from ics_service.models.python import entry_point_card, open_python_model

    (on_path / "review_card_model.py").write_text(
        "import numpy as np\n"
        "from ics_service.modelcard import ModelCard\n"
        "class Halves:\n"
        "    card = ModelCard(name='halves', version='2', description='two halves',\n"
        "                     input_size=32, classes=('left', 'right'), outputs='probabilities')\n"
        "    def load(self, card): pass\n"
        "    def predict(self, batch): return np.full((len(batch), 2), 0.5)\n"
    )
    ep = importlib.metadata.EntryPoint("halves", "review_card_model:Halves", "ics.models")
    card = entry_point_card(ep)
    assert (card.kind, card.version, card.input_size) == ("python", "2", 32)
    assert card.labels == ("left", "right")
    assert card.source["python"] == "review_card_model:Halves"
    runtime = open_python_model(card)
    try:
        import numpy as np

        assert runtime.predict(np.zeros((3, 3, 32, 32), np.float32)).shape == (3, 2)
    finally:
        runtime.close()


def test_a_python_models_folder_is_searched_after_installed_packages(tmp_path: Path) -> None:
    from ics_service.models.python import open_python_model

    folder = tmp_path / "code"
    folder.mkdir()
    # A module named like a standard library one, next to the model: it must not shadow it.
    (folder / "colorsys.py").write_text("raise RuntimeError('shadowed the standard library')\n")
    (folder / "review_path_model.py").write_text(
        "import numpy as np\n"
        "class One:\n"
        "    def load(self, card): pass\n"
        "    def predict(self, batch): return np.ones((len(batch), 1))\n"
    )
    card = ModelCard(
        name="one", version="1", description="", input_size=8, kind="python",
        classes=("only",), outputs="probabilities",
        source={"python": "review_path_model:One", "path": str(folder)},
    )  # fmt: skip
    sys.modules.pop("colorsys", None)
    try:
        open_python_model(card).close()
        assert sys.path.index(str(folder)) == len(sys.path) - 1
        import colorsys

        assert colorsys.__file__ is not None and str(folder) not in colorsys.__file__
    finally:
        sys.path.remove(str(folder))


def test_an_unreadable_added_card_is_listed_as_such_and_hides_no_other_model(
    tmp_path: Path,
) -> None:
    import json

    from cli import ics_process

    home = tmp_path / "home"
    models = home / "models"
    (models / "garbled").mkdir(parents=True)
    (models / "garbled" / "card.toml").write_text("name = \n")
    (models / "no-labels").mkdir()
    (models / "no-labels" / "card.toml").write_text(
        "name = 'no-labels'\ninput_size = 16\nlabels_file = 'labels.txt'\nmodel_file = 'm.onnx'\n"
    )
    env = {"ICS_HOME": str(home)}
    proc = ics_process("models", "list", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    docs = {d["name"]: d for d in json.loads(proc.stdout)}
    assert "efficientnet-lite0" in docs
    assert "not valid TOML" in docs["garbled"]["unreadable"]
    assert "labels.txt does not exist" in docs["no-labels"]["unreadable"]
    proc = ics_process("models", "list", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "unreadable" in proc.stdout

    proc = ics_process("models", "info", "nosuch", env=env)
    assert proc.returncode == 2, proc.stderr
    assert "unknown model 'nosuch'; known models: efficientnet-lite0" in proc.stderr
    assert "ignoring the added model garbled" in proc.stderr
    proc = ics_process("models", "info", "garbled", env=env)
    assert proc.returncode == 2 and "not valid TOML" in proc.stderr


def test_an_added_models_files_stay_in_its_folder_and_its_onnx_file_is_the_one_added(
    tmp_path: Path,
) -> None:
    from cli import ics_process
    from ics_service.errors import ConfigError
    from ics_service.models.factory import load_runtime
    from ics_service.models.registry import added_card

    models = tmp_path / "home" / "models"
    labels = tmp_path / "labels.txt"
    labels.write_text("r\ng\nb\n")
    onnx = two_output_onnx(tmp_path)  # any ONNX file: it is replaced below
    (tmp_path / "outside.txt").write_text("secret\n")
    folder = models / "m"
    folder.mkdir(parents=True)
    (folder / "card.toml").write_text(
        "name = 'm'\ninput_size = 16\nlabels_file = '../../../outside.txt'\n"
    )
    with pytest.raises(ConfigError, match=r"labels_file is .*outside.txt, outside the model's"):
        added_card("m", models)
    (folder / "card.toml").write_text(
        f"name = 'm'\ninput_size = 16\nlabels_file = 'labels.txt'\nmodel_file = '{onnx}'\n"
    )
    (folder / "labels.txt").write_text("r\ng\nb\n")
    with pytest.raises(ConfigError, match=r"model_file is .*two\.onnx, outside the model's"):
        added_card("m", models)

    # Added for real, then its file replaced behind ICS's back.
    import shutil

    shutil.rmtree(folder)
    single = tmp_path / "single.onnx"
    _single_output_onnx(single)
    add_model(
        AddRequest("m", onnx=single, labels=labels, fields={"outputs": "probabilities"}), models
    )
    card = added_card("m", models)
    assert card is not None
    import numpy as np

    assert load_runtime(card, models).predict(np.zeros((1, 3, 16, 16), np.float32)).shape == (1, 3)
    shutil.copyfile(onnx, folder / "model.onnx")
    with pytest.raises(ModelNotPrepared, match=r"model\.onnx has sha256 .*ics models add m --"):
        load_runtime(card, models)
    image = tmp_path / "one.png"
    from PIL import Image

    Image.new("RGB", (20, 20), (200, 10, 10)).save(image)
    proc = ics_process(
        "classify", str(image), "-m", "m", "-o", str(tmp_path / "out.jsonl"),
        env={"ICS_HOME": str(tmp_path / "home")},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "was changed or replaced since" in proc.stderr


def _single_output_onnx(path: Path, *, sqrt_of_negative: bool = False) -> None:
    """(N, 3, 16, 16) → the softmax of the channel means, or with `sqrt_of_negative` the
    square root of -(1 + |mean|): NaN."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])
    nodes = [
        helper.make_node("ReduceMean", ["x", "axes"], ["m"], keepdims=0),
        helper.make_node("Softmax", ["m"], ["scores"], axis=1),
    ]
    if sqrt_of_negative:
        nodes[1:] = [
            helper.make_node("Abs", ["m"], ["a"]),
            helper.make_node("Add", ["a", "one"], ["p"]),
            helper.make_node("Neg", ["p"], ["n"]),
            helper.make_node("Sqrt", ["n"], ["scores"]),
        ]
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    out = helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 3])
    graph = helper.make_graph(nodes, "one-output", [x], [out], initializer=[axes, one])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(path))


def test_device_applies_to_onnx_models_only(tmp_path: Path) -> None:
    import json

    import onnxruntime
    from PIL import Image

    from cli import ics_process, pythonpath_with
    from serving import serve_process

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: --device cuda would not be refused")
    examples = Path(__file__).resolve().parent.parent / "examples"
    env = {"ICS_HOME": str(tmp_path / "home")}
    path_env = {**env, "PYTHONPATH": pythonpath_with(examples)}
    proc = ics_process("models", "add", "colours", "--python", "dominant_colour:DominantColour",
                       env=path_env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    image = tmp_path / "red.png"
    Image.new("RGB", (40, 30), (220, 30, 20)).save(image)
    out = tmp_path / "out.jsonl"
    proc = ics_process(
        "classify", str(image), "-m", "colours", "--device", "cuda", "-o", str(out), env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert "--device cuda does not apply to model colours: it is a python model" in proc.stderr
    assert json.loads(out.read_text())["label"] == "red"
    # An ONNX model still says the device cannot be used (exit 4).
    proc = ics_process("classify", str(image), "--device", "cuda", "-o", str(out), env=env)
    assert proc.returncode == 4, proc.stderr
    assert "has no CUDAExecutionProvider" in proc.stderr
    # `ics serve` alike: the Python model is served, with the same warning.
    with serve_process("--model", "colours", "--device", "cuda", env={**os.environ, **env}) as s:
        assert "--device cuda does not apply to model colours" in s.output()


def test_every_runtime_checks_its_scores_as_the_card_says(tmp_path: Path, on_path: Path) -> None:
    """One check (models/answers.check_scores) for ONNX, Python and remote answers and for
    `ics models add`: finite scores, in 0..1 unless logits, rows summing to 1 for
    probabilities."""
    import numpy as np

    from ics_service.errors import InferenceError
    from ics_service.models.python import open_python_model
    from ics_service.models.runtime import OnnxRuntime

    (on_path / "review_scores_model.py").write_text(
        "import numpy as np\n"
        "class Threes:\n"
        "    def load(self, card): pass\n"
        "    def predict(self, batch): return np.full((len(batch), 2), 3.0)\n"
    )
    python_card = ModelCard(
        name="threes", version="1", description="", input_size=8, kind="python",
        classes=("a", "b"), outputs="sigmoid", source={"python": "review_scores_model:Threes"},
    )  # fmt: skip
    runtime = open_python_model(python_card)
    with pytest.raises(InferenceError, match=r"model threes answered scores from 3 to 3.*sigmoid"):
        runtime.predict(np.zeros((2, 3, 8, 8), np.float32))

    # An ONNX model whose probabilities are NaN fails its batch instead of deciding on NaN.
    nan = tmp_path / "nan.onnx"
    _single_output_onnx(nan, sqrt_of_negative=True)
    onnx_card = ModelCard(
        name="nan", version="1", description="", input_size=16, classes=("r", "g", "b"),
        outputs="probabilities", model_path=str(nan),
    )  # fmt: skip
    with pytest.raises(InferenceError, match="model nan answered NaN or infinite scores"):
        OnnxRuntime(onnx_card, nan).predict(np.ones((2, 3, 16, 16), np.float32))


def test_a_bundled_models_name_in_another_case_is_refused(tmp_path: Path) -> None:
    """On a file system that does not tell case apart, EfficientNet-Lite0's folder is the
    bundled model's: adding or removing it must not touch that."""
    from ics_service.errors import UsageError
    from ics_service.models.added import remove_model

    models = tmp_path / "models"
    onnx = tmp_path / "single.onnx"
    _single_output_onnx(onnx)
    labels = tmp_path / "labels.txt"
    labels.write_text("r\ng\nb\n")
    req = AddRequest(
        "EfficientNet-Lite0", onnx=onnx, labels=labels, replace_existing=True,
        fields={"outputs": "probabilities"},
    )  # fmt: skip
    with pytest.raises(UsageError, match=r"bundled model's name \(efficientnet-lite0"):
        add_model(req, models)
    with pytest.raises(UsageError, match=r"bundled with ICS \(efficientnet-lite0\)"):
        remove_model("EFFICIENTNET-LITE0", models)
    assert not models.exists() or not any(models.iterdir())
