"""Spark, Delta and pyarrow on a real S3 server (s3proxy on loopback), configured only through the
standard AWS variables (tests/conftest.py sets them before the session's JVM starts)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
from chispa import assert_df_equality
from pyarrow.fs import FileSystem
from pyspark.sql import SparkSession
from pyspark.sql.types import LongType, StringType, StructField, StructType

from stockvol.spark import environment_settings, s3a_settings, settings_not_given
from tests.s3server import S3Server, free_port, spark_submit_conf

ROOT = Path(__file__).resolve().parents[1]
SPARK_SUBMIT = Path(sys.executable).parent / "spark-submit"

SCHEMA = StructType(
    [
        StructField("Ticker Symbol", StringType(), True),
        StructField("Trade Volume", LongType(), True),
    ]
)
ROWS = [("AAPL", 100), ("MSFT", 250), ("ZZZ", 0)]


def test_an_endpoint_implies_path_style_access() -> None:
    settings = s3a_settings({"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"})
    assert settings == {
        "spark.hadoop.fs.s3a.endpoint": "http://127.0.0.1:9000",
        "spark.hadoop.fs.s3a.path.style.access": "true",
    }


def test_the_region_comes_from_aws_region_then_aws_default_region() -> None:
    key = "spark.hadoop.fs.s3a.endpoint.region"
    assert s3a_settings({"AWS_REGION": "eu-west-1"}) == {key: "eu-west-1"}
    assert s3a_settings({"AWS_DEFAULT_REGION": "eu-west-2"}) == {key: "eu-west-2"}
    both = {"AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "eu-west-2"}
    assert s3a_settings(both) == {key: "eu-west-1"}


def test_no_credential_reaches_the_spark_conf() -> None:
    env = {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "AWS_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "AKIA-secret-id",
        "AWS_SECRET_ACCESS_KEY": "secret-key-value",
        "AWS_SESSION_TOKEN": "secret-token-value",
    }
    settings = environment_settings(env)
    text = repr(settings)
    assert "secret" not in text and "AKIA" not in text
    assert settings["spark.executorEnv.AWS_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert settings["spark.executorEnv.AWS_REGION"] == "eu-west-1"


def test_an_empty_environment_sets_nothing() -> None:
    assert environment_settings({}) == {}
    assert environment_settings({"AWS_ENDPOINT_URL": "", "AWS_REGION": ""}) == {}


def test_an_explicit_setting_wins_over_the_environment() -> None:
    from_env = s3a_settings({"AWS_ENDPOINT_URL": "http://env:9000", "AWS_REGION": "eu-west-1"})
    given = {"spark.hadoop.fs.s3a.endpoint", "spark.sql.shuffle.partitions"}
    assert settings_not_given(from_env, given) == {
        "spark.hadoop.fs.s3a.path.style.access": "true",
        "spark.hadoop.fs.s3a.endpoint.region": "eu-west-1",
    }


def test_the_session_takes_the_endpoint_from_the_environment(spark: SparkSession) -> None:
    conf = spark.sparkContext.getConf()
    assert conf.get("spark.hadoop.fs.s3a.endpoint") == os.environ["AWS_ENDPOINT_URL"]
    assert conf.get("spark.executorEnv.AWS_ENDPOINT_URL") == os.environ["AWS_ENDPOINT_URL"]
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in repr(conf.getAll())


def test_spark_and_pyarrow_read_the_same_parquet_table_on_s3(
    spark: SparkSession, s3_bucket: str
) -> None:
    expected = spark.createDataFrame(ROWS, SCHEMA)
    path = f"{s3_bucket}/lake/prices"
    expected.write.parquet(path)

    assert_df_equality(spark.read.parquet(path), expected, ignore_row_order=True)
    # pyarrow reads s3a:// URIs as s3://, endpoint and credentials from the same environment.
    filesystem, key = FileSystem.from_uri(path.replace("s3a://", "s3://", 1))
    table = pq.read_table(key, filesystem=filesystem)
    assert sorted(zip(*table.to_pydict().values(), strict=True)) == sorted(ROWS)


def test_a_column_mapped_delta_table_round_trips_on_s3(spark: SparkSession, s3_bucket: str) -> None:
    expected = spark.createDataFrame(ROWS, SCHEMA)
    path = f"{s3_bucket}/lake/features"
    expected.write.format("delta").option("delta.columnMapping.mode", "name").save(path)
    expected.limit(1).write.format("delta").mode("overwrite").save(path)

    assert_df_equality(
        spark.read.format("delta").load(path), expected.limit(1), ignore_row_order=True
    )
    assert len(spark.sql(f"DESCRIBE HISTORY delta.`{path}`").collect()) == 2
    detail = spark.sql(f"DESCRIBE DETAIL delta.`{path}`").first()
    assert detail is not None and detail["properties"]["delta.columnMapping.mode"] == "name"


def test_spark_submit_conf_wins_over_the_environment(
    spark: SparkSession, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    """Under spark-submit the session is built in a JVM that runs already: its ``--conf``
    endpoint must stay, not be replaced by the environment's (here a port nobody listens on)."""
    path = f"{s3_bucket}/table"
    spark.createDataFrame(ROWS, SCHEMA).write.parquet(path)
    script = tmp_path / "count.py"
    script.write_text(
        "import sys\n"
        "from stockvol.config import load_config\n"
        "from stockvol.spark import build_session\n"
        "spark = build_session(load_config(), 'conf-wins')\n"
        "print('rows', spark.read.parquet(sys.argv[1]).count())\n"
        "spark.stop()\n"
    )
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
    }
    result = subprocess.run(
        [
            str(SPARK_SUBMIT),
            "--properties-file",
            "spark-defaults.conf",
            "--master",
            "local[1]",
            *spark_submit_conf(),
            "--conf",
            f"spark.hadoop.fs.s3a.endpoint={s3_server.endpoint}",
            str(script),
            path,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"rows {len(ROWS)}" in result.stdout
