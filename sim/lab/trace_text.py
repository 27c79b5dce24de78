"""A trace (sim.lab.trace) as text: one line per event, in the order the scheduler made them.

The same sentences label the events on the browser page (sim.lab.trace_html), so the terminal
and the page say the same thing in the same words.
"""
from __future__ import annotations

from sim.lab.trace import Event, StepRecord, Trace, rid_key


def _ids(bs) -> str:
    return " ".join(str(b) for b in bs)


def _blocks(bs, paged: bool) -> str:
    if not paged:
        return f"slot {_ids(bs)}"
    return f"block{'s' if len(bs) != 1 else ''} {_ids(bs)}"


def _span(ev: Event, kind: str = "prefill") -> str:
    start, end = ev.span
    return f"{kind} {start}:{end}"


def describe_event(ev: Event, paged: bool = True, refs: dict[int, int] | None = None) -> str:
    """One line for an event: a 10-character verb column, the request, what happened.

    refs: block -> refcount at the snapshot (to say how many share a prefix-cache hit).
    """
    rid, kind = ev.request, ev.kind
    refs = refs or {}
    if kind == "arrive":
        return f"arrived    {rid} at t={ev.time_s * 1e3:.2f} ms: joins the waiting queue"
    if kind == "refuse":
        return f"refused    {rid} at t={ev.time_s * 1e3:.2f} ms: {ev.detail}"
    if kind == "no_room":
        return f"no room    {rid}: {ev.detail}"
    if kind == "preempt":
        what = _blocks(ev.blocks, paged) if ev.blocks else "nothing"
        if ev.shared:
            what += f", and its share of blocks {_ids(ev.shared)} (still held by others)"
        return f"preempted  {rid} (newest running): frees {what}; recomputed later"
    if kind == "admit":
        parts = []
        if ev.shared:
            hits = [b for b in ev.shared if b not in ev.revived]
            if hits:
                parts.append(f"shares cached {_blocks(hits, True)} (prefix cache; refcount "
                             + " ".join(f"{b}:{refs.get(b, '?')}" for b in hits) + ")")
            if ev.revived:
                parts.append(f"revives cached {_blocks(ev.revived, True)} from the free pool (prefix cache)")
        if ev.blocks:
            parts.append(f"takes {'new ' if ev.shared else ''}{_blocks(ev.blocks, paged)}")
        if ev.evicted:
            parts.append(f"evicting the cached content of {_ids(ev.evicted)}")
        return f"admitted   {rid}: " + ", ".join(parts) if parts else f"admitted   {rid}"
    if kind == "alloc":
        line = f"allocated  {rid}: {_blocks(ev.blocks, paged)}"
        return line + (f" (evicts the cached content of {_ids(ev.evicted)})" if ev.evicted else "")
    if kind == "reserve":
        return f"reserved   {rid}: {_blocks(ev.blocks, paged)} more, empty until written (room for {ev.span[1]} tokens)"
    if kind == "cow":
        copies = ", ".join(f"{s} -> {d}" for s, d in ev.copies)
        return f"copy       {rid}: writes into a shared block, so it is copied first ({copies}, copy-on-write)"
    if kind == "fork":
        return f"forked     {rid} from {ev.detail}: shares all its blocks ({_ids(ev.blocks)}), refcounts + 1, nothing copied"
    if kind == "cached":
        return f"cached     {rid}: {_blocks(ev.blocks, True)} full, now in the prefix cache"
    if kind in ("finish", "abort"):
        what = _blocks(ev.blocks, paged) if ev.blocks else ""
        if ev.shared:
            what += (", and " if what else "") + f"its share of blocks {_ids(ev.shared)} (still held by others)"
        verb = "finished" if kind == "finish" else "ended"
        why = f" ({ev.detail})" if ev.detail else ""
        frees = f": frees {what}" if what else ""
        return f"{verb:<10} {rid} at t={ev.time_s * 1e3:.2f} ms{why}{frees}"
    return f"{kind:<10} {rid}"


def describe_chunk(rid: str, start: int, n: int, kind: str) -> str:
    """'r0 decode@20' or 'r2 prefill 8:11'."""
    return f"{rid} decode@{start}" if kind == "decode" else f"{rid} {kind} {start}:{start + n}"


def batch_line(rec: StepRecord, budget: int | None = None) -> str:
    """The step's batch: its chunks and tokens (of the budget, when there is one)."""
    ntok = sum(n for _, _, n, _ in rec.chunks)
    of = f" of {budget}" if budget else ""
    return (", ".join(describe_chunk(*c) for c in rec.chunks)
            + f"  ({len(rec.chunks)} seq{'s' if len(rec.chunks) != 1 else ''}, {ntok}{of} tokens)")


def kv_line(rec: StepRecord, paged: bool) -> str:
    """Reserved vs stored KV, and the queue."""
    extra = f" ({len({b for t in rec.tables.values() for b in t})} blocks)" if paged else ""
    return (f"{rec.reserved_tokens}/{rec.capacity_tokens} token slots reserved{extra}, {rec.stored_tokens} hold "
            f"tokens; running {len(rec.running)}, waiting {len(rec.waiting)}")


def token_budget(scheduler) -> int | None:
    """Tokens one step may compute (vLLM's max_num_batched_tokens, llama.cpp's n_batch); None when unbounded."""
    return getattr(scheduler, "max_num_batched_tokens", None) or getattr(scheduler, "n_batch", None)


def step_lines(rec: StepRecord, paged: bool = True, budget: int | None = None) -> list[str]:
    """A record as lines: header, events before and during scheduling, batch, KV, then the step's end."""
    if rec.chunks:
        head = f"step {rec.step:<3} t={rec.time_s * 1e3:9.2f} ms  (+{rec.dt_s * 1e3:.2f} ms)"
    else:
        head = f"{rec.label or 'moment'}: t={rec.time_s * 1e3:9.2f} ms"
    refs = rec.refcount
    lines = [head]
    lines += ["  " + describe_event(e, paged, refs) for e in rec.events if e.phase != "after"]
    if rec.chunks:
        lines.append("  batch      " + batch_line(rec, budget))
    lines.append("  KV         " + kv_line(rec, paged))
    lines += ["  " + describe_event(e, paged, refs) for e in rec.events if e.phase == "after"]
    return lines


def format_step(rec: StepRecord, paged: bool = True, budget: int | None = None) -> str:
    """A few lines for one record (see step_lines)."""
    return "\n".join(step_lines(rec, paged, budget))


def totals_line(trace: Trace) -> str:
    """The run's totals: every reference taken is given back."""
    evs = [e for r in trace.records for e in r.events]
    count = lambda kinds, attr: sum(len(getattr(e, attr)) for e in evs if e.kind in kinds)  # noqa: E731
    unit = "blocks" if trace.paged else "slot assignments"
    taken = count(("admit", "alloc", "reserve"), "blocks") + sum(len(e.copies) for e in evs if e.kind == "cow")
    shared = count(("admit",), "shared")
    freed = count(("preempt", "finish", "abort"), "blocks")
    released = count(("preempt", "finish", "abort"), "shared")
    preempted = sum(1 for e in evs if e.kind == "preempt")
    refused = sum(1 for e in evs if e.kind == "refuse")
    return (f"totals: {len(trace.steps)} steps, {trace.sim_time_s * 1e3:.2f} ms; {taken} {unit} allocated, "
            f"{shared} shared from the prefix cache, {freed} freed, {released} released while shared; "
            f"{preempted} preemptions; {sum(len(r.copies) for r in trace.records)} copy-on-write copies" + (f"; {refused} refused" if refused else ""))


def format_trace(trace: Trace, steps: int | None = None) -> str:
    """The header, the first `steps` records as text, then the run's totals."""
    budget = token_budget(trace.scheduler)
    shown = trace.records if steps is None else trace.records[:steps]
    out = [trace.describe()]
    for rec in shown:
        out += step_lines(rec, trace.paged, budget)
    if steps is not None and len(trace.records) > steps:
        out.append(f"... {len(trace.records) - steps} more records (--steps to see them)")
    out.append(totals_line(trace))
    return "\n".join(out)


def requests_line(trace: Trace) -> str:
    """Each request: prompt + max_tokens, arrival (for the header of a page or a listing)."""
    return ", ".join(f"{rid} {r.num_prompt_tokens}+{r.sampling.max_tokens}"
                     for rid, r in sorted(trace.requests.items(), key=lambda kv: rid_key(kv[0])))
