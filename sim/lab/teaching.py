"""The tutorial's figures (papers/tutorial.md), each drawn from traces of the real schedulers (sim.lab.trace).

- kv_over_time(): experiments/teaching_pool.toml, ten requests on 96 token slots of KV under
  llama.cpp slots, Orca-style max-length reservation and paging: reserved and used KV over
  simulated time, preemptions marked.
- block_tables(): prefix caching, fork and copy-on-write (sim.lab.trace_scenes.fork_scene).
- preemption(): experiments/trace_small.toml, the pool full, a preemption handing the victim's
  blocks on within the same step, and the victim's recompute.
- ollama_slots(): the same requests in Ollama's num_parallel x num_ctx slots.
- gather(): attention's gather through a block table, computed by reference.paged_attention.

`python -m sim.lab.teaching [OUT_DIR] [--max-model-len N] [--fork-prompt-tokens N]` writes them
all (default papers/figures) and prints what each shows, so every exercise of the tutorial runs
from the command line.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click
import jax.numpy as jnp
import numpy as np
from matplotlib.patches import Rectangle

from reference.errors import ConfigError
from reference.paged_attention import gather_paged
from sim.lab.experiment import load_experiment
from sim.lab.figures import subplots
from sim.lab.trace import StepRecord, Trace, trace_cell, with_overrides
from sim.lab.trace_scenes import fork_scene
from sim.lab.teaching_draw import colours_for, draw_block_tables, draw_slots

ROOT = Path(__file__).resolve().parents[2]
TEACHING_POOL = ROOT / "experiments" / "teaching_pool.toml"
TRACE_SMALL = ROOT / "experiments" / "trace_small.toml"
POOL_TITLES = {"slots": "llama.cpp / Ollama slots: {n} x {len} tokens reserved at load",
               "reserve": "Orca (Max): max_model_len = {mml} tokens reserved per request",
               "paged": "vLLM paging: blocks of {bs} tokens as tokens arrive"}


# ---------------------------------------------------------------------------------------
# Reserving versus paging, over time


@dataclass(frozen=True)
class PoolRun:
    """One engine of teaching_pool.toml, traced, and what the figure says about it."""

    name: str
    trace: Trace
    steps: int
    time_ms: float
    mean_step_ms: float
    max_running: int
    stored_share: float  # of reserved token slots that hold tokens, weighted by step duration
    refused: list[tuple[str, str]]  # (request, reason)
    preemptions: int

    def summary(self) -> str:
        """One line: steps, time, concurrency, the share of reserved KV that holds tokens, refusals, preemptions."""
        line = (f"{self.name}: {self.steps} steps in {self.time_ms:.2f} ms (mean step {self.mean_step_ms:.4f} ms), "
                f"at most {self.max_running} running at once, {100 * self.stored_share:.0f}% of reserved KV holds "
                f"tokens, {self.preemptions} preemptions")
        if self.refused:
            line += f"; refused {len(self.refused)}: {' '.join(r for r, _ in self.refused)} ({self.refused[0][1]})"
        return line


def pool_runs(overrides=()) -> dict[str, PoolRun]:
    """Every engine of experiments/teaching_pool.toml (with --set style overrides), traced."""
    exp = with_overrides(load_experiment(TEACHING_POOL), list(overrides))
    runs = {}
    for eng in exp.engines:
        tr = trace_cell(exp, eng.name)
        steps = tr.steps
        reserved = sum(r.reserved_tokens * r.dt_s for r in steps)
        stored = sum(r.stored_tokens * r.dt_s for r in steps)
        runs[eng.name] = PoolRun(eng.name, tr, len(steps), tr.sim_time_s * 1e3,
                                 1e3 * sum(r.dt_s for r in steps) / max(len(steps), 1),
                                 max((len(r.running) for r in steps), default=0),
                                 stored / reserved if reserved else 0.0,
                                 [(e.request, e.detail) for e in tr.refused],
                                 sum(len(r.preempted) for r in steps))
    return runs


def _pool_title(run: PoolRun) -> str:
    exp, sched = run.trace.experiment, run.trace.scheduler
    eng = exp.engine(run.name)
    fmt = POOL_TITLES.get(run.name, "{name}")
    return fmt.format(name=run.name, n=getattr(eng, "num_parallel", 0), len=getattr(eng, "num_ctx", 0),
                      mml=getattr(eng, "max_model_len", 0), bs=getattr(sched.layout, "block_size", 0))


def kv_over_time(path: str | Path, overrides=()) -> Path:
    """Reserved and used KV token slots over simulated time, one panel per engine of teaching_pool.toml."""
    runs = pool_runs(overrides)
    fig, axes = subplots(len(runs), 1, figsize=(11, 2.6 * len(runs) + 0.9), sharex=True, sharey=True,
                         constrained_layout=True)
    axes = np.atleast_1d(axes)
    for ax, run in zip(axes, runs.values()):
        steps = run.trace.steps
        xs = [x for r in steps for x in (r.time_s * 1e3, (r.time_s + r.dt_s) * 1e3)]
        reserved = [r.reserved_tokens for r in steps for _ in (0, 1)]
        stored = [r.stored_tokens for r in steps for _ in (0, 1)]
        cap = steps[0].capacity_tokens if steps else 0
        ax.axhline(cap, color="0.5", lw=1, ls=":")
        ax.fill_between(xs, stored, reserved, color="#D55E00", alpha=0.18, lw=0, label="reserved, empty (waste)")
        ax.plot(xs, reserved, color="black", lw=1.8, ls="--", label="reserved")
        ax.plot(xs, stored, color="#0072B2", lw=2.2, label="holding tokens")
        pre = [r.time_s * 1e3 for r in steps if r.preempted]
        if pre:
            ax.plot(pre, [cap * 1.04] * len(pre), "v", color="#c00000", ms=8, label="preemption")
        if steps:
            ax.axvline(run.time_ms, color="0.3", lw=1, ls="-.")
        head = _pool_title(run)
        facts = (f"{100 * run.stored_share:.0f}% of reserved KV holds tokens; {run.steps} steps, done at "
                 f"{run.time_ms:.2f} ms; at most {run.max_running} running; {run.preemptions} preemptions")
        if run.refused:
            facts += (f"\n{len(run.refused)} of {len(run.trace.requests)} requests refused "
                      f"({' '.join(r for r, _ in run.refused)}): {run.refused[0][1]}")
        ax.set_title(f"{head}\n{facts}", fontsize=9.5, loc="left")
        ax.set_ylabel("KV token slots")
        ax.set_ylim(0, cap * 1.12 if cap else 1)
    handles = {}
    for ax in axes:
        for hnd, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, hnd)
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", fontsize=8.5, ncols=4, frameon=False)
    axes[-1].set_xlabel("simulated time (ms)")
    means = ", ".join(f"{r.name} {r.mean_step_ms:.4f} ms" for r in runs.values())
    fig.suptitle(f"The same {len(next(iter(runs.values())).trace.requests)} requests on the same KV memory. A bigger "
                 "batch makes each step costlier (mean step: " + means + "), so paging wins by taking fewer steps, "
                 "not cheaper ones", fontsize=9.5, wrap=True)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------
# Block tables: prefix sharing, fork, copy-on-write


def block_table_states(prompt_tokens: int = 10) -> list[StepRecord]:
    """Three moments of fork_scene (sim.lab.trace_scenes): B's prefix-cache hit, A' forked, A' writing."""
    _, records = fork_scene(prompt_tokens)
    return records[1:]


def block_tables(path: str | Path, prompt_tokens: int = 10) -> Path:
    """Draw block_table_states(): block tables with arrows to the physical blocks, refcounts, the copy."""
    tracer, _ = fork_scene(prompt_tokens)
    states = tracer.records[1:]
    layout = tracer.scheduler.layout
    colours = {"A": "#0072B2", "B": "#D55E00", "A'": "#009E73"}
    shown = 1 + max(b for s in states for t in s.tables.values() for b in t) + 1
    fig, axes = subplots(1, len(states), figsize=(16, 5.0), constrained_layout=True)
    nl = max(len(t) for s in states for t in s.tables.values())
    notes = ["B's first 8 tokens hash to A's two cached blocks: B's table points at them (refcount 2) and B "
             "computes only its own tokens.",
             "No copy yet: A' points at A's blocks, every refcount goes up.",
             _cow_note(states[-1])]
    for k, (ax, st, note) in enumerate(zip(axes, states, notes)):
        draw_block_tables(ax, st, layout.block_size, shown, colours, title=f"{k + 1}. {st.label}", max_logical=nl,
                          note=note)
    fig.suptitle(f"Block tables (block size {layout.block_size}), drawn from a real ContinuousScheduler and its "
                 "BlockManager. Colour bands in a physical block = the sequences pointing at it; black outline = "
                 "written by this step", fontsize=10)
    return _save(fig, path)


def _cow_note(state: StepRecord) -> str:
    cows = state.of_kind("cow")
    if cows:
        src, dst = cows[0].copies[0]
        return (f"A' writes into block {src}, which A still uses: block {src} is copied to {dst} first and A' points "
                "at the copy. Full blocks stay shared.")
    alloc = state.of_kind("alloc")
    return (f"A's last block was full: A' writes into a fresh block ({' '.join(map(str, alloc[0].blocks))}); "
            "nothing is copied." if alloc else "Nothing is written into a shared block: no copy.")


# ---------------------------------------------------------------------------------------
# Preemption and recompute


def preemption_moments(trace: Trace) -> list[tuple[str, StepRecord]]:
    """(caption, record): the step before the first preemption, that preemption, and the victim's recompute."""
    recs = trace.records
    i = next(k for k, r in enumerate(recs) if r.preempted)
    victim = recs[i].preempted[0]
    back = next(r for r in recs[i + 1:] if any(c[0] == victim and c[3] == "recompute" for c in r.chunks))
    hits = [e for e in back.of_kind("admit") if e.request == victim]
    reuse = f"; reuses cached blocks {' '.join(map(str, hits[0].shared))}" if hits and hits[0].shared else ""
    return [(f"step {recs[i - 1].step}: the pool is full ({recs[i - 1].reserved_tokens}/"
             f"{recs[i - 1].capacity_tokens} token slots)", recs[i - 1]),
            (f"step {recs[i].step}: {recs[i].of_kind('no_room')[0].request} needs a block, none is free: "
             f"{victim} (newest) is preempted, its blocks go to others in the same step", recs[i]),
            (f"step {back.step}: {victim} is admitted again and recomputed{reuse}", back)]


def preemption(path: str | Path) -> Path:
    """Three moments of trace_small.toml's paged engine around its first preemption."""
    trace = trace_cell(load_experiment(TRACE_SMALL), "paged")
    layout = trace.scheduler.layout
    colours = colours_for(trace.requests)
    moments = preemption_moments(trace)
    nl = max(len(t) for _, r in moments for t in r.tables.values())
    fig, axes = subplots(1, 3, figsize=(18, 7.0), constrained_layout=True)
    for ax, (caption, rec) in zip(axes, moments):
        events = "\n".join(line for line in (_short(e) for e in rec.events if e.phase != "after") if line)
        draw_block_tables(ax, rec, layout.block_size, layout.num_blocks, colours, title=caption, max_logical=nl,
                          note=events)
    fig.suptitle("Preemption and recompute (experiments/trace_small.toml, paged engine; `servesim trace "
                 "--html` steps through it). Red dashed box = freed by the preemption in this step", fontsize=10)
    return _save(fig, path)


def _short(e) -> str:
    if e.kind == "no_room":
        return f"{e.request}: no room ({e.detail})"
    if e.kind == "preempt":
        return f"{e.request} preempted: frees {' '.join(map(str, e.blocks))}"
    if e.kind == "alloc":
        return f"{e.request} gets block {' '.join(map(str, e.blocks))}"
    if e.kind == "admit":
        parts = []
        if e.shared:
            parts.append(f"reuses cached {' '.join(map(str, e.shared))}")
        if e.blocks:
            parts.append(f"takes {' '.join(map(str, e.blocks))}")
        return f"{e.request} admitted: {', '.join(parts)}"
    return ""


# ---------------------------------------------------------------------------------------
# Ollama's slots


def ollama_slots(path: str | Path) -> Path:
    """trace_small.toml's requests in llama.cpp slots (Ollama: num_parallel x num_ctx, reserved at load)."""
    exp = load_experiment(TRACE_SMALL)
    trace = trace_cell(exp, "slots")
    layout = trace.scheduler.layout
    colours = colours_for(trace.requests)
    busy = [r for r in trace.steps if len(r.tables) == layout.num_slots]
    moments = [busy[len(busy) // 4], busy[(3 * len(busy)) // 4]] if len(busy) >= 2 else trace.steps[:2]
    fig, axes = subplots(len(moments), 1, figsize=(12, 1.5 * len(moments) + 1.0), constrained_layout=True)
    for ax, rec in zip(np.atleast_1d(axes), moments):
        draw_slots(ax, rec, layout.num_slots, layout.max_len, colours,
                   title=f"step {rec.step}, t = {rec.time_s * 1e3:.2f} ms: {rec.stored_tokens} of "
                         f"{layout.capacity_tokens} reserved token slots hold tokens; waiting: "
                         f"{' '.join(rec.waiting) or 'none'}")
    fig.suptitle(f"Ollama / llama.cpp: num_parallel = {layout.num_slots} slots x num_ctx = {layout.max_len} tokens = "
                 f"{layout.capacity_tokens} token slots allocated at load, used or not.\nA request holds one slot from "
                 "admission to its end (pale = reserved, empty; black outline = written by this step)", fontsize=10)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------
# The gather through a block table

GATHER_TABLE = (2, 5, 1)  # a sequence's block table: logical block i lives in physical block GATHER_TABLE[i]
GATHER_CONTEXT = 10  # tokens in its context: the last block is half full


def gather_example(num_blocks: int = 6, block_size: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(pool [num_blocks, block_size] of slot ids, gather_paged(pool, [GATHER_TABLE]) [len(table) * block_size]).

    Each pool position holds its flat slot id (block * block_size + offset), so the gathered
    context shows where every position was read from.
    """
    pool = jnp.arange(num_blocks * block_size).reshape(num_blocks, block_size, 1, 1)
    ctx = gather_paged(pool, jnp.array([GATHER_TABLE]))
    return np.asarray(pool[:, :, 0, 0]), np.asarray(ctx[0, :, 0, 0])


def gather(path: str | Path, block_size: int = 4) -> Path:
    """The pool, the block table, and the contiguous context gather_paged makes of them, masked past context_len."""
    pool, ctx = gather_example(block_size=block_size)
    nb = pool.shape[0]
    colours = ("#0072B2", "#D55E00", "#009E73")
    fig, ax = subplots(1, 1, figsize=(10, 5.6), constrained_layout=True)
    # The pool: one row per physical block.
    ax.text(0, -0.7, f"the pool: cache[{nb}, {block_size}]", fontsize=10, weight="bold")
    ax.text(0, -0.25, "(each position holds its slot id)", fontsize=8.5)
    owner = {b: i for i, b in enumerate(GATHER_TABLE)}
    for b in range(nb):
        y = b * 0.9
        ax.text(-0.3, y + 0.35, f"block {b}", ha="right", va="center", fontsize=9)
        for j in range(block_size):
            c = colours[owner[b]] if b in owner else "white"
            ax.add_patch(Rectangle((j, y), 1, 0.7, facecolor=c, edgecolor="0.3", alpha=0.85 if b in owner else 1))
            ax.text(j + 0.5, y + 0.35, str(pool[b, j]), ha="center", va="center", fontsize=9,
                    color="white" if b in owner else "0.4")
    # The block table.
    tx = 9.0
    ax.text(tx, -0.7, "block table [S=1, MB=3]", fontsize=10, weight="bold")
    for i, b in enumerate(GATHER_TABLE):
        ax.add_patch(Rectangle((tx + i * 1.4, 0), 1.2, 0.7, facecolor=colours[i], edgecolor="0.3"))
        ax.text(tx + i * 1.4 + 0.6, 0.35, str(b), ha="center", va="center", color="white", weight="bold")
        ax.text(tx + i * 1.4 + 0.6, 1.0, f"L{i}", ha="center", va="center", fontsize=9)
        ax.annotate("", xy=(block_size + 0.05, b * 0.9 + 0.35), xytext=(tx + i * 1.4 + 0.6, 0.7),
                    arrowprops=dict(arrowstyle="-|>", color=colours[i], lw=1.5, connectionstyle="arc3,rad=-0.25"))
    # The gathered context, masked at context_len.
    gy = nb * 0.9 + 1.0
    ax.text(0, gy - 0.75, "gather_paged(cache, table) = cache[table].reshape(S, MB * BS):", fontsize=10, weight="bold")
    ax.text(0, gy - 0.3, f"one contiguous context of {len(ctx)} positions; attention masks key_position >= "
            f"context_len = {GATHER_CONTEXT} (hatched)", fontsize=9.5)
    for p, v in enumerate(ctx):
        masked = p >= GATHER_CONTEXT
        c = colours[p // block_size]
        ax.add_patch(Rectangle((p, gy), 1, 0.8, facecolor="0.85" if masked else c, edgecolor="0.3",
                               hatch="//" if masked else None))
        ax.text(p + 0.5, gy + 0.4, str(v), ha="center", va="center", fontsize=9, color="0.3" if masked else "white")
        ax.text(p + 0.5, gy + 1.05, str(p), ha="center", va="center", fontsize=7.5, color="0.35")
    ax.text(len(ctx) + 0.3, gy + 1.05, "position", fontsize=7.5, color="0.35", va="center")
    ax.set_xlim(-2.2, max(len(ctx), tx + 4.5) + 1.5)
    ax.set_ylim(gy + 1.6, -1.2)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.suptitle("Attention reads a paged context through its block table: the blocks can sit anywhere in the pool\n"
                 "(values computed by the real reference.paged_attention.gather_paged)", fontsize=10)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def make_all(out_dir: str | Path, overrides=(), prompt_tokens: int = 10) -> list[Path]:
    """Every teaching figure into out_dir (overrides: --set style, for teaching_pool.toml)."""
    out = Path(out_dir)
    return [kv_over_time(out / "teaching_kv_over_time.png", overrides),
            block_tables(out / "teaching_block_tables.png", prompt_tokens),
            preemption(out / "teaching_preemption.png"),
            ollama_slots(out / "teaching_ollama_slots.png"),
            gather(out / "teaching_gather.png")]


@click.command()
@click.argument("out_dir", default="papers/figures", required=False)
@click.option("--max-model-len", type=click.IntRange(min=4), default=None,
              help="Tokens each request reserves in the Orca-style engine of teaching_pool.toml (default 48).")
@click.option("--fork-prompt-tokens", type=click.IntRange(min=9), default=10,
              help="Prompt length of A in the fork / copy-on-write figure (default 10).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Change a key of experiments/teaching_pool.toml, e.g. --set engines.paged.block_size=8.")
def main(out_dir: str, max_model_len: int | None, fork_prompt_tokens: int, overrides: tuple[str, ...]) -> None:
    """Write the tutorial's figures to OUT_DIR and print what each shows."""
    sets = list(overrides) + ([f"engines.reserve.max_model_len={max_model_len}"] if max_model_len else [])
    try:
        for run in pool_runs(sets).values():
            click.echo(run.summary())
        click.echo(fork_summary(fork_prompt_tokens))
        for p in make_all(out_dir, sets, fork_prompt_tokens):
            click.echo(p)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None


def fork_summary(prompt_tokens: int) -> str:
    """What A' does when it writes after the fork: copy-on-write, or a fresh block."""
    last = block_table_states(prompt_tokens)[-1]
    child = "A'"
    what = (f"copy-on-write {' '.join(f'{s} -> {d}' for s, d in last.copies)}" if last.copies
            else "no copy (A' writes into a fresh block)")
    return f"fork with a {prompt_tokens}-token prompt: A {last.tables['A']}, A' {last.tables[child]}: {what}"


if __name__ == "__main__":
    main()
