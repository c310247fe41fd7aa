"""Running `ics` in tests: in process (any exception but a clean exit fails the test) or as a
real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from click.testing import CliRunner, Result

from ics_service.cli import main

#: The `ics` console script of the environment running the tests.
ICS_BIN = Path(sys.executable).parent / "ics"


def ics(*args: str, input: str | None = None, env: Mapping[str, str] | None = None) -> Result:
    """`ics ARGS` in process. A bug (an exception that is not a clean exit) fails the test
    with its traceback, instead of hiding in `result.exception`."""
    res = CliRunner().invoke(main, list(args), input=input, env=env, catch_exceptions=True)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise AssertionError(
            f"`ics {' '.join(args)}` raised {type(res.exception).__name__} "
            f"(exit {res.exit_code}); output:\n{res.output}"
        ) from res.exception
    return res


def ics_process(
    *args: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """`ics ARGS` as a real process (the installed console script), with a deadline."""
    return subprocess.run(
        [str(ICS_BIN), *args],
        env={**os.environ, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def pythonpath_with(*folders: Path) -> str:
    """PYTHONPATH with `folders` first, then the one this process has, if any (an
    editable install, as `make test` uses, sets none)."""
    inherited = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join([*map(str, folders), *([inherited] if inherited else [])])
