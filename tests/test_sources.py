"""Listing SOURCE arguments and reading items from local files."""

from __future__ import annotations

import contextlib
import csv
import functools
import glob
import json
import os
import re
import shutil
import socket
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

import imagefiles as f
from cli import ics
from ics_service import sources
from ics_service.config import load_settings
from ics_service.engine import ExecutionRunner
from ics_service.errors import ImageTooLarge, SourceNotFound, SourceUnreadable, UsageError
from ics_service.models.runtime import OnnxRuntime
from ics_service.store import Store
from ics_service.types import ExecutionStatus


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "a.jpg").write_bytes(f.jpeg())
    (root / "sub" / "b.png").write_bytes(f.encode(f.coffee(), "PNG"))
    (root / "sub" / "deeper" / "no_extension").write_bytes(f.jpeg())  # found by content
    (root / "sub" / "misnamed.txt").write_bytes(f.encode(f.coffee(), "WEBP"))
    (root / "sub" / "broken.jpg").write_bytes(b"")  # reported, not skipped
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden" / "c.jpg").write_bytes(f.jpeg())
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    return root


def names(uris: list[str], root: Path) -> list[str]:
    return [str(Path(u).relative_to(root)) for u in uris]


def test_folder_is_walked_recursively_by_content(tree: Path) -> None:
    got = names(list(sources.expand([str(tree)])), tree)
    assert got == [
        "a.jpg",
        "sub/b.png",
        "sub/broken.jpg",
        "sub/misnamed.txt",
        "sub/deeper/no_extension",
    ]


def test_glob_list_file_and_plain_file(tree: Path, tmp_path: Path) -> None:
    assert names(list(sources.expand([str(tree / "**" / "*.png")])), tree) == ["sub/b.png"]
    listing = tmp_path / "list.txt"
    listing.write_text(f"# my photos\n{tree / 'a.jpg'}\n\n{tree / 'sub'}\n")
    got = names(list(sources.expand([f"@{listing}"])), tree)
    assert got[0] == "a.jpg" and "sub/b.png" in got
    uris = list(sources.expand([str(tree / "missing.jpg")]))
    assert uris == [str(tree / "missing.jpg")]  # named files are items even when missing


def test_uris_are_absolute(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tree)
    (uri,) = sources.expand(["a.jpg"])
    assert os.path.isabs(uri)


def test_missing_list_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read list file"):
        list(sources.expand([f"@{tmp_path / 'nope.txt'}"]))


def test_unknown_scheme_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="gopher://"):
        list(sources.expand(["gopher://example/a.jpg"]))


def test_read_errors(tree: Path) -> None:
    with pytest.raises(SourceNotFound, match="no such file"):
        sources.read(str(tree / "nope.jpg"), 1000)
    with pytest.raises(SourceUnreadable, match="folder"):
        sources.read(str(tree / "sub"), 1000)
    with pytest.raises(ImageTooLarge, match="max_bytes"):
        sources.read(str(tree / "a.jpg"), 100)
    fifo = tree / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(SourceUnreadable, match="not a regular file"):
        sources.read(str(fifo), 1000)  # must not block
    assert sources.read(str(tree / "a.jpg"), 10**7) == (tree / "a.jpg").read_bytes()
    assert sources.read("file://" + str(tree / "a.jpg"), 10**7)


# --- special files: never opened, never blocking ------------------------------------------

T = TypeVar("T")


def in_thread(fn: Callable[[], T], *, unblock: Path | None = None, timeout: float = 20.0) -> T:
    """fn() run in a thread with a deadline, so a listing that blocks fails instead of hanging."""
    out: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # re-raised in the test's thread
            errors.append(e)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        if unblock is not None:  # a writer lets a reader blocked on the FIFO go
            with contextlib.suppress(OSError):
                os.close(os.open(unblock, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"still running after {timeout} s: it blocks")
    if errors:
        raise errors[0]
    return out[0]


@pytest.fixture
def specials(tree: Path) -> Iterator[Path]:
    """tree with a FIFO (no extension: a content sniff would open it), a FIFO named like a
    photo, a bound AF_UNIX socket and a link to a device."""
    os.mkfifo(tree / "pipe")
    os.mkfifo(tree / "sub" / "fifo.jpg")
    (tree / "null").symlink_to("/dev/null")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.getcwd()
    os.chdir(tree)  # a short relative name: AF_UNIX paths are limited to ~108 bytes
    try:
        sock.bind("sock")
    finally:
        os.chdir(old)
    try:
        yield tree
    finally:
        sock.close()


def test_special_files_in_a_folder_are_skipped_without_blocking(
    specials: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tree = specials
    got = in_thread(lambda: list(sources.expand([str(tree)])), unblock=tree / "pipe")
    assert names(got, tree) == [
        "a.jpg",
        "sub/b.png",
        "sub/broken.jpg",
        "sub/misnamed.txt",
        "sub/deeper/no_extension",
    ]
    warned = caplog.text
    for special in ("pipe", "sub/fifo.jpg", "sock", "null"):
        assert f"skipping {tree / special}: not a regular file" in warned
    assert "a FIFO" in warned and "a socket" in warned and "a device" in warned
    # A glob meets them too: skipped the same way.
    got = in_thread(lambda: list(sources.expand([str(tree / "*")])), unblock=tree / "pipe")
    in_sub = names(list(sources.expand([str(tree / "sub")])), tree)
    assert names(got, tree) == ["a.jpg", "notes.txt", *in_sub]


def test_special_files_named_directly_are_items_that_fail(specials: Path) -> None:
    tree = specials
    named = [str(tree / n) for n in ("pipe", "sock", "null")]
    got = in_thread(lambda: list(sources.expand(named)), unblock=tree / "pipe")
    assert got == named  # listed without being opened
    for uri in got:
        with pytest.raises(SourceUnreadable, match="not a regular file"):
            in_thread(functools.partial(sources.read, uri, 1000), unblock=tree / "pipe")


# --- folder symlinks: followed, never looping ---------------------------------------------


@pytest.fixture
def linked(tmp_path: Path) -> Path:
    """A photos folder linking to another disk, with loops of every kind and a broken link."""
    other = tmp_path / "other_disk"
    other.mkdir()
    (other / "far.jpg").write_bytes(f.jpeg())
    root = tmp_path / "linked"
    (root / "d1").mkdir(parents=True)
    (root / "d2").mkdir()
    (root / "a.jpg").write_bytes(f.jpeg())
    (root / "d1" / "one.jpg").write_bytes(f.jpeg())
    (root / "d2" / "two.jpg").write_bytes(f.jpeg())
    (root / "d1" / "up").symlink_to("..", target_is_directory=True)  # to an ancestor
    (root / "d1" / "to2").symlink_to("../d2", target_is_directory=True)  # d1 <-> d2
    (root / "d2" / "to1").symlink_to("../d1", target_is_directory=True)
    (root / "ping").symlink_to("pong")  # two links naming each other (ELOOP)
    (root / "pong").symlink_to("ping")
    (root / "gone.jpg").symlink_to("nowhere.jpg")  # broken
    (root / "z_other").symlink_to(other, target_is_directory=True)  # another disk
    (root / "z_other_again").symlink_to(other, target_is_directory=True)
    return root


def test_folder_symlinks_are_followed_once_and_never_loop(
    linked: Path, caplog: pytest.LogCaptureFixture
) -> None:
    got = in_thread(lambda: list(sources.expand([str(linked)])))
    assert names(got, linked) == [
        "a.jpg",
        "d1/one.jpg",
        "d1/to2/two.jpg",  # d2 is first met through d1's link, then skipped
        "z_other/far.jpg",
    ]
    assert "already listed" in caplog.text and str(linked / "d1" / "up") in caplog.text
    assert f"skipping {linked / 'gone.jpg'}: broken symbolic link" in caplog.text
    assert f"skipping {linked / 'ping'}: broken symbolic link" in caplog.text
    # Named directly, a broken link is an item that is not found.
    (uri,) = sources.expand([str(linked / "gone.jpg")])
    with pytest.raises(SourceNotFound):
        sources.read(uri, 1000)


def test_recursive_glob_follows_symlinks_without_looping(linked: Path) -> None:
    got = in_thread(lambda: list(sources.expand([str(linked / "**" / "*.jpg")])))
    assert names(got, linked) == ["a.jpg", "d1/one.jpg", "d1/to2/two.jpg", "z_other/far.jpg"]
    got = in_thread(lambda: list(sources.expand([str(linked / "d*" / "*.jpg")])))
    assert names(got, linked) == ["d1/one.jpg", "d2/two.jpg"]


# --- streaming ----------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["", "**/*.jpg", "d*/*.jpg", "**"])
def test_listing_streams_folders_are_scanned_only_when_reached(
    tmp_path: Path, pattern: str
) -> None:
    root = tmp_path / "many"
    for i in range(30):
        (root / f"d{i:02}").mkdir(parents=True)
        (root / f"d{i:02}" / "img.jpg").write_bytes(b"\xff\xd8\xff")
    it = sources.expand([str(root / pattern) if pattern else str(root)])
    first = next(it)
    assert first == str(root / "d00" / "img.jpg")
    # A folder the listing has not reached yet: what appears there now is still listed,
    # which an eager listing (all of a glob's matches at once) would miss.
    (root / "d29" / "late.jpg").write_bytes(b"\xff\xd8\xff")
    rest = list(it)
    assert len(rest) == 30 and rest[-1] == str(root / "d29" / "late.jpg")


# --- globs --------------------------------------------------------------------------------


@pytest.fixture
def globbed(tmp_path: Path) -> Path:
    root = tmp_path / "g"
    for rel in (
        "a.jpg",
        "b.png",
        "c1.jpg",
        "c2.jpg",
        "x/a.jpg",
        "x/y/a.jpg",
        "x/y/z/deep.jpg",
        "2024-01/p.jpg",
        "2024-02/q.JPG",
        "2023-12/r.jpg",
        "we[ird]/w.jpg",
        ".hid/h.jpg",
        "x/.h.jpg",
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"\xff\xd8\xff")
    return root


@pytest.mark.parametrize(
    "pattern",
    [
        "*.jpg",
        "c?.jpg",
        "c[12].jpg",
        "c[!1].jpg",
        "[a-b].*",
        "**/a.jpg",
        "x/**/a.jpg",
        "x/**/*.jpg",
        "**/*.jpg",
        "2024-*/*",
        "*/*/*.jpg",
        "we[[]ird]/*.jpg",
        "*/[!p]*.*",
        ".*/*.jpg",  # hidden names match only a segment that starts with a dot
        "x/.*",
        "**/.h*.jpg",
        ".hid/*.jpg",
        "*/.h.jpg",
    ],
)
def test_globs_match_what_glob_module_matches(globbed: Path, pattern: str) -> None:
    expected = {
        p
        for p in glob.glob(str(globbed / pattern), recursive=True)
        if os.path.isfile(p)  # these patterns match files only
    }
    got = list(sources.expand([str(globbed / pattern)]))
    assert set(got) == expected
    assert len(got) == len(expected)


def test_glob_semantics_kept(
    globbed: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (globbed / "x" / "notes.txt").write_text("not an image")
    # A matching folder lists its images; a matching file is an item whatever it holds.
    assert names(list(sources.expand([str(globbed / "x*")])), globbed) == [
        "x/a.jpg",
        "x/y/a.jpg",
        "x/y/z/deep.jpg",
    ]
    assert names(list(sources.expand([str(globbed / "x" / "*.txt")])), globbed) == ["x/notes.txt"]
    monkeypatch.chdir(globbed)
    assert list(sources.expand(["x/y/*.jpg"])) == [str(globbed / "x" / "y" / "a.jpg")]
    assert list(sources.expand(["*.nothing"])) == []
    assert "no file matches *.nothing" in caplog.text
    # A name that exists is not a glob, even with glob characters in it.
    assert list(sources.expand(["we[ird]"])) == [str(globbed / "we[ird]" / "w.jpg")]


def test_glob_translation() -> None:
    from ics_service.sources.local import split_glob, translate_glob

    assert split_glob("/data/photos/2024-*/**/*.jpg") == ("/data/photos", ["2024-*", "**", "*.jpg"])
    assert split_glob("/*.jpg") == ("/", ["*.jpg"])
    rx = re.compile(translate_glob(["a", "**", "*.jpg"]))
    assert rx.fullmatch("a/x.jpg") and rx.fullmatch("a/b/c/x.jpg")
    assert not rx.fullmatch("ab/x.jpg") and not rx.fullmatch("a/x.png")
    assert re.fullmatch(translate_glob(["[]a]"]), "]")
    assert re.fullmatch(translate_glob(["[!]a]"]), "b") and not re.fullmatch(
        translate_glob(["[!]a]"]), "]"
    )
    assert re.fullmatch(translate_glob(["a[b"]), "a[b")  # no closing ]: a literal [
    assert re.fullmatch(translate_glob(["[&~|^]"]), "^")  # no re set operations


# --- @list files --------------------------------------------------------------------------


def test_list_file_cycles_are_usage_errors(tree: Path, tmp_path: Path) -> None:
    a, b, c, d = (tmp_path / f"{n}.txt" for n in "abcd")
    a.write_text(f"{tree / 'a.jpg'}\n@{a}\n")
    with pytest.raises(UsageError, match=rf"includes itself: @{a} -> @{a}; remove the cycle"):
        list(sources.expand([f"@{a}"]))
    b.write_text(f"@{c}\n")
    c.write_text(f"{tree / 'a.jpg'}\n@{b}\n")
    with pytest.raises(UsageError, match=rf"@{b} -> @{c} -> @{b}"):
        list(sources.expand([f"@{b}"]))
    # Reading the same list twice is not a cycle (and what it names comes once).
    d.write_text(f"{tree / 'a.jpg'}\n")
    a.write_text(f"@{d}\n@{d}\n")
    assert list(sources.expand([f"@{a}"])) == [str(tree / "a.jpg")]


def test_list_file_paths_are_relative_to_cwd_and_names_may_be_old_encodings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photos = tmp_path / "p"
    photos.mkdir()
    odd = os.fsencode(photos) + b"/caf\xe9.jpg"  # Latin-1, not UTF-8
    with open(odd, "wb") as out:
        out.write(f.jpeg())
    (tmp_path / "ok.jpg").write_bytes(f.jpeg())
    listing = photos / "list.txt"
    listing.write_bytes(b"\xef\xbb\xbf" + odd + b"\r\nok.jpg\n")  # BOM and CRLF, as Notepad
    monkeypatch.chdir(tmp_path)
    uris = list(sources.expand([f"@{listing}"]))
    assert uris == [uri_of(odd), str(tmp_path / "ok.jpg")]
    assert sources.read(uris[0], 10**7) == f.jpeg()


# --- names that are not UTF-8 -------------------------------------------------------------


def uri_of(path: bytes) -> str:
    return "file://" + urllib.parse.quote(path, safe="/")


def test_path_and_uri_conversions_are_reversible(tmp_path: Path) -> None:
    from ics_service.sources import path_to_uri, uri_to_path

    assert path_to_uri("/data/photo 1.jpg") == "/data/photo 1.jpg"  # UTF-8 names unchanged
    assert path_to_uri("/data/é%.jpg") == "/data/é%.jpg"
    odd = os.fsdecode(b"/data/caf\xe9 1%.jpg")
    assert path_to_uri(odd) == "file:///data/caf%E9%201%25.jpg"
    assert os.fsencode(uri_to_path(path_to_uri(odd))) == b"/data/caf\xe9 1%.jpg"
    assert uri_to_path("/data/a%20b.jpg") == "/data/a%20b.jpg"  # a path is not decoded
    assert uri_to_path("file:///data/a%20b.jpg") == "/data/a b.jpg"
    assert uri_to_path("file://localhost/data/a.jpg") == "/data/a.jpg"
    assert sources.scheme_of("file:///x") == "file"
    assert isinstance(sources.source_for("file:///x"), sources.LocalSource)


def test_names_that_are_not_utf8_are_listed_and_read(tree: Path) -> None:
    odd = os.fsencode(tree) + b"/sub/\xff\xfe photo"  # content-sniffed, no extension
    with open(odd, "wb") as out:
        out.write(f.jpeg())
    uris = list(sources.expand([str(tree / "sub")]))
    assert uri_of(odd) in uris
    for uri in uris:
        uri.encode("utf-8")  # every URI can be written anywhere
    assert sources.read(uri_of(odd), 10**7) == f.jpeg()
    # The escaped URI given back as a SOURCE names the same file.
    assert list(sources.expand([uri_of(odd)])) == [uri_of(odd)]
    with pytest.raises(SourceNotFound, match=r"no such file: file://.*%FF%FE%20photo%20gone"):
        sources.read(uri_of(odd + b" gone"), 1000)


def test_user_file_uris_are_percent_decoded(tmp_path: Path) -> None:
    (tmp_path / "my photo.jpg").write_bytes(f.jpeg())
    uri = "file://" + urllib.parse.quote(str(tmp_path / "my photo.jpg"))
    assert list(sources.expand([uri])) == [str(tmp_path / "my photo.jpg")]
    assert sources.read(uri, 10**7) == f.jpeg()
    assert list(sources.expand(["file://" + str(tmp_path)])) == [str(tmp_path / "my photo.jpg")]


def test_classify_names_that_are_not_utf8_end_to_end(ics_home: Path, photos: Path) -> None:
    folder = ics_home.parent / "odd"
    folder.mkdir()
    odd = os.fsencode(folder) + b"/caf\xe9.jpg"
    with open(odd, "wb") as out:
        out.write((photos / "coffee.jpg").read_bytes())
    shutil.copy(photos / "coffee.jpg", folder / "coffee.jpg")
    fifo = ics_home.parent / "fifo.jpg"
    os.mkfifo(fifo)

    res = ics("classify", str(folder), str(fifo), "-o", "out.jsonl", "--json")
    assert res.exit_code in (0, 1), res.output
    lines = Path("out.jsonl").read_bytes().decode("utf-8").splitlines()  # strict UTF-8
    rows = {r["uri"]: r for r in map(json.loads, lines)}
    assert set(rows) == {uri_of(odd), str(folder / "coffee.jpg"), str(fifo)}
    assert rows[uri_of(odd)]["status"] == rows[str(folder / "coffee.jpg")]["status"]
    assert rows[uri_of(odd)]["status"] in ("SUCCEEDED", "LOW_CONFIDENCE")
    assert rows[uri_of(odd)]["label"] == rows[str(folder / "coffee.jpg")]["label"]
    assert rows[str(fifo)]["status"] == "FAILED"
    assert rows[str(fifo)]["error"]["type"] == "SourceUnreadable"

    eid = json.loads(res.stdout)["execution_id"]
    shown = json.loads(ics("executions", "show", eid, "--results", "--json").stdout)
    assert uri_of(odd) in {r["uri"] for r in shown["results"]}
    table = ics("executions", "show", eid, "--results")
    assert table.exit_code == 0 and "file:///" in table.stdout

    res = ics("classify", str(folder), "-o", "out.csv")
    assert res.exit_code in (0, 1), res.output
    with open("out.csv", encoding="utf-8", newline="") as out:
        by_uri = {r["uri"]: r for r in csv.DictReader(out)}
    assert by_uri[uri_of(odd)]["status"] in ("SUCCEEDED", "LOW_CONFIDENCE")


def test_resume_finishes_items_whose_names_are_not_utf8(
    ics_home: Path, photos: Path, runtime: OnnxRuntime
) -> None:
    folder = ics_home.parent / "odd"
    folder.mkdir()
    odd = os.fsencode(folder) + b"/\xe9t\xe9.jpg"
    with open(odd, "wb") as out:
        out.write((photos / "coffee.jpg").read_bytes())
    shutil.copy(photos / "coffee.jpg", folder / "coffee.jpg")
    settings = load_settings(None, {}).settings
    store = Store(settings.store_url)
    runner = ExecutionRunner(settings, store, runtime)
    execution, _ = runner.start([str(folder)])
    stop = threading.Event()
    stop.set()  # interrupted before any item ran
    assert runner.run(execution, stop=stop).status is ExecutionStatus.ABORTED
    store.close()

    res = ics("executions", "resume", execution.id, "--json")
    assert res.exit_code == 0, res.output
    shown = json.loads(ics("executions", "show", execution.id, "--results", "--json").stdout)
    statuses = {r["uri"]: r["status"] for r in shown["results"]}
    assert statuses == {uri_of(odd): "SUCCEEDED", str(folder / "coffee.jpg"): "SUCCEEDED"}
