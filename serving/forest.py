"""Read a saved Spark ``PipelineModel`` (VectorAssembler -> RandomForestRegressionModel ->
SQLTransformer), no JVM.

Spark writes the pipeline as JSON metadata plus Parquet tree data. This module reads them with
pyarrow, through a pyarrow ``FileSystem`` (local disk, or S3 for ``s3://``/``s3a://`` URIs, where
a pointer object names the current version: ``open_location``, ``resolve_model_dir``), refuses
any directory it does not understand, and predicts exactly as Spark 4.2 does:

* a continuous split sends a row left when ``value <= threshold`` (``ContinuousSplit``);
* the forest predicts ``(p_0 + p_1 + ... + p_{n-1}) / numTrees``, summed left to right in tree
  order (``RandomForestRegressionModel.predict``: ``_trees.map(...).sum / getNumTrees``; the
  tree weights, all 1.0, are not used). Summing in the same order makes results bit-identical.
* the last stage turns the forest's output (the target form the train job fitted: the log ratio
  or the ratio of the day's volume to ``vol_moving_avg``, or the volume itself) back into a
  volume with one of the SQL statements in ``VOLUME_STATEMENTS``, evaluated here with the same
  IEEE operations in the same order (``exp`` as Java's ``StrictMath.exp``: ``strictmath``). A
  two-stage pipeline whose forest predicts the volume itself (models trained before Dec 2026)
  is still served as it is. Any other stage or statement is refused.

Two evaluators, both exact:

* ``Forest.walk``: the definition. All rows x all trees descend one level per step with numpy.
* ``Grid``: every split compares one feature with one of a few thresholds (Spark bins each
  continuous feature into at most ``maxBins`` buckets once for the whole forest), so the forest
  is constant on each cell of the grid those thresholds draw. ``Grid`` runs ``walk`` once on one
  point per cell at load time; a prediction is then two binary searches and a table look-up.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import re
from bisect import bisect_left
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from serving.strictmath import strict_exp

# The model contract (stockvol.schema.FEATURE_COLUMNS), repeated because serving must not import
# the pipeline package, which needs pyspark. A test keeps the two equal.
FEATURES = ("vol_moving_avg", "adj_close_rolling_med")

PIPELINE_CLASS = "org.apache.spark.ml.PipelineModel"
ASSEMBLER_CLASS = "org.apache.spark.ml.feature.VectorAssembler"
FOREST_CLASS = "org.apache.spark.ml.regression.RandomForestRegressionModel"
TREE_CLASS = "org.apache.spark.ml.regression.DecisionTreeRegressionModel"
SQL_CLASS = "org.apache.spark.ml.feature.SQLTransformer"
FOREST_PREDICTION = "forest_prediction"
PREDICTION = "prediction"
# The statements stockvol.train.volume_statement writes, by target form; a test keeps them equal.
# The predicted volume is clipped to [0, 2^53].
MAX_PREDICTED_VOLUME = 9007199254740992.0
_VOLUME_SQL = {
    "log_ratio": "(`vol_moving_avg` + 1.0D) * exp(`forest_prediction`) - 1.0D",
    "ratio": "`vol_moving_avg` * `forest_prediction`",
    "volume": "`forest_prediction`",
}
VOLUME_STATEMENTS = {
    target: "SELECT *, greatest(0.0D, least(9007199254740992.0D, "
    f"{sql})) AS `prediction` FROM __THIS__"
    for target, sql in _VOLUME_SQL.items()
}
METRICS_FILE = "metrics.json"

# Above this many cells the grid is not built and predictions walk the trees (still exact, slower).
# With Spark's default maxBins=32 a two-feature forest has at most 32 x 32 cells.
DEFAULT_MAX_GRID_CELLS = 4_000_000
# Rows per block when walking the trees, to bound the rows x trees temporaries.
_WALK_BLOCK_ROWS = 16_384


class ModelError(Exception):
    """The model directory cannot be served."""


class ModelNotFoundError(ModelError):
    """No model directory at the configured path (train one first: ``make train``)."""


class ModelStoreError(ModelNotFoundError):
    """The object store holding the model cannot be reached or refuses the request (endpoint,
    credentials, permissions): no model can be read now; served as 503 like a missing model."""


class ModelLocationError(ModelError):
    """MODEL_DIR is not a location this server reads (an unknown scheme, credentials in the URI)."""


class ModelFormatError(ModelError):
    """The directory is not a PipelineModel this server understands; the message says why."""


# Object-store schemes read through pyarrow's S3 filesystem; Hadoop's ``s3a://`` names the same
# objects as ``s3://`` (the pipeline's Spark side writes s3a:// paths).
S3_SCHEMES = ("s3", "s3a")
# A pointer object holds one short relative path; anything longer is not a pointer.
POINTER_MAX_BYTES = 4096
# A URI: ``scheme://...`` or ``file:/...``; anything else is a local path ("c:model" included).
_URI = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.-]*://|file:)")


@dataclass(frozen=True)
class ModelStore:
    """Where a model's files are read from: a pyarrow filesystem, and how to name its paths.

    Local directories are read through ``LocalFileSystem`` and object storage through
    ``S3FileSystem``, so both take the same code path. ``scheme`` is None for local paths, else the
    URI scheme MODEL_DIR was given with (``s3``/``s3a``), used in every message and in ``info``.
    """

    fs: pafs.FileSystem
    scheme: str | None = None

    @property
    def remote(self) -> bool:
        return self.scheme is not None

    def uri(self, path: str) -> str:
        """``path`` (a filesystem path: ``bucket/key`` on S3) as people write it."""
        return f"{self.scheme}://{path}" if self.remote else path

    def _store_error(self, path: str, err: OSError) -> ModelError:
        return ModelStoreError(
            f"cannot read {self.uri(path)} from the object store: {err} (check AWS_ENDPOINT_URL, "
            "AWS_REGION and the credentials in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
        )

    def info(self, path: str) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(path)
        except OSError as err:
            if self.remote:
                raise self._store_error(path, err) from err
            raise

    def is_dir(self, path: str) -> bool:
        return self.info(path).type == pafs.FileType.Directory

    def file_names(self, directory: str) -> list[str]:
        """The names of the files directly in ``directory`` (none if it does not exist)."""
        try:
            found = self.fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True))
        except OSError as err:
            if self.remote:
                raise self._store_error(directory, err) from err
            raise
        return sorted(item.base_name for item in found if item.type == pafs.FileType.File)

    def read_bytes(self, path: str) -> bytes:
        try:
            with self.fs.open_input_stream(path) as stream:
                return stream.read()
        except FileNotFoundError:
            raise
        except OSError as err:
            if self.remote:
                raise self._store_error(path, err) from err
            raise

    def read_parquet(self, directory: str, columns: list[str]) -> pa.Table:
        if not self.is_dir(directory):
            raise ModelFormatError(f"missing {self.uri(directory)}")
        try:
            return pq.read_table(directory, columns=columns, filesystem=self.fs)
        except (pa.ArrowException, OSError, KeyError) as err:
            # An I/O error from the object store is the store's (the network, the credentials);
            # anything else, a local I/O error included, is the files'.
            if self.remote and isinstance(err, OSError) and not isinstance(err, FileNotFoundError):
                raise self._store_error(directory, err) from err
            raise ModelFormatError(
                f"cannot read {self.uri(directory)} as Parquet with {columns}: {err}"
            ) from err


def display_location(location: str | os.PathLike[str]) -> str:
    """MODEL_DIR as it may be logged: a URI without user info, query or fragment."""
    text = os.fspath(location)
    if not _URI.match(text):
        return text
    parts = urlsplit(text)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def open_location(location: str | os.PathLike[str]) -> tuple[ModelStore, str]:
    """The store and the filesystem path for MODEL_DIR: a local path, ``file:``, ``s3://``,
    ``s3a://``. Credentials come from the environment (the AWS SDK's variables), never the URI."""
    text = os.fspath(location)
    if not _URI.match(text):
        return ModelStore(pafs.LocalFileSystem()), os.path.realpath(text)
    parts = urlsplit(text)
    shown = display_location(text)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
            raise ModelLocationError(f"MODEL_DIR {shown}: a file: URI names a local path only")
        return ModelStore(pafs.LocalFileSystem()), os.path.realpath(parts.path)
    if parts.scheme.lower() not in S3_SCHEMES:
        raise ModelLocationError(
            f"MODEL_DIR {shown}: unsupported scheme {parts.scheme!r}; use a local path, file:, "
            "s3:// or s3a://"
        )
    if "@" in parts.netloc or parts.query or parts.fragment:
        # Never in the URI, which is logged: the AWS SDK reads the environment and its files.
        raise ModelLocationError(
            f"MODEL_DIR {shown}: give only s3://bucket/prefix; credentials and options come from "
            "the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, "
            "AWS_ENDPOINT_URL)"
        )
    if not parts.netloc:
        raise ModelLocationError(f"MODEL_DIR {shown}: no bucket")
    path = (parts.netloc + parts.path).rstrip("/")
    try:
        fs, _ = pafs.FileSystem.from_uri(f"s3://{path}")
    except OSError as err:
        raise ModelStoreError(f"cannot open the object store for {shown}: {err}") from err
    except pa.ArrowException as err:
        raise ModelLocationError(f"MODEL_DIR {shown}: {err}") from err
    return ModelStore(fs, parts.scheme.lower()), path


def resolve_model_dir(store: ModelStore, path: str, shown: str | None = None) -> str:
    """The version directory MODEL_DIR names now, resolved once per load.

    A directory (a version, or a model copied by hand) is used as is; a file is a pointer written
    by the train job's publish (on object storage, which has no symlinks): the UTF-8 text
    ``.<name>.versions/<version>``, relative to the pointer's own folder. Local symlinks were
    resolved by ``open_location`` already. ``shown``: MODEL_DIR as configured, for the messages.
    """
    info = store.info(path)
    if info.type == pafs.FileType.Directory:
        return path
    if info.type != pafs.FileType.File:
        raise ModelNotFoundError(
            f"no model directory at {shown or store.uri(path)}: train one (make train) or set "
            "MODEL_DIR"
        )
    if info.size is not None and info.size > POINTER_MAX_BYTES:
        raise ModelFormatError(
            f"{store.uri(path)} is a {info.size}-byte file, neither a model directory nor a "
            "pointer to one"
        )
    target = _pointer_target(store, path, store.read_bytes(path)[: POINTER_MAX_BYTES + 1])
    version = posixpath.join(posixpath.dirname(path), target)
    if not store.is_dir(version):
        raise ModelNotFoundError(
            f"the pointer {store.uri(path)} names {target}, which is not at "
            f"{store.uri(version)} (removed, or not published completely)"
        )
    return version


def _pointer_target(store: ModelStore, path: str, content: bytes) -> str:
    """The relative version path a pointer holds, checked: ``.<name>.versions/<one component>``."""
    name = posixpath.basename(path)
    expected = f".{name}.versions/<version>"
    try:
        text = content.decode("utf-8").strip()
    except UnicodeDecodeError:
        text = None
    if text is None or len(content) > POINTER_MAX_BYTES:
        raise ModelFormatError(
            f"{store.uri(path)} is not a model pointer (the UTF-8 text {expected})"
        )
    prefix = f".{name}.versions/"
    version = text[len(prefix) :] if text.startswith(prefix) else ""
    if not version or ".." in text or not re.fullmatch(r"[^/\\\x00-\x1f\x7f]+", version):
        raise ModelFormatError(
            f"{store.uri(path)} holds {text[:200]!r}, not a model pointer: expected {expected}, "
            "a version directory beside it"
        )
    return text


def _read_metadata(store: ModelStore, directory: str) -> dict[str, Any]:
    """Spark's ``DefaultParamsWriter`` metadata: one JSON line in ``directory/metadata/part-*``."""
    metadata_dir = f"{directory}/metadata"
    parts = [name for name in store.file_names(metadata_dir) if name.startswith("part-")]
    if not parts:
        raise ModelFormatError(f"no metadata/part-* file in {store.uri(directory)}")
    for name in parts:
        part = f"{metadata_dir}/{name}"
        for line in store.read_bytes(part).decode("utf-8").splitlines():
            if line.strip():
                try:
                    metadata = json.loads(line)
                except ValueError as err:
                    raise ModelFormatError(
                        f"{store.uri(part)} is not JSON metadata: {err}"
                    ) from err
                if not isinstance(metadata, dict) or "class" not in metadata:
                    raise ModelFormatError(f"{store.uri(part)} has no 'class' entry")
                return metadata
    raise ModelFormatError(f"the metadata files in {store.uri(metadata_dir)} are empty")


def _params(metadata: dict[str, Any]) -> dict[str, Any]:
    """Effective parameters: Spark's defaults overlaid with the explicitly set ones."""
    return {**metadata.get("defaultParamMap", {}), **metadata.get("paramMap", {})}


def _expect_class(metadata: dict[str, Any], expected: str, where: str) -> None:
    if metadata.get("class") != expected:
        raise ModelFormatError(f"{where}: expected a {expected}, found {metadata.get('class')!r}")


def _iso_millis(millis: Any) -> str | None:
    if not isinstance(millis, int):
        return None
    return datetime.fromtimestamp(millis / 1000, tz=timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class Forest:
    """All trees flattened into parallel arrays; leaves point to themselves: walks may overshoot."""

    feature: np.ndarray  # int64, split feature of each node (0 for leaves)
    threshold: np.ndarray  # float64, split threshold (+inf for leaves: never consulted)
    left: np.ndarray  # int64, global index of the left child (itself for a leaf)
    right: np.ndarray  # int64, global index of the right child (itself for a leaf)
    value: np.ndarray  # float64, node prediction (what a leaf returns)
    roots: np.ndarray  # int64, global index of each tree's root, in tree order
    depth: int  # longest root-to-leaf path: steps a walk needs
    tree_weights: np.ndarray  # float64, as saved; Spark's predict ignores them

    @property
    def num_trees(self) -> int:
        return int(self.roots.size)

    def split_thresholds(self) -> list[np.ndarray]:
        """The sorted distinct thresholds the trees compare each feature with."""
        internal = self.left != np.arange(self.left.size)
        return [
            np.unique(self.threshold[internal & (self.feature == f)]) for f in range(len(FEATURES))
        ]

    def walk(self, x: np.ndarray) -> np.ndarray:
        """Exact Spark predictions for ``x`` (rows x features, float64) by walking every tree."""
        out = np.empty(x.shape[0], dtype=np.float64)
        for start in range(0, x.shape[0], _WALK_BLOCK_ROWS):
            block = x[start : start + _WALK_BLOCK_ROWS]
            rows = np.arange(block.shape[0])[:, None]
            node = np.broadcast_to(self.roots, (block.shape[0], self.roots.size)).copy()
            for _ in range(self.depth):
                go_left = block[rows, self.feature[node]] <= self.threshold[node]
                node = np.where(go_left, self.left[node], self.right[node])
            leaf_values = self.value[node]
            # Left-to-right over trees, as Scala's Array.sum does; np.sum would sum pairwise.
            total = leaf_values[:, 0].copy()
            for tree in range(1, self.roots.size):
                total += leaf_values[:, tree]
            out[start : start + block.shape[0]] = total / self.roots.size
        return out


@dataclass(frozen=True)
class Grid:
    """The forest tabulated on the cells its thresholds draw (see the module docstring)."""

    thresholds: tuple[np.ndarray, np.ndarray]  # sorted distinct thresholds per feature
    table: np.ndarray  # float64, (len(t0) + 1) * (len(t1) + 1) predictions, row-major
    # Plain-Python copies for the one-row path: bisect on a list beats numpy for a single value.
    _t0: list[float] = field(repr=False)
    _t1: list[float] = field(repr=False)
    _cells: list[float] = field(repr=False)

    @classmethod
    def build(cls, forest: Forest, volume_stage: VolumeStage) -> Grid:
        """Tabulate ``volume_stage.cell_values`` of the forest's output on every cell."""
        t0, t1 = forest.split_thresholds()
        # Cell i of a feature holds the x with t[i-1] < x <= t[i]: t[i] itself represents it, and
        # +inf represents the last cell (x above every threshold).
        reps0, reps1 = np.append(t0, np.inf), np.append(t1, np.inf)
        points = np.column_stack([np.repeat(reps0, reps1.size), np.tile(reps1, reps0.size)]).astype(
            np.float64
        )
        table = volume_stage.cell_values(forest.walk(points))
        return cls((t0, t1), table, t0.tolist(), t1.tolist(), table.tolist())

    @property
    def shape(self) -> tuple[int, int]:
        return (self.thresholds[0].size + 1, self.thresholds[1].size + 1)

    def predict(self, x: np.ndarray) -> np.ndarray:
        # searchsorted(side="left") counts thresholds strictly below x: exactly the cell index.
        i = np.searchsorted(self.thresholds[0], x[:, 0], side="left")
        j = np.searchsorted(self.thresholds[1], x[:, 1], side="left")
        return self.table[i * (self.thresholds[1].size + 1) + j]

    def predict_one(self, x0: float, x1: float) -> float:
        return self._cells[
            bisect_left(self._t0, x0) * (len(self._t1) + 1) + bisect_left(self._t1, x1)
        ]


@dataclass(frozen=True)
class VolumeStage:
    """The SQLTransformer after the forest: its output (in ``target`` form) as a volume.

    Split in two so the grid can tabulate the transcendental part per cell: ``cell_values`` maps
    forest outputs to what ``apply`` combines with ``vol_moving_avg`` (exp of the log ratio, the
    ratio, the volume). ``target`` None: no such stage, the forest predicts the volume (unclipped).
    """

    target: str | None

    def cell_values(self, forest_output: np.ndarray) -> np.ndarray:
        return strict_exp(forest_output) if self.target == "log_ratio" else forest_output

    def _unclipped(self, vol_moving_avg: Any, cell: Any) -> Any:
        """The statement's arithmetic, for numpy arrays or Python floats alike (IEEE doubles)."""
        if self.target == "log_ratio":
            return (vol_moving_avg + 1.0) * cell - 1.0
        if self.target == "ratio":
            return vol_moving_avg * cell
        return cell

    def apply(self, vol_moving_avg: np.ndarray, cell: np.ndarray) -> np.ndarray:
        """The statement's value, as Spark evaluates it (the same operations, in the same order)."""
        if self.target is None:
            return cell
        with np.errstate(over="ignore", invalid="ignore"):  # inf, as in Spark; clipped below
            volume = self._unclipped(vol_moving_avg, cell)
        # least(2^53, v) keeps v only below 2^53 (Spark orders NaN above everything), then
        # greatest(0.0, v) keeps v only above 0 (so -0.0 becomes 0.0, as in Spark).
        volume = np.where(volume < MAX_PREDICTED_VOLUME, volume, MAX_PREDICTED_VOLUME)
        return np.where(volume > 0.0, volume, 0.0)

    def apply_one(self, vol_moving_avg: float, cell: float) -> float:
        """``apply`` for one row with Python floats (the same IEEE double operations)."""
        if self.target is None:
            return float(cell)
        volume = self._unclipped(float(vol_moving_avg), float(cell))
        volume = volume if volume < MAX_PREDICTED_VOLUME else MAX_PREDICTED_VOLUME
        return volume if volume > 0.0 else 0.0


@dataclass(frozen=True)
class ServingModel:
    """A loaded, validated model: exact Spark predictions plus what ``/model`` reports."""

    path: str  # the version directory read (a path, or an s3:// / s3a:// URI)
    forest: Forest
    grid: Grid | None  # tabulates volume_stage.cell_values of the forest's output
    volume_stage: VolumeStage
    info: dict[str, Any]

    @property
    def evaluator(self) -> str:
        return "grid" if self.grid is not None else "walk"

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted volumes for ``x`` (n x 2: vol_moving_avg, adj_close_rolling_med), float64."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != len(FEATURES):
            raise ValueError(f"expected an (n, {len(FEATURES)}) array, got shape {x.shape}")
        # Spark's VectorAssembler (handleInvalid=error) refuses NaN; so do we.
        if np.isnan(x).any():
            raise ValueError("NaN feature values cannot be predicted")
        if self.grid is not None:
            cells = self.grid.predict(x)
        else:
            cells = self.volume_stage.cell_values(self.forest.walk(x))
        return self.volume_stage.apply(x[:, 0], cells)

    def predict_one(self, vol_moving_avg: float, adj_close_rolling_med: float) -> float:
        """One prediction, on the fast path (a few microseconds with the grid)."""
        if math.isnan(vol_moving_avg) or math.isnan(adj_close_rolling_med):
            raise ValueError("NaN feature values cannot be predicted")
        if self.grid is not None:
            cell = self.grid.predict_one(vol_moving_avg, adj_close_rolling_med)
        else:
            walked = self.forest.walk(np.array([[vol_moving_avg, adj_close_rolling_med]]))
            cell = float(self.volume_stage.cell_values(walked)[0])
        return self.volume_stage.apply_one(vol_moving_avg, cell)


def _load_forest(store: ModelStore, stage_path: str, num_trees: int, num_features: int) -> Forest:
    """Read ``data/`` (a row per node) and ``treesMetadata/``; check the trees are well formed."""
    stage_dir = store.uri(stage_path)
    meta = store.read_parquet(f"{stage_path}/treesMetadata", ["_1", "_2", "_3"]).sort_by("_1")
    tree_ids = meta.column("_1").to_numpy()
    if tree_ids.size != num_trees or not np.array_equal(tree_ids, np.arange(num_trees)):
        raise ModelFormatError(
            f"{stage_dir}/treesMetadata lists trees {tree_ids.tolist()[:10]}..., "
            f"expected 0..{num_trees - 1}"
        )
    for tree, text in zip(tree_ids, meta.column("_2").to_pylist(), strict=True):
        try:
            tree_class = json.loads(text).get("class")
        except (TypeError, ValueError, AttributeError):
            tree_class = None
        if tree_class != TREE_CLASS:
            raise ModelFormatError(
                f"tree {tree} in {stage_dir} is a {tree_class!r}, not {TREE_CLASS}"
            )

    nodes = store.read_parquet(f"{stage_path}/data", ["treeID", "nodeData"])
    try:
        node = nodes.column("nodeData").combine_chunks()
        split = node.field("split")
        threshold_list = split.field("leftCategoriesOrThreshold")
        columns = {
            "tree": nodes.column("treeID").to_numpy(),
            "id": node.field("id").to_numpy(zero_copy_only=False),
            "value": node.field("prediction").to_numpy(zero_copy_only=False),
            "left": node.field("leftChild").to_numpy(zero_copy_only=False),
            "right": node.field("rightChild").to_numpy(zero_copy_only=False),
            "feature": split.field("featureIndex").to_numpy(zero_copy_only=False),
            "categories": split.field("numCategories").to_numpy(zero_copy_only=False),
        }
        lengths = pc.list_value_length(threshold_list).to_numpy(zero_copy_only=False)
        flat = np.append(pc.list_flatten(threshold_list).to_numpy(zero_copy_only=False), np.nan)
        # The first list element of each node (NaN where the list is empty).
        starts = np.cumsum(lengths) - lengths
        columns["n_thresholds"] = lengths
        columns["threshold"] = np.where(
            lengths > 0, flat[np.minimum(starts, flat.size - 1)], np.nan
        )
    except (KeyError, pa.ArrowException) as err:
        raise ModelFormatError(
            f"{stage_dir}/data does not have Spark's tree node layout: {err}"
        ) from err

    order = np.lexsort((columns["id"], columns["tree"]))
    col = {name: values[order] for name, values in columns.items()}
    tree, node_id = col["tree"].astype(np.int64), col["id"].astype(np.int64)
    where = f"{stage_dir}/data"
    if not np.array_equal(np.unique(tree), np.arange(num_trees)):
        raise ModelFormatError(
            f"{where} holds trees {np.unique(tree)[:10]}..., expected {num_trees}"
        )
    sizes = np.bincount(tree, minlength=num_trees)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    if not np.array_equal(node_id, np.arange(tree.size) - offsets[tree]):
        raise ModelFormatError(f"{where}: node ids of some tree are not 0..n-1")

    is_leaf = (col["left"] == -1) & (col["right"] == -1)
    internal = ~is_leaf
    if np.any(internal & ((col["left"] < 0) | (col["right"] < 0))):
        raise ModelFormatError(f"{where}: a node has exactly one child")
    if np.any(internal & (col["categories"] != -1)):
        bad = int(np.flatnonzero(internal & (col["categories"] != -1))[0])
        raise ModelFormatError(
            f"{where}: tree {tree[bad]} node {node_id[bad]} splits on a categorical feature; "
            "only continuous splits are supported"
        )
    if np.any(internal & (col["n_thresholds"] != 1)):
        raise ModelFormatError(f"{where}: a continuous split without exactly one threshold")
    if np.any(internal & ((col["feature"] < 0) | (col["feature"] >= num_features))):
        raise ModelFormatError(f"{where}: a split on a feature index outside 0..{num_features - 1}")
    if not np.all(np.isfinite(col["value"])) or np.any(internal & np.isnan(col["threshold"])):
        raise ModelFormatError(f"{where}: non-finite node predictions or NaN thresholds")

    index = np.arange(tree.size, dtype=np.int64)
    left = np.where(is_leaf, index, offsets[tree] + col["left"])
    right = np.where(is_leaf, index, offsets[tree] + col["right"])
    # A tree: children come after their parent (Spark numbers nodes in pre-order), stay inside
    # the parent's tree, and every node but the root has exactly one parent.
    ends = offsets + sizes
    for child in (left, right):
        if np.any(internal & ((child <= index) | (child >= ends[tree]))):
            raise ModelFormatError(f"{where}: a child id points outside its tree or backwards")
    parents = np.bincount(np.concatenate([left[internal], right[internal]]), minlength=tree.size)
    if not np.array_equal(parents, np.where(node_id == 0, 0, 1)):
        raise ModelFormatError(f"{where}: the nodes of some tree do not form a single tree")

    depth = np.zeros(tree.size, dtype=np.int64)
    for parent in np.flatnonzero(internal):  # ascending: parents are final before their children
        depth[left[parent]] = depth[right[parent]] = depth[parent] + 1

    return Forest(
        feature=np.where(is_leaf, 0, col["feature"]).astype(np.int64),
        threshold=np.where(is_leaf, np.inf, col["threshold"]).astype(np.float64),
        left=left,
        right=right,
        value=col["value"].astype(np.float64),
        roots=offsets.astype(np.int64),
        depth=int(depth.max()),
        tree_weights=meta.column("_3").to_numpy().astype(np.float64),
    )


def _stage_dirs(store: ModelStore, path: str, stage_uids: list[str]) -> list[str]:
    """``stages/<index>_<uid>``, as Spark's ``PipelineModel`` writer names them."""
    dirs = [f"{path}/stages/{index}_{uid}" for index, uid in enumerate(stage_uids)]
    for directory in dirs:
        if not store.is_dir(directory):
            raise ModelFormatError(
                f"the pipeline metadata names a stage missing in the model: {store.uri(directory)}"
            )
    return dirs


def load_model(
    location: str | os.PathLike[str], max_grid_cells: int = DEFAULT_MAX_GRID_CELLS
) -> ServingModel:
    """Read and validate the PipelineModel at ``location``; ``ModelError`` if unusable.

    ``location`` is a local path or an ``s3://``/``s3a://`` URI (``open_location``). It is resolved
    once (a symlink, or a pointer file on object storage: ``resolve_model_dir``): the train job may
    publish a new version while we read, and every file must come from the same version (it keeps
    the previous version for such readers).
    """
    store, path = open_location(location)
    shown = display_location(location)
    resolved = resolve_model_dir(store, path, shown)
    try:
        model = _load(store, resolved, max_grid_cells)
    except ModelError:
        raise
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        # Anything else unexpected in the files: still a refusal that names the directory.
        raise ModelFormatError(f"cannot read the model in {store.uri(resolved)}: {err!r}") from err
    model.info["model_dir"] = shown
    return model


def _load(store: ModelStore, path: str, max_grid_cells: int) -> ServingModel:
    where = store.uri(path)
    pipeline = _read_metadata(store, path)
    _expect_class(pipeline, PIPELINE_CLASS, f"{where}/metadata")
    stage_uids = _params(pipeline).get("stageUids")
    if not isinstance(stage_uids, list) or len(stage_uids) not in (2, 3):
        raise ModelFormatError(
            f"{where}: expected the stages VectorAssembler, RandomForestRegressionModel and "
            f"SQLTransformer (or the first two), found {stage_uids!r}"
        )
    assembler_path, forest_path, *volume_paths = _stage_dirs(store, path, stage_uids)
    assembler_dir, forest_dir = store.uri(assembler_path), store.uri(forest_path)

    assembler = _read_metadata(store, assembler_path)
    _expect_class(assembler, ASSEMBLER_CLASS, assembler_dir)
    assembler_params = _params(assembler)
    if list(assembler_params.get("inputCols", [])) != list(FEATURES):
        raise ModelFormatError(
            f"{assembler_dir}: the features must be {list(FEATURES)} in this order, "
            f"found {assembler_params.get('inputCols')!r}"
        )

    forest_meta = _read_metadata(store, forest_path)
    _expect_class(forest_meta, FOREST_CLASS, forest_dir)
    forest_params = _params(forest_meta)
    if forest_params.get("featuresCol", "features") != assembler_params.get("outputCol"):
        raise ModelFormatError(
            f"{forest_dir}: the forest reads column {forest_params.get('featuresCol')!r}, "
            f"the assembler writes {assembler_params.get('outputCol')!r}"
        )
    num_features, num_trees = forest_meta.get("numFeatures"), forest_meta.get("numTrees")
    if num_features != len(FEATURES):
        raise ModelFormatError(f"{forest_dir}: numFeatures is {num_features!r}, expected 2")
    if not isinstance(num_trees, int) or num_trees < 1:
        raise ModelFormatError(f"{forest_dir}: numTrees is {num_trees!r}")
    volume_metas = [_read_metadata(store, directory) for directory in volume_paths]
    volume_stage = _volume_stage(
        [store.uri(directory) for directory in volume_paths],
        volume_metas,
        forest_params.get("predictionCol", PREDICTION),
    )

    forest = _load_forest(store, forest_path, num_trees, num_features)
    cells = math.prod(thresholds.size + 1 for thresholds in forest.split_thresholds())
    grid = Grid.build(forest, volume_stage) if cells <= max_grid_cells else None

    info: dict[str, Any] = {
        "model_dir": where,
        "resolved_dir": where,
        "loaded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "trained_at": _iso_millis(pipeline.get("timestamp")),
        "spark_version": pipeline.get("sparkVersion"),
        "pipeline_uid": pipeline.get("uid"),
        "features": list(FEATURES),
        "label": forest_params.get("labelCol"),
        "stages": [
            {"class": meta["class"], "uid": meta.get("uid"), "params": _params(meta)}
            for meta in (assembler, forest_meta, *volume_metas)
        ],
        "target": volume_stage.target,
        "prediction": "the predicted volume"
        + ("" if volume_stage.target is None else ", clipped to [0, 2^53]"),
        "forest": {
            "num_trees": forest.num_trees,
            "num_nodes": int(forest.value.size),
            "depth": forest.depth,
            "evaluator": "grid" if grid is not None else "walk",
            "grid_cells": cells,
        },
        **_read_metrics(store, path),
    }
    return ServingModel(path=where, forest=forest, grid=grid, volume_stage=volume_stage, info=info)


def _volume_stage(
    directories: list[str], metadata: list[dict[str, Any]], forest_output: str
) -> VolumeStage:
    """The stage after the forest: none (the forest predicts the volume) or a known statement."""
    if not directories:
        return VolumeStage(target=None)
    directory, meta = directories[0], metadata[0]
    _expect_class(meta, SQL_CLASS, directory)
    statement = _params(meta).get("statement")
    target = next((t for t, known in VOLUME_STATEMENTS.items() if known == statement), None)
    if target is None:
        raise ModelFormatError(
            f"{directory}: unknown SQLTransformer statement {statement!r}; this server evaluates "
            "only the statements the train job writes (serving.forest.VOLUME_STATEMENTS)"
        )
    if forest_output != FOREST_PREDICTION:
        raise ModelFormatError(
            f"the forest writes {forest_output!r} but {directory}'s statement reads "
            f"{FOREST_PREDICTION!r}"
        )
    return VolumeStage(target=target)


def _read_metrics(store: ModelStore, path: str) -> dict[str, Any]:
    """``metrics.json`` as the train job wrote it, plus where the training data came from.

    The file is optional: a model without it is still served, and ``/model`` says why it is absent.
    """
    metrics_path = store.uri(f"{path}/{METRICS_FILE}")
    try:
        metrics = json.loads(store.read_bytes(f"{path}/{METRICS_FILE}").decode("utf-8"))
    except FileNotFoundError:
        return _no_metrics(f"{metrics_path} not found")
    except (OSError, ValueError) as err:
        return _no_metrics(f"{metrics_path} is not readable JSON: {err}")
    if not isinstance(metrics, dict):
        return _no_metrics(f"{metrics_path} is not a JSON object")
    return {"metrics": metrics, "metrics_error": None, "training_data": _training_data(metrics)}


def _no_metrics(reason: str) -> dict[str, Any]:
    return {"metrics": None, "metrics_error": reason, "training_data": None}


def _training_data(metrics: dict[str, Any]) -> dict[str, Any]:
    """When and on which table version the model was trained (the train job's ``lineage`` block)."""
    lineage = metrics.get("lineage") if isinstance(metrics.get("lineage"), dict) else {}
    return {
        "finished_at": metrics.get("finished_at"),
        "features_path": lineage.get("features_path"),
        "format": lineage.get("format"),
        "delta_version": lineage.get("delta_version"),
        "spark_version": lineage.get("spark_version"),
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m serving.forest DIR``: check a model (a directory, a pointer, an s3:// or s3a://
    URI) before pointing a server at it."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument(
        "model_dir",
        help="a PipelineModel directory, a symlink or pointer to one, or an s3:// or s3a:// URI",
    )
    args = parser.parse_args(argv)
    try:
        model = load_model(args.model_dir)
    except ModelError as err:
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        return 1
    summary = {key: model.info[key] for key in ("resolved_dir", "trained_at", "forest")}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
