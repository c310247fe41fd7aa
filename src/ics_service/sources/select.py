"""`--include` / `--exclude`: globs that choose which listed items a SOURCE contributes."""

from __future__ import annotations

import os
from collections.abc import Sequence

from .local import GlobMatcher, split_glob, uri_to_path


class Selection:
    """Keeps an item when it matches an include pattern (or none is given) and no exclude
    pattern. A pattern without "/" matches the item's name in any folder (``*.jpg``); one
    with "/" matches its path relative to the SOURCE it was listed from (``2024/**/*.png``).
    """

    def __init__(self, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> None:
        self.include = [_Pattern(p) for p in include]
        self.exclude = [_Pattern(p) for p in exclude]

    def __bool__(self) -> bool:
        return bool(self.include or self.exclude)

    def keeps(self, rel: str) -> bool:
        """Whether to keep the item at rel (see `base_of` and `relative`)."""
        if self.include and not any(p.matches(rel) for p in self.include):
            return False
        return not any(p.matches(rel) for p in self.exclude)


class _Pattern:
    def __init__(self, pattern: str) -> None:
        self.by_name = "/" not in pattern.strip("/")
        self.matcher = GlobMatcher([s for s in pattern.split("/") if s])

    def matches(self, rel: str) -> bool:
        return self.matcher.matches(rel.rsplit("/", 1)[-1] if self.by_name else rel)


def base_of(spec: str) -> str:
    """What the items of a SOURCE are relative to, "/"-terminated: its prefix or folder, a
    glob's literal folder. A SOURCE that names one file or key is taken as a folder of that
    name (an S3 key may be one); the item it names is not under it, so `relative` gives its
    name."""
    if "://" in spec and not spec.startswith("file://"):
        return spec if spec.endswith("/") else spec + "/"
    path = os.path.abspath(os.path.expanduser(uri_to_path(spec)))
    if not os.path.isdir(path) and set("*?[") & set(path):
        path = split_glob(path)[0]
    return path.rstrip("/") + "/"


def relative(base: str, uri: str) -> str:
    """The item's "/"-separated path under base; its name when it is not under it."""
    item = uri if "://" in base else uri_to_path(uri)
    return item[len(base) :] if item.startswith(base) else item.rsplit("/", 1)[-1]
