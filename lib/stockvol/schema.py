"""Column names and schemas of every table: the contracts in docs/ and ../shared/DESIGN.md."""

from __future__ import annotations

from pyspark.sql.types import DoubleType, LongType, StringType, StructField, StructType

SYMBOL = "Symbol"
SECURITY_NAME = "Security Name"
DATE = "Date"
OPEN, HIGH, LOW, CLOSE, ADJ_CLOSE = "Open", "High", "Low", "Close", "Adj Close"
VOLUME = "Volume"
PRICE_COLUMNS = (OPEN, HIGH, LOW, CLOSE, ADJ_CLOSE)

VOL_MOVING_AVG = "vol_moving_avg"
ADJ_CLOSE_ROLLING_MED = "adj_close_rolling_med"
FEATURE_COLUMNS = (VOL_MOVING_AVG, ADJ_CLOSE_ROLLING_MED)

# The CSV header of every per-symbol file in the Kaggle layout.
CSV_COLUMNS = (DATE, OPEN, HIGH, LOW, CLOSE, ADJ_CLOSE, VOLUME)

# The columns of symbols_valid_meta.csv, in the Kaggle file's order.
META_COLUMNS = (
    "Nasdaq Traded",
    "Symbol",
    "Security Name",
    "Listing Exchange",
    "Market Category",
    "ETF",
    "Round Lot Size",
    "Test Issue",
    "Financial Status",
    "CQS Symbol",
    "NASDAQ Symbol",
    "NextShares",
)

PRICES_SCHEMA = StructType(
    [
        StructField(SYMBOL, StringType(), nullable=False),
        StructField(SECURITY_NAME, StringType()),
        StructField(DATE, StringType(), nullable=False),
        *(StructField(name, DoubleType()) for name in PRICE_COLUMNS),
        StructField(VOLUME, LongType()),
    ]
)

FEATURES_SCHEMA = StructType(
    [*PRICES_SCHEMA.fields, *(StructField(name, DoubleType()) for name in FEATURE_COLUMNS)]
)

SOURCE_FILE, LINE, REASON, RAW_LINE = "source_file", "line", "reason", "raw_line"

# Rejected lines: where they came from, what they said (raw text, null where the line had no such
# field) and why they were rejected (stockvol.raw_csv.REASONS).
REJECTS_SCHEMA = StructType(
    [
        StructField(SOURCE_FILE, StringType(), nullable=False),
        StructField(SYMBOL, StringType(), nullable=False),
        StructField(LINE, LongType(), nullable=False),
        *(StructField(name, StringType()) for name in CSV_COLUMNS),
        StructField(RAW_LINE, StringType()),
        StructField(REASON, StringType(), nullable=False),
    ]
)
