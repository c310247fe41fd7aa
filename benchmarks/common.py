"""What the peer runners share: the model's card, the onnxruntime session and the plain
preprocessing a user writes first.

Runners get the model as a JSON document from `ics models info NAME --json` (path, input
size, resize size, mean, std...), so the harness depends on the `ics` command's contract
and not on the engine's internals.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ics_service.models.runtime import available_cpus, onnx_session

#: Where a runner writes its own view of the run (count, steady-state rate...).
REPORT_ENV = "BENCH_REPORT"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    input_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    logits: bool

    @classmethod
    def load(cls, path: str | Path) -> ModelInfo:
        d = json.loads(Path(path).read_text())
        return cls(
            name=d["name"],
            path=d["path"],
            input_size=int(d["input_size"]),
            resize_size=int(d["resize_size"]),
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            interpolation=d.get("interpolation", "bilinear"),
            logits=d.get("outputs", "logits") == "logits",
        )


def cpus() -> int:
    return available_cpus()


def session(model_path: str, threads: int = 0) -> Any:
    """An onnxruntime session with exactly ICS's settings, for every runner."""
    return onnx_session(model_path, threads=threads)


def default_session(model_path: str) -> Any:
    """onnxruntime's default session, as a user writes it from the documentation."""
    import onnxruntime as ort

    return ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])


def session_settings(sess: Any) -> dict[str, Any]:
    """The options a session actually runs with, read back from onnxruntime."""
    o = sess.get_session_options()
    try:
        spinning = o.get_session_config_entry("session.intra_op.allow_spinning")
    except RuntimeError:  # not set: onnxruntime's default
        spinning = "default (on)"
    threads = o.intra_op_num_threads
    return {
        "intra_op_threads": threads if threads else "0 (onnxruntime's default)",
        "inter_op_threads": o.inter_op_num_threads,
        "execution_mode": str(o.execution_mode).rsplit(".", 1)[-1],
        "graph_optimization": str(o.graph_optimization_level).rsplit(".", 1)[-1],
        "spinning": spinning,
    }


def ics_decoder(info: ModelInfo) -> Any:
    """ICS's own decode + preprocess of JPEG bytes (draft decode, one resample)."""
    from ics_service.imaging import Limits, Preprocessor
    from ics_service.models import get_card

    pre = Preprocessor(get_card(info.name), Limits())
    return lambda data: pre(data)[0]


def plain_preprocess(img: Any, info: ModelInfo) -> np.ndarray:
    """The textbook path: resize the shorter side, centre-crop, normalise; (3, S, S) float32.

    No draft decode, no reducing gap: what a user writes from a model's documentation.
    """
    from PIL import Image

    resample = {
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
    }[info.interpolation]
    w, h = img.size
    scale = info.resize_size / min(w, h)
    img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample)
    w, h = img.size
    s = info.input_size
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s))
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1)
    mean = np.asarray(info.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(info.std, dtype=np.float32).reshape(3, 1, 1)
    return np.ascontiguousarray((x - mean) / std)


def list_images(folder: str | Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))


def result_line(uri: str, probs: np.ndarray, threshold: float) -> str:
    """One JSON Lines record: the decision a runner makes for one image."""
    idx = int(probs.argmax())
    conf = float(probs[idx])
    status = "SUCCEEDED" if conf >= threshold else "LOW_CONFIDENCE"
    return json.dumps({"uri": uri, "label_index": idx, "confidence": conf, "status": status})


class Report:
    """A runner's own measurements, written as JSON where the orchestrator asks (BENCH_REPORT).

    The orchestrator's clock covers the whole process; this one starts when the runner is
    ready to classify, so the difference is the start-up cost.
    """

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.ready_at: float | None = None
        self.extra: dict[str, Any] = {}

    def ready(self) -> None:
        self.ready_at = time.perf_counter()

    def finish(self, images: int, **extra: Any) -> None:
        end = time.perf_counter()
        ready = self.ready_at if self.ready_at is not None else self.t0
        doc = {
            "images": images,
            "startup_s": ready - self.t0,
            "steady_s": end - ready,
            "steady_images_per_s": images / (end - ready) if end > ready else None,
            **self.extra,
            **extra,
        }
        path = os.environ.get(REPORT_ENV)
        if path:
            Path(path).write_text(json.dumps(doc, indent=2))
        else:
            json.dump(doc, sys.stderr, indent=2)
            sys.stderr.write("\n")
