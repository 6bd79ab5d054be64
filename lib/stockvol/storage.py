"""Reading and atomically replacing lake tables, in Delta (default) or Parquet."""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from py4j.protocol import Py4JJavaError
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.pandas.types import to_arrow_schema
from pyspark.sql.types import StructType

from stockvol.cli import PipelineError
from stockvol.config import STORAGE_FORMATS
from stockvol.location import (
    Location,
    current_version,
    is_published,
    new_version,
    publish_version,
    resolve,
    versions_dir,
)
from stockvol.schema import DATE, SYMBOL
from stockvol.spark import session_conf

# The columns Delta keeps file statistics on, for data skipping (when the table has them).
STATS_COLUMNS = (SYMBOL, DATE)
_STATS_PROPERTY = "delta.dataSkippingStatsColumns"


log = logging.getLogger("stockvol")


class TableNotFoundError(FileNotFoundError):
    """A lake table the job needs has not been written yet."""


class ConcurrentWriteError(PipelineError):
    """Another writer committed to a Delta table while this job was writing it: nothing was
    committed by this job, which can simply be rerun."""


# Delta's conflict exceptions (ConcurrentAppendException, ConcurrentDeleteReadException, ...,
# MetadataChangedException, ProtocolChangedException): another writer committed first.
_CONFLICT = re.compile(
    r"\b(Concurrent\w+Exception|MetadataChangedException|ProtocolChangedException)\b"
)


def _conflict(err: Exception) -> str | None:
    """The name of Delta's conflict exception that ``err`` is, or None. It reaches Python as a
    py4j error whose text names the Java class, or, once the ``delta`` package has been imported
    (it registers its exception types with PySpark), as ``delta.exceptions.<that class>`` whose
    text does not."""
    for text in (type(err).__name__, str(err)):
        found = _CONFLICT.search(text)
        if found:
            return found.group(1)
    return None


@contextmanager
def _conflicts_as_one_line(path: Location) -> Iterator[None]:
    """Turn Delta's conflict exception (a py4j traceback) into a ``ConcurrentWriteError`` that
    says what happened and what to do; any other error passes through unchanged."""
    try:
        yield
    except Exception as err:  # py4j's or PySpark's wrapper of the JVM exception
        name = _conflict(err)
        if name is None:
            raise
        raise ConcurrentWriteError(_another_writer(path, name)) from None


def _another_writer(path: Location, what: str) -> str:
    """The one line a job dies with when another writer committed to its Delta table."""
    return (
        f"{path}: another run committed to this table while this job wrote it ({what}); "
        "this job committed nothing to it. Delta allows one writer per table at a time: "
        "wait for the other run to finish, then rerun"
    )


def _check_format(storage_format: str) -> None:
    if storage_format not in STORAGE_FORMATS:
        raise ValueError(f"storage format must be one of {STORAGE_FORMATS}, got {storage_format!r}")


# A Parquet write's tasks write beside its version, in `<version>.tasks` (retention knows it too).
TASKS_SUFFIX = ".tasks"
# A Parquet version's commit metadata (``publish``): Spark's and pyarrow's Parquet readers skip
# names that start with an underscore.
COMMIT_METADATA_FILE = "_commit_metadata.json"
_USER_METADATA = "spark.databricks.delta.commitInfo.userMetadata"
TablePath = Location | Path | str


def write_table(df: DataFrame, path: TablePath, storage_format: str) -> None:
    """Replace the table at ``path`` so that a reader sees the old table or the new one, never half.

    Delta: an overwrite commit (column mapping on, so names with spaces are allowed; statistics
    on ``STATS_COLUMNS`` only); the previous version stays in the log until VACUUM. Parquet: the
    data goes to a fresh version directory and ``path``, a symlink (local disk) or a pointer
    object (object storage), moves to it last (``location.publish_version``), so a job killed at
    any moment leaves the previous table readable.
    """
    _check_format(storage_format)
    path = Location.parse(path)
    path.parent.mkdir()
    if storage_format == "delta":
        if current_version(path) is not None:  # the table was Parquet: its link goes first
            path.delete()
        properties = _table_properties(df.columns)
        existed = table_exists(path, "delta")
        with _conflicts_as_one_line(path):
            complete = not existed or _set_properties(df.sparkSession, path, properties)
            writer = df.write.format("delta").mode("overwrite").option("overwriteSchema", "true")
            writer.options(**properties).save(str(path))
            if not complete:  # the new columns exist now
                _set_properties(df.sparkSession, path, properties)
        return
    version = new_version(path)
    df.write.parquet(str(version))
    publish_version(path, version)


@dataclass(frozen=True)
class TableWrite:
    """A new version of a table that a job's tasks write as Parquet files with pyarrow, and that
    ``publish`` then makes the table: where the files go, how they are named, which columns they
    carry. Made by ``prepare_write`` on the driver; tasks receive it pickled."""

    path: Location  # the table
    storage_format: str
    schema: StructType  # the table's columns (logical names)
    directory: Location  # where the tasks write the files (Parquet: beside the version, not in it)
    prefix: str  # every file of this write is named ``prefix`` + a fresh id + ``.parquet``
    file_schema: pa.Schema  # the files' columns: a Delta table's physical names, in schema order
    in_place: bool  # Delta: the files are committed where they are (else Spark copies them)
    read_version: int | None = None  # Delta in place: the version the write was planned on

    def __post_init__(self) -> None:
        for name in ("path", "directory"):  # a plain path (tests, scripts) becomes a Location
            object.__setattr__(self, name, Location.parse(getattr(self, name)))

    def new_file(self) -> str:
        """A fresh file name: a retried task never writes over a file another attempt
        reported; ``publish`` keeps only the files that successful tasks returned."""
        return str(self.directory / f"{self.prefix}{uuid.uuid4().hex}.parquet")


def prepare_write(
    spark: SparkSession, path: TablePath, schema: StructType, storage_format: str
) -> TableWrite:
    """Get the table at ``path`` ready for a write of ``schema`` by tasks (see ``TableWrite``).

    Parquet: the files go to a staging directory beside a fresh version directory, which
    ``publish`` fills with the reported files only. Delta: into the table's own directory,
    named with the table's physical column names (column mapping), so ``publish`` commits them
    where they are. A Delta table that does not exist yet is created empty first. The files are
    staged aside and copied by Spark's public Delta writer instead when the table's columns
    differ, when Delta's internal API is not the one ``_commit_files`` was written for, or when
    the table uses a feature that commit would bypass (``_in_place_refusal``): all checked here,
    before any task runs.
    """
    _check_format(storage_format)
    # Absolute (Location makes it so), as Spark's own writers make a path on the driver:
    # executors run elsewhere (a standalone worker's current directory is its work directory).
    path = Location.parse(path)
    path.parent.mkdir()
    arrow = to_arrow_schema(schema)
    staged = TableWrite(path, storage_format, schema, new_version(path), "part-", arrow, False)
    if storage_format == "parquet":
        return replace(staged, directory=_tasks_dir(staged.directory))
    if not table_exists(path, "delta"):
        write_table(spark.createDataFrame([], schema), path, "delta")  # sets the properties
    fields = json.loads(_delta_log(spark, path).startTransaction().metadata().schemaString())
    if [(f["name"], f["type"]) for f in fields["fields"]] != _logical_columns(schema):
        return staged  # write_table (in publish) changes the columns and properties together
    with _conflicts_as_one_line(path):
        _set_properties(spark, path, _table_properties(schema.names))
    transaction = _delta_log(spark, path).startTransaction()
    refusal = _in_place_refusal(spark, transaction.snapshot())
    if refusal:
        log.warning("%s: written through Spark's Delta writer: %s", path, refusal)
        return staged
    physical = [
        field.with_name(_physical_name(column)).with_metadata(_field_id(column))
        for field, column in zip(arrow, fields["fields"], strict=True)
    ]
    prefix = f"part-{uuid.uuid4().hex[:12]}-"
    version = int(transaction.readVersion())
    return TableWrite(path, "delta", schema, path, prefix, pa.schema(physical), True, version)


# The internal Delta API _commit_files and table_files call, as delta-spark 4.4 (pinned in
# spark-defaults.conf) has it: class -> the signatures used. Another version may differ.
DELTA = "org.apache.spark.sql.delta"
DELTA_API = {
    f"{DELTA}.DeltaLog": (
        f"public static {DELTA}.DeltaLog {DELTA}.DeltaLog.forTable("
        "org.apache.spark.sql.SparkSession,java.lang.String)",
        f"public {DELTA}.OptimisticTransaction {DELTA}.DeltaLog.startTransaction()",
        f"public {DELTA}.Snapshot {DELTA}.DeltaLog.getSnapshotAt("
        "long,scala.Option,scala.Option,boolean)",
    ),
    f"{DELTA}.OptimisticTransaction": (
        f"public scala.collection.immutable.Seq {DELTA}.OptimisticTransaction.filterFiles()",
        f"public long {DELTA}.OptimisticTransaction.commit("
        f"scala.collection.immutable.Seq,{DELTA}.DeltaOperations$Operation)",
    ),
    f"{DELTA}.DeltaOperations$Write": (  # the constructor: SaveMode and 8 options
        f"public {DELTA}.DeltaOperations$Write(org.apache.spark.sql.SaveMode"
        + ",scala.Option" * 8
        + ")",
    ),
    f"{DELTA}.actions.Action": (
        f"public static {DELTA}.actions.Action {DELTA}.actions.Action.fromJson(java.lang.String)",
    ),
    f"{DELTA}.actions.AddFile": (
        f"public {DELTA}.actions.RemoveFile {DELTA}.actions.AddFile.remove()",
    ),
}
# Table features an in-place commit keeps: column mapping (the files carry the physical names);
# append-only and invariants, which a fresh table lists, are refused below when in use.
IN_PLACE_WRITER_FEATURES = {"columnMapping", "appendOnly", "invariants"}
IN_PLACE_READER_FEATURES = {"columnMapping"}
# Table properties that make a plain add/remove commit wrong (or that Delta would refuse).
_REFUSED_PROPERTIES = ("delta.appendOnly", "delta.enableChangeDataFeed", "delta.enableRowTracking")
# Column metadata that Delta enforces or fills only on its own write path.
_REFUSED_COLUMN_METADATA = ("delta.invariants", "delta.generationExpression", "delta.identity.")


# What _delta_api_mismatch found, per JVM and pinned API: it lists every method of each class
# through py4j, a quarter to half a second, and a JVM's classes do not change.
_API_CHECKS: dict[tuple, str | None] = {}


def _delta_api_mismatch(spark: SparkSession) -> str | None:
    """The first pinned signature (``DELTA_API``) the running Delta lacks, or None."""
    key = (id(spark._jvm), tuple(DELTA_API.items()))
    if key not in _API_CHECKS:
        _API_CHECKS[key] = _find_api_mismatch(spark)
    return _API_CHECKS[key]


def _find_api_mismatch(spark: SparkSession) -> str | None:
    reflection = spark._jvm.py4j.reflection.ReflectionUtil
    for name, signatures in DELTA_API.items():
        try:
            cls = reflection.classForName(name)
        except Py4JJavaError:
            return f"no class {name}"
        members = {m.toString() for m in (*cls.getMethods(), *cls.getConstructors())}
        missing = [signature for signature in signatures if signature not in members]
        if missing:
            return f"{name} has no {missing[0]}"
    return None


def _in_place_refusal(spark: SparkSession, snapshot) -> str | None:  # noqa: ANN001 (py4j)
    """Why the files cannot be committed where they are (None: they can): Delta's internal API
    differs from the pinned one, or the table has a feature, constraint or property that Delta
    enforces on its own write path, which that commit would bypass."""
    mismatch = _delta_api_mismatch(spark)
    if mismatch:
        return f"Delta's internal API differs from the pinned one ({mismatch})"
    protocol = json.loads(snapshot.protocol().json())["protocol"]
    if protocol.get("minReaderVersion", 1) > 3 or protocol.get("minWriterVersion", 1) > 7:
        return f"table protocol {protocol} is newer than this code"
    unknown = (set(protocol.get("writerFeatures", [])) - IN_PLACE_WRITER_FEATURES) | (
        set(protocol.get("readerFeatures", [])) - IN_PLACE_READER_FEATURES
    )
    if unknown:
        return f"table features {sorted(unknown)}"
    metadata = snapshot.metadata()
    to_java = spark._jvm.scala.jdk.javaapi.CollectionConverters
    properties = dict(to_java.asJava(metadata.configuration()))
    for key, value in properties.items():
        if key.startswith("delta.constraints.") or (
            key in _REFUSED_PROPERTIES and value.lower() == "true"
        ):
            return f"table property {key} = {value}"
    for column in json.loads(metadata.schemaString())["fields"]:
        if any(key.startswith(_REFUSED_COLUMN_METADATA) for key in column["metadata"]):
            return f"column {column['name']!r} has {sorted(column['metadata'])}"
    return None


def _tasks_dir(version: Location) -> Location:
    """Where the tasks of a Parquet write put their files: beside the version directory, so a
    task attempt that finishes after ``publish`` (speculative, or orphaned by a lost executor)
    writes outside the live table."""
    return version.parent / f"{version.name}{TASKS_SUFFIX}"


def publish(
    spark: SparkSession, target: TableWrite, files: list[str], metadata: dict | None = None
) -> int:
    """Make the Parquet ``files`` that tasks wrote for ``target`` the table, as atomically as
    ``write_table``; the rows the table now holds. Other files of this write (left by failed
    task attempts) are deleted. Parquet: the directory becomes the table, nothing is copied.
    Delta in place: one overwrite commit adds the files as they are. Delta staged: Spark copies
    the rows in one commit. ``metadata`` (JSON-able) is recorded with the new version, readable
    with ``commit_metadata``: in the Delta commit's ``userMetadata``, or in the Parquet version's
    ``COMMIT_METADATA_FILE``, written before the version is published.

    The rows returned are counted from the published files themselves (their Parquet footers,
    which the Delta commit's statistics also come from), not from what the tasks reported, so a
    caller can check them against its own count without scanning the table again (a Delta count
    right after the commit cost 1 to 2 s per table, mostly rebuilding the new snapshot).
    """
    listed = {PurePosixPath(f).name for f in files}
    target.directory.mkdir()
    for name in target.directory.child_names():
        if name.startswith(target.prefix) and name.endswith(".parquet") and name not in listed:
            (target.directory / name).delete()
    if target.in_place:
        paths = [target.directory / name for name in sorted(listed)]
        try:
            with _user_metadata(spark, metadata):
                rows = _commit_files(spark, target, paths)
        except Exception:  # not committed: the files are nobody's
            _each(Location.delete, paths)
            raise
        return rows
    if target.storage_format == "delta":
        reader = spark.read.schema(target.schema)
        copied = reader.parquet(*files) if files else spark.createDataFrame([], target.schema)
        with _user_metadata(spark, metadata):
            write_table(copied, target.path, "delta")
        target.directory.delete()  # the staged files, copied into the table
        return read_table(spark, target.path, "delta").count()
    # Parquet: the reported files move into the version directory, which becomes the table.
    version = target.directory.parent / target.directory.name.removesuffix(TASKS_SUFFIX)
    version.mkdir()
    _each(lambda name: (target.directory / name).move_to(version / name), sorted(listed))
    rows = sum(_footer(version / name).num_rows for name in listed)
    if not files:  # an empty table still has its schema
        filesystem, inner = (version / "part-empty.parquet").arrow
        pq.write_table(target.file_schema.empty_table(), inner, filesystem=filesystem)
    if metadata is not None:
        (version / COMMIT_METADATA_FILE).write_text(json.dumps(metadata))
    publish_version(target.path, version)
    target.directory.delete()  # the tasks' directory: failed attempts' files only
    return rows


def _user_metadata(spark: SparkSession, metadata: dict | None) -> AbstractContextManager:
    """Delta commits made inside get ``metadata`` as their commitInfo ``userMetadata``: set in
    the session conf, which both Delta's transaction API (the in-place commit) and its public
    writer (the staged fallback) read, and restored after, so other commits get none."""
    if metadata is None:
        return nullcontext()
    return session_conf(spark, {_USER_METADATA: json.dumps(metadata)})


def _each(action, items: list) -> None:  # noqa: ANN001 (any one-argument function)
    """Apply ``action`` to every item, 16 at a time: on object storage each one is a request
    (a move is a copy and a delete), and their latency, not bandwidth, is what they cost."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(action, items))


def _footer(file: Location) -> pq.FileMetaData:
    """A Parquet file's footer (row counts, schema, statistics), read without its data."""
    filesystem, inner = file.arrow
    return pq.read_metadata(inner, filesystem=filesystem)


# A written Parquet row group holds about this many rows: big enough for fast scans, small
# enough that a task's Python worker holds little before writing.
ROW_GROUP_ROWS = 1 << 20
# A written file holds about this many rows (whole row groups): the features job holds one file
# per task in memory, about 0.6 GB for 2M rows of prices.
FILE_ROWS = 1 << 21


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The columns worth dictionary-encoding: the strings (few distinct symbols, names, dates).
    Prices and volumes are nearly all distinct: pyarrow's default tries a dictionary on them
    too and falls back to plain, which cost a third of the write's CPU for slightly larger files
    (docs/ingest.md)."""
    return [field.name for field in schema if pa.types.is_string(field.type)]


class FileWriter:
    """One task's rows of one ``TableWrite``, written as Parquet files with pyarrow.

    Rows are buffered until a row group's worth, so the tables given to ``add`` stay together in
    one row group and one file when they fit (ingest gives whole CSV files: a symbol's rows stay
    together for the features job, which holds one file in memory per task). A new file starts
    between row groups once a file holds ``rows_per_file`` rows; a file holds at most
    ``max_rows_per_file`` rows when that is set (Spark's ``spark.sql.files.maxRecordsPerFile``,
    honoured as Spark's own writers do: that limit may cut a table given to ``add``).
    """

    def __init__(
        self, target: TableWrite, max_rows_per_file: int = 0, rows_per_file: int = FILE_ROWS
    ) -> None:
        self.target = target
        self.max_rows = max_rows_per_file
        self.rows_per_file = rows_per_file
        limits = [ROW_GROUP_ROWS, rows_per_file, *([self.max_rows] if self.max_rows else [])]
        self.flush_rows = min(limits)
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.files: list[tuple[str, int]] = []  # (path, rows) of every file written, in order
        self.writer: pq.ParquetWriter | None = None

    def add(self, table: pa.Table) -> None:
        """Rows with the table's logical columns (``TableWrite.schema``)."""
        if len(table):
            self.pending.append(table)
            self.pending_rows += len(table)
        if self.pending_rows >= self.flush_rows:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        table = pa.concat_tables(self.pending)
        self.pending, self.pending_rows = [], 0
        # Same columns, the file's names (a Delta table's physical names).
        table = pa.Table.from_arrays(table.columns, schema=self.target.file_schema)
        offset = 0
        while offset < len(table):
            written = self.files[-1][1] if self.files else 0
            full = (offset == 0 and written >= self.rows_per_file) or (
                self.max_rows and written >= self.max_rows
            )
            if self.writer is None or full:
                self._next_file()
            room = len(table) - offset
            if self.max_rows:
                room = min(room, self.max_rows - self.files[-1][1])
            self.writer.write_table(table.slice(offset, room), row_group_size=room)
            path, rows = self.files[-1]
            self.files[-1] = (path, rows + room)
            offset += room

    def _next_file(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.target.directory.mkdir()
        path = self.target.new_file()
        schema = self.target.file_schema
        filesystem, inner = Location.parse(path).arrow
        self.writer = pq.ParquetWriter(
            inner, schema, filesystem=filesystem, use_dictionary=dictionary_columns(schema)
        )
        self.files.append((path, 0))

    def close(self) -> list[tuple[str, int]]:
        """Every file written, with its rows (none if the task had no rows for this table)."""
        self._flush()
        if self.writer is not None:
            self.writer.close()
        return self.files


def _commit_files(spark: SparkSession, target: TableWrite, files: list[Location]) -> int:
    """One Delta commit that replaces every file of the table with ``files``; their rows.

    Delta has no public API that commits files another writer made, so this uses the
    transaction API delta-spark itself is built on (``DeltaLog.startTransaction`` and
    ``OptimisticTransaction.commit``, pinned by the delta-spark version in
    spark-defaults.conf): removes come from Delta's own ``AddFile.remove``, adds from JSON in
    the protocol's ``add`` format with statistics read from each file's Parquet footer.
    ``prepare_write`` checked that API and the table's features before the tasks ran.

    A Delta write plans and commits in one transaction; here the tasks run in between, so any
    commit since ``prepare_write`` (its ``read_version``) is a ``ConcurrentWriteError``, as is
    one that Delta's own conflict check finds in the last moment.
    """
    jvm = spark._jvm
    transaction = _delta_log(spark, target.path).startTransaction()
    fields = json.loads(transaction.metadata().schemaString())["fields"]
    if int(transaction.readVersion()) != target.read_version:
        # A Delta write plans and commits in one transaction; here the tasks ran in between.
        changed = [_physical_name(f) for f in fields] != target.file_schema.names
        what = f"version {transaction.readVersion()}, planned on {target.read_version}"
        raise ConcurrentWriteError(
            _another_writer(target.path, what + (", other columns" if changed else ""))
        )
    to_scala = jvm.scala.jdk.javaapi.CollectionConverters
    actions = jvm.java.util.ArrayList()
    current = to_scala.asJava(transaction.filterFiles())
    for i in range(current.size()):
        actions.add(current.get(i).remove())
    stats_columns = [_physical_name(f) for f in fields if f["name"] in STATS_COLUMNS]
    rows = 0
    for file in files:
        add = _add_action(file, target, stats_columns)
        rows += json.loads(add["add"]["stats"])["numRecords"]
        actions.add(jvm.org.apache.spark.sql.delta.actions.Action.fromJson(json.dumps(add)))
    none = jvm.scala.Option.apply(None)
    write = getattr(jvm.org.apache.spark.sql.delta, "DeltaOperations$Write")
    operation = write(jvm.org.apache.spark.sql.SaveMode.Overwrite, *[none] * 8)
    with _conflicts_as_one_line(target.path):  # a commit in the last moment: Delta's own check
        transaction.commit(to_scala.asScala(actions).toSeq(), operation)
    return rows


def _add_action(file: Location, target: TableWrite, stats_columns: list[str]) -> dict:
    """The Delta ``add`` action of one written file, after checking its columns."""
    metadata = _footer(file)
    written = metadata.schema.to_arrow_schema()
    if written.names != target.file_schema.names or written.types != target.file_schema.types:
        raise RuntimeError(f"{file}: columns {written} are not the table's {target.file_schema}")
    stats: dict = {"numRecords": metadata.num_rows, "minValues": {}, "maxValues": {}}
    stats["nullCount"] = {}
    for name in stats_columns:
        column = written.names.index(name)
        chunks = [
            metadata.row_group(i).column(column).statistics for i in range(metadata.num_row_groups)
        ]
        if any(chunk is None for chunk in chunks):
            continue  # no statistics: Delta then reads the file for every filter
        stats["nullCount"][name] = sum(chunk.null_count for chunk in chunks)
        bounded = [chunk for chunk in chunks if chunk.has_min_max]
        if bounded:
            stats["minValues"][name] = min(chunk.min for chunk in bounded)
            stats["maxValues"][name] = max(chunk.max for chunk in bounded)
    status = file.info()
    return {
        "add": {
            "path": file.relative_to(target.path),
            "partitionValues": {},
            "size": status.size,
            "modificationTime": int(status.mtime.timestamp() * 1000),
            "dataChange": True,
            "stats": json.dumps(stats),
        }
    }


@dataclass(frozen=True)
class TableFiles:
    """The data files of one version of a table, readable as plain Parquet files."""

    files: list[str]  # absolute paths or URIs
    columns: dict[str, str]  # column name -> its name in the files (a Delta physical name)


def table_files(
    spark: SparkSession, path: TablePath, storage_format: str, version: int | None = None
) -> TableFiles | None:
    """The files of the table at ``path`` (Delta: at ``version``, else the latest), or None when
    they do not hold the table's rows as they are: a Delta table with deletion vectors (rows
    deleted outside the files) or partition columns (values outside the files)."""
    path = Location.parse(path)  # absolute: the files are opened by executors
    if storage_format == "parquet":
        current = resolve(path)
        names = [name for name in current.child_names() if name.endswith(".parquet")]
        schema = spark.read.parquet(str(current)).schema
        return TableFiles([str(current / name) for name in names], {n: n for n in schema.names})
    version = delta_version(spark, path) if version is None else version
    none = spark._jvm.scala.Option.apply(None)
    snapshot = _delta_log(spark, path).getSnapshotAt(version, none, none, False)
    metadata = snapshot.metadata()
    if metadata.partitionColumns().nonEmpty():
        return None
    # The add actions as JSON lines, joined in the JVM: one call, no PySpark-private constructor.
    added = spark._jvm.java.lang.String.join("\n", snapshot.allFiles().toJSON().collectAsList())
    added = [json.loads(line) for line in added.splitlines()]
    if any(add.get("deletionVector") is not None for add in added):
        return None
    files = [_absolute(path, unquote(add["path"])) for add in added]
    fields = json.loads(metadata.schemaString())["fields"]
    return TableFiles(sorted(files), {f["name"]: _physical_name(f) for f in fields})


def _absolute(table: Location, file: str) -> str:
    """A Delta ``add`` path (relative to the table, or an absolute URI) as one a reader opens."""
    return file if "://" in file or file.startswith("file:") else str(table / file)


def open_path(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and path for a path that Spark or Delta gives: local (plain or
    ``file:/...``; taken as it is, so a ``#`` in a name is no URI fragment) or ``s3a://``."""
    return Location.parse(path).arrow


def read_parquet(file: str, columns: dict[str, str]) -> pa.Table:
    """The ``columns`` of one Parquet file (``TableFiles``), under their table names."""
    filesystem, inner = open_path(file)
    table = pq.read_table(inner, columns=list(columns.values()), filesystem=filesystem)
    return table.rename_columns(list(columns))


def column_range(file: str, column: str) -> tuple[object, object] | None:
    """The least and greatest value of ``column`` in one Parquet file, from its footer's row
    group statistics (no data read); None when a row group has none (or only nulls)."""
    filesystem, inner = open_path(file)
    with filesystem.open_input_file(inner) as stream:
        metadata = pq.ParquetFile(stream).metadata
    index = metadata.schema.to_arrow_schema().get_field_index(column)
    bounds = []
    for group in range(metadata.num_row_groups):
        if metadata.row_group(group).num_rows == 0:
            continue
        statistics = metadata.row_group(group).column(index).statistics
        if statistics is None or not statistics.has_min_max:
            return None
        bounds.append((statistics.min, statistics.max))
    if not bounds:
        return None
    return min(low for low, _ in bounds), max(high for _, high in bounds)


def _delta_log(spark: SparkSession, path: Location):  # noqa: ANN202 (a py4j JavaObject)
    return spark._jvm.org.apache.spark.sql.delta.DeltaLog.forTable(spark._jsparkSession, str(path))


def _logical_columns(schema: StructType) -> list[tuple[str, str]]:
    return [(f["name"], f["type"]) for f in schema.jsonValue()["fields"]]


def _physical_name(column: dict) -> str:
    """The name a Delta column has in Parquet files: its own unless column mapping renamed it."""
    return column["metadata"].get("delta.columnMapping.physicalName", column["name"])


def _field_id(column: dict) -> dict[bytes, bytes]:
    """Parquet field id metadata, as Delta writes it for columns with a mapping id."""
    column_id = column["metadata"].get("delta.columnMapping.id")
    return {} if column_id is None else {b"PARQUET:field_id": str(column_id).encode()}


def _table_properties(columns: list[str]) -> dict[str, str]:
    """Column mapping (names with spaces), and statistics on the key columns only: Delta keeps
    min/max/null statistics of the first 32 columns by default, which doubled the JVM's CPU per
    written row on these tables (docs/benchmarks.md), and only the keys are ever filtered on."""
    properties = {"delta.columnMapping.mode": "name"}
    keys = [name for name in STATS_COLUMNS if name in columns]
    if keys:
        properties[_STATS_PROPERTY] = ",".join(f"`{name}`" for name in keys)
    return properties


def _set_properties(spark: SparkSession, path: Location, properties: dict[str, str]) -> bool:
    """Give an existing table these properties (a write's options only set them on creation);
    a table that has them already gets no extra commit. Returns False if the statistics
    property names a column the table does not have yet (it is then left for after the write).

    Reads the table's metadata from its Delta log: ``DeltaTable.detail()`` gives the same but
    took 14 s in a fresh JVM (it also sums the sizes of all files)."""
    metadata = _delta_log(spark, path).startTransaction().metadata()
    to_java = spark._jvm.scala.jdk.javaapi.CollectionConverters
    current = dict(to_java.asJava(metadata.configuration()))
    columns = {f["name"] for f in json.loads(metadata.schemaString())["fields"]}
    changed = {k: v for k, v in properties.items() if current.get(k) != v}
    keys = [name for name in STATS_COLUMNS if f"`{name}`" in changed.get(_STATS_PROPERTY, "")]
    complete = set(keys) <= columns
    if not complete:
        del changed[_STATS_PROPERTY]
    if changed:
        assignments = ", ".join(f"'{k}' = '{v}'" for k, v in changed.items())
        spark.sql(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES ({assignments})")
    return complete


def table_exists(path: TablePath, storage_format: str) -> bool:
    """True when a complete table of that format is at ``path``."""
    _check_format(storage_format)
    path = Location.parse(path)
    if storage_format == "delta":
        # A commit, not just the log directory: a first write that died leaves an empty one.
        # (Below a Parquet table's link there is no log: its versions have none.)
        return current_version(path) is None and any(
            name.endswith(".json") or ".checkpoint" in name
            for name in (path / "_delta_log").child_names()
        )
    return is_published(path)


def _require_table(path: Location, storage_format: str) -> None:
    """TableNotFoundError, saying which job writes it, unless a table is at ``path``."""
    if not table_exists(path, storage_format):
        raise TableNotFoundError(
            f"no {storage_format} table at {path}: run the job that writes it first "
            f"(ingest writes prices and rejects, features writes features)"
        )


def read_table(spark: SparkSession, path: TablePath, storage_format: str) -> DataFrame:
    """Read a lake table, or raise TableNotFoundError saying which job writes it. A Parquet
    table is read at its current version, resolved once."""
    path = Location.parse(path)
    _require_table(path, storage_format)
    return spark.read.format(storage_format).load(str(resolve(path)))


def delta_version(spark: SparkSession, path: TablePath) -> int | None:
    """The latest Delta version of the table at ``path`` (None for Parquet or no table).

    From the log's latest snapshot: ``DeltaTable.history()`` gives the same but took 5.6 s in a
    fresh JVM (it reads and sorts every commit's information)."""
    path = Location.parse(path)
    if not table_exists(path, "delta"):
        return None
    return int(_delta_log(spark, path).startTransaction().readVersion())


# One version of a table: a Delta version number, or the name of a Parquet version directory.
TableVersion = int | str


class VersionGoneError(PipelineError):
    """A table version that a reader asked for has been deleted (by retention or VACUUM)."""


def current_table_version(
    spark: SparkSession, path: TablePath, storage_format: str
) -> TableVersion:
    """The version a reader of the table at ``path`` sees now; TableNotFoundError when none."""
    path = Location.parse(path)
    _require_table(path, storage_format)
    if storage_format == "delta":
        return delta_version(spark, path)
    return current_version(path).name


def read_table_version(
    spark: SparkSession, path: TablePath, storage_format: str, version: TableVersion
) -> DataFrame:
    """One version of the table at ``path`` (Delta time travel; a Parquet version directory),
    or VersionGoneError when its files are gone. Checked here, before any Spark action, so the
    error is one line and not a missing file halfway through a scan."""
    path = Location.parse(path)
    gone = VersionGoneError(f"{path}: version {version} has been deleted (retention or VACUUM)")
    if storage_format == "parquet":
        directory = versions_dir(path) / str(version)
        if not directory.is_dir():
            raise gone
        return spark.read.parquet(str(directory))
    try:
        files = table_files(spark, path, "delta", int(version))
    except Py4JJavaError as err:
        # The log no longer reaches back to that version (retention deleted its commits).
        if "DeltaFileNotFoundException" not in str(err):
            raise
        raise gone from None
    # None: files that hold rows outside them (never written by this project): read as they are.
    if files is not None and not all(Location.parse(file).exists() for file in files.files):
        raise gone
    return spark.read.format("delta").option("versionAsOf", int(version)).load(str(path))


def commit_metadata(
    spark: SparkSession, path: TablePath, storage_format: str, version: TableVersion
) -> dict | None:
    """What ``publish`` recorded with the data of ``version`` (None: nothing recorded).

    Delta: the ``userMetadata`` of the last WRITE commit up to ``version``. Later commits that
    change no rows, such as retention's property change and VACUUM, record none of their own.
    Parquet: ``COMMIT_METADATA_FILE`` in the version directory."""
    path = Location.parse(path)
    if storage_format == "parquet":
        file = versions_dir(path) / str(version) / COMMIT_METADATA_FILE
        return json.loads(file.read_text()) if file.is_file() else None
    from delta.tables import DeltaTable

    history = DeltaTable.forPath(spark, str(path)).history()
    writes = history.where((history.version <= int(version)) & (history.operation == "WRITE"))
    last = writes.orderBy(history.version.desc()).select("userMetadata").first()
    return json.loads(last.userMetadata) if last and last.userMetadata else None
