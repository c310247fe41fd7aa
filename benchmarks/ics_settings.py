"""The settings `ics classify` runs with in the benchmark's environment, automatic ones
resolved: what RESULTS.md prints beside the ICS rows.

Run as its own process, pinned like the runs it describes, because ICS sizes its threads
from the CPUs it may use:

    python -m benchmarks.ics_settings ICS_COMMAND MODEL_PATH   # prints one JSON document
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any


def effective(ics: str, model_path: str) -> dict[str, Any]:
    shown = json.loads(
        subprocess.run(
            [ics, "config", "show", "--json"], capture_output=True, text=True, check=True
        ).stdout
    )["settings"]

    def value(name: str) -> Any:
        return (shown.get(name) or {}).get("value")

    from ics_service.engine.pipeline import default_workers, plan_inference
    from ics_service.models.device import resolve_device
    from ics_service.models.runtime import available_cpus, onnx_session

    from .common import session_settings

    threads, workers = plan_inference(
        int(value("inference_threads") or 0), int(value("inference_workers") or 0)
    )
    device = resolve_device(str(value("device") or "cpu"))
    return {
        "cpus": available_cpus(),
        "device": device.name,
        "batch_size": value("batch_size"),
        "decode_threads": int(value("decode_workers") or 0) or default_workers(),
        "inference_sessions": workers,
        "preprocess": "ics_service.imaging.Preprocessor",
        # ICS builds its sessions with this function: one built here reads back the options.
        **session_settings(onnx_session(model_path, threads=threads, device=device)),
    }


if __name__ == "__main__":
    json.dump(effective(sys.argv[1], sys.argv[2]), sys.stdout)
