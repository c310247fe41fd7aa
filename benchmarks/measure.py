"""Time a command as a whole process and record its peak memory.

Wall time runs from just before the process is started to just after it is reaped, so
interpreter start-up, imports and model loading count, as a user feels them. Memory is
sampled every `poll_s` from /proc, two ways: the process's own high-water mark (VmHWM,
exact up to the last sample) and the sum of the RSS of the process and all its
descendants (what a multi-process runner such as Ray or the HTTP design holds at once;
shared pages are counted once per process that maps them).

wait4's `ru_maxrss` is not used: a child forked from a large parent starts with the
parent's RSS as its maximum, so it reports the orchestrator's size, not the runner's.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import signal
import struct
import subprocess
import tempfile
import termios
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MB = 1024 * 1024


@dataclass
class Measurement:
    cmd: list[str]
    rc: int
    wall_s: float
    #: Peak of the summed RSS of the process tree (sampled).
    tree_peak_rss_mb: float
    #: VmHWM of the process itself (its own peak; sampled, so the last poll_s may be missed).
    hwm_mb: float
    cpu_s: float
    timed_out: bool = False
    report: dict[str, Any] | None = None
    stdout: str = ""
    stderr_tail: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: Cores other processes kept busy during the run, on average (benchmarks.quiet).
    others_cores: float | None = None
    #: CPUs the process tree was pinned to; empty when it could use all of them.
    pinned: list[int] = field(default_factory=list)

    @property
    def peak_rss_mb(self) -> float:
        return max(self.tree_peak_rss_mb, self.hwm_mb)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["peak_rss_mb"] = self.peak_rss_mb
        d["stdout"] = self.stdout[-2000:]
        return d


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _descendants(pid: int) -> list[int]:
    """The pid and every process below it, from /proc (Linux); just the pid elsewhere."""
    return _scan(pid)[0]


def _scan(pid: int) -> tuple[list[int], dict[int, float]]:
    """The pid's process tree, and the CPU seconds used so far by every process (Linux)."""
    parent: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return [pid], cpu
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
            # The command name may hold spaces and parentheses: the fields follow the last ')'.
            fields = stat[stat.rindex(b")") + 2 :].split()
            ppid = int(fields[1])
            cpu[int(name)] = cpu_of(fields)
        except (OSError, ValueError, IndexError):
            continue
        parent.setdefault(ppid, []).append(int(name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parent.get(p, ()))
    return out, cpu


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds used so far by the pid and every live process below it."""
    pids, cpu = _scan(pid)
    return sum(cpu.get(p, 0.0) for p in pids)


def _hwm(pid: int) -> int:
    """VmHWM: the process's own peak RSS since its exec (Linux)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def stat_fields(path: str) -> list[bytes]:
    """A /proc/.../stat file's fields after the command name (state first); [] when gone."""
    try:
        with open(path, "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return []


def cpu_of(fields: list[bytes]) -> float:
    """User + system CPU seconds in stat fields (0 for a process that is gone)."""
    return (int(fields[11]) + int(fields[12])) / TICKS if fields else 0.0


def own_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads) so far, children not
    included (Linux)."""
    return cpu_of(stat_fields(f"/proc/{pid}/stat"))


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


class _TreeSampler(threading.Thread):
    def __init__(self, pid: int, poll_s: float) -> None:
        super().__init__(daemon=True, name="bench-rss")
        self.pid = pid
        self.poll_s = poll_s
        self.peak = 0
        self.hwm = 0
        self.cpu: dict[int, float] = {}
        #: CPU seconds of processes outside the tree: when first seen, and lately.
        self.others_first: dict[int, float] = {}
        self.others_last: dict[int, float] = {}
        self.ever_tree: set[int] = set()
        self.done = threading.Event()

    @property
    def others_s(self) -> float:
        """CPU seconds other processes used while the run ran (those that lived to a scan)."""
        return sum(c - self.others_first.get(p, 0.0) for p, c in self.others_last.items())

    def _others(self, tree: list[int], cpu: dict[int, float], first: bool) -> None:
        # A process that left the tree (a daemon reparented to init) stays the run's own.
        self.ever_tree.update(tree)
        me = os.getpid()
        for p, c in cpu.items():
            if p in self.ever_tree or p == me:
                continue
            if first:
                self.others_first[p] = c
            # Unseen at the first scan: started during the run, so all its CPU counts.
            self.others_last[p] = c

    def run(self) -> None:
        procs = [self.pid]
        refreshed = 0.0
        first = True
        while not self.done.is_set():
            now = time.monotonic()
            # Listing descendants walks /proc: do it less often than reading the RSS.
            if now - refreshed > max(0.25, self.poll_s * 3):
                procs, cpu = _scan(self.pid)
                self._others(procs, cpu, first)
                first = False
                refreshed = now
            self.peak = max(self.peak, sum(_rss(p) for p in procs))
            self.hwm = max(self.hwm, _hwm(self.pid))
            for p in procs:
                self.cpu[p] = max(self.cpu.get(p, 0.0), own_cpu_s(p))
            self.done.wait(self.poll_s)


def run_measured(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout_s: float = 900.0,
    poll_s: float = 0.1,
    log_path: Path | None = None,
    report_path: Path | None = None,
    pin: Sequence[int] = (),
    tty: bool = False,
) -> Measurement:
    """Run cmd to the end; stdout is kept, stderr goes to log_path (its tail is kept).

    With `pin`, the process and everything it starts run on those CPUs only. With `tty`,
    stdout and stderr are one pseudo-terminal (TTY_COLUMNS × TTY_ROWS), as in a person's
    terminal: what the process writes there is kept as stdout, and in log_path.
    """
    if tty:
        return _run_on_tty(
            cmd, env=env, cwd=cwd, timeout_s=timeout_s, poll_s=poll_s, log_path=log_path, pin=pin
        )
    full_env = dict(os.environ if env is None else env)
    if report_path is not None:
        report_path.unlink(missing_ok=True)
        full_env["BENCH_REPORT"] = str(report_path)
    log_path = log_path or Path(os.devnull)
    cpus = set(pin)
    with open(log_path, "wb") as err, tempfile.TemporaryFile() as out:
        started = time.perf_counter()
        proc = _start(cmd, out, err, full_env, cwd, cpus)
        ended = _watched(proc, started, poll_s, timeout_s)
        out.seek(0)
        stdout = out.read().decode("utf-8", "replace")
    stderr_tail = ""
    if log_path != Path(os.devnull):
        stderr_tail = log_path.read_text("utf-8", "replace")[-3000:]
    report = None
    if report_path is not None and report_path.exists():
        report = json.loads(report_path.read_text())
    return ended.measurement(cmd, cpus, stdout=stdout, stderr_tail=stderr_tail, report=report)


@dataclass
class _Ended:
    """A measured process that has ended: its wall time, rusage and tree samples."""

    rc: int
    wall_s: float
    usage: Any
    sampler: _TreeSampler
    timed_out: bool

    def measurement(
        self,
        cmd: Sequence[str],
        cpus: set[int],
        *,
        stdout: str,
        stderr_tail: str,
        report: dict[str, Any] | None = None,
    ) -> Measurement:
        s, wall = self.sampler, self.wall_s
        return Measurement(
            cmd=list(cmd),
            rc=self.rc,
            wall_s=wall,
            tree_peak_rss_mb=s.peak / MB,
            hwm_mb=s.hwm / MB,
            # Reaped children's CPU time misses processes nobody waited for (Ray's
            # workers): the tree's sampled CPU time covers those, up to the last sample.
            cpu_s=max(self.usage.ru_utime + self.usage.ru_stime, sum(s.cpu.values())),
            timed_out=self.timed_out,
            report=report,
            stdout=stdout,
            stderr_tail=stderr_tail,
            others_cores=round(s.others_s / wall, 3) if wall > 0 else None,
            pinned=sorted(cpus),
        )


def _start(
    cmd: Sequence[str],
    stdout: Any,
    stderr: Any,
    env: dict[str, str],
    cwd: str | Path | None,
    cpus: set[int],
) -> subprocess.Popen[bytes]:
    """cmd started in a process group of its own (a timeout ends all of it), on `cpus` when
    given, with no stdin."""

    def pinned() -> None:
        os.sched_setaffinity(0, cpus)

    return subprocess.Popen(
        list(cmd),
        stdout=stdout,
        stderr=stderr,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=cwd,
        start_new_session=True,
        preexec_fn=pinned if cpus else None,
    )


def _watched(
    proc: subprocess.Popen[bytes], started: float, poll_s: float, timeout_s: float
) -> _Ended:
    """Sample proc's process tree until it ends (its process group killed after timeout_s),
    reap it, and kill what it left behind (a server the runner failed to stop)."""
    sampler = _TreeSampler(proc.pid, poll_s)
    sampler.start()
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        _kill_group(proc.pid)

    timer = threading.Timer(timeout_s, expire)
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    sampler.done.set()
    sampler.join()
    _kill_group(proc.pid)
    return _Ended(proc.returncode, wall, usage, sampler, expired.is_set())


#: The size of the pseudo-terminal of a `tty` run: a common terminal window's.
TTY_COLUMNS, TTY_ROWS = 120, 40


def _run_on_tty(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None,
    cwd: str | Path | None,
    timeout_s: float,
    poll_s: float,
    log_path: Path | None,
    pin: Sequence[int],
) -> Measurement:
    """`run_measured` with stdout and stderr on a pseudo-terminal, read as it is written."""
    full_env = dict(os.environ if env is None else env)
    # A terminal says what it is: without TERM, Rich and others take it for a dumb one.
    full_env.setdefault("TERM", "xterm-256color")
    full_env.pop("COLUMNS", None)
    full_env.pop("LINES", None)
    cpus = set(pin)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", TTY_ROWS, TTY_COLUMNS, 0, 0))
    chunks: list[bytes] = []

    def drain() -> None:
        # Read as the process writes, so that it never blocks on a full terminal buffer;
        # EIO once every writer has closed the terminal.
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True, name="bench-tty")
    try:
        started = time.perf_counter()
        proc = _start(cmd, slave, slave, full_env, cwd, cpus)
        os.close(slave)
        slave = -1
        reader.start()
        ended = _watched(proc, started, poll_s, timeout_s)
        reader.join(timeout=10)
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    transcript = b"".join(chunks)
    if log_path is not None:
        log_path.write_bytes(transcript)
    text = transcript.decode("utf-8", "replace")
    return ended.measurement(cmd, cpus, stdout=text, stderr_tail=text[-3000:])


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
