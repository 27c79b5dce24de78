"""ModelRunner: executes one scheduler step (a list of ScheduledChunk) on the device.

    chunks -> padded arrays (host, numpy) -> ONE jitted step (write K/V, attend, sample) -> token ids

Two jitted entry points: `decode_step` when every chunk is one token (q [B, H, D]), and
`mixed_step` for anything else (flat ragged tokens [T]: prefill chunks on top of cached
context, plus decodes). Shapes are padded to power-of-two buckets (tokens, sequences,
blocks per table or context length), so a serving loop compiles a handful of shapes, then no more;
`num_compilations` counts them. The KV cache is donated to the step and updated in place.
Only the sampled token ids come back to the host.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from reference import kv_cache as kvc
from reference import paged_attention as pa
from reference.batch import ScheduledChunk
from reference.config import ModelConfig, get_preset
from reference.errors import ConfigError
from reference.model import Params, forward_hidden, init_params, lm_head, param_bytes
from reference.sampling import sample

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _bucket(n: int, minimum: int, cap: int | None = None) -> int:
    """Smallest power of two >= max(n, minimum), capped at cap."""
    b = 1 << (max(n, minimum, 1) - 1).bit_length()
    return b if cap is None else min(b, cap)


_TRACES = [0]  # how many step shapes have been traced (= compiled) in this process


def _step(params: Params, cache: kvc.KVCache, batch: dict, *, cfg: ModelConfig, paged: bool,
          decode: bool, max_context: int, tile: int) -> tuple:
    """The whole step on device. batch holds the padded arrays built by ModelRunner.prepare."""
    _TRACES[0] += 1  # runs once per trace, i.e. per compilation

    def attend(i, q, k, v, layer_cache):
        kc, vc = pa.write_kv(*layer_cache, k, v, batch["slot_mapping"])  # write first: see this step's tokens
        ctx = batch["context_lens"]
        if decode and paged:
            o = pa.paged_decode_attention(q, kc, vc, batch["tables"], ctx)
        elif decode:
            o = pa.contiguous_decode_attention(q, kc, vc, batch["slots"], ctx, max_context)
        elif paged:
            o = pa.paged_prefill_attention(q, kc, vc, batch["tables"], batch["seq_ids"],
                                           batch["positions"], batch["query_start"], ctx, tile)
        else:
            o = pa.contiguous_prefill_attention(q, kc, vc, batch["slots"], batch["seq_ids"],
                                                batch["positions"], batch["query_start"], ctx,
                                                max_context, tile)
        return o, (kc, vc)

    hidden, cache = forward_hidden(params, cfg, batch["tokens"], batch["positions"], attend, cache)
    if not decode:  # the last token of each sequence: hidden [T, E] -> [S, E]
        hidden = hidden[jnp.maximum(batch["query_start"][1:] - 1, 0)]
    with jax.named_scope("lm_head"):
        logits = lm_head(params, hidden)  # [S, V] float32
    with jax.named_scope("sample"):
        tokens = sample(logits, batch["temperature"], batch["top_k"], batch["top_p"],
                        batch["seeds"], batch["context_lens"])  # [S]
    return tokens, logits, cache


# The two entry points. Each compiles once per (model, layout kind, bucket shapes), shared by all runners.
_STATIC = ("cfg", "paged", "max_context", "tile")
decode_step = jax.jit(partial(_step, decode=True), static_argnames=_STATIC, donate_argnums=1)
mixed_step = jax.jit(partial(_step, decode=False), static_argnames=_STATIC, donate_argnums=1)


@dataclass
class PreparedStep:
    """A step's device inputs (from ModelRunner.prepare), ready for ModelRunner.run."""

    decode: bool
    batch: dict
    max_context: int
    num_chunks: int
    samples: list[bool]
    copies: tuple


class ModelRunner:
    """Runs the model for one scheduler step over a paged or contiguous KV cache.

    cfg: a ModelConfig or a preset name. params: weights, or None for init_params(cfg, seed).
    layout: kv_cache.PagedLayout(num_blocks, block_size) or kv_cache.ContiguousLayout(num_slots, max_len).
    sampling_seed: seeds requests whose SamplingParams.seed is None (mixed with the request id).
    min_tokens / min_seqs / min_blocks: smallest buckets; query_tile: queries per prefill tile.
    """

    def __init__(self, cfg: ModelConfig | str, params: Params | None = None, *, layout: kvc.Layout,
                 seed: int = 0, dtype: Any = jnp.float32, sampling_seed: int = 0,
                 min_tokens: int = 16, min_seqs: int = 4, min_blocks: int = 4, query_tile: int = 32):
        self.cfg = get_preset(cfg) if isinstance(cfg, str) else cfg
        name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
        if name not in DTYPES:
            raise ConfigError("dtype", f"unsupported dtype {name!r}", ", ".join(DTYPES))
        self.dtype = DTYPES[name]
        if not isinstance(layout, (kvc.PagedLayout, kvc.ContiguousLayout)):
            raise ConfigError("layout", f"got {layout!r}", "PagedLayout(num_blocks, block_size) or "
                              "ContiguousLayout(num_slots, max_len)")
        self.layout = layout
        self.paged = isinstance(layout, kvc.PagedLayout)
        self.params = init_params(self.cfg, seed, self.dtype) if params is None else params
        self.cache = kvc.allocate(self.cfg, layout, self.dtype)
        self.sampling_seed = sampling_seed
        self.min_tokens, self.min_seqs, self.min_blocks, self.query_tile = min_tokens, min_seqs, min_blocks, query_tile
        if self.paged:
            self.max_blocks_per_seq = min(math.ceil(self.cfg.max_position / layout.block_size),
                                          layout.num_blocks - 1)
        self._compilations = 0
        self._last_logits = None
        self._last_n = 0

    # ------------------------------------------------------------------ accounting

    @property
    def num_compilations(self) -> int:
        """How many step shapes this runner has compiled so far (decode and mixed paths together).

        Compiled steps are shared between runners of the same model and layout kind, so a
        shape another runner already compiled does not count again.
        """
        return self._compilations

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights on device."""
        return param_bytes(self.params)

    @property
    def kv_bytes(self) -> int:
        """Bytes of the KV cache reserved on device."""
        return kvc.cache_bytes(self.cache)

    # ------------------------------------------------------------------ step

    def execute(self, chunks: Sequence[ScheduledChunk], block_copies=()) -> list[int]:
        """Run one step; returns one sampled token per chunk whose `samples` is True, in chunk order.

        block_copies (src, dst) are done first (copy-on-write of shared blocks).
        """
        return self.run(self.prepare(chunks, block_copies))

    def last_logits(self) -> np.ndarray:
        """Logits [num_chunks, V] (float32) of the last token of each chunk of the previous step."""
        return np.asarray(self._last_logits)[: self._last_n]

    def prepare(self, chunks: Sequence[ScheduledChunk], block_copies=()) -> PreparedStep:
        """Host side of a step: validate the chunks and build the padded device arrays."""
        for c in chunks:
            self._check(c)
        n = len(chunks)
        decode = all(c.num_tokens == 1 for c in chunks)
        S = _bucket(n, self.min_seqs)
        ends = [c.end for c in chunks]
        if self.paged:
            bs = self.layout.block_size
            mb = _bucket(max((-(-e // bs) for e in ends), default=1), self.min_blocks, self.max_blocks_per_seq)
            max_context = mb * bs
            tables = np.zeros((S, mb), np.int32)  # padded with the null block
            for i, c in enumerate(chunks):
                need = -(-c.end // bs)
                tables[i, :need] = c.block_table[:need]
        else:
            max_context = _bucket(max(ends, default=1), 16, self.layout.max_len)
            slots = np.zeros(S, np.int32)
            slots[:n] = [c.slot for c in chunks]

        T = S if decode else _bucket(sum(c.num_tokens for c in chunks), self.min_tokens)
        tokens, positions, seq_ids = (np.zeros(T, np.int32) for _ in range(3))
        pad_slot = 0 if self.paged else self.layout.num_slots * self.layout.max_len  # null block / dropped
        slot_mapping = np.full(T, pad_slot, np.int32)
        query_start = np.zeros(S + 1, np.int32)
        t = 0
        for i, c in enumerate(chunks):
            pos = np.arange(c.start, c.end)
            tokens[t: t + c.num_tokens] = c.request.token_ids(c.start, c.end)
            positions[t: t + c.num_tokens] = pos
            seq_ids[t: t + c.num_tokens] = i
            if self.paged:
                slot_mapping[t: t + c.num_tokens] = tables[i, pos // bs] * bs + pos % bs
            else:
                slot_mapping[t: t + c.num_tokens] = c.slot * self.layout.max_len + pos
            t += c.num_tokens
            query_start[i + 1] = t
        query_start[n + 1:] = t
        context_lens = np.zeros(S, np.int32)
        context_lens[:n] = ends

        temperature, top_p = np.zeros(S, np.float32), np.ones(S, np.float32)
        top_k, seeds = np.zeros(S, np.int32), np.zeros(S, np.uint32)
        for i, c in enumerate(chunks):
            sp = c.request.sampling
            temperature[i], top_k[i], top_p[i] = sp.temperature, sp.top_k, sp.top_p
            seeds[i] = self._seed(c)

        batch = dict(tokens=tokens, positions=positions, slot_mapping=slot_mapping,
                     context_lens=context_lens, temperature=temperature, top_k=top_k, top_p=top_p,
                     seeds=seeds)
        batch["tables" if self.paged else "slots"] = tables if self.paged else slots
        if not decode:
            batch.update(seq_ids=seq_ids, query_start=query_start)
        return PreparedStep(decode, jax.device_put(batch), max_context, n,
                            [c.samples for c in chunks], tuple(block_copies))

    def run(self, step: PreparedStep) -> list[int]:
        """Device side of a step: block copies, then the jitted forward + sampling; token ids to host."""
        if step.copies:
            if not self.paged:
                raise ConfigError("block_copies", "given to a contiguous-cache runner", "only with PagedLayout")
            self.cache = kvc.copy_blocks(self.cache, step.copies)
        if step.num_chunks == 0:
            return []
        traces = _TRACES[0]
        entry = decode_step if step.decode else mixed_step
        tokens, self._last_logits, self.cache = entry(self.params, self.cache, step.batch, cfg=self.cfg,
                                                      paged=self.paged, max_context=step.max_context,
                                                      tile=self.query_tile)
        self._compilations += _TRACES[0] - traces
        self._last_n = step.num_chunks
        host = np.asarray(tokens)  # the only device -> host transfer: [S] int32
        return [int(tok) for tok, s in zip(host, step.samples) if s]

    # ------------------------------------------------------------------ helpers

    def _seed(self, c: ScheduledChunk) -> int:
        """The request's seed, or one derived from the runner seed and the request id."""
        seed = c.request.sampling.seed
        if seed is None:
            seed = self.sampling_seed * 1_000_003 + zlib.crc32(c.request.request_id.encode())
        return seed % (1 << 32)

    def _check(self, c: ScheduledChunk) -> None:
        """ConfigError naming the field when a chunk cannot run on this runner."""
        rid = c.request.request_id
        if c.num_tokens < 1 or c.start < 0 or c.end > c.request.num_tokens:
            raise ConfigError("chunk", f"request {rid}: tokens [{c.start}, {c.end}) not within its "
                              f"{c.request.num_tokens} known tokens", "1 or more known tokens")
        if c.end > self.cfg.max_position:
            raise ConfigError("max_position", f"request {rid} needs {c.end} positions, the model has "
                              f"{self.cfg.max_position}", f"at most {self.cfg.max_position} tokens per request")
        if self.paged:
            table, bs, nb = c.block_table, self.layout.block_size, self.layout.num_blocks
            if table is None:
                raise ConfigError("block_table", f"request {rid} has none", "a list of block ids (paged layout)")
            if len(table) > self.max_blocks_per_seq:
                raise ConfigError("block_table", f"request {rid} has {len(table)} blocks",
                                  f"at most {self.max_blocks_per_seq} blocks per request")
            need = -(-c.end // bs)
            if len(table) < need:
                raise ConfigError("block_table", f"request {rid} has {len(table)} blocks, needs {need} "
                                  f"for {c.end} tokens", f">= ceil(tokens / {bs}) blocks")
            if not all(0 < b < nb for b in table[:need]):
                raise ConfigError("block_table", f"request {rid} has block ids {list(table[:need])}",
                                  f"1..{nb - 1} (0 is the null block)")
        else:
            if c.slot is None or not 0 <= c.slot < self.layout.num_slots:
                raise ConfigError("slot", f"request {rid} has slot {c.slot!r}", f"0..{self.layout.num_slots - 1}")
            if c.end > self.layout.max_len:
                raise ConfigError("max_len", f"request {rid} needs {c.end} tokens, a slot holds "
                                  f"{self.layout.max_len}", f"at most {self.layout.max_len} tokens per request")
