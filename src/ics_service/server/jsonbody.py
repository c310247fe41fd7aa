"""JSON request bodies, parsed the one way every route parses them: whatever a client sends,
a parse either gives a document or raises BadJson (the route answers 400 in its protocol's
shape), never another exception.

Unlike `jsonlines.loads`, the value is not walked afterwards to bound its depth: a body can
be a tensor of 150,000 numbers, where that walk costs about two thirds of the parse again.
The routes check each value's shape as they read it instead."""

from __future__ import annotations

import json
from typing import Any


class BadJson(ValueError):
    """The body is not JSON this server can read; the message says why."""


def parse_json(data: bytes | str) -> Any:
    """The JSON document in data (UTF-8 when bytes)."""
    try:
        return json.loads(data)
    except RecursionError:
        # The parser recurses once per level: nesting deep enough exhausts the stack.
        raise BadJson("its arrays or objects are nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadJson(str(e)) from None
