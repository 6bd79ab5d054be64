"""What every benchmark script shares: a process-tree memory sampler, timers, machine facts, JSON.

A benchmark here runs the code under test in a child process and watches that child's whole
process tree (spark-submit's launcher, the driver JVM, the driver Python, the Python workers),
so its peak memory is what the machine had to hold, not what one process saw.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import psutil

GIB = 2**30

# `[stage] rows_in=… rows_out=… rejected=… seconds=… {json}`: StageSummary.line(), as jobs log it.
SUMMARY_LINE = re.compile(
    r"\[(?P<stage>[\w-]+)\] rows_in=(?P<rows_in>\d+) rows_out=(?P<rows_out>\d+) "
    r"rejected=(?P<rejected>\d+) seconds=(?P<seconds>[\d.]+)(?: (?P<details>\{.*\}))?\s*$"
)


@dataclass(frozen=True)
class ProcessMemory:
    """One process of a tree at one moment: its parent, its executable's name, its RSS."""

    pid: int
    ppid: int
    exe: str
    rss: int


def process_kind(exe: str) -> str:
    name = os.path.basename(exe).lower()
    return "jvm" if name == "java" else "python" if name.startswith("python") else "other"


def sum_tree(processes: Sequence[ProcessMemory]) -> dict[str, int]:
    """Total RSS of a process tree and its JVM/Python split, each address space counted once.

    A JVM starts a process (the Python worker daemon) with posix_spawn: for a moment the child
    shares the JVM's address space and reports the JVM's whole RSS before it execs. Such a child
    (a ``java`` executable whose parent is a JVM of the tree) is skipped: counting it would
    double the JVM. Local mode never starts a real JVM under the driver JVM.
    """
    totals = {"total": 0, "jvm": 0, "python": 0, "other": 0, "processes": 0}
    jvms = {p.pid for p in processes if process_kind(p.exe) == "jvm"}
    for proc in processes:
        kind = process_kind(proc.exe)
        if kind == "jvm" and proc.ppid in jvms:
            continue
        totals[kind] += proc.rss
        totals["total"] += proc.rss
        totals["processes"] += 1
    return totals


def tree_memory(root: psutil.Process) -> dict[str, int]:
    """Resident bytes of ``root`` and every descendant, summed, and split into JVM and Python."""
    try:
        # A fresh handle: psutil caches exe() per object, and the root may have exec'd since
        # (spark-submit is a shell script that execs the JVM under the same pid).
        root = psutil.Process(root.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:  # the root has exited: nothing is held any more
        procs = []
    seen = []
    for proc in procs:
        # A worker may exit between listing and reading: it simply holds nothing any more.
        gone = (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess)
        with contextlib.suppress(*gone), proc.oneshot():
            seen.append(ProcessMemory(proc.pid, proc.ppid(), proc.exe(), proc.memory_info().rss))
    return sum_tree(seen)


SamplerT = TypeVar("SamplerT", bound="Sampler")


class Sampler:
    """Calls ``sample()`` every ``interval`` seconds in a daemon thread while used as a context."""

    def __init__(self, interval: float, name: str) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self: SamplerT) -> SamplerT:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class PeakMemory(Sampler):
    """Sample a process tree's resident memory in a thread; ``peak`` is the largest sum seen.

    RSS summed over processes counts pages that forked Python workers share with their parent
    once per process, so it is an upper bound of what the tree needs; ``peak_split`` is the
    JVM/Python split at the moment of the peak.
    """

    def __init__(self, pid: int, interval: float = 0.25) -> None:
        super().__init__(interval, "peak-memory")
        self.root = psutil.Process(pid)
        self.peak = 0
        self.peak_split: dict[str, int] = {}
        self.max_processes = 0
        self.samples = 0
        self._cpu: dict[tuple[int, float], float] = {}  # (pid, start time) -> last CPU seconds

    def sample(self) -> None:
        """Take one sample now (also called by the thread)."""
        totals = tree_memory(self.root)
        self.samples += 1
        self.max_processes = max(self.max_processes, totals["processes"])
        if totals["total"] > self.peak:
            self.peak = totals["total"]
            self.peak_split = totals
        with contextlib.suppress(psutil.Error):
            for proc in [self.root, *self.root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    times = proc.cpu_times()
                    self._cpu[(proc.pid, proc.create_time())] = times.user + times.system

    def cpu_seconds(self) -> float:
        """CPU seconds of every process seen in the tree, as last sampled. Unlike the kernel's
        count of reaped children this includes Python workers that are never waited for (the
        PySpark daemon's children when the JVM stops), which that count missed."""
        return sum(self._cpu.values())


class Timer:
    """``with Timer() as t: …``; ``t.seconds`` is the wall time (perf_counter) of the block."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start = 0.0

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by linear interpolation, as ``numpy.percentile``."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class Measured:
    """One child process run: exit code, wall seconds, peak memory of its tree, its output."""

    command: list[str]
    returncode: int
    seconds: float
    peak_rss_bytes: int
    peak_split: dict[str, int] = field(default_factory=dict)
    cpu_seconds: float = 0.0
    max_processes: int = 0
    timed_out: bool = False
    log_path: str | None = None
    load_before: float = 0.0
    load_after: float = 0.0
    stdout: str = field(default="", repr=False)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("stdout")
        return data


def _kill_tree(proc: subprocess.Popen[str]) -> None:
    """End the child and everything it started (it leads its own process group)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_measured(
    command: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    log_path: Path | None = None,
    timeout: float | None = None,
    interval: float = 0.25,
    echo: bool = False,
) -> Measured:
    """Run ``command`` to completion, timing it and sampling its process tree's memory.

    stdout and stderr are merged and kept (and written to ``log_path``); with ``echo`` each line
    is also printed as it arrives. The child gets its own process group, so a timeout or Ctrl-C
    ends the JVM and its workers too, never anything else.
    """
    load_before = os.getloadavg()[0]
    # CPU of every descendant that was waited for (JVM, driver): the kernel adds a reaped child's
    # time, and what it had of its own reaped children, to its parent's RUSAGE_CHILDREN. Python
    # workers are often never waited for, so the sampler's per-process count is used when larger.
    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines: list[str] = []
    log = log_path.open("w", buffering=1) if log_path else None  # line-buffered: tail -f works
    clock = time.perf_counter()
    proc = subprocess.Popen(
        list(command),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        start_new_session=True,
    )
    timed_out = threading.Event()
    timer = (
        threading.Timer(timeout, lambda: (timed_out.set(), _kill_tree(proc))) if timeout else None
    )
    try:
        with PeakMemory(proc.pid, interval) as memory:
            if timer:
                timer.start()
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                if log:
                    log.write(line)
                if echo:
                    print(f"    | {line}", end="", flush=True)
            proc.wait()
    except BaseException:
        _kill_tree(proc)
        raise
    finally:
        if timer:
            timer.cancel()
        if log:
            log.close()
    seconds = time.perf_counter() - clock
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    reaped = (usage.ru_utime + usage.ru_stime) - (usage_before.ru_utime + usage_before.ru_stime)
    cpu = max(reaped, memory.cpu_seconds())
    return Measured(
        command=list(command),
        returncode=proc.returncode,
        seconds=seconds,
        cpu_seconds=cpu,
        peak_rss_bytes=memory.peak,
        peak_split=memory.peak_split,
        max_processes=memory.max_processes,
        timed_out=timed_out.is_set(),
        log_path=str(log_path) if log_path else None,
        load_before=load_before,
        load_after=os.getloadavg()[0],
        stdout="".join(lines),
    )


def parse_summaries(output: str) -> dict[str, dict[str, Any]]:
    """The StageSummary lines in a job's output, by stage name (the last line of each wins)."""
    found: dict[str, dict[str, Any]] = {}
    for line in output.splitlines():
        match = SUMMARY_LINE.search(line)
        if not match:
            continue
        details = match["details"]
        found[match["stage"]] = {
            "rows_in": int(match["rows_in"]),
            "rows_out": int(match["rows_out"]),
            "rows_rejected": int(match["rejected"]),
            "seconds": float(match["seconds"]),
            "details": json.loads(details) if details else {},
        }
    return found


def java_version() -> str:
    """``java -version``'s first line, or why there is none."""
    java = shutil.which("java", path=os.environ.get("JAVA_HOME", "") + "/bin:" + os.environ["PATH"])
    if not java:
        return "not found"
    out = subprocess.run([java, "-version"], capture_output=True, text=True, check=False)
    return (out.stderr or out.stdout).splitlines()[0].strip() if (out.stderr or out.stdout) else "?"


def machine_info() -> dict[str, Any]:
    """The facts a reader needs to compare figures: cores, memory, load, versions."""
    import pyspark

    freq = psutil.cpu_freq()
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "host": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "cpu": cpu_model or platform.processor(),
        "cpu_mhz": round(freq.max or freq.current) if freq else None,
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gib": round(psutil.virtual_memory().total / GIB, 1),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "pyspark": pyspark.__version__,
        "java": java_version(),
    }


def cpu_probe(repeats: int = 3) -> float:
    """Seconds for a fixed single-threaded numpy workload (best of ``repeats``), before and after
    a benchmark: on a shared host the same code ran 1.5 to 2 times slower for minutes at a time,
    and figures taken then say so. docs/benchmarks.md gives its value on a normal day."""
    import numpy as np

    values = np.random.default_rng(0).random(16_000_000)
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        np.sort(values)
        np.partition(values.reshape(-1, 40), 20, axis=1)
        best = min(best, time.process_time() - started)
    return round(best, 3)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def timestamp() -> str:
    """A file-name-safe UTC timestamp, e.g. ``20261126T121500Z``."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON, atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def gib(n_bytes: float) -> float:
    return n_bytes / GIB
