"""A real Spark standalone master and worker on loopback, started with the containers' scripts.

The daemons run ``docker/spark-master.sh`` and ``docker/spark-worker.sh`` and applications go
through ``docker/submit.sh``, exactly as in docker-compose.yaml; only the addresses and ports
differ (free ports on 127.0.0.1, so a second run or another cluster on 7077 cannot clash).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from numpy.lib.stride_tricks import sliding_window_view
from pyspark.sql import SparkSession

import stockvol
from stockvol.cluster import (
    DOCKER_DIR,
    ClusterError,
    StandaloneCluster,
    alive_workers,
    free_port,
    processes_in_group,
)
from stockvol.config import PROJECT_ROOT

pytestmark = pytest.mark.cluster

# A hang guard, not a performance bound: on a quiet 2-core machine the pipeline takes a minute or
# two, on one shared with other Spark jobs many times that.
SUBMIT_TIMEOUT = 1800


def _assert_nothing_left(pids: dict[str, int]) -> None:
    left = {name: processes_in_group(pid) for name, pid in pids.items()}
    assert not any(left.values()), f"daemon processes still running after stop: {left}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandaloneCluster]:
    """One master and one 2-core worker for this module; stopped, and checked gone, at the end."""
    cluster = StandaloneCluster.on_free_ports(
        tmp_path_factory.mktemp("cluster"), worker_cores=2, worker_memory="2g"
    )
    cluster.start()
    pids = dict(cluster.pids)
    try:
        yield cluster
    finally:
        cluster.stop()
        _assert_nothing_left(pids)


def submit(cluster: StandaloneCluster, script: str, *args: str, **env: str) -> str:
    """Run one of the docker/ scripts against the cluster; return its output, fail with it.

    The script runs in its own process group, killed whatever happens, so a hung or failed
    submission leaves no driver behind.
    """
    process = subprocess.Popen(  # noqa: S603 - our own script
        [str(DOCKER_DIR / script), *args],
        env={**cluster.environment(), "SPARK_EXECUTOR_MEMORY": "1g", **env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=SUBMIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{script} did not finish in {SUBMIT_TIMEOUT} s:\n{output[-6000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, (
        f"{script} exited {process.returncode}:\n{output[-6000:]}\n"
        f"--- worker log ---\n{cluster.log_tail('worker')}"
    )
    return output


def completed_apps(cluster: StandaloneCluster) -> list[dict]:
    return cluster.master_state()["completedapps"]


# A job of our own: a Python UDF (so the executors must start the venv's Python and import stockvol)
# whose rows are written as a Delta table (so the executors must have the Delta jars, which only the
# driver resolved through spark.jars.packages).
PROBE_JOB = textwrap.dedent(
    """
    import os
    import sys

    from pyspark.sql import SparkSession, functions as F, types as T

    spark = SparkSession.builder.appName("stockvol-cluster-probe").getOrCreate()
    driver_pid = os.getpid()


    @F.udf(T.StructType([
        T.StructField("square", T.LongType()),
        T.StructField("python", T.StringType()),
        T.StructField("pid", T.LongType()),
        T.StructField("stockvol_file", T.StringType()),
    ]))
    def probe(n):
        import stockvol

        return (n * n, sys.executable, os.getpid(), stockvol.__file__)


    rows = spark.range(0, 200, numPartitions=4).withColumn("probe", probe("id"))
    rows.select("id", "probe.*", F.lit(driver_pid).alias("driver_pid")) \\
        .write.format("delta").mode("overwrite").save(sys.argv[1])
    print("MASTER=" + spark.sparkContext.master)
    spark.stop()
    """
)


def test_executors_run_the_venv_python_and_write_delta(
    cluster: StandaloneCluster, spark: SparkSession, tmp_path: Path
) -> None:
    job = tmp_path / "probe.py"
    job.write_text(PROBE_JOB)
    table = tmp_path / "shared" / "probe"
    output = submit(cluster, "submit.sh", str(job), str(table))

    assert f"MASTER={cluster.master_url}" in output
    assert "stockvol-cluster-probe" in [app["name"] for app in completed_apps(cluster)]
    rows = spark.read.format("delta").load(str(table)).toPandas()
    ids = np.arange(200)
    assert sorted(rows["id"]) == ids.tolist()
    assert rows["square"].sum() == int(np.sum(ids**2))
    assert set(rows["python"]) == {sys.executable}
    assert set(rows["stockvol_file"]) == {stockvol.__file__}
    assert rows["driver_pid"].nunique() == 1
    assert rows["driver_pid"].iloc[0] not in set(rows["pid"])  # the work ran outside the driver
    # The Delta jars reached the executor through the driver, not from a local cache.
    shipped = {p.name for p in (cluster.base_dir / "work").glob("app-*/*/*.jar")}
    assert any(name.startswith("io.delta_delta-spark") for name in shipped), shipped


def raw_rows_per_file(raw_dir: Path) -> dict[str, int]:
    """Data rows of every per-symbol CSV, counted by pandas (the oracle for prices + rejects)."""
    return {
        str(path.relative_to(raw_dir)): len(pd.read_csv(path, dtype=str, keep_default_na=False))
        for folder in ("stocks", "etfs")
        for path in sorted((raw_dir / folder).glob("*.csv"))
    }


def rolling_oracle(prices: pd.DataFrame, window: int = 30) -> pd.DataFrame:
    """Per symbol, by Date: mean of Volume and 15th smallest Adj Close over 30 rows (numpy)."""
    parts = []
    for _, group in prices.sort_values(["Symbol", "Date"]).groupby("Symbol", sort=False):
        volume = group["Volume"].to_numpy(dtype=float)
        adj = group["Adj Close"].to_numpy(dtype=float)
        mean = np.full(len(group), np.nan)
        median = np.full(len(group), np.nan)
        if len(group) >= window:
            mean[window - 1 :] = sliding_window_view(volume, window).mean(axis=1)
            median[window - 1 :] = np.sort(sliding_window_view(adj, window), axis=1)[:, 14]
        parts.append(group.assign(expected_avg=mean, expected_med=median))
    return pd.concat(parts)


def test_pipeline_runs_on_the_cluster_and_writes_tables_and_model(
    cluster: StandaloneCluster, spark: SparkSession, tmp_path: Path
) -> None:
    from pyspark.ml import PipelineModel

    data_dir = tmp_path / "data"
    config_file = tmp_path / "pipeline.yaml"
    settings = yaml.safe_load((PROJECT_ROOT / "conf" / "pipeline.yaml").read_text())
    settings["dataset"]["sample_symbols"] = 10  # enough for every quirk of the real set
    settings["model"].update(num_trees=10, max_depth=4)
    config_file.write_text(yaml.safe_dump(settings))

    output = submit(
        cluster,
        "pipeline.sh",
        STOCKVOL_DATA_DIR=str(data_dir),
        STOCKVOL_SOURCE="sample",
        STOCKVOL_CONFIG=str(config_file),
    )

    summaries = (
        "[download]",
        "[ingest]",
        "[features]",
        "[train]",
        "[retention]",
        "[pipeline] stages=4",
    )
    for stage in summaries:
        assert stage in output, f"no {stage} summary line in:\n{output[-4000:]}"
    assert "stockvol-pipeline" in [app["name"] for app in completed_apps(cluster)]

    expected_rows = raw_rows_per_file(data_dir / "raw")
    prices = spark.read.format("delta").load(str(data_dir / "lake" / "prices"))
    rejects = spark.read.format("delta").load(str(data_dir / "lake" / "rejects"))
    assert prices.count() + rejects.count() == sum(expected_rows.values())
    assert rejects.count() > 0  # the sample carries the real set's bad rows

    features = spark.read.format("delta").load(str(data_dir / "lake" / "features")).toPandas()
    oracle = rolling_oracle(prices.toPandas())
    merged = features.merge(oracle, on=["Symbol", "Date"], validate="one_to_one")
    assert len(merged) == len(features) == len(oracle)
    np.testing.assert_allclose(merged["vol_moving_avg"], merged["expected_avg"], rtol=1e-9)
    np.testing.assert_allclose(merged["adj_close_rolling_med"], merged["expected_med"], rtol=1e-12)

    model_dir = data_dir / "model"
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["lineage"]["spark_master"] == cluster.master_url
    assert metrics["params"]["num_trees"] == 10
    model = PipelineModel.load(str(model_dir))
    usable = spark.createDataFrame(
        merged.dropna(subset=["vol_moving_avg"]).head(50)[
            ["vol_moving_avg", "adj_close_rolling_med"]
        ]
    )
    predictions = model.transform(usable).select("prediction").toPandas()["prediction"]
    assert len(predictions) == 50 and np.isfinite(predictions).all()


def test_the_pipeline_on_the_cluster_with_the_data_in_a_bucket_equals_a_local_run(
    cluster: StandaloneCluster, spark: SparkSession, s3_bucket: str, tmp_path: Path
) -> None:
    """Driver, executors and the download step all read and write ``s3a://`` (a real S3 server on
    loopback; the worker has the AWS_* variables in its environment, as compose's s3.env gives
    them): the tables and the model's metrics equal those of the same run in local mode on disk."""
    from stockvol import features, ingest, train
    from stockvol.acquire import acquire
    from stockvol.config import load_config
    from stockvol.location import resolve
    from stockvol.storage import read_table
    from tests.s3server import SPARK_TEST_CONF

    config_file = tmp_path / "pipeline.yaml"
    settings = yaml.safe_load((PROJECT_ROOT / "conf" / "pipeline.yaml").read_text())
    settings["dataset"]["sample_symbols"] = 6
    settings["model"].update(num_trees=10, max_depth=4)
    config_file.write_text(yaml.safe_dump(settings))
    data_dir = f"{s3_bucket}/run"
    # The test server's S3A setting, as a system property spark-submit's SparkConf picks up.
    test_conf = " ".join(f"-D{key}={value}" for key, value in SPARK_TEST_CONF.items())
    output = submit(
        cluster,
        "pipeline.sh",
        STOCKVOL_DATA_DIR=data_dir,
        STOCKVOL_SOURCE="sample",
        STOCKVOL_CONFIG=str(config_file),
        SPARK_SUBMIT_OPTS=test_conf,
    )
    assert "[pipeline] stages=4" in output, output[-4000:]

    remote = load_config(config_file, data_dir=data_dir)
    local = load_config(config_file, data_dir=tmp_path / "local")
    acquire(local, source="sample")
    for stage in (ingest.run, features.run, train.run):
        stage(spark, local)
    for table in ("prices_path", "rejects_path", "features_path"):
        frames = [read_table(spark, getattr(c, table), "delta") for c in (remote, local)]
        got, expected = (f.orderBy(*f.columns).toPandas() for f in frames)
        pd.testing.assert_frame_equal(got, expected, check_exact=True)
    run_specific = ("lineage", "started_at", "finished_at", "durations_seconds")
    got, expected = (
        {k: v for k, v in json.loads((resolve(c.model_dir) / "metrics.json").read_text()).items()
         if k not in run_specific}
        for c in (remote, local)
    )  # fmt: skip
    # The executors' partial sums reach the driver in whatever order they finish, so the model's
    # floating-point statistics may differ from local mode's in the last bits; nothing more.
    got, expected = flat(got), flat(expected)
    assert got.keys() == expected.keys()
    numbers = [key for key, value in expected.items() if isinstance(value, float)]
    for key in numbers:
        assert got[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-9), key
    assert {k: v for k, v in got.items() if k not in numbers} == {
        k: v for k, v in expected.items() if k not in numbers
    }
    lineage = json.loads((resolve(remote.model_dir) / "metrics.json").read_text())["lineage"]
    assert lineage["spark_master"] == cluster.master_url
    assert lineage["features_path"] == f"{data_dir}/lake/features"


def flat(value: object, prefix: str = "") -> dict[str, object]:
    """Nested metrics as one mapping of dotted keys to leaves (numbers, strings, None)."""
    if isinstance(value, dict):
        return {
            k: v for key, item in value.items() for k, v in flat(item, f"{prefix}{key}.").items()
        }
    if isinstance(value, list):
        return {
            k: v for i, item in enumerate(value) for k, v in flat(item, f"{prefix}{i}.").items()
        }
    return {prefix.rstrip("."): value}


def test_pipeline_job_takes_the_common_and_the_train_flags() -> None:
    result = subprocess.run(  # noqa: S603
        [sys.executable, str(PROJECT_ROOT / "jobs" / "pipeline.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    for flag in ("--data-dir", "--master", "--format", "--median", "--num-trees", "--tune"):
        assert flag in result.stdout


def test_master_lists_one_alive_worker_with_the_configured_resources(
    cluster: StandaloneCluster,
) -> None:
    state = cluster.master_state()
    assert state["status"] == "ALIVE"
    assert state["url"] == cluster.master_url
    [worker] = alive_workers(state)
    assert worker["cores"] == 2
    assert worker["memory"] == 2048  # MiB


def health_check(*args: str) -> subprocess.CompletedProcess[str]:
    """The compose health check's command: ``python -m stockvol.cluster health ...``."""
    return subprocess.run(  # noqa: S603
        [sys.executable, "-m", "stockvol.cluster", "health", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_compose_health_check_passes_for_the_live_master_and_worker(
    cluster: StandaloneCluster,
) -> None:
    master_only = health_check("--master-ui", cluster.master_webui_url)
    assert master_only.returncode == 0, master_only.stderr
    both = health_check(
        "--master-ui", cluster.master_webui_url, "--worker-ui", cluster.worker_webui_url
    )
    assert both.returncode == 0, both.stderr


def test_compose_health_check_fails_when_nothing_answers(cluster: StandaloneCluster) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    no_master = health_check("--master-ui", nobody)
    assert no_master.returncode == 1 and "unhealthy" in no_master.stderr
    no_worker = health_check("--master-ui", cluster.master_webui_url, "--worker-ui", nobody)
    assert no_worker.returncode == 1 and "unhealthy" in no_worker.stderr


def test_submit_without_a_master_url_fails_with_the_fix() -> None:
    env = {k: v for k, v in os.environ.items() if k != "SPARK_MASTER_URL"}
    env["PYSPARK_PYTHON"] = sys.executable
    result = subprocess.run(  # noqa: S603
        [str(DOCKER_DIR / "submit.sh"), "jobs/pipeline.py"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "SPARK_MASTER_URL" in result.stderr


def test_a_taken_master_port_fails_fast_and_leaves_nothing_running(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cluster = StandaloneCluster.on_free_ports(tmp_path)
        cluster.master_port = port
        launched: dict[str, int] = {}
        original_launch = cluster._launch

        def launch_and_record(daemon: str, script: str) -> None:
            original_launch(daemon, script)
            launched[daemon] = cluster.pids[daemon]

        cluster._launch = launch_and_record  # type: ignore[method-assign]
        with pytest.raises(ClusterError, match="master exited") as raised:
            cluster.start(timeout=120)
    assert "Address already in use" in str(raised.value)
    assert set(launched) == {"master"}
    _assert_nothing_left(launched)
    assert not (tmp_path / "cluster.json").exists()


def test_cluster_state_round_trips_through_its_file(tmp_path: Path) -> None:
    cluster = StandaloneCluster(base_dir=tmp_path, master_port=1234, pids={"master": 1})
    cluster.save()
    loaded = StandaloneCluster.load(tmp_path)
    assert loaded == cluster
    assert json.loads((tmp_path / "cluster.json").read_text())["master_port"] == 1234
    with pytest.raises(ClusterError, match="start one"):
        StandaloneCluster.load(tmp_path / "elsewhere")
