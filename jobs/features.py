"""Features job: prices -> features (30-row moving average of Volume, rolling median of Adj Close).

spark-submit --properties-file spark-defaults.conf jobs/features.py --data-dir DIR [--median exact]
"""

from __future__ import annotations

import argparse
import sys

from stockvol import retention
from stockvol.cli import run_stages
from stockvol.features import run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--window", type=int, help="rows per window (default: conf, 30)")


def overrides(args: argparse.Namespace) -> dict:
    return {"window": args.window}


if __name__ == "__main__":
    sys.exit(
        run_stages(
            "Features job",
            [run, retention.stage("features")],
            add_arguments=add_arguments,
            overrides=overrides,
        )
    )
