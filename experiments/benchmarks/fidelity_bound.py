"""The timing check: the calibrated simulator against the JAX engine on this machine, within the documented bound.

    python experiments/benchmarks/fidelity_bound.py [--out DIR] [--bound 15] [--attempts 3] [--drift 5]

Profiles this machine on a small grid (the regime of the config below), runs two closed-loop cells
(1 and 4 clients, continuous batching, tiny model) on the real engine and on the simulator
calibrated from that profile, and checks |error| <= bound (percent) on output throughput and mean
E2E latency. It prints the error table.

Why it is not a unit test: it measures wall-clock time, so a busy machine moves it.

Retry policy. The simulator is calibrated on the machine's speed during the profile and judged on
its speed during the run, so a machine whose speed changes in between (a neighbour, frequency
scaling, a shared VM's steal) makes any error possible. Each attempt therefore brackets profile
and run with a speed probe (the median of many decode steps at the cells' batch sizes, tens of
milliseconds each); when the probes before and after differ by more than --drift percent, the
attempt cannot judge the simulator and is retried. Up to --attempts attempts, each with a fresh
profile:
- exit 0: an attempt on a steady machine is within the bound (a simulator that is right);
- exit 1: an attempt on a steady machine misses it (a simulator that is really off misses every
  time; the next attempt is run only to show the miss repeats, and the check fails if none passes);
- exit 2: no attempt found the machine steady, so nothing was judged (.ci/run reports it and goes on).
The deterministic check of the same pipeline (the engine on the model's own clock, matched to
rounding) is in the unit suite: tests/test_validate.py.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import pandas as pd

# One core, as the committed fidelity results were measured (taskset -c 0): XLA sizes its thread pool
# when JAX loads, so this comes before the imports below; a neighbour on the other core then moves
# profile and run alike instead of splitting XLA's threads unevenly between them.
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

from sim.lab.profile import Grid, run_profile
from sim.lab.validate import format_error_table, error_table, run_validate

CONFIG = """
name = "fidelity_bound"
seed = 0
model = "tiny"
dtype = "float32"

[workload]
kind = "closed_loop"
clients = [1, 4]
num_requests = 128

[workload.prompt_tokens]
dist = "fixed"
value = 64

[workload.output_tokens]
dist = "fixed"
value = 48

[engines.continuous]
scheduler = "continuous"
block_size = 16
max_num_seqs = 16
max_num_batched_tokens = 512
max_model_len = 256
"""

# The default grid cut to this workload's range (contexts <= 256, batches <= 16): about a minute.
GRID = Grid(decode_batch=(1, 2, 4, 8, 16), decode_context=(64, 128, 256), prefill_tokens=(16, 64, 256),
            prefill_cached=(0, 256), mixed_prefill=(64, 256), mixed_cached=(0,), mixed_batch=(4, 16),
            mixed_context=(64, 256), host_batch=(1, 4, 16))
# The speed probe: the decode steps the two cells spend their time in (batch 1 and 4, context 64 .. 112).
PROBE = Grid(decode_batch=(1, 4), decode_context=(96,), prefill_tokens=(), prefill_cached=(), mixed_prefill=(),
             mixed_cached=(), mixed_batch=(), mixed_context=(), host_batch=(1,), host_prompt=())
PROBE_REPEATS = 200
CHECKED = ("output_throughput", "mean_e2el_ms")


def probe_ms() -> dict[int, float]:
    """Median paged decode step time (ms) per batch size of the probe grid, on this machine now."""
    rows = run_profile("tiny", None, grid=PROBE, repeats=PROBE_REPEATS, warmup=20, progress=False)
    rows = rows[(rows.kind == "decode") & (rows.layout == "paged")]
    return {int(b): float(ms) for b, ms in zip(rows.batch_size, rows.median_ms)}


def drift_pct(before: dict[int, float], after: dict[int, float]) -> float:
    """The largest change (percent) of a probed step time between two probes."""
    return max(abs(after[b] / before[b] - 1) * 100 for b in before)


def attempt(folder: Path, bound: float) -> tuple[bool, float, str]:
    """One fresh profile and validation bracketed by speed probes: (within the bound, drift %, report)."""
    (folder / "config.toml").write_text(CONFIG)
    before = probe_ms()
    # 20 timed runs per shape (after 10 untimed): a one-off stall in 5 runs can move a median, and a linear
    # law fitted on a few rows follows it; the extra runs cost seconds (the shapes are compiled once).
    run_profile("tiny", folder / "profile.csv", grid=GRID, repeats=20, warmup=10, progress=False)
    errors = run_validate(folder / "config.toml", folder / "out", folder / "profile.csv", progress=False,
                          echo=lambda s: None)
    after = probe_ms()
    checked = errors[errors.metric.isin(CHECKED)]
    probes = ", ".join(f"batch {b}: {before[b]:.3f} -> {after[b]:.3f} ms" for b in before)
    # Where a miss comes from: the device steps (per kind) or the host work around them (validate's step check).
    steps = pd.read_csv(folder / "out" / "steps_check.csv")[["cell", "steps", "exec_err_pct", "decode_exec_err_pct",
                                                             "prefill_exec_err_pct", "host_err_pct"]]
    return (bool((checked.error_pct.abs() <= bound).all()), drift_pct(before, after),
            f"speed probe before -> after ({probes})\n" + format_error_table(error_table(errors)) + "\n"
            + checked.to_string(index=False) + "\nsteps, predicted vs measured (%):\n"
            + steps.round(1).to_string(index=False))


def main(argv=None) -> int:
    """Run up to --attempts attempts; the exit status is the verdict (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--bound", type=float, default=15.0, help="|error| percent allowed (default 15)")
    ap.add_argument("--attempts", type=int, default=3, help="attempts before giving up (default 3)")
    ap.add_argument("--drift", type=float, default=5.0,
                    help="largest change of the machine's speed (percent) under which an attempt judges (default 5)")
    args = ap.parse_args(argv)
    for name, value in (("--bound", args.bound), ("--attempts", args.attempts), ("--drift", args.drift)):
        if not value > 0:
            ap.error(f"{name} must be > 0, got {value}")
    judged = []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        for i in range(1, args.attempts + 1):
            folder = root / f"attempt{i}"
            folder.mkdir(parents=True, exist_ok=True)
            ok, drift, report = attempt(folder, args.bound)
            steady = drift <= args.drift
            verdict = ("within" if ok else "outside") + f" +-{args.bound:g}% on {', '.join(CHECKED)}"
            if not steady:
                verdict += f"; not judged: the machine's speed changed {drift:.1f}% (> {args.drift:g}%)"
            print(f"attempt {i} (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus, "
                  f"speed drift {drift:.1f}%): {verdict}\n{report}", flush=True)
            if steady:
                judged.append(ok)
                if ok:
                    return 0
    if judged:
        print(f"FAIL: {len(judged)} attempt(s) on a steady machine, none within the bound")
        return 1
    print(f"NOT JUDGED: the machine's speed drifted more than {args.drift:g}% in every attempt")
    return 2


if __name__ == "__main__":
    sys.exit(main())
