"""Ingest: raw CSVs -> the typed prices table and the rejects table, nothing lost.

spark-submit --properties-file spark-defaults.conf jobs/ingest.py --data-dir data [--format parquet]
"""

from __future__ import annotations

import sys

from stockvol import retention
from stockvol.cli import run_stages
from stockvol.ingest import run

if __name__ == "__main__":
    sys.exit(
        run_stages(
            "Ingest CSVs into prices and rejects", [run, retention.stage("prices", "rejects")]
        )
    )
