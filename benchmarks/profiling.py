"""The headline of a py-spy profile of an `ics classify` run.

py-spy samples every thread of the process (the decode threads, the inference loop and
the recorder), which pyinstrument and cProfile do not. The raw (collapsed) output is
summarised by stage: where the samples of each thread went, and the hottest functions.
"""

from __future__ import annotations

import re
import shutil
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

#: Leaf frames that mean the thread is blocked, not working.
_WAIT = re.compile(
    r"^(Condition\.wait|Event\.wait|Queue\.get|Queue\.put|Thread\.join|"
    r"Thread\._wait_for_tstate_lock|_wait_for_tstate_lock|select|poll|sleep|"
    r"Semaphore\.acquire|Lock\.acquire|wait) "
)

#: Stage of a sample: the first rule whose pattern is in the stack (innermost rules first).
STAGES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("start-up (imports)", re.compile(r"_find_and_load|_call_with_frames_removed")),
    ("model load", re.compile(r"load_runtime|_create_inference_session|OnnxRuntime\.__init__")),
    ("inference (onnxruntime)", re.compile(r"Session\.run|\.predict \(|runtime\.py")),
    ("decide (softmax, top-k)", re.compile(r"\bdecide \([^)]*policies\.py")),
    ("decode + preprocess", re.compile(r"imaging/")),
    ("read files", re.compile(r"sources/.*\((read|_read)|LocalSource\.read")),
    ("list + register items", re.compile(r"sources/|add_items|Runner\.start|\bstart \(")),
    ("store writes", re.compile(r"store/|sqlalchemy|StoreSink")),
    ("results file", re.compile(r"outputs/")),
    ("result records", re.compile(r"types\.py|Pipeline\._result")),
)


@dataclass
class Headline:
    samples: int = 0
    rate: int = 100
    by_thread: dict[str, Counter[str]] = field(default_factory=dict)
    leaves: Counter[str] = field(default_factory=Counter)

    def lines(self, top: int = 8) -> list[str]:
        busy = Counter[str]()
        for c in self.by_thread.values():
            for stage, n in c.items():
                if stage != "waiting":
                    busy[stage] += n
        total_busy = sum(busy.values()) or 1
        out = [
            f"py-spy, {self.rate} samples/s per thread; {self.samples:,} samples, "
            f"{total_busy:,} of them busy (not blocked on a queue or lock).",
            "",
            "| where busy samples went | share | thread-seconds |",
            "|---|---:|---:|",
        ]
        for stage, n in busy.most_common():
            out.append(f"| {stage} | {n / total_busy:.0%} | {n / self.rate:.2f} |")
        out += ["", "| thread | busy s | blocked s | top stages |", "|---|---:|---:|---|"]
        for thread, c in sorted(self.by_thread.items(), key=lambda kv: -sum(kv[1].values())):
            waiting = c.get("waiting", 0)
            work = sum(c.values()) - waiting
            tops = ", ".join(
                f"{s} {n / max(work, 1):.0%}"
                for s, n in Counter({k: v for k, v in c.items() if k != "waiting"}).most_common(3)
            )
            out.append(
                f"| {thread} | {work / self.rate:.2f} | {waiting / self.rate:.2f} | {tops} |"
            )
        out += ["", "| hottest functions (self, busy samples) | share |", "|---|---:|"]
        for leaf, n in self.leaves.most_common(top):
            out.append(f"| `{leaf}` | {n / total_busy:.0%} |")
        return out


_HEAD = re.compile(r"^(thread|process) \(?(\w+)\)?(?::\s*(.*))?$")


def _thread_names(lines: list[str]) -> dict[str, str]:
    """Thread id -> name; py-spy names a thread only once Python's threading knows it."""
    names: dict[str, str] = {}
    for line in lines:
        head = line.split(";", 1)[0] if ";" in line else line.rpartition(" ")[0]
        m = _HEAD.match(head)
        if m and m.group(3):
            names[m.group(2)] = re.sub(r"-\d+$", "-N", m.group(3).strip())
    return names


def summarise(raw: str, rate: int = 100) -> Headline:
    """Summarise py-spy's raw output (`frame;frame;... count` per line)."""
    h = Headline(rate=rate)
    by_thread: dict[str, Counter[str]] = defaultdict(Counter)
    lines = raw.splitlines()
    names = _thread_names(lines)
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = "main"
        if (m := _HEAD.match(frames[0])) is not None:
            thread = names.get(m.group(2), f"thread {m.group(2)}")
            frames = frames[1:]
        h.samples += n
        leaf = frames[-1] if frames else "(no Python frame)"
        if _WAIT.match(leaf):
            by_thread[thread]["waiting"] += n
            continue
        stage = "other"
        text = ";".join(frames)
        for name, pattern in STAGES:
            if pattern.search(text):
                stage = name
                break
        by_thread[thread][stage] += n
        h.leaves[re.sub(r" \((.*/)?([^/]+):\d+\)$", r" (\2)", leaf)] += n
    h.by_thread = dict(by_thread)
    return h


def py_spy() -> str | None:
    """The py-spy command next to this interpreter, or on PATH."""
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")
