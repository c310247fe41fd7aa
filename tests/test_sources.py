"""Listing SOURCE arguments and reading items from local files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import imagefiles as f
from ics_service import sources
from ics_service.errors import ImageTooLarge, SourceNotFound, SourceUnreadable, UsageError


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
