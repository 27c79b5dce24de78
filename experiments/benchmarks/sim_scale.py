"""How fast the simulator runs: the fast path (sim.core.fast) beside the teaching path, in one run.

Scenarios (one replica of Llama-3.1-8B on an H100 SXM, roofline cost model, vLLM defaults: block
size 16, 2048 batched tokens per step, chunked prefill and prefix caching on):
- sharegpt: 256 closed-loop clients (no think time), lognormal ShareGPT-like lengths (~160
  prompt, ~340 output tokens), max_num_seqs 256;
- sharegpt-prefix: the same, half the requests starting with one of 4 shared 128-token system
  prompts (prefix-cache hits, blocks tracked exactly where they can be shared);
- burst-256 / burst-1024: every request at t = 0 (rate = inf), max_num_seqs 256, and 1024 with
  8192 batched tokens (vLLM's H100 defaults): large batches, where per-sequence cost shows, and
  at 1024 KV-pool pressure with preemptions. All requests are queued at once, so memory grows
  with their number here by construction.

Each measurement runs in a fresh process (so peak RSS is its own) and writes what `servesim run`
writes (requests.csv, the summary, timeseries.csv) to a temporary directory: wall and CPU seconds,
requests per wall second and per CPU second, simulated seconds per wall second, peak RSS, and the
MEMORY line: RSS growth in bytes per request (least-squares slope over the progress checkpoints;
flat memory means ~0). The fast path
runs --requests (default 1,000,000; --burst-requests for the bursts), the teaching path
--teaching-requests (default 20,000; it costs ~2 ms a request); the ratio fast / teaching is per
CPU second and per wall second. The machine may be shared: the load average is printed before and
after, and CPU seconds are the fairer figure. --identical N runs `servesim run`'s path
(run_experiment) with both implementations on N requests and compares requests.csv, summary.json,
timeseries.csv and itl_histograms.json byte for byte. --profile prints the fast path's cProfile
top entries from a separate run of --profile-requests (cProfile slows this code ~2.5x, so the
measured runs are never profiled).

    python experiments/benchmarks/sim_scale.py                       # everything (~10 min)
    python experiments/benchmarks/sim_scale.py --scenarios sharegpt --requests 100000 --identical 0
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sim.lab.experiment import load_experiment
from sim.lab.metrics import ResultsWriter
from sim.lab.simulate import run_experiment, simulate_cell

TARGET_S = 60.0  # wall seconds for a million requests, on one core
FILES = ("requests.csv", "summary.json", "timeseries.csv", "itl_histograms.json")

BASE = """
name = "sim_scale_{scenario}"
seed = 0
model = "llama-3.1-8b"
[workload]
{load}
[workload.prompt_tokens]   # ShareGPT-like: mean ~160 tokens, long tail
dist = "lognormal"
mean = 160
sigma = 1.0
max = 4096
[workload.output_tokens]   # mean ~340 tokens
dist = "lognormal"
mean = 340
sigma = 1.0
max = 4096
{prefix}
[engines.vllm]
scheduler = "continuous"
max_num_seqs = {seqs}
max_num_batched_tokens = {tokens}
[hardware]
preset = "h100-sxm"
[cost_model]
kind = "roofline"
"""
CLOSED = 'kind = "closed_loop"\nclients = [256]\nnum_requests = {n}'
BURST = 'kind = "poisson"\nrates = [inf]\nnum_requests = {n}'
PREFIX = "[workload.shared_prefix]\nfraction = 0.5\ntokens = 128\nnum_prefixes = 4"
SCENARIOS = {
    "sharegpt": dict(load=CLOSED, prefix="", seqs=256, tokens=2048),
    "sharegpt-prefix": dict(load=CLOSED, prefix=PREFIX, seqs=256, tokens=2048),
    "burst-256": dict(load=BURST, prefix="", seqs=256, tokens=2048),
    "burst-1024": dict(load=BURST, prefix="", seqs=1024, tokens=8192),
}


def config(scenario: str, n: int) -> str:
    """The experiment TOML of a scenario with n requests."""
    s = SCENARIOS[scenario]
    return BASE.format(scenario=scenario, load=s["load"].format(n=n), prefix=s["prefix"], seqs=s["seqs"],
                       tokens=s["tokens"])


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process, MB."""
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    return current, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(scenario: str, implementation: str, n: int, checkpoints: int = 10, profile: int = 0) -> dict:
    """Simulate one scenario cell, streaming results to a temporary directory; progress lines go to stderr."""
    exp = load_experiment(config(scenario, n))
    cell = exp.cells()[0]
    every = max(1, n // checkpoints)
    state = {"n": 0, "sim_t": 0.0, "rss": []}
    with tempfile.TemporaryDirectory() as tmp:
        writer = ResultsWriter(tmp)
        acc = writer.start_cell(cell.engine, cell.concurrency, cell.request_rate)
        start, cpu0 = time.perf_counter(), time.process_time()

        def on_request(req) -> None:
            state["n"] += 1
            if req.finish_time is not None and req.finish_time > state["sim_t"]:
                state["sim_t"] = req.finish_time
            if state["n"] % every == 0:
                wall = time.perf_counter() - start
                current, peak = rss_mb()
                state["rss"].append((state["n"], round(current, 1), round(peak, 1)))
                print(f"  {implementation:>8} {state['n']:>10,} requests {wall:>7.1f} wall s "
                      f"{time.process_time() - cpu0:>7.1f} cpu s {state['n'] / wall:>9,.0f} req/s "
                      f"RSS {current:>6,.0f} MB (peak {peak:,.0f})", file=sys.stderr, flush=True)

        prof = cProfile.Profile() if profile else None
        if prof:
            prof.enable()
        facts = simulate_cell(exp, cell, acc, on_request=on_request, implementation=implementation,
                              series_to=Path(tmp) / "timeseries.csv")
        if prof:
            prof.disable()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
        facts.pop("timeseries")
        summary = writer.finish_cell(acc, extra=facts)
    if prof:
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(profile)
    return dict(scenario=scenario, implementation=implementation, requests=n, wall_s=wall, cpu_s=cpu,
                sim_s=facts["sim_time_s"], steps=facts["num_steps"], preemptions=facts["preemptions"],
                completed=summary["completed"], peak_rss_mb=rss_mb()[1], rss_checkpoints=state["rss"])


def measure_in_child(scenario: str, implementation: str, n: int, profile: int = 0) -> dict:
    """measure() in a fresh interpreter, so its peak RSS is its own."""
    cmd = [sys.executable, __file__, "--child", scenario, implementation, str(n), "--profile", str(profile)]
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()
    if profile:
        print("\n".join(out[:-1]), flush=True)  # the profile, so it lands in the saved output
    return json.loads(out[-1])


def identical(scenario: str, n: int) -> dict[str, bool]:
    """run_experiment (what `servesim run` does) with each implementation; are the four files byte-identical?"""
    exp = load_experiment(config(scenario, n))
    with tempfile.TemporaryDirectory() as tmp:
        for impl in ("teaching", "fast"):
            run_experiment(exp, Path(tmp) / impl, progress=False, implementation=impl)
        return {name: (Path(tmp) / "teaching" / name).read_bytes() == (Path(tmp) / "fast" / name).read_bytes()
                for name in FILES}


def growth_bytes_per_request(checkpoints: list) -> float:
    """Least-squares slope of current RSS (MB) against requests done, in bytes per request."""
    xs = [c[0] for c in checkpoints]
    ys = [c[1] * 2 ** 20 for c in checkpoints]
    if len(xs) < 2:
        return float("nan")
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def row(m: dict) -> str:
    return (f"{m['scenario']:>16} {m['implementation']:>8} {m['requests']:>10,} {m['wall_s']:>8.1f} {m['cpu_s']:>8.1f} "
            f"{m['requests'] / m['wall_s']:>11,.0f} {m['requests'] / m['cpu_s']:>11,.0f} "
            f"{m['sim_s'] / m['wall_s']:>10,.1f} {m['peak_rss_mb']:>9,.0f} {m['steps']:>10,} {m['preemptions']:>8,}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {', '.join(SCENARIOS)}")
    ap.add_argument("--requests", type=int, default=1_000_000, help="fast path, closed-loop scenarios")
    ap.add_argument("--burst-requests", type=int, default=200_000, help="fast path, burst scenarios")
    ap.add_argument("--teaching-requests", type=int, default=20_000, help="teaching path (0: skip it)")
    ap.add_argument("--identical", type=int, default=20_000, help="requests of the byte-identity check (0: skip)")
    ap.add_argument("--profile", type=int, default=0, help="print this many cProfile entries of a fast run per scenario")
    ap.add_argument("--profile-requests", type=int, default=50_000, help="requests of that profiled run")
    ap.add_argument("--child", nargs=3, metavar=("SCENARIO", "IMPLEMENTATION", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        scenario, impl, n = args.child
        print(json.dumps(measure(scenario, impl, int(n), profile=args.profile)))
        return
    scenarios = args.scenarios.split(",")
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        ap.error(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    results = []
    for scenario in scenarios:
        n = args.burst_requests if scenario.startswith("burst") else args.requests
        fast = measure_in_child(scenario, "fast", n)
        results.append(fast)
        if args.profile:
            print(f"cProfile of the fast path, {scenario}, {args.profile_requests:,} requests (a separate run; "
                  f"its timings are not the measured ones), top {args.profile} by own time:", flush=True)
            measure_in_child(scenario, "fast", min(n, args.profile_requests), args.profile)
        teaching = measure_in_child(scenario, "teaching", args.teaching_requests) if args.teaching_requests else None
        if teaching:
            results.append(teaching)
    print(f"\n{'scenario':>16} {'path':>8} {'requests':>10} {'wall s':>8} {'cpu s':>8} {'req/wall s':>11} "
          f"{'req/cpu s':>11} {'sim s/wall':>10} {'peak MB':>9} {'steps':>10} {'preempt':>8}")
    for m in results:
        print(row(m))
    print()
    for scenario in scenarios:
        fast = next(m for m in results if m["scenario"] == scenario and m["implementation"] == "fast")
        teach = next((m for m in results if m["scenario"] == scenario and m["implementation"] == "teaching"), None)
        if teach:
            print(f"{scenario}: fast / teaching = {fast['requests'] / fast['cpu_s'] / (teach['requests'] / teach['cpu_s']):.1f}x "
                  f"per CPU second, {fast['requests'] / fast['wall_s'] / (teach['requests'] / teach['wall_s']):.1f}x "
                  f"per wall second")
        growth = growth_bytes_per_request(fast["rss_checkpoints"])
        print(f"MEMORY {scenario}: RSS {fast['rss_checkpoints'][0][1]:,} MB at {fast['rss_checkpoints'][0][0]:,} requests, "
              f"{fast['rss_checkpoints'][-1][1]:,} MB at {fast['rss_checkpoints'][-1][0]:,}: {growth:+.1f} bytes per "
              f"request in between (least-squares slope over the checkpoints); peak RSS {fast['peak_rss_mb']:,.0f} MB "
              f"(with the end-of-cell summary)")
        per_million_cpu = fast["cpu_s"] * 1e6 / fast["requests"]
        per_million_wall = fast["wall_s"] * 1e6 / fast["requests"]
        verdict = "meets" if per_million_cpu <= TARGET_S else "misses"
        print(f"HEADLINE {scenario}: {fast['requests']:,} requests in {fast['wall_s']:.1f} wall s, {fast['cpu_s']:.1f} CPU s "
              f"({fast['requests'] / fast['cpu_s']:,.0f} req per CPU s; a million in {per_million_cpu:.0f} CPU s, "
              f"{per_million_wall:.0f} wall s): {verdict} the {TARGET_S:.0f} s per million target on one core; "
              f"peak RSS {fast['peak_rss_mb']:,.0f} MB; RSS by requests done {fast['rss_checkpoints']}")
    if args.identical:
        for scenario in [s for s in scenarios if not s.startswith("burst")] or scenarios[:1]:
            same = identical(scenario, args.identical)
            print(f"IDENTICAL {scenario} ({args.identical:,} requests, run_experiment teaching vs fast): "
                  + ", ".join(f"{k} {'identical' if v else 'DIFFERENT'}" for k, v in same.items()))
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
