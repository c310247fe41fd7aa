"""The figures check: every performance number the docs quote is one the committed run has.

    python -m benchmarks.figures                 # README.md and docs/*.md; exit 1 on a problem
    python -m benchmarks.figures docs/performance.md

Performance figures in README.md and docs/ are written inside figures blocks:

    <!-- figures -->
    ... 144.1 images/s ... 1.51 × the plain loop ... 0.52 s ... | p99 ms | 406.5 | ...
    <!-- /figures -->

Inside a block every number with a unit (images/s, photos/s, requests/s, images/h,
results/s, core-hours, cores, h, ms, s, min, MB, %, ×) and every decimal number (a bare
decimal is a ratio: "0.83 of the bound") must be a figure of the committed run, of the
same unit, at the rounding shown: `144.1 images/s` is found when the run has an images/s
figure within 0.05 of it. A number without a unit
takes the unit of its table column's header, or of the number it is paired with
("131.3 against 144.1 images/s", "0.65, 0.51, 0.46 s"). Whole numbers without a unit are
counts (1,500 photos, 32 clients) and are not checked; neither is anything in code.
A run id in a block (`20261129T2357Z-b7d90d3-...`) must be the committed run's.

The committed run's figures are what `benchmarks/RESULTS.md` shows when the harness
renders it again from `benchmarks/results.json` (`python -m benchmarks.run --rerender`):
the harness's own medians, ratios and roundings, read with the same units; plus the few
ratios the docs quote that RESULTS.md does not print (`DERIVED`). A block may name another
committed JSON file instead, `<!-- figures: ../benchmarks/decode_compare.json -->`: its
numbers are then every number that file holds, whatever the unit.

Outside blocks, a throughput (a number followed by images/s, photos/s, requests/s,
images/h or results/s) is an error: it is a performance figure that nothing checks.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS_JSON = ROOT / "benchmarks" / "results.json"

#: Unit → how it is written after a number (first match wins; order matters).
UNITS: list[tuple[str, str]] = [
    ("images/s", r"(?:images|photos|requests|img)/s\b|(?:images|photos) per second\b"),
    ("images/h", r"(?:images|photos)/h\b|(?:images|photos) (?:an|a|per) hour\b"),
    ("results/s", r"(?:results|inserts|writes)/s\b|(?:results|inserts|writes) (?:a|per) second\b"),
    ("core-hours", r"core-hours?\b|CPU-hours?\b"),
    ("cores", r"cores?\b"),
    ("h", r"h\b|hours?\b"),
    ("ms", r"(?:CPU )?ms\b"),
    ("min", r"min\b|minutes?\b"),
    ("s", r"s\b|seconds?\b"),
    ("MB", r"MB\b"),
    ("%", r"%"),
    ("×", r"×(?!\s*\d)"),
]
_UNIT_AFTER = [(unit, re.compile(r"[ \t\n\u00a0]*(?:" + pattern + ")")) for unit, pattern in UNITS]
#: Table headers → the unit of a column's bare numbers (searched in the header's text).
HEADER_UNITS: list[tuple[str, re.Pattern[str]]] = [
    ("images/s", re.compile(r"(?:images|photos|requests)/s|\brange\b")),
    ("images/h", re.compile(r"(?:images|photos)/h\b")),
    ("results/s", re.compile(r"(?:results|inserts|writes)/s\b")),
    ("core-hours", re.compile(r"\bcore-hours\b")),
    ("ms", re.compile(r"\bms\b")),
    ("min", re.compile(r"\bmin\b")),
    ("s", re.compile(r"\bs\b")),
    ("MB", re.compile(r"\bMB\b")),
    ("%", re.compile(r"%|\bshare\b")),
    ("×", re.compile(r"÷|×|speed-up")),
    ("cores", re.compile(r"\bcores\b")),
    ("h", re.compile(r"\bh\b|\bhours\b")),
]
NUMBER = re.compile(r"(?<![\w.\-/])(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?(?![\w])")
#: Between two numbers that share the second one's unit: "131.3 against 144.1 images/s".
PAIRED = re.compile(r"[ \t\n]*(?:,|against|vs\.?|and|to|or|–|-)[ \t\n]*$")
RUN_ID = re.compile(r"\b\d{8}T\d{4}Z-[0-9a-f]{7,}(?:-[\w+.-]+)?")
BLOCK = re.compile(
    r"<!-- figures(?::\s*(?P<source>[^>]*?))?\s*-->(?P<body>.*?)<!-- /figures -->", re.S
)
THROUGHPUT = re.compile(
    r"(?<![\w.])\d[\d,]*(?:\.\d+)?[ \t\n\u00a0]*"
    r"(?:(?:images|photos|requests)(?:/s\b| per second)"
    r"|(?:images|photos)(?:/h\b| (?:an|a|per) hour)"
    r"|(?:results|inserts|writes)(?:/s\b| (?:a|per) second))"
)


@dataclass(frozen=True)
class Quoted:
    """A number as a page writes it."""

    value: float
    decimals: int
    unit: str | None
    text: str
    line: int


@dataclass(frozen=True)
class Problem:
    path: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


def _strip_code(text: str) -> str:
    """Blank out fenced code, inline code and HTML comments, keeping the line numbers."""

    def blank(m: re.Match[str]) -> str:
        return re.sub(r"[^\n]", " ", m.group(0))

    text = re.sub(r"^```.*?^```", blank, text, flags=re.S | re.M)
    text = re.sub(r"<!--.*?-->", blank, text, flags=re.S)
    return re.sub(r"`[^`\n]*`", blank, text)


def _unit_after(text: str) -> str | None:
    for unit, pattern in _UNIT_AFTER:
        if pattern.match(text):
            return unit
    return None


def _header_unit(header: str) -> str | None:
    for unit, pattern in HEADER_UNITS:
        if pattern.search(header):
            return unit
    return None


def quoted_numbers(text: str, first_line: int = 1) -> list[Quoted]:
    """Every number of a piece of Markdown, with the unit it is written with (or None)."""
    clean = _strip_code(text)
    out: list[Quoted] = []
    header: list[str] | None = None
    lines = clean.split("\n")
    # Prose is read as one text per paragraph, so that a unit on the next line counts.
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if all(re.fullmatch(r":?-+:?", c) for c in cells if c):
                i += 1
                continue
            if header is None:
                header = cells
            else:
                for col, cell in enumerate(cells):
                    column_unit = _header_unit(header[col]) if col < len(header) else None
                    out += _numbers(cell, first_line + i, column_unit)
            i += 1
            continue
        header = None
        start = i
        para = []
        while i < len(lines) and lines[i].strip() and not lines[i].lstrip().startswith("|"):
            para.append(lines[i])
            i += 1
        if not para:
            i += 1
            continue
        out += _numbers("\n".join(para), first_line + start, None)
    return out


def _numbers(text: str, line: int, column_unit: str | None) -> list[Quoted]:
    found: list[tuple[re.Match[str], str | None]] = []
    for m in NUMBER.finditer(text):
        after = text[m.end() :]
        before = text[: m.start()]
        if after.startswith("×") and re.match(r"×\s*\d", after):
            found.append((m, "count"))  # a dimension: 500×375
            continue
        if before.endswith("×") and before[:-1][-1:].isdigit():
            found.append((m, "count"))
            continue
        unit = _unit_after(after)
        if unit is None and before.rstrip().endswith("×"):
            unit = "×"  # written as a factor: (×0.955)
        if (
            unit is None
            and column_unit
            and text.strip().strip("*~+").replace(",", "") == (m.group(0).replace(",", ""))
        ):
            unit = column_unit
        found.append((m, unit))
    # A bare number paired with the next one takes its unit: "0.65, 0.51, 0.46 s".
    units = [u for _, u in found]
    for k in range(len(found) - 2, -1, -1):
        m, u = found[k]
        nxt = found[k + 1][0]
        if (
            u is None
            and units[k + 1] not in (None, "count")
            and PAIRED.match(text[m.end() : nxt.start()])
        ):
            units[k] = units[k + 1]
    out = []
    for (m, _), unit in zip(found, units, strict=True):
        if unit == "count":
            continue
        digits, decimals = m.group(1).replace(",", ""), m.group(2) or ""
        if unit is None and not decimals:
            continue  # a count: 1,500 photos, 32 clients
        value = float(f"{digits}.{decimals}" if decimals else digits)
        lineno = line + text[: m.start()].count("\n")
        out.append(Quoted(value, len(decimals), unit or "×", m.group(0), lineno))
    return out


# --- the committed run's figures ---------------------------------------------------------


def _get(doc: dict[str, Any], *keys: str) -> float:
    value: Any = doc
    for key in keys:
        value = value[key]
    return float(value)


#: Ratios the docs quote that RESULTS.md does not print, each from results.json.
DERIVED: dict[str, tuple[str, Callable[[dict[str, Any]], float]]] = {
    "ICS's steady rate ÷ the pipelined bound, small photos": (
        "×",
        lambda d: (
            _get(d, "summary", "ics/small", "steady_images_per_s")
            / _get(d, "summary", "bounds", "pipelined", "small", "bound")
        ),
    ),
    "`ics classify --model efficientnet-lite0-int8` ÷ `ics classify`, small photos": (
        "×",
        lambda d: (
            _get(d, "summary", "ics-int8/small", "images_per_s")
            / _get(d, "summary", "ics/small", "images_per_s")
        ),
    ),
}


def rendered_results(results_json: Path = RESULTS_JSON) -> str:
    """RESULTS.md as the harness renders it from `results_json` (nothing else is run)."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "results.json").write_bytes(results_json.read_bytes())
        subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.run",
                "--rerender",
                "--results",
                str(work / "RESULTS.md"),
                "--out",
                str(work / "out"),
            ],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        return (work / "RESULTS.md").read_text(encoding="utf-8")


@dataclass
class Figures:
    """The figures a block may quote, by unit (None: any unit), and the run id."""

    by_unit: dict[str | None, list[tuple[float, int]]]
    run_id: str | None

    def has(self, q: Quoted) -> bool:
        candidates = self.by_unit.get(q.unit, []) + self.by_unit.get(None, [])
        half = 0.5 * 10.0 ** (-q.decimals)
        for value, decimals in candidates:
            if decimals < q.decimals:
                continue  # shown more precisely than the run shows it
            if abs(value - q.value) <= half + 1e-9 * max(1.0, abs(value)):
                return True
        return False


def committed_figures(results_json: Path = RESULTS_JSON) -> Figures:
    doc = json.loads(results_json.read_text(encoding="utf-8"))
    by_unit: dict[str | None, list[tuple[float, int]]] = {}
    for q in quoted_numbers(rendered_results(results_json)):
        by_unit.setdefault(q.unit, []).append((q.value, q.decimals))
    for unit, formula in DERIVED.values():
        by_unit.setdefault(unit, []).append((formula(doc), 12))
    return Figures(by_unit, doc.get("run_id"))


def json_figures(path: Path) -> Figures:
    """Every number a committed JSON file holds, for any unit; its run id."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    values: list[tuple[float, int]] = []

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
        elif isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            values.append((float(v), 12))
            if 0 < abs(v) <= 1:
                values.append((float(v) * 100, 12))  # a fraction quoted as a percentage

    walk(doc)
    return Figures({None: values}, doc.get("run_id") if isinstance(doc, dict) else None)


# --- the check ---------------------------------------------------------------------------


def check_text(
    text: str, path: str, figures: Figures, sources: Callable[[str], Figures]
) -> list[Problem]:
    """Problems of one page: figures not in the run, run ids of another run, and
    throughputs outside any block."""
    problems: list[Problem] = []
    outside = text
    for block in BLOCK.finditer(text):
        first_line = text[: block.start("body")].count("\n") + 1
        source = (block.group("source") or "").strip()
        figs = sources(source) if source else figures
        where = source or "benchmarks/results.json"
        for run in RUN_ID.finditer(block.group("body")):
            line = first_line + block.group("body")[: run.start()].count("\n")
            if figs.run_id is None or not figs.run_id.startswith(run.group(0)):
                problems.append(
                    Problem(
                        path,
                        line,
                        f"run {run.group(0)} is not the run of {where} ({figs.run_id}): "
                        "quote the committed run",
                    )
                )
        for q in quoted_numbers(block.group("body"), first_line):
            if not figs.has(q):
                unit = f" {q.unit}" if q.unit != "×" else " (a ratio)"
                problems.append(
                    Problem(
                        path,
                        q.line,
                        f"{q.text}{unit} is not a figure of {where} at that rounding "
                        "(see benchmarks/RESULTS.md; a ratio it does not print goes in "
                        "benchmarks/figures.py's DERIVED)",
                    )
                )
        outside = outside.replace(block.group(0), re.sub(r"[^\n]", " ", block.group(0)), 1)
    clean = _strip_code(outside)
    for m in THROUGHPUT.finditer(clean):
        problems.append(
            Problem(
                path,
                clean[: m.start()].count("\n") + 1,
                f"{' '.join(m.group(0).split())} is a performance figure outside a "
                "<!-- figures --> block: put it in one, so that it is checked",
            )
        )
    unclosed = text.count("<!-- figures") - len(BLOCK.findall(text))
    if unclosed:
        problems.append(Problem(path, 1, "a <!-- figures --> block has no <!-- /figures -->"))
    return problems


def default_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def check(pages: Iterable[Path], results_json: Path = RESULTS_JSON) -> list[Problem]:
    figures = committed_figures(results_json)
    problems: list[Problem] = []
    cache: dict[Path, Figures] = {}
    for page in pages:

        def source(rel: str, page: Path = page) -> Figures:
            path = (page.parent / rel).resolve()
            if path not in cache:
                cache[path] = json_figures(path)
            return cache[path]

        name = page.relative_to(ROOT).as_posix() if page.is_relative_to(ROOT) else str(page)
        problems += check_text(page.read_text(encoding="utf-8"), name, figures, source)
    return problems


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    pages = [Path(a).resolve() for a in args] or default_pages()
    problems = check(pages)
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} figure(s) not in the committed benchmark run", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
