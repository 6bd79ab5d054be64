"""The real Kaggle files the project ships (lib/stockvol/kaggle_sample), for the tests.

``REAL_DIR`` is all 52 files. ``quirk_sample()`` is a copy of the eleven that carry the real set's
quirks (a Date-only row, float-spelled Volume, zero volumes, short histories) with the full
``symbols_valid_meta.csv``: the tests that exercise parsing and layouts use it to stay fast.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from stockvol.acquire import BUNDLED_DIR

REAL_DIR = BUNDLED_DIR
QUIRK_FILES = (
    "stocks/AACG.csv",
    "stocks/AAMC.csv",
    "stocks/HBAN.csv",
    "stocks/HBANN.csv",
    "stocks/IOVA.csv",
    "stocks/KO.csv",
    "etfs/AAAU.csv",
    "etfs/IPAY.csv",
    "etfs/VSGX.csv",
    "etfs/VSL.csv",
    "etfs/VSMV.csv",
)


@functools.cache
def quirk_sample() -> Path:
    """A folder in the Kaggle layout with the eleven quirk files (made once per test run)."""
    root = Path(tempfile.mkdtemp(prefix="stockvol-real-quirks-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    for name in (*QUIRK_FILES, "symbols_valid_meta.csv"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REAL_DIR / name, root / name)
    return root
