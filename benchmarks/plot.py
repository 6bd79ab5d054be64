"""Plot time and peak memory against data size, per stage, from `benchmarks/run.py` results.

    .venv/bin/python benchmarks/plot.py bench-results/RESULT.json [MORE.json ...] \
        [--out docs/benchmarks-scaling.png]

Several result files are merged (e.g. one per size, run at different times). Each stage is one
colour: solid line and dots = seconds inside the application (the stage's own summary line),
dotted = wall seconds of the whole child process (JVM start included), thin grey = the
least-squares line through the solid points, the "linear growth" check. ``--metric cpu_seconds``
plots CPU seconds instead, steadier when other work shares the machine. Right panel: peak
resident memory of the process tree.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Stages whose cost is per row of data; serving and the training sweep are not plotted by size.
PLOTTED = ("ingest", "features", "train", "pipeline", "reference")
LABELS = {"reference": "pandas + joblib reference (ingest + features)", "pipeline": "pipeline job"}


def load(paths: Sequence[Path]) -> dict[str, Any]:
    """One result document from several: sizes matched by row count, stages merged by name.

    Later files win: a stage measured again replaces the earlier record of that size, a stage
    measured only in one file is added (e.g. a sweep, then train-sampling at full size alone).
    """
    merged: dict[str, Any] = {"scales": []}
    by_rows: dict[Any, dict[str, Any]] = {}
    for path in paths:
        doc = json.loads(Path(path).read_text())
        if "scales" not in doc:
            raise SystemExit(f"{path}: not a benchmarks/run.py result (no 'scales')")
        merged.update({k: v for k, v in doc.items() if k != "scales"})
        for entry in doc["scales"]:
            key = entry.get("rows") or entry.get("data_dir")
            if key not in by_rows:
                by_rows[key] = {**entry, "stages": list(entry["stages"])}
                continue
            stages = {r["stage"]: r for r in by_rows[key]["stages"]}
            stages.update({r["stage"]: r for r in entry["stages"] if r["status"] != "skipped"})
            by_rows[key]["stages"] = list(stages.values())
    merged["scales"] = sorted(by_rows.values(), key=lambda e: e.get("rows") or 0)
    return merged


def series(results: dict[str, Any], key: str = "stage_seconds") -> dict[str, list[tuple]]:
    """``{stage: [(rows, value, record), ...]}`` sorted by rows, successful runs only.

    ``key`` is a field of the stage record; ``stage_seconds`` falls back to wall seconds for a
    stage without a summary line (the reference implementation).
    """
    out: dict[str, list[tuple]] = {}
    for entry in results["scales"]:
        rows = entry.get("rows")
        if not rows:
            continue
        for record in entry["stages"]:
            if record["stage"] not in PLOTTED or record["status"] != "ok":
                continue
            value = record.get(key)
            if value is None and key == "stage_seconds":
                value = record.get("wall_seconds")
            if value is not None:
                out.setdefault(record["stage"], []).append((rows, float(value), record))
    return {stage: sorted(points, key=lambda p: p[0]) for stage, points in out.items()}


def fit_line(x: Sequence[float], y: Sequence[float]) -> tuple[float, float, float]:
    """Least-squares ``y = slope * x + intercept`` and its coefficient of determination."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    slope, intercept = np.polyfit(xs, ys, 1)
    residual = ys - (slope * xs + intercept)
    spread = float(np.sum((ys - ys.mean()) ** 2))
    r2 = 1.0 - float(np.sum(residual**2)) / spread if spread > 0 else 1.0
    return float(slope), float(intercept), r2


METRICS = {
    "stage_seconds": "in-app seconds",
    "cpu_seconds": "CPU seconds (all processes)",
    "wall_seconds": "wall seconds (incl. JVM start)",
}


def plot(
    results: dict[str, Any],
    out: Path,
    title: str | None = None,
    metric: str = "stage_seconds",
) -> Path:
    """Write the PNG (Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seconds = series(results, metric)
    if not seconds:
        raise SystemExit("no successful ingest/features/train/pipeline/reference runs to plot")
    walls = series(results, "wall_seconds")
    memory = series(results, "peak_rss_gib")
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, stage in enumerate(s for s in PLOTTED if s in seconds):
        colour = colours[i % len(colours)]
        rows = np.array([p[0] for p in seconds[stage]]) / 1e6
        values = [p[1] for p in seconds[stage]]
        label = LABELS.get(stage, stage)
        if len(rows) >= 2:
            slope, intercept, r2 = fit_line(rows, values)
            label += f" ({slope:.2f} s/M rows, fit R² {r2:.3f})"
            grid = np.linspace(0, rows.max() * 1.05, 20)
            left.plot(grid, slope * grid + intercept, "-", color="grey", lw=0.7, alpha=0.6)
        left.plot(rows, values, "o-", color=colour, label=label)
        # The wall time beside the in-app time shows the fixed start-up cost.
        if metric == "stage_seconds" and stage in walls and stage != "reference":
            wall_rows = np.array([p[0] for p in walls[stage]]) / 1e6
            left.plot(wall_rows, [p[1] for p in walls[stage]], ":", color=colour, alpha=0.8)
        if stage in memory:
            mem_rows = np.array([p[0] for p in memory[stage]]) / 1e6
            right.plot(mem_rows, [p[1] for p in memory[stage]], "o-", color=colour, label=stage)
    left.set_xlabel("data rows (millions)")
    left.set_ylabel(METRICS[metric])
    left.set_title(
        "time per stage (solid: in-app, dotted: wall incl. JVM start)"
        if metric == "stage_seconds"
        else f"{METRICS[metric]} per stage"
    )
    left.set_xlim(left=0)
    left.set_ylim(bottom=0)
    left.legend(fontsize=8, loc="upper left")
    left.grid(alpha=0.3)
    right.axhline(6e9 / 2**30, color="red", lw=0.8, ls="--", label="target: 6 GB")
    right.set_xlabel("data rows (millions)")
    right.set_ylabel("peak resident memory, GiB (JVM + Python workers)")
    right.set_title("peak memory of the stage's process tree")
    right.set_xlim(left=0)
    right.set_ylim(bottom=0)
    right.legend(fontsize=8, loc="upper left")
    right.grid(alpha=0.3)
    machine = results.get("machine", {})
    fig.suptitle(
        title
        or f"stockvol benchmarks: {machine.get('logical_cores', '?')} cores, "
        f"{machine.get('memory_gib', '?')} GiB, Spark {machine.get('pyspark', '?')}, "
        f"{results.get('storage_format', '')}"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="benchmarks/run.py JSON file(s)")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks-scaling.png"))
    parser.add_argument("--title", help="figure title (default: the machine and versions)")
    parser.add_argument(
        "--metric",
        choices=tuple(METRICS),
        default="stage_seconds",
        help="left panel: in-app (default), CPU (steadier on a shared machine) or wall seconds",
    )
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.results if not p.is_file()]
    if missing:
        print(f"plot: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    print(plot(load(args.results), args.out, args.title, args.metric))
    return 0


if __name__ == "__main__":
    sys.exit(main())
