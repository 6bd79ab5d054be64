"""The jobs' exit codes and error lines, each job run as a user runs it (a real subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from stockvol.config import load_config
from stockvol.spark import session_settings
from stockvol.storage import FILE_ROWS

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}


def run_job(job: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, f"jobs/{job}.py", *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


BAD_YAML = {
    "window: abc": ("features:\n  window: abc\n", "window must be an integer, got 'abc'"),
    "tune grid": ("model:\n  tune_max_bins: [32, 1]\n", "each of tune_max_bins must be at least 2"),
    "not YAML": ("model: [\n", "is not valid YAML"),
    "a section that is a list": ("model:\n  - 1\n", "model: must be a mapping"),
    "retention": ("storage:\n  retention_hours: soon\n", "retention_hours must be a number"),
}

BAD_SETTINGS = [
    ("train", ["--max-bins", "1"], "max_bins must be at least 2, got 1"),
    ("train", ["--train-max-rows", "0"], "train_max_rows must be at least 1, got 0"),
    ("train", ["--test-fraction", "nan"], "test_fraction must be a number in (0, 1), got nan"),
    ("train", ["--num-trees", "x"], "argument --num-trees: invalid int value: 'x'"),
    ("pipeline", ["--max-depth", "31"], "max_depth must be at most 30, got 31"),
    ("pipeline", ["--tune-num-trees", "2,x"], "expected comma-separated integers"),
    ("features", ["--window", "0"], "window must be at least 1, got 0"),
    ("features", ["--median", "mean"], "argument --median: invalid choice: 'mean'"),
    ("ingest", ["--format", "csv"], "argument --format: invalid choice: 'csv'"),
    ("ingest", ["--config", "nowhere.yaml"], "config file not found: nowhere.yaml"),
    ("retention", ["--retention-hours", "-1"], "retention_hours must be a number of hours >= 0"),
    ("ingest", ["--retention-hours", "inf"], "retention_hours must be a number of hours >= 0"),
    ("download", ["--symbols", "0"], "must be at least 1, got 0"),
    ("download", ["--rows-multiplier", "x"], "argument --rows-multiplier: invalid float value"),
]


def assert_one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    """Exit 2 and nothing but one line naming the problem: no traceback, no usage text, and no
    Spark output (the setting was refused before a JVM started)."""
    output = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert result.returncode == 2, output
    assert len(output) == 1 and message in output[0], output


@pytest.mark.parametrize(("job", "args", "message"), BAD_SETTINGS)
def test_a_bad_setting_exits_2_with_one_line_before_spark_starts(
    job: str, args: list[str], message: str
) -> None:
    assert_one_line_error(run_job(job, *args), message)


@pytest.mark.parametrize("case", sorted(BAD_YAML))
def test_a_bad_config_file_exits_2_with_one_line(tmp_path: Path, case: str) -> None:
    text, message = BAD_YAML[case]
    config = tmp_path / "pipeline.yaml"
    config.write_text(text)
    assert_one_line_error(run_job("pipeline", "--config", str(config)), message)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("job", "message"),
    [
        ("ingest", "raw data folder not found"),
        ("train", "no delta table at"),
    ],
)
def test_a_failing_stage_exits_1_with_its_message_and_no_traceback(
    tmp_path: Path, job: str, message: str
) -> None:
    """Spark runs, the stage fails for a reason the user can fix: exit 1, the reason logged on
    one line, no Python traceback."""
    result = run_job(job, "--data-dir", str(tmp_path), "--master", "local[1]", timeout=300)
    errors = [line for line in result.stdout.splitlines() if " ERROR stockvol: " in line]
    assert result.returncode == 1, result.stdout + result.stderr
    assert len(errors) == 1 and message in errors[0], result.stdout
    assert "Traceback" not in result.stdout + result.stderr


# --- the Spark settings a job gets ---------------------------------------------------------------


def test_a_cluster_gets_the_portable_settings_and_local_mode_its_measured_tuning() -> None:
    """spark-defaults.conf holds what is right anywhere; the tuning measured in local mode (the
    JIT flags, 8 shuffle partitions) comes from conf/spark-local.conf with a local master only,
    and nothing sets JVM flags for executors, which local mode has none of to measure."""
    config = load_config()
    cluster = session_settings(config, "spark://10.0.0.1:7077")
    local = session_settings(config, "local[2]")
    assert not [key for key, value in cluster.items() if "-XX:" in value]
    assert "spark.sql.shuffle.partitions" not in cluster  # Spark's 200, coalesced adaptively
    assert cluster["spark.speculation"] == "false"
    assert local["spark.sql.shuffle.partitions"] == "8"
    assert "-XX:Tier4InvocationThreshold" in local["spark.driver.defaultJavaOptions"]
    assert not [k for k, v in local.items() if k.startswith("spark.executor") and "-XX:" in v]
    # Room outside the JVM for a Python task per core (the compose worker has 2) holding a
    # whole file: FILE_ROWS prices rows, about 300 bytes each with the features.
    overhead_gib = int(cluster["spark.executor.memoryOverhead"].removesuffix("g"))
    assert overhead_gib * 2**30 >= 2 * FILE_ROWS * 300
