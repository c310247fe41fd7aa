"""Where a model runs: the `device` setting (`--device cpu|cuda[:N]|auto`), resolved once
against the onnxruntime that is installed.

`cuda[:N]` needs an onnxruntime build with the CUDA execution provider (the
`onnxruntime-gpu` package); asked for and missing, or present and unable to start, ICS
stops with `DeviceUnavailable` (exit 4) and never falls back to the CPU by itself.
`auto` picks CUDA (GPU 0) when onnxruntime lists its provider, else the CPU, and logs
which. onnxruntime is imported only for `cuda` and `auto`.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Literal

from ..config import DEVICE_SPEC
from ..errors import DeviceUnavailable

log = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"

#: How to get the CUDA provider, for the messages that say it is missing.
CUDA_HINT = (
    "install onnxruntime-gpu in place of onnxruntime (pip uninstall onnxruntime && "
    "pip install onnxruntime-gpu) with the CUDA and cuDNN libraries its release needs "
    "(onnxruntime's CUDA execution provider page lists them), or use --device cpu"
)


@dataclass(frozen=True)
class Device:
    """A resolved device: the CPU, or CUDA GPU `index` through onnxruntime's CUDA provider."""

    kind: Literal["cpu", "cuda"] = "cpu"
    index: int = 0
    #: The setting it was resolved from: "cpu", "cuda", "cuda:1" or "auto".
    asked: str = "cpu"

    @property
    def name(self) -> str:
        return f"cuda:{self.index}" if self.kind == "cuda" else "cpu"

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    @property
    def provider(self) -> str:
        return CUDA_PROVIDER if self.is_cuda else CPU_PROVIDER

    def providers(self) -> list[Any]:
        """onnxruntime's `providers` argument: on CUDA, the CPU provider stays second, for
        the operators CUDA lacks (placement per node, not a fallback of the session)."""
        if self.is_cuda:
            return [(CUDA_PROVIDER, {"device_id": self.index}), CPU_PROVIDER]
        return [CPU_PROVIDER]

    def __str__(self) -> str:
        return self.name


CPU = Device()


def installed_onnxruntime() -> str:
    """The onnxruntime distributions installed, as messages name them
    ("onnxruntime 1.32.0, a CPU build")."""
    found = sorted(
        f"{dist.metadata['Name']} {dist.version}"
        for dist in metadata.distributions()
        if (dist.metadata["Name"] or "").lower().startswith("onnxruntime")
    )
    try:
        import onnxruntime as ort

        build = "a GPU build" if ort.get_device().upper().startswith("GPU") else "a CPU build"
    except ImportError:
        return ", ".join(found) or "no onnxruntime"
    return f"{', '.join(found) or 'onnxruntime ' + ort.__version__}, {build}"


@functools.cache
def resolve_device(spec: str) -> Device:
    """The device a `device` setting names, checked against the installed onnxruntime
    (once per process and setting: `auto` logs its choice once)."""
    spec = spec.strip().lower()
    if DEVICE_SPEC.fullmatch(spec) is None:  # the settings refuse it first
        raise ValueError(f"device {spec!r}: use cpu, cuda, cuda:N or auto")
    kind, _, number = spec.partition(":")
    index = int(number or 0)
    if kind == "cpu":
        return CPU
    import onnxruntime as ort

    available = ort.get_available_providers()
    if kind == "auto":
        if CUDA_PROVIDER in available:
            device = Device("cuda", 0, "auto")
            why = f"onnxruntime has {CUDA_PROVIDER}"
        else:
            device = Device("cpu", 0, "auto")
            why = f"onnxruntime has no {CUDA_PROVIDER}; installed: {installed_onnxruntime()}"
        # A warning, so that it shows by default: which device `auto` chose depends on
        # the machine, and a run on the CPU where a GPU was expected is worth seeing.
        log.warning("--device auto: the model runs on %s (%s)", device.name, why)
        return device
    if CUDA_PROVIDER not in available:
        raise DeviceUnavailable(
            f"--device {spec}: onnxruntime has no {CUDA_PROVIDER} (installed: "
            f"{installed_onnxruntime()}; its providers: {', '.join(available)}); {CUDA_HINT}"
        )
    return Device("cuda", index, spec)


def device_for(kind: str, model: str, spec: str) -> Device:
    """The device a model of `kind` runs on: `spec` resolved for an ONNX model; any other
    kind (Python, remote) runs where it runs, and a `spec` other than cpu only warns that it
    does not apply."""
    if kind == "onnx":
        return resolve_device(spec)
    if spec.strip().lower() != "cpu":
        _warn_device_ignored(spec.strip().lower(), model, kind)
    return CPU


@functools.cache
def _warn_device_ignored(spec: str, model: str, kind: str) -> None:
    where = "its endpoint's machine" if kind in ("sagemaker", "v2") else "its own code's choice"
    log.warning(
        "--device %s does not apply to model %s: it is a %s model, which runs on %s "
        "(--device chooses where ONNX models run)",
        spec,
        model,
        kind,
        where,
    )


#: Words of onnxruntime's errors that come from its CUDA provider starting, not the model.
_CUDA_ERROR = re.compile(r"cuda|cudnn|cublas|curand|cufft|libnv|provider|device", re.I)


def cuda_failure(error: BaseException, device: Device) -> DeviceUnavailable | None:
    """The DeviceUnavailable of an error onnxruntime raised opening a session on `device`,
    when it is one of its CUDA provider starting (a missing library, no such GPU)."""
    if not device.is_cuda or not _CUDA_ERROR.search(str(error)):
        return None
    return DeviceUnavailable(
        f"--device {device.asked}: onnxruntime could not start {CUDA_PROVIDER} on GPU "
        f"{device.index}: {str(error).strip()}; check that this GPU exists "
        f"(nvidia-smi) and that CUDA and cuDNN are installed as onnxruntime-gpu needs, "
        "or use --device cpu"
    )


def check_session(session: Any, device: Device) -> None:
    """DeviceUnavailable when a session meant for CUDA came up without its provider (some
    onnxruntime releases only log that the CUDA library failed to load)."""
    if device.is_cuda and CUDA_PROVIDER not in session.get_providers():
        raise DeviceUnavailable(
            f"--device {device.asked}: onnxruntime opened the model without "
            f"{CUDA_PROVIDER} (its session runs on {', '.join(session.get_providers())}): "
            "the CUDA provider's libraries did not load (see onnxruntime's message above); "
            f"{CUDA_HINT}"
        )
