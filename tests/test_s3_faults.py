"""SIGKILL during each publish on object storage (a real S3 server, s3proxy on loopback).

The same harness as tests/test_reliability_faults.py: a real spark-submit job, killed with its
whole process group once the new version is half written in the bucket. Then the previous
version is what every reader sees (Spark, and pyarrow for the Parquet table and the JVM-free
model reader), the killed write's debris is in the bucket, and a rerun equals an uninterrupted
run. Covered: the features table in both formats (Delta commits; Parquet publishes by pointer
object) and the model (pointer object).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from pandas.testing import assert_frame_equal
from pyspark.ml import PipelineModel
from pyspark.sql import SparkSession

from serving.forest import load_model
from stockvol import features, train
from stockvol.config import Config, load_config
from stockvol.location import Location, current_version, resolve, versions_dir
from stockvol.storage import delta_version
from tests.s3server import spark_submit_conf
from tests.test_reliability_faults import (
    FIGURES,  # noqa: F401 (conftest.report_figures prints this module's counter)
    FIGURES_TITLE,  # noqa: F401
    NEW_FILES_BEFORE_KILL,
    kill_mid_write,
    probe_features,
    table_rows,
    with_features,
    with_prices,
)

pytestmark = [pytest.mark.faults, pytest.mark.object_store]


def listing(location: Location) -> list[pafs.FileInfo]:
    """Every file below ``location`` (recursive), none if it does not exist."""
    filesystem, path = location.arrow
    selector = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    return [f for f in filesystem.get_file_info(selector) if f.type == pafs.FileType.File]


def new_version_files(link: Location) -> list[str]:
    """Files under version directories other than the one ``link`` points to."""
    current = current_version(link)
    inside = f"{current.arrow[1]}/" if current else None
    return [
        f.path for f in listing(versions_dir(link)) if not (inside and f.path.startswith(inside))
    ]


def version_writing(link: Location) -> Callable[[], bool]:
    """True once a new version beside the current one holds enough Parquet files."""
    current = current_version(link)

    def writing() -> bool:
        assert current_version(link) == current, "published before the kill"
        return sum(p.endswith(".parquet") for p in new_version_files(link)) >= NEW_FILES_BEFORE_KILL

    return writing


def delta_data_files(table: Location) -> set[str]:
    return {
        f.path for f in listing(table) if "_delta_log" not in f.path and f.path.endswith(".parquet")
    }


def delta_writing(table: Location) -> Callable[[], bool]:
    """True once new data files land in the table but no new commit is in its log."""
    before = delta_data_files(table)
    log = {f.path for f in listing(table / "_delta_log") if f.path.endswith(".json")}

    def writing() -> bool:
        now = {f.path for f in listing(table / "_delta_log") if f.path.endswith(".json")}
        assert now == log, "committed before the kill"
        return len(delta_data_files(table) - before) >= NEW_FILES_BEFORE_KILL

    return writing


def arrow_rows(link: Location) -> pd.DataFrame:
    """The current Parquet version read with pyarrow alone (pointer resolved), in a fixed order."""
    filesystem, path = resolve(link).arrow
    frame = pq.read_table(path, filesystem=filesystem).to_pandas()
    return frame.sort_values(list(frame.columns), na_position="first").reset_index(drop=True)


def s3_config(bucket: str, storage_format: str, **overrides: object) -> Config:
    return load_config(data_dir=f"{bucket}/run", storage_format=storage_format, **overrides)


@pytest.mark.parametrize("storage_format", ["delta", "parquet"])
def test_killing_features_mid_publish_on_s3_keeps_the_previous_table(
    spark: SparkSession, s3_bucket: str, storage_format: str
) -> None:
    config = with_prices(spark, s3_config(s3_bucket, storage_format, window=20))
    features.run(spark, config)  # what the killed job would write, uninterrupted
    expected = table_rows(spark, config.features_path, storage_format)
    config = load_config(data_dir=config.data_dir, storage_format=storage_format)
    features.run(spark, config)  # the previous table: window 30
    before = table_rows(spark, config.features_path, storage_format)
    version = delta_version(spark, config.features_path)
    assert not before.equals(expected)

    table = config.features_path
    writing = delta_writing(table) if storage_format == "delta" else version_writing(table)
    committed = delta_data_files(table)
    kill_mid_write("features", config, writing, "--window", "20", conf=spark_submit_conf())

    if storage_format == "delta":
        assert delta_data_files(table) - committed, "no debris: the kill missed the write"
        assert delta_version(spark, table) == version
    else:
        assert new_version_files(table), "no debris: the kill missed the write"
        expected_arrow = before.sort_values(list(before.columns), na_position="first")
        assert_frame_equal(arrow_rows(table), expected_arrow.reset_index(drop=True))
    assert_frame_equal(table_rows(spark, table, storage_format), before)
    features.run(
        spark, load_config(data_dir=config.data_dir, storage_format=storage_format, window=20)
    )
    assert_frame_equal(table_rows(spark, table, storage_format), expected)
    FIGURES[f"s3_features_{storage_format}"] += 1
    FIGURES["survived"] += 1


def model_predictions(spark: SparkSession, model_dir: Location) -> tuple[list, list]:
    """Spark's and the JVM-free reader's predictions of the current model on fixed inputs."""
    frame, x = probe_features(spark)
    model = PipelineModel.load(str(resolve(model_dir)))
    rows = model.transform(spark.createDataFrame(frame)).select("prediction").collect()
    return [row["prediction"] for row in rows], load_model(str(model_dir)).predict(x).tolist()


def test_killing_train_mid_publish_on_s3_keeps_the_previous_model(
    spark: SparkSession, s3_bucket: str
) -> None:
    new_params = {"num_trees": 40, "max_depth": 5, "seed": 7}
    config = with_features(spark, s3_config(s3_bucket, "delta", **new_params))
    train.run(spark, config)  # what the killed job would publish, uninterrupted
    expected = model_predictions(spark, config.model_dir)
    config = load_config(data_dir=config.data_dir, storage_format="delta", num_trees=10)
    train.run(spark, config)  # the previous model
    before, pointer = model_predictions(spark, config.model_dir), current_version(config.model_dir)
    assert before != expected

    args = ("--num-trees", "40", "--max-depth", "5", "--seed", "7")
    writing = version_writing(config.model_dir)
    kill_mid_write("train", config, writing, *args, conf=spark_submit_conf())

    assert new_version_files(config.model_dir), "no debris: the kill missed the write"
    assert current_version(config.model_dir) == pointer
    assert model_predictions(spark, config.model_dir) == before
    train.run(spark, load_config(data_dir=config.data_dir, storage_format="delta", **new_params))
    after = model_predictions(spark, config.model_dir)
    assert after == expected
    assert np.allclose(after[0], after[1], rtol=0, atol=0)
    FIGURES["s3_train_model"] += 1
    FIGURES["survived"] += 1
