"""Benchmark the train stage on an existing features table, for several training-row fractions.

    .venv/bin/python benchmarks/train.py --data-dir data --fractions 0.05,0.1,1.0

Each fraction runs in a fresh Python + JVM (so memory peaks do not carry over) exactly as the job
runs it (``stockvol.train.run``: split, sample, fit, evaluate on the whole test set, plot, export),
writing its model to a scratch directory, never to DIR/model. Prints, per run: the stage's wall
seconds and phases, rows/s, the peak resident memory of the whole process tree (this Python, the
driver JVM and its Python workers, sampled by common.PeakMemory), its CPU seconds, and test R²
against the baseline.
A script, not a test: figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common`, beside this file
from common import PeakMemory, Sampler  # noqa: E402

from stockvol.config import DEFAULT_CONFIG, load_config  # noqa: E402

SPARK_KEYS = (
    "spark.master",
    "spark.driver.memory",
    "spark.sql.shuffle.partitions",
    "spark.default.parallelism",
    "spark.serializer",
    "spark.sql.files.maxPartitionBytes",
)


def tree_cpu_seconds(root: psutil.Process) -> float:
    """CPU seconds (user + system, reaped children included) of ``root`` and its descendants."""
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


class CpuTimeline(Sampler):
    """Samples the process tree's CPU seconds twice a second, to split them between phases."""

    def __init__(self, root: psutil.Process, interval: float = 0.5) -> None:
        super().__init__(interval, "cpu-timeline")
        self.root = root
        self.samples: list[tuple[float, float]] = []

    def sample(self) -> None:
        self.samples.append((time.perf_counter(), tree_cpu_seconds(self.root)))

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.sample()  # the last moment, so every phase lies between two samples

    def at(self, moment: float) -> float:
        """CPU seconds used up to ``moment`` (perf_counter), interpolated between samples."""
        times = [t for t, _ in self.samples]
        cpus = [c for _, c in self.samples]
        return float(np.interp(moment, times, cpus))

    def per_phase(self, start: float, durations: dict[str, float], end: float) -> dict[str, float]:
        """CPU seconds of each phase; the phases ran one after another from ``start``, in order."""
        result, clock = {}, start
        for name, seconds in durations.items():
            if name == "total":
                continue
            result[name] = self.at(clock + seconds) - self.at(clock)
            clock += seconds
        result["export"] = self.at(end) - self.at(start + durations["total"])
        return {k: round(v, 1) for k, v in result.items()}


def worker(args: argparse.Namespace) -> None:
    """One measured run in this process; prints a JSON line for the parent."""
    from stockvol.spark import build_session
    from stockvol.train import run

    source = load_config(args.config, data_dir=args.data_dir, storage_format=args.format)
    scratch = Path(tempfile.mkdtemp(prefix="bench-train-"))
    # The lake is linked, the model goes to scratch: DIR/model is never touched.
    (scratch / "lake").symlink_to(source.lake_dir.resolve())
    config = load_config(
        args.config,
        data_dir=scratch,
        storage_format=args.format,
        master=args.master,
        train_sample_fraction=args.fraction,
        num_trees=args.num_trees,
        max_depth=args.max_depth,
        max_bins=args.max_bins,
        split=args.split,
    )
    # The fraction alone decides unless --max-rows is given: a configured cap must not shrink the
    # "fraction 1" run that every other run is compared with.
    config = replace(config, model=replace(config.model, train_max_rows=args.max_rows))
    extra = {"spark.driver.memory": args.driver_memory} if args.driver_memory else {}
    clock = time.perf_counter()
    spark = build_session(config, "stockvol-bench-train", extra_conf=extra)
    startup = time.perf_counter() - clock
    try:
        with CpuTimeline(psutil.Process()) as timeline:
            clock = time.perf_counter()
            run(spark, config)
            end = time.perf_counter()
        seconds = end - clock
        cpu = timeline.at(end) - timeline.at(clock)
        conf = dict(spark.sparkContext.getConf().getAll())
    finally:
        spark.stop()
    metrics = json.loads(config.metrics_path.read_text())
    shutil.rmtree(scratch, ignore_errors=True)
    print(
        "RESULT "
        + json.dumps(
            {
                "fraction": args.fraction,
                "max_rows": args.max_rows,
                "seconds": seconds,
                # On a busy machine wall time mostly measures the others; CPU time does not.
                "cpu_seconds": cpu,
                "jvm_start_seconds": startup,
                "durations": metrics["durations_seconds"],
                "cpu_per_phase": timeline.per_phase(clock, metrics["durations_seconds"], end),
                "rows": metrics["rows"],
                "r2": metrics["test"]["r2"],
                "rmse": metrics["test"]["rmse"],
                "baseline_r2": metrics["baseline"]["r2"],
                "params": metrics["params"],
                "spark": {k: conf.get(k) for k in SPARK_KEYS},
                "cores": os.cpu_count(),
            }
        ),
        flush=True,
    )


def measure(args: argparse.Namespace, fraction: float, max_rows: int | None) -> dict[str, Any]:
    """Run one worker process and watch its process tree's memory."""
    command = [sys.executable, __file__, "--worker", "--fraction", str(fraction)]
    if max_rows:
        command += ["--max-rows", str(max_rows)]
    for flag in ("config", "data_dir", "format", "master", "driver_memory", "split"):
        value = getattr(args, flag)
        if value is not None:
            command += [f"--{flag.replace('_', '-')}", str(value)]
    for flag in ("num_trees", "max_depth", "max_bins"):
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    with PeakMemory(proc.pid) as memory:
        out, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"worker for fraction {fraction} failed with exit code {proc.returncode}")
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    result["peak_rss_bytes"] = memory.peak
    return result


def print_table(results: list[dict[str, Any]]) -> None:
    head = (
        f"{'fraction':>8} {'fitted rows':>12} {'stage s':>8} {'CPU s':>7} {'fit s':>7} "
        f"{'eval s':>7} {'rows/s':>10} {'fit rows/s':>10} {'peak GB':>8} "
        f"{'test R2':>8} {'base R2':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        d, rows = r["durations"], r["rows"]
        print(
            f"{r['fraction']:>8g} {rows['train_fitted']:>12,} {r['seconds']:>8.1f} "
            f"{r.get('cpu_seconds', float('nan')):>7.1f} "
            f"{d['fit']:>7.1f} {d['evaluate']:>7.1f} {rows['input'] / r['seconds']:>10,.0f} "
            f"{rows['train_fitted'] / d['fit']:>10,.0f} {r['peak_rss_bytes'] / 2**30:>8.2f} "
            f"{r['r2']:>8.4f} {r['baseline_r2']:>8.4f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--data-dir", required=True, help="DIR holding lake/features")
    parser.add_argument("--format", choices=("delta", "parquet"))
    parser.add_argument("--master", help="default: the config's (local[*])")
    parser.add_argument("--driver-memory", help="e.g. 8g (default: spark-defaults.conf)")
    parser.add_argument("--fractions", default="0.05,0.1", help="comma-separated, e.g. 0.05,0.1,1")
    parser.add_argument("--max-rows", type=int, help="also cap fitted rows (train_max_rows)")
    parser.add_argument("--split", choices=("time", "random"))
    parser.add_argument("--num-trees", type=int, default=100)
    parser.add_argument("--max-depth", type=int, default=5)
    parser.add_argument("--max-bins", type=int, default=32)
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fraction", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return

    fractions = [float(f) for f in args.fractions.split(",")]
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load = os.getloadavg()
    results = []
    for fraction in fractions:
        result = measure(args, fraction, args.max_rows)
        results.append(result)
        phases = ", ".join(f"{k} {v:.1f}" for k, v in result["durations"].items())
        cpu = ", ".join(f"{k} {v:.0f}" for k, v in result["cpu_per_phase"].items())
        print(
            f"fraction {fraction:g}: {result['seconds']:.1f} s ({phases}; JVM start "
            f"{result['jvm_start_seconds']:.1f}); CPU s: {cpu}; R² {result['r2']:.4f}",
            flush=True,
        )
    first = results[0]
    print(
        f"\ntrain benchmark, started {started}, {first['cores']} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, load average at start "
        f"{load[0]:.1f}; features table: {args.data_dir}; {first['rows']['input']:,} rows, "
        f"{first['rows']['train']:,} train / {first['rows']['test']:,} test"
    )
    model = {k: first["params"][k] for k in ("num_trees", "max_depth", "max_bins")}
    print(f"model: {json.dumps(model)}")
    print(f"spark: {json.dumps(first['spark'])}\n")
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
