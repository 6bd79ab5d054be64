"""Delta and Parquet tables: round trip, overwrite, names with spaces, atomic replace."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from chispa import assert_df_equality
from delta.tables import DeltaTable
from pyspark.sql import SparkSession
from pyspark.sql.pandas.types import to_arrow_schema
from pyspark.sql.types import DoubleType, LongType, StringType, StructField, StructType

from stockvol import storage
from stockvol.spark import read_spark_defaults
from stockvol.storage import (
    ConcurrentWriteError,
    FileWriter,
    TableNotFoundError,
    TableWrite,
    VersionGoneError,
    commit_metadata,
    current_table_version,
    delta_version,
    prepare_write,
    publish,
    read_parquet,
    read_table,
    read_table_version,
    table_files,
    write_table,
)

SCHEMA = StructType(
    [
        StructField("Symbol", StringType()),
        StructField("Adj Close", DoubleType()),
        StructField("Volume", LongType()),
    ]
)


@pytest.mark.parametrize("storage_format", ["delta", "parquet"])
def test_round_trip_keeps_names_with_spaces_and_types(
    spark: SparkSession, tmp_path: Path, storage_format: str
) -> None:
    df = spark.createDataFrame([("A", 1.5, 10), ("B", 2.25, 20)], SCHEMA)
    write_table(df, tmp_path / "t", storage_format)
    assert_df_equality(read_table(spark, tmp_path / "t", storage_format), df, ignore_row_order=True)


@pytest.mark.parametrize("storage_format", ["delta", "parquet"])
def test_overwrite_replaces_the_whole_table(
    spark: SparkSession, tmp_path: Path, storage_format: str
) -> None:
    first = spark.createDataFrame([("A", 1.0, 1), ("B", 2.0, 2)], SCHEMA)
    second = spark.createDataFrame([("C", 3.0, 3)], SCHEMA)
    write_table(first, tmp_path / "t", storage_format)
    write_table(second, tmp_path / "t", storage_format)
    assert_df_equality(read_table(spark, tmp_path / "t", storage_format), second)


def test_delta_overwrite_keeps_the_previous_version_in_the_log(
    spark: SparkSession, tmp_path: Path
) -> None:
    path = tmp_path / "t"
    write_table(spark.createDataFrame([("A", 1.0, 1)], SCHEMA), path, "delta")
    write_table(spark.createDataFrame([("B", 2.0, 2)], SCHEMA), path, "delta")
    assert delta_version(spark, path) == 1
    old = spark.read.format("delta").option("versionAsOf", 0).load(str(path))
    assert [r["Symbol"] for r in old.collect()] == ["A"]


def test_a_parquet_overwrite_publishes_a_new_version_and_leaves_old_ones_to_retention(
    spark: SparkSession, tmp_path: Path
) -> None:
    path = tmp_path / "t"
    for symbol in ("A", "B", "C"):
        write_table(spark.createDataFrame([(symbol, 1.0, 1)], SCHEMA), path, "parquet")
    versions = sorted((tmp_path / ".t.versions").iterdir())
    assert len(versions) == 3  # a reader of an older version can finish; retention removes them
    assert path.resolve() == versions[-1]
    assert [r["Symbol"] for r in read_table(spark, path, "parquet").collect()] == ["C"]


def test_reading_a_missing_table_names_the_job_to_run(spark: SparkSession, tmp_path: Path) -> None:
    with pytest.raises(TableNotFoundError, match="run the job that writes it"):
        read_table(spark, tmp_path / "nothing", "delta")


def test_delta_keeps_statistics_on_the_key_columns_only(
    spark: SparkSession, tmp_path: Path
) -> None:
    """A table written before (statistics on every column) gets the property once; each replace
    then keeps statistics on Symbol alone (this table has no Date)."""
    path = tmp_path / "t"
    old = spark.createDataFrame([("A", 1.0, 1)], SCHEMA).coalesce(1).write.format("delta")
    old.option("delta.columnMapping.mode", "name").save(str(path))
    for symbol in ("B", "C"):
        write_table(spark.createDataFrame([(symbol, 1.0, 1)], SCHEMA).coalesce(1), path, "delta")
    detail = spark.sql(f"DESCRIBE DETAIL delta.`{path}`").first()
    assert detail["properties"]["delta.dataSkippingStatsColumns"] == "`Symbol`"
    log = sorted((path / "_delta_log").glob("*.json"))
    assert len(log) == 4  # the old write, the property, two replaces: no commit per replace
    stats = [json.loads(a["add"]["stats"]) for a in json_lines(log[-1]) if "add" in a]
    assert len(stats) == 1 and len(stats[0]["minValues"]) == 1, stats
    first = [json.loads(a["add"]["stats"]) for a in json_lines(log[0]) if "add" in a]
    assert len(first[0]["minValues"]) == 3  # what the property saves


def json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


# --- files written by tasks with pyarrow, then published (ingest, features) ----------------------

KEYED = StructType(
    [
        StructField("Symbol", StringType()),
        StructField("Date", StringType()),
        StructField("Adj Close", DoubleType()),
        StructField("Volume", LongType()),
    ]
)
KEYED_ROWS = [
    ("MSFT", "2020-01-02", 160.5, 22_622_100),
    ("AAPL", "2019-12-31", None, 100_805_600),
    (None, "2020-01-03", 1.0, None),
    ("ZZZ-LONG-SYMBOL-NAME-OVER-32-CHARACTERS", "1999-11-18", 3.25, 0),
]


def write_with_tasks(
    spark: SparkSession, path: Path, storage_format: str, rows: list, schema: StructType = KEYED
) -> TableWrite:
    """What ingest and features do: prepare, write files with pyarrow (a retried attempt's file
    left behind too), publish the reported ones."""
    target = prepare_write(spark, path, schema, storage_format)
    records = [dict(zip(schema.names, row, strict=True)) for row in rows]
    table = pa.Table.from_pylist(records, to_arrow_schema(schema))
    reported = FileWriter(target, max_rows_per_file=3)
    reported.add(table)
    abandoned = FileWriter(target)
    abandoned.add(table)
    abandoned.close()
    published = publish(spark, target, [file for file, _ in reported.close()])
    assert published == read_table(spark, target.path, storage_format).count() == len(rows)
    return target


def logical_stats(path: Path, version: int) -> list[dict]:
    """The statistics of each file a commit added, with column names instead of physical ones."""
    actions = json_lines(path / "_delta_log" / f"{version:020d}.json")
    logs = sorted(path.glob("_delta_log/*.json"))
    metadata = [a["metaData"] for log in logs for a in json_lines(log) if "metaData" in a][-1]
    fields = json.loads(metadata["schemaString"])["fields"]
    names = {f["metadata"]["delta.columnMapping.physicalName"]: f["name"] for f in fields}
    stats = [json.loads(a["add"]["stats"]) for a in actions if "add" in a]
    return [
        {k: {names[c]: x for c, x in v.items()} if isinstance(v, dict) else v for k, v in s.items()}
        for s in stats
    ]


def test_files_committed_in_place_read_like_a_spark_write_with_the_same_statistics(
    spark: SparkSession, tmp_path: Path
) -> None:
    path = tmp_path / "t"
    target = write_with_tasks(spark, path, "delta", KEYED_ROWS)
    assert target.in_place and Path(target.directory) == path
    got = read_table(spark, path, "delta")
    expected = spark.createDataFrame(KEYED_ROWS, KEYED)
    assert_df_equality(got, expected, ignore_row_order=True, ignore_nullable=True)
    history = spark.sql(f"DESCRIBE HISTORY delta.`{path}`").first()
    assert (history["operation"], history["operationParameters"]["mode"]) == ("WRITE", "Overwrite")
    # Only the two reported files (3 rows and 1) are on disk: the abandoned attempt's is gone.
    stats = sorted(logical_stats(path, history["version"]), key=lambda s: -s["numRecords"])
    assert [s["numRecords"] for s in stats] == [3, 1]
    assert len(list(path.glob(f"{target.prefix}*"))) == 2
    # The oracle: Delta's own writer on the first file's rows gives the same statistics.
    spark_path = tmp_path / "spark"
    write_table(spark.createDataFrame(KEYED_ROWS[:3], KEYED).coalesce(1), spark_path, "delta")
    assert stats[0] == logical_stats(spark_path, 0)[0]
    # Delta cuts long strings to 32 characters in its statistics; exact bounds are also valid.
    long_symbol = KEYED_ROWS[3][0]
    assert stats[1]["minValues"]["Symbol"] == stats[1]["maxValues"]["Symbol"] == long_symbol


def test_an_in_place_commit_keeps_the_previous_version(spark: SparkSession, tmp_path: Path) -> None:
    path = tmp_path / "t"
    write_with_tasks(spark, path, "delta", KEYED_ROWS[:2])
    first = delta_version(spark, path)
    write_with_tasks(spark, path, "delta", KEYED_ROWS[2:])
    assert delta_version(spark, path) == first + 1
    old = spark.read.format("delta").option("versionAsOf", first).load(str(path))
    assert sorted(r["Symbol"] for r in old.collect()) == ["AAPL", "MSFT"]
    assert read_table(spark, path, "delta").count() == 2


@pytest.mark.parametrize("storage_format", ["delta", "parquet"])
def test_a_table_with_other_columns_is_replaced_whole(
    spark: SparkSession, tmp_path: Path, storage_format: str
) -> None:
    """Delta cannot take files with new columns in place: they are staged and copied."""
    path = tmp_path / "t"
    write_table(spark.createDataFrame([("A", 1.0, 1)], SCHEMA), path, storage_format)
    target = write_with_tasks(spark, path, storage_format, KEYED_ROWS)
    assert not target.in_place
    got = read_table(spark, path, storage_format)
    assert got.columns == KEYED.names and got.count() == len(KEYED_ROWS)
    if storage_format == "delta":  # statistics now on the new key column too
        detail = spark.sql(f"DESCRIBE DETAIL delta.`{path}`").first()
        assert detail["properties"]["delta.dataSkippingStatsColumns"] == "`Symbol`,`Date`"


def test_a_log_directory_without_commits_is_no_table(spark: SparkSession, tmp_path: Path) -> None:
    """What a first Delta write that died leaves behind: the next write creates the table."""
    path = tmp_path / "t"
    (path / "_delta_log").mkdir(parents=True)
    with pytest.raises(TableNotFoundError):
        read_table(spark, path, "delta")
    write_with_tasks(spark, path, "delta", KEYED_ROWS)
    assert read_table(spark, path, "delta").count() == len(KEYED_ROWS)


@pytest.mark.parametrize("storage_format", ["delta", "parquet"])
def test_tasks_get_absolute_paths_for_a_relative_table_path(
    spark: SparkSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, storage_format: str
) -> None:
    """Executors do not share the driver's current directory (a standalone worker runs in its
    work directory), so what they write to and read from must not be relative."""
    monkeypatch.chdir(tmp_path)
    target = write_with_tasks(spark, Path("lake/t"), storage_format, KEYED_ROWS)
    assert Path(target.directory).is_absolute() and Path(target.path) == tmp_path / "lake" / "t"
    source = table_files(spark, Path("lake/t"), storage_format)
    assert source is not None and all(Path(f).is_absolute() for f in source.files)
    assert sum(pq.read_metadata(f).num_rows for f in source.files) == len(KEYED_ROWS)


def test_table_files_open_by_plain_path_and_file_uri_even_with_a_hash(
    spark: SparkSession, tmp_path: Path
) -> None:
    """Spark lists ``file:/...`` paths, Delta gives plain ones; a ``#`` (as in ``CARR#``) is part
    of a file name there, not a URI fragment."""
    path = tmp_path / "CARR#" / "t"
    write_with_tasks(spark, path, "parquet", KEYED_ROWS)
    source = table_files(spark, path, "parquet")
    assert source is not None
    for file in source.files:
        plain = read_parquet(file, source.columns)
        assert plain.equals(read_parquet(f"file:{file}", source.columns))
    assert sum(len(read_parquet(f, source.columns)) for f in source.files) == len(KEYED_ROWS)


# --- the Delta in-place commit: its guards and its fallback to Spark's public Delta writer ------


def files_for(spark: SparkSession, path: Path, rows: list) -> tuple[TableWrite, list[str]]:
    """Prepare an in-place write of ``rows`` and write its files, as a job's tasks do."""
    target = prepare_write(spark, path, KEYED, "delta")
    writer = FileWriter(target)
    writer.add(pa.Table.from_pylist([dict(zip(KEYED.names, r, strict=True)) for r in rows],
                                    to_arrow_schema(KEYED)))  # fmt: skip
    return target, [file for file, _ in writer.close()]


@pytest.mark.parametrize(
    ("other", "message"),
    [
        (
            [KEYED_ROWS[0]],
            r"another run committed .*\(version \d+, planned on \d+\); this job committed nothing",
        ),
        ([("A", 1.0, 1)], r"planned on \d+, other columns\); this job committed nothing"),
    ],
)
def test_a_commit_by_another_job_during_the_write_is_refused(
    spark: SparkSession, tmp_path: Path, other: list, message: str
) -> None:
    """Another job replaces the table (same or other columns) while this one's tasks write:
    publishing would silently undo that commit (or mix schemas), so nothing is committed, the
    files written are removed, and the other job's table stands."""
    path = tmp_path / "t"
    write_with_tasks(spark, path, "delta", KEYED_ROWS[:2])
    target, files = files_for(spark, path, KEYED_ROWS[2:])
    assert target.in_place
    theirs = spark.createDataFrame(other, KEYED if len(other[0]) == 4 else SCHEMA)
    write_table(theirs, path, "delta")
    with pytest.raises(ConcurrentWriteError, match=message):
        publish(spark, target, files)
    assert_df_equality(read_table(spark, path, "delta"), theirs, ignore_nullable=True)
    assert not any(Path(file).exists() for file in files)


def test_a_file_with_other_columns_is_not_committed(spark: SparkSession, tmp_path: Path) -> None:
    """Each file's footer is checked against the table's physical columns before the commit."""
    path = tmp_path / "t"
    write_with_tasks(spark, path, "delta", KEYED_ROWS[:2])
    version = delta_version(spark, path)
    target, files = files_for(spark, path, KEYED_ROWS[2:])
    stray = target.new_file()
    pq.write_table(pa.table({"Symbol": ["X"], "Volume": [1]}), stray)
    with pytest.raises(RuntimeError, match="are not the table's"):
        publish(spark, target, [*files, stray])
    assert delta_version(spark, path) == version


def test_a_check_constraint_sends_the_write_through_deltas_own_writer(
    spark: SparkSession, tmp_path: Path
) -> None:
    """An in-place commit would bypass the constraint: the write falls back to Spark's Delta
    writer, which enforces it (a row of 1999 breaks it), and the table keeps its rows."""
    path = tmp_path / "t"
    write_with_tasks(spark, path, "delta", KEYED_ROWS[:2])
    spark.sql(f"ALTER TABLE delta.`{path}` ADD CONSTRAINT recent CHECK (Date > '2000-01-01')")
    target, files = files_for(spark, path, KEYED_ROWS)
    assert not target.in_place
    with pytest.raises(Exception, match="(?i)constraint"):
        publish(spark, target, files)
    assert sorted(r["Symbol"] for r in read_table(spark, path, "delta").collect()) == [
        "AAPL",
        "MSFT",
    ]


def force_deltas_public_writer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the pinned signature of Delta's internal write API differ from the jar's, as a new
    Delta release would: ``publish`` then falls back to Spark's Delta writer."""
    write = f"{storage.DELTA}.DeltaOperations$Write"
    changed = storage.DELTA_API[write][0].replace("SaveMode,", "SaveMode,scala.Option,")
    monkeypatch.setitem(storage.DELTA_API, write, (changed,))


def test_an_internal_api_that_differs_falls_back_to_deltas_own_writer(
    spark: SparkSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``prepare_write`` checks the pinned Delta signatures before any task runs; one missing
    (as after a Delta upgrade) gives the public write path and the same table."""
    path = tmp_path / "t"
    write_with_tasks(spark, path, "delta", KEYED_ROWS[:2])
    force_deltas_public_writer(monkeypatch)
    target = write_with_tasks(spark, path, "delta", KEYED_ROWS)
    assert not target.in_place
    expected = spark.createDataFrame(KEYED_ROWS, KEYED)
    assert_df_equality(
        read_table(spark, path, "delta"), expected, ignore_row_order=True, ignore_nullable=True
    )


@pytest.mark.parametrize("in_place", [True, False])
def test_publish_records_metadata_in_the_delta_commit_on_either_path(
    spark: SparkSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_place: bool
) -> None:
    """The metadata lands in the commit's userMetadata whether the files are committed in place
    or copied by Spark's Delta writer (the fallback forced as above), and only there: the
    session conf is restored, so the next commit records none."""
    path = tmp_path / "t"
    write_with_tasks(spark, path, "delta", KEYED_ROWS[:2])
    if not in_place:
        force_deltas_public_writer(monkeypatch)
    target, files = files_for(spark, path, KEYED_ROWS)
    assert target.in_place == in_place
    publish(spark, target, files, {"run": 7})
    version = delta_version(spark, path)
    last = DeltaTable.forPath(spark, str(path)).history(1).first()
    assert (last["version"], json.loads(last["userMetadata"])) == (version, {"run": 7})
    assert commit_metadata(spark, path, "delta", version) == {"run": 7}
    assert spark.conf.get(storage._USER_METADATA, None) is None
    write_table(spark.createDataFrame(KEYED_ROWS[:1], KEYED), path, "delta")
    assert DeltaTable.forPath(spark, str(path)).history(1).first()["userMetadata"] is None
    assert commit_metadata(spark, path, "delta", version + 1) is None


def test_publish_records_metadata_in_a_parquet_version_that_readers_skip(
    spark: SparkSession, tmp_path: Path
) -> None:
    """A Parquet version keeps the metadata in a file that Spark and pyarrow do not read as
    data; the version read by name holds the published rows."""
    path = tmp_path / "t"
    target = prepare_write(spark, path, KEYED, "parquet")
    writer = FileWriter(target)
    writer.add(pa.Table.from_pylist([dict(zip(KEYED.names, r, strict=True)) for r in KEYED_ROWS],
                                    to_arrow_schema(KEYED)))  # fmt: skip
    publish(spark, target, [file for file, _ in writer.close()], {"run": 7})
    version = current_table_version(spark, path, "parquet")
    assert version == path.resolve().name
    assert commit_metadata(spark, path, "parquet", version) == {"run": 7}
    expected = spark.createDataFrame(KEYED_ROWS, KEYED)
    by_name = read_table_version(spark, path, "parquet", version)
    for df in (read_table(spark, path, "parquet"), by_name):
        assert_df_equality(df, expected, ignore_row_order=True, ignore_nullable=True)
    assert pq.read_table(path.resolve()).num_rows == len(KEYED_ROWS)


def test_a_delta_version_whose_log_is_gone_is_a_one_line_error(
    spark: SparkSession, tmp_path: Path
) -> None:
    """Log retention deleted the version's commit: VersionGoneError, not a py4j traceback."""
    path = tmp_path / "t"
    for symbol in ("A", "B"):
        write_table(spark.createDataFrame([(symbol, 1.0, 1)], SCHEMA), path, "delta")
    (path / "_delta_log" / f"{0:020d}.json").unlink()
    with pytest.raises(VersionGoneError, match="version 0 has been deleted"):
        read_table_version(spark, path, "delta", 0)


def test_table_files_needs_no_private_pyspark_constructor(
    spark: SparkSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``DataFrame(jdf, spark)`` is PySpark-internal; the files are listed without it."""
    path = tmp_path / "t"
    write_with_tasks(spark, path, "delta", KEYED_ROWS)

    def private(*_: object) -> None:
        raise AssertionError("PySpark's private DataFrame constructor was called")

    monkeypatch.setattr(storage, "DataFrame", private)
    source = table_files(spark, path, "delta")
    assert source is not None
    assert sum(pq.read_metadata(f).num_rows for f in source.files) == len(KEYED_ROWS)


def test_a_task_attempt_that_ends_after_publish_adds_no_rows(
    spark: SparkSession, tmp_path: Path
) -> None:
    """A speculative or orphaned attempt of a task whose files were already reported and
    published can still write its own: they land in the write's staging area, never in the
    live Parquet table. Speculation itself is off in the shared settings."""
    path = tmp_path / "t"
    target = prepare_write(spark, path, KEYED, "parquet")
    table = pa.Table.from_pylist(
        [dict(zip(KEYED.names, r, strict=True)) for r in KEYED_ROWS], to_arrow_schema(KEYED)
    )
    reported = FileWriter(target)
    reported.add(table)
    publish(spark, target, [file for file, _ in reported.close()])
    late = FileWriter(target)  # the same pickled TableWrite, after publish
    late.add(table)
    late.close()
    assert read_table(spark, path, "parquet").count() == len(KEYED_ROWS)
    source = table_files(spark, path, "parquet")
    assert source is not None
    assert sum(pq.read_metadata(f).num_rows for f in source.files) == len(KEYED_ROWS)
    defaults = read_spark_defaults(Path(__file__).parents[1] / "spark-defaults.conf")
    assert defaults["spark.speculation"] == "false"


def test_a_conflict_found_by_delta_itself_is_one_line(spark: SparkSession, tmp_path: Path) -> None:
    """A transaction that read the table, then a commit by another writer, then its own commit:
    Delta's own conflict check raises ConcurrentAppendException (a py4j traceback), which a job
    reports as one line saying what happened and what to do."""
    # As in a job once its retention stage has run: the delta package registers its exception
    # types with PySpark, whose text no longer names the Java class.
    importlib.import_module("delta.exceptions")
    path = tmp_path / "t"
    write_table(spark.createDataFrame([("A", 1.0, 1)], SCHEMA), path, "delta")
    location = storage.Location.parse(path)
    transaction = storage._delta_log(spark, location).startTransaction()
    to_scala = spark._jvm.scala.jdk.javaapi.CollectionConverters
    read = to_scala.asJava(transaction.filterFiles())  # this transaction read every file
    removes = spark._jvm.java.util.ArrayList()
    for i in range(read.size()):  # and replaces them, as an overwrite does
        removes.add(read.get(i).remove())
    spark.createDataFrame([("B", 2.0, 2)], SCHEMA).write.format("delta").mode("append").save(
        str(path)
    )
    jvm = spark._jvm
    operation = getattr(jvm.org.apache.spark.sql.delta, "DeltaOperations$Write")(
        jvm.org.apache.spark.sql.SaveMode.Overwrite, *[jvm.scala.Option.apply(None)] * 8
    )
    actions = to_scala.asScala(removes).toSeq()
    with pytest.raises(ConcurrentWriteError) as raised, storage._conflicts_as_one_line(location):
        transaction.commit(actions, operation)
    message = str(raised.value)
    assert "\n" not in message and "ConcurrentAppendException" in message
    assert message.startswith(f"{path}: another run committed to this table")
    assert message.endswith("wait for the other run to finish, then rerun")


def test_a_conflict_is_recognised_by_its_java_class_in_a_py4j_traceback() -> None:
    """Before the delta package is imported, the conflict arrives as py4j's error, whose text
    holds the Java traceback (as two ingests started 2 s apart produced)."""
    trace = "py4j.protocol.Py4JJavaError: ...\n: io.delta.exceptions.ConcurrentAppendException: x"
    assert storage._conflict(RuntimeError(trace)) == "ConcurrentAppendException"
    assert storage._conflict(RuntimeError("java.io.IOException: disk full")) is None
