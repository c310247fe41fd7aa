"""The report of a benchmark run: medians per runner and size, the bounds, RESULTS.md.

Everything here reads a finished `Bench`, so a report can be written again from the raw
results alone (`python -m benchmarks.run --rerender`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import cpus
from .corpus import SIZES
from .quiet import busy_at_start, busy_run
from .runners import APART_RUNNERS, DESCRIBE, ROOT, RUNNERS, SERVING_RUNNERS, Bench, Config, Run


def _med(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else None


def _fmt(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def summary(b: Bench) -> dict[str, Any]:
    """Medians per (runner, size) over the rounds; max of the peak RSS."""
    out: dict[str, Any] = {}
    keys = sorted({(r.job.runner, r.job.size) for r in b.runs})
    for key in keys:
        runs = [r for r in b.runs if (r.job.runner, r.job.size) == key]
        ok = [r for r in runs if r.ok]
        out["/".join(key)] = {
            "runs": len(runs),
            "ok": len(ok),
            "problems": sorted({r.problem for r in runs if not r.ok}),
            "images_per_s": _med([r.ips for r in ok]),
            "min": min((r.ips for r in ok), default=None),
            "max": max((r.ips for r in ok), default=None),
            "steady_images_per_s": _med([r.steady_ips for r in ok if r.steady_ips]),
            "startup_s": _med(
                [
                    r.m.wall_s - r.job.n / r.steady_ips
                    for r in ok
                    if r.steady_ips and r.job.runner != "bounds"
                ]
            ),
            "peak_rss_mb": max((r.m.peak_rss_mb for r in ok), default=None),
            "cpu_ms_per_image": _med([r.m.cpu_s * 1e3 / r.job.n for r in ok]),
            "cores_used": _med([r.m.cpu_s / r.m.wall_s for r in ok]),
            "wall_s": _med([r.m.wall_s for r in ok]),
            "n": runs[0].job.n,
            "cores": runs[0].job.cores,
            "others_cores": max(
                (r.m.others_cores for r in runs if r.m.others_cores is not None), default=None
            ),
            "busy": any(_busy(b, r) for r in runs),
            "settings": settings_of(b, runs),
        }
    bounds = [r.m.report for r in b.runs if r.job.runner == "bounds" and r.ok and r.m.report]
    if bounds:
        out["bounds"] = bound_summary(bounds)
    return out


def _busy(b: Bench, run: Run) -> bool:
    return busy_at_start(first_snapshot(b), b.cfg.busy_load) or busy_run(
        run.m.others_cores, b.cfg.busy_others
    )


def first_snapshot(b: Bench) -> dict[str, Any]:
    """The load average and CPU count before the first round."""
    rounds = b.extra.get("rounds") or []
    if rounds:
        first: dict[str, Any] = rounds[0]["before"]
        return first
    # A results.json from before rounds were recorded: its load before the run.
    return {"load": b.extra.get("load_before", [0.0, 0.0, 0.0]), "cpus": cpus()}


def busy_reasons(b: Bench) -> list[str]:
    """Why this run does not count as taken on a quiet machine; empty when it does."""
    reasons = []
    first = first_snapshot(b)
    if busy_at_start(first, b.cfg.busy_load):
        reasons.append(
            f"1-min load average {first['load'][0]:.2f} before the first round, over "
            f"{b.cfg.busy_load:g} per core on {first['cpus']} cores"
        )
    busy = [r for r in b.runs if busy_run(r.m.others_cores, b.cfg.busy_others)]
    if busy:
        worst = max(r.m.others_cores or 0.0 for r in busy)
        reasons.append(
            f"in {len(busy)} of {len(b.runs)} runs other processes used more than "
            f"{b.cfg.busy_others:g} cores (up to {worst:.2f})"
        )
    return reasons


def settings_of(b: Bench, runs: list[Run]) -> dict[str, Any] | None:
    """The configuration a runner reported it ran with (ICS's: read by benchmarks.ics_settings)."""
    runner = runs[0].job.runner
    if runner.startswith("ics"):
        by_cores = b.extra.get("settings") or {}
        found = by_cores.get(str(runs[0].job.cores) if runs[0].job.cores else "all")
        return dict(found) if found else None
    for r in runs:
        if r.ok and r.m.report and r.m.report.get("settings"):
            settings: dict[str, Any] = r.m.report["settings"]
            return settings
    return None


def _settings_text(settings: dict[str, Any] | None) -> str:
    if not settings:
        return ""
    return "; ".join(f"{k.replace('_', ' ')} {v}" for k, v in settings.items())


def bound_summary(reports: list[dict[str, Any]]) -> dict[str, Any]:
    c = reports[0]["cpus"]
    ips_c = _med([r["model"]["best_images_per_s"] for r in reports])
    ips_1 = _med([r["model"]["one_thread_images_per_s"] for r in reports])
    ips_p = _med([r["model"]["per_core_sessions_images_per_s"] for r in reports])
    by_batch = {
        bs: _med([r["model"]["images_per_s_by_batch"][bs] for r in reports])
        for bs in reports[0]["model"]["images_per_s_by_batch"]
    }
    doc: dict[str, Any] = {
        "cpus": c,
        "model_best_images_per_s": ips_c,
        "model_best_batch": max(by_batch, key=lambda k: by_batch[k] or 0),
        "model_one_thread_images_per_s": ips_1,
        "model_per_core_sessions_images_per_s": ips_p,
        "model_per_core_sessions_best_batch": reports[0]["model"]["per_core_sessions_best_batch"],
        "model_by_batch": by_batch,
        "preprocessor": reports[0].get("preprocessor"),
        "decode": {},
        "pipelined": {},
    }
    for size in SIZES:
        ms = _med([r["decode"][size]["ics_ms"] for r in reports if size in r.get("decode", {})])
        plain = _med(
            [r["decode"][size]["plain_ms"] for r in reports if size in r.get("decode", {})]
        )
        if ms is None or not ips_c or not ips_p:
            continue
        d = ms / 1e3
        # Core-seconds per image: the model's (c / its throughput on all c cores) plus the
        # decode's (d, on one core); the c cores share them. The model runs either as one
        # session over all cores or as one single-thread session per core, whichever is
        # faster: the better schedule is the bound.
        shared = 1.0 / (1.0 / ips_c + d / c)
        per_core = 1.0 / (1.0 / ips_p + d / c)
        doc["decode"][size] = {"ics_ms": ms, "plain_ms": plain}
        doc["pipelined"][size] = {
            "bound": max(shared, per_core),
            "shared_cores": shared,
            "per_core": per_core,
            "decode_only": c / d,
        }
    int8 = [r["int8"] for r in reports if "int8" in r]
    if int8:
        agreements = [x["agreement"] for x in int8 if x.get("agreement", {}).get("images")]
        doc["int8"] = {
            "model_best_images_per_s": _med([x["model"]["best_images_per_s"] for x in int8]),
            "model_best_batch": int8[0]["model"]["best_batch"],
            "agreement": agreements[0] if agreements else None,
        }
    return doc


def write_outputs(b: Bench, mach: dict[str, Any]) -> bool:
    """Write OUT/results.json (every run, raw), then the results file and its results.json.

    False, with neither of the last two written, when the machine was busy and the run
    was asked for a quiet one (--require-quiet).
    """
    s = summary(b)
    reasons = busy_reasons(b)
    doc: dict[str, Any] = {
        "run_id": b.extra.get("run_id"),
        "quiet": {
            "busy": bool(reasons),
            "reasons": reasons,
            "busy_load_per_core": b.cfg.busy_load,
            "busy_others_cores": b.cfg.busy_others,
        },
        "config": {
            k: list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v
            for k, v in dataclasses.asdict(b.cfg).items()
        },
        "machine": mach,
        "models": {"fp32": b.fp32, "int8": b.int8},
        "summary": s,
        "one_image": one_image_summary(b),
        "runs": [r.to_doc() for r in b.runs],
        "extra": {k: v for k, v in b.extra.items() if k != "large_folder"},
        "notes": b.notes,
    }
    raw = json.dumps(doc, indent=2, default=str) + "\n"
    b.cfg.out.mkdir(parents=True, exist_ok=True)
    (b.cfg.out / "results.json").write_text(raw)
    if reasons and b.cfg.require_quiet:
        return False
    b.cfg.results.parent.mkdir(parents=True, exist_ok=True)
    # The raw results are published beside the table, under the same run id.
    b.cfg.results.with_name("results.json").write_text(raw)
    b.cfg.results.write_text(render(b, s, doc["machine"]))
    return True


def render(b: Bench, s: dict[str, Any], mach: dict[str, Any]) -> str:
    cfg = b.cfg
    today = dt.date.today().isoformat()
    lb, la = b.extra["load_before"], b.extra["load_after"]
    reasons = busy_reasons(b)
    lines = [
        "# Benchmark results",
        "",
        f"Run `{b.extra.get('run_id', 'unnamed')}` (date, commit, CPU model, AVX2 / AVX-512 "
        "VNNI); its raw results, under the same run id: "
        f"`{_rel(cfg.results.with_name('results.json'))}`. "
        "This file is written whole by `make bench`; analysis lives in `benchmarks/LIMITS.md`.",
        "",
        *(
            [
                "**Taken on a busy machine**: " + "; ".join(reasons) + ". Every row measured "
                "while other work ran is marked **busy**: its rates and ratios are indicative "
                "only (CPU ms/image is the steadier comparison). Publish a run taken with "
                "`--require-quiet`.",
                "",
            ]
            if reasons
            else [
                f"Quiet machine: the load average before the first round was under "
                f"{cfg.busy_load:g} per core, and in no run did other processes use more than "
                f"{cfg.busy_others:g} cores.",
                "",
            ]
            if any(r.m.others_cores is not None for r in b.runs)
            else [
                "Other processes' CPU use was not measured in this run (no per-run record); "
                "only the load average below says how busy the machine was.",
                "",
            ]
        ),
        f"Measured {today} by `make bench` (`python -m benchmarks.run`) in "
        f"{b.extra['total_s'] / 60:.1f} min: {cfg.n} small photos (~500×375), "
        f"{cfg.n_large} large (~4000×3000), seed {cfg.seed}, {cfg.repeats} interleaved "
        f"round(s); medians over the rounds, peak RSS is the largest seen. Every runner is "
        "timed as a whole process, start-up included.",
        "",
        f"Knobs changed from their defaults: {_changed(cfg) or 'none'}.",
        "",
        f"Load average (1, 5, 15 min) before: {lb[0]:.2f}, {lb[1]:.2f}, {lb[2]:.2f}; "
        f"after: {la[0]:.2f}, {la[1]:.2f}, {la[2]:.2f}.",
        "",
        *render_rounds(b),
        "## Machine",
        "",
        f"- CPU: {mach['cpu']} ({mach['simd']}); {mach['cpus']} cores usable; "
        f"{mach['memory_gb']} GB memory",
        f"- Linux {mach['kernel']}, Python {mach['python']}; "
        + ", ".join(f"{k} {v}" for k, v in mach["versions"].items()),
        f"- ICS at commit {mach['commit']}; model `{cfg.model}` (`{_rel(Path(b.fp32['path']))}`)",
        "",
    ]
    bounds = s.get("bounds")
    for size in ("small", "large"):
        if not any(k.endswith("/" + size) for k in s):
            continue
        n = cfg.n if size == "small" else cfg.n_large
        label = "~500×375" if size == "small" else "~4000×3000"
        lines += [
            f"## {size.capitalize()} photos ({n:,} × {label})",
            "",
            "| runner | images/s | range | steady images/s | start-up s | peak RSS MB "
            "| CPU ms/image | cores used | ICS ÷ runner | settings it ran with |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        ics = (s.get(f"ics/{size}") or {}).get("images_per_s")
        for r in RUNNERS:
            row = s.get(f"{r}/{size}")
            if row is None or r in SERVING_RUNNERS or r in APART_RUNNERS:
                continue
            what = DESCRIBE.get(r, r).format(int8=cfg.int8_model)
            failed = (
                f" ({row['runs'] - row['ok']} of {row['runs']} runs failed)"
                if (row["ok"] < row["runs"])
                else ""
            )
            busy = " · **busy**" if row["busy"] else ""
            lines.append(
                f"| {what}{failed}{busy} | {_fmt(row['images_per_s'])} "
                f"| {_fmt(row['min'])}–{_fmt(row['max'])} | {_fmt(row['steady_images_per_s'])} "
                f"| {_fmt(row['startup_s'], 2)} | {_fmt(row['peak_rss_mb'], 0)} "
                f"| {_fmt(row['cpu_ms_per_image'], 2)} | {_fmt(row.get('cores_used'), 2)} "
                f"| {_fmt(_ratio(ics, row['images_per_s']), 2) if r != 'ics' else ''} "
                f"| {_settings_text(row['settings'])} |"
            )
        if bounds and size in bounds["pipelined"]:
            pb = bounds["pipelined"][size]
            lines.append(
                f"| pipelined bound for {bounds['cpus']} cores (computed, no start-up) "
                f"| {_fmt(pb['bound'])} | | | | | | | {_fmt(_ratio(ics, pb['bound']), 2)} | |"
            )
        lines.append("")
    lines += render_ray_tuning(b)
    lines += render_scaling(b, s)
    if bounds:
        lines += render_bounds(bounds, busy=bool((s.get("bounds/-") or {}).get("busy")))
    lines += render_targets(b, s)
    lines += render_serving(b, s)
    lines += render_soak(b)
    lines += render_one_image(b, one_image_summary(b))
    lines += render_other(b, s)
    prof = b.extra.get("profile") or {}
    if prof.get("lines"):
        lines += [
            "## Profile headline: `ics classify` on the small photos",
            "",
            f"One run of {cfg.n:,} small photos under py-spy ({prof['wall_s']:.1f} s "
            f"with the profiler); raw stacks in `{_rel(Path(prof['raw']))}`.",
            "",
            *prof["lines"],
            "",
        ]
    lines += render_method(b)
    if b.notes:
        lines += ["## Notes from this run", "", *(f"- {n}" for n in b.notes), ""]
    return "\n".join(lines)


def render_rounds(b: Bench) -> list[str]:
    """The load average and CPU count around every round, and other processes' CPU use."""
    rounds = b.extra.get("rounds") or []
    if not rounds:
        return []
    lines = [
        "| round | load before (1, 5, 15 min) | CPUs | load after | CPUs | runs | "
        "others' cores, max | busy runs |",
        "|---:|---|---:|---|---:|---:|---:|---:|",
    ]
    for rd in rounds:
        runs = [r for r in b.runs if r.round == rd["round"]]
        others = [r.m.others_cores for r in runs if r.m.others_cores is not None]
        busy = sum(busy_run(r.m.others_cores, b.cfg.busy_others) for r in runs)
        before, after = rd["before"], rd["after"]
        lines.append(
            f"| {rd['round'] + 1} | {', '.join(f'{x:.2f}' for x in before['load'])} "
            f"| {before['cpus']} | {', '.join(f'{x:.2f}' for x in after['load'])} "
            f"| {after['cpus']} | {len(runs)} | {_fmt(max(others, default=None), 2)} | {busy} |"
        )
    return [
        "Rounds: the load average before a later round is mostly the harness's own earlier "
        'runs; "others\' cores" is what processes outside the measured process tree and this '
        "harness used during a run (/proc/stat).",
        "",
        *lines,
        "",
    ]


def render_ray_tuning(b: Bench) -> list[str]:
    tried = b.extra.get("ray_tuning") or []
    if not tried:
        return []
    lines = [
        "## Ray Data tuning",
        "",
        f"Each configuration ran once on the first {tried[0].get('n', b.cfg.ray_tune_n):,} "
        "small photos, before the rounds; the one with the best rate projected onto the "
        f"{b.cfg.n:,} photos of the table (start-up + N ÷ steady images/s) is what the Ray "
        "rows run, with plain and ICS preprocessing alike.",
        "",
        "| actors | CPUs per actor | batch | images/s (whole process) | steady images/s "
        f"| projected on {b.cfg.n:,} | |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for t in tried:
        st = t["settings"]
        mark = "**chosen**" if t.get("best") else ("" if t["ok"] else f"failed: {t['problem']}")
        lines.append(
            f"| {st['actors']} | {st['actor_cpus']:g} | {st['batch_size']} "
            f"| {_fmt(t['images_per_s'])} | {_fmt(t['steady_images_per_s'])} "
            f"| {_fmt(t.get('projected_images_per_s'))} | {mark} |"
        )
    return [*lines, ""]


def render_scaling(b: Bench, s: dict[str, Any]) -> list[str]:
    """images/s against corpus size, then against cores, from the `scale-nN-cC` jobs."""
    rows = {k: v for k, v in s.items() if "/scale-" in k}
    if not rows:
        return []
    runners = [r for r in RUNNERS if any(k.startswith(r + "/") for k in rows)]
    cores_all = max(v["cores"] for v in rows.values())
    lines = [
        f"## Scaling with work: images/s against corpus size ({cores_all} cores)",
        "",
        "Distinct small photos (~500×375), whole process, start-up included; medians over "
        "the rounds. ms/image = wall time ÷ images: how the cost of one image changes as "
        "the start-up is spread over more of them.",
        "",
        "| runner | images | images/s | range | wall s | ms/image | CPU ms/image | ICS ÷ runner |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    sizes = sorted({v["n"] for v in rows.values() if v["cores"] == cores_all})
    for r in runners:
        for n in sizes:
            row = rows.get(f"{r}/scale-n{n}-c{cores_all}")
            if row is None:
                continue
            ics = (rows.get(f"ics/scale-n{n}-c{cores_all}") or {}).get("images_per_s")
            lines.append(_scale_row(r, row, str(f"{n:,}"), ics))
    core_rows = {k: v for k, v in rows.items() if v["cores"] != cores_all}
    if core_rows:
        n = next(iter(core_rows.values()))["n"]
        lines += [
            "",
            f"## Scaling with cores: images/s on {n:,} small photos, pinned",
            "",
            "The runner's whole process tree is pinned to the first CPUs "
            "(`os.sched_setaffinity`); ICS sizes its threads from the CPUs it may use. "
            "Speed-up is against the same runner on 1 core. Cores used = CPU seconds ÷ wall "
            "seconds: a runner whose threads set their own CPU affinity can use more cores "
            "than it was pinned to, and such a row is marked *escaped the pin*.",
            "",
            "| runner | cores | images/s | range | speed-up | cores used | CPU ms/image "
            "| settings it ran with |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        escaped = False
        for r in runners:
            one = (rows.get(f"{r}/scale-n{n}-c1") or {}).get("images_per_s")
            for c in sorted({v["cores"] for v in rows.values()}):
                row = rows.get(f"{r}/scale-n{n}-c{c}")
                if row is None:
                    continue
                what = DESCRIBE.get(r, r).format(int8=b.cfg.int8_model)
                used = row.get("cores_used")
                # A tenth of a core over the pin is more than measurement noise.
                out = used is not None and used > c + 0.1
                escaped |= out
                lines.append(
                    f"| {what}{' · **busy**' if row['busy'] else ''}"
                    f"{' · *escaped the pin*' if out else ''} | {c} "
                    f"| {_fmt(row['images_per_s'])} | {_fmt(row['min'])}–{_fmt(row['max'])} "
                    f"| {_fmt(_ratio(row['images_per_s'], one), 2)} | {_fmt(used, 2)} "
                    f"| {_fmt(row['cpu_ms_per_image'], 2)} | {_settings_text(row['settings'])} |"
                )
        if escaped:
            lines += [
                "",
                "A row that escaped the pin did not run on the cores it names: onnxruntime's "
                "default session (intra-op threads 0) starts one thread per core of the "
                "machine and sets each thread's CPU affinity itself, over the process's pin "
                "(`taskset` gives the same); a session with its thread count set does not.",
            ]
    return [*lines, ""]


def _scale_row(r: str, row: dict[str, Any], images: str, ics: float | None) -> str:
    what = DESCRIBE.get(r, r).split(":")[0]
    ms = row["wall_s"] * 1e3 / row["n"] if row.get("wall_s") else None
    return (
        f"| {what}{' · **busy**' if row['busy'] else ''} | {images} "
        f"| {_fmt(row['images_per_s'])} | {_fmt(row['min'])}–{_fmt(row['max'])} "
        f"| {_fmt(row['wall_s'], 2)} | {_fmt(ms, 2)} | {_fmt(row['cpu_ms_per_image'], 2)} "
        f"| {_fmt(_ratio(ics, row['images_per_s']), 2) if r != 'ics' else ''} |"
    )


def render_bounds(bd: dict[str, Any], *, busy: bool = False) -> list[str]:
    sweep = " · ".join(
        f"{bs}: {_fmt(v)}" for bs, v in bd["model_by_batch"].items() if v is not None
    )
    lines = [
        "## Bounds" + (" (**busy**: other work ran during these measurements)" if busy else ""),
        "",
        f"- Bare model on pre-decoded tensors, {bd['cpus']} threads, images/s by batch size: "
        f"{sweep}; best {_fmt(bd['model_best_images_per_s'])} at batch "
        f"{bd['model_best_batch']}; one thread {_fmt(bd['model_one_thread_images_per_s'])}; "
        f"{bd['cpus']} one-thread sessions side by side "
        f"{_fmt(bd['model_per_core_sessions_images_per_s'])} in all (batch "
        f"{bd['model_per_core_sessions_best_batch']}).",
    ]
    for size, d in bd["decode"].items():
        pb = bd["pipelined"][size]
        lines.append(
            f"- Decode + preprocess on one core, {size} photos: {_fmt(d['ics_ms'], 2)} ms "
            f"with ICS's preprocessor ({_fmt(d['plain_ms'], 2)} ms the plain PIL way). "
            f"Pipelined bound {_fmt(pb['bound'])} images/s (one session on all cores: "
            f"{_fmt(pb['shared_cores'])}; one single-thread session per core: "
            f"{_fmt(pb['per_core'])}; decoding alone on every core: {_fmt(pb['decode_only'])})."
        )
    if bd.get("int8"):
        i8 = bd["int8"]
        lines.append(
            f"- INT8 bare model: best {_fmt(i8['model_best_images_per_s'])} images/s at batch "
            f"{i8['model_best_batch']}."
        )
        lines += _agreement_lines(i8.get("agreement") or {})
    return [*lines, ""]


def _agreement_lines(ag: dict[str, Any]) -> list[str]:
    """INT8's top-1 agreement with FP32: on the corpus, and on the held-out photos."""
    if not ag:
        return []
    lines = [
        f"- INT8 top-1 agreement with FP32 on {ag['images']:,} corpus photos (variations of "
        f"scikit-image's photos, the calibration's sources): {ag['top1_agreement']:.1%}"
        + (
            f"; where FP32's top-1 probability is at least 0.5: "
            f"{ag['confident_top1_agreement']:.1%}"
            if ag.get("confident_top1_agreement") is not None
            else ""
        )
        + "."
    ]
    h = ag.get("heldout")
    if not h:
        return lines
    if "skipped" in h:
        return [*lines, f"- Held-out photos: not measured ({h['skipped']})."]
    lines.append(
        f"- Held-out photos ({h['source']}, photographs only, never used for calibration): "
        f"INT8 agrees with FP32 on {h['top1_agreement']:.1%} of {h['photos']} photos (top-5: "
        f"{h['top5_agreement']:.1%}), and on {h['varied_top1_agreement']:.1%} of "
        f"{h['varied_images']:,} variations of them; where FP32's top-1 probability is at "
        f"least 0.5, on {h['varied_confident_top1_agreement']:.1%} of "
        f"{h['varied_confident_images']:,}. FP32 agrees with itself on "
        f"{h['varied_noise_floor_top1']:.1%} of those variations when every input value "
        "moves by ±0.5 grey level (its noise floor)."
    )
    if "decision_agreement" in h:
        lines.append(decision_line(h))
    return lines


def _n(count: int, one: str, many: str = "") -> str:
    return f"{count} {one if count == 1 else many or one + 's'}"


def _photo_flip(f: dict[str, Any], threshold: float) -> str:
    def side(name: str) -> str:
        d = f[name]
        status = "SUCCEEDED" if d["p"] >= threshold else "LOW_CONFIDENCE"
        return f"{name.upper()} {d['label']} {d['p']:.3f} {status}"

    return f"`{f['photo']}` ({side('fp32')}, {side('int8')})"


def decision_line(h: dict[str, Any]) -> str:
    """The workflow's decisions of INT8 against FP32's on the held-out photos, with the
    photos that flip."""
    t = h["threshold"]
    flips = [f for f in h.get("flips", []) if f["decision_differs"]]
    misses = [f for f in h.get("flips", []) if f["top1_differs"] and not f["decision_differs"]]
    which = "; ".join(_photo_flip(f, t) for f in flips[:8]) + ("; ..." if len(flips) > 8 else "")
    flipped = _n(h["decision_flips"], "flip") + (f": {which}" if which else "")
    line = (
        f"- Decisions at threshold {t:g} (SUCCEEDED at or above it, LOW_CONFIDENCE below, as "
        f"the workflow records them): INT8's equals FP32's on {h['decision_agreement']:.1%} "
        f"of {h['photos']} photos ({flipped})"
        f" and on {h['varied_decision_agreement']:.1%} of {h['varied_images']:,} variations "
        f"({_n(h['varied_decision_flips'], 'flip')}); FP32 keeps its own decision on "
        f"{h['varied_noise_floor_decisions']:.1%} of those variations under ±0.5 grey level"
        f"{_photo_floor(h)}. Where FP32's top-1 probability is at least 0.5 "
        f"({h['confident_photos']} photos), "
        f"INT8 gives its top-1 on {h['confident_top1_agreement']:.1%}"
    )
    if misses:
        line += f" (not on {'; '.join(_photo_flip(f, t) for f in misses[:8])})"
    return line + "."


def _photo_floor(h: dict[str, Any]) -> str:
    """FP32's own decisions on the photos under the noise, in each draw of it (runs from
    before the measure had none)."""
    rates = h.get("photo_noise_floor_decisions")
    if not rates:
        return ""
    flips = h["photo_noise_floor_decision_flips"]
    low, high = min(rates), max(rates)
    kept = f"{low:.1%}" if low == high else f"{low:.1%} to {high:.1%}"
    few, many = min(flips), max(flips)
    flipped = _n(few, "flip") if few == many else f"{few} to {many} flips"
    return (
        f", and on {kept} of the {h['photos']} photos themselves in each of {len(rates)} "
        f"draws of that noise ({flipped})"
    )


def _floor_on_photos(h: dict[str, Any]) -> str:
    rates = h.get("photo_noise_floor_decisions")
    return f"; on the photos, at most {max(rates):.1%}" if rates else ""


def decision_targets(h: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """The INT8 targets judged by the workflow's decision (issue 20), on the held-out
    photos and their variations: (target, figure, met)."""
    if not h or "skipped" in h or "decision_agreement" not in h:
        why = (h or {}).get("skipped", "no held-out decision measurement in this run")
        return [
            ("INT8 decision equals FP32's on ≥ 99 % of held-out photos", why, None),
            ("INT8 top-1 equals FP32's on 100 % of held-out photos where FP32's ≥ 0.5", why, None),
        ]
    decided = h["decision_agreement"], h["varied_decision_agreement"]
    misses = h["confident_top1_misses"], h["varied_confident_top1_misses"]
    return [
        (
            f"INT8 decision (SUCCEEDED/LOW_CONFIDENCE at {h['threshold']:g}) equals FP32's on "
            f"≥ 99 % of held-out photos ({h['photos']} photos; {h['varied_images']:,} "
            "variations)",
            f"{decided[0]:.1%} ({_n(h['decision_flips'], 'flip')}); {decided[1]:.1%} "
            f"({_n(h['varied_decision_flips'], 'flip')}; FP32's own noise floor "
            f"{h['varied_noise_floor_decisions']:.1%}{_floor_on_photos(h)})",
            decided[0] >= 0.99 and decided[1] >= 0.99,
        ),
        (
            f"INT8 top-1 equals FP32's on 100 % of held-out photos where FP32's top-1 ≥ 0.5 "
            f"({_n(h['confident_photos'], 'photo')}; "
            f"{_n(h['varied_confident_images'], 'variation')})",
            f"{h['confident_top1_agreement']:.1%} ({_n(misses[0], 'miss', 'misses')}); "
            f"{h['varied_confident_top1_agreement']:.1%} ({_n(misses[1], 'miss', 'misses')})",
            None if not h["confident_photos"] else misses == (0, 0),
        ),
    ]


def _target(ok: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "not measured"}[ok]


def render_targets(b: Bench, s: dict[str, Any]) -> list[str]:
    def ips(key: str) -> float | None:
        return (s.get(key) or {}).get("images_per_s")

    rows: list[tuple[str, str, bool | None]] = []
    bounds = s.get("bounds") or {}
    for size, peers in (
        ("small", (("plain", 1.15), ("ray", 3.0), ("http", 2.0))),
        ("large", (("plain", 5.0), ("ray", 5.0))),
    ):
        ics = ips(f"ics/{size}")
        if size == "small":
            bound = (bounds.get("pipelined", {}).get("small") or {}).get("bound")
            r = _ratio(ics, bound)
            rows.append(
                (
                    "small photos: ICS ≥ 0.85 × pipelined bound",
                    f"{_fmt(r, 3)} ({_fmt(ics)} of {_fmt(bound)} images/s)",
                    None if r is None else r >= 0.85,
                )
            )
        for peer, want in peers:
            r = _ratio(ics, ips(f"{peer}/{size}"))
            rows.append(
                (
                    f"{size} photos: ICS ≥ {want:g} × {peer}",
                    f"{_fmt(r, 3)} ×",
                    None if r is None else r >= want,
                )
            )
    plain = (s.get("plain/small") or {}).get("steady_images_per_s")
    rows += _serving_targets(serving_summary(b), bounds, plain)
    rows += _soak_targets(soak_reports(b))
    mem = b.extra.get("memory") or []
    if len(mem) == 2 and all(m["ok"] for m in mem):
        grow = mem[1]["peak_rss_mb"] - mem[0]["peak_rss_mb"]
        rows.append(
            (
                f"memory: {mem[1]['n']:,} images within 150 MB of {mem[0]['n']:,}",
                f"{grow:+,.0f} MB ({mem[0]['peak_rss_mb']:,.0f} → {mem[1]['peak_rss_mb']:,.0f})",
                grow <= 150 if mem[1]["n"] >= 20000 else None,
            )
        )
    else:
        rows.append(("memory: 20,000 images within 150 MB of 1,000", "not run", None))
    i8 = bounds.get("int8")
    if i8:
        r = _ratio(i8["model_best_images_per_s"], bounds.get("model_best_images_per_s"))
        rows.append(
            ("INT8 bare model ≥ 1.8 × FP32", f"{_fmt(r, 3)} ×", None if r is None else r >= 1.8)
        )
        h = (i8.get("agreement") or {}).get("heldout") or {}
        if h and "skipped" not in h:
            rows.append(
                (
                    f"INT8 top-1 agreement ≥ 98 % on held-out photos ({h['photos']} photos; "
                    f"{h['varied_images']:,} variations of them)",
                    f"{h['top1_agreement']:.1%}; {h['varied_top1_agreement']:.1%} "
                    f"(FP32's own noise floor {h['varied_noise_floor_top1']:.1%})",
                    h["top1_agreement"] >= 0.98 and h["varied_top1_agreement"] >= 0.98,
                )
            )
        else:
            why = h.get("skipped", "no held-out measurement in this run")
            rows.append(("INT8 top-1 agreement ≥ 98 % on held-out photos", why, None))
        rows += decision_targets(h)
        r = _ratio(ips("ics-int8/small"), ips("plain/small"))
        rows.append(
            (
                "INT8 end to end: ICS --model int8 ≥ 1.6 × FP32 plain loop",
                f"{_fmt(r, 3)} ×",
                None if r is None else r >= 1.6,
            )
        )
    else:
        rows.append(("INT8 targets", f"skipped: no `{b.cfg.int8_model}` model", None))
    lean, full = ips("ics-lean/small"), ips("ics/small")
    if lean and full:
        cost = 1 - full / lean
        rows.append(
            (
                "non-model work ≤ 10 % (default vs lean configuration)",
                f"{cost:+.1%} ({_fmt(full)} vs {_fmt(lean)} images/s)"
                + ("; below zero the lean run was the slower: noise" if cost < 0 else ""),
                cost <= 0.10,
            )
        )
    remote = (s.get("ics-sagemaker/small") or {}).get("steady_images_per_s")
    local = (s.get("ics/small") or {}).get("steady_images_per_s")
    if remote and local:
        rows.append(
            (
                "remote model: `sagemaker:` to a local `ics serve`, steady rate beside the "
                "local model's (the network hop's cost; no target)",
                f"{remote / local:.2f} × ({_fmt(remote)} vs {_fmt(local)} images/s)",
                None,
            )
        )
    captured = ips("ics-capture/small")
    if captured and full:
        cost = 1 - captured / full
        rows.append(
            (
                "data capture ≤ 10 % (`--capture` vs the default configuration)",
                f"{cost:+.1%} ({_fmt(captured)} vs {_fmt(full)} images/s)"
                + ("; below zero the capturing run was the faster: noise" if cost < 0 else ""),
                cost <= 0.10,
            )
        )
    one = b.extra.get("one_image") or []
    walls = [r["wall_s"] for r in one if r["ok"]]
    if walls:
        rows.append(
            (
                "start-up: `ics classify` on one image < 0.5 s, median (warm model cache)",
                f"median {statistics.median(walls):.2f} s, max {max(walls):.2f} s",
                statistics.median(walls) < 0.5,
            )
        )
    rows += _one_image_targets(one_image_summary(b))
    lines = ["## Targets", "", "| target | measured | |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {_target(ok)} |" for t, m, ok in rows]
    return [*lines, ""]


#: One image, by what a person types (run.ONE_IMAGE_PATHS), as the report names them.
ONE_IMAGE_NAMES = {
    "terminal": "`ics classify ONE.jpg` on a terminal (progress bar, summary table)",
    "json": "`ics classify ONE.jpg --json` into a pipe",
    "plain": "plain loop on the one image",
}
#: The target of issue 18: the default output on a terminal within 2 × the plain loop.
ONE_IMAGE_TARGET = 2.0


def one_image_summary(b: Bench) -> dict[str, Any]:
    """Medians of the one-image runs per path (wall and CPU seconds, whole process), and
    each ICS path's ratio to the plain loop; empty for a run without them."""
    paths = b.extra.get("one_image_paths") or {}
    out: dict[str, Any] = {}
    for path, runs in paths.items():
        ok = [r for r in runs if r["ok"]]
        out[path] = {
            "runs": len(runs),
            "ok": len(ok),
            "problems": sorted({r["problem"] for r in runs if not r["ok"]}),
            "wall_s": _med([r["wall_s"] for r in ok]),
            "min_s": min((r["wall_s"] for r in ok), default=None),
            "max_s": max((r["wall_s"] for r in ok), default=None),
            "cpu_s": _med([r["cpu_s"] for r in ok]),
            "busy": any(busy_run(r.get("others_cores"), b.cfg.busy_others) for r in runs),
        }
    plain = (out.get("plain") or {}).get("wall_s")
    for path in ("terminal", "json"):
        if path in out:
            out[path]["over_plain"] = _ratio(out[path]["wall_s"], plain)
    return out


def _one_image_targets(one: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    term, js, plain = (one.get(k) or {} for k in ("terminal", "json", "plain"))
    if not term:
        return []
    r = term.get("over_plain")
    return [
        (
            f"one image, default output on a terminal: ≤ {ONE_IMAGE_TARGET:g} × the plain "
            "loop's whole process, medians",
            f"{_fmt(r, 2)} × ({_fmt(term.get('wall_s'), 3)} s vs {_fmt(plain.get('wall_s'), 3)}"
            f" s; `--json` {_fmt(js.get('wall_s'), 3)} s, {_fmt(js.get('over_plain'), 2)} ×)",
            None if r is None else r <= ONE_IMAGE_TARGET,
        )
    ]


def render_one_image(b: Bench, one: dict[str, Any]) -> list[str]:
    """The one-image table: what a person waits for, each way, as a whole process."""
    if not one:
        return []
    lines = [
        "## One image, as a person runs it",
        "",
        f"Each way {b.cfg.one_image_runs} times, interleaved, after one untimed run of each "
        "(the default store and results folder of a fresh ICS home, the model cache warm); "
        "whole process, start to exit. On a terminal stdout and stderr are one "
        "pseudo-terminal, so the progress bar and the summary table are drawn as for a "
        "person.",
        "",
        "| way | median s | range s | CPU s | ÷ plain loop | runs |",
        "|---|---:|---|---:|---:|---|",
    ]
    for path, name in ONE_IMAGE_NAMES.items():
        row = one.get(path)
        if not row:
            continue
        failed = (
            f" ({row['runs'] - row['ok']} FAILED: {'; '.join(row['problems'])})"
            if (row["ok"] < row["runs"])
            else ""
        )
        busy = " · **busy**" if row["busy"] else ""
        lines.append(
            f"| {name}{busy} | {_fmt(row['wall_s'], 3)} | {_fmt(row['min_s'], 3)}–"
            f"{_fmt(row['max_s'], 3)} | {_fmt(row['cpu_s'], 2)} | "
            f"{_fmt(row.get('over_plain'), 2)} | {row['ok']} of {row['runs']}{failed} |"
        )
    return [*lines, ""]


def serving_summary(b: Bench) -> dict[str, dict[int, dict[str, Any]]]:
    """Per serving runner and client count: medians over the rounds of its own figures."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for name in SERVING_RUNNERS:
        runs = [r for r in b.runs if r.job.runner == name and r.job.size == "small"]
        reports = [r.m.report for r in runs if r.ok and r.m.report]
        if not runs:
            continue
        by_clients: dict[int, list[dict[str, Any]]] = {}
        for rep in reports:
            for p in rep.get("passes", []):
                by_clients.setdefault(int(p["clients"]), []).append(p)
        out[name] = {
            clients: {
                "images_per_s": _med([p["images_per_s"] for p in ps]),
                "p50_ms": _med([p["p50_ms"] for p in ps]),
                "p99_ms": _med([p["p99_ms"] for p in ps]),
                "errors": sum(int(p["errors"]) for p in ps),
                "server_cpu_ms": _med([p.get("server_cpu_ms_per_request") for p in ps]),
                "client_cpu_ms": _med([p.get("client_cpu_ms_per_request") for p in ps]),
                "requests": ps[0]["requests"],
                "rounds": len(ps),
                "startup_s": _med([rep["startup_s"] for rep in reports]),
            }
            for clients, ps in sorted(by_clients.items())
        }
        failed = len(runs) - len(reports)
        if failed:
            out[name][0] = {"failed": failed, "runs": len(runs)}
    return out


def serving_bound(row: dict[str, Any], bounds: dict[str, Any]) -> float | None:
    """What any server could reach on these cores with no serving work at all: the pipelined
    bound's model and decode core-seconds per image, plus the load generator's CPU per
    request (it shares the cores)."""
    pb = (bounds.get("pipelined") or {}).get("small")
    c = bounds.get("cpus")
    client = row.get("client_cpu_ms")
    if not pb or not c or client is None:
        return None
    per_image = c / pb["bound"] + client / 1e3
    bound: float = c / per_image
    return bound


def model_decode_ms(bounds: dict[str, Any]) -> float | None:
    """The model's and the decode's CPU ms per image, as the pipelined bound counts them."""
    pb = (bounds.get("pipelined") or {}).get("small")
    c = bounds.get("cpus")
    if not pb or not c:
        return None
    ms: float = 1e3 * c / pb["bound"]
    return ms


#: The served protocols the targets are checked on: runner, and its name in the table.
SERVED_PATHS = (("serve", "serve (HTTP)"), ("serve-grpc", "serve (gRPC)"))


def _serving_targets(
    s: dict[str, dict[int, dict[str, Any]]], bounds: dict[str, Any], plain: float | None
) -> list[tuple[str, str, bool | None]]:
    """Issue 19's targets for `ics serve`, each a ratio of figures of one run: at 32 clients
    ≥ 0.9 × the serving bound, CPU per request beyond the model and the decode ≤ LitServe's,
    p99 ≤ 1.5 × the median; one client ≥ 0.9 × the plain loop's per-image rate."""
    peer = (s.get("litserve") or {}).get(32) or {}
    base = model_decode_ms(bounds)
    rows: list[tuple[str, str, bool | None]] = []
    for runner, name in SERVED_PATHS:
        ics = s.get(runner) or {}
        many = ics.get(32)
        if not many:
            continue
        one = ics.get(1) or {}
        rate = many["images_per_s"]
        bound = serving_bound(many, bounds)
        r = _ratio(rate, bound)
        rows.append(
            (
                f"{name}, 32 clients: ≥ 0.9 × the serving bound",
                f"{_fmt(r, 3)} ({_fmt(rate)} of {_fmt(bound)} images/s)",
                None if r is None else r >= 0.9,
            )
        )
        mine, theirs = many.get("server_cpu_ms"), peer.get("server_cpu_ms")
        if mine is None or theirs is None or base is None:
            extra = "not measured (no LitServe or bounds run)"
            ok = None
        else:
            extra = (
                f"{_fmt(mine - base, 2)} ms vs LitServe's {_fmt(theirs - base, 2)} ms "
                f"({_fmt(mine, 2)} ms and {_fmt(theirs, 2)} ms in all; model and decode "
                f"{_fmt(base, 2)} ms)"
            )
            ok = mine <= theirs
        rows.append(
            (
                f"{name}, 32 clients: server CPU per request beyond model and decode ≤ "
                "LitServe's, every request recorded",
                extra,
                ok,
            )
        )
        p50, p99 = many["p50_ms"], many["p99_ms"]
        r = _ratio(p99, p50)
        rows.append(
            (
                f"{name}, 32 clients: p99 ≤ 1.5 × the median",
                f"{_fmt(r, 3)} × ({_fmt(p99)} vs {_fmt(p50)} ms)",
                None if r is None else r <= 1.5,
            )
        )
        r = _ratio(one.get("images_per_s"), plain)
        rows.append(
            (
                f"{name}, one client: ≥ 0.9 × the plain loop's per-image rate (steady)",
                f"{_fmt(r, 3)} × ({_fmt(one.get('images_per_s'))} vs {_fmt(plain)} images/s)",
                None if r is None else r >= 0.9,
            )
        )
        errors = sum(int(row.get("errors", 0)) for c, row in ics.items() if c)
        rows.append((f"{name}: no errors", f"{errors} errors", errors == 0))
    return rows


def render_serving(b: Bench, summ: dict[str, Any]) -> list[str]:
    """Throughput of the servers under load: one client at a time, then many."""
    s = serving_summary(b)
    if not s:
        return []
    lines = [
        "## Serving (HTTP and gRPC): one JPEG per request, small photos",
        "",
        "A load generator in its own process (`benchmarks/server_load.py`: asyncio + httpx, "
        "keep-alive connections, loopback) sends every small photo once per pass as a raw "
        "`image/jpeg` body, one client at a time and then many at once; it shares the "
        "machine's cores with the server. For `ics serve`'s gRPC endpoint it sends each "
        "photo as a ModelInfer call (the JPEG as a BYTES input, as `tritonclient.grpc` "
        "does; grpcio's asyncio API, one HTTP/2 channel shared by the clients), its own "
        "CPU counted the same way. images/s = answered images ÷ the pass's wall "
        "time (server start-up not included); latency is per request, as the client sees "
        "it. Medians over the rounds. CPU ms/image: the server's whole process tree, and "
        "the load generator's own, during the pass.",
        "",
        "| server | clients | images/s | p50 ms | p99 ms | server CPU ms/image "
        "| load generator CPU ms/image | server start-up s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rows in s.items():
        what = DESCRIBE.get(name, name)
        if 0 in rows:
            lines.append(
                f"| {what} ({rows[0]['failed']} of {rows[0]['runs']} runs failed) | | | | | | | |"
            )
        for clients, row in rows.items():
            if clients == 0:
                continue
            lines.append(
                f"| {what} | {clients} | {_fmt(row['images_per_s'])} | {_fmt(row['p50_ms'])} "
                f"| {_fmt(row['p99_ms'])} | {_fmt(row.get('server_cpu_ms'), 2)} "
                f"| {_fmt(row.get('client_cpu_ms'), 2)} | {_fmt(row['startup_s'], 2)} |"
            )
    peer = s.get("litserve", {})
    for runner in ("serve", "serve-grpc"):
        ics = s.get(runner, {})
        ratios = [
            f"{c} client(s) {_fmt(_ratio(ics[c]['images_per_s'], peer[c]['images_per_s']), 2)} ×"
            for c in ics
            if c and c in peer
        ]
        if ratios:
            lines += [
                "",
                f"{SERVER_NAMES[runner]} ÷ LitServe, images/s: " + "; ".join(ratios) + ".",
            ]
    lines += _serving_bound(s, summ.get("bounds") or {})
    return [*lines, ""]


def soak_reports(b: Bench) -> list[dict[str, Any]]:
    """The soak's own figures (benchmarks.soak), one per successful run."""
    runs = [r for r in b.runs if r.job.runner == "soak" and r.ok and r.m.report]
    return [r.m.report["soak"] for r in runs if r.m.report and "soak" in r.m.report]


def _soak_targets(soaks: list[dict[str, Any]]) -> list[tuple[str, str, bool | None]]:
    """Issue 17's targets: the ordinary clients barely notice the hostile ones."""
    if not soaks:
        return []
    k = soaks[-1]
    calm, hostile = k["calm"], k["hostile"]
    n = k["hostile_clients"]
    rate, p99 = k["rate_ratio"], k["p99_ratio"]
    peak, budget = hostile["peak_rss_mb"], k["rss_budget_mb"]
    bound = (k.get("bound") or {}).get("rate_ratio")
    allows = f"; the machine allows {_fmt(bound, 3)} ×" if bound is not None else ""
    return [
        (
            f"soak: ordinary clients' rate beside {n} hostile ≥ 0.9 × alone",
            f"{_fmt(rate, 3)} × ({_fmt(hostile['images_per_s'])} vs "
            f"{_fmt(calm['images_per_s'])} images/s{allows})",
            None if rate is None else rate >= 0.9,
        ),
        (
            f"soak: ordinary clients' p99 beside {n} hostile ≤ 1.5 × alone",
            f"{_fmt(p99, 3)} × ({_fmt(hostile['p99_ms'])} vs {_fmt(calm['p99_ms'])} ms)",
            None if p99 is None else p99 <= 1.5,
        ),
        (
            "soak: server's peak RSS ≤ its peak alone + unauthenticated_body_memory",
            f"{_fmt(peak, 0)} MB (budget {_fmt(budget, 0)} MB)",
            peak <= budget,
        ),
        (
            "soak: no errors seen by ordinary clients",
            f"{calm['errors'] + hostile['errors']} errors",
            calm["errors"] + hostile["errors"] == 0,
        ),
    ]


def render_soak(b: Bench) -> list[str]:
    """`ics serve` with ordinary clients alone, then beside hostile ones."""
    soaks = soak_reports(b)
    failed = [r for r in b.runs if r.job.runner == "soak" and not r.ok]
    if not soaks and not failed:
        return []
    lines = ["## Soak: `ics serve` beside hostile clients", ""]
    for r in failed:
        lines.append(f"- A soak run failed: {r.problem}.")
    if not soaks:
        return [*lines, ""]
    k = soaks[-1]
    lines += [
        f"`benchmarks/soak.py`: `ics serve` with an API token and SigV4 keys on loopback; "
        f"{k['clients']} ordinary clients (bearer token, one small photo per request) for "
        f"{k['duration_s']:g} s alone, then {k['duration_s']:g} s beside "
        f"{k['hostile_clients']} hostile clients in their own process "
        "(`benchmarks/hostile.py`: slow headers, slow bodies under a plausible signature, "
        "made-up signatures, strange methods, huge declared lengths). The server's RSS is "
        "sampled every 0.1 s; its budget is its peak alone plus the memory its settings let "
        f"unauthenticated bodies take ({_fmt(k['body_budget_mb'], 0)} MB).",
        "",
        "| phase | images/s | p50 ms | p99 ms | errors | server peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in ("calm", "hostile"):
        ph = k[name]
        label = "alone" if name == "calm" else f"beside {k['hostile_clients']} hostile"
        lines.append(
            f"| {label} | {_fmt(ph['images_per_s'])} | {_fmt(ph['p50_ms'])} "
            f"| {_fmt(ph['p99_ms'])} | {ph['errors']} | {_fmt(ph['peak_rss_mb'], 0)} |"
        )
    lines += _soak_cpu(k)
    kinds = ((k["hostile"].get("hostile") or {}).get("kinds")) or {}
    if kinds:
        lines += ["", "What the hostile clients got (HTTP status: count; 0: no answer):", ""]
        for kind, row in kinds.items():
            answers = ", ".join(f"{st}: {c}" for st, c in row["answers"].items())
            lines.append(
                f"- {kind} ({row['clients']} clients): {row['attempts']} attempts; {answers}"
            )
    return [*lines, ""]


def _soak_cpu(k: dict[str, Any]) -> list[str]:
    """Where the CPU went in each phase of the soak, and the rate ratio it allows."""
    bound = k.get("bound")
    if not bound or "cpu" not in k["calm"]:
        return []  # a run from before the soak recorded its CPU
    lines = [
        "",
        "CPU seconds over the ordinary clients' window (server: its process tree; others: "
        "what none of the soak's processes got: other processes, kernel work charged to "
        "none, and the hypervisor's steal, shown apart too):",
        "",
        "| phase | wall s | server s | of which its event loop s | server ms/request "
        "| ordinary clients s | hostile clients s | others s | steal s | cores busy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("calm", "hostile"):
        c = k[name]["cpu"]
        label = "alone" if name == "calm" else f"beside {k['hostile_clients']} hostile"
        lines.append(
            f"| {label} | {_fmt(c['wall_s'])} | {_fmt(c['server_s'])} "
            f"| {_fmt(c.get('server_loop_s'))} "
            f"| {_fmt(c['server_ms_per_request'])} | {_fmt(c['clients_s'])} "
            f"| {_fmt(c['hostile_s'])} | {_fmt(c['others_s'])} | {_fmt(c.get('steal_s'))} "
            f"| {_fmt(c['machine_cores_used'], 2)} of {c['cores']} |"
        )
    rate, ratio = k.get("rate_ratio"), bound.get("rate_ratio")
    measured = (
        f" Measured: {_fmt(rate, 3)} ×, {_fmt(bound.get('measured_over_bound'), 3)} of that bound."
        if rate is not None
        else ""
    )
    cpu_bound = "CPU-bound" if bound["alone_cpu_bound"] else "**not** CPU-bound"
    lines += [
        "",
        f"The bound: alone, server and ordinary clients used {_fmt(bound['alone_cores_used'], 2)}"
        f" cores (the machine was busy {_fmt(bound['alone_machine_share'] * 100, 1)} % of "
        f"its cores' time: {cpu_bound}). Beside the hostile clients, their generator used "
        f"{_fmt(bound['hostile_generator_cores'], 2)} cores and other work "
        f"{_fmt(bound['others_hostile_cores'], 2)}, leaving "
        f"{_fmt(bound.get('left_hostile_cores'), 2)} to server and clients. Were every "
        "ordinary request to cost what it cost alone, and the server to spend nothing on "
        "hostile connections, the ordinary clients could reach "
        f"{_fmt(ratio, 3)} × their rate alone ({_fmt(bound.get('idle_machine_rate_ratio'), 3)}"
        f" × on a machine with no other work).{measured} The server's own extra CPU for the "
        f"hostile connections: {_fmt(bound['server_extra_s'])} s "
        f"({_fmt(bound.get('server_loop_extra_s'))} s of it on its event loop's thread; "
        f"{_fmt(bound['server_extra_cores'], 3)} cores, "
        f"{_fmt(bound['server_extra_ms_per_hostile_attempt'], 2)} ms per hostile attempt, "
        f"about {bound['hostile_attempts_in_window']:,} in the window).",
    ]
    return lines


SERVER_NAMES = {
    "serve": "`ics serve` (HTTP)",
    "serve-grpc": "`ics serve` (gRPC)",
    "litserve": "LitServe",
}


def _serving_bound(s: dict[str, dict[int, dict[str, Any]]], bounds: dict[str, Any]) -> list[str]:
    """What any server could reach on these cores with no serving work at all (serving_bound),
    per server and client count, and the share of it each reached."""
    out = []
    for name in SERVER_NAMES:
        for clients, row in s.get(name, {}).items():
            bound = serving_bound(row, bounds) if clients else None
            if bound is None:
                continue
            out.append(
                f"{SERVER_NAMES[name]} at {clients} client(s): "
                f"{_fmt(bound)} images/s ({_fmt(_ratio(row['images_per_s'], bound), 2)} of it)"
            )
    if not out:
        return []
    return [
        "",
        f"Serving bound on {bounds['cpus']} cores (computed): the model's and the decode's "
        "core-seconds per image, as in the pipelined bound, plus the load generator's CPU per "
        "request (it shares the cores), and no serving work in the server at all. "
        + "; ".join(out)
        + ".",
    ]


def render_other(b: Bench, s: dict[str, Any]) -> list[str]:
    lines = ["## Other measurements", ""]
    for m in b.extra.get("memory") or []:
        failed = "" if m["ok"] else f" (FAILED: {m['problem']})"
        if busy_run(m.get("others_cores"), b.cfg.busy_others) or busy_at_start(
            first_snapshot(b), b.cfg.busy_load
        ):
            failed += " · **busy**"
        lines.append(
            f"- Memory run: `ics classify` on {m['n']:,} images (the small corpus repeated "
            f"by hard links): {m['wall_s']:.1f} s, {m['images_per_s']:.1f} images/s, "
            f"peak RSS {m['peak_rss_mb']:,.0f} MB{failed}."
        )
    one = b.extra.get("one_image") or []
    if one:
        walls = ", ".join(
            f"{r['wall_s']:.2f}"
            + (
                " (busy)"
                if busy_run(r.get("others_cores"), b.cfg.busy_others)
                or busy_at_start(first_snapshot(b), b.cfg.busy_load)
                else ""
            )
            for r in one
        )
        lines.append(f"- `ics classify` on one image, warm model cache: {walls} s.")
    lean = s.get("ics-lean/small")
    if lean:
        lines.append(
            "- No `ics classify` flag turns the execution store off; the lean "
            "configuration keeps the store on tmpfs (`--store sqlite:////dev/shm/...`) and "
            "writes results to /dev/null, so its gap to the default bounds the cost of the "
            "disk writes, not of the store itself. The profile below shows the rest."
        )
    return [*lines, ""] if len(lines) > 2 else []


def render_method(b: Bench) -> list[str]:
    cfg = b.cfg
    return [
        "## How it was measured",
        "",
        "- ICS's modules are compiled to bytecode before the runs (as an installed package "
        "is), so no runner process compiles them at start-up; before each timed run every "
        "file of its corpus is read once, so each runner starts with its photos in the page "
        "cache.",
        "- Corpus (`benchmarks/corpus.py`): scikit-image's bundled photos, each image a "
        "random crop, flip and colour jitter, resized to its class and saved as JPEG "
        "(quality 85-95); large ones get sensor-like grain so they compress like real "
        "12-megapixel photos (about 3 MB each). Deterministic from the seed.",
        "- images/s = images ÷ wall time of the whole process (start-up included). "
        "Steady images/s is the runner's own clock from when it was ready (ICS: its "
        "`elapsed_s`), and start-up is the difference.",
        "- Peak RSS: the larger of the process's own high-water mark (VmHWM) and the "
        "summed RSS of its whole process tree (Ray's workers and raylet, the HTTP design's "
        "endpoint process), both sampled from /proc every 0.1 s; pages shared between "
        "processes count once per process.",
        "- Cores used = CPU seconds ÷ wall seconds of the run: how much of the machine the "
        "runner actually got (at most the core count).",
        "- CPU ms/image: user + system time of the whole process tree (the larger of what "
        "wait4 reports for the process and its reaped children, and the CPU time of every "
        "process of the tree sampled from /proc).",
        "- Every runner uses the same ONNX file. Each row's settings are what that runner "
        "reported it ran with (session options read back from onnxruntime; ICS's from "
        "`ics config show` with its automatic values resolved). The plain loop runs "
        "onnxruntime's default session, as a user writes it; Ray Data runs the configuration "
        "its tuning pass chose; the rows with ICS's decode + preprocessing run the same "
        "peer with `ics_service.imaging.Preprocessor` in place of their own PIL code, so "
        "their gap to ICS is the pipeline's and their gap to the plain peer the decoder's. "
        f"HTTP design: stdlib endpoint in its own process, a new connection per image, "
        f"{cfg.http_concurrency} requests at a time.",
        "- Busy machine: the 1-min load average before the first round above "
        f"{cfg.busy_load:g} per core marks every row busy; other processes using more than "
        f"{cfg.busy_others:g} cores on average during a run (the CPU time of every process "
        "outside the run's process tree and this harness, read from /proc about every 0.3 s: "
        "a lower bound, as shorter-lived processes are missed) marks that run's row busy.",
        "- Pipelined bound = 1 / (1/M + D/C): C cores share the model's core-seconds per "
        "image (C/M) and the decode's (D). M is the bare model's best images/s on all C "
        "cores, either one session with C threads or C single-thread sessions side by side "
        "(whichever is faster, each at its best batch size); D the decode + preprocess "
        "seconds per image on one core with ICS's preprocessor. The bound has no start-up; "
        "ICS's images/s includes its start-up.",
        "",
    ]


def _changed(cfg: Config) -> str:
    default = Config()
    return ", ".join(
        f"BENCH_{f.name.upper()}={_knob(getattr(cfg, f.name))}"
        for f in dataclasses.fields(Config)
        if f.name not in ("large", "out", "results", "rerender")
        and getattr(cfg, f.name) != getattr(default, f.name)
    )


def _knob(v: Any) -> str:
    if isinstance(v, tuple):
        return ",".join(v)
    if isinstance(v, bool):
        return "1" if v else "0"
    return str(v)


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(p)
