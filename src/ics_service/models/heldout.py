"""Photos held out from calibration: a different source from scikit-image's bundled photos.

An INT8 model is calibrated on variations of scikit-image's photos (`calibration`); judged
on variations of the same photos, it is judged on what it was tuned for. These photos come
from Debian's `tuxpaint-stamps-default` package (Tux Paint's stamps, version 2022.06.04-1
when this was written): about a hundred photographs of animals, fruit, flowers, trees,
vehicles and objects, cut out on transparent backgrounds, which Debian installs in
`/usr/share/tuxpaint/stamps` (`apt-get install --no-install-recommends
tuxpaint-stamps-default`: 161 MB, no dependencies).

Not every stamp is a photograph. A stamp is kept when (`is_photo`): it is not in a
`cartoon` folder; its shorter side is at least `MIN_SIDE` pixels; at least a quarter of it
is opaque; its opaque pixels have at least `MIN_COLOURS` distinct colours (6 bits a channel,
on a 128×128 thumbnail); and its 16 commonest colours cover less than half of them (flat
drawings fail these two). Each kept stamp is flattened onto white, as a product photo.

    python -m ics_service.models.heldout [--write DIR]   # list (or write) the photos
"""

from __future__ import annotations

import argparse
import io
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ModelNotPrepared
from .calibration import EVALUATION, augment

PACKAGE = "tuxpaint-stamps-default"
STAMPS_DIR = Path("/usr/share/tuxpaint/stamps")
INSTALL_HINT = f"apt-get install --no-install-recommends {PACKAGE}"
EXTENSIONS = (".png", ".jpg", ".jpeg")
MIN_SIDE = 150
MIN_COLOURS = 1000
MIN_OPAQUE = 0.25
MAX_TOP16 = 0.5


def is_photo(image: Image.Image) -> bool:
    """Whether a stamp looks like a photograph rather than a drawing (see the module notes)."""
    if min(image.size) < MIN_SIDE:
        return False
    rgba = np.asarray(image.convert("RGBA").resize((128, 128), Image.Resampling.BILINEAR))
    opaque = rgba[..., 3] > 127
    if opaque.mean() < MIN_OPAQUE:
        return False
    levels = (rgba[..., :3][opaque] // 4).astype(np.int32)
    _, counts = np.unique(
        levels[:, 0] * 4096 + levels[:, 1] * 64 + levels[:, 2], return_counts=True
    )
    if len(counts) < MIN_COLOURS:
        return False
    top16 = np.sort(counts)[::-1][:16].sum() / counts.sum()
    return bool(top16 < MAX_TOP16)


def heldout_paths(root: Path = STAMPS_DIR) -> list[Path]:
    """The stamps under `root` that are photographs, in a stable order."""
    if not root.is_dir():
        raise ModelNotPrepared(
            f"the held-out photos are not installed ({root} is missing): {INSTALL_HINT}"
        )
    found = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in EXTENSIONS or "cartoon" in path.parts:
            continue
        with Image.open(path) as image:
            if is_photo(image):
                found.append(path)
    return found


def flattened(path: Path) -> Image.Image:
    """A stamp as an RGB photo: its transparent background made white."""
    with Image.open(path) as image:
        rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _jpeg(image: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def heldout_images(paths: Iterable[Path]) -> Iterator[bytes]:
    """Each held-out photo once, as a JPEG."""
    for path in paths:
        yield _jpeg(flattened(path))


def varied_heldout(paths: Iterable[Path], count: int, seed: int = 0) -> Iterator[bytes]:
    """`count` random variations of the held-out photos (as `calibration.varied_photos` makes
    of the calibration ones), every photo equally often; deterministic."""
    photos = [flattened(p) for p in paths]
    if not photos:
        return
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(EVALUATION, 1)))
    order = rng.permutation(len(photos))
    for i in range(count):
        img = augment(photos[int(order[i % len(photos)])], rng)
        yield _jpeg(img, quality=int(rng.integers(60, 96)))


def package_version() -> str | None:
    """The installed version of the held-out photos' Debian package, if dpkg knows it."""
    try:
        done = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", PACKAGE],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


def main(argv: list[str] | None = None) -> None:
    """List the held-out photos with where each came from, or write them as JPEG files."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--root", type=Path, default=STAMPS_DIR, help="Where the stamps are.")
    p.add_argument("--write", type=Path, metavar="DIR", help="Write the photos here as JPEGs.")
    args = p.parse_args(argv)
    try:
        paths = heldout_paths(args.root)
    except ModelNotPrepared as e:
        raise SystemExit(str(e)) from None
    version = package_version() or "unknown version"
    print(f"{len(paths)} photos from {PACKAGE} ({version}) under {args.root}")
    for path in paths:
        print(path)
    if args.write:
        args.write.mkdir(parents=True, exist_ok=True)
        for i, (path, jpeg) in enumerate(zip(paths, heldout_images(paths), strict=True)):
            (args.write / f"{i:03d}-{path.stem}.jpg").write_bytes(jpeg)


if __name__ == "__main__":
    main()
