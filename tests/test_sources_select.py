"""--include / --exclude on local folders and globs, and through `ics classify`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import imagefiles as f
from cli import ics
from ics_service import sources
from ics_service.errors import ExitCode, UsageError


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    (root / "2024" / "may").mkdir(parents=True)
    (root / "a.jpg").write_bytes(f.jpeg())
    (root / "b.png").write_bytes(f.encode(f.coffee(), "PNG"))
    (root / "2024" / "c.jpg").write_bytes(f.jpeg())
    (root / "2024" / "may" / "d.png").write_bytes(f.encode(f.coffee(), "PNG"))
    return root


def listed(tree: Path, specs: list[str], include: list[str], exclude: list[str]) -> list[str]:
    got = sources.expand(specs, sources.Selection(include, exclude))
    return [str(Path(u).relative_to(tree)) for u in got]


def test_a_name_pattern_matches_in_any_folder_a_path_pattern_under_the_source(
    tree: Path,
) -> None:
    assert listed(tree, [str(tree)], ["*.png"], []) == ["b.png", "2024/may/d.png"]
    assert listed(tree, [str(tree)], ["2024/**"], ["*.png"]) == ["2024/c.jpg"]
    assert listed(tree, [str(tree)], [], ["2024/*"]) == ["a.jpg", "b.png", "2024/may/d.png"]
    # A glob's items are relative to its literal folder.
    assert listed(tree, [f"{tree}/2024/**/*"], ["may/*"], []) == ["2024/may/d.png"]
    # A named file is matched by its name.
    assert listed(tree, [str(tree / "a.jpg"), str(tree / "b.png")], [], ["*.jpg"]) == ["b.png"]


def test_a_bad_pattern_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="invalid glob pattern"):
        sources.Selection(["[z-a].jpg"])


def test_classify_applies_the_filters_and_records_them_for_resume(
    ics_home: Path, tree: Path
) -> None:
    res = ics("classify", str(tree), "--include", "*.png", "--exclude", "2024/**", "-o", "o.jsonl")
    assert res.exit_code in (ExitCode.OK, ExitCode.FAILED), res.output
    uris = [json.loads(line)["uri"] for line in Path("o.jsonl").read_text().splitlines()]
    assert uris == [str(tree / "b.png")]
    res = ics("executions", "list", "--json")
    execution = json.loads(res.output)[0]
    res = ics("executions", "show", execution["execution_id"], "--json")
    params = json.loads(res.output)["params"]
    assert params["include"] == ["*.png"] and params["exclude"] == ["2024/**"]
