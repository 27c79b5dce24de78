"""The timing check: the calibrated simulator against the JAX engine on this machine, within the documented bound.

    python experiments/benchmarks/fidelity_bound.py [--out DIR] [--bound 15] [--attempts 2]

Profiles this machine on a small grid (the regime of the config below), runs two closed-loop cells
(1 and 4 clients, continuous batching, tiny model) on the real engine and on the simulator
calibrated from that profile, and checks |error| <= bound (percent) on output throughput and mean
E2E latency. It prints the error table and exits 1 when the bound is missed.

Why it is not a unit test: it measures wall-clock time, so a busy machine moves it. Retry policy:
up to --attempts runs, each with a fresh profile; it passes if any run is within the bound. A
neighbour on a 2-core machine can spoil one timing run, but a simulator that is really off misses
every time. The deterministic check of the same pipeline (the engine on the model's own clock,
matched to rounding) is in the unit suite: tests/test_validate.py.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

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
num_requests = 32

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
GRID = Grid(decode_batch=(1, 2, 4, 8, 16), decode_context=(64, 256), prefill_tokens=(16, 64, 256),
            prefill_cached=(0, 256), mixed_prefill=(64, 256), mixed_cached=(0,), mixed_batch=(4, 16),
            mixed_context=(64, 256), host_batch=(1, 4, 16))
CHECKED = ("output_throughput", "mean_e2el_ms")


def attempt(folder: Path) -> tuple[bool, str]:
    """One fresh profile and validation; (within the bound, the error table as text)."""
    (folder / "config.toml").write_text(CONFIG)
    run_profile("tiny", folder / "profile.csv", grid=GRID, repeats=5, progress=False)
    errors = run_validate(folder / "config.toml", folder / "out", folder / "profile.csv", progress=False,
                          echo=lambda s: None)
    checked = errors[errors.metric.isin(CHECKED)]
    return bool((checked.error_pct.abs() <= ARGS.bound).all()), (
        format_error_table(error_table(errors)) + "\n" + checked.to_string(index=False))


def main(argv=None) -> int:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--bound", type=float, default=15.0, help="|error| percent allowed (default 15)")
    ap.add_argument("--attempts", type=int, default=2, help="fresh runs before giving up (default 2)")
    ARGS = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = ARGS.out or Path(tmp)
        for i in range(1, ARGS.attempts + 1):
            folder = root / f"attempt{i}"
            folder.mkdir(parents=True, exist_ok=True)
            ok, table = attempt(folder)
            print(f"attempt {i} (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus): "
                  f"{'within' if ok else 'outside'} +-{ARGS.bound:g}% on {', '.join(CHECKED)}\n{table}", flush=True)
            if ok:
                return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
