"""Where a decode step's time goes on this CPU, piece by piece (small-100m by default).

At S decoding sequences (default 1 and 16) each at ~`--context` tokens, in one process (XLA reads
its flags once: set XLA_FLAGS outside), medians over `--reps` calls, each piece adding one layer:

    weights only      the jitted decoder with attention replaced by the identity (q out), the LM head
                      and a greedy argmax: no KV cache at all (the weight read and the matmuls)
    + KV cache        the runner's compiled step (write K/V, paged attention over the run-time context,
                      sampling) called on a prepared batch already on the device
    runner.execute    + the host side: prepare (padding, block tables), device_put, token fetch
    engine.step       + the scheduler: schedule and update around execute
    ..., <copy>       the first two again on a copy of the matrices (reference.model.with_matmul_dtype:
                      float32 or bfloat16, [out, in] layout "oi" or [in, out] with an untied head "io"),
                      what ModelRunner(matmul_dtype=...) runs (oi below batched_from tokens, io above)

The runner is the server's (runner options of sim.lab.server.engine_loop), float32.

    PYTHONPATH=$PWD XLA_FLAGS=--xla_cpu_use_xnnpack=true python experiments/benchmarks/decode_breakdown.py
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from reference.engine import Engine
from reference.model import forward_hidden, lm_head, with_matmul_dtype
from reference.request import Request, SamplingParams
from reference.runner import ModelRunner, _jitted_step
from reference.schedulers.continuous import ContinuousScheduler
from sim.lab.server.engine_loop import serving_runner_options, step_limits


def median_ms(fn, reps: int) -> float:
    """Median wall time of fn() in ms (fn blocks until its result is ready)."""
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts)


def weights_only(runner: ModelRunner, rows: int, params):
    """A callable running the decoder over `rows` tokens without any cache (attention = identity)."""
    cfg = runner.cfg

    @jax.jit
    def f(params, tokens, positions):
        hidden, _ = forward_hidden(params, cfg, tokens, positions, lambda i, q, k, v, c: (q, c))
        return jnp.argmax(lm_head(params, hidden), axis=-1)

    tokens = jnp.arange(rows, dtype=jnp.int32) + 300
    positions = jnp.full(rows, 100, jnp.int32)
    return lambda: f(params, tokens, positions).block_until_ready()


def measure(model: str, clients: int, context: int, reps: int, dtype: str) -> dict[str, float]:
    """{piece: median ms} for one decode step of `clients` sequences at about `context` tokens."""
    sched = ContinuousScheduler(num_blocks=2048, block_size=16, max_num_seqs=16, max_num_batched_tokens=512,
                                max_model_len=1024)
    runner = ModelRunner(model, layout=sched.layout, dtype=dtype, attention="jnp",
                         **serving_runner_options(step_limits(sched)))
    engine = Engine(sched, runner)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(300, runner.cfg.vocab_size, context).tolist() for _ in range(clients)]
    engine.generate([p[:8] for p in prompts], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    # Requests that never finish within the measurement: decode steps of `clients` rows throughout.
    params = SamplingParams(max_tokens=1024 - context, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        assert engine.add(Request(f"r{i}", p, params, arrival_time=engine.now())), "request refused"
    while len(sched.running) < clients or any(r.num_computed_tokens < r.num_tokens - 1 for r in sched.running):
        engine.step()
    out = sched.schedule(engine.now())  # a decode step, run repeatedly below (same tokens, same slots)
    assert all(c.is_decode for c in out.chunks), "not a decode step"
    step = runner.prepare(out.chunks, out.block_copies)

    def device_step(params):
        compiled = _jitted_step.lower(params, runner.cache, step.batch, **runner._static(step)).compile()

        def run():
            tokens, _, runner.cache = compiled(params, runner.cache, step.batch)
            tokens.block_until_ready()
        return run

    rows = step.padded.decode_rows
    res = {"weights only": median_ms(weights_only(runner, rows, runner.params), reps),
           "+ KV cache (compiled step)": median_ms(device_step(runner.params), reps),
           "runner.execute": median_ms(lambda: runner.execute(out), reps)}
    sched.update(out, runner.execute(out), engine.now())
    res["engine.step"] = median_ms(engine.step, reps)
    for dt in ("float32", "bfloat16"):
        for out_in in (True, False):
            copy = with_matmul_dtype(runner.params, dt, out_in=out_in)
            name = f"{'f32' if dt == 'float32' else 'bf16'} {'oi' if out_in else 'io'}"
            res[f"weights only, {name}"] = median_ms(weights_only(runner, rows, copy), reps)
            res[f"+ KV cache, {name}"] = median_ms(device_step(copy), reps)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small-100m")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--context", type=int, default=160)
    ap.add_argument("--reps", type=int, default=30, help="calls per piece (< 1024 - context)")
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    load0 = os.getloadavg()[0]
    table = {c: measure(args.model, c, args.context, args.reps, args.dtype) for c in args.clients}
    print(f"{args.model} {args.dtype}, context ~{args.context}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
          f"{os.cpu_count()} cores, load average {load0:.1f}-{os.getloadavg()[0]:.1f}; median ms of {args.reps}")
    print("| piece | " + " | ".join(f"{c} seq" for c in args.clients) + " |\n|---|" + "---|" * len(args.clients))
    for piece in table[args.clients[0]]:
        print(f"| {piece} | " + " | ".join(f"{table[c][piece]:.1f}" for c in args.clients) + " |")


if __name__ == "__main__":
    main()
