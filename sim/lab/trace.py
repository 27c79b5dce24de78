"""`servesim trace`: a step-by-step account of a small scenario, from the real scheduler in the simulator.

One replica (sim.core.replica.Replica) drives the very scheduler object the reference engine uses
(its engine kind builds it) with a simulated clock; a hook on every step compares the KV state
with the previous step's and records what changed:

    step 7  t=  3.10 ms  (+0.41 ms)  batch: r0 decode@13, r2 prefill 0:9   (2 seqs, 10 tokens)
      allocated  r2: blocks 6 7 8
      shared     r2: blocks 1 2 (prefix cache, refcount 2)
      freed      r1: blocks 3 4 5 (finished)
      preempted  r3: blocks 9 10 freed, recompute later
      KV         9/15 blocks (33 of 36 slots hold tokens), running 2, waiting 1

Paged engines (continuous, orca) report blocks; slot engines (Ollama / llama.cpp, static
batching) report which request holds which fixed KV region. Plain Python, no JAX.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import copy
import tomllib

from reference.batch import SchedulerOutput
from reference.errors import ConfigError
from reference.layout import PagedLayout
from sim.lab.experiment import Cell, Experiment, parse_experiment
from sim.lab.metrics import CellAccumulator
from sim.lab.simulate import simulate_cell


@dataclass
class StepRecord:
    """What one engine step did to the batch and the KV cache."""

    step: int
    time_s: float
    dt_s: float
    chunks: list[tuple[str, int, int, str]]  # (request, start, num_tokens, "prefill" | "decode" | "recompute")
    allocated: dict[str, list[int]] = field(default_factory=dict)  # request -> fresh blocks (or [slot])
    shared: dict[str, list[int]] = field(default_factory=dict)  # request -> blocks it shares (prefix cache)
    freed: dict[str, list[int]] = field(default_factory=dict)  # request -> blocks (or [slot]) back in the pool
    released: dict[str, list[int]] = field(default_factory=dict)  # request -> shared blocks others still hold
    freed_reason: dict[str, str] = field(default_factory=dict)  # request -> "finished" | "preempted" | "aborted"
    preempted: list[str] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst)
    tables: dict[str, list[int]] = field(default_factory=dict)  # after scheduling: request -> blocks (or [slot])
    fill: dict[int, int] = field(default_factory=dict)  # block -> tokens it holds (paged)
    refcount: dict[int, int] = field(default_factory=dict)  # block -> references (paged, > 0 only)
    reserved_tokens: int = 0
    stored_tokens: int = 0
    capacity_tokens: int = 0
    running: int = 0
    waiting: int = 0


def _kind(chunk) -> str:
    """decode (one token), prefill, or recompute (a chunk of a request preempted earlier, which has output)."""
    if chunk.is_decode:
        return "decode"
    return "recompute" if chunk.request.num_output_tokens > 0 else "prefill"


class StepTracer:
    """A Replica on_step hook that records a StepRecord per step (see the module docstring)."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.records: list[StepRecord] = []
        self._prev: dict[str, list[int]] = {}
        self._prev_refs: dict[int, int] = {}
        self._finished: dict[str, str] = {}  # request -> outcome, for attributing frees
        self.refused: list[tuple[float, str, str]] = []  # (time, request, reason): turned away at arrival

    def _snapshot(self) -> tuple[dict[str, list[int]], dict[int, int], dict[int, int]]:
        blocks = self.scheduler.kv_blocks()
        return (self.scheduler.kv_holdings(), {b: fill for b, (fill, _) in blocks.items()},
                {b: refs for b, (_, refs) in blocks.items()})

    def note_finished(self, req) -> None:
        """Replica on_finish hook: remember why a request left (its blocks go at the next step)."""
        self._finished[req.request_id] = req.outcome.value if req.outcome is not None else "finished"
        if req.first_scheduled_time is None and req.outcome is not None and req.outcome.value == "refused":
            self.refused.append((req.finish_time, req.request_id, req.reason))

    def __call__(self, now: float, out: SchedulerOutput, dt: float) -> None:
        tables, fill, refs = self._snapshot()
        rec = StepRecord(len(self.records) + 1, now, dt,
                         [(c.request.request_id, c.start, c.num_tokens, _kind(c)) for c in out.chunks])
        preempted = {r.request_id for r in out.preempted}
        rec.preempted = sorted(preempted, key=_rid_key)
        self._diff_frees(rec, tables, preempted)
        starts = {c.request.request_id: c.start for c in out.chunks}
        layout = self.scheduler.layout
        paged = isinstance(layout, PagedLayout)
        for rid, new in tables.items():
            old = self._prev.get(rid)
            if old is None:  # admitted this step: its first blocks may come from the prefix cache
                hits = starts.get(rid, 0) // layout.block_size if paged else 0
                shared, fresh = new[:hits], new[hits:]
            else:
                shared, fresh = [], [b for b in new if b not in old]
            if fresh:
                rec.allocated[rid] = fresh
            if shared:
                rec.shared[rid] = shared
        rec.copies = list(out.block_copies)
        rec.tables, rec.fill, rec.refcount = tables, fill, refs
        u = self.scheduler.kv_usage()
        rec.reserved_tokens, rec.stored_tokens, rec.capacity_tokens = u.reserved_tokens, u.stored_tokens, \
            u.capacity_tokens
        if not paged:  # slots count tokens once computed: include this step's
            in_step = {c.request.request_id: c.end for c in out.chunks}
            rec.stored_tokens = sum(in_step.get(r.request_id, r.num_computed_tokens) for r in self.scheduler.running)
        rec.running, rec.waiting = self.scheduler.num_running, self.scheduler.num_waiting
        self.records.append(rec)
        self._prev, self._prev_refs = tables, refs

    def _diff_frees(self, rec: StepRecord, tables: dict[str, list[int]], preempted: set[str]) -> None:
        """Blocks each request held at the last step and holds no more: freed, or (if shared) released."""
        for rid, old in self._prev.items():
            new = tables.get(rid, [])
            gone = [b for b in old if b not in new]
            if not gone:
                continue
            freed = [b for b in gone if self._prev_refs.get(b, 1) <= 1]
            kept = [b for b in gone if self._prev_refs.get(b, 1) > 1]
            if freed:
                rec.freed[rid] = freed
            if kept:
                rec.released[rid] = kept
            rec.freed_reason[rid] = "preempted" if rid in preempted else self._why(rid)

    def _why(self, rid: str) -> str:
        outcome = self._finished.get(rid, "completed")
        return "finished" if outcome == "completed" else outcome

    def finish(self, now: float) -> StepRecord | None:
        """A closing record for what the last step's update released (no batch)."""
        tables, fill, refs = self._snapshot()
        rec = StepRecord(len(self.records) + 1, now, 0.0, [])
        self._diff_frees(rec, tables, set())
        if not rec.freed and not rec.released:
            return None
        u = self.scheduler.kv_usage()
        rec.tables, rec.fill, rec.refcount = tables, fill, refs
        rec.reserved_tokens, rec.stored_tokens, rec.capacity_tokens = u.reserved_tokens, u.stored_tokens, \
            u.capacity_tokens
        self.records.append(rec)
        self._prev, self._prev_refs = tables, refs
        return rec


def _rid_key(rid: str):
    return (len(rid), rid)


def trace_cell(exp: Experiment, engine: str | None = None, load=None) -> tuple[list[StepRecord], object]:
    """Simulate one cell of exp (default: the first engine, the first load) and record every step.

    Returns (records, scheduler); requests refused at arrival are in scheduler.trace_refused as
    (time, request, reason). The cell runs through sim.lab.simulate.simulate_cell, so the workload
    (timeouts and concurrency caps included) is driven exactly as in `servesim run`.
    """
    eng = exp.engine(engine) if engine else exp.engines[0]
    w = exp.workload
    if load is None:
        load = w.loads[0]
    elif float(load).is_integer():  # --load 4: four clients, or 4 req/s
        load = int(load)
    cell = Cell(eng.name, **w.cell_fields(load))
    tracers = []
    facts = simulate_cell(exp, cell, CellAccumulator(eng.name, cell.concurrency, cell.request_rate),
                          sample_interval_s=1e9, on_scheduler=lambda s: tracers.append(StepTracer(s)),
                          on_step=lambda *step: tracers[0](*step),
                          on_request=lambda req: tracers[0].note_finished(req))
    tracer = tracers[0]
    sched = tracer.scheduler
    tracer.finish(facts["sim_time_s"])
    sched.trace_refused = tracer.refused
    return tracer.records, sched


# ---------------------------------------------------------------------------------------
# Text

def _blocks(bs: list[int]) -> str:
    return " ".join(str(b) for b in bs)


def format_step(rec: StepRecord, paged: bool = True) -> str:
    """A few lines for one step."""
    unit = "blocks" if paged else "slot"
    if rec.chunks:
        parts = []
        for rid, start, n, kind in rec.chunks:
            parts.append(f"{rid} decode@{start}" if kind == "decode" else f"{rid} {kind} {start}:{start + n}")
        ntok = sum(n for _, _, n, _ in rec.chunks)
        head = (f"step {rec.step:<3} t={rec.time_s * 1e3:9.2f} ms  (+{rec.dt_s * 1e3:.2f} ms)  batch: "
                f"{', '.join(parts)}  ({len(rec.chunks)} seqs, {ntok} tokens)")
    else:
        head = f"after step {rec.step - 1}: t={rec.time_s * 1e3:9.2f} ms  (the last step's requests leave)"
    lines = [head]
    for rid, bs in sorted(rec.allocated.items(), key=lambda kv: _rid_key(kv[0])):
        lines.append(f"  allocated  {rid}: {unit} {_blocks(bs)}")
    for rid, bs in sorted(rec.shared.items(), key=lambda kv: _rid_key(kv[0])):
        refs = ", ".join(f"{b}x{rec.refcount.get(b, 1)}" for b in bs)
        lines.append(f"  shared     {rid}: blocks {_blocks(bs)} (prefix cache; refcounts {refs})")
    for src, dst in rec.copies:
        lines.append(f"  copy       block {src} -> {dst} (copy-on-write)")
    for rid in sorted(set(rec.freed) | set(rec.released), key=_rid_key):
        why = rec.freed_reason.get(rid, "finished")
        gone, kept = rec.freed.get(rid, []), rec.released.get(rid, [])
        what = f"{unit} {_blocks(gone)}" if gone else ""
        if kept:
            what += (", and " if what else "") + f"its share of blocks {_blocks(kept)} (still held by others)"
        if why == "preempted":
            lines.append(f"  preempted  {rid}: frees {what}; recomputed later")
        else:
            lines.append(f"  freed      {rid}: {what} ({why})")
    if paged:
        used = len({b for t in rec.tables.values() for b in t})
        total = rec.capacity_tokens
        lines.append(f"  KV         {rec.reserved_tokens}/{total} token slots reserved ({used} blocks), "
                     f"{rec.stored_tokens} hold tokens; running {rec.running}, waiting {rec.waiting}")
    else:
        lines.append(f"  KV         {rec.reserved_tokens}/{rec.capacity_tokens} token slots reserved, "
                     f"{rec.stored_tokens} hold tokens; running {rec.running}, waiting {rec.waiting}")
    return "\n".join(lines)


def format_trace(records: list[StepRecord], scheduler, steps: int | None = None) -> str:
    """The first `steps` records as text, then the run's totals."""
    paged = isinstance(scheduler.layout, PagedLayout)
    shown = records if steps is None else records[:steps]
    out = [f"refused    {rid} at t={t * 1e3:.2f} ms: {why}" for t, rid, why in getattr(scheduler, "trace_refused", [])]
    out += [format_step(r, paged) for r in shown]
    if steps is not None and len(records) > steps:
        out.append(f"... {len(records) - steps} more steps (--steps to see them)")
    alloc = sum(len(b) for r in records for b in r.allocated.values())
    shared = sum(len(b) for r in records for b in r.shared.values())
    freed = sum(len(b) for r in records for b in r.freed.values())
    released = sum(len(b) for r in records for b in r.released.values())
    pre = sum(len(r.preempted) for r in records)
    cow = sum(len(r.copies) for r in records)
    unit = "blocks" if paged else "slot assignments"
    refused = len(getattr(scheduler, "trace_refused", []))
    out.append(f"totals: {sum(1 for r in records if r.chunks)} steps; {alloc} {unit} allocated, {shared} shared, "
               f"{freed} freed, {released} released while shared; {pre} preemptions; {cow} copy-on-write copies"
               + (f"; {refused} refused" if refused else ""))
    return "\n".join(out)


def describe_scenario(exp: Experiment, scheduler, engine: str) -> str:
    """One header paragraph: engine, pool, workload."""
    return f"{exp.name}: engine {engine} ({type(scheduler).__name__}), {scheduler.describe()}"


def with_overrides(exp: Experiment, overrides) -> Experiment:
    """exp with each "dotted.key=value" applied (value in TOML syntax: 8, true, "request")."""
    if not overrides:
        return exp
    doc = copy.deepcopy(exp.to_dict())
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError("--set", f"expected KEY=VALUE, got {item!r}", "e.g. engines.paged.block_size=8")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()  # a bare word: take it as a string
        node = doc
        parts = key.strip().split(".")
        for k in parts[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError("--set", f"{k!r} in {key!r} is not a table", "a dotted key of the config")
        node[parts[-1]] = value
    return parse_experiment(doc, base_dir=exp.base_dir, source=exp.source)
