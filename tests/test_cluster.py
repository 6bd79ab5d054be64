"""A real Spark standalone master and worker on loopback, started with the containers' scripts.

The daemons run ``docker/spark-master.sh`` and ``docker/spark-worker.sh`` and applications go
through ``docker/submit.sh``, exactly as in docker-compose.yaml; only the addresses and ports
differ (free ports on 127.0.0.1, so a second run or another cluster on 7077 cannot clash).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pyspark.sql import SparkSession

import stockvol
from stockvol.cluster import (
    DOCKER_DIR,
    ClusterError,
    StandaloneCluster,
    alive_workers,
    processes_in_group,
)

pytestmark = pytest.mark.cluster

SUBMIT_TIMEOUT = 600


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
    """Run one of the docker/ scripts against the cluster; return its output, fail with it."""
    result = subprocess.run(  # noqa: S603 - our own script
        [str(DOCKER_DIR / script), *args],
        env={**cluster.environment(), "SPARK_EXECUTOR_MEMORY": "1g", **env},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=SUBMIT_TIMEOUT,
    )
    output = f"{result.stdout}\n{result.stderr}"
    assert result.returncode == 0, (
        f"{script} exited {result.returncode}:\n{output[-6000:]}\n"
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


def test_master_lists_one_alive_worker_with_the_configured_resources(
    cluster: StandaloneCluster,
) -> None:
    state = cluster.master_state()
    assert state["status"] == "ALIVE"
    assert state["url"] == cluster.master_url
    [worker] = alive_workers(state)
    assert worker["cores"] == 2
    assert worker["memory"] == 2048  # MiB


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
