"""A deterministic corpus of real-photo JPEGs for the benchmarks.

Every image is derived from one of scikit-image's bundled photos (`ics_service.samples`)
by a random crop, a random flip and a colour jitter, then resized to its size class and
saved as a JPEG of random quality. Image i of a size class depends only on (seed, class,
i), so a corpus of 200 is the first 200 images of a corpus of 1,500, and generated files
are kept in a pool and reused (hard-linked) by every corpus of the same seed.

    python -m benchmarks.corpus OUT_ROOT --size small -n 1500 --seed 0
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

#: Size classes: (width, height) of a landscape image; about a fifth are stored portrait.
SIZES: dict[str, tuple[int, int]] = {"small": (500, 375), "large": (4000, 3000)}
#: Bump when the recipe changes, so old pools are not mixed with new images.
RECIPE_VERSION = 1


@functools.cache
def _photos() -> tuple[np.ndarray, ...]:
    from ics_service.samples import PHOTOS, load_photo

    return tuple(load_photo(name) for name in PHOTOS)


@functools.cache
def _grain(seed: int) -> np.ndarray:
    """A tile of sensor-like grain: large images get real-photo entropy, not smooth blur."""
    rng = np.random.default_rng([seed, 0x6A1])
    return rng.normal(0.0, 5.0, size=(509, 509, 1)).astype(np.float32)


def make_image(seed: int, size_class: str, index: int) -> tuple[bytes, dict[str, object]]:
    """The JPEG bytes of image `index` of a size class, and how it was made."""
    photos = _photos()
    rng = np.random.default_rng([seed, RECIPE_VERSION, list(SIZES).index(size_class), index])
    which = int(rng.integers(len(photos)))
    src = photos[which]
    out_w, out_h = SIZES[size_class]
    portrait = bool(rng.random() < 0.2)
    if portrait:
        out_w, out_h = out_h, out_w
    # Random crop with the output's aspect ratio, covering 55-100 % of the limiting side.
    h, w = src.shape[:2]
    aspect = out_w / out_h
    frac = float(rng.uniform(0.55, 1.0))
    crop_w = min(w, h * aspect) * frac
    crop_h = crop_w / aspect
    left = float(rng.uniform(0, w - crop_w))
    top = float(rng.uniform(0, h - crop_h))
    box = (left, top, left + crop_w, top + crop_h)
    img = Image.fromarray(src)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        box = (w - box[2], box[1], w - box[0], box[3])
    # Colour jitter on the small source crop (cheap): brightness, contrast, saturation, tint.
    x0, y0, x1, y1 = (round(v) for v in box)
    crop = np.asarray(img.crop((x0, y0, x1, y1)), dtype=np.float32)
    brightness = rng.uniform(0.75, 1.25)
    contrast = rng.uniform(0.75, 1.25)
    saturation = rng.uniform(0.6, 1.4)
    tint = rng.uniform(0.92, 1.08, size=3).astype(np.float32)
    grey = crop.mean(axis=2, keepdims=True)
    crop = grey + (crop - grey) * saturation
    crop = (crop - crop.mean()) * contrast + crop.mean()
    crop = np.clip(crop * brightness * tint, 0, 255).astype(np.uint8)
    img = Image.fromarray(crop).resize((out_w, out_h), Image.Resampling.BICUBIC)
    if size_class == "large":
        grain = _grain(seed)
        reps = (out_h // grain.shape[0] + 2, out_w // grain.shape[1] + 2, 3)
        dy, dx = (int(v) for v in rng.integers(grain.shape[0], size=2))
        noise = np.tile(grain, reps)[dy : dy + out_h, dx : dx + out_w]
        arr = np.asarray(img, dtype=np.float32)
        arr += noise
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    quality = int(rng.integers(85, 96))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    meta: dict[str, object] = {
        "photo": which,
        "portrait": portrait,
        "quality": quality,
        "crop": frac,
    }
    return buf.getvalue(), meta


def _name(index: int) -> str:
    return f"img-{index:06d}.jpg"


def _write_one(pool: str, seed: int, size_class: str, index: int) -> None:
    path = Path(pool) / _name(index)
    if path.exists():
        return
    data, _ = make_image(seed, size_class, index)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)


def ensure_corpus(
    root: Path, size_class: str, n: int, seed: int = 0, *, jobs: int | None = None
) -> Path:
    """A folder of exactly n images of a size class (generated once, then reused)."""
    if size_class not in SIZES:
        raise ValueError(f"unknown size class {size_class!r}; known: {', '.join(SIZES)}")
    pool = root / f"pool-{size_class}-s{seed}-v{RECIPE_VERSION}"
    folder = root / f"{size_class}-n{n}-s{seed}"
    pool.mkdir(parents=True, exist_ok=True)
    missing = [i for i in range(n) if not (pool / _name(i)).exists()]
    if missing:
        jobs = jobs or min(len(missing), os.cpu_count() or 1, 4)
        if jobs > 1 and len(missing) > 4:
            with ProcessPoolExecutor(jobs) as ex:
                list(
                    ex.map(
                        _write_one,
                        [str(pool)] * len(missing),
                        [seed] * len(missing),
                        [size_class] * len(missing),
                        missing,
                        chunksize=max(1, len(missing) // (jobs * 8)),
                    )
                )
        else:
            for i in missing:
                _write_one(str(pool), seed, size_class, i)
    _link_folder(folder, [pool / _name(i) for i in range(n)])
    return folder


def ensure_repeated(root: Path, base: Path, n: int) -> Path:
    """A folder of n files hard-linked round-robin to the files of `base` (no new pixels).

    For memory runs, where the number of items matters and not their content.
    """
    files = sorted(p for p in base.iterdir() if p.suffix == ".jpg")
    if not files:
        raise ValueError(f"{base} has no .jpg files")
    folder = root / f"{base.name}-x{n}"
    _link_folder(folder, [files[i % len(files)] for i in range(n)])
    return folder


def _link_folder(folder: Path, sources: list[Path]) -> None:
    stamp = folder / ".corpus.json"
    want = {"n": len(sources), "first": sources[0].name, "last": sources[-1].name}
    if stamp.exists() and json.loads(stamp.read_text()) == want:
        return
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    for i, src in enumerate(sources):
        dst = folder / _name(i)
        try:
            os.link(src, dst)
        except OSError:  # another filesystem: copy
            dst.write_bytes(src.read_bytes())
    stamp.write_text(json.dumps(want))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path, help="Folder that holds the pools and corpora.")
    p.add_argument("--size", choices=list(SIZES), default="small")
    p.add_argument("-n", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    folder = ensure_corpus(args.root, args.size, args.n, args.seed)
    print(folder)


if __name__ == "__main__":
    main()
