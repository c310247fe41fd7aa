"""Bounds: the bare model on pre-decoded tensors at each batch size, and the decode and
preprocess cost per image on one core, from which the orchestrator computes the pipelined
bound for the machine's cores. With --int8-json, also the INT8 model's throughput and its
top-1 agreement with FP32, on the corpus and (with Debian's tuxpaint-stamps-default
installed) on photos held out from calibration (ics_service.models.heldout).

    python -m benchmarks.bounds MODEL_JSON --small DIR [--large DIR] [--int8-json J]

Writes one JSON document to $BENCH_REPORT (or stderr).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .common import ModelInfo, Report, cpus, list_images, plain_preprocess, session

BATCH_SIZES = (1, 2, 4, 8, 16, 32)
PER_CORE_BATCH_SIZES = (1, 8)


def ics_preprocessor(name: str) -> tuple[Callable[[bytes], np.ndarray], str]:
    """ICS's own decode + preprocess (draft decode, one resample), as the engine runs it."""
    from ics_service.imaging import Limits, Preprocessor
    from ics_service.models import get_card

    pre = Preprocessor(get_card(name), Limits())
    return (lambda data: pre(data)[0]), "ics_service.imaging.Preprocessor"


def plain_decoder(info: ModelInfo) -> Callable[[bytes], np.ndarray]:
    import io

    from PIL import Image

    def run(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as im:
            img = im.convert("RGB")
        return plain_preprocess(img, info)

    return run


def time_model(sess: Any, tensors: np.ndarray, batch: int, min_s: float, min_images: int) -> float:
    """Images per second of session.run on pre-decoded tensors at one batch size."""
    name = sess.get_inputs()[0].name
    reps = -(-batch // len(tensors))
    pool = np.concatenate([tensors] * max(1, reps))[: max(batch, len(tensors))]
    batches = [
        np.ascontiguousarray(pool[i : i + batch]) for i in range(0, len(pool) - batch + 1, batch)
    ]
    for b in batches[:2]:
        sess.run(None, {name: b})
    done = 0
    started = time.perf_counter()
    while True:
        for b in batches:
            sess.run(None, {name: b})
            done += batch
        elapsed = time.perf_counter() - started
        if elapsed >= min_s and done >= min_images:
            return done / elapsed


def time_decode(fn: Callable[[bytes], np.ndarray], blobs: list[bytes], min_s: float) -> float:
    """Mean milliseconds per image, on this one thread."""
    fn(blobs[0])
    times = []
    started = time.perf_counter()
    while True:
        for data in blobs:
            t0 = time.perf_counter()
            fn(data)
            times.append(time.perf_counter() - t0)
        if time.perf_counter() - started >= min_s:
            return statistics.fmean(times) * 1e3


def time_parallel(path: str, tensors: np.ndarray, batch: int, min_s: float, n: int) -> float:
    """Images per second of n one-thread sessions running at once, one per thread."""
    sessions = [session(path, threads=1) for _ in range(n)]
    rates = [0.0] * n
    barrier = threading.Barrier(n)

    def work(i: int) -> None:
        barrier.wait()
        rates[i] = time_model(sessions[i], tensors, batch, min_s, 2 * batch)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(rates)


def model_sweep(path: str, tensors: np.ndarray, min_s: float) -> dict[str, Any]:
    """The model's throughput on every core: one session using them all, at each batch
    size, or one single-thread session per core running side by side."""
    c = cpus()
    sess = session(path)
    by_batch = {b: time_model(sess, tensors, b, min_s, 2 * b) for b in BATCH_SIZES}
    best = max(by_batch, key=lambda b: by_batch[b])
    one = session(path, threads=1)
    per_core = {b: time_parallel(path, tensors, b, min_s, c) for b in PER_CORE_BATCH_SIZES}
    best_per_core = max(per_core, key=lambda b: per_core[b])
    return {
        "threads": c,
        "images_per_s_by_batch": {str(b): v for b, v in by_batch.items()},
        "best_batch": best,
        "best_images_per_s": by_batch[best],
        "one_thread_images_per_s": time_model(one, tensors, best, min_s, 2 * best),
        "per_core_sessions_images_per_s_by_batch": {str(b): v for b, v in per_core.items()},
        "per_core_sessions_best_batch": best_per_core,
        "per_core_sessions_images_per_s": per_core[best_per_core],
    }


def agreement(
    fp32: ModelInfo, int8: ModelInfo, files: list[Path], heldout_variations: int = 0
) -> dict[str, Any]:
    """Top-1 agreement of the INT8 model with FP32, by ICS's own measure (models/agreement.py)."""
    from ics_service.models import OnnxRuntime, get_card
    from ics_service.models.agreement import agreement_on_files

    reference = OnnxRuntime(get_card(fp32.name), Path(fp32.path))
    candidate = OnnxRuntime(get_card(int8.name), Path(int8.path))
    a = agreement_on_files(reference, candidate, files)
    doc: dict[str, Any] = {
        "images": a.images,
        "top1_agreement": a.top1_rate,
        "top5_agreement": a.top5_rate,
        "confident_top1_agreement": a.confident_top1_rate,
    }
    if heldout_variations:
        doc["heldout"] = heldout_agreement(reference, candidate, heldout_variations)
    return doc


#: Draws of ±0.5 grey level of noise on the held-out photos for FP32's own decision floor.
PHOTO_NOISE_DRAWS = 10


def heldout_agreement(reference: Any, candidate: Any, variations: int) -> dict[str, Any]:
    """Agreement on photos from another source than the calibration photos (the corpus is
    derived from them too): each held-out photo once, and `variations` variations, with
    FP32's agreement with itself under ±0.5 grey level of noise on those; top-1 classes
    and the workflow's decisions at the default threshold; a skip with the reason when
    their Debian package is not installed."""
    from ics_service.errors import ModelNotPrepared
    from ics_service.models.agreement import CONFIDENT, NOISE_GREY_LEVELS
    from ics_service.models.agreement import heldout_agreement as measure
    from ics_service.models.heldout import PACKAGE, STAMPS_DIR, heldout_paths, package_version

    try:
        paths = heldout_paths()
        once, varied, floor, photo_floors = measure(
            reference,
            candidate,
            variations=variations,
            paths=paths,
            photo_noise_draws=PHOTO_NOISE_DRAWS,
        )
    except ModelNotPrepared as e:
        return {"skipped": str(e)}
    labels = reference.card.labels

    def flip(f: Any) -> dict[str, Any]:
        return {
            "photo": paths[f.index].relative_to(STAMPS_DIR).as_posix(),
            "fp32": {"label": labels[f.reference_label], "p": f.reference_p},
            "int8": {"label": labels[f.candidate_label], "p": f.candidate_p},
            "decision_differs": f.decision_differs(once.threshold),
            "top1_differs": f.reference_label != f.candidate_label,
        }

    return {
        "source": f"{PACKAGE} {package_version() or '(version unknown)'}",
        "photos": once.images,
        "top1_agreement": once.top1_rate,
        "top5_agreement": once.top5_rate,
        "varied_images": varied.images,
        "varied_top1_agreement": varied.top1_rate,
        "varied_top5_agreement": varied.top5_rate,
        # Where FP32's top-1 probability is at least 0.5: no near ties.
        "varied_confident_images": varied.confident,
        "varied_confident_top1_agreement": varied.confident_top1_rate,
        # FP32 against itself on the variations, each input moved by ±0.5 grey level.
        "varied_noise_floor_top1": floor.top1_rate,
        # The workflow's decision (SUCCEEDED at or above the threshold, else
        # LOW_CONFIDENCE): INT8's against FP32's, on the photos and on their variations.
        "threshold": once.threshold,
        # What "confident" means (FP32's top-1 probability at least this), and the noise of
        # the noise floor (± this many grey levels of 0..255 on every input value).
        "confident_at": CONFIDENT,
        "noise_grey_levels": NOISE_GREY_LEVELS,
        "decision_agreement": once.decision_rate,
        "decision_flips": once.images - once.decisions,
        "confident_photos": once.confident,
        "confident_top1_agreement": once.confident_top1_rate,
        "confident_top1_misses": once.confident - once.confident_top1,
        "varied_decision_agreement": varied.decision_rate,
        "varied_decision_flips": varied.images - varied.decisions,
        "varied_confident_top1_misses": varied.confident - varied.confident_top1,
        "varied_noise_floor_decisions": floor.decision_rate,
        # FP32 against itself on the photos, under the same noise, in PHOTO_NOISE_DRAWS
        # draws of it: its own decisions' agreement (and flips) in each draw.
        "photo_noise_floor_decisions": [f.decision_rate for f in photo_floors],
        "photo_noise_floor_decision_flips": [f.images - f.decisions for f in photo_floors],
        "photo_noise_floor_mean_max_prob_diff": float(
            np.mean([f.mean_max_prob_diff for f in photo_floors])
        ),
        # Mean over the photos of the largest |p_INT8 - p_FP32| of any class.
        "mean_max_prob_diff": once.mean_max_prob_diff,
        # The photos whose decision flips, or whose top-1 differs where FP32 is confident.
        "flips": [flip(f) for f in once.flips],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Model and decode bounds.")
    p.add_argument("model_json")
    p.add_argument("--small", required=True, help="Folder of small photos.")
    p.add_argument("--large", help="Folder of large photos.")
    p.add_argument("--int8-json", help="`ics models info --json` of the INT8 model.")
    p.add_argument("--agree-n", type=int, default=1000, help="Images for INT8 agreement.")
    p.add_argument("--min-s", type=float, default=1.0, help="Seconds per measurement.")
    p.add_argument("--decode-n", type=int, default=100, help="Images per decode measurement.")
    args = p.parse_args(argv)

    report = Report()
    info = ModelInfo.load(args.model_json)
    pre, pre_name = ics_preprocessor(info.name)
    plain = plain_decoder(info)
    small = list_images(args.small)
    report.ready()
    tensors = np.stack([pre(f.read_bytes()) for f in small[:64]])
    doc: dict[str, Any] = {"cpus": cpus(), "preprocessor": pre_name}
    doc["model"] = model_sweep(info.path, tensors, args.min_s)

    decode: dict[str, Any] = {}
    for label, folder, n in (
        ("small", args.small, args.decode_n),
        ("large", args.large, max(3, args.decode_n // 10)),
    ):
        if not folder:
            continue
        blobs = [f.read_bytes() for f in list_images(folder)[:n]]
        if not blobs:
            continue
        decode[label] = {
            "images": len(blobs),
            "ics_ms": time_decode(pre, blobs, args.min_s / 2),
            "plain_ms": time_decode(plain, blobs, args.min_s / 2),
        }
    doc["decode"] = decode

    if args.int8_json:
        int8 = ModelInfo.load(args.int8_json)
        doc["int8"] = {"model": model_sweep(int8.path, tensors, args.min_s)}
        agree_files = [Path(f) for f in small[: args.agree_n]]
        doc["int8"]["agreement"] = agreement(info, int8, agree_files, args.agree_n)
    report.finish(len(small), **doc)


if __name__ == "__main__":
    main()
