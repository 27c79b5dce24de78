"""Paged attention as a Pallas kernel: K/V read block by block through the block table.

Drop-in twins of the pure-jnp reference in `reference/paged_attention.py`:

    paged_decode_attention_pallas(q, k_cache, v_cache, block_tables, context_lens)
    paged_prefill_attention_pallas(q, k_cache, v_cache, block_tables, seq_ids, positions,
                                   query_start, context_lens, tile=32)

Same arguments, same semantics, same output. The reference gathers each sequence's whole
padded context into a dense copy (`gather_paged`) and then attends; this kernel never builds
that copy. It streams the context through the block table a few keys at a time and keeps a
running ("online") softmax, as flash attention does.

Backend: Pallas on NVIDIA GPU through the Triton lowering (`jax.experimental.pallas.triton`).
It is the well-trodden GPU path of Pallas in jax 0.10 and matches what this kernel needs:
gathers through computed addresses (a table lookup per key), masked loads, and a plain loop
per program. Mosaic GPU (the other Pallas GPU backend) is built around TMA copies of
rectangular tiles into shared memory and warpgroup matmuls; it suits dense attention on Hopper
better, but a per-key gather through a table is not its natural shape. With `interpret=True`
the same kernel runs on any backend (CPU included) in Pallas' interpreter; this is how the
tests run it.


The problem, for a student
--------------------------
Every layer's K and V live in a pool of fixed-size blocks:

    k_cache, v_cache  [NB, BS, K, D]     NB blocks of BS tokens, K kv heads, head_dim D

Block 0 is the null block. A sequence's block table row [MB] lists the physical block holding
each of its logical blocks: token position p of that sequence lives at

    block = table[p // BS],   row p % BS of that block,   i.e. slot block * BS + p % BS

of the pool seen flat as [NB * BS, K, D] (the same slot `write_kv` writes to). Tables are
padded with 0, the null block, so every entry is a real block in the pool: a padded entry is
never an out-of-bounds address, only a block whose contents get masked (see "Masking").

One kernel does both decode and ragged prefill. Both are "tiles" of queries from ONE sequence:
decode is a tile of one query at position context_len - 1; prefill cuts each sequence's new
tokens into tiles of `tile` queries (`paged_attention.query_tiles`, no tile mixes sequences).

The grid, and what one program instance does
--------------------------------------------
    grid = (N query tiles, K kv heads, C context splits)

Program (i, h, c) owns query tile i (decode: sequence i) and kv head h. GQA: the G = H / K
query heads that share kv head h are processed together, so K/V are read once per kv head, not
once per query head. The wrapper packs the tile's (query, head) pairs into rows

    q_rows [N, K, R, D]     row t * G + g = query t of the tile, query head h * G + g
    row_pos [N, R]          position of that row's query; -1 for a padding row

where R = TQ * G rounded up to a power of two and to at least 16 (Triton loads and `tl.dot`
want power-of-two shapes, and matmul tiles of at least 16). Padding rows (q = 0, position -1)
see no key; their output is computed and thrown away.

The causal mask bounds the work: the tile's last query, at position max(row_pos), sees keys
0 .. max(row_pos), so the program walks key positions [0, kv_len) with kv_len = max(row_pos)+1
(decode: the whole context) in steps of TK keys (`keys_per_step`, a power of two >= 16; by
default max(16, BS) rounded up to a power of two, i.e. exactly one block per step when BS is a
power of two >= 16). Step j:

    key_pos = j * TK + arange(TK)                        [TK]   logical key positions
    block   = table[key_pos // BS]                       [TK]   the table lookup (masked load)
    slot    = block * BS + key_pos % BS                  [TK]   rows of the flat pool
    k, v    = pool[slot, h, :]                           [TK, D] each, a gather via the table

So one loop iteration reads one block of K and one of V through the table (TK = BS), or, for
small blocks, the TK / BS consecutive blocks that hold those TK positions. In this pool layout
the D values of one token and one kv head are contiguous (one 256-byte row for bf16, D = 128)
and consecutive tokens of a block are K * D elements apart anyway, so a gather of TK rows costs
the same memory traffic as "loading a block". Nothing outside the table is ever addressed.

With context splits (C > 1, flash-decoding), program c walks only its share of the key steps;
each program writes its unnormalised partial result and the wrapper merges the C partials.
Decode at small batch has only B * K programs (e.g. 8 kv heads at batch 1: 8 programs on a
GPU with 132 SMs); splitting the context fills the machine. By default C is chosen from the
shapes (more splits when there are few programs, at least 4 key steps per split).

Online softmax (float32)
------------------------
Per row the program carries m (running max of the scores), l (running sum of exp(s - m)) and
acc [R, D] (running sum of exp(s - m) * v), all float32. For each step:

    s      = (q @ k^T) / sqrt(D), masked                 [R, TK]
    m_new  = max(m, max_k s)                             [R]
    alpha  = exp(m - m_new)                              [R]    rescales what was summed so far
    p      = exp(s - m_new)                              [R, TK]
    l      = alpha * l + sum_k p
    acc    = alpha * acc + p @ v                         [R, D]

and at the end out = acc / l. The full [R, context] score matrix never exists; neither does the
gathered context.

Masking, and why padding is safe
--------------------------------
* Context length: a row at position p sees keys <= p. The wrapper clamps p to context_len - 1,
  so "key_pos <= row_pos" is both the causal mask (by position, across chunked prefill on top of
  cached context) and the "key_pos < context_len" mask, exactly the reference's mask.
* Masked scores are set to a large finite negative (-1e30), never -inf. A row with no visible
  key at all (a padding row: position -1) then has m = -1e30 and exp(s - m) = exp(0) = 1
  for every key: a finite (meaningless) average, never inf - inf = NaN. A program with no key
  step at all (a padding sequence: context 0) ends with l = 0, and out = acc / l is taken as 0.
  Padding rows stay finite.
* Keys at positions >= kv_len in the last step are loaded with a mask (Triton does not touch
  memory under a false mask; the value is 0), and their table column, which may lie past the
  table's end, is masked too. So the kernel's result depends only on live tokens: a NaN left in
  a freed block, in the null block or in the unused tail of a sequence's last block cannot leak
  into it (0 * NaN would be NaN).
* Padding table entries are 0: a live key never maps to them, and any address formed from them
  is the null block, a real block of the pool, written only by padding tokens.

Numerics match the reference: scores and softmax in float32, p cast to the cache dtype for
p @ v with float32 accumulation. The dots ask for Precision.HIGHEST: at DEFAULT precision the
Triton lowering turns a float32 dot into TF32 tensor-core MMA (10-bit mantissa, ~1e-3 error);
HIGHEST keeps float32 exact (decode is memory-bound, so this costs nothing there), and leaves
bfloat16 / float16 operands on their native tensor-core MMA with float32 accumulation.

GPU constraints (checked when not interpreting): head_dim a power of two >= 16 (Llama: 128),
keys_per_step a power of two >= 16. Block size, GQA ratio, tile and table width are free.

Status: correct in interpret mode (tests/test_pallas_attention.py, against the jnp reference and
float64); lowers to Triton IR for platform "cuda" without a GPU (tested). Not yet run on a GPU:
experiments/benchmarks/paged_attention_kernel.py times it there and prints max|kernel - jnp|
for every cell. `DEBUG = True` prints the kernel's jaxpr and Triton IR while lowering.

Where it is used
----------------
`attention_backend(name)` returns (decode_fn, prefill_fn) with the reference's signatures:

    decode_fn, prefill_fn = attention_backend("auto")   # "auto" | "pallas" | "jnp"

"auto" is the Pallas kernel when JAX's default backend is a GPU and the jnp reference
elsewhere; "pallas" forces the kernel (interpreted off GPU: slow, for tests); "jnp" forces the
reference. An unknown name raises ConfigError("attention", ...) listing the allowed names.
`ModelRunner(..., attention="auto")` passes the name to `kv_cache.access_for`, whose
`PagedAccess` (a static argument of the compiled step) calls the pair. Only the paged layout
has a kernel; the slot layout keeps the jnp path.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from reference import paged_attention as pa
from reference.errors import ConfigError

Array = jax.Array
_MASKED = pa._MASKED  # large finite negative: fully masked rows stay finite (never -inf)
_MIN_TILE = 16  # smallest matmul tile Triton handles well (rows, keys per step)
_TARGET_PROGRAMS = 256  # about two programs per SM on an H100/H200 (132 SMs)
_MIN_STEPS_PER_SPLIT = 4  # a context split should amortise its merge
# Triton lowers a float32 dot at DEFAULT precision as TF32 (10-bit mantissa); HIGHEST makes it
# IEEE float32. bfloat16/float16 operands are unaffected (native tensor-core MMA, float32 sums).
_PRECISION = lax.Precision.HIGHEST
NUM_WARPS = 4
NUM_STAGES = 2
DEBUG = False  # True: print the kernel's jaxpr and, when lowering for a GPU, its Triton IR


def _pow2_at_least(n: int) -> int:
    """Smallest power of two >= n (and >= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


# ----------------------------------------------------------------------------- the kernel


def _attention_kernel(row_pos_ref, table_ref, q_ref, k_ref, v_ref, acc_ref, m_ref, l_ref, *,
                      block_size: int, keys_per_step: int, num_splits: int, scale: float):
    """One program: query tile i, kv head h, context split c (the program ids).

    row_pos_ref [R] int32   position of each row's query, clamped to context_len - 1; -1 = padding
    table_ref   [MB] int32  this tile's sequence's block table (0 = null block)
    q_ref       [R, D]      rows = (query, query head) pairs of kv head h
    k_ref, v_ref [NB*BS, D] kv head h's column of the whole flat pool (only gathered from)
    acc_ref     [R, D] f32  unnormalised output sum_k exp(s - m) v   (of this split)
    m_ref, l_ref [R] f32    running max and running sum of exp(s - m) (of this split)
    """
    R, D = q_ref.shape
    TK, BS = keys_per_step, block_size
    q = q_ref[...]  # [R, D]
    row_pos = row_pos_ref[...]  # [R]
    kv_len = jnp.max(row_pos) + 1  # keys 0 .. kv_len-1 are needed (causal); 0 for an all-padding tile
    n_steps = pl.cdiv(kv_len, TK)  # key steps of the whole context
    per_split = pl.cdiv(n_steps, num_splits)
    first = pl.program_id(2) * per_split  # this split's key steps: [first, last)
    last = jnp.minimum(first + per_split, n_steps)
    cols = jnp.arange(D)  # [D]

    def step(j, carry):
        m, l, acc = carry  # [R], [R], [R, D] float32
        key_pos = j * TK + jnp.arange(TK)  # [TK] logical positions of this step's keys
        live = key_pos < kv_len  # [TK] past kv_len: not loaded, not even the table entry
        block = plgpu.load(table_ref.at[key_pos // BS], mask=live, other=0)  # [TK] physical block
        slot = block * BS + key_pos % BS  # [TK] row of the flat pool
        kv_index = (slot[:, None], cols[None, :])  # gather rows `slot`, all D columns -> [TK, D]
        k = plgpu.load(k_ref.at[kv_index], mask=live[:, None], other=0)  # [TK, D]
        v = plgpu.load(v_ref.at[kv_index], mask=live[:, None], other=0)  # [TK, D]

        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=_PRECISION,
                            preferred_element_type=jnp.float32) * scale  # [R, TK] q @ k^T
        visible = key_pos[None, :] <= row_pos[:, None]  # [R, TK] causal + context length
        s = jnp.where(visible, s, _MASKED)  # [R, TK]
        m_new = jnp.maximum(m, jnp.max(s, axis=1))  # [R]
        alpha = jnp.exp(m - m_new)  # [R] rescale of the steps so far
        p = jnp.exp(s - m_new[:, None])  # [R, TK]
        l_new = alpha * l + jnp.sum(p, axis=1)  # [R]
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=_PRECISION,
                             preferred_element_type=jnp.float32)  # [R, D] p @ v
        return m_new, l_new, alpha[:, None] * acc + pv

    init = (jnp.full((R,), _MASKED, jnp.float32),  # m [R]
            jnp.zeros((R,), jnp.float32),  # l [R]
            jnp.zeros((R, D), jnp.float32))  # acc [R, D]
    m, l, acc = lax.fori_loop(first, last, step, init)
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def _default_splits(programs: int, max_steps: int) -> int:
    """Context splits: enough programs to fill a GPU, each split >= _MIN_STEPS_PER_SPLIT key steps."""
    want = -(-_TARGET_PROGRAMS // max(1, programs))
    return max(1, min(want, max_steps // _MIN_STEPS_PER_SPLIT))


def _attend_tiles(q: Array, q_pos: Array, tables: Array, k_cache: Array, v_cache: Array, *,
                  interpret: bool, keys_per_step: int | None, context_splits: int | None) -> Array:
    """Tiles of queries of one sequence each against that sequence's paged context.

    q [N, TQ, H, D], q_pos [N, TQ] int32 (already clamped to context_len - 1; -1 = padding row),
    tables [N, MB] int32 (each tile's block table row), k_cache, v_cache [NB, BS, K, D]
    -> [N, TQ, H, D] in q's dtype.
    """
    N, TQ, H, D = q.shape
    NB, BS, K, _ = k_cache.shape
    MB = tables.shape[1]
    G = H // K  # query heads per kv head
    rows = TQ * G  # real rows per (tile, kv head)
    R = _pow2_at_least(max(_MIN_TILE, rows))  # padded rows
    TK = keys_per_step or _pow2_at_least(max(_MIN_TILE, BS))  # keys per loop step
    if H % K:
        raise ConfigError("heads", f"{H} query heads do not share {K} kv heads evenly", "a multiple of kv_heads")
    if TK < 1 or TK & (TK - 1) or (not interpret and TK < _MIN_TILE):
        raise ConfigError("keys_per_step", f"got {keys_per_step!r}", "a power of two, >= 16 on a GPU")
    if not interpret and (D & (D - 1) or D < _MIN_TILE):
        raise ConfigError("head_dim", f"the Triton kernel needs a power of two >= 16, got {D}",
                          "16, 32, 64, 128, 256 (or interpret=True)")
    if context_splits is not None and (not isinstance(context_splits, int) or context_splits < 1):
        raise ConfigError("context_splits", f"got {context_splits!r}", "None (from the shapes) or an integer >= 1")
    max_steps = -(-MB * BS // TK)  # key steps of the longest possible context
    C = context_splits or _default_splits(N * K, max_steps)

    # Pack: rows t * G + g of kv head h are query t, head h * G + g.
    q_rows = q.reshape(N, TQ, K, G, D).transpose(0, 2, 1, 3, 4).reshape(N, K, rows, D)  # [N, K, rows, D]
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, R - rows), (0, 0)))  # [N, K, R, D]
    row_pos = jnp.repeat(q_pos.astype(jnp.int32), G, axis=1)  # [N, rows]
    row_pos = jnp.pad(row_pos, ((0, 0), (0, R - rows)), constant_values=-1)  # [N, R]
    k_flat = k_cache.reshape(NB * BS, K, D)  # [NB*BS, K, D] slot view (free reshape)
    v_flat = v_cache.reshape(NB * BS, K, D)  # [NB*BS, K, D]

    kernel = functools.partial(_attention_kernel, block_size=BS, keys_per_step=TK, num_splits=C,
                               scale=1.0 / math.sqrt(D))
    pool_spec = pl.BlockSpec((NB * BS, None, D), lambda i, h, c: (0, h, 0))  # kv head h's column
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(N, K, C),
        in_specs=[
            pl.BlockSpec((None, R), lambda i, h, c: (i, 0)),  # row_pos -> [R]
            pl.BlockSpec((None, MB), lambda i, h, c: (i, 0)),  # tables -> [MB]
            pl.BlockSpec((None, None, R, D), lambda i, h, c: (i, h, 0, 0)),  # q_rows -> [R, D]
            pool_spec,  # k_flat -> [NB*BS, D]
            pool_spec,  # v_flat -> [NB*BS, D]
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, R, D), lambda i, h, c: (c, i, h, 0, 0)),  # acc -> [R, D]
            pl.BlockSpec((None, None, None, R), lambda i, h, c: (c, i, h, 0)),  # m -> [R]
            pl.BlockSpec((None, None, None, R), lambda i, h, c: (c, i, h, 0)),  # l -> [R]
        ],
        out_shape=[
            jax.ShapeDtypeStruct((C, N, K, R, D), jnp.float32),  # acc
            jax.ShapeDtypeStruct((C, N, K, R), jnp.float32),  # m
            jax.ShapeDtypeStruct((C, N, K, R), jnp.float32),  # l
        ],
        interpret=interpret,
        debug=DEBUG,
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
        name="paged_attention",
    )(row_pos, tables.astype(jnp.int32), q_rows, k_flat, v_flat)

    # Merge the C splits (C = 1: just acc / l). A split that saw no key has m = -1e30, l = 0, acc = 0.
    m_all = jnp.max(m, axis=0)  # [N, K, R]
    w = jnp.exp(m - m_all)  # [C, N, K, R]
    l_all = jnp.sum(w * l, axis=0)  # [N, K, R]
    o = jnp.sum(w[..., None] * acc, axis=0) / jnp.where(l_all > 0, l_all, 1.0)[..., None]  # [N, K, R, D]
    o = o[:, :, :rows].reshape(N, K, TQ, G, D).transpose(0, 2, 1, 3, 4)  # [N, TQ, K, G, D]
    return o.reshape(N, TQ, H, D).astype(q.dtype)


def _interpret(interpret: bool | None) -> bool:
    """None: interpret unless JAX's default backend is a GPU."""
    return jax.default_backend() != "gpu" if interpret is None else bool(interpret)


# ----------------------------------------------------------------------------- public API


def paged_decode_attention_pallas(q: Array, k_cache: Array, v_cache: Array, block_tables: Array,
                                  context_lens: Array, *, interpret: bool | None = None,
                                  keys_per_step: int | None = None,
                                  context_splits: int | None = None) -> Array:
    """One query per sequence over its paged context, as `paged_attention.paged_decode_attention`.

    q [B, H, D] (the query at position context_len - 1), k_cache, v_cache [NB, BS, K, D],
    block_tables [B, MB] int32 padded with 0, context_lens [B] (including this token) -> [B, H, D].
    A padding sequence (context_len 0) gets a finite output (0).

    interpret: run in Pallas' interpreter (None: unless on a GPU). keys_per_step: keys per loop
    step (power of two; default max(16, block_size) rounded up). context_splits: programs per
    (sequence, kv head) along the context (default: from the shapes).
    """
    q_pos = (context_lens - 1)[:, None]  # [B, 1]; -1 for a padding sequence (sees nothing)
    o = _attend_tiles(q[:, None], q_pos, block_tables, k_cache, v_cache,
                      interpret=_interpret(interpret), keys_per_step=keys_per_step,
                      context_splits=context_splits)  # [B, 1, H, D]
    return o[:, 0]  # [B, H, D]


def paged_prefill_attention_pallas(q: Array, k_cache: Array, v_cache: Array, block_tables: Array,
                                   seq_ids: Array, positions: Array, query_start: Array,
                                   context_lens: Array, tile: int = 32, *,
                                   interpret: bool | None = None, keys_per_step: int | None = None,
                                   context_splits: int | None = None) -> Array:
    """Ragged (chunked prefill / mixed) attention, as `paged_attention.paged_prefill_attention`.

    q [T, H, D] flat new tokens; seq_ids [T] and positions [T] per token; block_tables [S, MB];
    query_start [S+1] (sequence s owns tokens [query_start[s], query_start[s+1]));
    context_lens [S] (cached + new tokens); tile: queries per program (any positive integer).
    Token at position p of sequence s sees positions <= p of s. The new K/V must already be
    written. -> [T, H, D]. Keyword options as in `paged_decode_attention_pallas`.

    The wrapper gathers each tile's queries (q[tile_tokens], [N, tile, H, D]) and scatters the
    output back, like the reference; only K/V, the big operand, are read through the table.
    """
    T = q.shape[0]
    S = query_start.shape[0] - 1
    num_tiles = S + -(-T // tile)  # an upper bound on sum ceil(q_len / tile), as in the reference
    tile_seq, tile_tokens, valid, tile_begin = pa.query_tiles(query_start, num_tiles, tile)
    ctx = context_lens[tile_seq]  # [N]
    q_pos = jnp.minimum(positions[tile_tokens], ctx[:, None] - 1)  # [N, tile]: sees keys < ctx too
    q_pos = jnp.where(valid, q_pos, -1)  # [N, tile]; invalid rows see nothing
    o = _attend_tiles(q[tile_tokens], q_pos, block_tables[tile_seq], k_cache, v_cache,
                      interpret=_interpret(interpret), keys_per_step=keys_per_step,
                      context_splits=context_splits)  # [N, tile, H, D]
    # Token t of sequence s is query (t - query_start[s]) of s's tiles, which are consecutive.
    row = tile_begin[seq_ids] * tile + (jnp.arange(T) - query_start[seq_ids])  # [T]
    row = jnp.clip(row, 0, num_tiles * tile - 1)  # padding tokens: any row
    return o.reshape(num_tiles * tile, *q.shape[1:])[row]  # [T, H, D]


ATTENTION_BACKENDS = ("auto", "pallas", "jnp")


def attention_backend(name: str) -> tuple[Callable, Callable]:
    """(decode_fn, prefill_fn) for the paged layout, with the jnp reference's signatures.

    "auto": the Pallas kernel if JAX's default backend is a GPU, else the jnp reference;
    "pallas": the Pallas kernel (interpreted when not on a GPU); "jnp": the reference.
    The functions returned are module-level (hashable), so they can be static jit arguments.
    """
    if name not in ATTENTION_BACKENDS:
        raise ConfigError("attention", f"unknown attention backend {name!r}", ", ".join(ATTENTION_BACKENDS))
    if name == "auto":
        name = "pallas" if jax.default_backend() == "gpu" else "jnp"
    if name == "pallas":
        return paged_decode_attention_pallas, paged_prefill_attention_pallas
    return pa.paged_decode_attention, pa.paged_prefill_attention
