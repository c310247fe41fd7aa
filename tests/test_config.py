"""Settings: file < environment < flags, provenance, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from ics_service.cli import main
from ics_service.config import load_settings
from ics_service.errors import ConfigError


def test_layers_and_sources(tmp_path: Path) -> None:
    cfg = tmp_path / "ics.toml"
    cfg.write_text("threshold = 0.5\ntop_k = 3\nbatch_size = 4\n")
    loaded = load_settings(
        cfg, {"batch_size": 16}, environ={"ICS_TOP_K": "7", "ICS_HOME": str(tmp_path)}
    )
    s = loaded.settings
    assert (s.threshold, s.top_k, s.batch_size) == (0.5, 7, 16)
    assert loaded.sources["threshold"] == f"file {cfg}"
    assert loaded.sources["top_k"] == "env ICS_TOP_K"
    assert loaded.sources["batch_size"] == "flag"
    assert loaded.sources["model"] == "default"
    assert s.store_url == f"sqlite:///{tmp_path / 'ics.db'}"


def test_ics_table_and_dashes(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[ics]\ntop-k = 2\n")
    assert load_settings(cfg, environ={}).settings.top_k == 2


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("thresold = 0.5\n", {}, "unknown setting 'thresold'"),
        ("threshold = 2\n", {}, "threshold"),
        ("", {"ICS_TOP_K": "many"}, "environment variable ICS_TOP_K"),
        ("threshold = [\n", {}, "not valid TOML"),
    ],
)
def test_bad_settings_name_the_culprit(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    cfg = tmp_path / "ics.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_settings(cfg, environ=env)


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings("/nonexistent/ics.toml", environ={})


def test_ics_toml_in_working_folder_is_read(ics_home: Path) -> None:
    Path("ics.toml").write_text("top_k = 9\n")
    res = CliRunner().invoke(main, ["config", "show", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["settings"]["top_k"] == {"value": 9, "source": "file ics.toml"}
    assert doc["settings"]["home"]["source"] == "env ICS_HOME"


def test_config_show_table_and_bad_flag(ics_home: Path) -> None:
    res = CliRunner().invoke(main, ["config", "show", "--log-level", "info"])
    assert res.exit_code == 0, res.output
    assert "log_level" in res.output and "flag" in res.output
    res = CliRunner().invoke(main, ["classify", "x.jpg", "--threshold", "1.5"])
    assert res.exit_code == 2
    assert "threshold" in res.output and "flag --threshold" in res.output
