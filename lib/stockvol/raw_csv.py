"""One per-symbol Kaggle CSV file, as bytes, into classified rows: pure Python + pyarrow, no Spark.

Ingest hands every file to this kernel inside a Spark ``mapInArrow`` task. Spark's own CSV reader
parses and casts each value in the JVM one row at a time; here a file is split into lines with
numpy, parsed with Arrow's C++ CSV reader and checked with vectorised Arrow kernels, about ten
times less CPU per row on this workload (docs/ingest.md has the measurement).

Every data line of the file becomes exactly one output row: ``reason`` is null for a good row
(typed values filled) and names the first rule the line breaks otherwise (its raw text kept).
Lines are numbered from 1, the header being line 1.
"""

from __future__ import annotations

import re
from datetime import date

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from stockvol.schema import (
    CSV_COLUMNS,
    DATE,
    LINE,
    PRICE_COLUMNS,
    RAW_LINE,
    REASON,
    SOURCE_FILE,
    SYMBOL,
    VOLUME,
)

HEADER = ",".join(CSV_COLUMNS).encode()
BOM = b"\xef\xbb\xbf"
FIRST_DATE = "1900-01-01"
FIELDS = len(CSV_COLUMNS)

# Reject reasons, in the order they are checked: a line gets the first that applies.
MALFORMED_LINE = "malformed_line"  # not exactly 7 comma-separated fields (an empty line is skipped)
BAD_HEADER = "bad_header"  # the file does not start with the Kaggle header: every line rejected
MISSING_VALUES = "missing_values"  # a field empty or blank
BAD_DATE = "bad_date"  # not a real calendar date written YYYY-MM-DD, or outside 1900..today
BAD_NUMBER = "bad_number"  # a price that is not a finite number, a Volume that is not a whole int64
NEGATIVE_VOLUME = "negative_volume"
DUPLICATE_DATE = "duplicate_date"  # the (Symbol, Date) was already kept from another line
REASONS = (
    MALFORMED_LINE,
    BAD_HEADER,
    MISSING_VALUES,
    BAD_DATE,
    BAD_NUMBER,
    NEGATIVE_VOLUME,
    DUPLICATE_DATE,
)


def typed(name: str) -> str:
    """The typed copy of a CSV column (``_Open``); the raw text keeps the plain name."""
    return f"_{name}"


# Typed values are filled for good rows, raw text (and the whole line) for rejected ones.
PARSED_SCHEMA = pa.schema(
    [
        (SOURCE_FILE, pa.string()),
        (SYMBOL, pa.string()),
        (LINE, pa.int64()),
        (REASON, pa.string()),
        (DATE, pa.string()),
        *((typed(name), pa.float64()) for name in PRICE_COLUMNS),
        (typed(VOLUME), pa.int64()),
        *((name, pa.string()) for name in CSV_COLUMNS if name != DATE),
        (RAW_LINE, pa.string()),
    ]
)

# The one rule for a number, on both paths: a price is written in decimal (an exponent allowed),
# a Volume as a whole decimal number (``806400.0`` too). No hexadecimal (Arrow's integer cast
# takes ``0x10``) and no padding (its CSV reader trims `` 7``): the fast path sends any line
# with a byte outside ``_PLAIN`` to the careful path, which checks each value against these.
_NUMBER = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"
_WHOLE = r"^-?[0-9]+(\.0*)?$"
_PLAIN = b'0123456789,.+-eE"\n'
_INT64_MAX = str(np.iinfo(np.int64).max)
_DATE_SHAPE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
_READ = pacsv.ReadOptions(column_names=list(CSV_COLUMNS), use_threads=False)
# Standard quoting ("1.5"), but a value never spans lines: a stray quote cannot swallow the lines
# after it. A file whose quotes do not parse is read again with quotes as plain characters.
_PARSE = pacsv.ParseOptions(newlines_in_values=False, ignore_empty_lines=False)
_PARSE_UNQUOTED = pacsv.ParseOptions(quote_char=False, double_quote=False, ignore_empty_lines=False)
_CONVERT = pacsv.ConvertOptions(
    column_types={name: pa.string() for name in CSV_COLUMNS},
    strings_can_be_null=False,
    quoted_strings_can_be_null=False,
)
_CONVERT_TYPED = pacsv.ConvertOptions(
    column_types={
        DATE: pa.string(),
        **{name: pa.float64() for name in PRICE_COLUMNS},
        VOLUME: pa.int64(),
    },
    strings_can_be_null=False,
)


def padded_table(
    columns: dict[str, pa.Array], n: int, schema: pa.Schema = PARSED_SCHEMA
) -> pa.Table:
    """``n`` rows of ``schema``: the given columns, every other column null."""
    return pa.table([columns.get(f.name, pa.nulls(n, f.type)) for f in schema], schema=schema)


def constant(value: str | None, n: int) -> pa.Array:
    """``n`` copies of one string (or null): ten times faster than ``pa.array([value] * n)``,
    which builds a Python list first; ingest makes a few per file."""
    return pa.array([value], pa.string()).take(np.zeros(n, dtype=np.int32))


def _file_columns(source_file: str, numbers: np.ndarray) -> dict[str, pa.Array]:
    """What every row of a file carries: its file, its Symbol and its line number."""
    n = len(numbers)
    return {
        SOURCE_FILE: constant(source_file, n),
        SYMBOL: constant(symbol_of(source_file), n),
        LINE: pa.array(numbers, pa.int64()),
    }


def symbol_of(source_file: str) -> str:
    """The Symbol is the file name exactly as it is, without ``.csv``."""
    return re.sub(r"\.csv$", "", source_file.rsplit("/", 1)[-1])


def count_lines(content: bytes) -> int:
    """The rows ``parse_file`` must return for a file, counted from its bytes alone (not from
    any classification), for ingest's conservation check: every line of a file without the
    Kaggle header (all rejected), else every non-empty line after the header."""
    if content.startswith(BOM):
        content = content[len(BOM) :]
    if b"\r" in content:
        content = content.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if not content:
        return 0
    header, _, body = content.partition(b"\n")
    if header != HEADER:
        return content.count(b"\n") + (not content.endswith(b"\n"))
    if not body:
        return 0
    if b"\n\n" not in body and not body.startswith(b"\n"):  # no empty line: the usual file
        return body.count(b"\n") + (not body.endswith(b"\n"))
    if not body.endswith(b"\n"):
        body += b"\n"
    ends = np.flatnonzero(np.frombuffer(body, dtype=np.uint8) == ord("\n"))
    return int(np.count_nonzero(np.diff(ends, prepend=-1) != 1))


def parse_file(content: bytes, source_file: str, today: date, keep_text: bool = False) -> pa.Table:
    """Every data line of one CSV file, classified (``PARSED_SCHEMA``), in line order; a date
    after ``today`` is a bad date (ingest's driver gives its UTC date to every task).

    The raw text of good rows is dropped (null) unless ``keep_text``: a later step may still
    reject them (a date repeated in another file) and must keep what the file said.
    """
    content = _normalized(content)
    header, _, body = content.partition(b"\n")
    if not content:
        return PARSED_SCHEMA.empty_table()
    if header != HEADER:
        lines = content.split(b"\n")
        lines = lines[:-1] if lines[-1] == b"" else lines
        return _rejected_lines(lines, np.arange(1, len(lines) + 1), BAD_HEADER, source_file)
    if not body:
        return PARSED_SCHEMA.empty_table()
    if not body.endswith(b"\n"):
        body += b"\n"
    values = None if keep_text else _typed_rows(body)  # the usual file: all lines good
    if values is not None and all_rows_good([values], today)[0]:
        return _good_table(values, source_file)
    buffer = np.frombuffer(body, dtype=np.uint8)
    ends = np.flatnonzero(buffer == ord("\n"))
    commas_before_end = np.searchsorted(np.flatnonzero(buffer == ord(",")), ends)
    well_formed = np.diff(commas_before_end, prepend=0) == FIELDS - 1
    # An empty line holds no data: skipped, as Spark's and pandas' CSV readers skip it.
    empty = np.diff(ends, prepend=-1) == 1
    numbers = np.arange(2, len(ends) + 2)  # line 1 is the header
    if well_formed.all():
        return _checked(body, numbers, source_file, today, keep_text)
    lines = body.split(b"\n")[:-1]
    malformed = ~well_formed & ~empty
    parts = [
        _rejected_lines(
            [line for line, bad in zip(lines, malformed, strict=True) if bad],
            numbers[malformed],
            MALFORMED_LINE,
            source_file,
        )
    ]
    if well_formed.any():
        good_body = b"\n".join(line for line, ok in zip(lines, well_formed, strict=True) if ok)
        parts.append(
            _checked(good_body + b"\n", numbers[well_formed], source_file, today, keep_text)
        )
    return pa.concat_tables(parts).sort_by(LINE)


def _rejected_lines(
    lines: list[bytes], numbers: np.ndarray, reason: str, source_file: str
) -> pa.Table:
    """Lines rejected whole: only their text is kept."""
    n = len(lines)
    columns = {
        **_file_columns(source_file, numbers),
        REASON: constant(reason, n),
        RAW_LINE: pa.array([line.decode("utf-8") for line in lines], pa.string()),
    }
    return padded_table(columns, n)


def _normalized(content: bytes) -> bytes:
    """The text every rule reads: no byte order mark, ``\\n`` line ends (CRLF and CR, as Python's
    splitlines() and Spark's reader see them), U+FFFD where a byte was not UTF-8."""
    if content.startswith(BOM):
        content = content[len(BOM) :]
    if b"\r" in content:
        content = content.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    try:
        content.decode("utf-8")
    except UnicodeDecodeError:  # keep the line, with U+FFFD where a byte was not UTF-8
        content = content.decode("utf-8", errors="replace").encode("utf-8")
    return content


def good_files(contents: list[bytes], today: date) -> list[pa.Table | None]:
    """Per whole file: its rows typed (``Date`` text, prices float64, ``Volume`` int64, the CSV
    column names) when it has the Kaggle header and every line is good; None otherwise, for
    ``parse_file`` to classify line by line. The usual file takes this path.

    Each file is parsed on its own (a bad value fails only its file), but the checks run once
    over all the files' rows: a dozen Arrow calls per file cost more than parsing it.
    """
    parsed = []
    for content in contents:
        header, _, body = _normalized(content).partition(b"\n")
        parsed.append(_typed_rows(body) if header == HEADER else None)
    verdicts = iter(all_rows_good([table for table in parsed if table is not None], today))
    return [table if table is not None and next(verdicts) else None for table in parsed]


def _typed_rows(body: bytes) -> pa.Table | None:
    """The lines after the header parsed straight to types; None if a line is not 7 fields, a
    value does not convert or is empty, or a byte is one no good line has (the careful path then
    says which rule it breaks)."""
    if not body or body.translate(None, _PLAIN):
        return None
    if not body.endswith(b"\n"):
        body += b"\n"
    try:
        table = pacsv.read_csv(
            pa.py_buffer(body),
            read_options=_READ,
            parse_options=_PARSE,
            convert_options=_CONVERT_TYPED,
        ).combine_chunks()
    except pa.ArrowInvalid:
        return None
    if not table.num_rows or any(column.null_count for column in table.columns):
        return None  # an empty number
    return table


def all_rows_good(tables: list[pa.Table], today: date) -> list[bool]:
    """Per typed table (``_typed_rows``, at least one row each): True if every row keeps every
    rule: a real date within 1900-01-01..today, later than the row before it, finite prices and
    a Volume of at least 0."""
    if not tables:
        return []
    sizes = np.array([table.num_rows for table in tables])
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    rows = pa.concat_tables(tables).combine_chunks()
    dates = rows.column(DATE)
    ok = _is_true(
        pc.and_(pc.greater_equal(dates, FIRST_DATE), pc.less_equal(dates, today.isoformat()))
    )
    later = np.ones(len(rows), dtype=bool)
    later[1:] = _is_true(pc.greater(dates[1:], dates[:-1]))
    later[starts] = True  # a file's first row follows no row of its own
    ok &= later  # a repeated date, or lines out of order: the careful path decides
    for name in PRICE_COLUMNS:
        ok &= _is_true(pc.is_finite(rows.column(name)))
    ok &= _is_true(pc.greater_equal(rows.column(VOLUME), 0))
    good = np.logical_and.reduceat(ok, starts)
    try:
        pc.cast(dates, pa.date32())  # Arrow's ISO parser: exact shape, real day of the month
    except pa.ArrowInvalid:  # some file has a date that is no real day: find it
        good &= [_casts(table.column(DATE), pa.date32()) for table in tables]
    return good.tolist()


def _casts(values: pa.ChunkedArray, to: pa.DataType) -> bool:
    try:
        pc.cast(values, to)
    except pa.ArrowInvalid:
        return False
    return True


def _good_table(rows: pa.Table, source_file: str) -> pa.Table:
    """A file's typed rows, all good, as ``PARSED_SCHEMA`` rows (the text columns null)."""
    n = rows.num_rows
    columns = {
        **_file_columns(source_file, np.arange(2, n + 2)),  # line 1 is the header
        DATE: rows.column(DATE),
        **{typed(name): rows.column(name) for name in (*PRICE_COLUMNS, VOLUME)},
    }
    return padded_table(columns, n)


def _checked(
    body: bytes, numbers: np.ndarray, source_file: str, today: date, keep_text: bool
) -> pa.Table:
    """Every value as text, checked rule by rule: the path for files with a bad line."""
    try:
        raw = pacsv.read_csv(
            pa.py_buffer(body), read_options=_READ, parse_options=_PARSE, convert_options=_CONVERT
        )
    except pa.ArrowInvalid:
        raw = None
    # Two stray quotes on different lines can still parse, as one value over both lines.
    if raw is None or raw.num_rows != len(numbers):
        raw = pacsv.read_csv(
            pa.py_buffer(body),
            read_options=_READ,
            parse_options=_PARSE_UNQUOTED,
            convert_options=_CONVERT,
        )
    n = raw.num_rows
    text = {
        name: pa.concat_arrays(raw.column(name).chunks or [pa.array([], pa.string())])
        for name in raw.column_names
    }
    missing = np.zeros(n, dtype=bool)
    for column in text.values():
        missing |= _is_true(pc.equal(pc.utf8_trim_whitespace(column), ""))
    date_ok = _real_dates(text[DATE], today)
    prices = {name: _to_float(text[name]) for name in PRICE_COLUMNS}
    prices_ok = np.ones(n, dtype=bool)
    for values in prices.values():
        prices_ok &= _is_true(pc.is_finite(values))
    volume = _to_int64(text[VOLUME])
    volume_ok = _is_true(pc.is_valid(volume))
    negative = _is_true(pc.less(volume, 0))
    codes = np.select(
        [missing, ~date_ok, ~(prices_ok & volume_ok), negative],
        [REASONS.index(r) for r in (MISSING_VALUES, BAD_DATE, BAD_NUMBER, NEGATIVE_VOLUME)],
        default=-1,
    )
    good = codes < 0
    # A date repeated in one file: the first line keeps it (dates of good rows are valid
    # YYYY-MM-DD, so a strictly increasing file, the usual case, needs no hashing).
    dates = text[DATE]
    good_dates = dates.filter(pa.array(good))
    if len(good_dates) > 1 and not _is_true(pc.greater(good_dates[1:], good_dates[:-1])).all():
        repeated = np.zeros(n, dtype=bool)
        first_seen = pd.Series(good_dates.to_numpy(zero_copy_only=False)).duplicated()
        repeated[good] = first_seen.to_numpy()
        codes[repeated] = REASONS.index(DUPLICATE_DATE)
        good = codes < 0
    keep, text_kept = pa.array(good), pa.array(~good | keep_text)
    reason_names = np.array(REASONS, dtype=object)
    reason = pa.array(np.where(good, None, reason_names[np.maximum(codes, 0)]), pa.string())
    whole_line = pc.binary_join_element_wise(*text.values(), ",")
    columns = {
        **_file_columns(source_file, numbers),
        REASON: reason,
        DATE: dates,
        **{typed(name): _where(keep, values) for name, values in prices.items()},
        typed(VOLUME): _where(keep, volume),
        **{name: _where(text_kept, text[name]) for name in CSV_COLUMNS if name != DATE},
        RAW_LINE: _where(text_kept, whole_line),
    }
    return padded_table(columns, n)


def _is_true(mask: pa.Array) -> np.ndarray:
    """A boolean Arrow array as numpy, null counting as False."""
    return pc.fill_null(mask, False).to_numpy(zero_copy_only=False)


def _where(mask: pa.Array, values: pa.Array) -> pa.Array:
    """``values`` where ``mask``, null elsewhere."""
    return pc.if_else(mask, values, pa.nulls(len(values), values.type))


def _real_dates(text: pa.Array, today: date) -> np.ndarray:
    """Strictly ``YYYY-MM-DD``, a real calendar date, within 1900-01-01..today."""
    try:
        pc.cast(text, pa.date32())  # Arrow's ISO parser: exact shape, real day of the month
        real = np.ones(len(text), dtype=bool)
    except pa.ArrowInvalid:  # the rare file with a bad date: value by value
        real = np.array([_is_real_date(value) for value in text.to_pylist()], dtype=bool)
    # Real dates in this shape compare as text in calendar order.
    in_range = pc.and_(pc.greater_equal(text, FIRST_DATE), pc.less_equal(text, today.isoformat()))
    return real & _is_true(in_range)


def _is_real_date(value: str) -> bool:
    if not re.fullmatch(_DATE_SHAPE, value):
        return False
    try:
        date.fromisoformat(value)
    except ValueError:
        return False
    return True


def _to_float(text: pa.Array) -> pa.Array:
    """Doubles; null where the text is not a decimal number (``_NUMBER``), whatever the column's
    other values (an overflow to inf stays, and fails the finite check)."""
    number = pc.match_substring_regex(text, _NUMBER)
    return _where(number, pc.cast(pc.if_else(number, text, "0"), pa.float64()))


def _to_int64(text: pa.Array) -> pa.Array:
    """A whole Volume as int64 (``806400.0`` too); null where not whole (``_WHOLE``) or beyond
    int64, whatever the column's other values."""
    whole = _is_true(pc.match_substring_regex(text, _WHOLE))
    digits = pc.replace_substring_regex(text, r"\.0*$", "")
    magnitude = pc.replace_substring_regex(digits, r"^-", "")
    length = pc.utf8_length(magnitude).to_numpy(zero_copy_only=False)
    fits = (length < len(_INT64_MAX)) | (
        (length == len(_INT64_MAX)) & _is_true(pc.less_equal(magnitude, _INT64_MAX))
    )
    ok = pa.array(whole & fits)
    return _where(ok, pc.cast(pc.if_else(ok, digits, "0"), pa.int64()))


def reject_repeated_dates(tables: list[pa.Table]) -> list[pa.Table]:
    """The parsed files of one Symbol, in precedence order (stocks/ before etfs/, then by name):
    a good row whose Date an earlier file already kept becomes a ``duplicate_date`` reject.
    Parse such files with ``keep_text`` so the reject keeps what the file said."""
    kept_dates: pa.Array = pa.array([], pa.string())
    marked = []
    for table in tables:
        good = pc.is_null(table.column(REASON))
        repeated = pc.and_(good, pc.is_in(table.column(DATE), value_set=kept_dates))
        if _is_true(repeated).any():
            reason = pc.if_else(repeated, DUPLICATE_DATE, table.column(REASON))
            table = table.set_column(table.schema.get_field_index(REASON), REASON, reason)
            good = pc.and_(good, pc.invert(repeated))
        kept_dates = pa.concat_arrays(
            [kept_dates, table.column(DATE).filter(good).combine_chunks()]
        )
        marked.append(table)
    return marked
