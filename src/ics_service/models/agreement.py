"""How closely a candidate model (an INT8 variant) answers like its reference, and how fast.

Two measures: top-1 agreement (the same class), and decision agreement (the same
SUCCEEDED/LOW_CONFIDENCE status at a threshold, decided by the workflow's own rule,
`policies.decide`): the decision is what users of the workflow see. `python -m
ics_service.models.agreement` measures a quantized model against its base; the
benchmarks report the same agreement.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..config import default
from ..errors import ModelNotPrepared
from ..modelcard import ModelCard
from ..policies import decide
from ..types import ItemStatus
from .calibration import EVALUATION, photo_batches, preprocess_batches
from .runtime import ModelRuntime, OnnxRuntime

#: A top-1 probability from which the reference's answer is not a near tie: on such photos
#: a good INT8 model should never disagree (on the others, neither does FP32 with itself
#: under half a grey level of noise: see `noise_floor`).
CONFIDENT = 0.5

#: The noise of `noise_floor`: ± this many grey levels (of 0..255) on every input value.
NOISE_GREY_LEVELS = 0.5

#: The threshold decisions are compared at unless told: the workflow's default.
DEFAULT_THRESHOLD: float = default("threshold")


@dataclass(frozen=True)
class Flip:
    """An image on which the candidate decides otherwise than the reference (SUCCEEDED
    against LOW_CONFIDENCE), or gives another top-1 class where the reference is confident."""

    #: The image's place in the order the batches gave them.
    index: int
    reference_label: int
    reference_p: float
    candidate_label: int
    candidate_p: float

    def decision_differs(self, threshold: float) -> bool:
        return (self.reference_p >= threshold) != (self.candidate_p >= threshold)


@dataclass(frozen=True)
class Agreement:
    """How often a candidate model gives the reference model's answer."""

    images: int
    #: Images on which both models' top-1 class is the same.
    top1: int
    #: Images on which the reference's top-1 class is in the candidate's top 5.
    top5: int
    #: Mean over images of the largest absolute difference between the two probability vectors.
    mean_max_prob_diff: float
    #: Images on which the reference's top-1 probability is at least CONFIDENT, and those of
    #: them on which both models' top-1 class is the same.
    confident: int = 0
    confident_top1: int = 0
    #: The threshold of the decisions, and the images on which both models' decision
    #: (SUCCEEDED or LOW_CONFIDENCE) is the same.
    threshold: float = DEFAULT_THRESHOLD
    decisions: int = 0
    #: The images whose decision differs, or whose top-1 differs where the reference is
    #: confident, in order.
    flips: tuple[Flip, ...] = ()

    @property
    def top1_rate(self) -> float:
        return self.top1 / self.images if self.images else float("nan")

    @property
    def decision_rate(self) -> float:
        return self.decisions / self.images if self.images else float("nan")

    @property
    def top5_rate(self) -> float:
        return self.top5 / self.images if self.images else float("nan")

    @property
    def confident_top1_rate(self) -> float:
        return self.confident_top1 / self.confident if self.confident else float("nan")

    def __str__(self) -> str:
        return (
            f"top-1 agreement {self.top1_rate:.2%} ({self.top1}/{self.images}), "
            f"reference top-1 in top-5 {self.top5_rate:.2%}, "
            f"mean max |Δp| {self.mean_max_prob_diff:.4f}; where the reference is confident "
            f"(top-1 p ≥ {CONFIDENT}): {self.confident_top1_rate:.2%} "
            f"({self.confident_top1}/{self.confident}); the same decision at threshold "
            f"{self.threshold:g}: {self.decision_rate:.2%} ({self.decisions}/{self.images})"
        )


def statuses(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Whether each row (N, C) SUCCEEDS at the threshold, by the workflow's own rule."""
    labels = tuple(str(i) for i in range(probs.shape[1]))
    decided = decide(probs, threshold=threshold, top_k=1, labels=labels)
    return np.array([d.status is ItemStatus.SUCCEEDED for d in decided], dtype=bool)


def top1_agreement(
    reference: ModelRuntime,
    candidate: ModelRuntime,
    batches: Iterable[np.ndarray],
    *,
    threshold: float = DEFAULT_THRESHOLD,
) -> Agreement:
    """Run both runtimes on every batch of inputs (N, 3, H, W) and compare their answers:
    top-1 classes, and decisions at `threshold`."""
    images = top1 = top5 = confident = confident_top1 = decisions = 0
    diff = 0.0
    flips: list[Flip] = []
    for batch in batches:
        ref = reference.predict(batch)
        cand = candidate.predict(batch)
        ref_top, cand_top = ref.argmax(axis=1), cand.argmax(axis=1)
        cand_top5 = np.argpartition(-cand, 5, axis=1)[:, :5]
        same = cand_top == ref_top
        top1 += int(same.sum())
        sure = ref.max(axis=1) >= CONFIDENT
        confident += int(sure.sum())
        confident_top1 += int(same[sure].sum())
        top5 += int((cand_top5 == ref_top[:, None]).any(axis=1).sum())
        diff += float(np.abs(ref - cand).max(axis=1).sum())
        agree = statuses(ref, threshold) == statuses(cand, threshold)
        decisions += int(agree.sum())
        for i in np.flatnonzero(~agree | (sure & ~same)):
            flips.append(
                Flip(
                    images + int(i),
                    int(ref_top[i]),
                    float(ref[i, ref_top[i]]),
                    int(cand_top[i]),
                    float(cand[i, cand_top[i]]),
                )
            )
        images += len(batch)
    mean_diff = diff / images if images else float("nan")
    return Agreement(
        images,
        top1,
        top5,
        mean_diff,
        confident,
        confident_top1,
        threshold,
        decisions,
        tuple(flips),
    )


def noise_floor(
    reference: ModelRuntime,
    batches: Iterable[np.ndarray],
    *,
    grey_levels: float = NOISE_GREY_LEVELS,
    seed: int = 0,
    threshold: float = DEFAULT_THRESHOLD,
) -> Agreement:
    """The reference against itself on inputs moved by uniform noise of ±`grey_levels` of
    0..255: how much of a candidate's disagreement any change of the input, however small,
    would cause on these photos (the fragile ones have near ties)."""
    rng = np.random.default_rng(seed)
    step = grey_levels / float(np.mean(reference.card.std))

    class _Noisy:
        card = reference.card

        def predict(self, batch: np.ndarray) -> np.ndarray:
            noise = rng.uniform(-step, step, batch.shape).astype(batch.dtype)
            return reference.predict(batch + noise)

    return top1_agreement(reference, _Noisy(), batches, threshold=threshold)


def agreement_on_files(
    reference: ModelRuntime,
    candidate: ModelRuntime,
    paths: Iterable[Path],
    *,
    batch_size: int = 16,
) -> Agreement:
    """`top1_agreement` on image files, preprocessed with the reference's card."""
    images = (p.read_bytes() for p in paths)
    return top1_agreement(
        reference,
        candidate,
        preprocess_batches(reference.card, images, batch_size=batch_size),
    )


def throughput_ratio(
    reference: ModelRuntime,
    candidate: ModelRuntime,
    batch: np.ndarray,
    *,
    repeats: int = 7,
    min_s: float = 0.5,
) -> tuple[float, float, float]:
    """Images/s of both runtimes on one batch, timed in turns so that drift of a shared
    machine hits both alike; returns (reference median, candidate median, median of the
    per-turn ratios candidate / reference)."""
    for runtime in (reference, candidate):
        runtime.predict(batch)
    start = time.perf_counter()
    runs = 0
    while time.perf_counter() - start < min_s / 2 or runs < 2:
        reference.predict(batch)
        runs += 1
    per_turn = max(2, round(runs * min_s / (time.perf_counter() - start)))
    rates: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(repeats):
        for which, runtime in enumerate((reference, candidate)):
            t = time.perf_counter()
            for _ in range(per_turn):
                runtime.predict(batch)
            rates[which].append(per_turn * len(batch) / (time.perf_counter() - t))
    ref, cand = np.array(rates[0]), np.array(rates[1])
    return float(np.median(ref)), float(np.median(cand)), float(np.median(cand / ref))


def heldout_batches(
    card: ModelCard, variations: int, seed: int = 0, paths: list[Path] | None = None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The photos held out from calibration (`heldout`; or `paths`, found by it) as the
    card's input batches: each photo once, then `variations` random variations of them.
    Raises ModelNotPrepared when their package is not installed."""
    from . import heldout

    if paths is None:
        paths = heldout.heldout_paths()
    once = list(preprocess_batches(card, heldout.heldout_images(paths)))
    varied = list(preprocess_batches(card, heldout.varied_heldout(paths, variations, seed)))
    return once, varied


class Heldout(NamedTuple):
    """`heldout_agreement`'s measures."""

    #: The candidate against the reference on each held-out photo once.
    once: Agreement
    #: The same on the photos' variations.
    varied: Agreement
    #: The reference against itself on the variations, under ±0.5 grey level of noise.
    floor: Agreement
    #: The reference against itself on the photos, under that noise, one draw per seed.
    photo_floors: tuple[Agreement, ...]


def heldout_agreement(
    reference: ModelRuntime,
    candidate: ModelRuntime,
    *,
    variations: int = 1000,
    seed: int = 0,
    threshold: float = DEFAULT_THRESHOLD,
    paths: list[Path] | None = None,
    photo_noise_draws: int = 0,
) -> Heldout:
    """`top1_agreement` on the held-out photos (`heldout_batches`), each once (in the order
    of `heldout.heldout_paths`) and then their variations, with the reference's
    `noise_floor` on those variations, and on the photos themselves in
    `photo_noise_draws` draws of the noise (seeds 0, 1, ...): what the reference keeps of
    its own decisions on these very photos, against which the candidate's are judged."""
    once, varied = heldout_batches(reference.card, variations, seed, paths)
    return Heldout(
        top1_agreement(reference, candidate, once, threshold=threshold),
        top1_agreement(reference, candidate, varied, threshold=threshold),
        noise_floor(reference, varied, seed=seed, threshold=threshold),
        tuple(
            noise_floor(reference, once, seed=draw, threshold=threshold)
            for draw in range(photo_noise_draws)
        ),
    )


def main(argv: list[str] | None = None) -> None:
    """Measure a quantized model against its base: top-1 agreement on evaluation photos
    (never used for calibration) and interleaved throughput on pre-decoded tensors.

        python -m ics_service.models.agreement [--model efficientnet-lite0-int8] [-n 1000]
    """
    from ..config import load_settings
    from .prepare import onnx_path, prepare
    from .registry import get_card

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--model", default="efficientnet-lite0-int8")
    p.add_argument("--models-dir", type=Path, help="Default: the settings' models folder.")
    p.add_argument("-n", "--images", type=int, default=1000, help="Evaluation photos.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the evaluation photos.")
    p.add_argument("--batch-sizes", default="1,4,8,16")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--files", type=Path, help="A folder of images to use instead.")
    p.add_argument(
        "--heldout",
        action="store_true",
        help="Use instead the photos held out from calibration (ics_service.models.heldout: "
        "Debian's tuxpaint-stamps-default), each once, then -n variations of them.",
    )
    args = p.parse_args(argv)

    models_dir = args.models_dir or load_settings().settings.models_dir
    card = get_card(args.model)
    base = get_card(card.build["base"])
    prepare(card, models_dir)
    reference = OnnxRuntime(base, onnx_path(base, models_dir))
    candidate = OnnxRuntime(card, onnx_path(card, models_dir))
    if args.heldout:
        try:
            photos, tensors = heldout_batches(base, args.images, args.seed)
        except ModelNotPrepared as e:
            raise SystemExit(str(e)) from None
        once = top1_agreement(reference, candidate, photos)
        print(f"{card.name} vs {base.name} on {once.images} held-out photos: {once}")
        corpus = f"{args.images} variations of the held-out photos (seed {args.seed})"
    elif args.files:
        from ..imaging import IMAGE_EXTENSIONS

        images = (f for f in args.files.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
        paths = sorted(images)[: args.images]
        tensors = list(preprocess_batches(base, (f.read_bytes() for f in paths)))
        corpus = f"{len(paths)} files from {args.files}"
    else:
        tensors = list(photo_batches(base, args.images, args.seed, stream=EVALUATION))
        corpus = f"{args.images} varied photos (evaluation stream, seed {args.seed})"
    agreement = top1_agreement(reference, candidate, tensors)
    print(f"{card.name} vs {base.name} on {corpus}: {agreement}")
    floor = noise_floor(reference, tensors, seed=args.seed)
    print(f"{base.name} vs itself with ±0.5 grey level of noise on the same images: {floor}")
    pool = np.concatenate(tensors)
    for size in (int(b) for b in args.batch_sizes.split(",")):
        batch = np.ascontiguousarray(pool[:size])
        ref, cand, ratio = throughput_ratio(reference, candidate, batch, repeats=args.repeats)
        print(
            f"batch {size:2d}: {base.name} {ref:6.1f} images/s, {card.name} {cand:6.1f} "
            f"images/s, ratio {ratio:.2f} (median of {args.repeats} interleaved turns)"
        )


if __name__ == "__main__":
    main()
