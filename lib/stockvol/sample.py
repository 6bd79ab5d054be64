"""Deterministic synthetic data in the exact Kaggle "Stock Market Dataset" layout.

``generate_sample(dest, symbols, seed)`` writes ``dest/stocks/*.csv``, ``dest/etfs/*.csv`` and
``dest/symbols_valid_meta.csv`` byte for byte as the real set spells them (pandas ``to_csv``
formatting, the twelve meta columns) with the real set's quirks. numpy and pyarrow only, no Spark.
The same seed gives byte-identical files, whatever the number of worker processes.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import os
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from pandas.tseries.holiday import (
    AbstractHolidayCalendar,
    GoodFriday,
    Holiday,
    USLaborDay,
    USMartinLutherKingJr,
    USMemorialDay,
    USPresidentsDay,
    USThanksgivingDay,
    nearest_workday,
)

from stockvol.schema import CSV_COLUMNS, META_COLUMNS

META_FILE = "symbols_valid_meta.csv"
STOCKS, ETFS = "stocks", "etfs"
END_DATE = "2020-04-01"  # the Kaggle snapshot's last trading day
FULL_HISTORY_ROWS = 14663  # 1962-01-02..2020-04-01, the longest real histories (AA, DIS, JNJ, PG)
MIN_HISTORY_ROWS = 150
ETF_SHARE = 2165 / 8049  # as in the real meta file
HEADER = (",".join(CSV_COLUMNS) + "\n").encode()
INT32_MAX = 2**31 - 1
# The real set's date-only rows fall on 2001-09-12, a day the exchanges were closed.
DATE_ONLY_DAY = "2001-09-12"
# Exchange closures beyond the regular holidays, so the calendar has the real set's gaps.
SPECIAL_CLOSURES = (
    "1985-09-27",
    "1994-04-27",
    "2001-09-11",
    "2001-09-12",
    "2001-09-13",
    "2001-09-14",
    "2004-06-11",
    "2007-01-02",
    "2012-10-29",
    "2012-10-30",
    "2018-12-05",
)

# Each quirk slot is one symbol; a sample of N symbols holds the first min(N, 10) slots, so every
# quirk is present once N >= QUIRK_MIN_SYMBOLS. Ordered by how much ingest depends on them.
QUIRK_SLOTS: tuple[tuple[str, ...], ...] = (
    ("date_only_row", "float_volume"),  # `2001-09-12,,,,,,` and the whole Volume column `806400.0`
    ("header_only",),  # in the meta file, no data rows
    ("nasdaq_symbol_differs",),  # file AGM-A.csv, meta Symbol AGM$A
    ("mostly_zero_volume",),  # a thin ETF: most days trade nothing (real VSL: 2320 of 2623)
    ("open_zero",),  # Open == 0.0 on the early rows, a Yahoo artefact
    ("in_both_folders",),  # the same file in stocks/ and etfs/
    ("dot_in_file_name",),  # LGF.B.csv
    ("short_history", "nasdaq_symbol_differs"),  # CARR#.csv (meta CARR.V), 10 rows: < one window
    ("trailing_space_name",),  # Security Name ends with a space
    ("volume_above_int32",),  # Volume > 2,147,483,647: needs a 64-bit column
)
QUIRK_MIN_SYMBOLS = len(QUIRK_SLOTS)
QUIRKS = tuple(dict.fromkeys(tag for slot in QUIRK_SLOTS for tag in slot)) + ("zero_volume_rows",)

# Fixed names for the quirks that are about names: meta Symbol, file name (= NASDAQ Symbol), CQS
# Symbol and how the Security Name ends, as the real AGM$A, LGF.B and CARR.V rows have them.
_NAMED = {
    2: ("AGM$A", "AGM-A", "AGMpA", "5.875% Non-Cumulative Preferred Stock, Series A"),
    6: ("LGF.B", "LGF.B", "LGF.B", "Class B Non-Voting Shares"),
    7: ("CARR.V", "CARR#", "CARRw", "Common Stock When Issued"),
}
_RESERVED = {"CON", "PRN", "AUX", "NUL", "AGM", "LGF", "CARR"}

_WORDS_A_TEXT = """
Acme Alder Apex Arbor Aster Atlas Beacon Birch Bluewater Boreal Cedar Cinder Coastal Cobalt
Crescent Delta Ember Evergreen Falcon Fjord Granite Harbor Helix Horizon Ironwood Juniper
Keystone Lakeside Lumen Maple Meridian Nimbus Northgate Oakmont Orion Pinnacle Quarry
Redwood Sable Summit Tidewater Vertex Willow Zenith
"""
_WORDS_A = tuple(_WORDS_A_TEXT.split())
_WORDS_B_TEXT = """
Aerospace Bancorp Biosciences Brands Capital Communications Data Devices Energy Financial
Foods Health Holdings Industries Logistics Materials Media Medical Minerals Networks
Pharmaceuticals Properties Resources Retail Semiconductor Software Systems Technologies
Therapeutics Utilities
"""
_WORDS_B = tuple(_WORDS_B_TEXT.split())
_STOCK_SUFFIX = (
    "Inc. Common Stock",
    "Corporation Common Stock",
    "Inc. - Class A Common Stock",
    "Ltd. - American Depositary Shares",
    "Holdings, Inc. Common Stock",
    "Group Inc. Common Shares",
)
_ETF_THEME = (
    "Total Market",
    "Dividend Growth",
    "Short-Term Treasury",
    "Emerging Markets",
    "Small-Cap Value",
    "Clean Energy",
    "Gold Trust",
    "Momentum Factor",
    "Municipal Bond",
    "International Equity",
)
# Category distributions of the real meta file, per ETF flag (stocks, ETFs).
_EXCHANGES = {
    False: ("QNAPZ", (0.508, 0.428, 0.043, 0.018, 0.003)),
    True: ("PQZA", (0.663, 0.182, 0.154, 0.001)),
}
_MARKET_CATEGORY = ("QGS", (0.452, 0.266, 0.282))
_FIN_STATUS = ("NDEH", (0.941, 0.056, 0.002, 0.001))


@dataclass(frozen=True)
class SymbolSpec:
    """One symbol of the sample: its meta row, where its file goes and how long its history is."""

    index: int
    symbol: str
    file_name: str
    etf: bool
    rows: int
    security_name: str
    exchange: str
    market_category: str
    financial_status: str
    cqs_symbol: str
    round_lot: float = 100.0
    next_shares: str = "N"
    quirks: tuple[str, ...] = ()

    @property
    def folders(self) -> tuple[str, ...]:
        if "in_both_folders" in self.quirks:
            return (STOCKS, ETFS)
        return (ETFS,) if self.etf else (STOCKS,)

    @property
    def paths(self) -> tuple[str, ...]:
        """Paths of its file(s) relative to the raw directory."""
        return tuple(f"{folder}/{self.file_name}.csv" for folder in self.folders)


@dataclass
class SampleReport:
    """What generate_sample wrote."""

    dest: Path
    symbols: int
    seed: int
    rows_multiplier: float
    files: int = 0
    stocks_files: int = 0
    etfs_files: int = 0
    rows: int = 0  # data rows over all CSV files (a file in both folders counts twice)
    zero_volume_rows: int = 0
    bytes: int = 0
    seconds: float = 0.0
    workers: int = 1
    quirks: dict[str, list[str]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["dest"] = str(self.dest)
        return out

    def lines(self) -> list[str]:
        """A short human-readable account: totals, then one line per quirk."""
        head = (
            f"sample: {self.symbols} symbols (seed {self.seed}, rows x{self.rows_multiplier:g}) -> "
            f"{self.dest}: {self.files} files "
            f"({self.stocks_files} stocks, {self.etfs_files} etfs), "
            f"{self.rows:,} rows, {self.bytes / 1e6:,.1f} MB, {self.seconds:.1f} s, "
            f"{self.workers} worker(s)"
        )
        quirks = [f"  quirk {name}: {', '.join(where)}" for name, where in self.quirks.items()]
        missing = [name for name in QUIRKS if name not in self.quirks]
        if missing:
            quirks.append(
                f"  quirks absent (need >= {QUIRK_MIN_SYMBOLS} symbols): {', '.join(missing)}"
            )
        return [head, *quirks]


# --------------------------------------------------------------------------------------------
# Planning: the symbol universe and its meta rows, decided up front from the seed alone.


def _tickers(rng: np.random.Generator, count: int) -> list[str]:
    """Unique ticker-like names with the real set's length mix (mostly 3-4 letters)."""
    lengths = (1, 2, 3, 4, 5)
    weights = np.array([21, 250, 2859, 4634, 284], dtype=float)
    letters = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    names: list[str] = []
    seen: set[str] = set(_RESERVED)
    while len(names) < count:
        batch = max(64, 2 * (count - len(names)))
        sizes = rng.choice(lengths, size=batch, p=weights / weights.sum())
        picks = rng.integers(0, 26, size=(batch, 5))
        for size, row in zip(sizes, picks, strict=True):
            name = "".join(letters[row[:size]])
            if name not in seen:
                seen.add(name)
                names.append(name)
                if len(names) == count:
                    break
    return names


def _history_lengths(rng: np.random.Generator, count: int, rows_multiplier: float) -> np.ndarray:
    """Rows per symbol: lognormal, a few hundred to 14,663 (1962-2020), mean about 3,500."""
    raw = np.clip(
        rng.lognormal(math.log(2250), 1.0, size=count), MIN_HISTORY_ROWS, FULL_HISTORY_ROWS
    )
    return np.maximum(np.rint(raw * rows_multiplier), 1).astype(np.int64)


def _choice(rng: np.random.Generator, spec: tuple[str, tuple[float, ...]]) -> str:
    values, weights = spec
    p = np.asarray(weights) / sum(weights)
    return str(values[rng.choice(len(values), p=p)])


def _security_name(rng: np.random.Generator, etf: bool) -> str:
    a, b = rng.choice(_WORDS_A), rng.choice(_WORDS_B)
    if etf:
        return f"{a} {rng.choice(_ETF_THEME)} ETF"
    suffix = rng.choice(_STOCK_SUFFIX)
    # A comma makes pandas quote the field, as in the real file ("Agilent Technologies, Inc. ...").
    return f"{a} {b}, {suffix}" if rng.random() < 0.2 else f"{a} {b} {suffix}"


def check_sample_args(symbols: int, seed: int, rows_multiplier: float) -> None:
    """Raise ValueError naming the first invalid generator argument."""
    if symbols < 1:
        raise ValueError(f"symbols must be at least 1, got {symbols}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not 0 < rows_multiplier <= 20:
        raise ValueError(f"rows multiplier must be in (0, 20], got {rows_multiplier}")


def plan_sample(symbols: int, seed: int, rows_multiplier: float = 1.0) -> list[SymbolSpec]:
    """Decide every symbol's meta row, file and history length (cheap: nothing is written)."""
    check_sample_args(symbols, seed, rows_multiplier)
    rng = np.random.default_rng([seed, 0x5EED])
    names = _tickers(rng, symbols)
    lengths = _history_lengths(rng, symbols, rows_multiplier)
    etf_flags = rng.random(symbols) < ETF_SHARE
    specs = []
    for i in range(symbols):
        quirks = QUIRK_SLOTS[i] if i < QUIRK_MIN_SYMBOLS else ()
        etf = bool(etf_flags[i]) if not quirks else "mostly_zero_volume" in quirks
        rows = int(lengths[i])
        symbol = file_name = names[i]
        exchange = _choice(rng, _EXCHANGES[etf])
        name = _security_name(rng, etf)
        cqs = None
        if i in _NAMED:
            symbol, file_name, cqs, kind = _NAMED[i]
            exchange = "N"
            name = f"{rng.choice(_WORDS_A)} {rng.choice(_WORDS_B)} Corporation {kind}"
        if "trailing_space_name" in quirks or rng.random() < 0.012:
            name += " "  # 96 of the real 8049 names end with a space
        if "short_history" in quirks:
            rows = 10  # a when-issued line listed days before the snapshot
        elif "header_only" in quirks:
            rows = 0
        elif "date_only_row" in quirks or "open_zero" in quirks:
            # Long enough to reach back to 2001-09-12, and to have "early rows" for Open == 0.0.
            rows = max(rows, int(FULL_HISTORY_ROWS * max(rows_multiplier, 0.5)))
        category = _choice(rng, _MARKET_CATEGORY) if exchange == "Q" else " "
        status = _choice(rng, _FIN_STATUS) if exchange == "Q" else ""
        lot = 100.0 if rng.random() > 0.0007 else 10.0
        specs.append(
            SymbolSpec(
                index=i,
                symbol=symbol,
                file_name=file_name,
                etf=etf,
                rows=rows,
                security_name=name,
                exchange=exchange,
                market_category=category,
                financial_status=status,
                cqs_symbol=cqs if cqs is not None else ("" if exchange == "Q" else symbol),
                round_lot=lot,
                quirks=quirks,
            )
        )
    return specs


def meta_frame(specs: Iterable[SymbolSpec]) -> pd.DataFrame:
    """symbols_valid_meta.csv as a DataFrame, sorted by Symbol like the real file."""
    rows = [
        (
            "Y",
            s.symbol,
            s.security_name,
            s.exchange,
            s.market_category,
            "Y" if s.etf else "N",
            s.round_lot,
            "N",
            s.financial_status or None,
            s.cqs_symbol or None,
            s.file_name,
            s.next_shares,
        )
        for s in specs
    ]
    frame = pd.DataFrame(rows, columns=list(META_COLUMNS))
    return frame.sort_values("Symbol", kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Per-symbol series: a price random walk and a persistent, per-symbol volume level.


class _ExchangeHolidays(AbstractHolidayCalendar):
    rules = [
        Holiday("New Year's Day", month=1, day=1, observance=nearest_workday),
        USMartinLutherKingJr,
        USPresidentsDay,
        GoodFriday,
        USMemorialDay,
        Holiday("Independence Day", month=7, day=4, observance=nearest_workday),
        USLaborDay,
        USThanksgivingDay,
        Holiday("Christmas", month=12, day=25, observance=nearest_workday),
    ]


@functools.lru_cache(maxsize=4)
def trading_days(rows: int) -> pa.Array:
    """The last ``rows`` trading days up to 2020-04-01 as YYYY-MM-DD strings (oldest first)."""
    end = np.datetime64(END_DATE, "D")
    start = end - np.timedelta64(int(rows * 1.5) + 60, "D")
    holidays = _ExchangeHolidays().holidays(pd.Timestamp(start), pd.Timestamp(end))
    closed = np.concatenate(
        [holidays.to_numpy().astype("datetime64[D]"), np.array(SPECIAL_CLOSURES, "datetime64[D]")]
    )
    days = np.arange(start, end + 1)
    days = days[np.is_busday(days, holidays=closed)]
    if len(days) < rows:
        raise ValueError(f"calendar too short for {rows} rows")
    return pa.array(days[-rows:].astype(str), pa.string())


def ar1_filter(shocks: np.ndarray, phi: float, block: int = 64) -> np.ndarray:
    """y[0] = shocks[0], y[t] = phi * y[t-1] + shocks[t]: the AR(1) recursion, vectorised.

    Within a block, y = phi^k * cumsum(shocks * phi^-k) (phi^-64 stays small for phi >= 0.9, so
    nothing overflows or loses precision); a short loop carries the state from block to block.
    """
    n = len(shocks)
    blocks = -(-n // block)
    padded = np.zeros(blocks * block)
    padded[:n] = shocks
    powers = phi ** np.arange(block)
    within = np.cumsum(padded.reshape(blocks, block) / powers, axis=1) * powers
    carry = np.zeros(blocks)  # y just before each block
    last = within[:, -1]
    step = phi**block
    for b in range(1, blocks):
        carry[b] = last[b - 1] + step * carry[b - 1]
    return (within + np.outer(carry, powers * phi)).ravel()[:n]


def _ar1(rng: np.random.Generator, n: int, phi: float, sd: float) -> np.ndarray:
    """A stationary AR(1) series with lag-one coefficient phi and standard deviation sd."""
    shocks = rng.normal(0.0, sd * math.sqrt(1.0 - phi * phi), n)
    shocks[0] = rng.normal(0.0, sd)  # start in the stationary distribution
    return ar1_filter(shocks, phi)


def symbol_series(spec: SymbolSpec, seed: int) -> dict[str, np.ndarray]:
    """Open/High/Low/Close/Adj Close (float32 precision, as Yahoo's) and Volume for one symbol."""
    rng = np.random.default_rng([seed, spec.index])
    n = spec.rows
    t = np.arange(n) / max(n - 1, 1) - 1.0  # -1 at the first row, 0 at the last
    sigma = rng.uniform(0.005, 0.015) if spec.etf else rng.uniform(0.01, 0.035)
    drift = float(np.clip(rng.normal(0.06, 0.08) * n / 252, -3.0, 4.5))
    last_close = float(np.clip(rng.lognormal(math.log(30), 1.1), 0.5, 2000.0))
    wander = _ar1(rng, n, 0.998, sigma / math.sqrt(1 - 0.998**2))
    close = np.maximum(last_close * np.exp(drift * t + wander - wander[-1]), 0.01)
    prev = np.concatenate([close[:1], close[:-1]])
    open_ = prev * np.exp(rng.normal(0.0, 0.35 * sigma, n))
    high = np.maximum(open_, close) * np.exp(np.abs(rng.normal(0.0, 0.6 * sigma, n)))
    low = np.minimum(open_, close) * np.exp(-np.abs(rng.normal(0.0, 0.6 * sigma, n)))
    dividend_yield = rng.uniform(0.0, 0.03) if rng.random() < 0.5 else 0.0
    adj = close * np.exp(dividend_yield * t * n / 252)  # <= close: dividends paid since

    # Volume: a per-symbol level, a slow trend and an AR(1) deviation that persists for weeks,
    # plus day-to-day noise with occasional spikes (news days), so the 30-day mean sits above the
    # typical day, as in the real set; a trailing 30-day mean is a good predictor. Calibrated on
    # the real files (tests/test_sample.py: spread across symbols, log(Volume / average), its
    # lag-1 autocorrelation).
    level = rng.lognormal(math.log(1e5 if spec.etf else 3e5), 2.8)
    phi = rng.uniform(0.95, 0.995)
    persistent = _ar1(rng, n, phi, rng.uniform(0.3, 0.6))
    # At most e^3 (20x) above the day's level: the heaviest real news days.
    spikes = np.where(rng.random(n) < 0.05, np.minimum(rng.exponential(0.8, n), 3.0), 0.0)
    # Busy days cluster: the daily part is itself autocorrelated over a few days.
    noise = _ar1(rng, n, rng.uniform(0.1, 0.35), rng.uniform(0.2, 0.4)) + spikes
    growth = rng.uniform(0.0, 2.0) * t
    p_zero = rng.uniform(0.002, 0.1) if rng.random() < 0.15 else 0.0
    zero_draw = rng.random(n)
    level = min(max(level, 300.0), 2e8)
    if "mostly_zero_volume" in spec.quirks:
        level, p_zero = 2000.0, 0.88
    elif "volume_above_int32" in spec.quirks:
        level, p_zero = 6e8, 0.0
    if level < 3000:
        p_zero += 0.2  # thin names have many days without a trade
    volume = np.rint(level * np.exp(persistent + noise + growth)).astype(np.int64)
    volume[zero_draw < p_zero] = 0
    if "volume_above_int32" in spec.quirks and n:
        peak = int(np.argmax(volume))
        volume[peak] = max(int(volume[peak]), INT32_MAX + 1 + int(rng.integers(1, 10**8)))

    def f32(x: np.ndarray) -> np.ndarray:
        return x.astype(np.float32).astype(np.float64)  # monotone: keeps High >= Low etc.

    out = {"Open": f32(open_), "High": f32(high), "Low": f32(low), "Close": f32(close)}
    out["Adj Close"] = f32(adj)
    if "open_zero" in spec.quirks:
        out["Open"][: int(0.35 * n)] = 0.0
    out["Volume"] = volume
    return out


def format_floats(values: np.ndarray) -> pa.Array:
    """Floats as pandas ``to_csv`` spells them (Python repr: ``0.0``, ``806400.0``); NaN -> null."""
    missing = np.isnan(values)
    text = pc.cast(pa.array(values, mask=missing), pa.string())
    # Arrow's shortest round-trip digits equal repr's, except that it drops the ".0" of integers.
    whole = values == np.trunc(values)
    if whole.any():
        text = pc.if_else(pa.array(whole), pc.binary_join_element_wise(text, ".0", ""), text)
    # Below 1e-4 and from 1e16 up the two notations differ; use repr for those rare values.
    magnitude = np.abs(np.where(missing, 1.0, values))
    odd = ((magnitude < 1e-4) & (values != 0)) | (magnitude >= 1e16)
    if odd.any():
        fixed = text.to_pylist()
        for i in np.flatnonzero(odd):
            fixed[i] = repr(float(values[i]))
        text = pa.array(fixed, pa.string())
    return text


def symbol_csv(spec: SymbolSpec, seed: int, calendar: pa.Array) -> tuple[list[Any], int, int]:
    """One symbol's file as byte chunks (header, body), its data rows and zero-volume rows."""
    if spec.rows == 0:
        return [HEADER], 0, 0
    series = symbol_series(spec, seed)
    dates = calendar.slice(len(calendar) - spec.rows)
    volume = series.pop("Volume")
    zero_rows = int((volume == 0).sum())
    n = spec.rows
    if "date_only_row" in spec.quirks:
        # Insert the empty row in date order; its NaN makes pandas write every Volume as a float.
        at = int(np.searchsorted(np.asarray(dates.to_pylist()), DATE_ONLY_DAY))
        dates = pa.concat_arrays([dates.slice(0, at), pa.array([DATE_ONLY_DAY]), dates.slice(at)])
        series = {k: np.insert(v, at, np.nan) for k, v in series.items()}
        volume_text = format_floats(np.insert(volume.astype(np.float64), at, np.nan))
        n += 1
    else:
        volume_text = pa.array(volume)
    # One cast for the five price columns: Arrow's per-call overhead is not negligible here.
    text = format_floats(np.concatenate([series[name] for name in CSV_COLUMNS[1:6]]))
    columns = {name: text.slice(i * n, n) for i, name in enumerate(CSV_COLUMNS[1:6])}
    table = pa.table({"Date": dates, **columns, "Volume": volume_text})
    sink = pa.BufferOutputStream()
    pacsv.write_csv(table, sink, pacsv.WriteOptions(include_header=False, quoting_style="none"))
    return [HEADER, sink.getvalue()], table.num_rows, zero_rows


def _write_chunk(
    dest: str, specs: Sequence[SymbolSpec], seed: int, calendar_rows: int
) -> list[tuple[int, int, int]]:
    """Write a chunk of symbols' files; return (bytes, rows, zero-volume rows) per file."""
    calendar = trading_days(calendar_rows)
    out = []
    for spec in specs:
        chunks, rows, zeros = symbol_csv(spec, seed, calendar)
        size = sum(len(c) for c in chunks)
        for rel in spec.paths:
            with open(Path(dest, rel), "wb") as handle:
                for chunk in chunks:
                    handle.write(chunk)
            out.append((size, rows, zeros))
    return out


def _chunks(specs: Sequence[SymbolSpec], size: int) -> list[Sequence[SymbolSpec]]:
    return [specs[i : i + size] for i in range(0, len(specs), size)]


def default_workers(symbols: int) -> int:
    """One process for small samples (start-up costs more than it saves), else one per core."""
    return 1 if symbols < 400 else max(1, min(os.cpu_count() or 1, 8))


def generate_sample(
    dest_raw_dir: Path,
    symbols: int,
    seed: int,
    rows_multiplier: float = 1.0,
    workers: int | None = None,
) -> SampleReport:
    """Write the sample into ``dest_raw_dir`` (created; its layout files must not exist yet)."""
    started = time.perf_counter()
    specs = plan_sample(symbols, seed, rows_multiplier)
    dest = Path(dest_raw_dir)
    for folder in (STOCKS, ETFS):
        (dest / folder).mkdir(parents=True, exist_ok=False)
    workers = workers or default_workers(symbols)
    calendar_rows = max(s.rows for s in specs)
    # Largest first, so the pool's last tasks are short ones.
    order = sorted(specs, key=lambda s: -s.rows)
    if workers == 1:
        results = _write_chunk(str(dest), order, seed, calendar_rows)
    else:
        chunks = _chunks(order, 16)
        # spawn, not fork: a forked child can inherit Arrow's thread pool in a locked state.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            parts = pool.map(
                _write_chunk,
                [str(dest)] * len(chunks),
                chunks,
                [seed] * len(chunks),
                [calendar_rows] * len(chunks),
            )
            results = [item for part in parts for item in part]
    meta = meta_frame(specs).to_csv(index=False).encode()
    (dest / META_FILE).write_bytes(meta)

    report = SampleReport(dest=dest, symbols=symbols, seed=seed, rows_multiplier=rows_multiplier)
    report.workers = workers
    report.files = len(results)
    report.stocks_files = sum(STOCKS in s.folders for s in specs)
    report.etfs_files = sum(ETFS in s.folders for s in specs)
    report.rows = sum(r[1] for r in results)
    report.zero_volume_rows = sum(r[2] for r in results)
    report.bytes = sum(r[0] for r in results) + len(meta)
    for spec in specs:
        for quirk in spec.quirks:
            where = report.quirks.setdefault(quirk, [])
            where.extend(spec.paths)
            if quirk in ("nasdaq_symbol_differs", "trailing_space_name"):
                where[-1] += f" (meta Symbol {spec.symbol!r}, Security Name {spec.security_name!r})"
    if report.zero_volume_rows:
        report.quirks["zero_volume_rows"] = [f"{report.zero_volume_rows} rows"]
    report.seconds = time.perf_counter() - started
    return report
