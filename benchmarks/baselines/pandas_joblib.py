"""Ingest + features the usual single-machine way: pandas per CSV file, in parallel with joblib.

Each worker reads one file, drops incomplete rows and repeated dates, sorts by Date and computes the
30-row rolling mean of Volume and rolling median of Adj Close (pandas' exact median); the parent
concatenates everything and writes ``prices`` and ``features`` as Parquet. A yardstick for the Spark
pipeline's speed and memory, not part of the product (needs the ``bench`` extra: joblib).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from stockvol.schema import (
    ADJ_CLOSE,
    ADJ_CLOSE_ROLLING_MED,
    CSV_COLUMNS,
    DATE,
    PRICE_COLUMNS,
    SECURITY_NAME,
    SYMBOL,
    VOL_MOVING_AVG,
    VOLUME,
)


def symbol_frame(path: Path, name: str | None, window: int) -> pd.DataFrame:
    """One CSV file's valid rows with both features."""
    raw = pd.read_csv(path, dtype={DATE: str})
    raw = raw[list(CSV_COLUMNS)].dropna()
    raw = raw.drop_duplicates(DATE, keep=False).sort_values(DATE)
    raw[VOLUME] = raw[VOLUME].astype(np.int64)
    raw.insert(0, SYMBOL, path.stem)
    raw.insert(1, SECURITY_NAME, name)
    raw[VOL_MOVING_AVG] = raw[VOLUME].rolling(window).mean()
    raw[ADJ_CLOSE_ROLLING_MED] = raw[ADJ_CLOSE].rolling(window).median()
    return raw


def run(raw_dir: Path, out_dir: Path, window: int = 30, jobs: int = -1) -> int:
    """Write ``out_dir/prices.parquet`` and ``out_dir/features.parquet``; the number of rows."""
    from joblib import Parallel, delayed

    meta = pd.read_csv(raw_dir / "symbols_valid_meta.csv", dtype=str)
    names = dict(zip(meta["NASDAQ Symbol"], meta[SECURITY_NAME].str.strip(), strict=True))
    files = sorted(raw_dir.glob("stocks/*.csv")) + sorted(raw_dir.glob("etfs/*.csv"))
    frames = Parallel(n_jobs=jobs)(
        delayed(symbol_frame)(path, names.get(path.stem), window) for path in files
    )
    features = pd.concat(frames, ignore_index=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    prices_columns = [SYMBOL, SECURITY_NAME, DATE, *PRICE_COLUMNS, VOLUME]
    features[prices_columns].to_parquet(out_dir / "prices.parquet", index=False)
    features.to_parquet(out_dir / "features.parquet", index=False)
    return len(features)
