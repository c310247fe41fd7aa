"""`ics config show`."""

from __future__ import annotations

import json
from typing import Any

import click

from ..config import SUBSCRIPTION_SETTINGS, Settings
from ..redact import secret_name
from .app import common_options, json_out, load_cli_settings, main, stdout_console

#: Settings never shown as they are (`ics config show`, logs).
SECRETS = ("api_token", "sigv4_secret_access_key")


def shown(settings: Settings) -> dict[str, Any]:
    """The settings as JSON values, secrets masked and the store URL's password hidden."""
    # Here, not at the top: `ics --help` imports this module and must not load SQLAlchemy.
    from ..store.connection import safe_url

    values = settings.model_dump(mode="json")
    for key in SECRETS:
        if values.get(key):
            values[key] = "***"
    if values.get("store"):
        values["store"] = safe_url(values["store"])
    for key in SUBSCRIPTION_SETTINGS:
        values[key] = [s.shown() for s in getattr(settings, key)]
    if values.get("storage"):
        values["storage"] = _masked(values["storage"])
    return values


def _masked(value: Any, name: str = "") -> Any:
    """Storage options with every secret-looking value (`secret_name`) replaced by ***,
    however nested."""
    if isinstance(value, dict):
        return {k: _masked(v, str(k).lower()) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v, name) for v in value]
    if value is not None and secret_name(name):
        return "***"
    return value


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
