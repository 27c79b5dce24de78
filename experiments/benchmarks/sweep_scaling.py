"""A 64-cell sweep's wall time on 1 worker, on 2 local worker processes, and on a local Ray cluster (2 CPUs).

    PYTHONPATH=$PWD python experiments/benchmarks/sweep_scaling.py [--repeats 3] [--out DIR]

The sweep: Llama-3.1-8B under the runtime laws, Ollama (1 slot) and vLLM, closed-loop 1/4/16/64 users,
128 requests of 100 in / 100 out per cell, over a grid of 4 devices x 2 vLLM max_num_seqs = 8 points x 8
cells. Each repeat runs the three executors one after another (order rotated between repeats, so a load
swing on a shared machine does not favour one); the script prints each wall time, the medians, the
speed-ups over 1 worker (median of the per-repeat ratios), the load average before and after, and
checks that every run wrote the same files, byte for byte. The Ray cluster is started once on
127.0.0.1 (its start-up is printed, not counted); a Ray run's time includes connecting and shipping
this checkout to the workers, which every `--ray` run pays. Needs the ray extra for the Ray column.
"""
from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from sim.lab.executors import ray
from sim.lab.experiment import load_experiment
from sim.lab.ray_local import local_ray_cluster
from sim.lab.sweep import expand, run_sweep

SWEEP = """
name = "sweep_scaling"
seed = 0
model = "llama-3.1-8b"

[workload]
kind = "closed_loop"
clients = [1, 4, 16, 64]
num_requests = 128
prompt_tokens = {dist = "fixed", value = 100}
output_tokens = {dist = "fixed", value = 100}

[engines.ollama]
scheduler = "sequential"
num_ctx = 4096

[engines.vllm]
scheduler = "continuous"
weights = "fp16"
max_model_len = 8192
max_num_batched_tokens = 8192

[hardware]
preset = "h100-sxm"

[cost_model]
kind = "runtime"

[sweep]
grid = {"hardware.preset" = ["h100-sxm", "a100-sxm-80gb", "l40s", "rtx-4090"], "engines.vllm.max_num_seqs" = [64, 256]}
"""


def _same_tree(a: Path, b: Path) -> bool:
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return fa == fb and all(filecmp.cmp(a / f, b / f, shallow=False) for f in fa)


def _timed(exp, out: Path, **how) -> float:
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    run_sweep(exp, out, progress=False, echo=lambda _: None, **how)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    exp = load_experiment(SWEEP)
    cells = sum(len(p.experiment.cells()) for p in expand(exp))
    scratch = args.out or Path(tempfile.mkdtemp(prefix="sweep_scaling-"))
    print(f"{cells} cells ({exp.sweep.num_points} points x {len(exp.cells())} cells); CPUs here: {os.cpu_count()}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    modes = {"1 worker": {"workers": 1}, "2 local processes": {"workers": 2}}
    times: dict[str, list[float]] = {m: [] for m in modes}
    cluster = local_ray_cluster(num_cpus=2) if ray is not None else None
    try:
        if cluster is not None:
            t = time.perf_counter()
            address = cluster.__enter__()
            print(f"Ray head on {address} (2 CPUs) started in {time.perf_counter() - t:.1f} s (not counted)")
            modes["Ray, 2 CPUs on loopback"] = {"ray_address": address}
            times["Ray, 2 CPUs on loopback"] = []
        else:
            print("ray is not installed: no Ray column (pip install -e '.[ray]')")
        names = list(modes)
        for rep in range(args.repeats):
            order = names[rep % len(names):] + names[:rep % len(names)]
            for m in order:
                times[m].append(_timed(exp, scratch / m.replace(" ", "_").replace(",", ""), **modes[m]))
                print(f"  repeat {rep + 1}: {m}: {times[m][-1]:.1f} s")
    finally:
        if cluster is not None:
            cluster.__exit__(None, None, None)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    base = times["1 worker"]
    dirs = [scratch / m.replace(" ", "_").replace(",", "") for m in times]
    same = all(_same_tree(dirs[0], d) for d in dirs[1:])
    print(f"\n{'executor':<26}{'median wall (s)':>16}{'speed-up vs 1 worker':>24}")
    for m, ts in times.items():
        ratio = statistics.median(b / t for b, t in zip(base, ts))
        print(f"{m:<26}{statistics.median(ts):>16.1f}{ratio:>23.2f}x")
    print(f"files identical across executors: {same}")
    if args.out is None:
        shutil.rmtree(scratch, ignore_errors=True)
    if not same:
        raise SystemExit("the executors wrote different files")


if __name__ == "__main__":
    main()
