"""Malformed CSVs: ingest never crashes, and every data line lands in prices or in rejects.

A corpus of broken files in the Kaggle layout (truncated lines, extra columns, wrong or missing
headers, non-UTF-8 bytes, empty files, enormous numbers, impossible and out-of-range dates, the
same file in stocks/ and etfs/, CRLF, a BOM, quoted fields, NUL bytes, blank lines, a 100 KB
field) goes through the real ingest stage (Spark, Delta). Python counts each file's data lines on
its own (every non-empty line after the first); per symbol, rows in prices plus rejects from its
files must equal that count, and the stage's totals must equal the sums. The well-formed files of
the corpus (plain, CRLF, BOM, quoted) must land in prices whole, with the values pandas reads.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections import Counter
from datetime import date
from pathlib import Path

import pandas as pd
import pytest
from pyspark.sql import SparkSession

from stockvol import ingest
from stockvol.config import Config, load_config
from stockvol.schema import (
    ADJ_CLOSE,
    CLOSE,
    CSV_COLUMNS,
    DATE,
    HIGH,
    LOW,
    META_COLUMNS,
    OPEN,
    PRICE_COLUMNS,
    SYMBOL,
    VOLUME,
)
from stockvol.storage import read_table

HEADER = ",".join(CSV_COLUMNS)
FIGURES: Counter[str] = Counter()  # printed by conftest.report_figures
FIGURES_TITLE = "malformed CSV corpus"


def good_rows(start: int, count: int, volume: int = 1000) -> list[str]:
    """``count`` valid data lines on consecutive days of January 2020 onwards."""
    rows = []
    for i in range(start, start + count):
        day = date.fromordinal(date(2020, 1, 1).toordinal() + i).isoformat()
        price = 10 + i / 4
        rows.append(
            f"{day},{price},{price + 1},{price - 1},{price + 0.5},{price + 0.25},{volume + i}"
        )
    return rows


def text_file(*lines: str, newline: str = "\n", final_newline: bool = True) -> bytes:
    body = newline.join(lines)
    return (body + (newline if final_newline else "")).encode()


# Files whose every row is valid: all must land in prices, with the values pandas reads.
CLEAN = {
    "stocks/GOOD.csv": text_file(HEADER, *good_rows(0, 40)),
    "stocks/CRLF.csv": text_file(HEADER, *good_rows(0, 12), newline="\r\n"),
    "etfs/BOM.csv": b"\xef\xbb\xbf" + text_file(HEADER, *good_rows(0, 12)),
    "stocks/QUOTED.csv": text_file(
        HEADER, *(",".join(f'"{v}"' for v in row.split(",")) for row in good_rows(0, 12))
    ),
    "stocks/FLOATVOL.csv": text_file(HEADER, *(r + ".0" for r in good_rows(0, 8))),
    "stocks/NOEOL.csv": text_file(HEADER, *good_rows(0, 6), final_newline=False),
}

MALFORMED = {
    "stocks/TRUNC.csv": text_file(
        HEADER,
        *good_rows(0, 5),
        "2020-01-09,1.0,2.0",  # cut after three fields
        "2020-01-10,1.0,2.0,3.0,4.0,5.0,",  # Volume missing
        '2020-01-12,"1.0,2.0,0.5,1.5,1.5,100',  # an unbalanced quote
        "2020-01-11,1.0,2.",  # cut mid-number, at the end of the file
        final_newline=False,
    ),
    "stocks/EXTRA.csv": text_file(
        HEADER,
        *good_rows(0, 4),
        "2020-01-06,1.0,2.0,0.5,1.5,1.5,100,EXTRA",
        "2020-01-07,1.0,2.0,0.5,1.5,1.5,100,,,",
        '2020-01-08,1.0,2.0,0.5,1.5,1.5,"1,000"',  # a quoted thousands separator
    ),
    "stocks/WRONGHDR.csv": text_file(
        "Date,Open,High,Low,Close,Volume,Adj Close",  # the last two swapped
        *good_rows(0, 5),
    ),
    "stocks/GARBAGEHDR.csv": text_file("foo;bar;baz", "a;b;c", *good_rows(0, 3)),
    "stocks/NOHDR.csv": text_file(*good_rows(0, 6)),  # first line is data, read as the header
    "stocks/UPPERHDR.csv": text_file(HEADER.upper(), *good_rows(0, 3)),
    "stocks/QUOTEDHDR.csv": text_file(",".join(f'"{c}"' for c in CSV_COLUMNS), *good_rows(0, 3)),
    "etfs/LATIN1.csv": text_file(HEADER, *good_rows(0, 3))
    + b"2020-01-05,1.0,2.0,0.5,1.5,1.5,\xff\xfe100\n"
    + b"2020-01-0\xe9,1.0,2.0,0.5,1.5,1.5,100\n"
    + "2020-01-07,1.0,2.0,0.5,1.5,1.5,100".encode("utf-16")  # BOM, then NUL after each byte
    + b"\n",
    "stocks/EMPTY.csv": b"",
    "stocks/HDRONLY.csv": text_file(HEADER),
    "stocks/BIGNUM.csv": text_file(
        HEADER,
        "2020-01-02,1.0,2.0,0.5,1.5,1.5,99999999999999999999",  # > int64
        "2020-01-03,1.0,2.0,0.5,1.5,1.5,1e400",  # overflows to infinity
        "2020-01-04,1e400,2.0,0.5,1.5,1.5,100",
        "2020-01-05,1.0,2.0,0.5,1.5,-1e400,100",
        "2020-01-06,1.0,2.0,0.5,1.5,1.5,9223372036854775807",  # int64 max: valid
        "2020-01-07,1.0,2.0,0.5,1.5,1.5,9223372036854775808",  # int64 max + 1
        "2020-01-08,1.0,2.0,0.5,1.5,1.5,-5",
        "2020-01-09,1.0,2.0,0.5,1.5,1.5,1.5",  # not a whole number
        "2020-01-10,NaN,2.0,0.5,1.5,1.5,100",
        "2020-01-13,1.0,inf,0.5,1.5,1.5,100",
        "2020-01-14,1.0,2.0,0.5,1.5,1.5,1e3",
        "2020-01-15,0x10,2.0,0.5,1.5,1.5,100",
        "2020-01-16,1.0,2.0,0.5,1.5,1.5,",
        "2020-01-17,1.0,2.0,0.5,1.5,1.5,100",  # valid
    ),
    "stocks/DATES.csv": text_file(
        HEADER,
        *(
            f"{day},1.0,2.0,0.5,1.5,1.5,100"
            for day in (
                "1900-02-29",
                "2019-02-29",
                "2020-02-30",
                "2020-13-01",
                "20200101",
                "2020/01/02",
                " 2020-01-03",
                "",
                "-001-01-01",
                "10000-01-01",
                "2020-2-3",
                "1970-01-01",
                "2020-02-29",  # a real leap day
                "2020-02-29",  # the same date again
            )
        ),
    ),
    "stocks/NUL.csv": text_file(HEADER, *good_rows(0, 2))
    + b"2020-01-03\x00,1.0,2.0,0.5,1.5,1.5,7\n",
    "stocks/BLANKS.csv": text_file(HEADER, "", *good_rows(0, 3), "", "", *good_rows(3, 2), ""),
    "stocks/LONG.csv": text_file(HEADER, *good_rows(0, 2), "2020-01-03," + "9" * 100_000 + ",1"),
    "stocks/HDRMID.csv": text_file(HEADER, *good_rows(0, 3), HEADER, *good_rows(3, 3)),
    "stocks/DUP.csv": text_file(HEADER, *good_rows(0, 10)),
    "etfs/DUP.csv": text_file(HEADER, *good_rows(0, 10)),  # the real set's quirk
    "stocks/A B.csv": text_file(HEADER, *good_rows(0, 3)),
    "stocks/ÜML.csv": text_file(HEADER, *good_rows(0, 3)),
    "etfs/P%41.csv": text_file(HEADER, *good_rows(0, 3)),  # %41 is not an A
    "etfs/NOMETA.csv": text_file(HEADER, *good_rows(0, 4)),  # no row in the meta file
}
CORPUS = {**CLEAN, **MALFORMED}


def meta_file(symbols: list[str]) -> bytes:
    """symbols_valid_meta.csv for ``symbols`` (NASDAQ Symbol = file name), plus one orphan row."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(META_COLUMNS)
    for symbol in [*symbols, "GHOST"]:
        etf = "Y" if symbol in ("BOM", "LATIN1") else "N"
        writer.writerow(
            ["Y", symbol, f"{symbol} Corp ", "Q", "G", etf, 100, "N", "N", symbol, symbol, "N"]
        )
    return buffer.getvalue().encode()


def symbol_of(relative: str) -> str:
    return Path(relative).name[: -len(".csv")]


def data_lines(data: bytes) -> int:
    """A file's data lines, counted without the code under test: its non-empty lines, but the
    first when that is the Kaggle header (a file without it may start with data: all count)."""
    lines = data.splitlines()
    if lines and lines[0].removeprefix(b"\xef\xbb\xbf") == HEADER.encode():
        lines = lines[1:]
    return sum(1 for line in lines if line)


def write_corpus(raw: Path) -> None:
    for relative, data in CORPUS.items():
        path = raw / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    symbols = sorted({symbol_of(r) for r in CORPUS} - {"NOMETA"})
    (raw / "symbols_valid_meta.csv").write_bytes(meta_file(symbols))


@pytest.fixture(scope="module")
def ingested(
    spark: SparkSession, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Config, object, pd.DataFrame, pd.DataFrame]:
    config = load_config(data_dir=tmp_path_factory.mktemp("bad-csv") / "data")
    write_corpus(Path(config.raw_dir))
    summary = ingest.run(spark, config)
    prices = read_table(spark, Path(config.prices_path), config.storage_format).toPandas()
    rejects = read_table(spark, Path(config.rejects_path), config.storage_format).toPandas()
    FIGURES["files"] = len(CORPUS)
    FIGURES["malformed_files"] = len(MALFORMED)
    FIGURES["data_lines"] = sum(data_lines(d) for d in CORPUS.values())
    FIGURES["rows_in_prices"] = len(prices)
    FIGURES["rows_in_rejects"] = len(rejects)
    return config, summary, prices, rejects


def source_file_column(rejects: pd.DataFrame) -> str:
    """The rejects column naming the input file (the contract says it is kept)."""
    candidates = [c for c in rejects.columns if "file" in c.lower() or "source" in c.lower()]
    assert candidates, f"rejects has no source-file column: {list(rejects.columns)}"
    return candidates[0]


def folder_and_name(value: str) -> str:
    """``stocks/X.csv`` from whatever path form the rejects table keeps."""
    parts = Path(str(value)).parts
    return "/".join(parts[-2:])


def test_every_data_line_is_in_prices_or_rejects(ingested: tuple) -> None:
    _, _, prices, rejects = ingested
    column = source_file_column(rejects)
    rejected = Counter(folder_and_name(v) for v in rejects[column])
    unknown = set(rejected) - set(CORPUS)
    assert not unknown, f"rejects name files that are not in the corpus: {unknown}"
    in_prices = Counter(prices[SYMBOL])
    by_symbol: dict[str, list[str]] = {}
    for relative in CORPUS:
        by_symbol.setdefault(symbol_of(relative), []).append(relative)
    mismatches = {}
    for symbol, files in sorted(by_symbol.items()):
        expected = sum(data_lines(CORPUS[f]) for f in files)
        got = in_prices[symbol] + sum(rejected[f] for f in files)
        if got != expected:
            mismatches[symbol] = {
                "lines": expected,
                "prices": in_prices[symbol],
                "rejects": {f: rejected[f] for f in files},
            }
    assert mismatches == {}
    assert set(in_prices) <= set(by_symbol)


def test_the_stage_totals_add_up(ingested: tuple) -> None:
    _, summary, prices, rejects = ingested
    lines = sum(data_lines(d) for d in CORPUS.values())
    assert (summary.rows_in, summary.rows_out, summary.rows_rejected) == (
        lines,
        len(prices),
        len(rejects),
    )
    assert summary.rows_out + summary.rows_rejected == summary.rows_in


def test_rejects_say_why(ingested: tuple) -> None:
    _, _, _, rejects = ingested
    reasons = [c for c in rejects.columns if "reason" in c.lower()]
    assert reasons, list(rejects.columns)
    assert rejects[reasons[0]].notna().all() and (rejects[reasons[0]].str.len() > 0).all()


def real_date(text: str) -> bool:
    """``YYYY-MM-DD`` naming a day of the (proleptic Gregorian) calendar Python knows, year >= 1."""
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        return False
    try:
        date.fromisoformat(text)
    except ValueError:
        return False
    return True


def test_prices_hold_only_rows_that_keep_the_contract(ingested: tuple) -> None:
    _, _, prices, _ = ingested
    assert not prices[[SYMBOL, DATE, *PRICE_COLUMNS, VOLUME]].isna().any().any()
    for column in PRICE_COLUMNS:
        assert prices[column].map(math.isfinite).all(), column
    assert (prices[VOLUME] >= 0).all()
    in_range = prices[DATE].map(real_date) & prices[DATE].between("1900-01-01", str(date.today()))
    bad_dates = prices.loc[~in_range, [SYMBOL, DATE]]
    assert bad_dates.empty, bad_dates
    assert not prices.duplicated([SYMBOL, DATE]).any()


def oracle(data: bytes) -> pd.DataFrame:
    """pandas' reading of a well-formed file: the values prices must hold for it."""
    frame = pd.read_csv(io.BytesIO(data), encoding="utf-8-sig", dtype={DATE: str})
    frame[VOLUME] = frame[VOLUME].astype("int64")
    return frame[[DATE, OPEN, HIGH, LOW, CLOSE, ADJ_CLOSE, VOLUME]]


@pytest.mark.parametrize("relative", list(CLEAN))
def test_well_formed_files_land_whole_with_the_values_pandas_reads(
    ingested: tuple, relative: str
) -> None:
    _, _, prices, _ = ingested
    got = prices[prices[SYMBOL] == symbol_of(relative)]
    got = got[[DATE, *PRICE_COLUMNS, VOLUME]].sort_values(DATE).reset_index(drop=True)
    expected = oracle(CORPUS[relative])[[DATE, *PRICE_COLUMNS, VOLUME]]
    pd.testing.assert_frame_equal(got, expected.sort_values(DATE).reset_index(drop=True))


def test_valid_rows_of_malformed_files_are_kept(ingested: tuple) -> None:
    """A broken line costs that line only: the file's good rows are in prices."""
    _, _, prices, _ = ingested
    in_prices = Counter(prices[SYMBOL])
    assert in_prices["TRUNC"] == 5 and in_prices["EXTRA"] == 4
    assert in_prices["LATIN1"] == 3 and in_prices["NUL"] == 2 and in_prices["LONG"] == 2
    assert in_prices["BLANKS"] == 5 and in_prices["DUP"] == 10
    assert in_prices["A B"] == 3 and in_prices["ÜML"] == 3 and in_prices["NOMETA"] == 4
    assert in_prices["P%41"] == 3
    big = prices[prices[SYMBOL] == "BIGNUM"].set_index(DATE)[VOLUME].to_dict()
    assert big.get("2020-01-06") == 2**63 - 1 and big.get("2020-01-17") == 100
    assert "2020-01-02" not in big and "2020-01-07" not in big and "2020-01-08" not in big


# --- known bugs --------------------------------------------------------------------------------
# Inputs ingest once handled wrongly (docs/reliability.md), kept as regression tests.

KNOWN_BUGS = {
    "stocks/GOOD.csv": text_file(HEADER, *good_rows(0, 5)),
    # NUL padding, as a crash in the middle of writing a file leaves it.
    "stocks/NULPAD.csv": text_file(HEADER, *good_rows(0, 2))
    + b"\x00" * 64
    + b"\n"
    + text_file(*good_rows(2, 2)),
    "stocks/A+B.csv": text_file(HEADER, *good_rows(0, 3)),
    "stocks/A B.csv": text_file(HEADER, *good_rows(10, 2)),
    "stocks/FARDATES.csv": text_file(
        HEADER,
        *good_rows(0, 2),
        "0000-01-01,1.0,2.0,0.5,1.5,1.5,100",  # no year 0 in Python, pandas or Java's LocalDate
        "9999-12-31,1.0,2.0,0.5,1.5,1.5,100",  # a trading day 8,000 years from now
    ),
}


@pytest.fixture(scope="module")
def ingested_known_bugs(
    spark: SparkSession, tmp_path_factory: pytest.TempPathFactory
) -> tuple[pd.DataFrame, pd.DataFrame]:
    config = load_config(data_dir=tmp_path_factory.mktemp("known-bugs") / "data")
    for relative, data in KNOWN_BUGS.items():
        path = Path(config.raw_dir) / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    symbols = sorted({symbol_of(r) for r in KNOWN_BUGS})
    (Path(config.raw_dir) / "symbols_valid_meta.csv").write_bytes(meta_file(symbols))
    ingest.run(spark, config)
    prices = read_table(spark, Path(config.prices_path), config.storage_format).toPandas()
    rejects = read_table(spark, Path(config.rejects_path), config.storage_format).toPandas()
    return prices, rejects


def accounted(prices: pd.DataFrame, rejects: pd.DataFrame, relative: str) -> int:
    in_prices = int((prices[SYMBOL] == symbol_of(relative)).sum())
    return in_prices + int((rejects["source_file"] == relative).sum())


def test_a_line_of_nul_padding_is_rejected_not_dropped(ingested_known_bugs: tuple) -> None:
    prices, rejects = ingested_known_bugs
    relative = "stocks/NULPAD.csv"
    assert accounted(prices, rejects, relative) == data_lines(KNOWN_BUGS[relative]) == 5
    padding = rejects[rejects["source_file"] == relative]
    assert padding["reason"].tolist() == ["malformed_line"]
    assert padding["raw_line"].tolist() == ["\x00" * 64]


def test_a_plus_in_a_file_name_stays_a_plus(ingested_known_bugs: tuple) -> None:
    prices, rejects = ingested_known_bugs
    assert (prices[SYMBOL] == "A+B").sum() == 3
    assert accounted(prices, rejects, "stocks/A B.csv") == 2


def test_dates_out_of_range_are_rejected(ingested_known_bugs: tuple) -> None:
    prices, rejects = ingested_known_bugs
    kept = prices[prices[SYMBOL] == "FARDATES"][DATE]
    assert sorted(kept) == ["2020-01-01", "2020-01-02"]
    far = rejects[rejects["source_file"] == "stocks/FARDATES.csv"]
    assert sorted(zip(far[DATE], far["reason"], strict=True)) == [
        ("0000-01-01", "bad_date"),
        ("9999-12-31", "bad_date"),
    ]


def test_the_known_bug_inputs_break_nothing_else(ingested_known_bugs: tuple) -> None:
    prices, rejects = ingested_known_bugs
    assert accounted(prices, rejects, "stocks/GOOD.csv") == 5 == (prices[SYMBOL] == "GOOD").sum()
