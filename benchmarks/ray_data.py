"""Ray Data: `read_images` + a preprocessing map fused into the read tasks, then an actor
pool running the same onnxruntime session settings as ICS. With `--preprocess ics` it
reads the files' bytes (`read_binary_files`) and decodes them with ICS's own Preprocessor.

On a small machine an actor pool that reserves every CPU starves the read tasks and the
pipeline stalls (see FIELD-NOTES): the actors ask for a fraction of a CPU (--actor-cpus,
default 0.5), which leaves the read tasks at least one whole CPU.

    python -m benchmarks.ray_data MODEL_JSON FOLDER OUT.jsonl [--actors 1 --actor-cpus 0.5]
        [--batch-size 8] [--threads 0] [--preprocess plain|ics]

The harness picks actors, CPUs per actor and batch size by a short search first
(benchmarks.run's Ray tuning pass).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any

import numpy as np

from ics_service.models.runtime import softmax

from .common import (
    ModelInfo,
    Report,
    cpus,
    ics_decoder,
    plain_preprocess,
    result_line,
    session,
    session_settings,
)


class Classifier:
    """The actor: one onnxruntime session, a batch of preprocessed images per call."""

    def __init__(self, info: ModelInfo, threshold: float, threads: int) -> None:
        self.info = info
        self.threshold = threshold
        self.sess = session(info.path, threads=threads)
        self.input_name = self.sess.get_inputs()[0].name
        # The session lives in the actor's process: it reports its options with its results.
        self.settings = json.dumps(session_settings(self.sess))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = np.ascontiguousarray(np.stack(list(batch["x"])), dtype=np.float32)
        (logits,) = self.sess.run(None, {self.input_name: x})
        probs = softmax(logits) if self.info.logits else logits
        lines = [
            result_line(str(path), p, self.threshold)
            for path, p in zip(batch["path"], probs, strict=True)
        ]
        return {
            "line": np.asarray(lines, dtype=object),
            "settings": np.asarray([self.settings] * len(lines), dtype=object),
        }


def make_preprocess(info: ModelInfo) -> Any:
    def preprocess(batch: dict[str, np.ndarray]) -> dict[str, Any]:
        from PIL import Image

        xs = [plain_preprocess(Image.fromarray(img), info) for img in batch["image"]]
        return {"x": np.stack(xs), "path": batch["path"]}

    return preprocess


def make_ics_preprocess(info: ModelInfo) -> Any:
    decoders: list[Any] = []  # one per read-task worker process, built on first use

    def preprocess(batch: dict[str, np.ndarray]) -> dict[str, Any]:
        if not decoders:
            decoders.append(ics_decoder(info))
        decode = decoders[0]
        xs = [decode(bytes(data)) for data in batch["bytes"]]
        return {"x": np.stack(xs), "path": batch["path"]}

    return preprocess


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Ray Data read_images + map_batches actor pool.")
    p.add_argument("model_json")
    p.add_argument("folder")
    p.add_argument("out")
    p.add_argument("--threshold", type=float, default=0.94)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--actor-cpus", type=float, default=0.5)
    p.add_argument(
        "--threads", type=int, default=0, help="intra-op threads per actor (0: cores ÷ actors)"
    )
    p.add_argument("--preprocess", choices=("plain", "ics"), default="plain")
    args = p.parse_args(argv)
    threads = args.threads or max(1, cpus() // args.actors)

    report = Report()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import ray
    import ray.data

    info = ModelInfo.load(args.model_json)
    ray.init(
        num_cpus=cpus(),
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
    )
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        report.ready()
        if args.preprocess == "ics":
            ds = ray.data.read_binary_files(
                args.folder, include_paths=True, file_extensions=["jpg", "jpeg"]
            )
            ds = ds.map_batches(make_ics_preprocess(info), batch_size=args.batch_size)
        else:
            ds = ray.data.read_images(args.folder, mode="RGB", include_paths=True)
            ds = ds.map_batches(make_preprocess(info), batch_size=args.batch_size)
        ds = ds.map_batches(
            Classifier,
            fn_constructor_kwargs={"info": info, "threshold": args.threshold, "threads": threads},
            batch_size=args.batch_size,
            compute=ray.data.ActorPoolStrategy(size=args.actors),
            num_cpus=args.actor_cpus,
        )
        n = 0
        actor_settings: dict[str, Any] = {}
        with open(args.out, "w") as out:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                if not actor_settings and len(batch["settings"]):
                    actor_settings = json.loads(batch["settings"][0])
                for line in batch["line"]:
                    out.write(line + "\n")
                    n += 1
    finally:
        ray.shutdown()
    report.finish(
        n,
        settings={
            "ray_cpus": cpus(),
            "actors": args.actors,
            "actor_cpus": args.actor_cpus,
            "batch_size": args.batch_size,
            "reader": "read_binary_files" if args.preprocess == "ics" else "read_images",
            "preprocess": "ics_service.imaging.Preprocessor"
            if args.preprocess == "ics"
            else "PIL resize + crop",
            **actor_settings,
        },
    )


if __name__ == "__main__":
    main()
