"""How far the reference engine is from itself: the same configs benched twice, compared metric by metric.

The fidelity targets (|error| <= 5% on throughput and E2E, <= 10% on TTFT) only mean something
if the engine repeats itself more tightly than that. This prints, for two bench runs of the same
experiments (`servesim bench`, or the bench/ folders `servesim validate` writes), the signed
difference (B - A) / A per cell and metric, and the median and worst cell per metric: the
noise floor under which no simulator can be judged on this machine.

    python experiments/benchmarks/engine_repeatability.py RUN_A RUN_B

RUN_A and RUN_B hold one folder per experiment (the names must match), each with a bench's
summary.json; or they are themselves bench folders.

The committed pair: experiments/results/fidelity_cpu_repeat/ against experiments/results/fidelity_cpu/*/bench,
the same engine code benched in separate runs 25-30 minutes apart on 2026-11-22.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from sim.lab.validate import compare, error_table, format_error_table


def bench_dirs(root: Path) -> dict[str, Path]:
    """Experiment name -> folder with the bench's summary.json (root itself when it is one)."""
    if (root / "summary.json").exists():
        return {"": root}
    found = {}
    for summary in sorted(root.glob("*/summary.json")) + sorted(root.glob("*/bench/summary.json")):
        name = summary.parent.name if summary.parent.name != "bench" else summary.parent.parent.name
        found.setdefault(name, summary.parent)
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_a", type=Path)
    ap.add_argument("run_b", type=Path)
    args = ap.parse_args()
    a, b = bench_dirs(args.run_a), bench_dirs(args.run_b)
    common = [n for n in a if n in b]
    if not common:
        sys.exit(f"no experiment in both {args.run_a} ({sorted(a)}) and {args.run_b} ({sorted(b)})")
    parts = []
    for name in common:
        diff = compare(a[name], b[name])
        if name:
            diff["cell"] = name + ":" + diff["cell"]
        parts.append(diff)
    diffs = pd.concat(parts, ignore_index=True)
    print(format_error_table(error_table(diffs)))
    print()
    print(diffs.pivot_table(index="cell", columns="metric", values="error_pct", sort=False)
          .round(1).to_string())


if __name__ == "__main__":
    main()
