"""Compare the model's target forms and horizons on one features table, against the baseline.

    .venv/bin/python benchmarks/model_targets.py --data-dir data \
        [--targets log_ratio,ratio,volume] [--horizons next_day,same_day] [--out FILE.json]

For every (target, horizon) pair it runs the train stage as the job does (``stockvol.train.train``:
the default split, row cap and forest settings from conf/pipeline.yaml), in one Spark application,
and prints the test metrics of the model and of the baseline "predicted volume = vol_moving_avg"
(the baseline depends on the horizon: next_day gives it the previous row's average). Nothing is
written to DIR/model. This is how docs/model.md's table of target forms was measured.
A script, not a test: the figures depend on the data it is pointed at.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from stockvol.config import DEFAULT_CONFIG, HORIZONS, TARGETS, load_config
from stockvol.spark import build_session
from stockvol.train import read_features, train


def _split_list(text: str, allowed: tuple[str, ...]) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [v for v in values if v not in allowed]
    if unknown or not values:
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(allowed)}, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="holds lake/features")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--format", dest="storage_format", choices=("delta", "parquet"))
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--horizons", default=",".join(HORIZONS))
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    targets = _split_list(args.targets, TARGETS)
    horizons = _split_list(args.horizons, HORIZONS)

    config = load_config(args.config, data_dir=args.data_dir, storage_format=args.storage_format)
    spark = build_session(config, app_name="stockvol-bench-model-targets")
    results: list[dict[str, Any]] = []
    try:
        features, _ = read_features(spark, config)
        for horizon in horizons:
            for target in targets:
                params = replace(config.model, target=target, horizon=horizon)
                started = time.perf_counter()
                metrics = train(features, params).metrics
                results.append(
                    {
                        "target": target,
                        "horizon": horizon,
                        "seconds": round(time.perf_counter() - started, 1),
                        "rows": metrics["rows"],
                        "first_test_date": metrics["split"]["first_test_date"],
                        "test": metrics["test"],
                        "baseline": metrics["baseline"],
                        "beats_baseline": metrics["beats_baseline"],
                        "by_size_class": metrics["by_size_class"],
                    }
                )
                print_row(results[-1])
    finally:
        spark.stop()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def print_row(result: dict[str, Any]) -> None:
    """One line per predictor: R², MAE, median absolute % error."""
    rows = result["rows"]
    print(
        f"\n{result['target']} / {result['horizon']}: {rows['test']:,} test rows from "
        f"{result['first_test_date']}, fitted on {rows['train_fitted']:,}, {result['seconds']} s, "
        f"beats baseline: {result['beats_baseline']}"
    )
    for name in ("test", "baseline"):
        m = result[name]
        print(
            f"  {'model' if name == 'test' else 'baseline':9} R² {m['r2']:.3f}  "
            f"MAE {m['mae']:>14,.0f}  median error {100 * m['median_ape']:.1f} %"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
