"""The docs: figures from the committed benchmark run, a strict offline build, references
generated from the code, and a README that stays a front door."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `benchmarks` is a folder of the repository, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import figures  # noqa: E402

PERFORMANCE = ROOT / "docs" / "performance.md"


@pytest.fixture(scope="module")
def committed() -> figures.Figures:
    return figures.committed_figures()


def _check(text: str, committed: figures.Figures) -> list[figures.Problem]:
    return figures.check_text(
        text,
        "docs/performance.md",
        committed,
        lambda rel: figures.json_figures((PERFORMANCE.parent / rel).resolve()),
    )


def test_docs_quote_only_figures_of_the_committed_run() -> None:
    problems = figures.check(figures.default_pages())
    assert not problems, "\n".join(map(str, problems))


def test_the_check_reads_the_figures_it_must(committed: figures.Figures) -> None:
    # The performance page's blocks hold the headline figures; the check must see them.
    quoted = figures.quoted_numbers(PERFORMANCE.read_text(encoding="utf-8"))
    seen = {(q.text, q.unit) for q in quoted}
    assert ("144.1", "images/s") in seen  # a table cell, by its column's header
    assert ("1.51", "×") in seen
    assert ("0.52", "s") in seen
    assert ("406.5", "ms") in seen
    assert ("0.65", "s") in seen  # paired: "0.65, 0.51 and 0.46 s"
    assert ("1,500", None) not in {(q.text, q.unit) for q in quoted}  # a count


@pytest.mark.parametrize(
    ("right", "wrong", "said"),
    [
        ("| 144.1 | 95.7 |", "| 145.1 | 95.7 |", "145.1 images/s"),  # a table cell
        ("1.51 × the plain loop", "1.61 × the plain loop", "1.61 (a ratio)"),
        ("its 0.52 s start-up", "its 0.48 s start-up", "0.48 s"),  # another run's figure
        ("took 23.6 min", "took 22 min", "22 min"),  # the stale duration
        ("(131.3 against 144.1 images/s)", "(131.3 against 144.6 images/s)", "144.6"),
        ("its 0.52 s start-up", "its 0.520 s start-up", "0.520 s"),  # more precise than shown
        ("(0.87 at steady state", "(0.88 at steady state", "0.88 (a ratio)"),  # a DERIVED one
        ("keeps\n  its top-1", "keeps 90.1 % / 98.5 % of\n  its top-1", "98.5 %"),
    ],
)
def test_a_planted_wrong_figure_fails_the_check(
    committed: figures.Figures, right: str, wrong: str, said: str
) -> None:
    text = PERFORMANCE.read_text(encoding="utf-8")
    if right == "took 23.6 min":
        text = text.replace("the whole run took 23.6 min", "the whole run " + right)
    assert right in text, right
    assert not _check(text, committed)
    problems = _check(text.replace(right, wrong, 1), committed)
    assert len(problems) == 1, problems
    line = text[: text.index(right)].count("\n") + 1
    assert problems[0].line == line
    assert said in problems[0].message


def test_a_figure_outside_a_block_or_of_another_run_fails(committed: figures.Figures) -> None:
    text = "# Speed\n\nICS classifies 150 images/s here.\n"
    (problem,) = _check(text, committed)
    assert problem.line == 3 and "outside a <!-- figures --> block" in problem.message
    text = "<!-- figures -->\nRun `20261129T2147Z-d0a4ab0` measured it.\n<!-- /figures -->\n"
    (problem,) = _check(text, committed)
    assert problem.line == 2 and "20261129T2147Z-d0a4ab0 is not the run" in problem.message
    problems = _check("<!-- figures -->\n144.1 images/s\n", committed)
    assert any("no <!-- /figures -->" in p.message for p in problems), problems


def test_a_block_may_quote_another_committed_file(committed: figures.Figures) -> None:
    ok = "<!-- figures: ../benchmarks/decode_compare.json -->\n61.5 photos/s\n<!-- /figures -->"
    assert not _check(ok, committed)
    (problem,) = _check(ok.replace("61.5", "66.5"), committed)
    assert "66.5" in problem.message and "decode_compare.json" in problem.message


def _hooks() -> object:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import docs_hooks  # type: ignore[import-not-found]

        return docs_hooks
    finally:
        sys.path.remove(str(ROOT / "scripts"))


def test_the_settings_reference_has_every_setting() -> None:
    from ics_service.config import Settings, default

    page = _hooks().settings_reference()  # type: ignore[attr-defined]
    for name in Settings.model_fields:
        row = next(line for line in page.splitlines() if line.startswith(f"| `{name}` |"))
        assert f"`ICS_{name.upper()}`" in row
        if default(name) is not None and name != "retry":
            assert str(default(name)).lower().strip("[]") in row.lower().replace('"', "")
    assert "`--threshold` (classify" in page
    assert "| `Notify` |" in page  # the retry defaults per step


def test_a_topic_page_gets_its_group_of_settings_or_a_clear_error() -> None:
    hooks = _hooks()
    table = hooks.settings_table("alerts")  # type: ignore[attr-defined]
    assert "| `notify_timeout_s` |" in table and "| `threshold` |" not in table
    with pytest.raises(ValueError, match=r"no settings group 'alert'.*'alerts'"):
        hooks.settings_table("alert")  # type: ignore[attr-defined]


def test_the_cli_reference_has_every_command() -> None:
    from ics_service.cli import main

    page = _hooks().cli_reference()  # type: ignore[attr-defined]
    for path, _ in _hooks()._walk(main, ["ics"]):  # type: ignore[attr-defined]
        assert f"`{' '.join(path)}`" in page
    assert "-h, --help" in page  # rendered with the command's own context settings


def _build(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    mkdocs = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", "mkdocs.yml"]
    return subprocess.run(mkdocs, cwd=root, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_the_strict_build_fails_on_a_broken_link(tmp_path: Path) -> None:
    # A copy of what the site is built from: mkdocs.yml, docs/, the hooks and the
    # repository files the pages link to.
    hooks = _hooks()
    wanted = ["mkdocs.yml", "scripts/docs_hooks.py", *hooks.REPO_FILES]  # type: ignore[attr-defined]
    wanted += hooks._benchmark_files(ROOT)  # type: ignore[attr-defined]
    for rel in wanted:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / rel, tmp_path / rel)
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    done = _build(tmp_path)
    assert done.returncode == 0, done.stderr  # the copy builds as the repository does
    planted = tmp_path / "docs" / "executions.md"
    planted.write_text(
        planted.read_text(encoding="utf-8")
        + "\nSee [the queue](queue.md) and [its limits](classify.md#no-such-section).\n",
        encoding="utf-8",
    )
    done = _build(tmp_path)
    assert done.returncode != 0, done.stderr
    assert "link 'queue.md', but the target is not found" in done.stderr, done.stderr
    assert "'#no-such-section'" in done.stderr, done.stderr


def test_readme_is_a_front_door() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README.md links to {target}, which is not there"
