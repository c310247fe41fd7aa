"""Model files are written readable by other users (0666 less the umask, not mkstemp's 0600),
and a model or cache file this user may not read is a clear error (exit 4) naming the file
and the fix, never "internal error ... bug" (exit 3); as real `ics` processes.

"Another user" is simulated: as root (which reads any file), the file is given to `nobody`
and the `ics` process runs as root without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (dropped
from its bounding set before exec), so the kernel's permission checks apply to it as to
another user; as any other user, the file is made unreadable to its owner.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from cli import ICS_BIN
from ics_service.errors import ExitCode

PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE = 1
CAP_DAC_READ_SEARCH = 2
NOBODY = 65534


def _drop_file_override() -> None:
    """In the child, before exec: as root, lose the capabilities that bypass permissions."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def make_foreign(path: Path, mode: int) -> None:
    """Make path another user's (as root) or unreadable to this one."""
    if os.geteuid() == 0:
        os.chown(path, NOBODY, NOBODY)
        path.chmod(mode)
    else:
        path.chmod(0)


def run_as_another(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ICS_BIN), *args],
        env={**os.environ, "ICS_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_drop_file_override,
        check=False,
    )


@pytest.fixture
def can_be_another(tmp_path: Path) -> Callable[[Path], None]:
    """Skips unless a child process really is refused a file made foreign."""
    probe = tmp_path / "probe"
    probe.write_text("x")
    make_foreign(probe, 0o600)
    try:
        done = subprocess.run(
            [sys.executable, "-c", f"open({str(probe)!r}).read()"],
            capture_output=True,
            text=True,
            preexec_fn=_drop_file_override,
            check=False,
        )
    except subprocess.SubprocessError as e:
        pytest.skip(f"cannot drop the permission-override capabilities here: {e}")
    if "PermissionError" not in done.stderr:
        pytest.skip("a child process still reads a file made foreign: no permission check")
    return lambda p: make_foreign(p, 0o600)


def home_with_model(tmp_path: Path, models_dir: Path) -> Path:
    """An ICS_HOME holding a copy of the prepared default model."""
    home = tmp_path / "home"
    src = models_dir / "efficientnet-lite0"
    shutil.copytree(src, home / "models" / "efficientnet-lite0")
    for p in [home, *home.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return home


@pytest.mark.slow
def test_a_prepared_model_is_readable_by_others_as_the_umask_allows(tmp_path: Path) -> None:
    home = tmp_path / "home"

    def umask_027() -> None:
        os.umask(0o027)

    done = subprocess.run(
        [str(ICS_BIN), "models", "prepare", "efficientnet-lite0", "--home", str(home)],
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=umask_027,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    model = home / "models" / "efficientnet-lite0" / "1" / "model.onnx"
    assert stat.S_IMODE(model.stat().st_mode) == 0o640
    assert stat.S_IMODE((model.parent / "model.json").stat().st_mode) == 0o640


def test_another_users_unreadable_model_is_a_clear_error_not_a_bug(
    tmp_path: Path, models_dir: Path, photos: Path, can_be_another: Callable[[Path], None]
) -> None:
    home = home_with_model(tmp_path, models_dir)
    model = home / "models" / "efficientnet-lite0" / "1" / "model.onnx"
    can_be_another(model)
    for args in (
        ("classify", str(photos / "coffee.jpg")),
        ("serve", "--host", "127.0.0.1", "--port", "0"),
    ):
        done = run_as_another(*args, home=home)
        assert done.returncode == ExitCode.ENVIRONMENT, (args, done.stderr)
        assert "internal error" not in done.stderr and "bug" not in done.stderr
        assert f"cannot use the model file {model}: permission denied" in done.stderr
        assert f"chmod a+r {model}" in done.stderr


def test_a_models_folder_this_user_cannot_write_is_a_clear_error(
    tmp_path: Path, photos: Path, can_be_another: Callable[[Path], None]
) -> None:
    """The model is not prepared and its folder is another user's: preparing it cannot even
    make its folder; the message names the folder (PermissionError anywhere in a command)."""
    home = tmp_path / "home"
    models = home / "models"
    models.mkdir(parents=True)
    if os.geteuid() == 0:
        os.chown(models, NOBODY, NOBODY)
    models.chmod(0o755 if os.geteuid() == 0 else 0o555)
    done = run_as_another("classify", str(photos / "coffee.jpg"), home=home)
    assert done.returncode == ExitCode.ENVIRONMENT, done.stderr
    assert "internal error" not in done.stderr
    assert f"cannot use the file {models / 'efficientnet-lite0'}" in done.stderr
    assert "permission denied" in done.stderr
