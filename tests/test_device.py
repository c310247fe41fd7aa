"""`--device cpu|cuda[:N]|auto` through real `ics` processes: a device that is not here stops
the command with exit code 4 and says what is missing (never a silent run on the CPU), and
`auto` says which device it chose.

The refusals need an onnxruntime without the CUDA provider (the plain `onnxruntime`
package), as on the machines these tests run on; where onnxruntime-gpu is installed they
skip, and `auto` must then choose CUDA.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import onnxruntime
import pytest

from cli import ics, ics_process
from serving import serve_process

HAS_CUDA = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
no_cuda = pytest.mark.skipif(HAS_CUDA, reason="onnxruntime here has the CUDA provider")

MISSING = "onnxruntime has no CUDAExecutionProvider (installed: onnxruntime "


def _refused(stderr: str, asked: str) -> None:
    assert f"--device {asked}: {MISSING}" in stderr, stderr
    assert "a CPU build" in stderr and "pip install onnxruntime-gpu" in stderr, stderr
    assert "or use --device cpu" in stderr, stderr
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr


@no_cuda
@pytest.mark.slow
def test_classify_on_a_missing_gpu_stops_with_exit_4_and_records_nothing(
    ics_home: Path, photos: Path
) -> None:
    done = ics_process("classify", str(photos / "coffee.jpg"), "--device", "cuda")
    assert done.returncode == 4, done.stderr
    _refused(done.stderr, "cuda")
    # Stopped before the store or any result: nothing ran on the CPU instead.
    assert not (ics_home / "ics.db").exists()
    assert not list(ics_home.rglob("*.jsonl"))


@no_cuda
@pytest.mark.slow
def test_serve_watch_and_show_refuse_a_missing_gpu_from_env_and_settings_file(
    ics_home: Path, photos: Path, tmp_path: Path
) -> None:
    # ICS_DEVICE, with a GPU index.
    served = ics_process("serve", "--port", "0", env={"ICS_DEVICE": "cuda:1"}, timeout=60)
    assert served.returncode == 4, served.stderr
    _refused(served.stderr, "cuda:1")
    # ics.toml.
    config = tmp_path / "gpu.toml"
    config.write_text('device = "cuda"\n')
    watched = ics_process("watch", str(photos), "--once", "--config", str(config))
    assert watched.returncode == 4, watched.stderr
    _refused(watched.stderr, "cuda")
    shown = ics_process("show", str(photos / "coffee.jpg"), "--device", "cuda:0")
    assert shown.returncode == 4, shown.stderr
    _refused(shown.stderr, "cuda:0")


def test_a_device_that_is_no_device_is_a_usage_error(ics_home: Path, photos: Path) -> None:
    res = ics("classify", str(photos / "coffee.jpg"), "--device", "gpu")
    assert res.exit_code == 2, res.output
    assert "bad value 'gpu' for device (flag --device)" in res.output
    assert "device must be cpu, cuda, cuda:N (N: the GPU's index) or auto" in res.output
    res = ics("config", "show", "--json", env={"ICS_DEVICE": "CUDA:0"})
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["settings"]["device"]["value"] == "cuda:0"


@pytest.mark.slow
def test_auto_runs_on_what_is_here_and_says_which(ics_home: Path, photos: Path) -> None:
    chosen = "cuda:0" if HAS_CUDA else "cpu"
    out = ics_home / "coffee.jsonl"
    done = ics_process("classify", str(photos / "coffee.jpg"), "--device", "auto", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert f"--device auto: the model runs on {chosen} (" in done.stderr, done.stderr
    if not HAS_CUDA:
        assert "onnxruntime has no CUDAExecutionProvider; installed: onnxruntime" in done.stderr
    (result,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert result["status"] == "SUCCEEDED" and result["label"] == "espresso", result


@pytest.mark.slow
def test_serve_with_auto_names_its_device_in_metadata_and_readiness(ics_home: Path) -> None:
    chosen = "cuda:0" if HAS_CUDA else "cpu"
    with serve_process("--device", "auto", "--log-level", "INFO") as served:
        meta = httpx.get(f"{served.url}/v2/models/efficientnet-lite0", timeout=10).json()
        assert meta["parameters"] == {"device": chosen}, meta
        ready = httpx.get(f"{served.url}/readyz", timeout=10).json()
        assert ready == {
            "status": "ready",
            "model": "efficientnet-lite0",
            "device": chosen,
            "models": {"efficientnet-lite0": "ready"},
        }
    out = served.output()
    assert f"--device auto: the model runs on {chosen} (" in out, out
    assert f"serving efficientnet-lite0 1 on {chosen} at http://127.0.0.1:" in out, out
