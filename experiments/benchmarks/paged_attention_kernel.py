"""Decode attention time and achieved HBM bandwidth: jnp reference vs the Pallas kernel.

Llama-3.1-8B attention (32 query heads, 8 kv heads, head_dim 128), one layer, one decode
step: every sequence of the batch has `context` tokens in a paged pool (blocks scattered over
the pool, permuted) and one query at position context - 1.

    bandwidth = bytes of K/V the step needs / time = batch * context * 8 * 128 * 2 (K, V) * itemsize / t

Both paths must read that much at least once (the jnp reference also writes and re-reads a
gathered copy of every context; the kernel does not). Each cell also prints max|kernel - jnp|,
so the first run on a GPU is a correctness check of the compiled kernel as well; a one-off
check of the ragged prefill kernel runs first.

On a GPU: bfloat16, cells up to batch 128 x context 8192 (4.3 GB of K/V). Elsewhere (CPU):
float32, the kernel runs in Pallas' interpreter, only on a few small cells (the rest print
"skip"), so the whole run takes well under a minute. Every cell is bounded (a time budget per
cell, a fixed cap on repetitions) and printed as soon as it is done; a cell that fails prints
its error and the run goes on.

    python experiments/benchmarks/paged_attention_kernel.py [--batches 1 8 32] [--contexts 1024 8192]
        [--block-sizes 16 32] [--keys-per-step 16 64] [--budget 1.0] [--csv out.csv]
"""
from __future__ import annotations

import argparse
import csv
import functools
import statistics
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from reference import paged_attention as pa
from reference import pallas_attention as pk

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3.1-8B
ON_GPU = jax.default_backend() == "gpu"
CPU_KERNEL_TOKENS = 2048  # interpreter on CPU: only cells with batch * context <= this
GPU_DEFAULTS = dict(batches=[1, 8, 32, 128], contexts=[1024, 8192], block_sizes=[16, 32], keys_per_step=[0, 64])
CPU_DEFAULTS = dict(batches=[1, 4], contexts=[128, 512], block_sizes=[16], keys_per_step=[0])


def decode_inputs(batch: int, context: int, block_size: int, dtype, seed: int = 0):
    """q [B, H, D], k/v pools [NB, BS, K, D] (fragmented, permuted), tables [B, MB], context_lens [B]."""
    rng = np.random.default_rng(seed)
    mb = -(-context // block_size)
    nb = 1 + batch * mb  # block 0: the null block
    tables = rng.permutation(np.arange(1, nb)).reshape(batch, mb).astype(np.int32)
    key = jax.random.PRNGKey(seed)
    kq, kk, kv = jax.random.split(key, 3)
    pool_shape = (nb, block_size, KV_HEADS, HEAD_DIM)
    k = jax.random.normal(kk, pool_shape, dtype)
    v = jax.random.normal(kv, pool_shape, dtype)
    q = jax.random.normal(kq, (batch, HEADS, HEAD_DIM), dtype)
    return q, k, v, jnp.asarray(tables), jnp.full((batch,), context, jnp.int32)


def time_fn(fn, args, budget: float, max_reps: int = 100) -> float:
    """Median seconds per call after one warm-up call (which compiles); at most `budget` s of reps."""
    jax.block_until_ready(fn(*args))
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - start < budget):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def prefill_check(dtype) -> str:
    """max|kernel - jnp| of the ragged prefill on one mixed batch (chunks on cached context + a decode)."""
    rng = np.random.default_rng(1)
    bs, ctx, new = 16, [300, 0, 77], [64, 40, 1]
    S, T = len(ctx), sum(new) + 7  # 7 padding tokens
    mb = max(-(-(c + n) // bs) for c, n in zip(ctx, new)) + 1
    nb = 1 + S * mb
    tables = rng.permutation(np.arange(1, nb)).reshape(S, mb).astype(np.int32)
    k = jnp.asarray(rng.standard_normal((nb, bs, KV_HEADS, HEAD_DIM)), dtype)
    v = jnp.asarray(rng.standard_normal((nb, bs, KV_HEADS, HEAD_DIM)), dtype)
    q = jnp.asarray(rng.standard_normal((T, HEADS, HEAD_DIM)), dtype)
    seq_ids = np.concatenate([np.full(n, i) for i, n in enumerate(new)] + [np.zeros(7)]).astype(np.int32)
    positions = np.concatenate([np.arange(c, c + n) for c, n in zip(ctx, new)] + [np.zeros(7)]).astype(np.int32)
    query_start = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    context_lens = np.asarray([c + n for c, n in zip(ctx, new)], np.int32)
    args = (q, k, v, tables, seq_ids, positions, query_start, context_lens)
    ref = jax.jit(pa.paged_prefill_attention, static_argnames="tile")(*args, tile=32)
    out = jax.jit(pk.paged_prefill_attention_pallas, static_argnames="tile")(*args, tile=32)
    n = sum(new)
    diff = float(jnp.max(jnp.abs(out[:n].astype(jnp.float32) - ref[:n].astype(jnp.float32))))
    return f"prefill check (3 sequences, {n} tokens, block 16): max|kernel - jnp| = {diff:.2e}"


def main(argv=None) -> None:
    defaults = GPU_DEFAULTS if ON_GPU else CPU_DEFAULTS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", nargs="+", type=int, default=defaults["batches"])
    ap.add_argument("--contexts", nargs="+", type=int, default=defaults["contexts"])
    ap.add_argument("--block-sizes", nargs="+", type=int, default=defaults["block_sizes"])
    ap.add_argument("--keys-per-step", nargs="+", type=int, default=defaults["keys_per_step"],
                    help="kernel keys per loop step (0: the kernel's default)")
    ap.add_argument("--dtype", default="bfloat16" if ON_GPU else "float32", choices=["bfloat16", "float32"])
    ap.add_argument("--budget", type=float, default=1.0 if ON_GPU else 0.3, help="seconds of timed reps per path and cell")
    ap.add_argument("--csv", type=Path, help="also write the rows to this CSV file")
    args = ap.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({jax.default_backend()}), {args.dtype}, Llama-3.1-8B attention "
          f"(H={HEADS}, K={KV_HEADS}, D={HEAD_DIM}), one layer, decode; kernel "
          f"{'compiled (Triton)' if ON_GPU else 'interpreted (Pallas interpret mode)'}", flush=True)
    try:
        print(prefill_check(dtype), flush=True)
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"prefill check FAILED: {type(e).__name__}: {e}", flush=True)
        traceback.print_exc()

    ref_fn = jax.jit(pa.paged_decode_attention)
    header = (f"{'batch':>5} {'ctx':>6} {'bs':>3} {'tk':>3} {'KV MB':>8} {'jnp ms':>8} {'jnp GB/s':>8} "
              f"{'pallas ms':>9} {'pallas GB/s':>11} {'speedup':>7} {'max|diff|':>9}")
    print(header, flush=True)
    rows = []
    for block_size in args.block_sizes:
        for batch in args.batches:
            for context in args.contexts:
                rows += run_cell(ref_fn, batch, context, block_size, args.keys_per_step, dtype, args.budget)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {args.csv}")


def run_cell(ref_fn, batch: int, context: int, block_size: int, keys_per_step: list[int], dtype,
             budget: float) -> list[dict]:
    """One (batch, context, block size): the jnp reference once, the kernel per keys_per_step; printed as done."""
    kv_bytes = batch * context * KV_HEADS * HEAD_DIM * 2 * dtype.itemsize
    rows, jnp_s, inputs, ref = [], None, None, None
    try:
        inputs = decode_inputs(batch, context, block_size, dtype)
        jnp_s = time_fn(ref_fn, inputs, budget)
        ref = ref_fn(*inputs).astype(jnp.float32)
    except Exception as e:  # noqa: BLE001 - one bad cell must not end the run
        note = f"jnp FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    for tk in keys_per_step:
        row = dict(batch=batch, context=context, block_size=block_size, keys_per_step=tk or None,
                   kv_bytes=kv_bytes, jnp_s=jnp_s, pallas_s=None, max_diff=None, note="")
        if inputs is None:
            row["note"] = note
        elif not ON_GPU and batch * context > CPU_KERNEL_TOKENS:
            row["note"] = f"skip kernel: interpreter, batch*context > {CPU_KERNEL_TOKENS}"
        else:
            try:
                kern = jax.jit(functools.partial(pk.paged_decode_attention_pallas, keys_per_step=tk or None))
                row["pallas_s"] = time_fn(kern, inputs, budget, max_reps=100 if ON_GPU else 3)
                if ref is not None:
                    row["max_diff"] = float(jnp.max(jnp.abs(kern(*inputs).astype(jnp.float32) - ref)))
            except Exception as e:  # noqa: BLE001
                row["note"] = f"kernel FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)
        print(format_row(row), flush=True)
    return rows


def format_row(r: dict) -> str:
    def ms(t):
        return f"{t * 1e3:.3f}" if t else "-"

    def gbs(t):
        return f"{r['kv_bytes'] / t / 1e9:.1f}" if t else "-"

    speedup = f"{r['jnp_s'] / r['pallas_s']:.2f}x" if r["jnp_s"] and r["pallas_s"] else "-"
    diff = f"{r['max_diff']:.1e}" if r["max_diff"] is not None else "-"
    line = (f"{r['batch']:>5} {r['context']:>6} {r['block_size']:>3} {r['keys_per_step'] or 'def':>3} "
            f"{r['kv_bytes'] / 1e6:>8.1f} {ms(r['jnp_s']):>8} {gbs(r['jnp_s']):>8} {ms(r['pallas_s']):>9} "
            f"{gbs(r['pallas_s']):>11} {speedup:>7} {diff:>9}")
    return line + (f"  {r['note']}" if r["note"] else "")


if __name__ == "__main__":
    main()
