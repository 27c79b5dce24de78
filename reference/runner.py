"""ModelRunner: executes one scheduler step (a list of ScheduledChunk) on the device.

    chunks -> padded arrays (host, numpy) -> ONE jitted step (write K/V, attend, sample) -> token ids

One jitted step for every batch. Its flat tokens are [decodes: one token per decoding
sequence, padded to a bucket of sequences] + [prefill chunks (on top of cached context) back to
back, padded to a bucket of tokens]. The whole model runs over all of them together, so a mixed
step reads the weights once; inside each layer's attention the decode part takes the decode
path (one query per sequence) and only the prefill chunks take the ragged path, so decodes never
pay for query tiles. Shapes are padded to power-of-two buckets (decode sequences; prefill tokens
and sequences; blocks per table or context length of each part), so a serving loop compiles a
handful of shapes, then no more; `num_compilations` counts them. The KV cache is donated to the
step and updated in place. Sampled tokens and logits come back in the caller's chunk order.
Only the sampled token ids come back to the host.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from reference import kv_cache as kvc
from reference import paged_attention as pa
from reference.batch import ScheduledChunk
from reference.buckets import Padding
from reference.config import ModelConfig, get_preset
from reference.errors import ConfigError
from reference.model import Params, forward_hidden, init_params, lm_head, param_bytes
from reference.sampling import sample

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


_TRACES = [0]  # how many step shapes have been traced (= compiled) in this process


def _step(params: Params, cache: kvc.KVCache, batch: dict, *, cfg: ModelConfig, paged: bool,
          contexts: tuple[int, int], tile: int) -> tuple:
    """The whole step on device. batch holds the padded arrays built by ModelRunner.prepare.

    The flat tokens are [decode part: one token per decoding sequence, padded to Sd] +
    [prefill part: the multi-token chunks back to back, padded to Tp]. Every layer runs over all
    of them at once (the weights are read once per step); only attention is split: the decode
    part takes the decode path (one query per sequence), the prefill part the ragged path.
    Either part may be absent (then its key is missing from batch). contexts: the contiguous
    layout's context bucket of each part (the paged layout reads it from the block tables).
    """
    _TRACES[0] += 1  # runs once per trace, i.e. per compilation
    dec, pre = batch.get("decode"), batch.get("prefill")
    Sd = batch["tokens"].shape[0] - (pre["seq_ids"].shape[0] if pre else 0)  # decode rows (= decode tokens)
    ctx = batch["context_lens"]  # [Sd + Sp]: decode sequences, then prefill sequences

    def attend(i, q, k, v, layer_cache):
        kc, vc = pa.write_kv(*layer_cache, k, v, batch["slot_mapping"])  # write first: see this step's tokens
        out = []
        if dec is not None:
            q_dec, ctx_dec = q[:Sd], ctx[:Sd]  # [Sd, H, D]
            if paged:
                out.append(pa.paged_decode_attention(q_dec, kc, vc, dec["tables"], ctx_dec))
            else:
                out.append(pa.contiguous_decode_attention(q_dec, kc, vc, dec["slots"], ctx_dec, contexts[0]))
        if pre is not None:
            q_pre, ctx_pre, pos_pre = q[Sd:], ctx[Sd:], batch["positions"][Sd:]  # [Tp, H, D]
            if paged:
                out.append(pa.paged_prefill_attention(q_pre, kc, vc, pre["tables"], pre["seq_ids"], pos_pre,
                                                      pre["query_start"], ctx_pre, tile))
            else:
                out.append(pa.contiguous_prefill_attention(q_pre, kc, vc, pre["slots"], pre["seq_ids"], pos_pre,
                                                           pre["query_start"], ctx_pre, contexts[1], tile))
        return (out[0] if len(out) == 1 else jnp.concatenate(out)), (kc, vc)

    hidden, cache = forward_hidden(params, cfg, batch["tokens"], batch["positions"], attend, cache)
    if pre is not None:  # one row per sequence: each decode token, then the last token of each prefill chunk
        last = Sd + jnp.maximum(pre["query_start"][1:] - 1, 0)  # [Sp]
        hidden = jnp.concatenate([hidden[:Sd], hidden[last]])  # [Sd + Sp, E]
    with jax.named_scope("lm_head"):
        logits = lm_head(params, hidden)  # [Sd + Sp, V] float32
    with jax.named_scope("sample"):
        tokens = sample(logits, batch["temperature"], batch["top_k"], batch["top_p"],
                        batch["seeds"], ctx)  # [Sd + Sp]
    return tokens, logits, cache


# One jitted step. It compiles once per (model, layout kind, bucket shapes, which parts are present),
# shared by all runners.
model_step = jax.jit(_step, static_argnames=("cfg", "paged", "contexts", "tile"), donate_argnums=1)


@dataclass
class PreparedStep:
    """A step's device inputs (from ModelRunner.prepare), ready for ModelRunner.run.

    rows[i]: the output row (of the decode-then-prefill order) of the i-th chunk as given.
    """

    decode: bool
    batch: dict
    contexts: tuple[int, int]
    num_chunks: int
    samples: list[bool]
    copies: tuple
    rows: np.ndarray


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
        self.query_tile = query_tile
        rules = dict(min_tokens=min_tokens, min_seqs=min_seqs, min_blocks=min_blocks, query_tile=query_tile)
        if self.paged:
            self.padding = Padding.paged(layout.block_size, self.cfg.max_position, layout.num_blocks, **rules)
            self.max_blocks_per_seq = self.padding.context_cap // layout.block_size
        else:
            self.padding = Padding.contiguous(layout.max_len, **rules)
        self._compilations = 0
        self._last_logits = None
        self._last_rows = np.zeros(0, np.int64)

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
        """Logits [num_chunks, V] (float32) of the last token of each chunk of the previous step, in chunk order."""
        if self._last_logits is None:
            return np.zeros((0, self.cfg.vocab_size), np.float32)
        return np.asarray(self._last_logits)[self._last_rows]

    def prepare(self, chunks: Sequence[ScheduledChunk], block_copies=()) -> PreparedStep:
        """Host side of a step: validate the chunks and build the padded device arrays.

        Flat token order: the decodes (chunks of one token; one row each, padded to a bucket of
        Sd sequences), then the prefill chunks back to back (padded to a bucket of Tp tokens and
        Sp sequences). Output rows follow the same order; PreparedStep.rows maps them back.
        """
        for c in chunks:
            self._check(c)
        n = len(chunks)
        dec_idx = [i for i, c in enumerate(chunks) if c.num_tokens == 1]
        pre_idx = [i for i, c in enumerate(chunks) if c.num_tokens > 1]
        pad = self.padding.step(len(dec_idx), 0, len(pre_idx), sum(chunks[i].num_tokens for i in pre_idx), 0)
        Sd, Sp, Tp = pad.decode_rows, pad.prefill_rows, pad.prefill_tokens
        T, R = Sd + Tp, Sd + Sp  # flat tokens, output rows

        tokens, positions = np.zeros(T, np.int32), np.zeros(T, np.int32)
        pad_slot = 0 if self.paged else self.layout.num_slots * self.layout.max_len  # null block / dropped
        slot_mapping = np.full(T, pad_slot, np.int32)
        context_lens = np.zeros(R, np.int32)
        rows = np.zeros(n, np.int64)
        batch: dict = {}
        contexts = [0, 0]
        # Each part: (name, its chunks' indices, padded sequences S, its first output row, its first flat token).
        for part, (name, idx, S, row0, t) in enumerate((("decode", dec_idx, Sd, 0, 0),
                                                          ("prefill", pre_idx, Sp, Sd, Sd))):
            if not idx:
                continue
            part_chunks = [chunks[i] for i in idx]
            arrays, contexts[part] = self._locate(part_chunks, S)  # tables [S, MB] or slots [S]
            seq_ids = np.zeros(Tp, np.int32)  # prefill part only: sequence of each token within the part
            query_start = np.zeros(S + 1, np.int32)
            for j, (i, c) in enumerate(zip(idx, part_chunks)):
                pos = np.arange(c.start, c.end)
                tokens[t: t + c.num_tokens] = c.request.token_ids(c.start, c.end)
                positions[t: t + c.num_tokens] = pos
                if self.paged:
                    table, bs = arrays["tables"][j], self.layout.block_size
                    slot_mapping[t: t + c.num_tokens] = table[pos // bs] * bs + pos % bs
                else:
                    slot_mapping[t: t + c.num_tokens] = c.slot * self.layout.max_len + pos
                if name == "prefill":
                    seq_ids[t - Sd: t - Sd + c.num_tokens] = j
                query_start[j + 1] = query_start[j] + c.num_tokens
                context_lens[row0 + j] = c.end
                rows[i] = row0 + j
                t += c.num_tokens
            query_start[len(idx) + 1:] = query_start[len(idx)]
            if name == "prefill":
                arrays.update(seq_ids=seq_ids, query_start=query_start)
            batch[name] = arrays

        temperature, top_p = np.zeros(R, np.float32), np.ones(R, np.float32)
        top_k, seeds = np.zeros(R, np.int32), np.zeros(R, np.uint32)
        for c, r in zip(chunks, rows):
            sp = c.request.sampling
            temperature[r], top_k[r], top_p[r] = sp.temperature, sp.top_k, sp.top_p
            seeds[r] = self._seed(c)

        batch.update(tokens=tokens, positions=positions, slot_mapping=slot_mapping, context_lens=context_lens,
                     temperature=temperature, top_k=top_k, top_p=top_p, seeds=seeds)
        return PreparedStep(not pre_idx, jax.device_put(batch), tuple(contexts), n,
                            [c.samples for c in chunks], tuple(block_copies), rows)

    def _locate(self, chunks: Sequence[ScheduledChunk], S: int) -> tuple[dict, int]:
        """Where S (padded) sequences' K/V live: block tables [S, MB] (paged) or slots [S], and the context bucket."""
        context = self.padding.context(max(c.end for c in chunks))
        if self.paged:
            bs = self.layout.block_size
            tables = np.zeros((S, context // bs), np.int32)  # padded with the null block
            for j, c in enumerate(chunks):
                need = -(-c.end // bs)
                tables[j, :need] = c.block_table[:need]
            return {"tables": tables}, context
        slots = np.zeros(S, np.int32)
        slots[:len(chunks)] = [c.slot for c in chunks]
        return {"slots": slots}, context

    def run(self, step: PreparedStep) -> list[int]:
        """Device side of a step: block copies, then the jitted forward + sampling; token ids to host."""
        if step.copies:
            if not self.paged:
                raise ConfigError("block_copies", "given to a contiguous-cache runner", "only with PagedLayout")
            self.cache = kvc.copy_blocks(self.cache, step.copies)
        if step.num_chunks == 0:
            return []
        traces = _TRACES[0]
        tokens, self._last_logits, self.cache = model_step(self.params, self.cache, step.batch, cfg=self.cfg,
                                                           paged=self.paged, contexts=step.contexts,
                                                           tile=self.query_tile)
        self._compilations += _TRACES[0] - traces
        self._last_rows = step.rows
        host = np.asarray(tokens)[step.rows]  # the only device -> host transfer: [Sd + Sp] int32
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
