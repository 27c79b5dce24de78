"""`servesim profile`: step latency over a grid of batch shapes on this machine's JAX device.

The output is the calibration table of sim.core.calibrated.CalibratedCostModel. Every timed step is
built the way the engine builds it: Requests with synthetic token ids, block tables from a
BlockManager, ScheduledChunks, run by a real ModelRunner over a paged KV cache. The time of a
step is `runner.execute` end to end (host-side preparation of the padded arrays, the jitted
forward + sampling, the token ids back to the host), exactly the `execute_s` of an engine
StepRecord; `prepare_ms` is the host preparation alone, so host overhead is visible.

Rows (kind):
    decode   batch_size sequences decoding one token, each with context_len tokens after the step
    prefill  one chunk of prefill_tokens new tokens on top of cached_context cached ones
    mixed    one prefill chunk and batch_size decodes in the same step
    host     the engine's per-step host work outside the runner (scheduler.schedule + update +
             the step loop's bookkeeping) with batch_size requests decoding under a continuous
             scheduler; the simulator adds it to every step

Each shape is run once to compile its bucket (first_call_ms keeps that time), `warmup` more times
untimed, then `repeats` times; median_ms, min_ms, p90_ms and mean_ms summarise the timed runs.
The CSV starts with '# key: value' metadata lines (device, preset, dtype, jax, date, grid,
repeats, block size, command).
"""
from __future__ import annotations

import datetime as _dt
import itertools
import os
import platform
import shlex
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import click
import jax
import numpy as np
import pandas as pd
from tqdm import tqdm

from reference.batch import ScheduledChunk, SchedulerOutput, StepShape
from reference.block_manager import BlockManager
from reference.config import ModelConfig, get_preset
from reference.engine import Engine
from reference.errors import ConfigError
from reference.layout import PagedLayout, SlotLayout
from reference.request import Request, SamplingParams
from reference.runner import ModelRunner
from reference.schedulers import ContinuousScheduler, SequentialScheduler
from sim.core.calibrated import shape_from_profile_row
from sim.core.costmodel import StepPhysics
from sim.lab.timing import TimedScheduler

HOST_CONTEXT = 128  # tokens of context per request in the host-cost rows
CPU_KV_BUDGET = 2 << 30  # bytes of KV pool the profile may allocate on a CPU
GPU_KV_FRACTION = 0.5  # share of an accelerator's memory (after weights) the KV pool may take


@dataclass(frozen=True)
class Grid:
    """The shapes one profile measures (all in tokens or sequences). Shapes past max_position are clipped."""

    decode_batch: tuple[int, ...]
    decode_context: tuple[int, ...]
    prefill_tokens: tuple[int, ...]
    prefill_cached: tuple[int, ...]
    mixed_prefill: tuple[int, ...]  # mixed: one chunk of this many tokens on top of mixed_cached
    mixed_cached: tuple[int, ...]
    mixed_batch: tuple[int, ...]  # ... plus this many decodes at mixed_context
    mixed_context: tuple[int, ...]
    host_batch: tuple[int, ...]
    host_prompt: tuple[int, ...] = (64, 256)  # admission rows: host_batch requests of this many prompt tokens

    def describe(self) -> str:
        """One line for the CSV metadata."""
        return (f"decode batch {list(self.decode_batch)} x context {list(self.decode_context)}; "
                f"prefill tokens {list(self.prefill_tokens)} x cached {list(self.prefill_cached)}; "
                f"mixed prefill {list(self.mixed_prefill)} x cached {list(self.mixed_cached)} x decodes "
                f"{list(self.mixed_batch)} x context {list(self.mixed_context)}; host batch {list(self.host_batch)}"
                f" x decode or admission of {list(self.host_prompt)}-token prompts")


GRIDS: dict[str, Grid] = {
    # A few shapes, for tests: seconds on a CPU with the tiny model.
    "quick": Grid(decode_batch=(1, 16), decode_context=(32, 128), prefill_tokens=(16, 64), prefill_cached=(0,),
                  mixed_prefill=(32,), mixed_cached=(16,), mixed_batch=(4,), mixed_context=(64,), host_batch=(1, 16)),
    # CPU-friendly: a couple of minutes for tiny.
    "default": Grid(decode_batch=(1, 2, 4, 8, 16, 32, 64), decode_context=(64, 128, 256, 512, 1024, 2048),
                    prefill_tokens=(16, 32, 64, 128, 256, 512, 1024), prefill_cached=(0, 128, 256, 1024),
                    mixed_prefill=(64, 256), mixed_cached=(0, 128, 512), mixed_batch=(4, 16),
                    mixed_context=(256, 1024),
                    host_batch=(1, 4, 16, 64, 256)),
    # One short GPU lease (experiments/gpu/run.sh): the 8B shape's few buckets that a 1-32 client run meets
    # with max_model_len 512; every shape compiles once, so the grid is kept to about ten.
    "gpu": Grid(decode_batch=(1, 8, 32), decode_context=(256, 512), prefill_tokens=(128, 512), prefill_cached=(0,),
                mixed_prefill=(128,), mixed_cached=(0,), mixed_batch=(8,), mixed_context=(512,), host_batch=(1, 8, 32)),
    # GPU scale.
    "full": Grid(decode_batch=(1, 2, 4, 8, 16, 32, 64, 128, 256),
                 decode_context=(128, 256, 512, 1024, 2048, 4096, 8192),
                 prefill_tokens=(64, 128, 256, 512, 1024, 2048, 4096, 8192), prefill_cached=(0, 1024, 4096),
                 mixed_prefill=(256, 1024, 2048), mixed_cached=(0, 2048), mixed_batch=(8, 32, 128),
                 mixed_context=(1024, 4096), host_batch=(1, 4, 16, 64, 256, 1024)),
}

STEP_KINDS = ("decode", "prefill", "mixed")
HOST_KIND = "host"


@dataclass(frozen=True)
class Shape:
    """One row of the profile: decodes (batch_size x context_len) and/or one prefill chunk."""

    kind: str
    batch_size: int = 0
    context_len: int = 0
    prefill_tokens: int = 0
    cached_context: int = 0

    def sequences(self) -> list[tuple[int, int, int]]:
        """(prompt tokens, output tokens so far, chunk start) per sequence; the chunk runs to the end."""
        seqs = []
        if self.prefill_tokens:
            seqs.append((self.cached_context + self.prefill_tokens, 0, self.cached_context))
        # A decode: prompt of context_len - 1 tokens and one output token, whose K/V this step writes.
        seqs += [(self.context_len - 1, 1, self.context_len - 1)] * self.batch_size
        return seqs

    def blocks(self, block_size: int) -> int:
        """KV blocks this step's sequences hold."""
        return sum(-(-(p + o) // block_size) for p, o, _ in self.sequences())


def grid_shapes(grid: Grid, max_position: int) -> list[Shape]:
    """The grid's step shapes, values clipped to max_position, combinations past it dropped, duplicates removed."""
    def clip(values, lo=1):
        return sorted({min(v, max_position) for v in values if v >= lo})

    shapes: list[Shape] = []
    for b, ctx in itertools.product(clip(grid.decode_batch), clip(grid.decode_context, 2)):
        shapes.append(Shape("decode", b, ctx))
    for p, c in itertools.product(clip(grid.prefill_tokens, 2), sorted(set(grid.prefill_cached))):
        if p + c <= max_position:
            shapes.append(Shape("prefill", 0, 0, p, c))
    for p, c, b, ctx in itertools.product(clip(grid.mixed_prefill, 2), sorted(set(grid.mixed_cached)),
                                          clip(grid.mixed_batch), clip(grid.mixed_context, 2)):
        if p + c <= max_position:
            shapes.append(Shape("mixed", b, ctx, p, c))
    return list(dict.fromkeys(shapes))


def build_chunks(shape: Shape, blocks: BlockManager | None, vocab_size: int, seed: int = 0) -> list[ScheduledChunk]:
    """The ScheduledChunks of one step of this shape: synthetic tokens, block tables from the block manager
    (or, with blocks None, contiguous slot i for sequence i)."""
    rng = np.random.default_rng(seed)
    chunks = []
    for i, (prompt_len, num_out, start) in enumerate(shape.sequences()):
        req = Request(f"profile-{i}", rng.integers(0, vocab_size, prompt_len).tolist(),
                      SamplingParams(max_tokens=num_out + 1))
        req.output_token_ids = rng.integers(0, vocab_size, num_out).tolist()
        req.num_computed_tokens = start
        end = req.num_tokens
        if blocks is None:
            chunks.append(ScheduledChunk(req, start, end - start, slot=i))
            continue
        if blocks.allocate_slots(req.request_id, 0, end) is None:
            raise ConfigError("profile.kv_pool", f"{blocks.num_usable_blocks} blocks cannot hold {shape}")
        chunks.append(ScheduledChunk(req, start, end - start, block_table=blocks.block_table(req.request_id)))
    return chunks


def _stats(times_s: list[float]) -> dict:
    ms = np.asarray(times_s) * 1e3
    return dict(median_ms=float(np.median(ms)), min_ms=float(ms.min()), p90_ms=float(np.quantile(ms, 0.9)),
                mean_ms=float(ms.mean()))


def time_step(runner, chunks: list[ScheduledChunk], repeats: int, warmup: int) -> dict:
    """Time runner.execute of a step of these chunks end to end, and runner.prepare alone."""
    step = SchedulerOutput(list(chunks))
    t0 = time.perf_counter()
    runner.execute(step)
    first = time.perf_counter() - t0
    for _ in range(warmup):
        runner.execute(step)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        runner.execute(step)
        times.append(time.perf_counter() - t0)
    prep = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(runner.prepare(chunks).batch)
        prep.append(time.perf_counter() - t0)
    return dict(_stats(times), prepare_ms=1e3 * statistics.median(prep), first_call_ms=1e3 * first)


class _NullRunner:
    """A runner that computes nothing: one token per sampling chunk, at once."""

    def execute(self, out):
        return [1 for c in out.chunks if c.samples]


HOST_ADMISSION_TOKENS = 4096  # admission rows admit at most this many prompt tokens in one step


def host_blocks(grid: Grid, block_size: int, repeats: int, warmup: int) -> int:
    """KV blocks (null block included) the host rows of this grid hold at most."""
    per_decode = -(-(HOST_CONTEXT + warmup + repeats + 2) // block_size)
    rows = [b * per_decode for b in grid.host_batch]
    rows += [b * -(-(p + 1) // block_size) for b, p in host_admissions(grid)]
    return max(rows) + 1


def host_admissions(grid: Grid) -> list[tuple[int, int]]:
    """(batch, prompt tokens) of the grid's admission rows: at most HOST_ADMISSION_TOKENS tokens a step."""
    return [(b, p) for b in sorted(set(grid.host_batch)) for p in sorted(set(grid.host_prompt))
            if b * p <= HOST_ADMISSION_TOKENS]


def _host_stats(steps: list[tuple[float, float]]) -> dict:
    """Host time per step (schedule + update, as a benchmark times them) of the timed (schedule_s, update_s) steps."""
    return dict(_stats([a + b for a, b in steps]), schedule_ms=1e3 * statistics.median(a for a, _ in steps),
                update_ms=1e3 * statistics.median(b for _, b in steps))


def _timed_step(engine: Engine) -> tuple[tuple[float, float], StepShape]:
    """One engine step: (schedule_s, update_s) of its TimedScheduler, and the step's shape."""
    record = engine.step()
    return (engine.scheduler.schedule_s, engine.scheduler.update_s), record.shape


def time_host(runner, num_blocks: int | None, batch_size: int, repeats: int, warmup: int, block_size: int,
              context: int = HOST_CONTEXT, seed: int = 0) -> dict:
    """The engine's host work per decode step with batch_size running requests.

    Engine.step around the real runner, timed as the engine records it: schedule + update. Timed
    between real model steps on purpose: host code runs slower on the caches a model step leaves
    behind than in a loop of its own. num_blocks: the runner's paged pool, for a continuous
    scheduler; None for contiguous slots, with a sequential (llama.cpp-style) scheduler.
    """
    max_tokens = warmup + repeats + 2
    total = context + max_tokens
    if num_blocks is None:
        sched = SequentialScheduler(batch_size, num_ctx=total, max_queue=0, n_batch=max(batch_size * context, 2048))
    else:
        sched = ContinuousScheduler(num_blocks, block_size, max_num_seqs=batch_size,
                                    max_num_batched_tokens=max(batch_size * context, 2048), max_model_len=total)
    engine = Engine(TimedScheduler(sched), runner)
    rng = np.random.default_rng(seed)
    for i in range(batch_size):
        engine.add(Request(f"host-{i}", rng.integers(1, 500, context).tolist(), SamplingParams(max_tokens=max_tokens)))
    engine.step()  # every prompt in one step; from now on batch_size decodes per step
    if sched.num_running != batch_size:
        raise RuntimeError(f"host profile: {sched.num_running} of {batch_size} requests running")
    for _ in range(warmup):
        engine.step()
    timed = [_timed_step(engine) for _ in range(repeats)]
    assert all(shape.decode_seqs == batch_size for _, shape in timed)
    return _host_stats([t for t, _ in timed])


def time_host_admission(runner, num_blocks: int, batch_size: int, prompt_tokens: int, repeats: int, warmup: int,
                        block_size: int, seed: int = 0) -> dict:
    """The engine's host work for a step that admits batch_size new requests of prompt_tokens each.

    As time_host, on a fresh continuous scheduler each time: admission (prefix-cache lookup, block
    allocation), then update (full blocks hashed into the prefix cache, first tokens appended).
    The decode rows of time_host miss this per-token work.
    """
    rng = np.random.default_rng(seed)
    steps = []
    for i in range(warmup + repeats):
        sched = ContinuousScheduler(num_blocks, block_size, max_num_seqs=batch_size,
                                    max_num_batched_tokens=batch_size * prompt_tokens, max_model_len=prompt_tokens + 1)
        engine = Engine(TimedScheduler(sched), runner)
        for j in range(batch_size):
            engine.add(Request(f"admit-{j}", rng.integers(1, 500, prompt_tokens).tolist(), SamplingParams(max_tokens=1)))
        times, shape = _timed_step(engine)
        assert shape.prefill_tokens == batch_size * prompt_tokens, shape
        if i >= warmup:
            steps.append(times)
    return _host_stats(steps)


def _kv_budget(runner) -> tuple[int, str]:
    """Bytes the KV pool may take on this device, and where that figure comes from."""
    dev = jax.devices()[0]
    stats = None
    try:
        stats = dev.memory_stats()
    except Exception:  # CPU backends may not implement it
        pass
    if dev.platform != "cpu" and stats and stats.get("bytes_limit"):
        free = stats["bytes_limit"] - runner.weight_bytes
        return int(GPU_KV_FRACTION * free), f"{GPU_KV_FRACTION} x (device memory - weights)"
    return CPU_KV_BUDGET, "CPU budget"


def _command(model_name: str, out_path, dtype: str, grid: str, repeats: int, warmup: int, block_size: int,
             max_context: int | None) -> str:
    """The command that reproduces this profile: `servesim profile ...` when run from the CLI, else the call."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.info_name == "profile" and warmup == 2 and block_size == 16:
        clip = ["--max-context", str(max_context)] if max_context else []
        return shlex.join(["servesim", "profile", "--model", model_name, "--out", str(out_path), "--dtype", dtype,
                           "--grid", grid, "--repeats", str(repeats)] + clip)
    return (f"sim.lab.profile.run_profile({model_name!r}, {str(out_path)!r}, dtype={dtype!r}, grid={grid!r}, "
            f"repeats={repeats}, warmup={warmup}, block_size={block_size}, max_context={max_context})")


def write_profile_csv(df: pd.DataFrame, metadata: dict, path: str | os.PathLike) -> None:
    """'# key: value' metadata lines, then the table (written atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "".join(f"# {k}: {str(v).replace(chr(10), ' ')}\n" for k, v in metadata.items())
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(header + df.to_csv(index=False, float_format="%.6g"))
    os.replace(tmp, path)


def run_profile(model: str | ModelConfig, out_path: str | os.PathLike | None, *, dtype: str = "float32",
                grid: str | Grid = "default", repeats: int = 5, warmup: int = 2, block_size: int = 16,
                seed: int = 0, progress: bool = True, max_context: int | None = None) -> pd.DataFrame:
    """Measure step latencies of `model` on the current JAX device; write them to out_path (None: don't).

    max_context clips the grid's contexts and prefill lengths (tokens) below the model's
    max_position: a linear law fits best over the regime it will be asked about.

    Returns the table (metadata in df.attrs), which CalibratedCostModel.from_profile accepts as is.
    """
    cfg = get_preset(model) if isinstance(model, str) else model
    grid_name = grid if isinstance(grid, str) else "custom"
    if isinstance(grid, str):
        if grid not in GRIDS:
            raise ConfigError("grid", f"unknown grid {grid!r}", ", ".join(GRIDS))
        grid = GRIDS[grid]
    for name, value, low in (("repeats", repeats, 1), ("warmup", warmup, 0), ("block_size", block_size, 1),
                             ("max_context", cfg.max_position if max_context is None else max_context, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(name, f"must be an integer >= {low}, got {value!r}")

    shapes = grid_shapes(grid, min(cfg.max_position, max_context or cfg.max_position))
    dtype_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype)
    if dtype_bytes is None:
        raise ConfigError("dtype", f"unsupported dtype {dtype!r}", "float32, bfloat16, float16")
    kv_per_block = cfg.kv_bytes_per_token(dtype_bytes) * block_size

    # One runner for the whole profile; its pool holds the largest shape that fits the KV budget.
    probe = ModelRunner(cfg, layout=PagedLayout(2, block_size), seed=seed, dtype=dtype)
    budget, budget_source = _kv_budget(probe)
    max_blocks = budget // kv_per_block
    skipped = [s for s in shapes if s.blocks(block_size) > max_blocks]
    shapes = [s for s in shapes if s.blocks(block_size) <= max_blocks]
    if not shapes:
        raise ConfigError("grid", f"no shape fits a KV pool of {budget} bytes")
    num_blocks = max(s.blocks(block_size) for s in shapes) + 1
    runner = ModelRunner(cfg, probe.params, layout=PagedLayout(num_blocks, block_size), dtype=dtype)
    del probe
    physics = StepPhysics(cfg)  # FLOPs of a step (bytes are counted here, in the runner's dtype)
    kv_bytes_per_token = cfg.kv_bytes_per_token(dtype_bytes)

    # The same shapes over contiguous slots (llama.cpp-style engines), when one slot per sequence fits the budget.
    slots = max(len(s.sequences()) for s in shapes)
    slot_len = max(p + o for s in shapes for p, o, _ in s.sequences())
    contiguous = None
    if slots * slot_len * kv_bytes_per_token <= budget:
        contiguous = ModelRunner(cfg, runner.params, layout=SlotLayout(slots, slot_len), dtype=dtype)

    rows = []
    bar = tqdm(total=len(shapes) * (1 + (contiguous is not None)) + 2 * len(grid.host_batch) + len(host_admissions(grid)),
               desc=f"profile {cfg.name}", unit="shape", disable=not progress)
    for layout, shape in [("paged", s) for s in shapes] + [("contiguous", s) for s in shapes if contiguous]:
        blocks = BlockManager(num_blocks, block_size, enable_prefix_caching=False) if layout == "paged" else None
        chunks = build_chunks(shape, blocks, cfg.vocab_size, seed)
        stats = time_step(runner if layout == "paged" else contiguous, chunks, repeats, warmup)
        s = shape_from_profile_row(shape.kind, shape.batch_size, shape.context_len, shape.prefill_tokens,
                                   shape.cached_context)
        assert s == StepShape.from_chunks((c.num_tokens, c.end) for c in chunks), (shape, s)
        t = stats["median_ms"] / 1e3
        moved = runner.weight_bytes + (s.kv_read_tokens + s.new_tokens) * kv_bytes_per_token
        rows.append(dict(kind=shape.kind, layout=layout, batch_size=shape.batch_size, context_len=shape.context_len,
                         prefill_tokens=shape.prefill_tokens, cached_context=shape.cached_context,
                         num_seqs=s.num_seqs, new_tokens=s.new_tokens, kv_read_tokens=s.kv_read_tokens, **stats,
                         repeats=repeats, tokens_per_s=s.new_tokens / t, achieved_gbps=moved / t / 1e9,
                         achieved_tflops=physics.flops(s) / t / 1e12))
        bar.update()
    # Host rows around a real runner whose pool holds the largest of them (a null runner when it cannot fit):
    # a continuous scheduler over paged blocks, and a sequential one over the contiguous slots.
    h_blocks = host_blocks(grid, block_size, repeats, warmup)
    host_runner = (ModelRunner(cfg, runner.params, layout=PagedLayout(h_blocks, block_size), dtype=dtype)
                   if h_blocks * kv_per_block <= budget else _NullRunner())
    host_rows = [("paged", b, host_runner, h_blocks) for b in sorted(set(grid.host_batch))]
    if contiguous is not None and slot_len >= HOST_CONTEXT + warmup + repeats + 2:
        host_rows += [("contiguous", b, contiguous, None) for b in sorted(set(grid.host_batch)) if b <= slots]
    for layout, b, host_on, pool in host_rows:
        stats = time_host(host_on, pool, b, repeats, warmup, block_size, seed=seed)
        rows.append(dict(kind=HOST_KIND, layout=layout, batch_size=b, context_len=HOST_CONTEXT, prefill_tokens=0,
                         cached_context=0, num_seqs=b, new_tokens=b, kv_read_tokens=0, **stats, repeats=repeats))
        bar.update()
    for b, p in host_admissions(grid):  # host rows with prefill_tokens > 0: admissions
        stats = time_host_admission(host_runner, h_blocks, b, p, repeats, warmup, block_size, seed=seed)
        rows.append(dict(kind=HOST_KIND, layout="paged", batch_size=b, context_len=p, prefill_tokens=b * p,
                         cached_context=0, num_seqs=b, new_tokens=b * p, kv_read_tokens=0, **stats,
                         repeats=repeats))
        bar.update()
    bar.close()

    dev = jax.devices()[0]
    metadata = {
        "device": f"{getattr(dev, 'device_kind', dev)} ({dev.platform}, {jax.device_count()} device(s))",
        "host": f"{platform.machine()} {platform.processor() or platform.system()}, {os.cpu_count()} cpus",
        "preset": cfg.name, "dtype": dtype, "jax": jax.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "grid": f"{grid_name} ({grid.describe()})" + (f", clipped at {max_context} tokens" if max_context else ""), "repeats": repeats, "warmup": warmup, "block_size": block_size,
        "kv_pool_blocks": num_blocks, "padding": runner.padding.metadata(),
        "contiguous_slots": f"{slots} x {slot_len} tokens" if contiguous else "none (over the KV budget)",
        "host_rows": ("schedule + update around real steps" if not isinstance(host_runner, _NullRunner)
                      else "schedule + update with a null runner (a real pool would exceed the KV budget)")
                     + "; paged: continuous scheduler, contiguous: sequential scheduler",
        "weight_bytes": runner.weight_bytes,
        "skipped": f"{len(skipped)} shapes over the KV budget ({budget} bytes, {budget_source})" if skipped else "none",
        "timing": "median_ms = runner.execute end to end (prepare + forward + sampling + token transfer); "
                  "kind host = the engine's schedule + update around real steps: batch_size decodes, or "
                  "(prefill_tokens > 0) the admission of batch_size prompts of context_len tokens",
        "command": _command(cfg.name, out_path, dtype, grid_name, repeats, warmup, block_size, max_context),
    }
    df = pd.DataFrame(rows)
    df.attrs.update({k: str(v) for k, v in metadata.items()})
    if out_path is not None:
        write_profile_csv(df, metadata, out_path)
    return df
