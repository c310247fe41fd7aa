"""Settings: file < environment < flags, provenance, and clear errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from cli import ics
from ics_service.config import load_settings
from ics_service.errors import ConfigError, ExitCode


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
        ("thresold = 0.5\n", {}, r"unknown setting 'thresold' in .*ics\.toml; known settings: "),
        (
            "threshold = 2\n",
            {},
            r"bad value 2 for threshold \(file .*ics\.toml\): Input should be less than or equal "
            r"to 1",
        ),
        (
            "",
            {"ICS_TOP_K": "many"},
            r"bad value 'many' for top_k \(environment variable ICS_TOP_K\)",
        ),
        ("threshold = [\n", {}, r"config file .*ics\.toml is not valid TOML"),
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
    with pytest.raises(ConfigError, match=r"config file /nonexistent/ics\.toml does not exist"):
        load_settings("/nonexistent/ics.toml", environ={})


def test_ics_toml_in_working_folder_is_read(ics_home: Path) -> None:
    Path("ics.toml").write_text("top_k = 9\n")
    res = ics("config", "show", "--json")
    assert res.exit_code == ExitCode.OK, res.output
    doc = json.loads(res.output)
    assert doc["settings"]["top_k"] == {"value": 9, "source": "file ics.toml"}
    assert doc["settings"]["home"]["source"] == "env ICS_HOME"


def test_config_show_table_and_bad_flag(ics_home: Path) -> None:
    res = ics("config", "show", "--log-level", "info")
    assert res.exit_code == ExitCode.OK, res.output
    # The log_level row: the value given by the flag, upper-cased, and its source.
    assert re.search(r'log_level\s*│\s*"INFO"\s*│\s*flag\s*│', res.output), res.output
    res = ics("classify", "x.jpg", "--threshold", "1.5")
    assert res.exit_code == ExitCode.USAGE, res.output
    assert "Error: bad value 1.5 for threshold (flag --threshold): " in res.output


# --- refused values: each names the culprit, where it came from and what to write ---------


def _error_line(output: str) -> str:
    """The one `Error: ...` line of a refused command."""
    lines = [ln for ln in output.splitlines() if ln.startswith("Error: ")]
    assert len(lines) == 1, output
    return lines[0]


def test_config_file_not_utf8_names_the_file(ics_home: Path) -> None:
    cfg = ics_home / "latin1.toml"
    cfg.write_bytes(b'model = "\xff"\n')
    res = ics("config", "show", "--config", str(cfg))
    assert res.exit_code == ExitCode.USAGE, res.output
    assert _error_line(res.output) == (
        f"Error: config file {cfg} is not UTF-8 text (byte 9); TOML files must be UTF-8"
    )
    with pytest.raises(ConfigError, match=rf"config file {re.escape(str(cfg))} is not UTF-8"):
        load_settings(cfg, environ={})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("top_k = true\n", "bad value true for top_k (file {cfg}): it must be a whole number"),
        (
            "batch_size = false\n",
            "bad value false for batch_size (file {cfg}): it must be a whole number",
        ),
        (
            'threshold = "0.9"\n',
            'bad value "0.9" for threshold (file {cfg}): it must be a number; '
            "write it without quotes",
        ),
        (
            'top_k = "3"\n',
            'bad value "3" for top_k (file {cfg}): it must be a whole number; '
            "write it without quotes",
        ),
        ("threshold = true\n", "bad value true for threshold (file {cfg}): it must be a number"),
    ],
)
def test_file_refuses_booleans_and_quoted_numbers(ics_home: Path, text: str, expected: str) -> None:
    cfg = ics_home / "ics.toml"
    cfg.write_text(text)
    message = expected.format(cfg=cfg)
    with pytest.raises(ConfigError) as raised:
        load_settings(cfg, environ={})
    assert str(raised.value) == message
    res = ics("config", "show", "--config", str(cfg))
    assert res.exit_code == ExitCode.USAGE, res.output
    assert _error_line(res.output) == f"Error: {message}"


def test_environment_boolean_for_a_number_names_the_variable(ics_home: Path) -> None:
    with pytest.raises(ConfigError, match=r"environment variable ICS_TOP_K"):
        load_settings(None, environ={"ICS_TOP_K": "true"})
    res = ics("config", "show", env={"ICS_TOP_K": "true"})
    assert res.exit_code == ExitCode.USAGE, res.output
    assert _error_line(res.output).startswith(
        "Error: bad value 'true' for top_k (environment variable ICS_TOP_K): "
    )


def test_bad_workers_flag_names_the_real_flag(ics_home: Path) -> None:
    res = ics("classify", "x.jpg", "--workers", "-1")
    assert res.exit_code == ExitCode.USAGE, res.output
    line = _error_line(res.output)
    assert line.startswith("Error: bad value -1 for decode_workers (flag --workers): "), line
    assert "--decode-workers" not in res.output  # no such flag
    # load_settings itself: the flag's name as the command spells it.
    with pytest.raises(ConfigError, match=r"\(flag --workers\)"):
        load_settings(
            None, {"decode_workers": -1}, environ={}, flag_names={"decode_workers": "--workers"}
        )


def test_unknown_retry_step_names_the_known_steps(ics_home: Path) -> None:
    cfg = ics_home / "ics.toml"
    cfg.write_text("[retry.Serialize]\nmax_attempts = 1\n")
    res = ics("config", "show", "--config", str(cfg))
    assert res.exit_code == ExitCode.USAGE, res.output
    line = _error_line(res.output)
    assert f"for retry (file {cfg}): " in line, line
    assert line.endswith(
        "unknown step ['Serialize']; steps: SerializeImageData, ClassifyImage, Notify"
    ), line


def test_retry_max_attempts_refuses_a_boolean(ics_home: Path) -> None:
    cfg = ics_home / "ics.toml"
    cfg.write_text("[retry.SerializeImageData]\nmax_attempts = true\n")
    res = ics("config", "show", "--config", str(cfg))
    assert res.exit_code == ExitCode.USAGE, res.output
    line = _error_line(res.output)
    assert f"for retry.SerializeImageData (file {cfg}): " in line, line
    assert line.endswith("max_attempts must be a whole number, not a boolean"), line
    # The same in ICS_RETRY (JSON), where `true` is a boolean too.
    env = {"ICS_RETRY": json.dumps({"SerializeImageData": {"max_attempts": True}})}
    with pytest.raises(ConfigError, match=r"max_attempts must be a whole number, not a boolean"):
        load_settings(None, environ=env)


def test_list_settings_from_the_environment_are_json() -> None:
    env = {"ICS_ALLOWED_SOURCES": '["/data", "/srv/photos"]'}
    assert load_settings(environ=env).settings.allowed_sources == ["/data", "/srv/photos"]
    with pytest.raises(ConfigError, match="ICS_ALLOWED_SOURCES must be JSON"):
        load_settings(environ={"ICS_ALLOWED_SOURCES": "/data"})


def test_config_show_masks_secrets(ics_home: Path) -> None:
    env = {"ICS_API_TOKEN": "s3cret-token", "ICS_STORE": "postgresql://u:pw@db/ics"}
    res = ics("config", "show", "--json", env=env)
    assert res.exit_code == ExitCode.OK, res.output
    settings = json.loads(res.stdout)["settings"]
    assert settings["api_token"]["value"] == "***"
    assert settings["store"]["value"] == "postgresql://u:***@db/ics"
    assert "s3cret-token" not in res.stdout and "pw@" not in res.stdout


def test_trusted_proxies_are_addresses_or_networks() -> None:
    env = {"ICS_TRUSTED_PROXIES": '["10.0.0.5", "10.0.0.0/8", "::1"]'}
    assert load_settings(environ=env).settings.trusted_proxies == ["10.0.0.5", "10.0.0.0/8", "::1"]
    assert load_settings(environ={"ICS_TRUSTED_PROXIES": '["*"]'}).settings.trusted_proxies == ["*"]
    with pytest.raises(ConfigError, match=r"'proxy\.local' is not an IP address or network"):
        load_settings(environ={"ICS_TRUSTED_PROXIES": '["proxy.local"]'})
