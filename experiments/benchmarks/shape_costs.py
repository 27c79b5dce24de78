"""What the server's step shapes cost on this CPU: each compiled shape of the continuous server's runner, run alone.

1. every shape of the runner that `servesim serve` builds (coarse_mixed rules, dynamic context), zero inputs and
   context lengths 0 (attention walks no context: the matmuls, LM head and sampling of the padded arrays);
2. decode steps at real context lengths: the server runner (dynamic context) vs the runner `servesim bench` builds
   in process (context buckets, min 4 rows), so the two paths of the HTTP table can be told apart.
Median of 25 runs after 5 warm ones (ms), one process, XLA_FLAGS as given.

    PYTHONPATH=$PWD python experiments/benchmarks/shape_costs.py CONFIG.toml   (e.g. serve_http.py's continuous.toml)
"""
from __future__ import annotations

import statistics
import sys
import time

import jax
import numpy as np

from reference import runner as R
from sim.lab.bench import make_runner
from sim.lab.experiment import load_experiment
from sim.lab.server.engine_loop import build_engine


def step_ms(run, padded, context_len: int = 0, repeats: int = 30) -> float:
    """Median wall time (ms) of the compiled step of shape padded, every row at context_len tokens."""
    abstract = run._abstract_step(padded)
    run.compile(abstract)
    batch = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), abstract.batch)
    batch["context_lens"][:] = context_len
    for part in ("decode", "prefill"):
        if part in batch and "tables" in batch[part]:  # distinct real blocks, as a sequence would hold
            batch[part]["tables"][:] = np.arange(1, batch[part]["tables"].shape[1] + 1)
    step = R.PreparedStep(jax.device_put(batch), padded, abstract.contexts, [], (), np.zeros(0, np.int64))
    fn = R._COMPILED[run._compile_key(step)]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        tokens, _, run.cache = fn(run.params, run.cache, step.batch)
        np.asarray(tokens)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[5:])


def main() -> None:
    exp = load_experiment(sys.argv[1])
    engine, cfg = build_engine(exp)
    server = engine.runner.runner
    print("# server runner shapes, context 0 (ms)")
    for p in server.shapes():
        print(f"decode rows {p.decode_rows:3d} | prefill rows {p.prefill_rows:3d} tokens {p.prefill_tokens:4d} "
              f"tiles {p.prefill_tiles:3d} | {step_ms(server, p):6.2f}", flush=True)
    bench = make_runner(exp, cfg)
    print("# decode step at real contexts (ms): server runner (dynamic context) | bench runner (context buckets)")
    for rows in (1, 10, 50):
        for ctx in (120, 200):
            ps, pb = server.padding.step(rows, ctx, 0, 0, 0), bench.padding.step(rows, ctx, 0, 0, 0)
            print(f"{rows:2d} sequences at {ctx} tokens: server {ps.decode_rows} rows {step_ms(server, ps, ctx):6.2f} | "
                  f"bench {pb.decode_rows} rows, context {pb.decode_context} {step_ms(bench, pb, ctx):6.2f}", flush=True)


if __name__ == "__main__":
    main()
