"""`make bench`: every stage at one or more data sizes: wall seconds, rows/s, peak memory, config.

    .venv/bin/python benchmarks/run.py                                  # full size (8,049 symbols)
    .venv/bin/python benchmarks/run.py --scales 0.25,0.5,1,2            # the scaling sweep
    .venv/bin/python benchmarks/run.py --symbols 200 --stages ingest,features
    .venv/bin/python benchmarks/run.py --dry-run --scales 0.25,0.5,1,2  # plan, sizes, disk only

Data: the sample generator (``jobs/download.py --source sample``) writes each size once into
``CACHE/<symbols>sym-x<multiplier>-seed<seed>/raw`` (default CACHE: data/bench); later runs reuse
it. A scale ``s`` is ``s`` times the base size: by default the history of every symbol is ``s``
times as long (rows multiplier ``s x --rows-multiplier``, same ``--symbols``), so 2x is 8,049
files with twice the rows; ``--scale-by symbols`` keeps the histories and takes ``s x --symbols``.

Each stage is its own child process (``spark-submit jobs/<stage>.py``: a fresh JVM, so nothing
carries over). The harness times it, samples the resident memory of its whole process tree (the
launcher, driver JVM, driver Python and Python workers) and reads the stage's own summary line
(rows and in-application seconds). Results go to ``--out`` (JSON); ``benchmarks/plot.py`` draws
them. A script, not a test: figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
sys.path.append(str(BENCH_DIR))  # `common` and the stage benchmarks beside this file

from common import (  # noqa: E402
    Measured,
    cpu_probe,
    gib,
    machine_info,
    now_iso,
    parse_summaries,
    run_measured,
    timestamp,
    write_json,
)

from stockvol.config import DEFAULT_CONFIG, ConfigError, load_config  # noqa: E402
from stockvol.sample import check_sample_args, plan_sample  # noqa: E402
from stockvol.spark import LOCAL_SETTINGS, is_local, read_spark_defaults  # noqa: E402

FULL_SYMBOLS = 8049  # files in the Kaggle set; with rows multiplier 1, about 27.7 million rows
SPARK_STAGES = ("ingest", "features", "train", "pipeline")
EXTRA_STAGES = ("ingest-features", "reference", "train-sampling", "serving")
ALL_STAGES = SPARK_STAGES + EXTRA_STAGES
DEFAULT_STAGES = ("ingest", "features", "train", "serving")
# Observed on the generated sample: CSV bytes per data row (3,036,762,365 B / 27,703,025 rows).
CSV_BYTES_PER_ROW = 110
# Lake tables (prices, rejects, features; Delta, snappy Parquet) relative to the CSV bytes, with
# margin; the model is small. Used only for the free-disk check.
LAKE_SHARE = 0.8

# Issue 8's targets at full size, 2 cores; checked and printed after a 1x run.
TARGET_INGEST_FEATURES_SECONDS = 47.0  # < half of the pandas + joblib reference (~95 s)
TARGET_PEAK_BYTES = 6 * 10**9  # the 6 GB (5.59 GiB)
TARGET_TRAIN_SECONDS = 120.0
TARGET_R2_GAP = 0.005


class BenchError(RuntimeError):
    """A problem the user can fix (bad option, no room, a failed stage); no traceback."""


@dataclass(frozen=True)
class Scale:
    """One data size: the generator's arguments and where its data lives."""

    factor: float
    symbols: int
    rows_multiplier: float
    seed: int

    @property
    def key(self) -> str:
        return f"{self.symbols}sym-x{self.rows_multiplier:g}-seed{self.seed}"

    def planned_rows(self) -> int:
        """Data rows the generator will write (cheap: plans, writes nothing)."""
        specs = plan_sample(self.symbols, self.seed, self.rows_multiplier)
        return sum(spec.rows * len(spec.folders) for spec in specs)


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    size = parser.add_argument_group("data size")
    size.add_argument(
        "--symbols", type=int, default=FULL_SYMBOLS, help="base symbols (default: 8049)"
    )
    size.add_argument(
        "--rows-multiplier",
        "--rows-per-symbol",
        type=float,
        default=1.0,
        help="base history-length multiplier (default 1: about 27.7M rows at 8049 symbols)",
    )
    size.add_argument("--seed", type=int, help="generator seed (default: dataset.sample_seed)")
    size.add_argument(
        "--scales",
        default="1",
        help="comma-separated multiples of the base size, e.g. 0.25,0.5,1,2",
    )
    size.add_argument(
        "--scale-by",
        choices=("rows", "symbols"),
        default="rows",
        help="a scale stretches every history (rows, default) or adds symbols",
    )
    size.add_argument(
        "--raw-dir",
        type=Path,
        help="benchmark this existing raw dataset (e.g. the real Kaggle set) instead of generating",
    )
    size.add_argument(
        "--cache-dir", type=Path, default=Path("data/bench"), help="default: data/bench"
    )
    size.add_argument(
        "--drop-lake",
        action="store_true",
        help="delete each size's lake and model after its stages (keeps the cached CSVs)",
    )

    what = parser.add_argument_group("what to run")
    what.add_argument(
        "--stages",
        default=",".join(DEFAULT_STAGES),
        help=f"comma-separated, run in this order, from: {', '.join(ALL_STAGES)} "
        f"(default: {','.join(DEFAULT_STAGES)})",
    )
    what.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="pipeline YAML")
    what.add_argument("--format", choices=("delta", "parquet"), help="lake format (default: conf)")
    what.add_argument("--train-args", default="", help='extra jobs/train.py flags, e.g. "--tune"')
    what.add_argument(
        "--train-fractions",
        default="0.1,1",
        help="train-sampling stage: training-row fractions (default 0.1,1)",
    )
    what.add_argument("--serving-args", default="", help="extra benchmarks/serving.py flags")
    what.add_argument(
        "--reference-args", default="", help="extra benchmarks/ingest_features.py flags"
    )

    spark = parser.add_argument_group("Spark (on top of spark-defaults.conf)")
    spark.add_argument("--master", help="default: the config's spark.master (local[*])")
    spark.add_argument("--driver-memory", help="e.g. 6g (default: spark-defaults.conf)")
    spark.add_argument(
        "--conf",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a Spark setting for every stage (repeatable)",
    )

    out = parser.add_argument_group("output")
    out.add_argument(
        "--out", type=Path, help="result JSON (default: bench-results/<UTC timestamp>.json)"
    )
    out.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per stage")
    out.add_argument("--verbose", action="store_true", help="echo every child's output")
    out.add_argument(
        "--dry-run", action="store_true", help="print the plan (sizes, disk, commands), run nothing"
    )
    return parser.parse_args(argv)


def parse_floats(text: str, name: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise BenchError(f"{name}: expected comma-separated numbers, got {text!r}") from err
    if not values or any(v <= 0 for v in values):
        raise BenchError(f"{name}: expected positive numbers, got {text!r}")
    return values


def parse_stages(text: str) -> list[str]:
    stages = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [s for s in stages if s not in ALL_STAGES]
    if unknown or not stages:
        raise BenchError(
            f"--stages: unknown {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(ALL_STAGES)}"
        )
    return stages


def parse_conf(pairs: Sequence[str]) -> dict[str, str]:
    conf = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise BenchError(f"--conf expects KEY=VALUE, got {pair!r}")
        conf[key.strip()] = value.strip()
    return conf


def build_scales(args: argparse.Namespace, seed: int) -> list[Scale]:
    """The sizes to run, smallest first, each validated as the generator would."""
    scales = []
    for factor in sorted(set(parse_floats(args.scales, "--scales"))):
        if args.scale_by == "rows":
            symbols, multiplier = args.symbols, round(args.rows_multiplier * factor, 6)
        else:
            symbols, multiplier = max(1, round(args.symbols * factor)), args.rows_multiplier
        try:
            check_sample_args(symbols, seed, multiplier)
        except ValueError as err:
            raise BenchError(f"scale {factor:g}: {err}") from err
        scales.append(Scale(factor, symbols, multiplier, seed))
    return scales


# ---------------------------------------------------------------------------------------------
# Spark settings and commands
# ---------------------------------------------------------------------------------------------


def spark_settings(args: argparse.Namespace, defaults_file: Path, master: str) -> dict[str, str]:
    """What spark-submit will apply: the defaults file, then the harness's overrides."""
    settings = read_spark_defaults(defaults_file)
    if is_local(master):  # the tuning measured in local mode (conf/spark-local.conf)
        settings.update(read_spark_defaults(LOCAL_SETTINGS))
    settings["spark.master"] = master
    if args.driver_memory:
        settings["spark.driver.memory"] = args.driver_memory
    settings.update(parse_conf(args.conf))
    return dict(sorted(settings.items()))


def child_env() -> dict[str, str]:
    """The venv's interpreter for the driver and the workers, whoever runs this script."""
    python = sys.executable
    return {
        **os.environ,
        "PYSPARK_PYTHON": python,
        "PYSPARK_DRIVER_PYTHON": python,
        "PYTHONUNBUFFERED": "1",
    }


def spark_submit_command(
    args: argparse.Namespace, defaults_file: Path, master: str, job: str, job_args: Sequence[str]
) -> list[str]:
    submit = Path(sys.executable).parent / "spark-submit"
    if not submit.exists():
        found = shutil.which("spark-submit")
        if not found:
            raise BenchError("spark-submit not found: run `make setup` (pyspark installs it)")
        submit = Path(found)
    command = [str(submit), "--properties-file", str(defaults_file), "--master", master]
    if is_local(master):
        for key, value in read_spark_defaults(LOCAL_SETTINGS).items():
            command += ["--conf", f"{key}={value}"]
    if args.driver_memory:
        command += ["--driver-memory", args.driver_memory]
    for key, value in parse_conf(args.conf).items():
        command += ["--conf", f"{key}={value}"]
    return [*command, str(PROJECT_ROOT / "jobs" / job), *job_args]


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def read_marker(raw_dir: Path) -> dict[str, Any]:
    marker = raw_dir / ".acquired.json"
    return json.loads(marker.read_text()) if marker.is_file() else {}


def check_disk(path: Path, needed: int, what: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path).free
    if free < needed:
        raise BenchError(
            f"{what} needs about {needed / 1e9:.1f} GB on {path}, only {free / 1e9:.1f} GB free: "
            f"free space, pick another --cache-dir, or use smaller --scales"
        )


def ensure_dataset(
    scale: Scale, data_dir: Path, config_path: Path, verbose: bool
) -> tuple[dict[str, Any], Measured | None]:
    """Generate ``data_dir/raw`` for this scale unless the cache already holds it; its marker."""
    raw = data_dir / "raw"
    if raw.exists():
        marker = read_marker(raw)
        wanted = {
            "symbols": scale.symbols,
            "seed": scale.seed,
            "rows_multiplier": scale.rows_multiplier,
        }
        found = {k: marker.get(k) for k in wanted}
        if marker.get("source") != "sample" or found != wanted:
            raise BenchError(
                f"{raw} holds {marker.get('description', 'unknown data')}, not the sample "
                f"{wanted}: delete it (or move it away) and run again"
            )
        print(f"  data: cached {raw} ({marker['rows']:,} rows, {marker['bytes'] / 1e9:.2f} GB)")
        return marker, None
    rows = scale.planned_rows()
    check_disk(data_dir, int(rows * CSV_BYTES_PER_ROW * (1 + LAKE_SHARE)), f"scale {scale.key}")
    csv_gb = rows * CSV_BYTES_PER_ROW / 1e9
    print(f"  data: generating {raw} ({rows:,} rows, about {csv_gb:.1f} GB of CSV)")
    command = [
        sys.executable,
        str(PROJECT_ROOT / "jobs" / "download.py"),
        "--config",
        str(config_path),
        "--source",
        "sample",
        "--data-dir",
        str(data_dir),
        "--symbols",
        str(scale.symbols),
        "--seed",
        str(scale.seed),
        "--rows-multiplier",
        str(scale.rows_multiplier),
    ]
    measured = run_measured(
        command, env=child_env(), log_path=data_dir / "generate.log", echo=verbose
    )
    if measured.returncode != 0:
        raise BenchError(
            f"generating {raw} failed (exit {measured.returncode}): see {measured.log_path}"
        )
    marker = read_marker(raw)
    print(
        f"  data: generated in {measured.seconds:.1f} s "
        f"(peak {gib(measured.peak_rss_bytes):.2f} GiB)"
    )
    return marker, measured


def link_raw(raw_dir: Path, data_dir: Path) -> dict[str, Any]:
    """Point ``data_dir/raw`` at an existing dataset (read only: stages never write raw/)."""
    raw_dir = raw_dir.resolve()
    if not (raw_dir / "symbols_valid_meta.csv").is_file():
        raise BenchError(f"--raw-dir {raw_dir}: no symbols_valid_meta.csv, not a raw dataset")
    data_dir.mkdir(parents=True, exist_ok=True)
    link = data_dir / "raw"
    if link.is_symlink() and link.resolve() != raw_dir:
        link.unlink()
    if not link.exists():
        link.symlink_to(raw_dir, target_is_directory=True)
    marker = read_marker(raw_dir)
    print(f"  data: {raw_dir} ({marker.get('description', 'origin unrecorded')})")
    return marker


# ---------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------


def stage_command(
    stage: str,
    args: argparse.Namespace,
    data_dir: Path,
    defaults_file: Path,
    master: str,
    result_file: Path,
) -> list[str]:
    """The child process that runs one stage."""
    common = ["--config", str(args.config), "--data-dir", str(data_dir)]
    if args.format:
        common += ["--format", args.format]
    if stage in SPARK_STAGES:
        extra = shlex.split(args.train_args) if stage in ("train", "pipeline") else []
        return spark_submit_command(args, defaults_file, master, f"{stage}.py", common + extra)
    python = [sys.executable]
    if stage == "train-sampling":
        command = [*python, str(BENCH_DIR / "train.py"), *common, "--master", master]
        command += ["--fractions", args.train_fractions, "--json", str(result_file)]
        if args.driver_memory:
            command += ["--driver-memory", args.driver_memory]
        return command
    if stage == "serving":
        command = [*python, str(BENCH_DIR / "serving.py"), "--model-dir", str(data_dir / "model")]
        return [*command, "--out", str(result_file), *shlex.split(args.serving_args)]
    # ingest-features: both stages in one session (JVM start excluded); reference: pandas + joblib
    engine = "pandas" if stage == "reference" else "spark"
    command = [*python, str(BENCH_DIR / "ingest_features.py"), *common, "--engine", engine]
    if engine == "spark":
        command += ["--master", master]
    return [*command, "--json", str(result_file), *shlex.split(args.reference_args)]


def stage_script(stage: str) -> Path:
    if stage in SPARK_STAGES:
        return PROJECT_ROOT / "jobs" / f"{stage}.py"
    name = {
        "train-sampling": "train",
        "serving": "serving",
        "reference": "ingest_features",
        "ingest-features": "ingest_features",
    }
    return BENCH_DIR / f"{name[stage]}.py"


def run_stage(
    stage: str,
    args: argparse.Namespace,
    data_dir: Path,
    defaults_file: Path,
    master: str,
    logs: Path,
) -> dict[str, Any]:
    """Run one stage as a child process; its figures (or why there are none)."""
    script = stage_script(stage)
    if not script.exists():
        return {"stage": stage, "status": "skipped", "reason": f"{script} does not exist yet"}
    result_file = logs / f"{stage}.result.json"
    result_file.unlink(missing_ok=True)
    command = stage_command(stage, args, data_dir, defaults_file, master, result_file)
    measured = run_measured(
        command,
        env=child_env(),
        cwd=PROJECT_ROOT,
        log_path=logs / f"{stage}.log",
        timeout=args.timeout,
        echo=args.verbose,
    )
    record: dict[str, Any] = {
        "stage": stage,
        "status": "ok" if measured.returncode == 0 else "failed",
        "wall_seconds": round(measured.seconds, 2),
        "cpu_seconds": round(measured.cpu_seconds, 1),
        "peak_rss_bytes": measured.peak_rss_bytes,
        "peak_rss_gib": round(gib(measured.peak_rss_bytes), 3),
        "peak_split_gib": {
            k: round(gib(v), 3) for k, v in measured.peak_split.items() if k != "processes"
        },
        "max_processes": measured.max_processes,
        "load_average_before": round(measured.load_before, 2),
        "load_average_after": round(measured.load_after, 2),
        "command": shlex.join(measured.command),
        "log": measured.log_path,
    }
    if measured.timed_out:
        record.update(status="failed", reason=f"timed out after {args.timeout:g} s")
    elif measured.returncode != 0:
        lines = measured.stdout.strip().splitlines()
        # The job's own ERROR line says what went wrong; else the end of a traceback.
        errors = [line for line in lines if " ERROR " in line]
        record["reason"] = f"exit {measured.returncode}: " + " / ".join(errors[-1:] or lines[-3:])
    summaries = parse_summaries(measured.stdout)
    if summaries:
        record["summaries"] = summaries
    own = summaries.get(stage)
    if own:
        record.update(
            rows_in=own["rows_in"],
            rows_out=own["rows_out"],
            rows_rejected=own["rows_rejected"],
            stage_seconds=own["seconds"],
            rows_per_second=round(own["rows_in"] / own["seconds"]) if own["seconds"] else None,
            details=own["details"],
        )
    if stage == "pipeline" and summaries:
        record["stage_seconds"] = round(sum(s["seconds"] for s in summaries.values()), 2)
        record["rows_in"] = summaries.get("ingest", {}).get("rows_in")
    if result_file.is_file():
        record["result"] = json.loads(result_file.read_text())
        if stage in ("reference", "ingest-features"):
            steps = record["result"].get("steps", [])
            record["stage_seconds"] = record["result"].get("stages_wall_seconds")
            record["rows_in"] = steps[0]["rows"] if steps else None
            if record["rows_in"] and record["stage_seconds"]:
                record["rows_per_second"] = round(record["rows_in"] / record["stage_seconds"])
    return record


def run_scale(
    scale: Scale | None,
    args: argparse.Namespace,
    stages: Sequence[str],
    defaults_file: Path,
    master: str,
) -> dict[str, Any]:
    """Data for one size, then each stage in order; a failed stage stops this size."""
    if scale is None:
        digest = hashlib.sha1(str(args.raw_dir.resolve()).encode()).hexdigest()[:10]
        data_dir = args.cache_dir / f"raw-{digest}"
        marker = link_raw(args.raw_dir, data_dir)
        generated = None
        entry: dict[str, Any] = {"scale": 1.0, "raw_dir": str(args.raw_dir.resolve())}
    else:
        data_dir = args.cache_dir / scale.key
        data_dir.mkdir(parents=True, exist_ok=True)
        entry = {
            "scale": scale.factor,
            "symbols": scale.symbols,
            "rows_multiplier": scale.rows_multiplier,
            "seed": scale.seed,
        }
    data_dir.mkdir(parents=True, exist_ok=True)
    lock = (data_dir / ".bench.lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise BenchError(f"another benchmark is using {data_dir}; wait for it to finish") from None
    try:
        if scale is not None:
            marker, generated = ensure_dataset(scale, data_dir, args.config, args.verbose)
        entry.update(
            data_dir=str(data_dir),
            dataset=marker.get("description"),
            rows=marker.get("rows"),
            csv_bytes=marker.get("bytes"),
            files=marker.get("files"),
            generate=(
                {
                    "wall_seconds": round(generated.seconds, 2),
                    "peak_rss_gib": round(gib(generated.peak_rss_bytes), 3),
                }
                if generated
                else None
            ),
            stages=[],
        )
        logs = data_dir / "logs"
        logs.mkdir(exist_ok=True)
        for stage in stages:
            print(f"  {stage}: running ...", flush=True)
            record = run_stage(stage, args, data_dir, defaults_file, master, logs)
            entry["stages"].append(record)
            print(f"  {stage}: {stage_line(record)}", flush=True)
            if record["status"] == "failed":
                print(f"  stopping this size: {stage} failed (log: {record.get('log')})")
                break
        if args.drop_lake:
            for name in ("lake", "model"):
                shutil.rmtree(data_dir / name, ignore_errors=True)
            for leftover in data_dir.glob(".model*"):
                shutil.rmtree(leftover, ignore_errors=True)
    finally:
        lock.close()
    return entry


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def stage_line(record: dict[str, Any]) -> str:
    if record["status"] == "skipped":
        return f"skipped ({record['reason']})"
    parts = [f"wall {record['wall_seconds']:.1f} s"]
    if record.get("stage_seconds") is not None:
        parts.append(f"in-app {record['stage_seconds']:.1f} s")
    parts.append(f"CPU {record['cpu_seconds']:.0f} s")
    if record.get("rows_per_second"):
        parts.append(f"{record['rows_per_second']:,.0f} rows/s")
    split = record.get("peak_split_gib", {})
    parts.append(
        f"peak {record['peak_rss_gib']:.2f} GiB "
        f"(JVM {split.get('jvm', 0):.2f}, Python {split.get('python', 0):.2f})"
    )
    note = stage_note(record)
    if note:
        parts.append(note)
    if record["status"] == "failed":
        parts.append(f"FAILED: {record.get('reason', '')[:300]}")
    return ", ".join(parts)


def _cell(value: float | None, fmt: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{fmt}}"


def print_table(results: dict[str, Any]) -> None:
    head = (
        f"{'scale':>5} {'rows':>12} {'stage':<16} {'wall s':>8} {'in-app s':>8} {'CPU s':>7} "
        f"{'rows/s':>11} {'peak GiB':>8} {'JVM':>6} {'Python':>6}  note"
    )
    print("\n" + head + "\n" + "-" * len(head))
    for entry in results["scales"]:
        for r in entry["stages"]:
            ok = r["status"] == "ok"
            split = r.get("peak_split_gib", {}) if ok else {}
            numbers = " ".join(
                [
                    _cell(r.get("wall_seconds") if ok else None, ".1f", 8),
                    _cell(r.get("stage_seconds") if ok else None, ".1f", 8),
                    _cell(r.get("cpu_seconds") if ok else None, ".0f", 7),
                    _cell(r.get("rows_per_second") if ok else None, ",", 11),
                    _cell(r.get("peak_rss_gib") if ok else None, ".2f", 8),
                    _cell(split.get("jvm"), ".2f", 6),
                    _cell(split.get("python"), ".2f", 6),
                ]
            )
            note = stage_note(r) if ok else f"{r['status'].upper()}: {r.get('reason', '')[:160]}"
            rows = entry.get("rows") or 0
            print(f"{entry['scale']:>5g} {rows:>12,} {r['stage']:<16} {numbers}  {note}")


def stage_note(record: dict[str, Any]) -> str:
    """The one figure besides time and memory that matters for this stage."""
    details = record.get("details", {})
    result = record.get("result")
    stage = record["stage"]
    if stage == "train" and "r2" in details:
        return f"fitted {details.get('train_fitted', 0):,} rows, test R² {details['r2']:.4f}"
    if stage == "ingest" and "rows_out" in record:
        return f"{record['rows_out']:,} prices, {record.get('rows_rejected', 0):,} rejects"
    if stage == "train-sampling" and isinstance(result, list):
        return "; ".join(
            f"fraction {r['fraction']:g}: fit {r['durations']['fit']:.0f} s, R² {r['r2']:.4f}"
            for r in result
        )
    if stage == "serving" and isinstance(result, dict):
        return serving_note(result)
    return ""


def serving_note(result: dict[str, Any]) -> str:
    """One-row p50/p99, the first batch figure and gunicorn's requests/s, from serving.py."""
    parts = []
    inproc = result.get("in_process", {})
    # The first real prediction (serving.py times an empty call first, for the timer's overhead).
    one_rows = [r for r in inproc.get("one_row", []) if "overhead" not in r["name"]]
    if one_rows:
        one = one_rows[0]
        parts.append(f"{one['name']}: p50 {one['p50_us']:.1f} us, p99 {one['p99_us']:.1f} us")
    if inproc.get("batches"):
        batch = inproc["batches"][0]
        parts.append(f"{batch['name']}: {batch['rows_per_s']:,.0f} rows/s")
    servers = result.get("through_gunicorn", {}).get("servers", {})
    for name, row in servers.items():
        if "wsgi" in name:
            parts.append(
                f"gunicorn {row['requests_per_s']:,.0f} req/s, p50 {row['p50_ms']:.2f} ms, "
                f"p99 {row['p99_ms']:.2f} ms, {row['errors']} errors"
            )
    return "; ".join(parts)


def target_checks(results: dict[str, Any]) -> list[str]:
    """Issue 8's targets, for the full-size entry (scale 1 at 8,049 symbols), as printable lines."""
    full = [
        e
        for e in results["scales"]
        if e.get("symbols") == FULL_SYMBOLS and e.get("rows_multiplier") == 1.0
    ]
    if not full:
        return ["targets: checked at full size only (8049 symbols, rows multiplier 1)"]
    stages = {r["stage"]: r for r in full[0]["stages"] if r["status"] == "ok"}
    lines = []
    reference = stages.get("reference", {}).get("stage_seconds")
    if "ingest" in stages and "features" in stages:
        in_app = sum(stages[s].get("stage_seconds") or 0 for s in ("ingest", "features"))
        wall = sum(stages[s]["wall_seconds"] for s in ("ingest", "features"))
        peak = max(stages[s]["peak_rss_bytes"] for s in ("ingest", "features"))
        how = f"in-app, two jobs ({wall:.1f} s wall with two JVM starts)"
    elif "ingest-features" in stages:
        one = stages["ingest-features"]
        in_app, peak = one.get("stage_seconds") or 0, one["peak_rss_bytes"]
        how = f"in one session ({one['wall_seconds']:.1f} s wall with the JVM start)"
    else:
        in_app = 0
    if in_app:
        limit = TARGET_INGEST_FEATURES_SECONDS if reference is None else reference / 2
        verdict = "met" if in_app < limit else "NOT met"
        against = "the issue's ~95 s reference" if reference is None else "the reference here"
        lines.append(
            f"ingest+features: {in_app:.1f} s {how}; target < {limit:.1f} s "
            f"(half of {against}): {verdict}"
        )
        if reference is not None:
            lines.append(f"  pandas + joblib reference: {reference:.1f} s")
        verdict = "met" if peak < TARGET_PEAK_BYTES else "NOT met"
        lines.append(f"  peak memory {gib(peak):.2f} GiB, target < 6 GB (5.59 GiB): {verdict}")
    if "train" in stages:
        train = stages["train"]
        seconds = train.get("stage_seconds") or train["wall_seconds"]
        verdict = "met" if seconds <= TARGET_TRAIN_SECONDS else "NOT met"
        lines.append(f"train: {seconds:.1f} s in-app, target <= 120 s: {verdict}")
        sweep = stages.get("train-sampling", {}).get("result") or []
        whole = [r for r in sweep if r["fraction"] == 1.0 and not r.get("max_rows")]
        r2 = train.get("details", {}).get("r2")
        if whole and r2 is not None:
            gap = whole[0]["r2"] - r2
            verdict = "met" if gap <= TARGET_R2_GAP else "NOT met"
            lines.append(
                f"  test R² {r2:.4f} vs full-data fit {whole[0]['r2']:.4f}: gap {gap:+.4f}, "
                f"target <= {TARGET_R2_GAP}: {verdict}"
            )
        else:
            lines.append("  R² gap: run the train-sampling stage with fraction 1 to compare")
    return lines


def linear_growth(results: dict[str, Any]) -> list[str]:
    """Per stage: seconds per million rows, and how far each size is from a straight line."""
    from plot import fit_line, series

    lines = []
    for stage, points in series(results).items():
        if len(points) < 2:
            continue
        rows = [p[0] for p in points]
        seconds = [p[1] for p in points]
        slope, intercept, r2 = fit_line(rows, seconds)
        ratio = seconds[-1] / seconds[0] / (rows[-1] / rows[0])
        fit = f"linear fit R² {r2:.3f}" if len(points) > 2 else "2 sizes: a line fits any 2"
        lines.append(
            f"{stage}: {slope * 1e6:.2f} s per million rows + {intercept:.1f} s fixed, "
            f"{fit}; time ratio / size ratio (largest vs smallest) {ratio:.2f}"
        )
    return lines


# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return bench(args)
    except (BenchError, ConfigError) as err:
        print(f"bench: {err}", file=sys.stderr)
        return 2


def bench(args: argparse.Namespace) -> int:
    stages = parse_stages(args.stages)
    config = load_config(args.config, storage_format=args.format, master=args.master)
    seed = args.seed if args.seed is not None else config.sample_seed
    master = config.master
    defaults_file = config.spark_defaults_file
    settings = spark_settings(args, defaults_file, master)
    args.cache_dir = args.cache_dir.resolve()
    args.config = args.config.resolve()
    scales: list[Scale | None]
    if args.raw_dir:
        if args.scales != "1":
            raise BenchError("--raw-dir benchmarks that one dataset: drop --scales")
        scales = [None]
    else:
        scales = list(build_scales(args, seed))
    out = args.out or PROJECT_ROOT / "bench-results" / f"{timestamp()}.json"

    machine = machine_info()
    print(
        f"bench: {machine['logical_cores']} cores, {machine['memory_gib']} GiB, "
        f"load {machine['load_average'][0]}, {machine['cpu']}; Spark {machine['pyspark']}, "
        f"{machine['java']}"
    )
    print(f"stages: {', '.join(stages)}; storage: {config.storage_format}")
    print("spark: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    if args.dry_run:
        return dry_run(scales, args, stages, defaults_file, master)

    results: dict[str, Any] = {
        "started_at": now_iso(),
        "argv": sys.argv[1:],
        "machine": machine,
        "spark_conf": settings,
        "storage_format": config.storage_format,
        "model": {
            "num_trees": config.model.num_trees,
            "max_depth": config.model.max_depth,
            "max_bins": config.model.max_bins,
            "train_sample_fraction": config.model.train_sample_fraction,
            "train_max_rows": config.model.train_max_rows,
        },
        "train_args": args.train_args,
        "scale_by": args.scale_by,
        "stages": stages,
        "scales": [],
    }
    failed = False
    for scale in scales:
        label = "given raw data" if scale is None else f"scale {scale.factor:g} ({scale.key})"
        print(f"\n== {label}", flush=True)
        probe = cpu_probe()
        entry = run_scale(scale, args, stages, defaults_file, master)
        entry["cpu_probe_seconds"] = [probe, cpu_probe()]  # before and after: the host's speed
        print(f"  CPU probe {probe:.3f} s before, {entry['cpu_probe_seconds'][1]:.3f} s after")
        results["scales"].append(entry)
        failed |= any(r["status"] == "failed" for r in entry["stages"])
        write_json(out, results)  # after every size: an interrupted sweep keeps what it measured
    results["finished_at"] = now_iso()
    results["targets"] = target_checks(results)
    results["linear_growth"] = linear_growth(results)
    write_json(out, results)

    print_table(results)
    print()
    for line in [*results["linear_growth"], *results["targets"]]:
        print(line)
    print(f"\nresults: {out}\nplot:    .venv/bin/python benchmarks/plot.py {out}")
    return 1 if failed else 0


def dry_run(
    scales: Sequence[Scale | None],
    args: argparse.Namespace,
    stages: Sequence[str],
    defaults_file: Path,
    master: str,
) -> int:
    """Sizes, disk needed and the exact child commands, without running anything."""
    total = 0
    for scale in scales:
        if scale is None:
            print(f"\n== given raw data {args.raw_dir}")
            data_dir = args.cache_dir / "raw-..."
        else:
            data_dir = args.cache_dir / scale.key
            rows = scale.planned_rows()
            cached = (data_dir / "raw").exists()
            size = rows * CSV_BYTES_PER_ROW
            total += 0 if cached else int(size * (1 + LAKE_SHARE))
            state = "cached" if cached else "to generate"
            print(
                f"\n== scale {scale.factor:g}: {scale.key}, {rows:,} rows, "
                f"~{size / 1e9:.1f} GB CSV, {state}"
            )
        for stage in stages:
            present = "" if stage_script(stage).exists() else "   (script missing: skipped)"
            command = stage_command(
                stage, args, data_dir, defaults_file, master, data_dir / "logs/x.json"
            )
            print(f"  {stage}: {shlex.join(command)}{present}")
    free = shutil.disk_usage(args.cache_dir if args.cache_dir.exists() else Path.cwd()).free
    print(f"\ndisk: ~{total / 1e9:.1f} GB more needed (CSV + lake), {free / 1e9:.1f} GB free")
    return 0


if __name__ == "__main__":
    started = time.perf_counter()
    code = main()
    print(f"bench: {time.perf_counter() - started:.0f} s in all", file=sys.stderr)
    sys.exit(code)
