"""`servesim trace`: what the real scheduler does to its KV memory, step by step, in causal order.

A SchedulerTracer attaches to the very scheduler object an engine kind builds (the one the
simulator and the JAX engine drive) and records every call that changes who holds which KV
memory, in the order the scheduler makes them:

    step 7   t=0.64 ms  (+0.11 ms)
      no room    r0: needs 1 more block, 0 free
      preempted  r3 (newest running): frees blocks 12 13 14; recomputed later
      allocated  r0: block 14
      allocated  r2: block 13 (evicts its cached content)
      batch      r0 decode@20, r1 decode@17, r2 decode@16  (3 seqs, 3 of 16 tokens)
      KV         56/60 token slots reserved (14 blocks), 48 hold tokens; running 3, waiting 3
      finished   r1 at t=0.74 ms: frees blocks 5 6 7 8 15

It observes without deciding anything: it wraps the instance's own methods (schedule, update,
add, abort and, for paged pools, the BlockManager's allocate_slots, free, reserve, fork,
can_allocate and cache_full_blocks), calls the original with the same arguments, returns its
result unchanged, and reads the objects' state around the call. So a trace can never disagree
with the code: it is the code's own sequence of calls.

Each StepRecord holds, in order: what happened since the previous step (arrivals, refusals,
client timeouts), the step's scheduling (preemptions and the frees they make before the
allocations they enable, admissions with their prefix-cache hits, copy-on-write copies), then
what the step's end did (requests that finished and the memory they gave back, blocks newly
registered in the prefix cache). Plus a snapshot of the state the step ran with: block tables,
every block's fill / refcount / cached flag, the waiting queue and the running batch.

Plain Python, no JAX. Text in sim.lab.trace_text, the browser page in sim.lab.trace_html.
"""
from __future__ import annotations

import copy
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from reference.batch import ScheduledChunk, SchedulerOutput
from reference.errors import ConfigError
from reference.layout import PagedLayout
from reference.request import Request
from sim.lab.experiment import Cell, Experiment, parse_experiment
from sim.lab.metrics import CellAccumulator
from sim.lab.simulate import simulate_cell

# Event kinds, in the words the text and the page use.
EVENT_KINDS = ("arrive", "refuse", "admit", "no_room", "preempt", "alloc", "reserve", "cow", "fork", "cached",
               "finish", "abort")
PHASES = ("before", "schedule", "after")  # since the last step / while scheduling / at the step's end


@dataclass(frozen=True)
class Event:
    """One change to the queue or the KV memory, as the scheduler made it.

    blocks: admit / alloc / reserve: blocks taken fresh from the free pool; preempt / finish /
      abort: blocks whose last reference went (back to the free pool); cached: blocks newly in
      the prefix cache; fork: the blocks the child now shares. Slot layouts: (slot,).
    shared: admit: prefix-cache hits; preempt / finish / abort: blocks this request let go
      of that others still hold. revived: admit: hits that were free (refcount 0) until now.
    evicted: fresh blocks whose cached content was dropped to reuse them.
    """

    kind: str
    request: str
    time_s: float
    phase: str
    blocks: tuple[int, ...] = ()
    shared: tuple[int, ...] = ()
    revived: tuple[int, ...] = ()
    evicted: tuple[int, ...] = ()
    copies: tuple[tuple[int, int], ...] = ()  # copy-on-write (src, dst)
    span: tuple[int, int] = (0, 0)  # admit / no_room: positions [start, end) the step was to compute
    detail: str = ""  # refuse / abort: the reason; no_room: what was missing; fork: the parent


@dataclass(frozen=True)
class BlockState:
    """A physical block at a snapshot: tokens it holds, references to it, and whether the prefix cache knows it."""

    fill: int
    refs: int
    cached: bool


@dataclass
class StepRecord:
    """One scheduler step (or a marked moment of a hand-driven scene): events in causal order and the state it ran with."""

    step: int
    time_s: float
    dt_s: float
    chunks: list[tuple[str, int, int, str]]  # (request, start, num_tokens, "prefill" | "decode" | "recompute")
    events: list[Event] = field(default_factory=list)
    tables: dict[str, list[int]] = field(default_factory=dict)  # request -> blocks (paged) or [slot]
    blocks: dict[int, BlockState] = field(default_factory=dict)  # paged: blocks held or cached
    waiting: list[str] = field(default_factory=list)  # the queue, head first
    running: list[str] = field(default_factory=list)  # holding KV, oldest first
    held_tokens: dict[str, int] = field(default_factory=dict)  # request -> KV positions it holds during the step
    reserved_tokens: int = 0
    stored_tokens: int = 0
    capacity_tokens: int = 0
    label: str = ""  # a hand-driven scene's caption

    def of_kind(self, *kinds: str) -> list[Event]:
        """This record's events of the given kinds, in order."""
        return [e for e in self.events if e.kind in kinds]

    @property
    def preempted(self) -> list[str]:
        """Requests preempted in this step, in order."""
        return [e.request for e in self.of_kind("preempt")]

    @property
    def copies(self) -> list[tuple[int, int]]:
        """Copy-on-write copies made in this step."""
        return [c for e in self.of_kind("cow") for c in e.copies]

    @property
    def refcount(self) -> dict[int, int]:
        """Block -> references, for blocks held."""
        return {b: s.refs for b, s in self.blocks.items() if s.refs}

    @property
    def fill(self) -> dict[int, int]:
        """Block -> tokens it holds, for blocks held."""
        return {b: s.fill for b, s in self.blocks.items() if s.refs}


def chunk_kind(chunk: ScheduledChunk) -> str:
    """prefill (no output yet), decode (the one token sampled last step), or recompute (after a preemption)."""
    req = chunk.request
    if req.num_output_tokens == 0:
        return "prefill"
    if chunk.num_tokens == 1 and chunk.end == req.num_tokens:
        return "decode"
    return "recompute"


def rid_key(rid: str):
    """Sort key putting r2 before r10."""
    return (len(rid), rid)


class SchedulerTracer:
    """Records a scheduler's calls in order (see the module docstring). Attach before the first add()."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.paged = isinstance(scheduler.layout, PagedLayout)
        self.bm = getattr(scheduler, "blocks", None) if self.paged else None
        self.records: list[StepRecord] = []
        self.requests: dict[str, Request] = {}  # every request seen, by id
        self._pending: list[Event] = []  # events that precede the next step
        self._current: StepRecord | None = None
        self._in_flight = False  # between a step's schedule and the end of its update
        self._phase = "idle"
        self._now = 0.0
        self._why_free = ""
        self._last_out: SchedulerOutput | None = None
        self._snap: StepRecord | None = None  # the last schedule's record, until on_step takes it
        self._schedule_events: list[Event] = []
        self._abort_detail = ""
        for name in ("add", "schedule", "update", "abort"):
            _wrap(scheduler, name, getattr(self, f"_on_{name}"))
        if self.bm is not None:
            for name in ("allocate_slots", "free", "reserve", "fork", "can_allocate", "cache_full_blocks"):
                _wrap(self.bm, name, getattr(self, f"_on_{name}"))

    # ---- the hook a driver calls ------------------------------------------------------------
    def on_step(self, now: float, out: SchedulerOutput, dt: float) -> None:
        """Replica on_step hook: the step scheduled last is about to run for dt seconds."""
        if out is not self._last_out or self._snap is None:
            return  # another replica's step
        rec = self._snap
        rec.step, rec.time_s, rec.dt_s = len(self.records) + 1, now, dt
        rec.events = self._pending + rec.events
        self._pending = []
        self.records.append(rec)
        self._current, self._in_flight, self._snap = rec, True, None

    def mark(self, now: float, label: str) -> StepRecord:
        """A record of the state now, without a step (a hand-driven scene's moment), holding the events so far."""
        self._flush_unstepped()
        rec = self._snapshot(SchedulerOutput(), now)
        rec.step, rec.label = len(self.records) + 1, label
        rec.events, self._pending = self._pending, []
        self.records.append(rec)
        return rec

    def close(self, now: float) -> None:
        """A last record for events after the last step (e.g. refusals), if any."""
        self._flush_unstepped()
        if self._pending:
            self.mark(now, "after the last step")

    # ---- recording ---------------------------------------------------------------------------
    def _flush_unstepped(self) -> None:
        """A schedule no step followed (idle, or a hand driver): its events precede whatever comes next."""
        if self._snap is not None:
            self._pending.extend(self._snap.events)
            self._snap = None

    def _emit(self, kind: str, rid: str, **fields) -> None:
        phase = "schedule" if self._phase == "schedule" else ("after" if self._in_flight else "before")
        ev = Event(kind, rid, self._now, phase, **fields)
        if phase == "schedule":
            self._schedule_events.append(ev)
        elif phase == "after" and self._current is not None:
            self._current.events.append(ev)
        else:
            self._pending.append(ev)

    def _snapshot(self, out: SchedulerOutput, now: float) -> StepRecord:
        s = self.scheduler
        chunks = [(c.request.request_id, c.start, c.num_tokens, chunk_kind(c)) for c in out.chunks]
        rec = StepRecord(0, now, 0.0, chunks, tables=s.kv_holdings())
        rec.waiting = [r.request_id for r in s.waiting]
        rec.running = [r.request_id for r in s.running]
        in_step = {c.request.request_id: c.end for c in out.chunks}
        holders = list(rec.tables)
        rec.held_tokens = {rid: in_step.get(rid, self.requests[rid].num_computed_tokens)
                           for rid in holders if rid in self.requests}
        if self.bm is not None:
            bm = self.bm
            rec.blocks = {b: BlockState(bm.fill[b], bm.ref_count[b], bm.block_key[b] is not None)
                          for b in range(1, bm.num_blocks) if bm.ref_count[b] or bm.block_key[b] is not None}
        u = s.kv_usage()
        rec.reserved_tokens, rec.capacity_tokens = u.reserved_tokens, u.capacity_tokens
        # Slot layouts count a token once computed; the trace counts this step's as held, like the paged pool.
        rec.stored_tokens = u.stored_tokens if self.paged else sum(rec.held_tokens.values())
        return rec

    # ---- scheduler methods ---------------------------------------------------------------------
    def _on_add(self, original, req: Request, now: float) -> bool:
        self.requests[req.request_id] = req
        self._now = now
        ok = original(req, now)
        if ok:
            self._emit("arrive", req.request_id)
        else:
            self._emit("refuse", req.request_id, detail=req.reason)
        return ok

    def _on_schedule(self, original, now: float) -> SchedulerOutput:
        self._flush_unstepped()
        self._now, self._phase, self._schedule_events = now, "schedule", []
        before = None if self.bm is not None else self.scheduler.kv_holdings()
        try:
            out = original(now)
        finally:
            self._phase = "idle"
        if before is not None:
            for rid, slots in self.scheduler.kv_holdings().items():
                if rid not in before:
                    c = next((c for c in out.chunks if c.request.request_id == rid), None)
                    self._schedule_events.append(Event("admit", rid, now, "schedule", tuple(slots),
                                                       span=(c.start, c.end) if c else (0, 0)))
        rec = self._snapshot(out, now)
        rec.events = self._schedule_events
        self._snap = rec  # on_step takes it; if no step follows, its events precede the next one
        self._last_out = out
        return out

    def _on_update(self, original, out: SchedulerOutput, tokens: list[int], now: float):
        self._flush_unstepped()
        self._now, self._phase, self._why_free = now, "update", "finish"
        before = None if self.bm is not None else self.scheduler.kv_holdings()
        try:
            finished = original(out, tokens, now)
        finally:
            self._phase, self._why_free = "idle", ""
        if before is not None:
            after = self.scheduler.kv_holdings()
            for rid in sorted(set(before) - set(after), key=rid_key):
                self._emit("finish", rid, blocks=tuple(before[rid]))
        self._in_flight = False
        return finished

    def _on_abort(self, original, req: Request, now: float, outcome, reason: str = ""):
        detail = f"{outcome.value}: {reason}" if reason else outcome.value
        self._now, self._why_free, self._abort_detail = now, "abort", detail
        held = req.request_id in self.scheduler.kv_holdings()
        before = None if self.bm is not None else self.scheduler.kv_holdings()
        try:
            original(req, now, outcome, reason)
        finally:
            self._why_free, self._abort_detail = "", ""
        if not held:
            self._emit("abort", req.request_id, detail=detail)
        elif before is not None:
            self._emit("abort", req.request_id, blocks=tuple(before[req.request_id]), detail=detail)
        # (paged: the free wrapper has emitted the abort with its blocks)

    # ---- block manager methods -----------------------------------------------------------------
    def _cached_now(self) -> set[int]:
        bm = self.bm
        return {b for b in bm.free_queue if bm.block_key[b] is not None} if bm.enable_prefix_caching else set()

    def _on_allocate_slots(self, original, seq_id, num_computed: int, num_new: int, computed_blocks=()):
        bm = self.bm
        old = list(bm.tables.get(seq_id, ()))
        is_new = seq_id not in bm.tables
        free_before = len(bm.free_queue)
        was_free = {b for b in computed_blocks if bm.ref_count[b] == 0}
        cached_free = self._cached_now()
        result = original(seq_id, num_computed, num_new, computed_blocks)
        end = num_computed + num_new
        if result is None:
            if is_new:
                need = bm.blocks_needed(end) - len(computed_blocks) + len(was_free)
            else:
                written = range(num_computed // bm.block_size, min(len(old), bm.blocks_needed(end)))
                need = max(0, bm.blocks_needed(end) - len(old)) + sum(1 for i in written if bm.ref_count[old[i]] > 1)
            self._emit("no_room", str(seq_id), span=(num_computed, end),
                       detail=f"needs {need} more block{'s' if need != 1 else ''}, {free_before} free")
            return result
        table = bm.tables[seq_id]
        copies = tuple(result)
        copied_to = {dst for _, dst in copies}
        fresh = tuple(b for b in table if b not in old and b not in computed_blocks and b not in copied_to)
        evicted = tuple(b for b in fresh + tuple(copied_to) if b in cached_free)
        if is_new:
            self._emit("admit", str(seq_id), blocks=fresh, shared=tuple(computed_blocks), revived=tuple(sorted(was_free)),
                       evicted=evicted, span=(num_computed, end))
        else:
            if copies:
                self._emit("cow", str(seq_id), copies=copies, span=(num_computed, end))
            if fresh:
                self._emit("alloc", str(seq_id), blocks=fresh, evicted=tuple(b for b in evicted if b in fresh),
                           span=(num_computed, end))
        return result

    def _on_reserve(self, original, seq_id, num_tokens: int):
        old = list(self.bm.tables[seq_id])
        cached_free = self._cached_now()
        original(seq_id, num_tokens)
        fresh = tuple(self.bm.tables[seq_id][len(old):])
        if fresh:
            self._emit("reserve", str(seq_id), blocks=fresh, evicted=tuple(b for b in fresh if b in cached_free),
                       span=(0, num_tokens))

    def _on_free(self, original, seq_id):
        bm = self.bm
        table = list(bm.tables.get(seq_id, ()))
        original(seq_id)
        gone = tuple(b for b in table if bm.ref_count[b] == 0)
        kept = tuple(b for b in table if bm.ref_count[b] > 0)
        if self._phase == "schedule":
            self._emit("preempt", str(seq_id), blocks=gone, shared=kept)
        elif self._why_free == "abort":
            self._emit("abort", str(seq_id), blocks=gone, shared=kept, detail=self._abort_detail)
        else:
            self._emit("finish", str(seq_id), blocks=gone, shared=kept)

    def _on_fork(self, original, parent_id, child_id):
        original(parent_id, child_id)
        self._emit("fork", str(child_id), blocks=tuple(self.bm.tables[child_id]), detail=str(parent_id))

    def _on_can_allocate(self, original, num_new_blocks: int) -> bool:
        ok = original(num_new_blocks)
        waiting = self.scheduler.waiting
        if not ok and self._phase == "schedule" and waiting:  # an admission that must hold its whole reservation
            self._emit("no_room", waiting[0].request_id,
                       detail=f"its reservation needs {num_new_blocks} more blocks, {len(self.bm.free_queue)} free")
        return ok

    def _on_cache_full_blocks(self, original, seq_id, num_computed: int, token_slice):
        bm = self.bm
        table = bm.tables.get(seq_id, [])
        before = {b for b in table if bm.block_key[b] is not None}
        original(seq_id, num_computed, token_slice)
        new = tuple(b for b in table if bm.block_key[b] is not None and b not in before)
        if new:
            self._emit("cached", str(seq_id), blocks=new)


def _wrap(obj, name: str, around: Callable) -> None:
    """obj.name(*args) now calls around(original, *args): an observer on this instance only."""
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        return around(original, *args, **kwargs)

    wrapper.__name__ = name
    wrapper.__doc__ = original.__doc__
    setattr(obj, name, wrapper)


# ---------------------------------------------------------------------------------------
# A cell of an experiment, traced


@dataclass
class Trace:
    """A traced cell: its records, the scheduler that made them, and the requests it saw."""

    experiment: Experiment
    engine: str
    records: list[StepRecord]
    scheduler: object
    requests: dict[str, Request]
    sim_time_s: float

    @property
    def paged(self) -> bool:
        """True for a paged KV pool (block tables), False for slots."""
        return isinstance(self.scheduler.layout, PagedLayout)

    @property
    def refused(self) -> list[Event]:
        """Requests turned away at arrival."""
        return [e for r in self.records for e in r.events if e.kind == "refuse"]

    @property
    def steps(self) -> list[StepRecord]:
        """Records of real steps (a final record of leftover events has no batch)."""
        return [r for r in self.records if r.chunks]

    def describe(self) -> str:
        """One header line: experiment, engine, scheduler, memory."""
        return f"{self.experiment.name}: engine {self.engine} ({type(self.scheduler).__name__}), " \
               f"{self.scheduler.describe()}"


def trace_cell(exp: Experiment, engine: str | None = None, load=None) -> Trace:
    """Simulate one cell of exp (default: the first engine at the first load) and record every step of replica 0.

    The cell runs through sim.lab.simulate.simulate_cell, so the workload (timeouts and
    concurrency caps included) is driven exactly as in `servesim run`.
    """
    eng = exp.engine(engine) if engine else exp.engines[0]
    w = exp.workload
    if load is None:
        load = w.loads[0]
    elif float(load).is_integer():  # --load 4: four clients, or 4 req/s
        load = int(load)
    cell = Cell(eng.name, **w.cell_fields(load))
    tracers: list[SchedulerTracer] = []

    def attach(scheduler) -> None:
        if not tracers:  # replica 0
            tracers.append(SchedulerTracer(scheduler))

    facts = simulate_cell(exp, cell, CellAccumulator(eng.name, cell.concurrency, cell.request_rate),
                          sample_interval_s=1e9, on_scheduler=attach,
                          on_step=lambda now, out, dt: tracers[0].on_step(now, out, dt))
    tracer = tracers[0]
    tracer.close(facts["sim_time_s"])
    return Trace(exp, eng.name, tracer.records, tracer.scheduler, tracer.requests, facts["sim_time_s"])


# ---------------------------------------------------------------------------------------
# --set KEY=VALUE


def with_overrides(exp: Experiment, overrides) -> Experiment:
    """exp with each "dotted.key=value" applied (value in TOML syntax: 8, true, "request").

    Overrides apply to the document as the user wrote it (the TOML file exp was loaded from),
    not to the resolved one: a resolved document carries every default of the engine's kind,
    so switching `engines.X.scheduler` to another kind would trip on keys only the old kind
    has. Without a file, the engines' explicitly set keys stand in for it.
    """
    if not overrides:
        return exp
    doc = _as_written(exp)
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


def _as_written(exp: Experiment) -> dict:
    if exp.source and Path(exp.source).is_file():
        with open(exp.source, "rb") as f:
            return tomllib.load(f)
    doc = copy.deepcopy(exp.to_dict())
    doc["engines"] = {e.name: {**e.model_dump(exclude_unset=True), "scheduler": e.scheduler} for e in exp.engines}
    return doc
