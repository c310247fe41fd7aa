"""INT8 variants of a model: onnxruntime static quantization, calibrated on real photos.

A quantized model is a card whose `build` is ``{"kind": "quantize", "base": NAME, ...}``
(the fields of `QuantizeOptions`). `ics models prepare` builds it from the base model's
ONNX file, preparing that first when it is missing: `quant_pre_process` (shape inference,
graph optimisation), then `quantize_static` in QDQ format with per-channel weights and
activation ranges calibrated on varied real photos, then (with `gptq`) better int8 weights.

The photos are the calibration stream of `calibration.varied_photos` (scikit-image's
bundled photos, varied deterministically, through the card's own preprocessing); models
are judged on its separate evaluation stream, and on photos from another source held out
from calibration (`heldout`). `agreement.top1_agreement` compares two
runtimes on any corpus; the benchmarks print it.

What each variant tried measured, and why the registry's card has the options it has, is
the experiment log on the Models page of the docs (docs/models.md).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelNotPrepared
from ..modelcard import CONVERT_HINT, ModelCard
from .calibration import CALIBRATION, photo_batches

log = logging.getLogger(__name__)

#: Calibration runs the model on batches of this many images, a few batches at a time.
CALIBRATION_BATCH = 8
_CALIBRATION_SLICE = 4


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
    #: The last `float_suffix` Conv or Gemm nodes left in FP32, with every node after the
    #: one before them (1: the classifier, from the last convolution's activation on).
    float_suffix: int = 0
    #: uint8 weights (U8U8 kernels) instead of int8.
    weight_uint8: bool = False
    #: "qdq" (QuantizeLinear/DequantizeLinear pairs, fused by onnxruntime at load time) or
    #: "qoperator" (QLinearConv and friends written into the file).
    quant_format: str = "qdq"

    def __post_init__(self) -> None:
        if self.method not in ("minmax", "entropy", "percentile"):
            raise ValueError(f"unknown calibration method {self.method!r}")
        if self.quant_format not in ("qdq", "qoperator"):
            raise ValueError(f"unknown quantization format {self.quant_format!r}")
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
        if options.float_suffix:
            exclude += _suffix_nodes(model, options.float_suffix)
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
                quant_format=(
                    q.QuantFormat.QDQ if options.quant_format == "qdq" else q.QuantFormat.QOperator
                ),
                per_channel=options.per_channel,
                reduce_range=options.reduce_range,
                activation_type=(
                    q.QuantType.QInt8 if options.symmetric_activations else q.QuantType.QUInt8
                ),
                weight_type=q.QuantType.QUInt8 if options.weight_uint8 else q.QuantType.QInt8,
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


def _suffix_nodes(model: Any, nodes: int) -> list[str]:
    """Every node after the Conv or Gemm node that precedes the last `nodes` of them."""
    weights = [i for i, n in enumerate(model.graph.node) if n.op_type in ("Conv", "Gemm")]
    last_quantized = weights[-nodes - 1] if nodes < len(weights) else -1
    return [str(n.name) for n in model.graph.node[last_quantized + 1 :]]


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


def build_quantized(card: ModelCard, out: Path, base: Path | None) -> None:
    """The `quantize` builder: quantize the base model's ONNX file `base` to `out`."""
    if base is None:
        raise ValueError(f"model {card.name}: a quantized model's build names its base")
    quantize_model(base, out, card, QuantizeOptions.from_build(card.build))
