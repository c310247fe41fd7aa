"""The quantize options added for the INT8 variants: their checks, and what they build."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from ics_service.models import get_card
from ics_service.models.calibration import CALIBRATION, photo_batches
from ics_service.models.prepare import onnx_path
from ics_service.models.quantize import QuantizeOptions, quantize_model
from ics_service.models.runtime import OnnxRuntime


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown quantization format 'qop'"):
        QuantizeOptions.from_build({"kind": "quantize", "base": "x", "quant_format": "qop"})
    options = QuantizeOptions.from_build(
        {"kind": "quantize", "float_suffix": 1, "weight_uint8": True, "quant_format": "qoperator"}
    )
    assert (options.float_suffix, options.weight_uint8, options.quant_format) == (
        1,
        True,
        "qoperator",
    )


@pytest.mark.slow
def test_float_suffix_keeps_the_classifier_float_in_a_qoperator_model(
    models_dir: Path, runtime: OnnxRuntime, tmp_path: Path
) -> None:
    fp32 = get_card("efficientnet-lite0")
    card = get_card("efficientnet-lite0-int8")
    out = tmp_path / "q.onnx"
    calibration = photo_batches(fp32, 16, 0, stream=CALIBRATION, batch_size=8)
    options = QuantizeOptions(calibration_images=16, float_suffix=1, quant_format="qoperator")
    quantize_model(onnx_path(fp32, models_dir), out, card, options, calibration=calibration)
    graph = onnx.load(str(out)).graph
    ops = {n.op_type for n in graph.node}
    assert "QLinearConv" in ops  # QOperator: quantized operators in the file, no QDQ pairs
    assert "DequantizeLinear" in ops  # where the float classifier takes over
    assert "QGemm" not in ops  # without float_suffix the classifier is a QGemm
    (gemm,) = [n for n in graph.node if n.op_type == "Gemm"]
    weights = {i.name for i in graph.initializer}
    assert gemm.input[1] in weights  # float weights, not a quantized operator's
    batch = next(photo_batches(fp32, 4, 1))
    probs = OnnxRuntime(card, out).predict(batch)
    assert probs.shape == (4, 1000)
    # A model calibrated on 16 photos still gives FP32's answer on most photos.
    assert (probs.argmax(1) == runtime.predict(batch).argmax(1)).sum() >= 2
    assert np.allclose(probs.sum(1), 1.0, atol=1e-4)
