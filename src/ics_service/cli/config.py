"""`ics config show`."""

from __future__ import annotations

import json
from typing import Any

import click

from ..config import shown
from .app import common_options, json_out, load_cli_settings, main, stdout_console

# --- config ---------------------------------------------------------------------------


@main.group()
def config() -> None:
    """Inspect the effective settings."""


@config.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@common_options
def config_show(as_json: bool, **kwargs: Any) -> None:
    """Every setting, its effective value, and where it came from."""
    loaded = load_cli_settings(kwargs)
    values = shown(loaded.settings)
    if as_json:
        json_out(
            {
                "config_file": None if loaded.config_file is None else str(loaded.config_file),
                "settings": {
                    k: {"value": v, "source": loaded.sources[k]} for k, v in values.items()
                },
            }
        )
        return
    from rich.table import Table

    t = Table()
    t.add_column("setting")
    t.add_column("value")
    t.add_column("source")
    for key, value in values.items():
        t.add_row(key, json.dumps(value), loaded.sources[key])
    stdout_console().print(t)
