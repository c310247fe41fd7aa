"""MkDocs hooks (mkdocs.yml `hooks:`): the reference pages generated from the code.

- `<!-- generated: settings -->` in a page becomes the table of every field of
  `ics_service.config.Settings` (and of a retry policy): name, type, default, environment
  variable, the flags that set it, description. Read at build time, so it cannot drift.
  `<!-- generated: settings: GROUP -->` is the table of one group (the `# --- GROUP ---`
  comment above the fields in config.py), for the page of that topic.
- `<!-- generated: cli -->` becomes `ics --help` and the help of every command and
  subcommand, from the Click command tree.
- Files of the repository outside docs/ that the pages link to (benchmark results, the
  changelog, CONTRIBUTING) are added to the site, so that a link such as
  `../benchmarks/RESULTS.md` works on GitHub and in the built site alike.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

import click
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page


def _root(config: MkDocsConfig) -> Path:
    """The repository: the folder of mkdocs.yml."""
    return Path(config.config_file_path).resolve().parent


#: Repository files the site carries: where they are, and where they sit in the site.
#: Besides these, every .md and .json file of benchmarks/ (out/ aside) keeps its place.
REPO_FILES = {
    "CHANGELOG.md": "changelog.md",
    "CONTRIBUTING.md": "contributing.md",
    "src/ics_service/capture/schema.json": "capture-schema.json",
    "examples/dominant_colour.py": "examples/dominant_colour.py",
}


def on_files(files: Files, config: MkDocsConfig) -> Files:
    root = _root(config)
    sources = dict(REPO_FILES)
    for rel in _benchmark_files(root):
        sources[rel] = rel
    for repo_path, site_path in sources.items():
        path = root / repo_path
        if path.is_file():
            files.append(File.generated(config, site_path, content=path.read_bytes()))
    return files


def _benchmark_files(root: Path) -> list[str]:
    """The benchmark results and notes (benchmarks/**/*.md, *.json), out/ aside."""
    folder = root / "benchmarks"
    return sorted(
        p.relative_to(root).as_posix()
        for p in folder.rglob("*")
        if p.suffix in (".md", ".json") and p.is_file() and "out" not in p.relative_to(folder).parts
    )


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    # A page of docs/ links to repository files as ../PATH (right on GitHub); in the site
    # they sit at their REPO_FILES place.
    if not page.file.generated_by:
        depth = page.file.src_uri.count("/") + 1
        up = "../" * depth
        for repo_path, site_path in REPO_FILES.items():
            markdown = markdown.replace(f"]({up}{repo_path}", f"]({site_path}")
        markdown = markdown.replace(f"]({up}benchmarks/", "](benchmarks/")
    if page.file.src_uri == "changelog.md":
        # Its link references are relative to the repository's page on GitHub
        # (../../compare/...): in the site, the headings stay plain text.
        markdown = re.sub(r"^\[[^\]]+\]: \.\./\.\./.*$", "", markdown, flags=re.M)
    markdown = markdown.replace("<!-- generated: settings -->", settings_reference())
    markdown = re.sub(
        r"<!-- generated: settings: (.+?) -->", lambda m: settings_table(m.group(1)), markdown
    )
    return markdown.replace("<!-- generated: cli -->", cli_reference())


# --- settings ---------------------------------------------------------------------------


def _type_name(annotation: Any) -> str:
    """A setting's type as a reader writes it in ics.toml."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        text = " or ".join(_type_name(a) for a in args if a is not type(None))
        return f"{text} (optional)" if type(None) in args else text
    if origin is typing.Literal:
        return " or ".join(f"`{json.dumps(a)}`" for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return "table"
    if origin is tuple:
        return f"list of {_type_name(args[0])}"
    simple: dict[Any, str] = {
        bool: "boolean",
        int: "integer",
        float: "number",
        str: "text",
        Path: "path",
    }
    if annotation in simple:
        return simple[annotation]
    return str(getattr(annotation, "__name__", annotation)).lower()


def _bounds(info: Any) -> str:
    parts = []
    for m in info.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            value = getattr(m, attr, None)
            if value is not None:
                parts.append(f"{sign} {value:,g}")
        pattern = getattr(m, "pattern", None)
        if pattern:
            parts.append(f"matches `{pattern}`")
    return ", ".join(parts)


def _default_text(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, dict) and value and all(hasattr(v, "model_dump") for v in value.values()):
        return "see [retry policies](settings.md#retry-policies)"
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    if isinstance(value, Path):
        value = str(value)
    text = json.dumps(value, ensure_ascii=False, default=str)
    return f"`{text}`"


def _groups(cls: type) -> dict[str, str]:
    """Field name → the `# --- TITLE ---` comment above it in the class's source."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    tree = ast.parse(source)
    body = tree.body[0]
    assert isinstance(body, ast.ClassDef)
    titles = {}
    for i, line in enumerate(lines, start=1):
        m = re.match(r"\s*# -+ (.+?) -+\s*$", line)
        if m:
            titles[i] = m.group(1).strip()
    out = {}
    for node in body.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above = [title for line, title in titles.items() if line < node.lineno]
            out[node.target.id] = above[-1] if above else "General"
    return out


def _flags() -> dict[str, list[str]]:
    """Setting name → `--flag` (commands) for every option of the CLI that sets it."""
    from ics_service.cli import main
    from ics_service.config import Settings

    found: dict[str, dict[str, list[str]]] = {}
    for path, command in _walk(main, ["ics"]):
        for p in command.params:
            if isinstance(p, click.Option) and p.name in Settings.model_fields:
                flag = max(p.opts, key=len)
                found.setdefault(p.name, {}).setdefault(flag, []).append(" ".join(path[1:]))
    out = {}
    for name, by_flag in found.items():
        out[name] = [
            f"`{flag}`" + ("" if len(cmds) > 6 else " (" + ", ".join(cmds) + ")")
            for flag, cmds in by_flag.items()
        ]
    return out


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


_TABLE_HEAD = [
    "| setting | type | default | environment, flags | meaning |",
    "|---|---|---|---|---|",
]


def _setting_rows() -> dict[str, list[str]]:
    """The settings table's rows, by the group (source comment) each field sits under."""
    from ics_service.config import ENV_PREFIX, Settings, default

    flags = _flags()
    groups = _groups(Settings)
    by_group: dict[str, list[str]] = {}
    for name, info in Settings.model_fields.items():
        bounds = _bounds(info)
        kind = _type_name(info.annotation) + (f", {bounds}" if bounds else "")
        how = [f"`{ENV_PREFIX}{name.upper()}`", *flags.get(name, [])]
        row = (
            f"| `{name}` | {_cell(kind)} | {_default_text(default(name))} | "
            f"{'<br>'.join(how)} | {_cell(info.description or '')} |"
        )
        by_group.setdefault(groups.get(name, "General"), []).append(row)
    return by_group


def settings_table(group: str) -> str:
    """One group's table, for the page of its topic (`<!-- generated: settings: alerts -->`)."""
    rows = _setting_rows()
    if group not in rows:
        raise ValueError(
            f"no settings group {group!r}: the groups are the `# --- NAME ---` comments of "
            f"Settings in src/ics_service/config.py: {', '.join(map(repr, rows))}"
        )
    return "\n".join([*_TABLE_HEAD, *rows[group]]) + "\n"


def settings_reference() -> str:
    from ics_service.config import RetryPolicy, default

    out = []
    for title, rows in _setting_rows().items():
        out += [f"### {title[:1].upper() + title[1:]}", "", *_TABLE_HEAD, *rows, ""]
    out += [
        "### Retry policies",
        "",
        "`retry` holds one policy per step (`[retry.SerializeImageData]`, "
        "`[retry.ClassifyImage]`, `[retry.Notify]` in ics.toml). A step's table may set any "
        "of these fields; the others keep the step's default.",
        "",
        "| field | type | default | meaning |",
        "|---|---|---|---|",
    ]
    comments = _field_comments(RetryPolicy)
    for name, info in RetryPolicy.model_fields.items():
        bounds = _bounds(info)
        kind = _type_name(info.annotation) + (f", {bounds}" if bounds else "")
        value = info.get_default(call_default_factory=True)
        out.append(
            f"| `{name}` | {_cell(kind)} | {_default_text(value)} | "
            f"{_cell(info.description or comments.get(name, ''))} |"
        )
    defaults = default("retry")
    out += ["", "The defaults per step:", "", "| step | policy |", "|---|---|"]
    for step, policy in defaults.items():
        changed = {
            k: v
            for k, v in policy.model_dump(mode="json").items()
            if v != RetryPolicy.model_fields[k].get_default(call_default_factory=True)
            and not (isinstance(v, list) and tuple(v) == RetryPolicy.model_fields[k].default)
        }
        text = ", ".join(f"`{k} = {json.dumps(v)}`" for k, v in changed.items())
        out.append(f"| `{step}` | {text or 'the defaults above'} |")
    return "\n".join(out) + "\n"


def _field_comments(cls: type) -> dict[str, str]:
    """Field name → the `#:` comment above it (a field without a description)."""
    lines = inspect.getsource(cls).splitlines()
    out = {}
    for i, line in enumerate(lines):
        m = re.match(r"\s*(\w+)\s*:", line)
        if m and i and lines[i - 1].strip().startswith("#:"):
            out[m.group(1)] = lines[i - 1].strip()[2:].strip()
    return out


# --- CLI --------------------------------------------------------------------------------


def _walk(command: click.Command, path: list[str]) -> list[tuple[list[str], click.Command]]:
    out = [(path, command)]
    if isinstance(command, click.Group):
        for name in sorted(command.commands):
            out += _walk(command.commands[name], [*path, name])
    return out


def cli_reference() -> str:
    from ics_service.cli import main

    out = []
    parent: click.Context | None = None
    contexts: dict[tuple[str, ...], click.Context] = {}
    for path, command in _walk(main, ["ics"]):
        parent = contexts.get(tuple(path[:-1]))
        settings = {**command.context_settings, "terminal_width": 88, "max_content_width": 88}
        ctx = click.Context(command, info_name=path[-1], parent=parent, **settings)
        contexts[tuple(path)] = ctx
        level = "#" * min(len(path) + 1, 4)
        out += [f"{level} `{' '.join(path)}`", "", "```text", command.get_help(ctx), "```", ""]
    return "\n".join(out)
