"""ModelRunner: executes one scheduler step (a list of ScheduledChunk) on the device.

    chunks -> padded arrays (host, numpy) -> ONE compiled step (write K/V, attend, sample) -> token ids

The step's flat tokens are [decode part: one token per decoding sequence, padded to a bucket of
rows] + [prefill part: the multi-token chunks back to back, padded to a bucket of tokens]. The
whole model runs over all of them together, so a mixed step reads the weights once; inside each
layer's attention the decode part takes the decode path (one query per sequence) and only the
prefill chunks take the ragged path, so decodes never pay for query tiles. Shapes are padded to
power-of-two buckets (reference.buckets), so a serving loop meets a handful of shapes.

Each shape is compiled once, ahead of its first run (`compile`), and kept: a caller that must not
stall on a compile (a server, a benchmark clock) can compile a step before it runs it. The KV
cache is donated to the step and updated in place. Sampled tokens and logits come back in the
caller's chunk order; only the sampled token ids come back to the host.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from reference import dynamic_attention as dyn
from reference import kv_cache as kvc
from reference.batch import ScheduledChunk, SchedulerOutput
from reference.buckets import Padding, PaddedStep
from reference.config import ModelConfig, get_preset
from reference.errors import ConfigError
from reference.layout import Layout, PagedLayout, SlotLayout
from reference.model import Params, forward_hidden, init_params, lm_head, param_bytes, with_matmul_dtype
from reference.paged_attention import write_kv
from reference.sampling import sample

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _step(params: Params, cache: kvc.KVCache, batch: dict, *, cfg: ModelConfig, access: kvc.Access,
          decode_rows: int, contexts: tuple[int, int], tile: int, chunk: int = 0,
          attention_dtype: str = "float32") -> tuple:
    """The whole step on device. batch holds the padded arrays built by ModelRunner.prepare.

    The flat tokens are [decode part: decode_rows rows] + [prefill part]. Every layer runs over all
    of them at once (the weights are read once per step); only attention is split: the decode
    part takes the decode path, the prefill part the ragged path. Either part may be absent (then
    its key is missing from batch). contexts: each part's padded context (tokens). chunk > 0: the
    context is walked at run time in chunks of that many tokens (reference.dynamic_attention), so
    the compiled step does not depend on how long the sequences are; attention_dtype is then the
    dtype of its two products' inputs (float32 accumulation).
    """
    dec, pre = batch.get("decode"), batch.get("prefill")
    Sd = decode_rows
    products = DTYPES[attention_dtype]
    ctx = batch["context_lens"]  # [Sd + Sp]: decode sequences, then prefill sequences

    def fetcher(kc, vc, part):  # dynamic context: how rows of a part (or a subset, by index) find their K/V
        key = "tables" if isinstance(access, kvc.PagedAccess) else "slots"
        make = dyn.paged_fetch if key == "tables" else dyn.slot_fetch
        return lambda rows=None: make(kc, vc, part[key] if rows is None else part[key][rows], chunk)

    def attend(i, q, k, v, layer_cache):
        kc, vc = write_kv(*layer_cache, k, v, batch["slot_mapping"])  # write first: see this step's tokens
        out = []
        if dec is not None:
            if chunk:
                out.append(dyn.decode_attention(q[:Sd], ctx[:Sd], fetcher(kc, vc, dec)(), chunk, products))
            else:
                out.append(access.decode(q[:Sd], kc, vc, dec, ctx[:Sd], contexts[0]))  # [Sd, H, D]
        if pre is not None:
            if chunk:
                out.append(dyn.prefill_attention(q[Sd:], pre["seq_ids"], batch["positions"][Sd:], pre["query_start"],
                                                 ctx[Sd:], fetcher(kc, vc, pre), chunk, tile, products))
            else:
                out.append(access.prefill(q[Sd:], kc, vc, pre, batch["positions"][Sd:], ctx[Sd:], contexts[1],
                                          tile))
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


_jitted_step = jax.jit(_step, static_argnames=("cfg", "access", "decode_rows", "contexts", "tile", "chunk",
                                               "attention_dtype"),
                       donate_argnums=1)

# Compiled steps, shared by every runner in the process, as jax.jit's own cache would be; keyed by
# everything a compiled executable depends on (model, dtype, layout, padded shapes, parts present).
_COMPILED: dict[tuple, Any] = {}


@dataclass
class PreparedStep:
    """A step's device inputs (from ModelRunner.prepare), ready for ModelRunner.run.

    rows[i]: the output row (of the decode-then-prefill order) of the i-th chunk as given.
    key: what its compiled executable depends on besides the model and layout.
    """

    batch: dict
    padded: PaddedStep
    contexts: tuple[int, int]
    samples: list[bool]
    copies: tuple
    rows: np.ndarray

    @property
    def key(self) -> tuple:
        """The compiled shape: padded sizes, each part's context, which parts are present."""
        return (self.padded, self.contexts, tuple(sorted(self.batch)))


class ModelRunner:
    """Runs the model for one scheduler step over a paged or slot KV cache.

    cfg: a ModelConfig or a preset name. params: weights, or None for init_params(cfg, seed).
    layout: the scheduler's reference.layout.PagedLayout or SlotLayout.
    sampling_seed: seeds requests whose SamplingParams.seed is None (mixed with the request id).
    min_tokens / min_seqs / min_blocks: smallest buckets; query_tile: queries per prefill tile.
    attention: paged attention "auto" (the Pallas kernel on a GPU, pure jnp elsewhere), "pallas" or "jnp".
    A serving runner bounds its shape set (reference.buckets.Padding): max_seqs / max_tokens (the
    scheduler's limits) cap the buckets, growth / mixed_growth / coarse_mixed coarsen them, and dynamic_context
    walks the context at run time instead of padding it to a bucket; then `shapes()` lists every
    step shape it can meet and `compile_shape` compiles one without a real step.
    matmul_dtype (None, "float32" or "bfloat16"): the steps run on copies of the matrices in that dtype
    (model.with_matmul_dtype), laid out for XLA's CPU dots: steps of fewer than batched_from (padded)
    tokens on [out, in] matrices (fast matrix-vector products), the others on [in, out] ones with an
    untied [E, V] LM head (fast batches; bfloat16 [out, in] is fast for one row only, hence the default
    batched_from=2); with dynamic_context, attention's two products (q.k, p.v) take their inputs in
    matmul_dtype too (float32 accumulation); activations, norms, the softmax and the KV cache keep `dtype`. The
    float32 weights stay as `params` (the reference). bfloat16 changes results within its rounding
    (tests/test_runner_speed.py bounds it); off by default.
    """

    def __init__(self, cfg: ModelConfig | str, params: Params | None = None, *, layout: Layout,
                 seed: int = 0, dtype: Any = jnp.float32, sampling_seed: int = 0,
                 min_tokens: int = 16, min_seqs: int = 4, min_blocks: int = 4, query_tile: int = 32,
                 attention: str = "auto", max_seqs: int | None = None, max_tokens: int | None = None,
                 growth: int = 2, mixed_growth: int = 2, dynamic_context: bool = False,
                 max_context: int | None = None, mixed_floor: bool = False, coarse_mixed: bool = False,
                 matmul_dtype: str | None = None, batched_from: int = 2):
        self.cfg = get_preset(cfg) if isinstance(cfg, str) else cfg
        name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
        if name not in DTYPES:
            raise ConfigError("dtype", f"unsupported dtype {name!r}", ", ".join(DTYPES))
        self.dtype = DTYPES[name]
        if not isinstance(layout, (PagedLayout, SlotLayout)):
            raise ConfigError("layout", f"got {layout!r}", "PagedLayout(num_blocks, block_size) or "
                              "SlotLayout(num_slots, max_len)")
        self.layout = layout
        self.access = kvc.access_for(layout, attention)
        self.params = init_params(self.cfg, seed, self.dtype) if params is None else params
        if matmul_dtype is not None and matmul_dtype not in DTYPES:
            raise ConfigError("matmul_dtype", f"unsupported dtype {matmul_dtype!r}", ", ".join(DTYPES) + " or None")
        if batched_from < 1:
            raise ConfigError("batched_from", f"got {batched_from}", "at least 1 token")
        self.matmul_dtype = matmul_dtype
        self.few_rows_params = self.batched_params = None
        if matmul_dtype is not None:
            self.few_rows_params = with_matmul_dtype(self.params, DTYPES[matmul_dtype], out_in=True)
            self.batched_params = with_matmul_dtype(self.params, DTYPES[matmul_dtype], out_in=False)
        self.batched_from = batched_from
        # The run-time-context attention's two products follow the matmuls (dynamic_context only): a
        # bfloat16 runner's q.k and p.v in bfloat16 too, float32 accumulation; float32 otherwise.
        self.attention_dtype = matmul_dtype or "float32"
        self._signatures = {id(p): (jax.tree_util.tree_structure(p),
                                    tuple((x.shape, x.dtype.name) for x in jax.tree_util.tree_leaves(p)))
                            for p in (self.params, self.few_rows_params, self.batched_params) if p is not None}
        self.cache = kvc.allocate(self.cfg, layout, self.dtype)
        self.sampling_seed = sampling_seed
        self.query_tile = query_tile
        max_position = self.cfg.max_position if max_context is None else min(max_context, self.cfg.max_position)
        self.padding = Padding.for_layout(layout, max_position, min_tokens=min_tokens, min_seqs=min_seqs,
                                          min_blocks=min_blocks, query_tile=query_tile, max_seqs=max_seqs,
                                          max_tokens=max_tokens, growth=growth, mixed_growth=mixed_growth,
                                          dynamic_context=dynamic_context, mixed_floor=mixed_floor,
                                          coarse_mixed=coarse_mixed)
        self.chunk = (dyn.chunk_for(self.padding.context_cap, self.padding.block_size) if dynamic_context else 0)
        self.num_compilations = 0  # step shapes this runner compiled (a shape another runner compiled is free)
        self._last_logits = None
        self._last_rows = np.zeros(0, np.int64)

    # ------------------------------------------------------------------ accounting

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights the runner holds: `params` (the reference weights) plus, with matmul_dtype, its two
        copies (matmul_copy_bytes). An array two of them share is counted once."""
        return _distinct_bytes(self.params, self.few_rows_params, self.batched_params)

    @property
    def matmul_copy_bytes(self) -> int:
        """Bytes the matmul_dtype copies add to `params` (0 without them); a step reads one copy, not params.

        small-100m (params 400 MB float32): bfloat16 adds 400 MB (the [out, in] copy with its bfloat16
        embedding, 200 MB; the [in, out] copy's matrices and untied [E, V] head, 200 MB; it shares the
        float32 embedding and norms with params); float32 adds 400 MB too (the transposed matrices, and
        the untied head, while the [in, out] matrices are params' own arrays)."""
        return self.weight_bytes - param_bytes(self.params)

    @property
    def kv_bytes(self) -> int:
        """Bytes of the KV cache reserved on device."""
        return kvc.cache_bytes(self.cache)

    # ------------------------------------------------------------------ step

    def execute(self, out: SchedulerOutput) -> list[int]:
        """Run one scheduled step; returns one sampled token per chunk whose `samples` is True, in chunk order.

        Its block copies (src, dst) are done first (copy-on-write of shared blocks).
        """
        return self.run(self.prepare(out.chunks, out.block_copies))

    def last_logits(self) -> np.ndarray:
        """Logits [num_chunks, V] (float32) of the last token of each chunk of the previous step, in chunk order."""
        if self._last_logits is None:
            return np.zeros((0, self.cfg.vocab_size), np.float32)
        return np.asarray(self._last_logits)[self._last_rows]

    def prepare(self, chunks: Sequence[ScheduledChunk], block_copies=()) -> PreparedStep:
        """Host side of a step: validate the chunks and build the padded device arrays.

        Flat token order: the decodes (one row each), then the prefill chunks back to back.
        Output rows follow the same order; PreparedStep.rows maps them back to the chunks.
        """
        for c in chunks:
            self._check(c)
        if block_copies and isinstance(self.layout, SlotLayout):
            raise ConfigError("block_copies", "given to a slot-layout runner", "only with PagedLayout")
        decode = [i for i, c in enumerate(chunks) if c.is_decode]
        prefill = [i for i, c in enumerate(chunks) if not c.is_decode]
        pad = self.padding.step(len(decode), 0, len(prefill), sum(chunks[i].num_tokens for i in prefill), 0)
        flat = _FlatArrays(pad.tokens, pad.rows, self.access.pad_slot)
        rows = np.zeros(len(chunks), np.int64)
        batch: dict = {}
        contexts = [0, 0]
        if pad.decode_rows:  # coarse_mixed pads a decode part even when nobody decodes
            batch["decode"], contexts[0] = self._prepare_decode([chunks[i] for i in decode], pad, flat)
            rows[decode] = np.arange(len(decode))
        if prefill:
            batch["prefill"], contexts[1] = self._prepare_prefill([chunks[i] for i in prefill], pad, flat)
            rows[prefill] = pad.decode_rows + np.arange(len(prefill))
        batch.update(flat.arrays())
        batch.update(self._sampling_arrays(chunks, rows, pad.rows))
        return PreparedStep(jax.device_put(batch), pad, tuple(contexts), [c.samples for c in chunks],
                            tuple(block_copies), rows)

    def _prepare_decode(self, chunks: list[ScheduledChunk], pad: PaddedStep, flat: _FlatArrays) -> tuple[dict, int]:
        """The decode part: one token and one output row per sequence, rows 0 .. decode_rows - 1."""
        context = self.padding.context(max((c.end for c in chunks), default=1))
        part = self.access.locate(chunks, pad.decode_rows, context)
        for j, c in enumerate(chunks):
            flat.put(j, j, c, self.access.write_slots(part, j, c))
        return part, context

    def _prepare_prefill(self, chunks: list[ScheduledChunk], pad: PaddedStep, flat: _FlatArrays
                         ) -> tuple[dict, int]:
        """The prefill part: the chunks' tokens back to back after the decode rows, one output row each.

        seq_ids [prefill_tokens] (the part's sequence of each token) and query_start [prefill_rows + 1]
        (where each sequence's tokens start within the part) tell the ragged attention who is who.
        """
        context = self.padding.context(max(c.end for c in chunks))
        part = self.access.locate(chunks, pad.prefill_rows, context)
        seq_ids = np.zeros(pad.prefill_tokens, np.int32)
        query_start = np.zeros(pad.prefill_rows + 1, np.int32)
        t = 0
        for j, c in enumerate(chunks):
            flat.put(pad.decode_rows + t, pad.decode_rows + j, c, self.access.write_slots(part, j, c))
            seq_ids[t: t + c.num_tokens] = j
            t += c.num_tokens
            query_start[j + 1] = t
        query_start[len(chunks) + 1:] = t
        part.update(seq_ids=seq_ids, query_start=query_start)
        return part, context

    def _sampling_arrays(self, chunks: Sequence[ScheduledChunk], rows: np.ndarray, num_rows: int) -> dict:
        """Per output row: temperature, top_k, top_p and the seed of its request."""
        temperature, top_p = np.zeros(num_rows, np.float32), np.ones(num_rows, np.float32)
        top_k, seeds = np.zeros(num_rows, np.int32), np.zeros(num_rows, np.uint32)
        for c, r in zip(chunks, rows):
            sp = c.request.sampling
            temperature[r], top_k[r], top_p[r] = sp.temperature, sp.top_k, sp.top_p
            seeds[r] = self._seed(c)
        return dict(temperature=temperature, top_k=top_k, top_p=top_p, seeds=seeds)

    def _static(self, step: PreparedStep) -> dict:
        return dict(cfg=self.cfg, access=self.access, decode_rows=step.padded.decode_rows, contexts=step.contexts,
                    tile=self.query_tile, chunk=self.chunk, attention_dtype=self.attention_dtype)

    def shapes(self) -> list[PaddedStep]:
        """Every step shape this runner can meet (needs max_seqs and max_tokens; see Padding.shapes)."""
        return self.padding.shapes()

    def compile_shape(self, padded: PaddedStep) -> bool:
        """Compile the step of this padded shape (from shapes()) ahead of any real step; True if it compiled."""
        return self.compile(self._abstract_step(padded))

    def _abstract_step(self, p: PaddedStep) -> PreparedStep:
        """A PreparedStep of ShapeDtypeStructs with the arrays prepare() would build for shape p."""
        i32 = np.int32

        def a(shape, dtype=i32):
            return jax.ShapeDtypeStruct(shape, np.dtype(dtype))

        paged = isinstance(self.layout, PagedLayout)

        def part(rows, context):
            bs = self.layout.block_size if paged else None
            return {"tables": a((rows, context // bs))} if paged else {"slots": a((rows,))}

        batch: dict = dict(tokens=a((p.tokens,)), positions=a((p.tokens,)), slot_mapping=a((p.tokens,)),
                           context_lens=a((p.rows,)), temperature=a((p.rows,), np.float32), top_k=a((p.rows,)),
                           top_p=a((p.rows,), np.float32), seeds=a((p.rows,), np.uint32))
        if p.decode_rows:
            batch["decode"] = part(p.decode_rows, p.decode_context)
        if p.prefill_rows:
            batch["prefill"] = dict(part(p.prefill_rows, p.prefill_context), seq_ids=a((p.prefill_tokens,)),
                                    query_start=a((p.prefill_rows + 1,)))
        return PreparedStep(batch, p, (p.decode_context, p.prefill_context), [], (), np.zeros(0, np.int64))

    def is_compiled(self, step: PreparedStep) -> bool:
        """True when this step's shape is compiled already (running it will not stall on a compile)."""
        return self._compile_key(step) in _COMPILED

    def compile(self, step: PreparedStep) -> bool:
        """Compile the step's shape unless it is compiled already; True if this call compiled it."""
        key = self._compile_key(step)
        if key in _COMPILED:
            return False
        _COMPILED[key] = _jitted_step.lower(self._params_for(step), self.cache, step.batch,
                                            **self._static(step)).compile()
        self.num_compilations += 1
        return True

    def _params_for(self, step: PreparedStep) -> Params:
        """The weights this step runs with (matmul_dtype: the copy laid out for its number of tokens)."""
        if self.batched_params is None:
            return self.params
        return self.batched_params if step.padded.tokens >= self.batched_from else self.few_rows_params

    def _compile_key(self, step: PreparedStep) -> tuple:
        return (self.cfg, self._signatures[id(self._params_for(step))], jnp.dtype(self.dtype).name, self.access,
                self.query_tile, self.chunk, self.attention_dtype, step.key)

    def run(self, step: PreparedStep) -> list[int]:
        """Device side of a step: block copies, then the compiled forward + sampling; token ids to host."""
        if step.copies:
            self.cache = kvc.copy_blocks(self.cache, step.copies)
        if not step.samples:
            return []
        self.compile(step)
        tokens, self._last_logits, self.cache = _COMPILED[self._compile_key(step)](self._params_for(step), self.cache,
                                                                                   step.batch)
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
        if isinstance(self.layout, PagedLayout):
            table, bs, nb = c.block_table, self.layout.block_size, self.layout.num_blocks
            max_blocks = self.padding.context_cap // bs
            if table is None:
                raise ConfigError("block_table", f"request {rid} has none", "a list of block ids (paged layout)")
            if len(table) > max_blocks:
                raise ConfigError("block_table", f"request {rid} has {len(table)} blocks",
                                  f"at most {max_blocks} blocks per request")
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


def _distinct_bytes(*trees) -> int:
    """Bytes of the arrays in the given pytrees (None skipped), each array counted once however often it appears."""
    arrays = {id(x): x for t in trees if t is not None for x in jax.tree_util.tree_leaves(t)}
    return sum(int(x.nbytes) for x in arrays.values())


class _FlatArrays:
    """The step's per-token arrays (tokens, positions, write slots) and per-row context lengths, host side."""

    def __init__(self, num_tokens: int, num_rows: int, pad_slot: int):
        self.tokens = np.zeros(num_tokens, np.int32)
        self.positions = np.zeros(num_tokens, np.int32)
        self.slot_mapping = np.full(num_tokens, pad_slot, np.int32)  # padding tokens write where nobody reads
        self.context_lens = np.zeros(num_rows, np.int32)

    def put(self, t: int, row: int, c: ScheduledChunk, slots: np.ndarray) -> None:
        """The chunk's tokens at flat positions [t, t + num_tokens), its output row at row."""
        n = c.num_tokens
        self.tokens[t: t + n] = c.request.token_ids(c.start, c.end)
        self.positions[t: t + n] = np.arange(c.start, c.end)
        self.slot_mapping[t: t + n] = slots
        self.context_lens[row] = c.end

    def arrays(self) -> dict:
        """The arrays under the names the jitted step reads."""
        return dict(tokens=self.tokens, positions=self.positions, slot_mapping=self.slot_mapping,
                    context_lens=self.context_lens)
