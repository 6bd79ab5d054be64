"""Acquire the raw data into DATA/raw: Kaggle, the shipped real files, an archive, or the generator.

    python jobs/download.py [--source auto|kaggle|real|sample|PATH] [--data-dir DIR] [--force]
                            [--symbols N] [--seed S] [--rows-multiplier X]

No Spark: this runs with plain python (spark-submit works too). Defaults come from
conf/pipeline.yaml (dataset.source, sample_symbols, sample_seed, kaggle_id).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from stockvol.acquire import AcquireError, acquire
from stockvol.config import DEFAULT_CONFIG, ArgumentParser, ConfigError, load_config, one_line
from stockvol.sample import check_sample_args

log = logging.getLogger("stockvol")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="pipeline YAML file")
    parser.add_argument("--data-dir", help="root of raw/, lake/ and model/ (default: data)")
    parser.add_argument(
        "--source",
        help="auto (Kaggle if credentials exist, else real), kaggle, real (the 52 real Kaggle "
        "files shipped with the project), sample (generated, any size), or PATH to archive.zip "
        "or an extracted folder (default: dataset.source)",
    )
    parser.add_argument("--force", action="store_true", help="replace DATA/raw if present")
    parser.add_argument("--symbols", type=int, help="sample: number of symbols")
    parser.add_argument("--seed", type=int, help="sample: random seed (same seed, same bytes)")
    parser.add_argument(
        "--rows-multiplier", type=float, default=1.0, help="sample: scale history lengths"
    )
    parser.add_argument("--workers", type=int, help="sample: processes (default: by size)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )
    args = parse_args(argv)
    try:
        config = load_config(
            args.config,
            data_dir=args.data_dir,
            source=args.source,
            sample_symbols=args.symbols,
            sample_seed=args.seed,
        )
        check_sample_args(config.sample_symbols, config.sample_seed, args.rows_multiplier)
    except (ConfigError, ValueError) as err:
        log.error("invalid setting: %s", one_line(err))
        return 2
    try:
        summary = acquire(
            config, force=args.force, rows_multiplier=args.rows_multiplier, workers=args.workers
        )
    except AcquireError as err:
        log.error("%s", err)
        return 1
    except OSError as err:  # the data dir's storage refused (a bucket missing, access denied)
        log.error("cannot write %s: %s", config.raw_dir, one_line(err))
        return 1
    log.info(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
