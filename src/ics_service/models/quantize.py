"""INT8 variants of a model: onnxruntime static quantization, calibrated on real photos.

A quantized model is a card whose `build` is ``{"kind": "quantize", "base": NAME, ...}``
(the fields of `QuantizeOptions`). `ics models prepare` builds it from the base model's
ONNX file, preparing that first when it is missing: `quant_pre_process` (shape inference,
graph optimisation), then `quantize_static` in QDQ format with per-channel weights and
activation ranges calibrated on varied real photos, then (with `gptq`) better int8 weights.

The photos are scikit-image's bundled ones (`ics_service.samples`), varied deterministically
by crops, flips, scales, rotations, colour, brightness, blur and JPEG quality, and fed
through the card's own `Preprocessor`, as the service feeds the model. Calibration and
evaluation corpora come from separate random streams (`CALIBRATION`, `EVALUATION`), so a
model is never judged on the photos it was calibrated on. `top1_agreement` compares two
runtimes on any corpus; the benchmarks print it.

What was measured on a 2-core AMD EPYC with AVX2 and no VNNI (top-1 agreement with FP32
on 1,000 evaluation photos; `python -m ics_service.models.quantize` measures it):

* Plain `quantize_static` (QDQ, per-channel, MinMax on 256 varied photos): 63.5 %;
  Entropy or Percentile calibration: 63.5-64 %.
* Without VNNI, onnxruntime multiplies uint8 activations by int8 weights with
  `vpmaddubsw`, which adds neighbouring products into a saturating int16. The same QDQ
  model run in float (no saturation) agrees on 84 %: saturation costs about 20 points.
  7-bit weights (`reduce_range`) avoid it; uint8 weights (U8U8 kernels) avoid it too but
  run at 1.1x FP32; 7-bit activations, or weights narrowed so that no calibrated pair can
  saturate, cost more than 7-bit weights.
* This model's top-1 is fragile on such photos (median FP32 confidence 0.37): noise of
  ±0.5 grey level on the input changes it on 4.6 % of them, and the int8 input (which
  cannot hold (x - 127.5) / 128 exactly) on 6.4 %. The first layers are also the most
  sensitive to weight rounding (block 0's depthwise weights alone: 87 %). They run no
  faster in int8 here, so `float_prefix` keeps the first three convolutions in FP32.
* Round-to-nearest weights are then the largest error left: GPTQ (`gptq`) takes the
  float-run agreement from 91 % to 96 % with 8-bit weights.
* Chosen (the registry's card): float_prefix 3, GPTQ with act order, 7-bit GEMM weights,
  MinMax: 94.7 % (94.8 % on the benchmark corpus), the FP32 top-1 always in its top 5.
  Percentile 99.99 or batch-mean ranges moved it by about ±1 point (within the noise of
  the calibration sample) at up to several times the build time.
* Throughput on pre-decoded tensors is 1.4-1.6x FP32 at batch 1-16, as for the plain
  all-int8 model: int8 depthwise convolutions gain only 1.1-1.5x over FP32 here.
* `nodes_to_exclude` alone does not keep a node in FP32 when its input is quantized:
  onnxruntime's WeightBiasQuantization pass quantizes its weights per tensor at load time
  (and accuracy drops); exclude the producers of its input too, as `float_prefix` does.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import logging
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from ..errors import ModelNotPrepared
from .card import ModelCard
from .runtime import ModelRuntime

log = logging.getLogger(__name__)

#: Streams of the photo corpora: the same seed never gives the same images to both.
CALIBRATION = 0
EVALUATION = 1

#: Calibration runs the model on batches of this many images, a few batches at a time.
CALIBRATION_BATCH = 8
_CALIBRATION_SLICE = 4

SAMPLES_HINT = "pip install 'ics-service[samples]'"
CONVERT_HINT = "pip install 'ics-service[convert]'"


@functools.cache
def _source_photo(name: str) -> Image.Image:
    from ..samples import load_photo

    return Image.fromarray(load_photo(name))


def _source_names(photos: Sequence[str] | None) -> tuple[str, ...]:
    if photos is not None:
        return tuple(photos)
    try:
        import skimage  # noqa: F401
    except ImportError:
        raise ModelNotPrepared(
            f"calibrating a quantized model needs the sample photos: {SAMPLES_HINT}"
        ) from None
    from ..samples import PHOTOS

    return PHOTOS


def augment(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    """One random variation of a photo: rotation, crop, flip, scale, colour, sharpness."""
    img = photo
    w, h = img.size
    if rng.random() < 0.4:
        # Rotate, then keep only the inner rectangle, so no corner is filled.
        angle = float(rng.uniform(-25.0, 25.0))
        img = img.rotate(angle, resample=Image.Resampling.BILINEAR)
        a = abs(np.deg2rad(angle))
        shrink = 1.0 / (np.cos(a) + np.sin(a) * max(w, h) / min(w, h))
        cw, ch = w * shrink, h * shrink
        img = img.crop(((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2))
        w, h = img.size
    # A random crop of 20–100 % of the area, aspect ratio 3:4 to 4:3 (as in Inception).
    area = w * h * float(rng.uniform(0.2, 1.0))
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    cw = min(w, round(np.sqrt(area * aspect)))
    ch = min(h, round(np.sqrt(area / aspect)))
    left = int(rng.integers(0, w - cw + 1))
    top = int(rng.integers(0, h - ch + 1))
    img = img.crop((left, top, left + cw, top + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # Scale: the shorter side from a thumbnail to a large photo.
    side = float(rng.uniform(160, 720))
    scale = side / min(cw, ch)
    img = img.resize(
        (max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.BILINEAR
    )
    img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.6, 1.4)))
    img = ImageEnhance.Contrast(img).enhance(float(rng.uniform(0.6, 1.4)))
    if rng.random() < 0.1:
        img = img.convert("L").convert("RGB")
    else:
        img = ImageEnhance.Color(img).enhance(float(rng.uniform(0.5, 1.5)))
    if rng.random() < 0.3:
        # A colour cast: scale one channel.
        arr = np.asarray(img, dtype=np.float32)
        arr[..., int(rng.integers(0, 3))] *= float(rng.uniform(0.8, 1.2))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    r = rng.random()
    if r < 0.15:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
    elif r < 0.3:
        img = ImageEnhance.Sharpness(img).enhance(float(rng.uniform(1.5, 2.5)))
    return img


def varied_photos(
    count: int, seed: int, *, stream: int = EVALUATION, photos: Sequence[str] | None = None
) -> Iterator[bytes]:
    """`count` JPEGs, each a different random variation of a real photo; deterministic.

    `stream` (CALIBRATION or EVALUATION) separates the corpora drawn with one seed.
    """
    names = _source_names(photos)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(stream,)))
    order = rng.permutation(len(names))
    for i in range(count):
        # Every photo equally often, in a shuffled order.
        name = names[int(order[i % len(names)])]
        img = augment(_source_photo(name), rng)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(rng.integers(60, 96)))
        yield buf.getvalue()


def photo_batches(
    card: ModelCard,
    count: int,
    seed: int,
    *,
    stream: int = EVALUATION,
    batch_size: int = 16,
    photos: Sequence[str] | None = None,
) -> Iterator[np.ndarray]:
    """The model's inputs (N, 3, H, W) for `varied_photos`, in batches, via the card's
    preprocessing."""
    yield from preprocess_batches(
        card, varied_photos(count, seed, stream=stream, photos=photos), batch_size=batch_size
    )


def preprocess_batches(
    card: ModelCard, images: Iterable[bytes], *, batch_size: int = 16
) -> Iterator[np.ndarray]:
    """Encoded images → the model's normalised input, batch_size at a time."""
    from ..imaging import Limits, Preprocessor

    pre = Preprocessor(card, Limits())
    batch: list[np.ndarray] = []
    for data in images:
        batch.append(pre(data)[0])
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


# --- agreement ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Agreement:
    """How often a candidate model gives the reference model's answer."""

    images: int
    #: Images on which both models' top-1 class is the same.
    top1: int
    #: Images on which the reference's top-1 class is in the candidate's top 5.
    top5: int
    #: Mean over images of the largest absolute difference between the two probability vectors.
    mean_max_prob_diff: float

    @property
    def top1_rate(self) -> float:
        return self.top1 / self.images if self.images else float("nan")

    @property
    def top5_rate(self) -> float:
        return self.top5 / self.images if self.images else float("nan")

    def __str__(self) -> str:
        return (
            f"top-1 agreement {self.top1_rate:.2%} ({self.top1}/{self.images}), "
            f"reference top-1 in top-5 {self.top5_rate:.2%}, "
            f"mean max |Δp| {self.mean_max_prob_diff:.4f}"
        )


def top1_agreement(
    reference: ModelRuntime, candidate: ModelRuntime, batches: Iterable[np.ndarray]
) -> Agreement:
    """Run both runtimes on every batch of inputs (N, 3, H, W) and compare their answers."""
    images = top1 = top5 = 0
    diff = 0.0
    for batch in batches:
        ref = reference.predict(batch)
        cand = candidate.predict(batch)
        ref_top = ref.argmax(axis=1)
        cand_top5 = np.argpartition(-cand, 5, axis=1)[:, :5]
        images += len(batch)
        top1 += int((cand.argmax(axis=1) == ref_top).sum())
        top5 += int((cand_top5 == ref_top[:, None]).any(axis=1).sum())
        diff += float(np.abs(ref - cand).max(axis=1).sum())
    return Agreement(images, top1, top5, diff / images if images else float("nan"))


def agreement_on_files(
    reference: ModelRuntime,
    candidate: ModelRuntime,
    paths: Iterable[Path],
    *,
    batch_size: int = 16,
) -> Agreement:
    """`top1_agreement` on image files, preprocessed with the reference's card."""
    images = (p.read_bytes() for p in paths)
    return top1_agreement(
        reference,
        candidate,
        preprocess_batches(reference.card, images, batch_size=batch_size),
    )


# --- building -------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizeOptions:
    """How a quantized model is built; a card's `build` dict spells the same fields."""

    #: Calibration of the activation ranges: "minmax", "entropy" or "percentile".
    method: str = "minmax"
    #: Varied photos (calibration stream) the ranges are calibrated on, and their seed.
    calibration_images: int = 256
    seed: int = 0
    #: Percentile for method "percentile".
    percentile: float = 99.999
    #: For "minmax": each range is the mean over batches of `calibration_batch` photos of
    #: the batch's min and max, instead of the extremes over all photos.
    batch_mean_ranges: bool = False
    calibration_batch: int = CALIBRATION_BATCH
    per_channel: bool = True
    #: 7-bit weights everywhere: no u8×s8 saturation on CPUs without VNNI.
    reduce_range: bool = False
    #: 7-bit weights only for the nodes run as u8×s8 GEMMs (convolutions other than
    #: depthwise ones, and Gemm): the only kernels that saturate.
    reduce_range_gemm: bool = False
    #: Activations symmetric around 0 (int8) instead of asymmetric (uint8).
    symmetric_activations: bool = False
    #: Leading convolutions (with the nodes up to the next one) left in FP32.
    float_prefix: int = 0
    #: Node names of the pre-processed graph left in FP32 (see the module notes).
    nodes_to_exclude: tuple[str, ...] = ()
    #: Choose the int8 weights by GPTQ on `gptq_images` of the calibration photos instead of
    #: rounding each to the nearest level; with `gptq_act_order`, columns in order of
    #: decreasing input energy.
    gptq: bool = False
    gptq_images: int = 64
    gptq_act_order: bool = False

    def __post_init__(self) -> None:
        if self.method not in ("minmax", "entropy", "percentile"):
            raise ValueError(f"unknown calibration method {self.method!r}")
        if self.calibration_images < self.calibration_batch:
            raise ValueError(f"calibration needs at least {self.calibration_batch} images")

    @classmethod
    def from_build(cls, build: dict[str, Any]) -> QuantizeOptions:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in build.items() if k not in ("kind", "base")}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown quantize options: {', '.join(sorted(unknown))}")
        if "nodes_to_exclude" in values:
            values["nodes_to_exclude"] = tuple(values["nodes_to_exclude"])
        return cls(**values)


class _Reader:
    """A calibration data reader over batches of inputs (duck-types CalibrationDataReader).

    onnxruntime's histogram calibrators keep every intermediate tensor of what they are
    given before they histogram it: `set_range` lets them take the corpus a slice at a time.
    """

    def __init__(self, input_name: str, batches: list[np.ndarray]) -> None:
        self.input_name = input_name
        self.batches = batches
        self._pos = 0
        self._end = len(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._pos, self._end = start_index, min(end_index, len(self.batches))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= self._end:
            return None
        batch = self.batches[self._pos]
        self._pos += 1
        return {self.input_name: batch}


def _import_quantization() -> Any:
    try:
        import onnx  # noqa: F401
        from onnxruntime import quantization
    except ImportError as e:
        raise ModelNotPrepared(
            f"quantizing needs the onnx package ({e.name} is missing): {CONVERT_HINT}"
        ) from None
    return quantization


def quantize_model(
    fp32: Path,
    out: Path,
    card: ModelCard,
    options: QuantizeOptions,
    *,
    calibration: Iterable[np.ndarray] | None = None,
    photos: Sequence[str] | None = None,
) -> None:
    """Write the INT8 (QDQ) model of the FP32 ONNX file `fp32` to `out`.

    `calibration` overrides the calibration inputs (batches of the model's input); by
    default they are `options.calibration_images` varied photos from `photos`.
    """
    q = _import_quantization()
    import onnx

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ics-quantize-") as tmp:
        pre = Path(tmp) / "pre.onnx"
        q.shape_inference.quant_pre_process(str(fp32), str(pre))
        model = onnx.load(str(pre))
        exclude = list(options.nodes_to_exclude)
        if options.float_prefix:
            exclude += _prefix_nodes(model, options.float_prefix)
        overrides: dict[str, Any] = {}
        if options.reduce_range_gemm:
            for weight, axis in _gemm_weights(model):
                overrides[weight] = [{"axis": axis, "reduce_range": True}]
        if calibration is None:
            calibration = photo_batches(
                card,
                options.calibration_images,
                options.seed,
                stream=CALIBRATION,
                batch_size=options.calibration_batch,
                photos=photos,
            )
        batches = _equal_batches(calibration, options.calibration_batch)
        method = {
            "minmax": q.CalibrationMethod.MinMax,
            "entropy": q.CalibrationMethod.Entropy,
            "percentile": q.CalibrationMethod.Percentile,
        }[options.method]
        extra: dict[str, Any] = {"ActivationSymmetric": options.symmetric_activations}
        if options.method != "minmax":
            # The histogram calibrators keep every intermediate tensor until they histogram
            # them: a slice of the corpus at a time keeps memory at a few hundred MB.
            # (MinMax keeps one min and max per tensor and batch.)
            extra["CalibStridedMinMax"] = _stride(len(batches))
        if overrides:
            extra["TensorQuantOverrides"] = overrides
        if options.method == "percentile":
            extra["CalibPercentile"] = options.percentile
        if options.method == "minmax" and options.batch_mean_ranges:
            extra["CalibMovingAverage"] = True
        qdq = Path(tmp) / "qdq.onnx"
        with contextlib.redirect_stdout(io.StringIO()):  # its histogram progress prints
            q.quantize_static(
                str(pre),
                str(qdq),
                _Reader(_input_name(model), batches),
                quant_format=q.QuantFormat.QDQ,
                per_channel=options.per_channel,
                reduce_range=options.reduce_range,
                activation_type=(
                    q.QuantType.QInt8 if options.symmetric_activations else q.QuantType.QUInt8
                ),
                weight_type=q.QuantType.QInt8,
                nodes_to_exclude=exclude or None,
                calibrate_method=method,
                extra_options=extra,
            )
        qmodel = onnx.load(str(qdq))
        if options.gptq:
            gptq_batches = _equal_batches(batches, CALIBRATION_BATCH)[
                : max(1, options.gptq_images // CALIBRATION_BATCH)
            ]
            _gptq_weights(model, qmodel, gptq_batches, act_order=options.gptq_act_order)
        onnx.save(qmodel, str(out))
    log.info(
        "quantized %s on %d photos (%s) in %.1f s",
        card.name,
        sum(len(b) for b in batches),
        options.method,
        time.perf_counter() - started,
    )


def _prefix_nodes(model: Any, convs: int) -> list[str]:
    """The first `convs` Conv nodes and the nodes after each up to the next Conv."""
    names: list[str] = []
    seen = 0
    for node in model.graph.node:
        if node.op_type == "Conv":
            seen += 1
            if seen > convs:
                break
        if seen:
            names.append(str(node.name))
    return names


def _weight_nodes(model: Any) -> list[tuple[Any, str]]:
    """Conv and Gemm nodes with constant weights, each with its kind: "depthwise", "dense"
    (a convolution run as a GEMM) or "gemm"."""
    inits = {i.name for i in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm") or node.input[1] not in inits:
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        kind = "gemm" if node.op_type == "Gemm" else "depthwise" if group > 1 else "dense"
        found.append((node, kind))
    return found


def _gemm_weights(model: Any) -> list[tuple[str, int]]:
    """Weights of the nodes run as u8×s8 GEMMs, with their output-channel axis."""
    found = []
    for node, kind in _weight_nodes(model):
        if kind == "gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            found.append((str(node.input[1]), 0 if trans_b else 1))
        elif kind == "dense":
            found.append((str(node.input[1]), 0))
    return found


# --- GPTQ ---------------------------------------------------------------------------------


def _gptq_weights(
    model: Any, qmodel: Any, batches: Sequence[np.ndarray], *, act_order: bool = False
) -> None:
    """Replace the round-to-nearest int8 weights of `qmodel` by GPTQ's, keeping the scales.

    GPTQ (Frantar et al., 2022) quantizes a layer's weights one input column at a time and
    moves each column's rounding error onto the columns not yet quantized, weighted by the
    inverse of the layer's input Hessian E[x xᵀ] (measured on `batches` in the float
    `model`), so what is kept small is the error of the layer's output, not of its weights.
    Depthwise convolutions are done per channel over their k×k taps. Dense convolutions
    other than 1×1 keep their rounding.
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    qinits = {i.name: i for i in qmodel.graph.initializer}
    producers = {o: n for n in qmodel.graph.node for o in n.output}
    qnodes = {n.name: n for n in qmodel.graph.node}
    targets = []
    for node, kind in _weight_nodes(model):
        qnode = qnodes.get(node.name)
        dq = None if qnode is None else producers.get(qnode.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in qinits:
            continue  # left in float
        if kind == "dense" and tuple(inits[node.input[1]].dims[2:]) != (1, 1):
            continue
        targets.append((node, kind, dq))
    hessians = _input_hessians(model, [node for node, _, _ in targets], batches)
    for node, kind, dq in targets:
        q_init = qinits[dq.input[0]]
        old = numpy_helper.to_array(q_init)
        if old.dtype != np.int8:
            continue
        scale = numpy_helper.to_array(qinits[dq.input[1]]).astype(np.float64)
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        qmax = int(np.abs(old).max()) or 127  # 127, or 64 for 7-bit weights
        h = hessians[node.name]
        if kind == "depthwise":
            q = _gptq_depthwise(w.reshape(len(w), -1), h, scale, qmax).reshape(w.shape)
        else:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            transposed = kind == "gemm" and not trans_b
            rows = w.T if transposed else w.reshape(len(w), -1)
            q = _gptq(rows, h, scale, qmax, act_order=act_order)
            q = q.T if transposed else q.reshape(w.shape)
        q_init.CopyFrom(numpy_helper.from_array(q.astype(np.int8), q_init.name))


def _input_hessians(
    model: Any, nodes: Sequence[Any], batches: Sequence[np.ndarray]
) -> dict[str, np.ndarray]:
    """E[x xᵀ] of each node's input in the float model: over input channels for dense and
    Gemm nodes, over each channel's k×k patches (C, k², k²) for depthwise ones."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {o.name for o in probe.graph.output}
    for node in nodes:
        if node.input[0] not in outputs:
            outputs.add(node.input[0])
            probe.graph.output.append(
                onnx.helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, None)
            )
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(
        probe.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    input_name = _input_name(model)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for batch in batches:
        values = dict(zip(names, session.run(None, {input_name: batch}), strict=True))
        values[input_name] = batch
        for node in nodes:
            x = values[node.input[0]]
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            if x.ndim == 4 and group > 1:
                patches = _patches(x, node)  # (C, k², P)
                h = np.matmul(patches, patches.transpose(0, 2, 1)).astype(np.float64)
                n = patches.shape[2]
            else:
                rows = _channels_last(x) if x.ndim == 4 else x.reshape(len(x), -1)
                h = (rows.T @ rows).astype(np.float64)
                n = len(rows)
            sums[node.name] = sums.get(node.name, 0) + h
            counts[node.name] = counts.get(node.name, 0) + n
    return {name: h / counts[name] for name, h in sums.items()}


def _channels_last(x: np.ndarray) -> np.ndarray:
    return x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])


def _patches(x: np.ndarray, node: Any) -> np.ndarray:
    """The k×k input patches each output of a depthwise convolution sees: (C, k², P)."""
    attrs = {a.name: list(a.ints) for a in node.attribute if a.ints}
    kh, kw = attrs["kernel_shape"]
    sh, sw = attrs.get("strides", [1, 1])
    top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
    xp = np.pad(x.transpose(1, 0, 2, 3), ((0, 0), (0, 0), (top, bottom), (left, right)))
    c, n, h, w = xp.shape
    ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
    out = np.empty((c, kh * kw, n, ho, wo), dtype=x.dtype)
    for dy in range(kh):
        for dx in range(kw):
            rows = slice(dy, dy + sh * (ho - 1) + 1, sh)
            cols = slice(dx, dx + sw * (wo - 1) + 1, sw)
            out[:, dy * kw + dx] = xp[:, :, rows, cols]
    return out.reshape(c, kh * kw, n * ho * wo)


def _damped_inverse_cholesky(h: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """Upper Cholesky factor of the inverse of h (..., K, K), damped like GPTQ."""
    h = h.copy()
    k = h.shape[-1]
    idx = np.arange(k)
    diag = h[..., idx, idx]
    # An input never seen non-zero has no cross terms: give it a unit diagonal.
    diag = np.where(diag <= 0, 1.0, diag)
    h[..., idx, idx] = diag + damp * diag.mean(axis=-1, keepdims=True)
    inv = np.linalg.inv(h)
    inv = (inv + np.swapaxes(inv, -1, -2)) / 2
    upper: np.ndarray = np.swapaxes(np.linalg.cholesky(inv + 1e-12 * np.eye(k)), -1, -2)
    return upper


def _gptq(
    w: np.ndarray,
    h: np.ndarray,
    scale: np.ndarray,
    qmax: int,
    *,
    act_order: bool = False,
    block: int = 128,
) -> np.ndarray:
    """GPTQ of rows w (O, K) on the input Hessian h (K, K) with per-row scales: the int
    levels (O, K), within ±qmax."""
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(len(h))
    w = w[:, order].copy()
    hinv = _damped_inverse_cholesky(h[np.ix_(order, order)])
    o, k = w.shape
    s = np.where(scale > 0, scale, 1.0)
    q = np.zeros((o, k), dtype=np.int64)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].copy()
        err1 = np.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            qc = np.clip(np.round(col / s), -qmax, qmax)
            q[:, i1 + i] = qc
            e = (col - qc * s) / h1[i, i]
            w1[:, i:] -= np.outer(e, h1[i, i:])
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    out = np.empty_like(q)
    out[:, order] = q
    return out


def _gptq_depthwise(w: np.ndarray, h: np.ndarray, scale: np.ndarray, qmax: int) -> np.ndarray:
    """GPTQ of each channel's k×k kernel w (C, k²) on its patch Hessian h (C, k², k²)."""
    w = w.copy()
    c, k = w.shape
    hinv = _damped_inverse_cholesky(h)
    s = np.where(scale > 0, scale, 1.0)
    q = np.zeros((c, k), dtype=np.int64)
    for j in range(k):
        qc = np.clip(np.round(w[:, j] / s), -qmax, qmax)
        q[:, j] = qc
        e = (w[:, j] - qc * s) / hinv[:, j, j]
        w[:, j:] -= e[:, None] * hinv[:, j, j:]
    return q


def _equal_batches(batches: Iterable[np.ndarray], size: int) -> list[np.ndarray]:
    """Re-cut batches to `size` images each (the histogram calibrators stack them), dropping
    a short tail."""
    flat = np.concatenate(list(batches))
    if len(flat) < size:
        raise ValueError(f"calibration needs at least {size} images, got {len(flat)}")
    n = len(flat) // size * size
    return list(flat[:n].reshape(-1, size, *flat.shape[1:]))


def _stride(batches: int) -> int:
    """The largest number of batches up to _CALIBRATION_SLICE that divides `batches`."""
    return max(s for s in range(1, _CALIBRATION_SLICE + 1) if batches % s == 0)


def _input_name(model: Any) -> str:
    inits = {i.name for i in model.graph.initializer}
    return next(str(i.name) for i in model.graph.input if i.name not in inits)


def build_quantized(card: ModelCard, out: Path, models_dir: Path) -> None:
    """The `quantize` builder: prepare the base model if needed, then quantize it to `out`."""
    from .prepare import prepare
    from .registry import get_card

    base = get_card(card.build["base"])
    fp32 = prepare(base, models_dir)
    quantize_model(fp32, out, card, QuantizeOptions.from_build(card.build))


# --- measuring ------------------------------------------------------------------------------


def throughput_ratio(
    reference: ModelRuntime,
    candidate: ModelRuntime,
    batch: np.ndarray,
    *,
    repeats: int = 7,
    min_s: float = 0.5,
) -> tuple[float, float, float]:
    """Images/s of both runtimes on one batch, timed in turns so that drift of a shared
    machine hits both alike; returns (reference median, candidate median, median of the
    per-turn ratios candidate / reference)."""
    for runtime in (reference, candidate):
        runtime.predict(batch)
    start = time.perf_counter()
    runs = 0
    while time.perf_counter() - start < min_s / 2 or runs < 2:
        reference.predict(batch)
        runs += 1
    per_turn = max(2, round(runs * min_s / (time.perf_counter() - start)))
    rates: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(repeats):
        for which, runtime in enumerate((reference, candidate)):
            t = time.perf_counter()
            for _ in range(per_turn):
                runtime.predict(batch)
            rates[which].append(per_turn * len(batch) / (time.perf_counter() - t))
    ref, cand = np.array(rates[0]), np.array(rates[1])
    return float(np.median(ref)), float(np.median(cand)), float(np.median(cand / ref))


def main(argv: list[str] | None = None) -> None:
    """Measure a quantized model against its base: top-1 agreement on evaluation photos
    (never used for calibration) and interleaved throughput on pre-decoded tensors.

        python -m ics_service.models.quantize [--model efficientnet-lite0-int8] [-n 1000]
    """
    from ..config import load_settings
    from .prepare import onnx_path, prepare
    from .registry import get_card
    from .runtime import OnnxRuntime

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--model", default="efficientnet-lite0-int8")
    p.add_argument("--models-dir", type=Path, help="Default: the settings' models folder.")
    p.add_argument("-n", "--images", type=int, default=1000, help="Evaluation photos.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the evaluation photos.")
    p.add_argument("--batch-sizes", default="1,4,8,16")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--files", type=Path, help="A folder of images to use instead.")
    args = p.parse_args(argv)

    models_dir = args.models_dir or load_settings().settings.models_dir
    card = get_card(args.model)
    base = get_card(card.build["base"])
    prepare(card, models_dir)
    reference = OnnxRuntime(base, onnx_path(base, models_dir))
    candidate = OnnxRuntime(card, onnx_path(card, models_dir))
    if args.files:
        from ..imaging import IMAGE_EXTENSIONS

        images = (f for f in args.files.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
        paths = sorted(images)[: args.images]
        tensors = list(preprocess_batches(base, (f.read_bytes() for f in paths)))
        corpus = f"{len(paths)} files from {args.files}"
    else:
        tensors = list(photo_batches(base, args.images, args.seed, stream=EVALUATION))
        corpus = f"{args.images} varied photos (evaluation stream, seed {args.seed})"
    agreement = top1_agreement(reference, candidate, tensors)
    print(f"{card.name} vs {base.name} on {corpus}: {agreement}")
    pool = np.concatenate(tensors)
    for size in (int(b) for b in args.batch_sizes.split(",")):
        batch = np.ascontiguousarray(pool[:size])
        ref, cand, ratio = throughput_ratio(reference, candidate, batch, repeats=args.repeats)
        print(
            f"batch {size:2d}: {base.name} {ref:6.1f} images/s, {card.name} {cand:6.1f} "
            f"images/s, ratio {ratio:.2f} (median of {args.repeats} interleaved turns)"
        )


if __name__ == "__main__":
    main()
