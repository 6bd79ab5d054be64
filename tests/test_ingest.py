"""Ingest on real Kaggle files plus generated bad ones: typed prices, reasoned rejects."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, QueryBuilder
from pandas.testing import assert_frame_equal
from pyspark import cloudpickle
from pyspark.sql import SparkSession
from pyspark.sql.pandas.types import from_arrow_schema

from stockvol import ingest, retention
from stockvol.config import Config, apply_overrides
from stockvol.ingest import (
    ConservationError,
    IngestInputError,
    IngestTask,
    PairGoneError,
    read_ingest_pair,
    run,
)
from stockvol.location import Location
from stockvol.schema import CSV_COLUMNS, PRICES_SCHEMA
from stockvol.storage import FileWriter, TableWrite, delta_version, read_table, write_table
from stockvol.summary import StageSummary
from tests.real_files import quirk_sample
from tests.test_storage import force_deltas_public_writer

REAL = quirk_sample()

HEADER = ",".join(CSV_COLUMNS)
BAD_FILE = """\
2020-02-30,1,2,0.5,1.5,1.4,100
2020-01-03,x,2,0.5,1.5,1.4,100
2020-01-03,1,2,0.5,1.5,1.4,100
2020-01-03,1,2,0.5,1.5,1.4,101
2020-01-06,1,2,0.5,1.5,1.4,-5
2020-01-07,1,2,0.5,1.5,1.4,5.5
2020-01-08,1,2
2020-01-09,1,2,0.5,1.5,1.4,7,9
2020-01-10,NaN,2,0.5,1.5,1.4,7
2020-01-13,1,2,0.5,1.5,1.4,99999999999999999999
2020-01-14,1,2,0.5,1.5,1.4,806400.0
"""
EXPECTED_BAD_REASONS = {
    "2020-02-30": "bad_date",
    "x": "bad_number",
    "101": "duplicate_date",
    "-5": "negative_volume",
    "5.5": "bad_number",
    "2020-01-08": "malformed_line",
    "2020-01-09": "malformed_line",
    "NaN": "bad_number",
    "99999999999999999999": "bad_number",
}


def _raw_folder(root: Path) -> Path:
    """Real Kaggle fixtures plus generated files with every quirk ingest must survive."""
    raw = root / "raw"
    shutil.copytree(REAL, raw, ignore=shutil.ignore_patterns("*.md"))
    good = f"{HEADER}\n2020-01-02,1.0,2.0,0.5,1.5,1.4,100\n"
    (raw / "stocks" / "BAD.csv").write_text(f"{HEADER}\n{BAD_FILE}")
    (raw / "stocks" / "HDRONLY.csv").write_text(f"{HEADER}\n")
    (raw / "stocks" / "AGM-A.csv").write_text(good)  # meta Symbol AGM$A, NASDAQ Symbol AGM-A
    (raw / "stocks" / "CARR#.csv").write_text(good)
    (raw / "stocks" / "LGF.B.csv").write_text(good)
    (raw / "etfs" / "CARR#.csv").write_text(good)  # in both folders: stocks/ wins
    (raw / "etfs" / "NOHEADER.csv").write_text("2020-01-02,1,2,0.5,1.5,1.4,100\n")
    (raw / "etfs" / "EMPTY.csv").write_bytes(b"")
    return raw


@pytest.fixture(scope="module")
def ingested(spark: SparkSession, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run the real ingest once per format on the same raw folder."""
    root = tmp_path_factory.mktemp("ingest")
    raw = _raw_folder(root)
    results = {}
    for storage_format in ("delta", "parquet"):
        config = apply_overrides(Config(data_dir=root), storage_format=storage_format)
        config = apply_overrides(config, data_dir=root / storage_format)
        shutil.copytree(raw, Path(config.raw_dir))
        summary = run(spark, config)
        results[storage_format] = (config, summary)
    return results


def _lines_per_file(raw: Path) -> dict[str, int]:
    """Data lines per file, counted with plain Python: the oracle for 'nothing lost'."""
    counts = {}
    for path in sorted([*raw.glob("stocks/*.csv"), *raw.glob("etfs/*.csv")]):
        lines = path.read_bytes().splitlines()
        has_header = bool(lines) and lines[0].decode() == HEADER
        counts[f"{path.parent.name}/{path.name}"] = len(lines) - (1 if has_header else 0)
    return counts


@pytest.mark.parametrize("storage_format", ["delta", "parquet"])
def test_prices_has_the_contract_columns_and_types(
    spark: SparkSession, ingested: dict, storage_format: str
) -> None:
    config, _ = ingested[storage_format]
    prices = read_table(spark, Path(config.prices_path), storage_format)
    assert [(f.name, f.dataType) for f in prices.schema.fields] == [
        (f.name, f.dataType) for f in PRICES_SCHEMA.fields
    ]


def _assert_every_line_accounted(
    prices: pd.DataFrame, rejects: pd.DataFrame, raw: Path, summary: StageSummary
) -> None:
    """Per raw file, its data lines (counted by ``_lines_per_file``) = its rows in prices + in
    rejects; and the summary's counts are those of the tables."""
    expected = _lines_per_file(raw)
    rejected = rejects.groupby("source_file").size()
    # Kept rows per file: every symbol's kept rows come from one file here but CARR#, whose
    # etfs/ copy is wholly rejected as duplicates.
    kept = prices.groupby("Symbol").size()
    for file, lines in expected.items():
        symbol = Path(file).name.removesuffix(".csv")
        kept_here = 0 if file == "etfs/CARR#.csv" else int(kept.get(symbol, 0))
        assert kept_here + int(rejected.get(file, 0)) == lines, file
    assert summary.rows_in == sum(expected.values())
    assert (summary.rows_out, summary.rows_rejected) == (len(prices), len(rejects))


@pytest.mark.parametrize("storage_format", ["delta", "parquet"])
def test_every_line_is_in_prices_or_rejects(
    spark: SparkSession, ingested: dict, storage_format: str
) -> None:
    config, summary = ingested[storage_format]
    rejects = read_table(spark, Path(config.rejects_path), storage_format).toPandas()
    prices = read_table(spark, Path(config.prices_path), storage_format).toPandas()
    _assert_every_line_accounted(prices, rejects, Path(config.raw_dir), summary)


def test_prices_equal_an_independent_pandas_reading(spark: SparkSession, ingested: dict) -> None:
    config, _ = ingested["delta"]
    prices = read_table(spark, Path(config.prices_path), "delta").toPandas()
    for path in sorted((REAL).glob("*/*.csv")):
        # round_trip: the exactly-rounded parse (pandas' default fast parser may be off by 1 ulp).
        oracle = pd.read_csv(path, dtype={"Date": str}, float_precision="round_trip").dropna()
        got = prices[prices["Symbol"] == path.stem].sort_values("Date").reset_index(drop=True)
        assert got["Date"].tolist() == oracle["Date"].tolist(), path.name
        for column in ("Open", "High", "Low", "Close", "Adj Close"):
            np.testing.assert_array_equal(got[column].to_numpy(), oracle[column].to_numpy())
        np.testing.assert_array_equal(
            got["Volume"].to_numpy(), oracle["Volume"].to_numpy().astype(np.int64)
        )


def test_date_only_rows_of_the_real_files_are_rejected_as_missing_values(
    spark: SparkSession, ingested: dict
) -> None:
    config, _ = ingested["delta"]
    rejects = read_table(spark, Path(config.rejects_path), "delta").toPandas()
    missing = rejects[rejects["reason"] == "missing_values"]
    assert sorted(zip(missing["Symbol"], missing["Date"], strict=True)) == [
        ("HBAN", "2001-09-13"),
        ("KO", "2001-09-12"),
    ]


def test_each_bad_line_gets_its_reason(spark: SparkSession, ingested: dict) -> None:
    config, _ = ingested["delta"]
    rejects = read_table(spark, Path(config.rejects_path), "delta").toPandas()
    bad = rejects[rejects["source_file"] == "stocks/BAD.csv"]
    found = {}
    for _, row in bad.iterrows():  # every reject keeps its whole line as read
        for key in EXPECTED_BAD_REASONS:
            if key in row["raw_line"].split(",")[:2] + row["raw_line"].split(",")[-1:]:
                found[key] = row["reason"]
    assert found == EXPECTED_BAD_REASONS
    assert len(bad) == len(EXPECTED_BAD_REASONS)


def test_float_spelled_whole_volume_is_kept(spark: SparkSession, ingested: dict) -> None:
    config, _ = ingested["delta"]
    prices = read_table(spark, Path(config.prices_path), "delta")
    row = prices.filter("Symbol = 'BAD' AND Date = '2020-01-14'").collect()[0]
    assert row["Volume"] == 806400


def test_names_come_from_the_nasdaq_symbol_column_trimmed(
    spark: SparkSession, ingested: dict
) -> None:
    config, _ = ingested["delta"]
    prices = read_table(spark, Path(config.prices_path), "delta").toPandas()
    names = dict(zip(prices["Symbol"], prices["Security Name"], strict=True))
    meta = pd.read_csv(REAL / "symbols_valid_meta.csv", dtype=str)
    by_file_name = dict(zip(meta["NASDAQ Symbol"], meta["Security Name"].str.strip(), strict=True))
    for symbol in ("AGM-A", "CARR#", "LGF.B", "HBAN", "VSL"):
        assert names[symbol] == by_file_name[symbol]
    assert names["BAD"] is None


def test_summary_reports_odd_files(ingested: dict) -> None:
    _, summary = ingested["delta"]
    assert summary.details["header_only_files"] == ["stocks/HDRONLY.csv"]
    assert summary.details["empty_files"] == ["etfs/EMPTY.csv"]
    assert summary.details["bad_header_files"] == ["etfs/NOHEADER.csv"]
    assert "BAD" in summary.details["symbols_without_metadata"]


def test_a_missing_raw_folder_is_a_clear_error(spark: SparkSession, tmp_path: Path) -> None:
    with pytest.raises(IngestInputError, match="jobs/download.py"):
        run(spark, Config(data_dir=tmp_path))


@pytest.mark.parametrize(
    ("max_rows", "rows_per_file", "sizes"),
    [
        (0, 1 << 21, [14]),
        (2, 1 << 21, [2] * 7),
        (5, 1 << 21, [5, 5, 4]),
        (0, 5, [7, 7]),  # a new file once 5 rows are written, between whole tables: 3+4, then 7
    ],
)
def test_staged_files_hold_every_row_once_within_the_file_limit(
    tmp_path: Path, max_rows: int, rows_per_file: int, sizes: list[int]
) -> None:
    schema = pa.schema([("x", pa.int64())])
    target = TableWrite(
        tmp_path / "t", "parquet", from_arrow_schema(schema), tmp_path / "t", "part-", schema, False
    )
    writer = FileWriter(target, max_rows, rows_per_file)
    for n in (3, 4, 0, 7):
        writer.add(pa.table({"x": pa.array(range(n), pa.int64())}, schema=schema))
    files = [path for path, _ in writer.close()]
    assert [rows for _, rows in writer.files] == sizes
    assert [pq.read_metadata(f).num_rows for f in files] == sizes
    values = pa.concat_tables(pq.read_table(f) for f in files).column("x").to_pylist()
    assert values == [*range(3), *range(4), *range(7)]  # in order, none lost or repeated
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == sorted(Path(f).name for f in files)


@pytest.mark.parametrize("storage_format", ["delta", "parquet"])
def test_files_without_data_give_empty_tables_with_the_contract_schema(
    spark: SparkSession, tmp_path: Path, storage_format: str
) -> None:
    config = apply_overrides(Config(data_dir=tmp_path), storage_format=storage_format)
    (Path(config.raw_dir) / "stocks").mkdir(parents=True)
    shutil.copy(REAL / "symbols_valid_meta.csv", Path(config.raw_dir))
    (Path(config.raw_dir) / "stocks" / "HDRONLY.csv").write_text(f"{HEADER}\n")
    summary = run(spark, config)
    assert (summary.rows_in, summary.rows_out, summary.rows_rejected) == (0, 0, 0)
    prices = read_table(spark, Path(config.prices_path), storage_format)
    assert prices.count() == 0
    assert [f.name for f in prices.schema.fields] == PRICES_SCHEMA.names
    assert read_table(spark, Path(config.rejects_path), storage_format).count() == 0


class DropsALine(IngestTask):
    """An ingest task with a bug: the first line of each file classified line by line vanishes
    from prices, rejects and the counts alike."""

    def _parsed(self, source_file: str, table: pa.Table, *writers: FileWriter) -> Iterator:
        yield from super()._parsed(source_file, table.slice(1), *writers)


@pytest.fixture
def lossy_ingest(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Ingest runs ``DropsALine`` in its Spark tasks (shipped by value: the executors cannot
    import this test module)."""
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    monkeypatch.setattr(ingest, "IngestTask", DropsALine)
    yield
    cloudpickle.unregister_pickle_by_value(module)


def test_a_line_lost_by_a_task_is_a_conservation_error(
    spark: SparkSession, tmp_path: Path, lossy_ingest: None
) -> None:
    """Lines read are counted from each file's bytes, not from its classification: a line that
    a task drops from every output is still missed, and nothing is published."""
    config = apply_overrides(Config(data_dir=tmp_path), storage_format="parquet")
    (Path(config.raw_dir) / "stocks").mkdir(parents=True)
    shutil.copy(REAL / "symbols_valid_meta.csv", Path(config.raw_dir))
    (Path(config.raw_dir) / "stocks" / "BAD.csv").write_text(f"{HEADER}\n{BAD_FILE}")
    (Path(config.raw_dir) / "stocks" / "GOOD.csv").write_text(
        f"{HEADER}\n2020-01-02,1,2,0.5,1.5,1.4,9\n"
    )
    with pytest.raises(ConservationError, match="stocks/BAD.csv: 11 read, 10 kept or rejected"):
        run(spark, config)
    assert not Path(config.prices_path).exists() and not Path(config.rejects_path).exists()


def test_the_drivers_utc_date_is_the_last_valid_date_in_every_task(
    spark: SparkSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """'today' is taken once, on the driver (``today_utc``), and shipped to the tasks: a task's
    own clock or time zone decides nothing."""
    monkeypatch.setattr(ingest, "today_utc", lambda: date(2020, 1, 6))
    config = apply_overrides(Config(data_dir=tmp_path), storage_format="parquet")
    (Path(config.raw_dir) / "stocks").mkdir(parents=True)
    shutil.copy(REAL / "symbols_valid_meta.csv", Path(config.raw_dir))
    days = ["2020-01-03", "2020-01-06", "2020-01-07"]
    lines = [f"{day},1,2,0.5,1.5,1.4,9" for day in days]
    (Path(config.raw_dir) / "stocks" / "T.csv").write_text("\n".join([HEADER, *lines, ""]))
    summary = run(spark, config)
    assert summary.details["rejected_by_reason"] == {"bad_date": 1}
    rejected = read_table(spark, Path(config.rejects_path), "parquet").select("Date").collect()
    assert [row["Date"] for row in rejected] == ["2020-01-07"]


# --- reading prices and rejects as a pair ------------------------------------------------------


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values(list(frame.columns), na_position="first").reset_index(drop=True)


def _pandas_table(path: Location, storage_format: str) -> pd.DataFrame:
    """A table's latest version read without Spark, as docs/data.md reads it."""
    if storage_format == "parquet":
        return _sorted(pd.read_parquet(os.path.realpath(path)))
    table = DeltaTable(str(path))
    rows = QueryBuilder().register("t", table).execute("SELECT * FROM t").read_all()
    return _sorted(pa.table(rows).to_pandas())


def _pair(spark: SparkSession, config: Config) -> tuple[pd.DataFrame, pd.DataFrame]:
    prices, rejects = read_ingest_pair(spark, config)
    return _sorted(prices.toPandas()), _sorted(rejects.toPandas())


def _small_raw(config: Config, volume: int = 9) -> None:
    """Two files: one with a bad line of every kind, one good (``volume`` tells runs apart)."""
    (Path(config.raw_dir) / "stocks").mkdir(parents=True, exist_ok=True)
    shutil.copy(REAL / "symbols_valid_meta.csv", Path(config.raw_dir))
    (Path(config.raw_dir) / "stocks" / "BAD.csv").write_text(f"{HEADER}\n{BAD_FILE}")
    (Path(config.raw_dir) / "stocks" / "GOOD.csv").write_text(
        f"{HEADER}\n2020-01-02,1,2,0.5,1.5,1.4,{volume}\n"
    )


@pytest.mark.parametrize("storage_format", ["delta", "parquet"])
def test_the_pair_is_the_last_ingest_and_accounts_for_every_line(
    spark: SparkSession, ingested: dict, storage_format: str
) -> None:
    config, summary = ingested[storage_format]
    prices, rejects = _pair(spark, config)
    assert_frame_equal(prices, _pandas_table(config.prices_path, storage_format))
    assert_frame_equal(rejects, _pandas_table(config.rejects_path, storage_format))
    _assert_every_line_accounted(prices, rejects, Path(config.raw_dir), summary)


def test_the_pair_is_recorded_when_delta_falls_back_to_its_public_writer(
    spark: SparkSession,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With Delta's internal API not the pinned one, both tables go through Spark's Delta
    writer; the prices commit still names the rejects version it pairs with."""
    config = apply_overrides(Config(data_dir=tmp_path), storage_format="delta")
    _small_raw(config)
    run(spark, config)
    force_deltas_public_writer(monkeypatch)
    _small_raw(config, volume=10)
    with caplog.at_level(logging.WARNING, logger="stockvol"):
        run(spark, config)
    assert "written through Spark's Delta writer" in caplog.text
    commit = DeltaTable(str(config.prices_path)).history(1)[0]
    rejects_version = delta_version(spark, config.rejects_path)
    assert json.loads(commit["userMetadata"]) == {"rejects_version": rejects_version}
    prices, rejects = _pair(spark, config)
    assert_frame_equal(prices, _pandas_table(config.prices_path, "delta"))
    assert_frame_equal(rejects, _pandas_table(config.rejects_path, "delta"))
    assert prices.loc[prices["Symbol"] == "GOOD", "Volume"].tolist() == [10]


@pytest.mark.parametrize("storage_format", ["delta", "parquet"])
def test_prices_that_name_no_rejects_pair_with_the_latest_and_say_so(
    spark: SparkSession,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    storage_format: str,
) -> None:
    """Tables written before ingest recorded the pair: the latest of each, with a warning."""
    config = apply_overrides(Config(data_dir=tmp_path), storage_format=storage_format)
    _small_raw(config)
    run(spark, config)
    for path in (config.prices_path, config.rejects_path):  # rewritten with no pair metadata
        write_table(read_table(spark, path, storage_format), path, storage_format)
    with caplog.at_level(logging.WARNING, logger="stockvol"):
        prices, rejects = _pair(spark, config)
    assert "names no rejects version" in caplog.text
    assert_frame_equal(prices, _pandas_table(config.prices_path, storage_format))
    assert_frame_equal(rejects, _pandas_table(config.rejects_path, storage_format))


@pytest.mark.parametrize("storage_format", ["delta", "parquet"])
def test_a_deleted_paired_rejects_version_is_a_one_line_error(
    spark: SparkSession, tmp_path: Path, storage_format: str
) -> None:
    """Rejects replaced without their prices (a run killed between the two), then the paired
    version deleted by retention: the reader says to rerun ingest."""
    config = apply_overrides(Config(data_dir=tmp_path), storage_format=storage_format)
    _small_raw(config)
    run(spark, config)
    rejects = read_table(spark, config.rejects_path, storage_format)
    write_table(rejects.limit(1), config.rejects_path, storage_format)
    retention.apply(spark, [("rejects", config.rejects_path)], hours=0)
    with pytest.raises(PairGoneError, match=r"has been deleted \(retention\); rerun ingest"):
        read_ingest_pair(spark, config)
