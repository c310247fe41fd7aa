"""The plain loop a user writes first: PIL open, convert, resize, crop, one onnxruntime
call per image, decision by threshold, one JSON line per image.

    python -m benchmarks.plain_loop MODEL_JSON FOLDER OUT.jsonl
"""

from __future__ import annotations

import argparse

from ics_service.models.runtime import softmax

from .common import ModelInfo, Report, list_images, plain_preprocess, result_line, session


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="The plain PIL + onnxruntime loop.")
    p.add_argument("model_json")
    p.add_argument("folder")
    p.add_argument("out")
    p.add_argument("--threshold", type=float, default=0.94)
    args = p.parse_args(argv)

    from PIL import Image

    report = Report()
    info = ModelInfo.load(args.model_json)
    sess = session(info.path)
    input_name = sess.get_inputs()[0].name
    files = list_images(args.folder)
    report.ready()
    n = 0
    with open(args.out, "w") as out:
        for path in files:
            with Image.open(path) as im:
                img = im.convert("RGB")
            x = plain_preprocess(img, info)[None]
            (logits,) = sess.run(None, {input_name: x})
            probs = softmax(logits) if info.logits else logits
            out.write(result_line(str(path), probs[0], args.threshold) + "\n")
            n += 1
    report.finish(n)


if __name__ == "__main__":
    main()
