"""The whole pipeline on local disk against the same run with the data dir in an S3 bucket.

    .venv/bin/python benchmarks/object_store.py --raw /tmp/full/raw --s3proxy      # this machine
    .venv/bin/python benchmarks/object_store.py --raw DIR --data-dirs /tmp/a s3a://bucket/run

For each data dir: the acquire step (``jobs/download.py --source RAW``: a copy on disk, an
upload to the bucket) and ``spark-submit jobs/pipeline.py`` (ingest, features, train, retention
in one application), each timed as a child process with its peak memory; the stages' own
seconds come from their summary lines. ``--s3proxy`` starts the tests' S3 server (s3proxy on
127.0.0.1, objects in its heap, ``make s3proxy`` first) and a bucket on it, and sets the standard
AWS_* variables for the children; without it, the bucket's endpoint and credentials come from
the environment as in any run. A script, not a test: figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
sys.path.append(str(BENCH_DIR))
sys.path.append(str(PROJECT_ROOT))  # tests.s3server, for --s3proxy

from common import gib, machine_info, now_iso, parse_summaries, run_measured  # noqa: E402

STAGES = ("ingest", "features", "train", "retention")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", required=True, help="a raw folder in the Kaggle layout")
    parser.add_argument("--data-dirs", nargs="+", help="local paths and/or s3a:// URIs")
    parser.add_argument("--s3proxy", action="store_true", help="start the tests' S3 server")
    parser.add_argument("--s3proxy-heap", default="12g", help="its JVM heap (holds the objects)")
    parser.add_argument("--pipeline-args", default="", help="extra jobs/pipeline.py flags")
    parser.add_argument(
        "--out", type=Path, default=PROJECT_ROOT / "bench-results/object-store.json"
    )
    return parser.parse_args()


def run_one(
    data_dir: str, raw: str, env: dict[str, str], extra: list[str], conf: list[str]
) -> dict:
    """Acquire and the pipeline for one data dir: seconds, peak memory, the stages' seconds."""
    python = sys.executable
    spark_submit = str(Path(python).parent / "spark-submit")
    acquire = run_measured(
        [python, "jobs/download.py", "--source", raw, "--data-dir", data_dir, "--force"],
        env=env,
        cwd=PROJECT_ROOT,
    )
    if acquire.returncode:
        raise SystemExit(f"download to {data_dir} failed:\n{acquire.stdout[-3000:]}")
    command = [
        spark_submit,  # as `make pipeline` runs it: the defaults, then the local tuning on top
        "--load-spark-defaults",
        "--properties-file",
        "conf/spark-local.conf",
        *conf,
        "jobs/pipeline.py",
        "--data-dir",
        data_dir,
        *extra,
    ]
    pipeline = run_measured(command, env=env, cwd=PROJECT_ROOT)
    if pipeline.returncode:
        raise SystemExit(f"pipeline on {data_dir} failed:\n{pipeline.stdout[-3000:]}")
    summaries = parse_summaries(pipeline.stdout)
    return {
        "data_dir": data_dir,
        "acquire_seconds": round(acquire.seconds, 1),
        "pipeline_seconds": round(pipeline.seconds, 1),
        "pipeline_peak_gib": round(gib(pipeline.peak_rss_bytes), 2),
        "pipeline_cpu_seconds": round(pipeline.cpu_seconds, 1),
        "stages": {s: summaries[s]["seconds"] for s in STAGES if s in summaries},
        "rows": {s: summaries[s]["rows_out"] for s in STAGES if s in summaries},
    }


def main() -> int:
    args = parse_args()
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    env["SPARK_CONF_DIR"] = str(PROJECT_ROOT)  # where --load-spark-defaults finds its file
    conf: list[str] = []
    server = scratch = None
    data_dirs = list(args.data_dirs or [])
    if args.s3proxy:
        from tests.s3server import (
            S3Server,
            free_port,
            server_environment,
            spark_submit_conf,
        )

        port = free_port()
        env.update(server_environment(port))
        os.environ.update(server_environment(port))  # this process creates the bucket
        scratch = Path(tempfile.mkdtemp(prefix="bench-s3proxy-"))
        server = S3Server(port, scratch, heap=args.s3proxy_heap)
        server.start()
        server.create_bucket("bench")
        conf = spark_submit_conf()
        if not data_dirs:
            data_dirs = [str(scratch / "local"), "s3a://bench/run"]
    try:
        results = [
            run_one(d, args.raw, env, args.pipeline_args.split(), conf if "://" in d else [])
            for d in data_dirs
        ]
    finally:
        if server is not None:
            server.stop()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    for result in results:
        stages = "  ".join(f"{k} {v:.1f} s" for k, v in result["stages"].items())
        print(
            f"{result['data_dir']}: acquire {result['acquire_seconds']} s, pipeline "
            f"{result['pipeline_seconds']} s (peak {result['pipeline_peak_gib']} GiB, "
            f"{result['pipeline_cpu_seconds']} CPU-s): {stages}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"at": now_iso(), "machine": machine_info(), "raw": args.raw, "results": results}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
