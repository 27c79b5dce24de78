"""Figures that make PagedAttention visible, drawn from the real BlockManager and ContinuousScheduler.

- kv_over_time(): the same small workload under per-request max-length reservation (the
  llama.cpp-slot / Orca (Max) way) and under paging (vLLM), on the same pool. Each column is a
  scheduler step, each row a token slot of the pool; a slot is coloured by the request that holds
  it, solid where it holds a token and pale where it is reserved but empty (waste).
- block_tables(): block tables of a few sequences: two requests sharing a system prompt through
  the prefix cache, then a parallel-sampling fork that shares every block until one branch
  writes, and copy-on-write gives it its own last block.

Plain Python + matplotlib (no JAX). `python -m sim.lab.teaching OUT_DIR` writes both PNGs.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.colors import to_rgb
from matplotlib.patches import Patch, Rectangle

from reference.block_manager import BlockManager
from reference.request import Request, SamplingParams
from reference.schedulers import ContinuousScheduler, OrcaScheduler
from sim.lab.figures import subplots

# A small workload: (arrival step, prompt tokens, output tokens).
WORKLOAD = ((0, 9, 14), (0, 4, 22), (0, 14, 6), (1, 6, 30), (3, 11, 9), (5, 3, 17), (7, 16, 12), (9, 5, 8),
            (12, 8, 20), (14, 12, 5))
POOL_BLOCKS = 33  # 32 usable blocks (block 0 is the null block)
BLOCK_SIZE = 4
MAX_MODEL_LEN = 48  # 12 blocks: what a max-length reservation holds per request


@dataclass
class Snapshot:
    """The pool after one step was scheduled: who holds which block, and how full each block is."""

    step: int
    tables: dict[str, list[int]]
    fill: dict[int, int]


def _request(i: int, prompt: int, output: int, arrival: float) -> Request:
    rng = np.random.default_rng(1000 + i)
    return Request(f"r{i}", rng.integers(1, 500, size=prompt).tolist(), SamplingParams(max_tokens=output),
                   arrival_time=arrival)


def run_pool(reservation: str, workload=WORKLOAD, num_blocks: int = POOL_BLOCKS, block_size: int = BLOCK_SIZE,
             max_model_len: int = MAX_MODEL_LEN, max_steps: int = 500) -> list[Snapshot]:
    """Drive a scheduler step by step (time = step index) and snapshot the pool after each schedule.

    reservation "none" = paging, blocks on demand (ContinuousScheduler); "max_model_len" = every
    admitted request reserves max_model_len tokens up front (OrcaScheduler: per-slot reservation).
    """
    common = dict(max_num_seqs=16, max_num_batched_tokens=64, max_model_len=max_model_len, enable_chunked_prefill=True)
    if reservation == "none":
        sched = ContinuousScheduler(num_blocks, block_size, enable_prefix_caching=False, **common)
    else:
        sched = OrcaScheduler(num_blocks, block_size, reservation=reservation, **common)
    pending = sorted((a, i, p, o) for i, (a, p, o) in enumerate(workload))
    snaps: list[Snapshot] = []
    step = 0
    while (pending or sched.has_unfinished()) and step < max_steps:
        while pending and pending[0][0] <= step:
            a, i, p, o = pending.pop(0)
            sched.add(_request(i, p, o, float(a)), float(step))
        out = sched.schedule(float(step))
        bm = sched.blocks
        tables = {rid: list(t) for rid, t in bm.tables.items()}
        snaps.append(Snapshot(step, tables, {b: bm.fill[b] for t in tables.values() for b in t}))
        sched.update(out, [1] * sum(1 for c in out.chunks if c.samples), float(step + 1))
        step += 1
    return snaps


def occupancy(snaps: list[Snapshot]) -> tuple[float, int]:
    """(share of reserved token slots that hold tokens over the run, steps until the last request ended)."""
    stored = sum(sum(s.fill.values()) for s in snaps)
    reserved = sum(sum(len(t) for t in s.tables.values()) for s in snaps) * BLOCK_SIZE
    last = max((s.step for s in snaps if s.tables), default=0) + 1
    return (stored / reserved if reserved else 0.0), last


def _colours(n: int) -> np.ndarray:
    cmap = matplotlib.colormaps["tab10"]
    return np.array([cmap(i % 10)[:3] for i in range(n)])


def pool_image(snaps: list[Snapshot], num_blocks: int, block_size: int, steps: int, colours: np.ndarray
               ) -> np.ndarray:
    """[token slots, steps, RGB]: request colour where a slot holds a token, pale where reserved, white where free."""
    rows = (num_blocks - 1) * block_size
    img = np.ones((rows, steps, 3))
    for s in snaps:
        for rid, table in s.tables.items():
            c = colours[int(rid[1:])]
            for b in table:
                base = (b - 1) * block_size
                n = s.fill.get(b, 0)
                img[base:base + n, s.step] = c
                img[base + n:base + block_size, s.step] = 0.78 + 0.22 * c  # pale: reserved, empty
    return img


def kv_over_time(path: str | Path) -> Path:
    """Two panels over the same steps: max-length reservation vs paging. Returns the PNG path."""
    static = run_pool("max_model_len")
    paged = run_pool("none")
    (u_s, end_s), (u_p, end_p) = occupancy(static), occupancy(paged)
    steps = max(end_s, end_p) + 1
    colours = _colours(len(WORKLOAD))
    fig, axes = subplots(1, 2, figsize=(13, 5.4), sharey=True, constrained_layout=True)
    panels = ((axes[0], static, f"Reserve max_model_len ({MAX_MODEL_LEN} tokens) per request",
               u_s, end_s),
              (axes[1], paged, f"Paged: blocks of {BLOCK_SIZE} tokens on demand", u_p, end_p))
    rows = (POOL_BLOCKS - 1) * BLOCK_SIZE
    for ax, snaps, title, u, end in panels:
        ax.imshow(pool_image(snaps, POOL_BLOCKS, BLOCK_SIZE, steps, colours), aspect="auto", origin="lower",
                  interpolation="nearest", extent=(-0.5, steps - 0.5, 0, rows))
        for y in range(0, rows + 1, BLOCK_SIZE * 4):
            ax.axhline(y, color="0.85", lw=0.5, zorder=0)
        ax.set_title(f"{title}\n{100 * u:.0f}% of reserved slots hold tokens; done after {end} steps",
                     fontsize=10)
        ax.set_xlabel("scheduler step")
        ax.axvline(end - 0.5, color="0.3", lw=1, ls="--")
    axes[0].set_ylabel(f"KV pool token slot ({POOL_BLOCKS - 1} blocks x {BLOCK_SIZE})")
    fits = rows // MAX_MODEL_LEN
    left = rows - fits * MAX_MODEL_LEN
    if left:
        axes[0].text(steps / 2, fits * MAX_MODEL_LEN + left / 2, f"{left} free slots: too few for another\n"
                     f"{MAX_MODEL_LEN}-token reservation, never used", ha="center", va="center", fontsize=8.5,
                     color="0.35")
    handles = [Patch(color=colours[i], label=f"r{i}") for i in range(len(WORKLOAD))]
    handles += [Patch(facecolor=(0.9, 0.9, 0.9), edgecolor="0.6", label="reserved, empty (pale)"),
                Patch(facecolor="white", edgecolor="0.6", label="free")]
    fig.legend(handles=handles, loc="outside right center", fontsize=8, frameon=False)
    fig.suptitle("The same 10 requests on the same KV pool: solid = holds a token, pale = reserved but empty",
                 fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------------------------------
# Block tables: prefix sharing and copy-on-write

@dataclass
class TableState:
    """A moment of the pool for the block-table figure."""

    title: str
    tables: dict[str, list[int]]
    fill: dict[int, int]
    refs: dict[int, int]
    cached: set[int]
    note: str = ""


def block_table_states(block_size: int = 4) -> list[TableState]:
    """Three moments: prefix sharing between two requests, a fork sharing all blocks, copy-on-write."""
    sched = ContinuousScheduler(num_blocks=17, block_size=block_size, max_num_seqs=8, max_num_batched_tokens=64,
                                max_model_len=64, enable_chunked_prefill=True, enable_prefix_caching=True)
    bm: BlockManager = sched.blocks
    system = list(range(101, 109))  # an 8-token system prompt: two full blocks
    a = Request("A", system + [7, 8], SamplingParams(max_tokens=8))
    b = Request("B", system + [21, 22, 23, 24, 25], SamplingParams(max_tokens=8))
    states = []

    def snap(title: str, note: str = "") -> None:
        tables = {k: list(v) for k, v in bm.tables.items()}
        used = {x for t in tables.values() for x in t}
        states.append(TableState(title, tables, {x: bm.fill[x] for x in used},
                                 {x: bm.ref_count[x] for x in used},
                                 {x for x in used if bm.block_key[x] is not None}, note))

    sched.add(a, 0.0)
    out = sched.schedule(0.0)
    sched.update(out, [1], 1.0)  # A's prompt computed: its two system-prompt blocks are now cached
    sched.add(b, 1.0)
    out = sched.schedule(1.0)
    sched.update(out, [1] * sum(1 for c in out.chunks if c.samples), 2.0)
    snap("1. Prefix caching: B reuses A's system-prompt blocks",
         "B's first 8 tokens hash to A's cached blocks, so B\nonly computes its own 5 tokens")
    bm.fork("A", "A'")  # parallel sampling: a second answer continues from A's exact state
    snap("2. Fork (parallel sampling): A' shares all of A's blocks",
         "No copy yet: A' points at the same blocks,\nrefcounts go up")
    copies = bm.allocate_slots("A'", a.num_computed_tokens, 1)  # A' writes its own token into the shared last block
    snap("3. Copy-on-write: A' writes to the shared last block",
         f"The last block is copied first (block {copies[0][0]} -> {copies[0][1]}),\nthen A' writes its own token")
    return states


def block_tables(path: str | Path, block_size: int = 4) -> Path:
    """Draw block_table_states(): each sequence's block table, and the physical pool with its holders and refcounts."""
    states = block_table_states(block_size)
    seq_colour = {"A": "tab:blue", "B": "tab:orange", "A'": "tab:green"}
    fig, axes = subplots(1, len(states), figsize=(15, 5.2), constrained_layout=True)
    pool = sorted({x for s in states for t in s.tables.values() for x in t})
    order = ("A", "A'", "B")
    for ax, st in zip(axes, states):
        ax.set_xlim(-1.7, max(len(pool), 5) + 0.3)
        ax.set_ylim(-3.3, 3.6)
        ax.axis("off")
        ax.set_title(st.title, fontsize=10)
        seqs = [q for q in order if q in st.tables]
        # Block tables: one row per sequence, each logical block names its physical block.
        for row, sid in enumerate(seqs):
            y = 2.6 - row * 0.95
            c = np.array(to_rgb(seq_colour[sid]))
            ax.text(-1.65, y + 0.3, f"seq {sid}", ha="left", va="center", fontsize=9.5, color=c, weight="bold")
            for j, x in enumerate(st.tables[sid]):
                shared = st.refs.get(x, 1) > 1
                ax.add_patch(Rectangle((j, y), 0.85, 0.6, facecolor=0.8 + 0.2 * c, edgecolor=c,
                                       lw=2.2 if shared else 1.0, hatch="//" if shared else None))
                ax.text(j + 0.42, y + 0.3, f"L{j}: {x}", ha="center", va="center", fontsize=8.5,
                        bbox=dict(facecolor="white", edgecolor="none", pad=0.5, alpha=0.85))
        ax.text(-1.65, 2.6 - len(seqs) * 0.95 + 0.55, "block tables (logical: physical)", fontsize=7.5,
                color="0.4", ha="left")
        # Physical pool: fill, holders (one coloured mark per sequence), refcount, cached.
        y0 = -1.9
        ax.text(-1.65, y0 + 0.42, "physical\nblocks", ha="left", va="center", fontsize=8.5)
        for i, x in enumerate(pool):
            held = x in st.refs
            ax.add_patch(Rectangle((i, y0), 0.85, 0.85, facecolor="white" if held else "0.94", edgecolor="0.3"))
            if not held:
                ax.text(i + 0.42, y0 + 0.42, f"{x}", ha="center", va="center", fontsize=9, color="0.6")
                ax.text(i + 0.42, y0 - 0.3, "free", ha="center", va="center", fontsize=7.5, color="0.5")
                continue
            f = st.fill.get(x, 0) / block_size
            ax.add_patch(Rectangle((i, y0), 0.85 * f, 0.85, facecolor="0.78", edgecolor="none"))
            ax.text(i + 0.42, y0 + 0.42, f"{x}", ha="center", va="center", fontsize=10, weight="bold")
            holders = [q for q in seqs if x in st.tables[q]]
            for k, q in enumerate(holders):
                ax.add_patch(Rectangle((i + k * 0.29, y0 + 0.95), 0.26, 0.22, facecolor=seq_colour[q],
                                       edgecolor="none"))
            ax.text(i + 0.42, y0 - 0.3, f"ref {st.refs[x]}", ha="center", va="center", fontsize=8)
            if x in st.cached:
                ax.text(i + 0.42, y0 - 0.65, "cached", ha="center", va="center", fontsize=7, color="0.35")
        ax.text(-1.65, -3.05, st.note, ha="left", va="center", fontsize=8.5, style="italic")
    fig.suptitle(f"Block tables (block size {block_size}). Hatched = shared block; grey fill = tokens it holds; "
                 "coloured marks above a physical block = the sequences that point at it", fontsize=10.5)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def make_all(out_dir: str | Path) -> list[Path]:
    """Both teaching figures into out_dir."""
    out = Path(out_dir)
    return [kv_over_time(out / "teaching_kv_over_time.png"), block_tables(out / "teaching_block_tables.png")]


if __name__ == "__main__":
    for p in make_all(sys.argv[1] if len(sys.argv) > 1 else "papers/figures"):
        print(p)
