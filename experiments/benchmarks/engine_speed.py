"""Where the engine's step time goes on this CPU, and what each change bought (small-100m by default).

In process, no HTTP: a continuous-batching engine serves C concurrent requests (100-token prompts,
128 output tokens, greedy, ignore_eos) once every step shape is compiled; reported per variant:
the median decode step at 1 client (ms per output token) and the output throughput at 16 clients
(tok/s, prefill included). Variants, each adding one change to the one before:

    baseline        the runner as `servesim bench` builds it: decode rows padded to >= 4, context
                    padded to power-of-two buckets, float32
    rows from 1     decode rows bucketed from 1: one client runs a matrix-vector step
    dynamic ctx     the context walked at run time (reference.dynamic_attention): no context buckets,
                    the shape set a server compiles at start-up (the server's runner options)
    + XLA flag      each of EXTRA_XLA_FLAGS (set in a child process: XLA reads flags once); "1 thread"
                    turns off Eigen's thread pool (matmuls on one core, as llama-server -t 1)
    bfloat16        the server's runner in bfloat16 (weights and KV), to show what XLA's CPU dtype costs
    + f32 relaid    the server's runner with matmul_dtype="float32": matrices [out, in] for one-token
                    steps, [in, out] with an untied LM head from 2 tokens (ModelRunner matmul_dtype)
    + bf16 matmuls, f32 attention   the same copies in bfloat16 (activations, norms and KV stay float32),
                    attention's two products in float32 (as before engine_speed16.md section 6)
    + bf16 matmuls  the same copies in bfloat16, and attention's two products too (the runner's
                    matmul_dtype="bfloat16" now)

The variants run interleaved, `--repeats` rounds, so machine load hits each alike; medians are printed
with the load average. Cores: XLA's CPU client uses every core it is given (`taskset -c 0` to pin one).

    python experiments/benchmarks/engine_speed.py [--model small-100m] [--repeats 3] [--variants ...]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

EXTRA_XLA_FLAGS = {"xnnpack": "--xla_cpu_use_xnnpack=true", "onednn": "--xla_cpu_use_onednn=true",
                   "1 thread": "--xla_cpu_multi_thread_eigen=false"}
VARIANTS = {
    "baseline": dict(min_seqs=4),
    "rows from 1": dict(min_seqs=1),
    "dynamic ctx": dict(server=True),
    "dynamic ctx + xnnpack": dict(server=True, xla="xnnpack"),
    "dynamic ctx + onednn": dict(server=True, xla="onednn"),
    "dynamic ctx, 1 thread": dict(server=True, xla="1 thread"),
    "bfloat16": dict(server=True, dtype="bfloat16"),
    "dynamic ctx + f32 relaid": dict(server=True, matmul_dtype="float32"),
    "dynamic ctx + bf16 matmuls, f32 attention": dict(server=True, matmul_dtype="bfloat16", attention_dtype="float32"),
    "dynamic ctx + bf16 matmuls": dict(server=True, matmul_dtype="bfloat16"),
    "dynamic ctx + bf16 matmuls + xnnpack": dict(server=True, matmul_dtype="bfloat16", xla="xnnpack"),
}


def measure(model: str, variant: dict, clients: tuple[int, ...], prompt_len: int, out_len: int) -> dict:
    """In this process: {clients: (median decode step ms, output tok/s)} for one variant."""
    import numpy as np

    from reference.engine import Engine
    from reference.request import SamplingParams
    from reference.runner import ModelRunner
    from reference.schedulers.continuous import ContinuousScheduler
    from sim.lab.server.engine_loop import serving_runner_options, step_limits

    sched = ContinuousScheduler(num_blocks=2048, block_size=16, max_num_seqs=16, max_num_batched_tokens=512,
                                max_model_len=1024)
    if variant.get("server"):
        options = serving_runner_options(step_limits(sched))
    else:
        options = dict(min_seqs=variant["min_seqs"])
    runner = ModelRunner(model, layout=sched.layout, dtype=variant.get("dtype", "float32"), attention="jnp",
                         matmul_dtype=variant.get("matmul_dtype"), **options)
    runner.attention_dtype = variant.get("attention_dtype", runner.attention_dtype)  # before any compile
    if variant.get("server"):  # as the server does before it says ready: every shape its runner can meet
        for shape in runner.shapes():
            runner.compile_shape(shape)
    # Two warm-up passes per client count compile the shapes the baseline meets, off the clock. The
    # measured pass repeats their prompts, so it finds them in the prefix cache (as the peers' measured
    # wave does in engine_vs_peers.py) and starts with a step of 16 x 4 prompt tokens the first pass never
    # made: with one warm-up pass that shape compiled on the clock (~4 s; engine_speed16.md section 6).
    engine = Engine(sched, runner)
    rng = np.random.default_rng(0)
    out = {}
    for c in clients:
        prompts = [rng.integers(300, runner.cfg.vocab_size, prompt_len).tolist() for _ in range(c)]
        params = SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True)
        for _ in range(2):  # compiles what the shape set did not (baseline), off the clock: the second pass
            engine.generate(prompts, params)  # meets the prefix-cache hits of the measured one
        steps = []
        execute = runner.execute

        def timed(o):
            t = time.perf_counter()
            tokens = execute(o)
            steps.append((o.shape.kind, time.perf_counter() - t, o.shape.prefill_tokens))
            return tokens

        engine.runner = type("Timed", (), {"execute": staticmethod(timed)})()
        t0 = time.perf_counter()
        reqs = engine.generate(prompts, params)
        wall = time.perf_counter() - t0
        engine.runner = runner
        tokens = sum(r.num_output_tokens for r in reqs)
        out[c] = (1e3 * statistics.median(s for k, s, _ in steps if k == "decode"), tokens / wall,
                  breakdown(steps, wall))
    return out


def breakdown(steps: list[tuple[str, float, int]], wall: float) -> dict:
    """Per step kind: [count, median ms, total s, prompt tokens], and the wall time outside execute (s)."""
    kinds: dict = {}
    for k, s, p in steps:
        kinds.setdefault(k, []).append((s, p))
    out = {k: [len(v), 1e3 * statistics.median(s for s, _ in v), sum(s for s, _ in v), sum(p for _, p in v)]
           for k, v in kinds.items()}
    out["outside execute s"] = wall - sum(s for _, s, _ in steps)
    return out


def child(args) -> None:
    """Run one variant in this process and print its result as JSON (the parent sets XLA_FLAGS)."""
    res = measure(args.model, VARIANTS[args.child], tuple(args.clients), args.prompt, args.output)
    print("RESULT " + json.dumps({str(k): v for k, v in res.items()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small-100m")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt", type=int, default=100)
    ap.add_argument("--output", type=int, default=128)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    results: dict[str, list[dict]] = {v: [] for v in args.variants}
    loads = [os.getloadavg()[0]]
    for r in range(args.repeats):
        for v in args.variants:  # interleaved: each round measures every variant under the same load
            env = dict(os.environ)
            xla = VARIANTS[v].get("xla")
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + EXTRA_XLA_FLAGS[xla]).strip() if xla else \
                env.get("XLA_FLAGS", "")
            cmd = [sys.executable, __file__, "--child", v, "--model", args.model, "--prompt", str(args.prompt),
                   "--output", str(args.output), "--clients", *map(str, args.clients)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"{v}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            results[v].append(json.loads(line[7:]))
            print(f"round {r + 1} {v}: {line[7:]}", flush=True)
        loads.append(os.getloadavg()[0])
    print(f"\n{args.model}, {os.cpu_count()} cores visible to XLA, load average {min(loads):.1f}-{max(loads):.1f}, "
          f"medians of {args.repeats} interleaved rounds")
    head = " | ".join([f"decode ms/token c={args.clients[0]}"] + [f"tok/s c={c}" for c in args.clients])
    print(f"| variant | {head} |\n|---|" + "---|" * (1 + len(args.clients)))
    for v, runs in results.items():
        if not runs:
            continue
        dec = statistics.median(run[str(args.clients[0])][0] for run in runs)
        tps = [statistics.median(run[str(c)][1] for run in runs) for c in args.clients]
        print(f"| {v} | {dec:.1f} | " + " | ".join(f"{t:.0f}" for t in tps) + " |")


if __name__ == "__main__":
    main()
