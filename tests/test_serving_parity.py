"""The JVM-free model reader: bit-identical to Spark's model.transform; refuses what it cannot read.

Real forests are trained here with Spark MLlib (100 trees, several depths) and saved in Spark's own
format; Spark's ``PipelineModel.load(...).transform`` on the same inputs is the oracle.

``spark_model_dirs`` and ``spark_predictions`` are also used by the other test_serving* modules.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.feature import VectorAssembler
from pyspark.ml.regression import DecisionTreeRegressor, RandomForestRegressor
from pyspark.sql import SparkSession
from pyspark.sql.types import DoubleType, LongType, StructField, StructType

import serving.forest
from serving.forest import (
    FEATURES,
    ModelFormatError,
    ModelNotFoundError,
    ServingModel,
    load_model,
    main,
)
from serving.strictmath import strict_exp
from stockvol import train
from stockvol.config import load_config
from stockvol.schema import FEATURE_COLUMNS, VOLUME

# depth -> maxBins: shallow and default-sized forests, and a deeper one with finer bins.
FORESTS = {2: 32, 5: 32, 8: 64}
NUM_TREES = 100
EXTREMES = [0.0, -0.0, 5e-324, 1e-300, 1.0, 1e300, 1.7976931348623157e308, np.inf, -np.inf, -1.0]


def training_rows(n: int = 2000, seed: int = 7) -> pd.DataFrame:
    """Feature-shaped rows with a relation to learn; values rounded so that some repeat."""
    rng = np.random.default_rng(seed)
    vma = np.round(rng.lognormal(13.0, 1.5, n), 1)
    med = np.round(rng.lognormal(3.5, 1.0, n), 2)
    volume = np.round(vma * np.exp(rng.normal(0.0, 0.3, n)) + 2_000.0 * med)
    return pd.DataFrame({FEATURES[0]: vma, FEATURES[1]: med, VOLUME: volume})


def fit_pipeline(
    spark: SparkSession,
    path: Path,
    *,
    max_depth: int = 5,
    max_bins: int = 32,
    num_trees: int = NUM_TREES,
    input_cols: list[str] | None = None,
    regressor: str = "forest",
) -> Path:
    """Fit VectorAssembler -> regressor on training_rows() with Spark MLlib and save it at path."""
    frame = spark.createDataFrame(training_rows())
    assembler = VectorAssembler(inputCols=input_cols or list(FEATURE_COLUMNS), outputCol="features")
    if regressor == "forest":
        model = RandomForestRegressor(
            labelCol=VOLUME, numTrees=num_trees, maxDepth=max_depth, maxBins=max_bins, seed=42
        )
    else:
        model = DecisionTreeRegressor(labelCol=VOLUME, maxDepth=max_depth, seed=42)
    Pipeline(stages=[assembler, model]).fit(frame).write().save(str(path))
    return path


def spark_model_dirs(spark: SparkSession, base: Path) -> dict[int, Path]:
    """One saved forest per depth in FORESTS under base, trained once per test session."""
    dirs = {}
    for depth, bins in FORESTS.items():
        final = base / f"forest-depth{depth}-bins{bins}"
        if not final.exists():
            staging = base / f".staging-{final.name}"
            shutil.rmtree(staging, ignore_errors=True)
            fit_pipeline(spark, staging, max_depth=depth, max_bins=bins)
            staging.rename(final)  # other modules reuse only complete directories
        dirs[depth] = final
    return dirs


def spark_predictions(spark: SparkSession, model_dir: Path, x: np.ndarray) -> np.ndarray:
    """Spark's own predictions for the rows of x, in order (the oracle)."""
    schema = StructType(
        [StructField("row", LongType()), *(StructField(name, DoubleType()) for name in FEATURES)]
    )
    rows = pd.DataFrame({"row": np.arange(len(x)), FEATURES[0]: x[:, 0], FEATURES[1]: x[:, 1]})
    scored = PipelineModel.load(str(model_dir)).transform(spark.createDataFrame(rows, schema))
    return scored.select("row", "prediction").toPandas().sort_values("row")["prediction"].to_numpy()


def saved_thresholds(model_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every split threshold per feature, read straight from Spark's Parquet (not via serving)."""
    (stage,) = (model_dir / "stages").glob("1_*")
    nodes = pq.read_table(stage / "data").column("nodeData").to_pylist()
    per_feature: list[set[float]] = [set(), set()]
    for node in nodes:
        if node["leftChild"] >= 0:
            per_feature[node["split"]["featureIndex"]].add(
                node["split"]["leftCategoriesOrThreshold"][0]
            )
    return tuple(np.array(sorted(values)) for values in per_feature)  # type: ignore[return-value]


def parity_inputs(model_dir: Path, seed: int) -> np.ndarray:
    """Random rows, rows exactly on and one ulp around every threshold, every threshold pair,
    and extremes (zero, subnormal, huge, infinite, negative) beyond the training range."""
    rng = np.random.default_rng(seed)
    t0, t1 = saved_thresholds(model_dir)
    random = np.column_stack([rng.lognormal(13.0, 2.0, 3000), rng.lognormal(3.5, 1.5, 3000)])
    near0 = np.concatenate([t0, np.nextafter(t0, -np.inf), np.nextafter(t0, np.inf)])
    near1 = np.concatenate([t1, np.nextafter(t1, -np.inf), np.nextafter(t1, np.inf)])
    on0 = np.column_stack([near0, rng.choice(random[:, 1], near0.size)])
    on1 = np.column_stack([rng.choice(random[:, 0], near1.size), near1])
    pairs = np.array(np.meshgrid(t0, t1)).reshape(2, -1).T
    extremes = np.array(np.meshgrid(EXTREMES, EXTREMES)).reshape(2, -1).T
    return np.vstack([random, on0, on1, pairs, extremes]).astype(np.float64)


@pytest.fixture(scope="session")
def model_dirs(spark: SparkSession, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    return spark_model_dirs(spark, tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def parity_cases(spark: SparkSession, model_dirs: dict[int, Path]) -> dict[int, tuple]:
    """depth -> (inputs, Spark's predictions on them)."""
    cases = {}
    for depth, model_dir in model_dirs.items():
        x = parity_inputs(model_dir, seed=depth)
        cases[depth] = (x, spark_predictions(spark, model_dir, x))
    return cases


@pytest.mark.parametrize("depth", FORESTS)
def test_batch_predictions_equal_spark_exactly(
    depth: int, model_dirs: dict[int, Path], parity_cases: dict[int, tuple]
) -> None:
    x, expected = parity_cases[depth]
    model = load_model(model_dirs[depth])
    assert model.evaluator == "grid"
    assert x.shape[0] > 3000  # thousands of rows per forest
    np.testing.assert_array_equal(model.predict(x), expected)


@pytest.mark.parametrize("depth", FORESTS)
def test_one_row_predictions_equal_spark_exactly(
    depth: int, model_dirs: dict[int, Path], parity_cases: dict[int, tuple]
) -> None:
    x, expected = parity_cases[depth]
    model = load_model(model_dirs[depth])
    got = np.array([model.predict_one(a, b) for a, b in x])
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("depth", FORESTS)
def test_tree_walk_without_the_grid_equals_spark_exactly(
    depth: int, model_dirs: dict[int, Path], parity_cases: dict[int, tuple]
) -> None:
    x, expected = parity_cases[depth]
    model = load_model(model_dirs[depth], max_grid_cells=0)
    assert model.evaluator == "walk"
    np.testing.assert_array_equal(model.predict(x), expected)
    np.testing.assert_array_equal([model.predict_one(a, b) for a, b in x[:50]], expected[:50])


@pytest.mark.parametrize("depth", FORESTS)
def test_structure_matches_spark_model(depth: int, model_dirs: dict[int, Path]) -> None:
    spark_forest = PipelineModel.load(str(model_dirs[depth])).stages[1]
    model = load_model(model_dirs[depth])
    info = model.info["forest"]
    assert info["num_trees"] == spark_forest.getNumTrees == NUM_TREES
    assert info["num_nodes"] == spark_forest.totalNumNodes
    assert info["depth"] == max(tree.depth for tree in spark_forest.trees)
    assert model.info["stages"][1]["params"]["maxDepth"] == depth
    assert model.info["features"] == list(FEATURE_COLUMNS)


def test_serving_feature_names_are_the_pipeline_contract() -> None:
    assert FEATURES == FEATURE_COLUMNS


def test_nan_is_refused_like_the_vector_assembler(model_dirs: dict[int, Path]) -> None:
    model = load_model(model_dirs[5])
    with pytest.raises(ValueError, match="NaN"):
        model.predict(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="NaN"):
        model.predict_one(np.nan, 1.0)


def test_wrong_shape_is_refused(model_dirs: dict[int, Path]) -> None:
    with pytest.raises(ValueError, match="shape"):
        load_model(model_dirs[5]).predict(np.ones((3, 3)))


# --- refusals ---------------------------------------------------------------------------------


def copy_model(model_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(model_dir, target)
    return target


def stage_dir(model_dir: Path, index: int) -> Path:
    (found,) = (model_dir / "stages").glob(f"{index}_*")
    return found


def edit_metadata(directory: Path, **changes: object) -> None:
    (part,) = (directory / "metadata").glob("part-*")
    metadata = json.loads(part.read_text())
    metadata.update(changes)
    part.write_text(json.dumps(metadata) + "\n")


def test_missing_directory_is_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no model directory"):
        load_model(tmp_path / "absent")


def test_reversed_feature_order_is_refused(spark: SparkSession, tmp_path: Path) -> None:
    model_dir = fit_pipeline(
        spark, tmp_path / "reversed", num_trees=3, input_cols=list(reversed(FEATURE_COLUMNS))
    )
    with pytest.raises(ModelFormatError, match="in this order"):
        load_model(model_dir)


def test_a_decision_tree_pipeline_is_refused(spark: SparkSession, tmp_path: Path) -> None:
    model_dir = fit_pipeline(spark, tmp_path / "tree", regressor="tree")
    with pytest.raises(ModelFormatError, match="RandomForestRegressionModel"):
        load_model(model_dir)


def test_a_single_stage_model_is_refused(model_dirs: dict[int, Path]) -> None:
    with pytest.raises(ModelFormatError, match="PipelineModel"):
        load_model(stage_dir(model_dirs[2], 1))


def test_wrong_stage_class_in_metadata_is_refused(
    model_dirs: dict[int, Path], tmp_path: Path
) -> None:
    model_dir = copy_model(model_dirs[2], tmp_path)
    edit_metadata(
        stage_dir(model_dir, 1), **{"class": "org.apache.spark.ml.regression.GBTRegressionModel"}
    )
    with pytest.raises(ModelFormatError, match="GBTRegressionModel"):
        load_model(model_dir)


def test_categorical_split_is_refused(model_dirs: dict[int, Path], tmp_path: Path) -> None:
    model_dir = copy_model(model_dirs[2], tmp_path)
    data = stage_dir(model_dir, 1) / "data"
    (part,) = data.glob("*.parquet")
    table = pq.read_table(part)
    rows = table.to_pylist()
    root = next(row for row in rows if row["nodeData"]["id"] == 0)
    root["nodeData"]["split"]["numCategories"] = 3
    root["nodeData"]["split"]["leftCategoriesOrThreshold"] = [0.0, 2.0]
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), part)
    with pytest.raises(ModelFormatError, match="categorical"):
        load_model(model_dir)


@pytest.mark.parametrize(
    "remove",
    ["stages/1_*/treesMetadata", "stages/1_*/data", "stages/0_*", "metadata"],
)
def test_missing_parts_are_refused(
    model_dirs: dict[int, Path], tmp_path: Path, remove: str
) -> None:
    model_dir = copy_model(model_dirs[2], tmp_path)
    (target,) = model_dir.glob(remove)
    shutil.rmtree(target)
    with pytest.raises(ModelFormatError):
        load_model(model_dir)


def test_corrupt_metadata_and_parquet_are_refused(
    model_dirs: dict[int, Path], tmp_path: Path
) -> None:
    model_dir = copy_model(model_dirs[2], tmp_path)
    (part,) = (stage_dir(model_dir, 1) / "data").glob("*.parquet")
    part.write_bytes(b"not parquet at all")
    with pytest.raises(ModelFormatError, match="Parquet"):
        load_model(model_dir)
    (meta,) = (model_dir / "metadata").glob("part-*")
    meta.write_text("{truncated")
    with pytest.raises(ModelFormatError, match="not JSON"):
        load_model(model_dir)


def test_broken_tree_links_are_refused(model_dirs: dict[int, Path], tmp_path: Path) -> None:
    model_dir = copy_model(model_dirs[2], tmp_path)
    (part,) = (stage_dir(model_dir, 1) / "data").glob("*.parquet")
    table = pq.read_table(part)
    rows = table.to_pylist()
    root = next(row for row in rows if row["nodeData"]["id"] == 0)
    root["nodeData"]["rightChild"] = root["nodeData"]["leftChild"]  # two parents for one node
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), part)
    with pytest.raises(ModelFormatError, match="tree"):
        load_model(model_dir)


def test_tree_count_must_match_the_metadata(model_dirs: dict[int, Path], tmp_path: Path) -> None:
    model_dir = copy_model(model_dirs[2], tmp_path)
    edit_metadata(stage_dir(model_dir, 1), numTrees=NUM_TREES + 1)
    with pytest.raises(ModelFormatError, match="expected 0..100"):
        load_model(model_dir)


def test_loaded_model_is_independent_of_the_files(
    model_dirs: dict[int, Path], tmp_path: Path
) -> None:
    """Everything is read at load time: deleting the directory afterwards changes nothing."""
    model_dir = copy_model(model_dirs[5], tmp_path)
    model: ServingModel = load_model(model_dir)
    before = model.predict(np.array([[1e6, 30.0], [5e4, 2.0]]))
    shutil.rmtree(model_dir)
    np.testing.assert_array_equal(model.predict(np.array([[1e6, 30.0], [5e4, 2.0]])), before)


def test_a_symlink_swapped_during_loading_still_yields_one_whole_version(
    model_dirs: dict[int, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The train job may swap MODEL_DIR while a worker reads it: all files come from one version."""
    link = tmp_path / "model"
    link.symlink_to(model_dirs[2])
    read_metadata = serving.forest._read_metadata

    def swap_after_first_read(store: serving.forest.ModelStore, directory: str) -> dict:
        metadata = read_metadata(store, directory)
        if link.resolve() == model_dirs[2].resolve():
            staged = tmp_path / ".model.new"
            staged.symlink_to(model_dirs[8])
            staged.replace(link)
        return metadata

    monkeypatch.setattr(serving.forest, "_read_metadata", swap_after_first_read)
    model = load_model(link)
    assert link.resolve() == model_dirs[8].resolve()  # the swap did happen mid-load
    assert model.info["resolved_dir"] == str(model_dirs[2].resolve())
    assert model.info["model_dir"] == str(link)
    x = np.array([[1e6, 30.0], [5e4, 2.0], [3e7, 150.0]])
    np.testing.assert_array_equal(model.predict(x), load_model(model_dirs[2]).predict(x))


def test_check_command_reports_a_model_or_why_not(
    model_dirs: dict[int, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(model_dirs[5])]) == 0
    assert json.loads(capsys.readouterr().out)["forest"]["num_trees"] == NUM_TREES
    (tmp_path / "model").mkdir()
    assert main([str(tmp_path / "model")]) == 1
    assert "ModelFormatError" in capsys.readouterr().err


# --- the stage after the forest: the target form turned back into a volume ------------------

TARGETS = ("log_ratio", "ratio", "volume")


def fit_target_pipeline(spark: SparkSession, path: Path, target: str) -> Path:
    """The train job's own pipeline (stockvol.train.fit_pipeline) fitted on training_rows()."""
    params = replace(load_config().model, target=target, num_trees=30, max_depth=5)
    train.fit_pipeline(spark.createDataFrame(training_rows()), params).write().save(str(path))
    return path


@pytest.fixture(scope="module")
def target_cases(
    spark: SparkSession, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, np.ndarray, np.ndarray]]:
    """target -> (model directory, inputs, Spark's predictions on them)."""
    cases = {}
    for seed, target in enumerate(TARGETS):
        model_dir = fit_target_pipeline(spark, tmp_path_factory.mktemp(target) / "model", target)
        x = parity_inputs(model_dir, seed=seed)
        cases[target] = (model_dir, x, spark_predictions(spark, model_dir, x))
    return cases


@pytest.mark.parametrize("target", TARGETS)
def test_every_target_form_predicts_exactly_as_spark(
    target: str, target_cases: dict[str, tuple[Path, np.ndarray, np.ndarray]]
) -> None:
    model_dir, x, expected = target_cases[target]
    grid, walk = load_model(model_dir), load_model(model_dir, max_grid_cells=0)
    assert (grid.evaluator, walk.evaluator) == ("grid", "walk")
    assert grid.info["target"] == target and len(grid.info["stages"]) == 3
    np.testing.assert_array_equal(grid.predict(x), expected)
    np.testing.assert_array_equal(walk.predict(x), expected)
    np.testing.assert_array_equal([grid.predict_one(a, b) for a, b in x], expected)
    np.testing.assert_array_equal([walk.predict_one(a, b) for a, b in x[-200:]], expected[-200:])


@pytest.mark.parametrize("target", TARGETS)
def test_predicted_volumes_are_never_negative_or_infinite(
    target: str, target_cases: dict[str, tuple[Path, np.ndarray, np.ndarray]]
) -> None:
    """vol_moving_avg = 0, subnormal, huge, infinite: always a volume in [0, 2^53] (Spark too)."""
    model_dir, x, expected = target_cases[target]
    assert np.all((expected >= 0) & (expected <= 2.0**53))
    model = load_model(model_dir)
    edge = np.array([[v, 40.0] for v in (0.0, 5e-324, 1e-300, 1e300, 1.7976931348623157e308)])
    predicted = model.predict(edge)
    assert np.all((predicted >= 0) & (predicted <= 2.0**53))
    if target == "ratio":
        assert predicted[0] == 0.0  # a ratio of nothing is nothing
    if target != "volume":
        assert predicted[-1] == 2.0**53  # beyond every double's exact integers: clipped


def test_the_reader_knows_exactly_the_statements_the_train_job_writes() -> None:
    assert {t: train.volume_statement(t) for t in TARGETS} == serving.forest.VOLUME_STATEMENTS
    assert serving.forest.FOREST_PREDICTION == train.FOREST_PREDICTION
    assert serving.forest.PREDICTION == train.PREDICTION
    assert float(train.MAX_PREDICTED_VOLUME.rstrip("D")) == serving.forest.MAX_PREDICTED_VOLUME


def test_an_unknown_statement_or_stage_after_the_forest_is_refused(
    target_cases: dict[str, tuple[Path, np.ndarray, np.ndarray]], tmp_path: Path
) -> None:
    model_dir = copy_model(target_cases["log_ratio"][0], tmp_path / "statement")
    statement = train.volume_statement("log_ratio").replace("exp(", "expm1(")
    (part,) = (stage_dir(model_dir, 2) / "metadata").glob("part-*")
    metadata = json.loads(part.read_text())
    metadata["paramMap"]["statement"] = statement
    part.write_text(json.dumps(metadata) + "\n")
    with pytest.raises(ModelFormatError, match="unknown SQLTransformer statement"):
        load_model(model_dir)

    model_dir = copy_model(target_cases["ratio"][0], tmp_path / "stage")
    edit_metadata(stage_dir(model_dir, 2), **{"class": "org.apache.spark.ml.feature.Bucketizer"})
    with pytest.raises(ModelFormatError, match="expected a .*SQLTransformer"):
        load_model(model_dir)


def test_strict_exp_equals_spark_sql_exp_bit_for_bit(spark: SparkSession) -> None:
    rng = np.random.default_rng(11)
    special = [0.0, -0.0, 1.0, -1.0, 5e-324, 1e-300, 3.7e-9, np.log(2) / 2, 1.5 * np.log(2)]
    special += [709.78, 709.79, -708.39, -745.13, -745.14, -740.0, 800.0, -800.0, np.inf, -np.inf]
    x = np.concatenate(
        [
            rng.uniform(-750.0, 750.0, 40_000),
            rng.normal(0.0, 1.0, 40_000),  # where the model's log ratios live
            rng.normal(0.0, 1e-8, 2_000),
            np.nextafter(np.array(special[7:9]), [np.inf, -np.inf]),
            special,
        ]
    )
    frame = spark.createDataFrame(pd.DataFrame({"row": np.arange(x.size), "x": x}))
    got = frame.selectExpr("row", "exp(x) AS e").toPandas().sort_values("row")["e"].to_numpy()
    np.testing.assert_array_equal(strict_exp(x), got)
    assert np.isnan(strict_exp(np.array([np.nan])))[0]
