"""The plain loop a user writes first: PIL open, convert, resize, crop, one onnxruntime
call per image on onnxruntime's default session, decision by threshold, one JSON line per
image. With `--preprocess ics` the same loop decodes with ICS's own Preprocessor, so the
gap to ICS is the pipeline's, not the decoder's.

    python -m benchmarks.plain_loop MODEL_JSON FOLDER OUT.jsonl [--preprocess plain|ics]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ics_service.models.runtime import softmax

from .common import (
    ModelInfo,
    Report,
    default_session,
    ics_decoder,
    list_images,
    plain_preprocess,
    result_line,
    session_settings,
)


def plain_reader(info: ModelInfo) -> Callable[[Path], np.ndarray]:
    from PIL import Image

    def read(path: Path) -> np.ndarray:
        with Image.open(path) as im:
            img = im.convert("RGB")
        return plain_preprocess(img, info)

    return read


def ics_reader(info: ModelInfo) -> Callable[[Path], np.ndarray]:
    decode = ics_decoder(info)
    return lambda path: decode(path.read_bytes())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="The plain PIL + onnxruntime loop.")
    p.add_argument("model_json")
    p.add_argument("folder")
    p.add_argument("out")
    p.add_argument("--threshold", type=float, default=0.94)
    p.add_argument(
        "--preprocess",
        choices=("plain", "ics"),
        default="plain",
        help="plain: PIL the textbook way; ics: ics_service.imaging.Preprocessor",
    )
    args = p.parse_args(argv)

    report = Report()
    info = ModelInfo.load(args.model_json)
    read = (ics_reader if args.preprocess == "ics" else plain_reader)(info)
    sess = default_session(info.path)
    input_name = sess.get_inputs()[0].name
    files = list_images(args.folder)
    report.ready()
    n = 0
    with open(args.out, "w") as out:
        for path in files:
            x = read(path)[None]
            (logits,) = sess.run(None, {input_name: x})
            probs = softmax(logits) if info.logits else logits
            out.write(result_line(str(path), probs[0], args.threshold) + "\n")
            n += 1
    report.finish(
        n,
        settings={
            "session": "onnxruntime's default InferenceSession",
            **session_settings(sess),
            "batch_size": 1,
            "preprocess": "ics_service.imaging.Preprocessor"
            if args.preprocess == "ics"
            else "PIL convert + resize + crop",
        },
    )


if __name__ == "__main__":
    main()
