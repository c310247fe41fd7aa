"""One JSON Lines parser for every reader of lines ICS did not necessarily write itself
(capture files, results files, manifests): a line is a value or a `BadLine`, whatever its
shape, so a reader can name the line and go on.

`json.loads` raises RecursionError (not ValueError) on a line nested deeper than the
interpreter's recursion limit, and a value nested almost that deep can still blow the stack
of whatever walks it afterwards (repr, json.dumps). Records ICS reads nest a few levels, so
a line nested deeper than `MAX_DEPTH` is refused like any other line that is not JSON.
"""

from __future__ import annotations

import json
from typing import Any

#: Deepest nesting of arrays and objects accepted in one line (ICS records nest 4 levels).
MAX_DEPTH = 64


class BadLine(ValueError):
    """A line that is not a JSON value ICS can read; the message says why."""


def loads(line: str | bytes, *, max_depth: int = MAX_DEPTH) -> Any:
    """The JSON value of one line, or BadLine: not JSON, not UTF-8, or nested too deep."""
    try:
        value = json.loads(line)
    except RecursionError:
        raise BadLine(f"not JSON: nested deeper than {max_depth} levels") from None
    except json.JSONDecodeError as e:
        raise BadLine(f"not JSON ({e})") from None
    except ValueError as e:  # UnicodeDecodeError of bytes that are not UTF-8
        raise BadLine(f"not JSON ({e})") from None
    _check_depth(value, max_depth)
    return value


def _check_depth(value: Any, max_depth: int) -> None:
    """BadLine when value nests deeper than max_depth; iterative, so no depth can overflow
    the stack here, and it visits containers only one level of scalars at a time."""
    level: list[Any] = [value]
    depth = 0
    while level:
        containers = [v for v in level if isinstance(v, dict | list)]
        if not containers:
            return
        depth += 1
        if depth > max_depth:
            raise BadLine(f"not JSON: nested deeper than {max_depth} levels")
        level = []
        for c in containers:
            level.extend(c.values() if isinstance(c, dict) else c)
