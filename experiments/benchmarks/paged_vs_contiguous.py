"""Decode-step latency and achieved memory bandwidth: paged vs contiguous KV cache.

For each model, batch and context, one decode step (every sequence adds one token on top of
`context - 1` cached tokens) is timed through ModelRunner.run (the jitted step plus the
token-id transfer; host-side batching is done once, outside the timing). Paged and
contiguous steps alternate so drift in the machine hits both alike.

    bandwidth = (weight bytes + K/V bytes of the batch's contexts) / step time

A decode step must read both at least once, so this is the roofline's memory term.
Paged: block size 16, each sequence's blocks scattered over the pool (fragmented, permuted).
Contiguous: one slot of `context` tokens per sequence. float32 on whatever device JAX uses.

    python experiments/benchmarks/paged_vs_contiguous.py [--models tiny small-100m] [--reps 15]
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from reference.batch import ScheduledChunk
from reference.config import get_preset
from reference.layout import PagedLayout, SlotLayout
from reference.model import init_params
from reference.request import Request, SamplingParams
from reference.runner import ModelRunner

BLOCK_SIZE = 16  # tokens per block (vLLM's default)


def decode_chunks(cfg, batch: int, context: int, paged: bool, rng) -> list[ScheduledChunk]:
    """One decode chunk per sequence: the token at position context - 1, its K/V to be written."""
    blocks_per_seq = -(-context // BLOCK_SIZE)
    physical = rng.permutation(np.arange(1, 1 + batch * blocks_per_seq))  # fragmented pool
    chunks = []
    for i in range(batch):
        tokens = rng.integers(0, cfg.vocab_size, context).tolist()
        req = Request(f"r{i}", tokens[:-1], SamplingParams(max_tokens=2))
        req.append_token(tokens[-1], 0.0)
        if paged:
            table = [int(b) for b in physical[i * blocks_per_seq: (i + 1) * blocks_per_seq]]
            chunks.append(ScheduledChunk(req, context - 1, 1, block_table=table))
        else:
            chunks.append(ScheduledChunk(req, context - 1, 1, slot=i))
    return chunks


def time_cell(cfg, params, batch: int, context: int, reps: int, rng) -> dict:
    """Median decode-step time (s) of both layouts for one (batch, context)."""
    runners = {
        "paged": ModelRunner(cfg, params, layout=PagedLayout(1 + batch * -(-context // BLOCK_SIZE), BLOCK_SIZE)),
        "contiguous": ModelRunner(cfg, params, layout=SlotLayout(batch, context)),
    }
    steps = {name: r.prepare(decode_chunks(cfg, batch, context, name == "paged", rng)) for name, r in runners.items()}
    times = {name: [] for name in runners}
    for i in range(reps + 2):  # two warm-up rounds (the first compiles)
        for name, r in runners.items():
            t0 = time.perf_counter()
            r.run(steps[name])
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    kv_read = batch * context * cfg.kv_bytes_per_token(bytes_per_element=4)  # float32
    weights = runners["paged"].weight_bytes
    out = {"bytes": weights + kv_read}
    for name in runners:
        out[name] = statistics.median(times[name])
    del runners
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "small-100m"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    ap.add_argument("--contexts", nargs="+", type=int, default=[128, 1024])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), float32, block size {BLOCK_SIZE}, "
          f"median of {args.reps} steps")
    print(f"{'model':<11} {'batch':>5} {'ctx':>5} {'paged ms':>9} {'contig ms':>9} {'ratio':>6} "
          f"{'paged GB/s':>10} {'contig GB/s':>11}")
    ratios = []
    for name in args.models:
        cfg = get_preset(name)
        params = init_params(cfg, seed=args.seed)
        for batch in args.batches:
            for context in args.contexts:
                r = time_cell(cfg, params, batch, context, args.reps, rng)
                ratio = r["paged"] / r["contiguous"]
                ratios.append(ratio)
                print(f"{name:<11} {batch:>5} {context:>5} {r['paged'] * 1e3:>9.2f} {r['contiguous'] * 1e3:>9.2f} "
                      f"{ratio:>6.2f} {r['bytes'] / r['paged'] / 1e9:>10.2f} {r['bytes'] / r['contiguous'] / 1e9:>11.2f}",
                      flush=True)
    print(f"paged/contiguous decode-step time: median {statistics.median(ratios):.2f}x, "
          f"worst {max(ratios):.2f}x over {len(ratios)} cells (target <= 1.3x)")


if __name__ == "__main__":
    main()
