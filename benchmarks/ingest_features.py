"""Ingest + features, timed: wall seconds, rows/s, CPU seconds and peak memory of every process.

    .venv/bin/python benchmarks/ingest_features.py --data-dir data/bench/8049sym-x1-seed42
    .venv/bin/python benchmarks/ingest_features.py --data-dir D --medians approx,exact
    .venv/bin/python benchmarks/ingest_features.py --data-dir D --engine pandas   # the reference
    .venv/bin/python benchmarks/ingest_features.py --data-dir D --skip-ingest     # features alone

``--engine spark`` (default) runs ``stockvol.ingest.run`` then ``stockvol.features.run`` (once per
median mode) in one SparkSession, built as the jobs build it (spark-defaults.conf, pipeline.yaml);
``--engine pandas`` runs the pandas + joblib reference on the same CSVs (``benchmarks/baselines``).
A thread samples the whole process tree (this Python, the driver JVM, the Python workers or joblib's
processes): peak resident memory (summed RSS, an upper bound) and CPU seconds, which say more than
wall time when other work shares the machine. Prints the figures, the Spark settings used and the
load average; ``--json`` also writes them. A script, not a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.append(str(BENCH_DIR))  # `common` and `baselines` beside this file

from common import PeakMemory, cpu_probe, machine_info, now_iso, write_json  # noqa: E402

from stockvol.config import DEFAULT_CONFIG, load_config  # noqa: E402

GB = 10**9
# The settings that decide this workload's speed and memory, printed with the figures.
SHOWN_CONF = (
    "spark.master",
    "spark.driver.memory",
    "spark.default.parallelism",
    "spark.sql.shuffle.partitions",
    "spark.sql.files.maxPartitionBytes",
    "spark.sql.execution.arrow.maxRecordsPerBatch",
    "spark.sql.adaptive.enabled",
    "spark.serializer",
    "spark.sql.parquet.compression.codec",
    "spark.python.worker.reuse",
)


class TreeMonitor(PeakMemory):
    """``PeakMemory`` of this process tree (this Python, the driver JVM, the Python workers or
    joblib's processes), whose CPU seconds are sampled afresh when asked for."""

    def __init__(self, interval: float = 0.2) -> None:
        super().__init__(os.getpid(), interval)

    def cpu_seconds(self) -> float:
        self.sample()
        return super().cpu_seconds()


def measure(monitor: TreeMonitor, name: str, fn: Any) -> dict[str, Any]:
    """Run ``fn()`` (returning a row count or a StageSummary); its wall and CPU seconds."""
    cpu = monitor.cpu_seconds()
    load = os.getloadavg()[0]
    run_peak, run_split = monitor.peak, monitor.peak_split
    monitor.peak = 0  # this step's own peak, then the run's again
    started = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - started
    monitor.sample()
    step_peak, step_split = monitor.peak, monitor.peak_split
    if run_peak > step_peak:
        monitor.peak, monitor.peak_split = run_peak, run_split
    rows = result if isinstance(result, int) else result.rows_out
    record = {
        "step": name,
        "wall_seconds": round(seconds, 2),
        "cpu_seconds": round(monitor.cpu_seconds() - cpu, 2),
        "rows": rows,
        "rows_per_second": round(rows / seconds) if seconds else None,
        "load_before": round(load, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "peak_memory_gb": round(step_peak / GB, 2),
        "peak_memory_split_gb": {k: round(v / GB, 2) for k, v in step_split.items()},
    }
    if not isinstance(result, int):
        record["summary"] = result.line()
    print(
        f"  {name:<22} {seconds:8.1f} s wall {record['cpu_seconds']:8.1f} s CPU "
        f"{rows:>12,} rows {record['rows_per_second'] or 0:>12,} rows/s "
        f"peak {record['peak_memory_gb']:.2f} GB",
        flush=True,
    )
    return record


def run_spark(args: argparse.Namespace, monitor: TreeMonitor) -> dict[str, Any]:
    from stockvol import features
    from stockvol.spark import build_session

    config = load_config(
        args.config, data_dir=args.data_dir, master=args.master, storage_format=args.format
    )
    steps = []
    started = time.perf_counter()
    spark = build_session(config, "stockvol-bench-ingest-features")
    spark.range(1).count()  # the JVM and its first job, so stage figures exclude start-up
    session_seconds = time.perf_counter() - started
    conf = dict(spark.sparkContext.getConf().getAll())
    shown = {key: conf.get(key, spark.conf.get(key, None)) for key in SHOWN_CONF}
    shown["spark.default.parallelism"] = str(spark.sparkContext.defaultParallelism)
    try:
        if not args.skip_ingest:
            from stockvol import ingest

            steps.append(measure(monitor, "ingest", lambda: ingest.run(spark, config)))
        for median in args.medians.split(","):
            mode_config = load_config(
                args.config,
                data_dir=args.data_dir,
                master=args.master,
                storage_format=args.format,
                median=median,
            )
            steps.append(
                measure(
                    monitor, f"features ({median})", lambda c=mode_config: features.run(spark, c)
                )
            )
    finally:
        spark.stop()
    return {"session_start_seconds": round(session_seconds, 2), "spark_conf": shown, "steps": steps}


def run_pandas(args: argparse.Namespace, monitor: TreeMonitor) -> dict[str, Any]:
    from baselines import pandas_joblib

    config = load_config(args.config, data_dir=args.data_dir)
    out = Path(config.data_dir) / "reference"  # the pandas reference runs on local disk only
    step = measure(
        monitor,
        "pandas + joblib",
        lambda: pandas_joblib.run(Path(config.raw_dir), out, config.window, args.jobs),
    )
    return {"steps": [step], "output": str(out)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="holds raw/ (and lake/ is written)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--engine", choices=("spark", "pandas"), default="spark")
    parser.add_argument("--medians", default="approx", help="features runs: approx,exact")
    parser.add_argument("--master", help="default: the config's (local[*])")
    parser.add_argument("--format", choices=("delta", "parquet"))
    parser.add_argument("--skip-ingest", action="store_true", help="features on the last prices")
    parser.add_argument("--jobs", type=int, default=-1, help="joblib processes (pandas engine)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    result: dict[str, Any] = {
        "started": now_iso(),
        "engine": args.engine,
        "machine": machine_info(),
        "cpu_probe_before_seconds": cpu_probe(),
    }
    print(
        f"{args.engine} ingest + features on {args.data_dir} at {result['started']} "
        f"(CPU probe {result['cpu_probe_before_seconds']:.3f} s)",
        flush=True,
    )
    with TreeMonitor() as monitor:
        started = time.perf_counter()
        cpu = monitor.cpu_seconds()
        run = run_spark if args.engine == "spark" else run_pandas
        result.update(run(args, monitor))
        total = time.perf_counter() - started
        total_cpu = monitor.cpu_seconds() - cpu
    rows = result["steps"][0]["rows"] if result["steps"] else 0
    stage_seconds = sum(step["wall_seconds"] for step in result["steps"][:2])
    result.update(
        {
            "wall_seconds": round(total, 2),
            "cpu_seconds": round(total_cpu, 2),
            "stages_wall_seconds": round(stage_seconds, 2),
            "peak_rss_bytes": monitor.peak,
            "peak_split_bytes": {k: monitor.peak_split.get(k, 0) for k in ("jvm", "python")},
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "cpu_probe_after_seconds": cpu_probe(),
        }
    )
    for key, value in result.get("spark_conf", {}).items():
        print(f"  {key} = {value}")
    print(
        f"total {total:.1f} s wall (stages {stage_seconds:.1f} s), {total_cpu:.1f} s CPU, "
        f"{rows:,} rows, peak memory {monitor.peak / GB:.2f} GB (JVM "
        f"{result['peak_split_bytes']['jvm'] / GB:.2f}, Python "
        f"{result['peak_split_bytes']['python'] / GB:.2f}), load {os.getloadavg()[0]:.1f}, "
        f"CPU probe {result['cpu_probe_after_seconds']:.3f} s",
        flush=True,
    )
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
