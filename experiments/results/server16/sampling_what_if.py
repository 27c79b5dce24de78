"""What would close the article client's 3x at 10 users: sampling without the sort when nothing is filtered.

The article client leaves temperature at OpenAI's default (1) and sets neither top_k nor top_p, yet
reference/sampling.py sorts every row's logits (for top-k / top-p) whenever any row samples. This
runs serve_http.py's in-process worker (the server's engine, no HTTP) on the 10-user level at
temperature 1, side by side: the engine as it is, and the engine with `reference.runner.sample`
patched (in this process only) to draw with jax.random.categorical on the scaled logits when no
row asks for top-k or top-p (the same draw as the sorting path then, up to its cumsum rounding),
both for the sequential and the continuous engine; prints medians and continuous / sequential.

    PYTHONPATH=$PWD python experiments/results/server16/sampling_what_if.py [--repeats 3] [--cache DIR]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

import reference.runner
from reference import sampling

ROOT = Path(__file__).resolve().parents[3]
_spec = importlib.util.spec_from_file_location("serve_http", ROOT / "experiments" / "benchmarks" / "serve_http.py")
serve_http = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve_http)


def sample_unsorted_when_unfiltered(logits, temperature, top_k, top_p, seeds, positions):
    """reference.sampling.sample, except that when no row filters (top_k 0, top_p 1) the draw skips the sort."""
    def plain_row(row, t, seed, position):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), position)
        return jax.random.categorical(key, row / jnp.maximum(t, 1e-6)).astype(jnp.int32)

    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def plain(_):
        return jnp.where(temperature > 0, jax.vmap(plain_row)(logits, temperature, seeds, positions), greedy)

    filtered = jnp.any((temperature > 0) & ((top_k > 0) | (top_p < 1)))
    return jax.lax.cond(filtered, lambda _: sampling.sample(logits, temperature, top_k, top_p, seeds, positions),
                        plain, None)


class Worker(serve_http.Worker):
    """serve_http's in-process worker, optionally with the patched sampler."""

    def __init__(self, cfg: Path, cache: str, patched: bool):
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", str(cfg), "--cache", cache]
                                     + (["--patched"] if patched else []), cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/servesim/jax"))
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="sampling_what_if_")))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--patched", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        if args.patched:
            reference.runner.sample = sample_unsorted_when_unfiltered
        return serve_http.worker(args.worker, args.cache)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_use_xnnpack=true".strip()
    users, requests = 10, 50
    cfgs = {e: serve_http.write_config(args.out / f"{e}.toml", e, 1, 1, serve_http.OUTPUT_TOKENS)
            for e in ("sequential", "continuous")}
    levels = {e: serve_http.write_config(args.out / f"{e}-{users}.toml", e, users, requests // users,
                                         serve_http.OUTPUT_TOKENS) for e in cfgs}
    workers = {(e, p): Worker(cfgs[e], args.cache, p) for e in cfgs for p in (False, True)}
    got: dict[tuple, list[float]] = {k: [] for k in workers}
    load = [os.getloadavg()[0]]
    try:
        for w in workers.values():
            w.wait_ready()
        for _ in range(args.repeats):
            for (e, p), w in workers.items():
                r = w.level(levels[e], 1.0)
                got[(e, p)].append(r["output_tok_s"])
                print(e, "patched" if p else "as is", f"{r['output_tok_s']:.0f} tok/s, {r['ms_per_step']:.2f} ms per step",
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
            load.append(os.getloadavg()[0])
    finally:
        for w in workers.values():
            w.close()
    med = {k: statistics.median(v) for k, v in got.items()}
    print(f"\nload average {min(load):.1f}-{max(load):.1f}; in process, {users} users, temperature 1, output tok/s "
          f"(median of {args.repeats})")
    print("| sampler | sequential | continuous | continuous / sequential |\n|---|---|---|---|")
    for p in (False, True):
        print(f"| {'sort skipped when unfiltered' if p else 'as is (sorts)'} | {med[('sequential', p)]:.0f} | "
              f"{med[('continuous', p)]:.0f} | {med[('continuous', p)] / med[('sequential', p)]:.2f}x |")


if __name__ == "__main__":
    main()
