"""Matplotlib drawings of trace records (sim.lab.trace): block tables with arrows to the pool, and KV slots.

The same picture as the page `servesim trace --html` draws, for the tutorial's figures: each
sequence's block table (logical block -> physical block, cells filled with the tokens the block
holds), an arrow from every logical block to its physical block, and the pool with each block's
holders (one colour band each), refcount, and prefix-cache state.
"""
from __future__ import annotations

import textwrap

from matplotlib.axes import Axes
from matplotlib.patches import Rectangle

from sim.lab.trace import StepRecord, rid_key

# Okabe-Ito and Tol colours (as the page): distinguishable in colour-blindness and on a projector.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#882255", "#117733",
           "#332288", "#AA4499", "#44AA99", "#999933", "#661100", "#6699CC", "#888888")


def colours_for(request_ids) -> dict[str, str]:
    """A colour per request id, in id order (r2 before r10)."""
    return {rid: PALETTE[i % len(PALETTE)] for i, rid in enumerate(sorted(set(request_ids), key=rid_key))}


def _holders(rec: StepRecord) -> list[str]:
    order = [r for r in rec.running if r in rec.tables]
    return order + sorted((r for r in rec.tables if r not in order), key=rid_key)


def written_cells(rec: StepRecord, block_size: int) -> set[tuple[int, int]]:
    """(physical block, offset) of every position the record's step writes."""
    cells = set()
    for rid, start, n, _ in rec.chunks:
        table = rec.tables.get(rid, [])
        for p in range(start, start + n):
            if p // block_size < len(table):
                cells.add((table[p // block_size], p % block_size))
    return cells


def draw_block_tables(ax: Axes, rec: StepRecord, block_size: int, num_blocks: int, colours: dict[str, str],
                      title: str = "", max_logical: int | None = None, note: str = "") -> None:
    """Block tables on the left, the physical pool (blocks 0 .. num_blocks-1) on the right, arrows between.

    Cells: coloured = holds a token; white in a coloured outline = reserved, empty; grey = free
    but still in the prefix cache; black outline = written by this step; red dashed box = freed
    by a preemption in this step.
    """
    seqs = _holders(rec)
    nl = max_logical or max((len(t) for t in rec.tables.values()), default=1)
    cw, gap, row, label_w = 0.3, 0.25, 1.45, 1.3  # cell width, gap between blocks, row pitch, label column
    bw = block_size * cw
    pool_x = label_w + nl * (bw + gap) + 2.6
    pitch, ph = 0.62, 0.5
    written = written_cells(rec, block_size)
    preempted_from = {b: e.request for e in rec.of_kind("preempt") for b in e.blocks}
    copied = {dst: src for e in rec.of_kind("cow") for src, dst in e.copies}
    holders: dict[int, list[str]] = {}
    for rid in seqs:
        for b in rec.tables[rid]:
            holders.setdefault(b, [])
            if rid not in holders[b]:
                holders[b].append(rid)
    # The pool.
    ax.text(pool_x, -0.55, "physical blocks", fontsize=9.5, weight="bold", va="bottom")
    for b in range(num_blocks):
        y = b * pitch
        st = rec.blocks.get(b)
        who = holders.get(b, [])
        for j in range(block_size):
            x = pool_x + j * cw
            if b == 0:
                ax.add_patch(Rectangle((x, y), cw, ph, facecolor="0.25", edgecolor="0.25"))
            elif st is not None and st.refs > 0 and j < st.fill:
                for k, rid in enumerate(who):
                    ax.add_patch(Rectangle((x, y + k * ph / len(who)), cw, ph / len(who), facecolor=colours[rid],
                                           edgecolor="none"))
                ax.add_patch(Rectangle((x, y), cw, ph, facecolor="none", edgecolor="white", lw=0.6))
            elif st is not None and st.refs > 0:
                ax.add_patch(Rectangle((x, y), cw, ph, facecolor="white", edgecolor=colours[who[0]], lw=1))
            elif st is not None and st.cached:
                ax.add_patch(Rectangle((x, y), cw, ph, facecolor="0.8", edgecolor="0.55", lw=0.8))
            else:
                ax.add_patch(Rectangle((x, y), cw, ph, facecolor="white", edgecolor="0.7", lw=0.8))
            if (b, j) in written:
                ax.add_patch(Rectangle((x + 0.03, y + 0.03), cw - 0.06, ph - 0.06, facecolor="none",
                                       edgecolor="black", lw=1.8))
        right = pool_x + bw + 0.12
        ax.text(right, y + ph / 2, str(b), va="center", fontsize=9, weight="bold" if st and st.refs else "normal")
        tag = ""
        if b == 0:
            tag = "null"
        elif st is not None and st.refs > 1:
            tag = f"ref {st.refs}"
        elif st is not None and st.refs == 0 and st.cached:
            tag = "cached"
        if b in copied:
            tag = (tag + " " if tag else "") + f"copy of {copied[b]}"
        if tag:
            ax.text(right + 0.65, y + ph / 2, tag, va="center", fontsize=8.5,
                    weight="bold" if st and st.refs > 1 or b in copied else "normal",
                    color="#6a00a8" if b in copied else "black")
        if b in preempted_from:
            ax.add_patch(Rectangle((pool_x - 0.07, y - 0.06), bw + 0.14, ph + 0.12, facecolor="none",
                                   edgecolor="#c00000", lw=1.4, ls="--"))
    # The block tables and their arrows.
    ax.text(0, -0.55, "block tables", fontsize=9.5, weight="bold", va="bottom")
    for r, rid in enumerate(seqs):
        y = 0.35 + r * row
        c = colours[rid]
        ax.text(0, y + 0.3, rid, fontsize=13, weight="bold", color=c, va="center")
        chunk = next((ch for ch in rec.chunks if ch[0] == rid), None)
        if chunk is not None:
            what = f"decode@{chunk[1]}" if chunk[3] == "decode" else f"{chunk[3]} {chunk[1]}:{chunk[1] + chunk[2]}"
            ax.text(0, y + 0.78, what, fontsize=7.5, color="0.25", va="center")
        for li, b in enumerate(rec.tables[rid]):
            x = label_w + li * (bw + gap)
            st = rec.blocks.get(b)
            fill = st.fill if st is not None else 0
            ax.text(x + bw / 2, y - 0.08, f"L{li}\u2192{b}", ha="center", va="bottom", fontsize=7.5)
            for j in range(block_size):
                ax.add_patch(Rectangle((x + j * cw, y), cw, 0.6, facecolor=c if j < fill else "white", edgecolor=c,
                                       lw=0.9))
                if (b, j) in written:
                    ax.add_patch(Rectangle((x + j * cw + 0.03, y + 0.03), cw - 0.06, 0.54, facecolor="none",
                                           edgecolor="black", lw=1.8))
            ax.annotate("", xy=(pool_x - 0.02, b * pitch + ph / 2), xytext=(x + bw / 2, y + 0.6),
                        arrowprops=dict(arrowstyle="-|>", color=c, lw=1.1, alpha=0.8, shrinkA=0, shrinkB=0,
                                        connectionstyle="arc3,rad=0.18", mutation_scale=9))
    content = max(num_blocks * pitch, 0.35 + max(len(seqs), 1) * row)
    lines = [w for part in note.splitlines() for w in textwrap.wrap(part, 64)] if note else []
    if lines:
        ax.text(0, content + 0.35, "\n".join(lines), fontsize=8.5, style="italic", va="top")
    height = content + 0.5 + 0.42 * len(lines)
    ax.set_xlim(-0.1, pool_x + bw + 2.6)
    ax.set_ylim(height, -1.0)
    ax.set_aspect("equal")
    ax.axis("off")
    if title:
        ax.set_title("\n".join(textwrap.wrap(title, 58)), fontsize=10, loc="left")


def draw_slots(ax: Axes, rec: StepRecord, num_slots: int, slot_len: int, colours: dict[str, str],
               title: str = "") -> None:
    """num_slots rows of slot_len cells: the holder's tokens, the rest of its slot reserved but empty (pale)."""
    holder = {t[0]: rid for rid, t in rec.tables.items()}
    written = set()
    for rid, start, n, _ in rec.chunks:
        written |= {(rec.tables[rid][0], p) for p in range(start, start + n)}
    for k in range(num_slots):
        y = k * 1.3
        rid = holder.get(k)
        held = rec.held_tokens.get(rid, 0) if rid else 0
        c = colours.get(rid, "0.7")
        ax.text(-0.3, y + 0.4, f"slot {k}" + (f"  {rid}" if rid else "  idle"), ha="right", va="center",
                fontsize=10, weight="bold", color=c if rid else "0.4")
        for j in range(slot_len):
            face = c if j < held else ("white" if rid else "0.93")
            ax.add_patch(Rectangle((j, y), 1, 0.8, facecolor=face, edgecolor=c if rid else "0.75", lw=0.7,
                                   alpha=1.0 if j < held or not rid else 0.35))
            if (k, j) in written:
                ax.add_patch(Rectangle((j + 0.08, y + 0.08), 0.84, 0.64, facecolor="none", edgecolor="black", lw=1.6))
        ax.text(slot_len + 0.4, y + 0.4, f"{held}/{slot_len} hold tokens" if rid else "reserved, idle",
                va="center", fontsize=9)
    ax.set_xlim(-6.5, slot_len + 8)
    ax.set_ylim(num_slots * 1.3 + 0.2, -0.9)
    ax.set_aspect("equal")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=10.5, loc="left")
