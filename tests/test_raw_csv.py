"""The per-file parser behind ingest: pure Python + pyarrow, checked against pandas and by hand."""

from __future__ import annotations

from datetime import date
from io import BytesIO

import numpy as np
import pandas as pd
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from stockvol.raw_csv import (
    HEADER,
    PARSED_SCHEMA,
    count_lines,
    good_files,
    parse_file,
    reject_repeated_dates,
)
from tests.real_files import quirk_sample

FIXTURES = quirk_sample()
TODAY = date(2026, 11, 26)
GOOD = b"2020-01-02,1.0,2.0,0.5,1.5,1.4,100"


def parse(body: bytes, name: str = "stocks/T.csv", **kwargs) -> pd.DataFrame:
    table = parse_file(body, name, today=TODAY, **kwargs)
    assert table.schema == PARSED_SCHEMA
    return table.to_pandas()


def reasons(frame: pd.DataFrame) -> dict[int, str | None]:
    return dict(zip(frame["line"], frame["reason"], strict=True))


def test_each_line_gets_the_first_rule_it_breaks_numbered_from_the_header() -> None:
    body = (
        HEADER
        + b"\n"
        + b"\n".join(
            [
                b"2020-02-30,1,2,0.5,1.5,1.4,100",  # 2: no such day
                b"2020-01-03,x,2,0.5,1.5,1.4,100",  # 3
                b"2020-01-03,1,2,0.5,1.5,1.4,100",  # 4: kept
                b"2020-01-03,1,2,0.5,1.5,1.4,101",  # 5: repeats line 4's date
                b"2020-01-06,1,2,0.5,1.5,1.4,-5",  # 6
                b"2020-01-07,1,2,0.5,1.5,1.4,5.5",  # 7: not whole
                b"2020-01-08,1,2",  # 8
                b"2020-01-09,1,2,0.5,1.5,1.4,7,9",  # 9
                b"2020-01-10,NaN,2,0.5,1.5,1.4,7",  # 10
                b"2020-01-13,1,2,0.5,1.5,1.4,99999999999999999999",  # 11: beyond int64
                b"2020-01-14,1,2,0.5,1.5,1.4,806400.0",  # 12: kept, whole
                b"",  # 13: empty, no data: skipped
                b"\x00\x00\x00",  # 14: NUL padding
                b"2020-01-15,1,2,,1.5,1.4,100",  # 15
                b"1899-12-29,1,2,1,1.5,1.4,100",  # 16: before 1900
                b"2026-11-27,1,2,1,1.5,1.4,100",  # 17: after today
                b"2020-1-16,1,2,1,1.5,1.4,100",  # 18: not YYYY-MM-DD
                b"2020-01-17,1,inf,1,1.5,1.4,100",  # 19
                b"2020-01-20,1,2,1,1.5,1.4,9223372036854775807",  # 20: kept, int64 max
            ]
        )
    )
    frame = parse(body)
    assert reasons(frame) == {
        2: "bad_date",
        3: "bad_number",
        4: None,
        5: "duplicate_date",
        6: "negative_volume",
        7: "bad_number",
        8: "malformed_line",
        9: "malformed_line",
        10: "bad_number",
        11: "bad_number",
        12: None,
        14: "malformed_line",
        15: "missing_values",
        16: "bad_date",
        17: "bad_date",
        18: "bad_date",
        19: "bad_number",
        20: None,
    }
    kept = frame[frame["reason"].isna()].set_index("line")
    assert kept.loc[12, "_Volume"] == 806400 and kept.loc[20, "_Volume"] == 2**63 - 1
    assert kept[["Open", "Volume", "raw_line"]].isna().all().all()  # no raw text for good rows
    rejected = frame[frame["reason"].notna()].set_index("line")
    assert rejected.loc[5, "raw_line"] == "2020-01-03,1,2,0.5,1.5,1.4,101"
    assert rejected.loc[5, "Volume"] == "101" and np.isnan(rejected.loc[5, "_Volume"])
    assert rejected.loc[14, "raw_line"] == "\x00\x00\x00"
    assert (frame["Symbol"] == "T").all() and (frame["source_file"] == "stocks/T.csv").all()


def test_a_wrong_header_rejects_every_line_with_its_text() -> None:
    frame = parse(b"date,open\n" + GOOD + b"\n" + GOOD + b"\n")
    assert reasons(frame) == {1: "bad_header", 2: "bad_header", 3: "bad_header"}
    assert frame["raw_line"].tolist() == ["date,open", GOOD.decode(), GOOD.decode()]


@pytest.mark.parametrize("content", [b"", HEADER, HEADER + b"\n", HEADER + b"\r\n"])
def test_empty_and_header_only_files_have_no_rows(content: bytes) -> None:
    assert parse(content).empty


@pytest.mark.parametrize(
    "content",
    [
        HEADER + b"\r\n" + GOOD + b"\r\n",  # Windows line ends
        HEADER + b"\r" + GOOD,  # old Mac line ends, no final newline
        b"\xef\xbb\xbf" + HEADER + b"\n" + GOOD + b"\n",  # UTF-8 byte order mark
    ],
)
def test_line_ends_and_a_byte_order_mark_do_not_matter(content: bytes) -> None:
    frame = parse(content)
    assert reasons(frame) == {2: None}
    assert frame.loc[0, "_Adj Close"] == 1.4 and frame.loc[0, "_Volume"] == 100


def test_quoted_values_are_read_and_a_stray_quote_swallows_no_line() -> None:
    quoted = b'"2020-01-02","1.0","2.0","0.5","1.5","1.4","100"'
    assert reasons(parse(HEADER + b"\n" + quoted + b"\n")) == {2: None}
    stray = b'2020-01-03,"1.0,2.0,0.5,1.5,1.4,100'
    later = GOOD.replace(b"01-02", b"01-06")
    frame = parse(HEADER + b"\n" + quoted + b"\n" + stray + b"\n" + later + b"\n")
    # The file's quotes do not parse: it is read with quotes as plain text, line by line.
    assert reasons(frame) == {2: "bad_date", 3: "bad_number", 4: None}
    assert frame.loc[2, "Date"] == "2020-01-06" and frame.loc[2, "_Volume"] == 100


def test_bytes_that_are_not_utf8_are_kept_replaced_in_the_reject() -> None:
    frame = parse(HEADER + b"\n2020-01-02,1.0,2.0,0.5,1.5,1.4,1\xff0\n")
    assert reasons(frame) == {2: "bad_number"}
    assert frame.loc[0, "Volume"] == "1\ufffd0"


def test_keep_text_keeps_the_text_of_good_rows() -> None:
    frame = parse(HEADER + b"\n" + GOOD + b"\n", keep_text=True)
    assert reasons(frame) == {2: None}
    assert frame.loc[0, "raw_line"] == GOOD.decode() and frame.loc[0, "Volume"] == "100"
    assert frame.loc[0, "_Volume"] == 100


@pytest.mark.parametrize("name", ["stocks/KO.csv", "stocks/HBAN.csv", "etfs/VSGX.csv"])
def test_real_files_equal_pandas(name: str) -> None:
    """The real files, through both paths (fast and careful), against pandas' exact reading."""
    content = (FIXTURES / name).read_bytes()
    expected = pd.read_csv(BytesIO(content), float_precision="round_trip", dtype={"Date": str})
    complete = expected.dropna()  # HBAN and KO have Date-only lines: missing_values
    for keep_text in (False, True):
        frame = parse(content, name, keep_text=keep_text)
        assert len(frame) == len(expected)
        kept = frame[frame["reason"].isna()]
        assert set(frame["reason"].dropna()) <= {"missing_values"}
        assert kept["Date"].tolist() == complete["Date"].tolist()
        for column in ("Open", "High", "Low", "Close", "Adj Close", "Volume"):
            np.testing.assert_array_equal(kept[f"_{column}"].to_numpy(), complete[column])


def test_a_date_an_earlier_file_kept_is_rejected_in_the_later_one() -> None:
    """Files in precedence order: a good row repeats a date only if an earlier file *kept* it
    (a date an earlier file rejected is free); rejected rows keep their own reason."""
    rng = np.random.default_rng(7)
    dates = [f"2020-01-{day:02d}" for day in range(1, 29)]
    files = []
    for index in range(3):
        chosen = sorted(rng.choice(dates, size=12, replace=False))
        lines = [f"{d},1,2,0.5,1.5,1.4,{index * 100 + i}" for i, d in enumerate(chosen)]
        lines[0] = lines[0].replace(",1,2,", ",x,2,")  # a bad number: not kept, date stays free
        content = b"\n".join([HEADER, *(line.encode() for line in lines)]) + b"\n"
        folder = ("stocks", "etfs", "other")[index]
        files.append(parse_file(content, f"{folder}/S.csv", today=TODAY, keep_text=True))
    marked = reject_repeated_dates(files)

    kept: set[str] = set()  # the oracle: plain Python over the rows in order
    for before, after in zip(files, marked, strict=True):
        assert after.column("line").to_pylist() == before.column("line").to_pylist()
        for old, new, day in zip(
            before.column("reason").to_pylist(),
            after.column("reason").to_pylist(),
            before.column("Date").to_pylist(),
            strict=True,
        ):
            if old is not None:
                assert new == old
            elif day in kept:
                assert new == "duplicate_date"
            else:
                assert new is None
                kept.add(day)
    assert sum(t.column("reason").null_count for t in marked) == len(kept)
    assert any("duplicate_date" in t.column("reason").to_pylist() for t in marked)


def test_good_files_keeps_exactly_the_files_whose_every_line_is_good() -> None:
    """``good_files`` checks many files at once; each file's verdict and values must be what
    ``parse_file`` says of it alone. A file it does not keep (None) is classified line by line:
    it may still be all good (a Volume spelled 806400.0), but a file with any reject never
    passes. Dates restart in each file: only order within a file counts."""
    real = [(FIXTURES / name).read_bytes() for name in ("stocks/KO.csv", "etfs/VSGX.csv")]
    lines = {
        "good": GOOD,
        "earlier_dates": b"2019-05-01,1,2,0.5,1.5,1.4,7\n2019-05-02,1,2,0.5,1.5,1.4,8",
        "no_such_day": b"2020-02-30,1,2,0.5,1.5,1.4,100",
        "repeated": GOOD + b"\n" + GOOD,
        "negative": b"2020-01-02,1,2,0.5,1.5,1.4,-1",
        "infinite": b"2020-01-02,1,inf,0.5,1.5,1.4,1",
        "empty_value": b"2020-01-02,1,,0.5,1.5,1.4,1",
        "future": b"2026-11-27,1,2,0.5,1.5,1.4,1",
        "whole_float_volume": b"2020-01-02,1,2,0.5,1.5,1.4,806400.0",
        "short_line": b"2020-01-02,1,2",
    }
    contents = [HEADER + b"\n" + body + b"\n" for body in lines.values()]
    contents += [*real, b"", HEADER + b"\n", b"Date,Open\n1,2\n", b"\xef\xbb\xbf" + contents[0]]
    verdicts = good_files(contents, TODAY)
    assert len(verdicts) == len(contents)
    kept = [name for name, rows in zip(lines, verdicts, strict=False) if rows is not None]
    assert kept == ["good", "earlier_dates"]
    assert verdicts[-1] is not None  # the byte order mark is not part of the header
    for content, rows in zip(contents, verdicts, strict=True):
        frame = parse(content)
        if rows is None:
            continue
        assert frame["reason"].isna().all() and len(frame) == rows.num_rows
        assert rows.column("Date").to_pylist() == frame["Date"].tolist()
        for column in ("Open", "High", "Low", "Close", "Adj Close", "Volume"):
            np.testing.assert_array_equal(rows.column(column).to_numpy(), frame[f"_{column}"])


def test_a_day_that_does_not_exist_fails_only_its_own_file() -> None:
    bad = HEADER + b"\n2021-02-29,1,2,0.5,1.5,1.4,100\n"
    good = HEADER + b"\n" + GOOD + b"\n"
    assert [rows is not None for rows in good_files([good, bad, good], TODAY)] == [
        True,
        False,
        True,
    ]


# Lines of every kind the parser treats differently, for the line count's property test.
LINE_KINDS = [
    GOOD,
    GOOD.replace(b"01-02", b"01-03"),
    b"",  # empty: no row
    b" ",
    b"2020-01-08,1,2",
    b'2020-01-03,"1.0,2.0,0.5,1.5,1.4,100',
    b"2020-02-30,1,2,0.5,1.5,1.4,100",
    b"\x00\x00",
    b"x\xff",
]


@settings(max_examples=200, deadline=None)
@given(
    header=st.sampled_from([HEADER, b"\xef\xbb\xbf" + HEADER, b"date,open", b""]),
    lines=st.lists(st.sampled_from(LINE_KINDS), max_size=8),
    end=st.sampled_from([b"\n", b"\r\n", b"\r"]),
    final=st.booleans(),
)
@example(header=HEADER, lines=[LINE_KINDS[5]] * 2, end=b"\n", final=False)  # a quote over 2 lines
def test_the_line_count_from_bytes_is_the_rows_parsing_returns(
    header: bytes, lines: list[bytes], end: bytes, final: bool
) -> None:
    """``count_lines`` (ingest's independent count) agrees with ``parse_file`` on every shape of
    file: a wrong header, empty lines, line ends, a missing final newline, a BOM."""
    content = end.join([header, *lines]) + (end if final else b"")
    assert count_lines(content) == parse_file(content, "stocks/T.csv", today=TODAY).num_rows


# Spellings of a number, each on a line of its own; the verdict is the same for every neighbour.
VOLUME_SPELLINGS = ["7", "806400.0", "00012", "-0", "0x10", "0X1F", " 7", "7 ", "+5", "1e3"]
PRICE_SPELLINGS = ["1.5", "+1.5", ".5", "5.", "1e2", " 1.5", "1.5 ", "0x10", "1_0", "nan"]
NEIGHBOURS = {
    "alone": [],
    "a malformed line": [b"2020-01-08,1,2"],
    "a fractional Volume": [b"2020-01-09,1,2,0.5,1.5,1.4,5.5"],
    "a float-spelled Volume": [b"2020-01-09,1,2,0.5,1.5,1.4,806400.0"],
    "a price that is text": [b"2020-01-09,x,2,0.5,1.5,1.4,5"],
}


@pytest.mark.parametrize(
    "line",
    [f"2020-01-02,1,2,0.5,1.5,1.4,{v}" for v in VOLUME_SPELLINGS]
    + [f"2020-01-02,{v},2,0.5,1.5,1.4,100" for v in PRICE_SPELLINGS],
)
def test_a_lines_verdict_does_not_depend_on_its_neighbours(line: str) -> None:
    """One rule on the fast path (all lines typed at once) and the careful one (value by value,
    whichever way the column's cast goes): ``0x10`` or `` 7`` is rejected alone or not."""
    verdicts = {
        name: parse(HEADER + b"\n" + b"\n".join([line.encode(), *others]) + b"\n")
        .set_index("line")
        .loc[2, ["reason", "_Volume", "_Open"]]
        .astype(str)  # a kept Volume is int64 alone, float64 beside a rejected row's null
        .str.replace(r"\.0$", "", regex=True)
        .tolist()
        for name, others in NEIGHBOURS.items()
    }
    assert len({tuple(v) for v in verdicts.values()}) == 1, verdicts
