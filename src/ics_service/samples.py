"""Real sample photos for the demo, the tests and the benchmarks.

The photos come from scikit-image's bundled data (the `samples` extra), so nothing is
downloaded. `python -m ics_service.samples DIR` writes them as JPEG files.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import install_hint

#: scikit-image data sets that are photographs, with what the default model should say.
PHOTOS = (
    "coffee",  # espresso, confident
    "chelsea",  # a tabby cat: split between three cat classes
    "astronaut",
    "rocket",
    "camera",  # greyscale: a man with a camera on a tripod
    "motorcycle",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "coins",
    "moon",
    "clock",
)


def sample_photo() -> bytes:
    """A real photo shipped with ICS (scikit-image's CC0 `coffee`, 336×224, JPEG): the
    one inference that checks a model on `ics models add`. Needs no extra."""
    return resources.files("ics_service").joinpath("models", "data", "sample.jpg").read_bytes()


def load_photo(name: str) -> np.ndarray:
    """One bundled photo as an RGB uint8 array."""
    try:
        import skimage.data
    except ImportError:
        raise SystemExit(f"sample photos need scikit-image: {install_hint('samples')}") from None
    if name == "motorcycle":
        arr = np.asarray(skimage.data.stereo_motorcycle()[0])  # type: ignore[no-untyped-call]
    else:
        arr = np.asarray(getattr(skimage.data, name)())
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3].astype(np.uint8))


def write_samples(folder: Path, names: tuple[str, ...] = PHOTOS) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = folder / f"{name}.jpg"
        Image.fromarray(load_photo(name)).save(path, quality=92)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m ics_service.samples FOLDER")
    folder = Path(args[0])
    paths = write_samples(folder)
    # One broken file, to show that a bad image fails alone and the batch carries on.
    broken = folder / "broken.jpg"
    broken.write_bytes(paths[0].read_bytes()[:2000])
    print(f"wrote {len(paths) + 1} sample images to {folder}")


if __name__ == "__main__":
    main()
