"""Decode memory: the budget shared by decode threads, bombs refused before Pillow opens them,
running out of memory. Peaks are measured for real, in a child process (VmHWM)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import imagefiles as f
from ics_service.errors import DecodeCancelled, ImageTooLarge, InvalidImage
from ics_service.imaging import DecodeBudget, Limits, Preprocessor
from ics_service.models import get_card

CARD = get_card("efficientnet-lite0")
MB = 1_000_000

# Decodes files in a fresh process, one thread each, and prints what happened and the peak
# resident memory (VmHWM) over the resident memory just before decoding.
CHILD = r"""
import ctypes, json, re, resource, sys, threading, time
from ics_service.imaging import Limits, Preprocessor
from ics_service.models import get_card

def status(key):
    return int(re.search(key + r":\s+(\d+) kB", open("/proc/self/status").read())[1]) * 1024

def reset_peak():
    ctypes.CDLL(None).malloc_trim(0)  # freed memory goes back, so a peak is this decode's
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # VmHWM := VmRSS
    return status("VmRSS")

args = json.loads(sys.argv[1])
pre = Preprocessor(get_card("efficientnet-lite0"), Limits(**args["limits"]))
files = [open(path, "rb").read() for path in args["files"]]
report = {"errors": [], "peaks": [], "needs": []}

def decode(data):
    try:
        pre(data)
    except Exception as e:
        report["errors"].append(f"{type(e).__name__}: {e}")

if args.get("one_by_one"):  # each file alone, after a first decode to warm the allocator
    from ics_service.imaging.formats import open_image
    from ics_service.imaging.limits import memory_need

    for data in files:
        decode(data)
        base = reset_peak()
        decode(data)
        report["peaks"].append(status("VmHWM") - base)
        img = open_image(data)
        full = img.size
        pre._draft(img)
        report["needs"].append(memory_need(img, full, len(data)))
else:
    if args.get("address_space"):
        limit = status("VmSize") + args["address_space"]
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    base = reset_peak()
    start = time.perf_counter()
    # One file decodes on this thread: a new thread's stack and malloc arena would take
    # address space from an RLIMIT_AS test.
    threads = [threading.Thread(target=decode, args=(data,)) for data in files[1:]]
    for t in threads:
        t.start()
    decode(files[0])
    for t in threads:
        t.join()
    report["seconds"] = time.perf_counter() - start
    report["peaks"].append(status("VmHWM") - base)
print(json.dumps(report))
"""


linux_proc = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="peaks are read from Linux's /proc"
)


def decode_in_child(files: list[Path], **args: Any) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps({"files": [str(p) for p in files], **args})],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report: dict[str, Any] = json.loads(proc.stdout)
    return report


def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def big_rgba(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 25-megapixel RGBA PNG: about 200 MB while it decodes, from a 0.5 MB file."""
    return write(tmp_path_factory.mktemp("big"), "big.png", f.flat_png((5000, 5000)))


# --- the budget ------------------------------------------------------------------------


def test_an_image_over_the_whole_budget_fails_at_once() -> None:
    pre = Preprocessor(CARD, Limits(decode_memory=50 * MB))
    data = f.flat_png((4000, 4000))
    start = time.perf_counter()
    with pytest.raises(ImageTooLarge, match=r"4000×4000 RGBA .* over decode_memory=50,000,000"):
        pre(data)
    assert time.perf_counter() - start < 1.0  # refused from the header, not decoded
    assert pre.budget.used == 0


def test_a_big_image_waits_for_memory_then_decodes() -> None:
    pre = Preprocessor(CARD, Limits(decode_memory=100 * MB))
    data = f.flat_png((2000, 2000))  # about 37 MB by the table
    pre.budget.acquire(90 * MB)  # another thread's decode, still running
    done = threading.Event()

    def decode() -> None:
        pre(data)
        done.set()

    thread = threading.Thread(target=decode)
    thread.start()
    until(lambda: pre.budget.waiting == 1)  # 90 + 37 MB is over the budget
    assert not done.is_set()
    pre.budget.release(90 * MB)
    assert done.wait(10)
    thread.join()
    assert pre.budget.used == 0


def test_a_waiting_decode_ends_when_the_run_stops() -> None:
    pre = Preprocessor(CARD, Limits(decode_memory=100 * MB))
    pre.budget.acquire(90 * MB)
    stop = threading.Event()
    errors: list[BaseException] = []
    data = f.flat_png((2000, 2000))

    def decode() -> None:
        try:
            pre(data, stop=stop)
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=decode)
    thread.start()
    until(lambda: pre.budget.waiting == 1)
    start = time.perf_counter()
    stop.set()
    thread.join(5)
    assert not thread.is_alive() and time.perf_counter() - start < 1.0
    assert len(errors) == 1 and isinstance(errors[0], DecodeCancelled)
    assert "stopped" in str(errors[0])
    assert (pre.budget.used, pre.budget.waiting) == (90 * MB, 0)  # the waiter took nothing


def test_first_come_first_served() -> None:
    budget = DecodeBudget(100)
    budget.acquire(60)
    order: list[str] = []

    def take(name: str, need: int) -> None:
        budget.acquire(need)
        order.append(name)

    big = threading.Thread(target=take, args=("big", 50))
    big.start()
    until(lambda: budget.waiting == 1)
    small = threading.Thread(target=take, args=("small", 30))
    small.start()
    until(lambda: budget.waiting == 2)
    assert order == []  # 60 + 30 would fit, but the big one came first
    budget.release(60)
    big.join(5)
    small.join(5)
    assert order == ["big", "small"] and budget.used == 80


def test_the_budget_comes_back_whatever_happens() -> None:
    pre = Preprocessor(CARD, Limits(decode_memory=200 * MB))
    broken = f.flat_png((3000, 3000))
    with pytest.raises(InvalidImage):
        pre(broken[: len(broken) // 2])  # fails halfway through the pixels
    pre(f.flat_png((300, 200)))
    assert pre.budget.used == 0


@linux_proc
def test_budget_bounds_the_peak_of_parallel_decodes(big_rgba: Path) -> None:
    budget = 300 * MB
    bounded = decode_in_child([big_rgba] * 6, limits={"decode_memory": budget})
    unbounded = decode_in_child([big_rgba] * 6, limits={"decode_memory": 10_000 * MB})
    assert bounded["errors"] == [] and unbounded["errors"] == []
    # The table overestimates each decode a little (about 8.2 bytes a pixel measured, 9
    # counted), so the budget alone should hold; the margin is for what the allocator keeps
    # per thread (glibc's arenas) and the threads' own stacks and buffers.
    assert bounded["peaks"][0] < budget + 50 * MB, bounded
    # Without the bound six decodes overlap: the test can see the difference.
    assert unbounded["peaks"][0] > 2 * budget, unbounded


@linux_proc
def test_the_table_covers_the_measured_peaks(tmp_path: Path) -> None:
    grey16 = Image.new("I;16", (2000, 2000), 40000)
    palette = Image.new("P", (2000, 2000), 3)
    photo = f.coffee().resize((4000, 3000))
    files = {
        "rgb.png": f.flat_png((2000, 2000), "RGB"),
        "rgba.png": f.flat_png((2000, 2000)),
        "grey16.png": f.encode(grey16, "PNG", compress_level=1),
        "transparent-palette.png": f.encode(palette, "PNG", transparency=3),
        "progressive.jpg": f.jpeg(photo, progressive=True),
        "rgba.webp": f.encode(Image.new("RGBA", (2000, 2000), (9, 8, 7, 100)), "WEBP"),
    }
    paths = [write(tmp_path, name, data) for name, data in files.items()]
    report = decode_in_child(paths, limits={}, one_by_one=True)
    assert report["errors"] == []
    for name, peak, need in zip(files, report["peaks"], report["needs"], strict=True):
        assert peak <= need <= 2.5 * peak + 2 * MB, (name, peak, need)


# --- what Pillow decodes inside Image.open --------------------------------------------------


@linux_proc
def test_an_icon_bomb_is_refused_before_pillow_decodes_it(tmp_path: Path) -> None:
    # A 110 kB icon whose PNG says 30000×30000: Pillow decodes it inside Image.open.
    bomb = write(tmp_path, "bomb.ico", f.ico(f.png_bomb(30_000)))
    report = decode_in_child([bomb], limits={})
    assert len(report["errors"]) == 1
    assert report["errors"][0].startswith("ImageTooLarge")
    assert "30000×30000" in report["errors"][0] and "max_pixels" in report["errors"][0]
    assert report["peaks"][0] < 20 * MB, report  # decoded, it would take 900 MB
    assert report["seconds"] < 0.5


def test_icons_within_the_limits_still_decode() -> None:
    pre = Preprocessor(CARD, Limits())
    x, info = pre(f.ico(f.encode(f.coffee().resize((256, 256)), "PNG")))
    assert x.shape == (3, 224, 224)
    assert (info.width, info.height, info.format) == (256, 256, "ICO")
    x, info = pre(f.ico(f.flat_png((1000, 800))))  # bigger than the directory can say
    assert (info.width, info.height) == (1000, 800)
    with pytest.raises(ImageTooLarge, match="1000×800 = 800,000 pixels, over max_pixels"):
        Preprocessor(CARD, Limits(max_pixels=500_000))(f.ico(f.flat_png((1000, 800))))


def test_a_webp_canvas_is_checked_before_pillow_allocates_it() -> None:
    pre = Preprocessor(CARD, Limits())
    with pytest.raises(ImageTooLarge, match="16383×16383 = 268,402,689 pixels, over max_pixels"):
        pre(f.webp_claiming((16383, 16383)))


def test_pillow_guard_trips_are_image_too_large() -> None:
    # Pillow checks a GIF frame bigger than its screen inside Image.open, before ICS can.
    pre = Preprocessor(CARD, Limits())
    with pytest.raises(ImageTooLarge, match=r"decompression bomb.*max_pixels=64,000,000"):
        pre(f.gif_frame_bigger_than_screen((60_000, 60_000)))


def test_pillow_guard_stays_on_and_never_below_max_pixels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    assert Image.MAX_IMAGE_PIXELS is not None
    before = Image.MAX_IMAGE_PIXELS
    Preprocessor(CARD, Limits(max_pixels=1000))
    after_small = Image.MAX_IMAGE_PIXELS
    Preprocessor(CARD, Limits(max_pixels=before * 3))
    after_big = Image.MAX_IMAGE_PIXELS
    assert (after_small, after_big) == (before, before * 3)  # raised, never lowered


# --- out of memory ---------------------------------------------------------------------------


@linux_proc
def test_running_out_of_memory_is_image_too_large_not_invalid(tmp_path: Path) -> None:
    # 64 megapixels of RGBA need 256 MB as soon as Pillow decodes them; the process may map
    # only 150 MB more (RLIMIT_AS), and the budget is set too high to stop it first.
    big = write(tmp_path, "big.png", f.flat_png((8000, 8000)))
    report = decode_in_child([big], limits={"decode_memory": 10_000 * MB}, address_space=150 * MB)
    assert len(report["errors"]) == 1
    error = report["errors"][0]
    assert error.startswith("ImageTooLarge: the machine ran out of memory"), error
    assert "decode_memory" in error
