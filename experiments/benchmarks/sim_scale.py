"""How fast the simulator runs: N requests of a ShareGPT-like workload through vLLM-style continuous batching.

Workload: 256 closed-loop clients (no think time), lognormal prompt and output lengths with
ShareGPT-like means (~160 prompt, ~340 output tokens); one replica of Llama-3.1-8B on an
H100 SXM, roofline cost model; vLLM defaults (block size 16, max_num_seqs 256, 2048 batched
tokens per step, chunked prefill and prefix caching on). Per-request records stream to
requests.csv (ResultsWriter), so memory stays flat apart from the summary columns (~0.1 KB per
request).

Prints requests simulated per wall second, simulated seconds per wall second and peak RSS at
checkpoints, and as the last line the headline: wall seconds for N requests and whether that
meets 60 s.

    python experiments/benchmarks/sim_scale.py [--requests 1000000] [--out DIR] [--profile]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import resource
import tempfile
import time
from pathlib import Path

from sim.lab.experiment import load_experiment
from sim.lab.metrics import ResultsWriter
from sim.lab.simulate import simulate_cell

TARGET_S = 60.0  # wall seconds for a million requests
CLIENTS = 256

CONFIG = """
name = "sim_scale"
seed = 0
model = "llama-3.1-8b"
[workload]
kind = "closed_loop"
clients = [{clients}]
num_requests = {requests}
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
[engines.vllm]
scheduler = "continuous"
max_num_seqs = 256
[hardware]
preset = "h100-sxm"
[cost_model]
kind = "roofline"
"""


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MB; ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(num_requests: int, out_dir: Path, checkpoints: int = 10) -> tuple[float, dict]:
    """Simulate; print progress at `checkpoints` evenly spaced counts. Returns (wall s, summary)."""
    exp = load_experiment(CONFIG.format(clients=CLIENTS, requests=num_requests))
    cell = exp.cells()[0]
    writer = ResultsWriter(out_dir)
    acc = writer.start_cell(cell.engine, cell.concurrency, cell.request_rate)
    every = max(1, num_requests // checkpoints)
    state = {"n": 0, "sim_t": 0.0}
    start = time.perf_counter()
    cpu0 = time.process_time()
    print(f"{'requests':>10} {'wall s':>8} {'cpu s':>8} {'req/wall s':>11} {'sim s':>10} {'sim s/wall s':>13} "
          f"{'peak RSS MB':>12}")

    def on_request(req) -> None:
        state["n"] += 1
        state["sim_t"] = max(state["sim_t"], req.finish_time or 0.0)
        if state["n"] % every == 0 or state["n"] == num_requests:
            wall = time.perf_counter() - start
            print(f"{state['n']:>10,} {wall:>8.1f} {time.process_time() - cpu0:>8.1f} {state['n'] / wall:>11,.0f} "
                  f"{state['sim_t']:>10,.0f} "
                  f"{state['sim_t'] / wall:>13,.1f} {peak_rss_mb():>12,.0f}", flush=True)

    facts = simulate_cell(exp, cell, acc, on_request=on_request)
    wall = time.perf_counter() - start
    facts.pop("timeseries")
    summary = writer.finish_cell(acc, extra=dict(facts, wall_s=wall, cpu_s=time.process_time() - cpu0))
    return wall, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=1_000_000, help="requests to simulate (default 1,000,000)")
    ap.add_argument("--out", type=Path, default=None, help="results directory (default: a temporary one)")
    ap.add_argument("--profile", action="store_true", help="run under cProfile and print the top functions")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            wall, s = run(args.requests, out)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        else:
            wall, s = run(args.requests, out)
    print(f"simulated {s['sim_time_s']:,.0f} s of serving: {s['completed']:,} completed, "
          f"{s['output_throughput']:,.0f} output tok/s, {s['num_steps']:,} steps, {s['preemptions']:,} preemptions, "
          f"mean TTFT {s['mean_ttft_ms']:.0f} ms, mean TPOT {s['mean_tpot_ms']:.1f} ms")
    verdict = "meets" if wall <= TARGET_S * args.requests / 1e6 else "misses"
    print(f"CPU {s['cpu_s']:.1f} s for {wall:.1f} wall s (the machine is shared when CPU < wall)")
    print(f"HEADLINE: {args.requests:,} requests in {wall:.1f} wall s "
          f"({args.requests / wall:,.0f} req/s); {verdict} the {TARGET_S:.0f} s per million target"
          + ("" if args.requests == 1_000_000 else
             f" (extrapolated to 1M: {wall * 1e6 / args.requests:.0f} s wall, "
             f"{s['cpu_s'] * 1e6 / args.requests:.0f} s CPU)"))


if __name__ == "__main__":
    main()
