"""Scaled JPEG decoding: Pillow's draft mode against simplejpeg, and how many decode threads pay.

Both paths run through ICS's own `Preprocessor` (every check, the same resize and crop),
with `fast_jpeg` off (Pillow decodes every JPEG) and on (simplejpeg decodes those that the
draft scales down; full-scale ones stay with Pillow, so there the two paths are one),
on real photos: scikit-image's samples and the benchmark corpus's small (500×375) and
large (4000×3000, 12-megapixel) JPEGs. For each path it reports the CPU time per image
(the minimum of --repeats decodes of each image, averaged over the images), the pixels'
largest difference, and through the real model the top-1 agreement and the largest
difference of any probability. Then the throughput of 1, 2, 3 and 4 decode threads on the
large photos (wall time, best of --rounds).

    python -m benchmarks.decode_compare [--models-dir DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.corpus import make_image
from ics_service.config import load_settings
from ics_service.imaging import Limits, Preprocessor
from ics_service.models import get_card, load_runtime
from ics_service.samples import PHOTOS, load_photo

PATHS = {"pillow": False, "simplejpeg": True}


def photo_sets(large: int, small: int, seed: int) -> dict[str, list[bytes]]:
    samples = []
    for name in PHOTOS:
        buf = io.BytesIO()
        Image.fromarray(load_photo(name)).save(buf, format="JPEG", quality=92)
        samples.append(buf.getvalue())
    return {
        "samples": samples,
        "small": [make_image(seed, "small", i)[0] for i in range(small)],
        "large": [make_image(seed, "large", i)[0] for i in range(large)],
    }


def cpu_ms(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best * 1000


def compare(
    images: list[bytes], pre: dict[str, Preprocessor], runtime: Any, repeats: int
) -> dict[str, Any]:
    """Per-image CPU ms of each path (interleaved, so load hits both alike) and agreement."""
    ms: dict[str, list[float]] = {name: [] for name in pre}
    for data in images:
        for name, p in pre.items():
            ms[name].append(cpu_ms(functools.partial(p, data), repeats))
    tensors = {name: np.stack([p(d)[0] for d in images]) for name, p in pre.items()}
    probs = {name: runtime.predict(t) for name, t in tensors.items()}
    top1 = {name: p.argmax(axis=1) for name, p in probs.items()}
    return {
        "images": len(images),
        "cpu_ms": {name: round(float(np.mean(v)), 3) for name, v in ms.items()},
        "simplejpeg_over_pillow": round(
            float(np.mean(ms["simplejpeg"]) / np.mean(ms["pillow"])), 3
        ),
        "max_pixel_diff": float(np.abs(tensors["pillow"] - tensors["simplejpeg"]).max()),
        "top1_agreement": float(np.mean(top1["pillow"] == top1["simplejpeg"])),
        "max_prob_diff": float(np.abs(probs["pillow"] - probs["simplejpeg"]).max()),
    }


def thread_scaling(
    images: list[bytes], pre: Preprocessor, threads: list[int], rounds: int
) -> dict[int, float]:
    """Images per second decoding `images` on n threads, best of `rounds`."""
    rates: dict[int, float] = {}
    for n in threads:
        best = 0.0
        with ThreadPoolExecutor(n) as pool:
            for _ in range(rounds):
                t = time.perf_counter()
                for _ in pool.map(pre, images):
                    pass
                best = max(best, len(images) / (time.perf_counter() - t))
        rates[n] = round(best, 2)
    return rates


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models-dir", type=Path, help="Prepared models (default: ICS_HOME's).")
    ap.add_argument("--model", default="efficientnet-lite0")
    ap.add_argument("--large", type=int, default=12, help="12-megapixel photos.")
    ap.add_argument("--small", type=int, default=48, help="500×375 photos.")
    ap.add_argument("--repeats", type=int, default=5, help="Decodes of each image per path.")
    ap.add_argument("--threads", default="1,2,3,4", help="Decode threads to try.")
    ap.add_argument("--rounds", type=int, default=3, help="Rounds per thread count.")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="Also write the results here.")
    args = ap.parse_args(argv)
    from benchmarks.quiet import load_snapshot

    started, load_before = time.gmtime(), load_snapshot()
    settings = load_settings(None, {}).settings
    card = get_card(args.model)
    runtime = load_runtime(card, args.models_dir or settings.models_dir, threads=1)
    limits = Limits.from_settings(settings)
    pre = {name: Preprocessor(card, limits, fast_jpeg=fast) for name, fast in PATHS.items()}
    if not pre["simplejpeg"].fast_jpeg:
        raise SystemExit("simplejpeg is not installed: pip install simplejpeg")
    sets = photo_sets(args.large, args.small, args.seed)
    result: dict[str, Any] = {"paths": {}}
    for name, images in sets.items():
        row = compare(images, pre, runtime, args.repeats)
        result["paths"][name] = row
        print(
            f"{name:8s} {row['images']:3d} images  CPU ms/image: pillow "
            f"{row['cpu_ms']['pillow']:7.2f}  simplejpeg {row['cpu_ms']['simplejpeg']:7.2f}  "
            f"(×{row['simplejpeg_over_pillow']:.3f})  max pixel diff {row['max_pixel_diff']:g}  "
            f"top-1 agreement {row['top1_agreement']:.1%}  max prob diff "
            f"{row['max_prob_diff']:.2e}"
        )
    threads = [int(n) for n in args.threads.split(",")]
    scaling = {
        name: thread_scaling(sets["large"], pre[name], threads, args.rounds) for name in PATHS
    }
    result["threads_large_images_per_s"] = scaling
    for name, rates in scaling.items():
        shown = "  ".join(f"{n} threads {r:6.2f}/s" for n, r in rates.items())
        print(f"large, {name:10s}: {shown}")
    if args.json:
        from benchmarks.run import machine, run_id

        mach = machine()
        # What a reader needs to trace the figures: when, which commit, which CPU, how busy.
        result = {
            "run_id": run_id(started, mach),
            "machine": mach,
            "load_before": load_before,
            "load_after": load_snapshot(),
            **result,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
