"""Error tables of the simulator against a real engine over repeated runs (experiments/results/peers/ENGINE/run*).

One row per (cell, metric): measured in each run, predicted, the errors, the two runs' spread and a
verdict: "ok" (within the goal against every run), "noise" (misses it by less than the engine's own
run-to-run spread), "miss". Read by experiments/peers/write_paper.py and papers/build.py.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

ENGINES = {"vllm": "vLLM 0.32 (CPU build), bf16", "llamacpp_np4": "llama-server f16, `-np 4`",
           "llamacpp_np1": "llama-server f16, `-np 1`"}
# metric -> (column title, goal: largest |error| in percent)
METRICS = {"output_throughput": ("out tok/s", 10.0), "mean_ttft_ms": ("TTFT", 15.0),
           "mean_tpot_ms": ("TPOT", 10.0), "mean_e2el_ms": ("E2E", 10.0)}


def _spread(a: float, b: float) -> float:
    """|a - b| as a percent of their mean (nan if either is missing)."""
    if not (np.isfinite(a) and np.isfinite(b)) or a + b == 0:
        return float("nan")
    return abs(a - b) / ((a + b) / 2) * 100


def engine_table(folder: Path) -> pd.DataFrame | None:
    """One row per (cell, metric): measured in each run, predicted, errors, the runs' spread, a verdict."""
    runs = sorted(p for p in folder.glob("run*") if re.fullmatch(r"run\d+", p.name) and (p / "errors.csv").exists())
    if not runs:
        return None
    frames = []
    for r in runs:  # run<k> and, when there, the shared-prefix cells of the same run (run<k>-prefix)
        parts = [pd.read_csv(d / "errors.csv") for d in (r, r.with_name(r.name + "-prefix")) if (d / "errors.csv").exists()]
        e = pd.concat(parts, ignore_index=True)
        e = e[e.metric.isin(METRICS)].set_index(["cell", "metric"])
        frames.append(e.rename(columns=lambda c: f"{c}_{r.name}"))
    t = pd.concat(frames, axis=1).reset_index()
    names = [r.name for r in runs]
    if len(names) >= 2:
        t["spread_pct"] = [_spread(a, b) for a, b in zip(t[f"measured_{names[0]}"], t[f"measured_{names[1]}"])]
    else:
        t["spread_pct"] = np.nan
    target = t.metric.map(lambda m: METRICS[m][1])
    errs = np.abs(t[[f"error_pct_{n}" for n in names]].to_numpy())
    worst = np.nanmax(errs, axis=1)
    t["verdict"] = np.where(worst <= target, "ok",
                            np.where(worst <= target + t["spread_pct"].fillna(0), "noise", "miss"))
    t.attrs["runs"] = names
    return t


def summary_line(t: pd.DataFrame) -> str:
    """How many (cell, metric) pairs meet the goal, are within the noise floor, or miss."""
    n = len(t)
    counts = t.verdict.value_counts()
    spread = t.spread_pct.dropna()
    return (f"{counts.get('ok', 0)} of {n} (cell, metric) pairs within the goal against both runs, "
            f"{counts.get('noise', 0)} more within the goal plus the engine's own run-to-run spread, "
            f"{counts.get('miss', 0)} beyond it. The engine against itself: spread median {spread.median():.1f}%, "
            f"max {spread.max():.1f}% (same cells, two freshly started servers).")
