"""`servesim run`: an experiment on the simulator, cell by cell, with results that survive interruption.

Per cell (engine variant x concurrency or rate): a fresh SimPy environment, `hardware.replicas`
replicas (each its engine kind's scheduler, timed by the cost model) behind a
router, and the workload as SimPy processes (closed-loop clients, or an open-loop arrival process).
With one replica and no client timeouts or think times a request needs no process or event of
its own: it is sent and recorded through Replica.submit's `then` (the same simulation).
Each finished request streams into DIR/requests.csv; the cell's summary goes to DIR/summary.json
and its time series to DIR/timeseries.csv as soon as the cell ends.

Which implementation of the scheduling policy runs (`implementation`):
- "teaching": the engine's own scheduler objects (reference.schedulers), exactly what the
  reference engine runs; every step costs per token and per sequence;
- "fast": their event-driven twins (sim.core.fast) for continuous batching and llama.cpp slots,
  decision-identical (tests/test_fastpath.py) and byte-identical in every results file, at a cost
  per event. Requests are then sim.core.fast.LazyRequest: prompt ids drawn only when read;
- "auto" (the default): fast where a twin exists (continuous, sequential) and no hook asks for
  the teaching scheduler's objects (on_step, on_scheduler: traces); teaching otherwise (static
  batching, Orca). `servesim run --teaching-path` forces the teaching path.

Prefix caching and the fast path. The fast pool tracks block by block only what another request
could hit; a block is private when its key chains through at least RANDOM_BITS bits of the
request's own random prompt tokens (the workload draws every token after the shared prefix
uniformly from [1, vocab_size)). Two such blocks coincide with probability <= 2^-128, below the
2^-64 chance the teaching block manager already accepts for a collision of its chained hashes.
"""
from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import simpy
from tqdm import tqdm

from reference.errors import ConfigError
from reference.request import Outcome, Request, SamplingParams
from sim.core.costmodel import CostModel
from sim.core.fast import LazyRequest, fast_twin
from sim.core.memory import MemoryPlan
from sim.core.replica import Cluster, Replica
from sim.lab.experiment import Cell, Experiment
from sim.lab.metrics import CellAccumulator, ResultsWriter
from sim.lab.series_csv import SeriesCsv
from sim.lab.workload import ClosedLoopWorkload, RequestSpec, to_request

IMPLEMENTATIONS = ("auto", "fast", "teaching")
GC_YOUNG_THRESHOLD = 100_000  # allocations between young-generation collections while a cell runs (CPython: 700)
SERIES_DRAIN_EVERY = 4096  # requests ended between moves of the time series out of the replicas (sim.lab.series_csv)
# Clients and open-loop arrivals without a SimPy process or event per request where possible; tests flip it.
DIRECT_CLIENTS = True
RANDOM_BITS = 128  # random bits a block's key must chain through to count as private (module docstring)


def simulate_cell(exp: Experiment, cell: Cell, acc: CellAccumulator, cost: CostModel | None = None,
                  plan: MemoryPlan | None = None, on_request: Callable[[Request], None] | None = None,
                  sample_interval_s: float = 0.1, on_step=None, on_scheduler: Callable | None = None,
                  implementation: str = "auto", series_to: Path | None = None) -> dict:
    """Run one cell to completion; finished requests go to acc. Returns simulation facts and time series.

    on_step(now, out, dt) sees every step; on_request(req) every request that ends;
    on_scheduler(scheduler) sees each replica's scheduler when it is built (a tracer keeps a handle on it).
    implementation: "auto", "fast" or "teaching" (module docstring); the results are the same.
    series_to: append the time series (a "cell" column first) to this CSV as run_experiment writes it, drained
    from the replicas as the cell runs so that memory stays flat (sim.lab.series_csv); facts["timeseries"] is
    then None. Without it, facts["timeseries"] is the DataFrame of all samples.
    """
    engine = exp.engine(cell.engine)
    plan = plan or exp.plan(engine)
    cost = cost or exp.cost_model_for(engine, plan)
    env = simpy.Environment()
    replicas = []
    for i in range(exp.hardware.replicas):
        scheduler = _scheduler(engine, plan, implementation, hooks=on_step is not None or on_scheduler is not None)
        if on_scheduler:
            on_scheduler(scheduler)
        replicas.append(Replica(env, f"r{i}", scheduler, cost.step_seconds, sample_interval_s=sample_interval_s,
                                on_step=on_step))
    cluster = Cluster(replicas, exp.hardware.router)
    workload = exp.workload.build(exp.seed, exp.model_spec.vocab_size, cell.load)
    timeout = workload.timeout_s
    fast = getattr(replicas[0].scheduler, "event_driven", False)
    make_request = _lazy_requests(exp.model_spec.vocab_size) if fast else to_request

    add = getattr(acc, "record", acc.add)  # CellAccumulator.record skips the row dict; a stand-in may only have add
    series_csv = SeriesCsv(replicas, cell.label) if series_to is not None else None
    ended = [0]

    def record(req: Request, client: int | None) -> None:
        add(req, client)
        if on_request:
            on_request(req)
        if series_csv is not None:
            ended[0] += 1
            if ended[0] % SERIES_DRAIN_EVERY == 0:
                series_csv.drain()

    def serve(req: Request, client: int | None):
        done = cluster.submit(req)
        if timeout > 0 and not done.triggered:
            yield done | env.timeout(timeout)
            if not done.triggered:
                cluster.abort(req, Outcome.TIMED_OUT, f"client timeout after {timeout} s")
        else:
            yield done
        record(req, client)

    def client(c: int):
        while (spec := workload.next_for_client(c)) is not None:
            yield from serve(make_request(spec, env.now), c)
            think = workload.think_time_s(c)
            if think > 0:
                yield env.timeout(think)

    def open_loop():
        cap = simpy.Resource(env, workload.max_concurrency) if workload.max_concurrency else None
        for spec in workload:
            if spec.arrival_time > env.now:
                yield env.timeout(spec.arrival_time - env.now)
            if cap is None and direct:
                # What a `serve` process started now would do. Nothing else is due at this instant before it
                # (the only URGENT events are processes starting at t = 0, all before this loop), so do it now.
                replicas[0].submit(make_request(spec, env.now), lambda r, c=spec.client_id: record(r, c))
            elif cap is None:
                env.process(serve(make_request(spec, env.now), spec.client_id))
            else:
                slot = cap.request()
                yield slot  # like vLLM's --max-concurrency: the client holds the request back
                env.process(_hold(cap, slot, serve(make_request(spec, env.now), spec.client_id)))

    def _hold(cap, slot, proc):
        yield from proc
        cap.release(slot)

    def start_client(c: int):
        """A client with nothing to wait for but its answers: each one sends the next request (Replica.submit's `then`)."""
        replica = replicas[0]

        def then(req: Request) -> None:
            record(req, c)
            spec = workload.next_for_client(c)  # think time 0: no pause, and no draw (ThinkTime.sample)
            if spec is not None:
                replica.submit(make_request(spec, env.now), then)
        spec = workload.next_for_client(c)
        if spec is not None:
            replica.submit(make_request(spec, env.now), then)
        yield from ()  # a process like `client`, so the first requests go out in the same order

    # Without timeouts, think times or routing a client only sends and records: no process or event per request.
    direct = DIRECT_CLIENTS and timeout <= 0 and len(replicas) == 1
    if isinstance(workload, ClosedLoopWorkload):
        direct = direct and workload.think_time.mean_s == 0
        for c in range(workload.num_clients):
            env.process(start_client(c) if direct else client(c))
    else:
        env.process(open_loop())
    try:
        with _rare_garbage_collection():
            env.run()
        if series_csv is not None:
            series = None
            series_csv.write(series_to)
            peak_kv_usage = series_csv.peak_kv_usage if series_csv.rows else 0.0
        else:
            series = pd.DataFrame([row for r in replicas for row in r.series.rows(r.name)])
            peak_kv_usage = float((series.kv_reserved_tokens / series.kv_capacity_tokens).max()) if len(series) else 0.0
    finally:
        if series_csv is not None:
            series_csv.close()
    return dict(
        sim_time_s=env.now, num_steps=sum(r.num_steps for r in replicas),
        busy_fraction=sum(r.busy_s for r in replicas) / (env.now * len(replicas)) if env.now else 0.0,
        preemptions=sum(r.scheduler.num_preemptions for r in replicas),
        peak_kv_usage=peak_kv_usage, memory=plan.to_dict(), timeseries=series)


@contextmanager
def _rare_garbage_collection():
    """Collect reference cycles rarely while a cell runs, and never rescan what existed before it.

    A simulation allocates millions of short-lived objects and makes next to no cycles, yet
    CPython's default thresholds run a collection every 700 net allocations and rescan the whole
    heap (experiment, modules, pandas) now and then: ~15 % of a large run's CPU, for nothing. The
    thresholds and the frozen objects are put back when the cell ends; results do not depend on it.
    """
    thresholds = gc.get_threshold()
    frozen_by_us = gc.get_freeze_count() == 0  # leave a caller's own freeze alone
    if frozen_by_us:
        gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, thresholds[1], thresholds[2])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        if frozen_by_us:
            gc.unfreeze()


def _scheduler(engine, plan: MemoryPlan, implementation: str, hooks: bool):
    """The replica's scheduler: the engine's teaching scheduler or its event-driven twin (module docstring)."""
    if implementation not in IMPLEMENTATIONS:
        raise ConfigError("implementation", f"unknown {implementation!r}", ", ".join(IMPLEMENTATIONS))
    scheduler = engine.build_scheduler(plan)
    if implementation == "teaching":
        return scheduler
    if hooks:
        if implementation == "fast":
            raise ConfigError("implementation", "a trace (on_step / on_scheduler) reads the teaching scheduler's "
                              "batches and block tables", "auto | teaching")
        return scheduler
    twin = fast_twin(scheduler)
    if twin is None and implementation == "fast":
        raise ConfigError("implementation", f"engines.{engine.name}: scheduler {engine.scheduler!r} has no fast path "
                          "(continuous with max_num_seqs <= max_num_batched_tokens, and sequential, have one)",
                          "auto | teaching")
    return twin or scheduler


def _lazy_requests(vocab_size: int) -> Callable[[RequestSpec, float], LazyRequest]:
    """make(spec, arrival_time) -> a LazyRequest with its unique_from (module docstring: RANDOM_BITS)."""
    bits = math.log2(vocab_size - 1) if vocab_size > 2 else 0.0
    need = math.ceil(RANDOM_BITS / bits) if bits > 0 else None  # random tokens that carry RANDOM_BITS

    sampling: dict[int, SamplingParams] = {}  # frozen, so requests with the same max_tokens share one

    def make(spec: RequestSpec, arrival_time: float) -> LazyRequest:
        prompt_len, prefix_len = spec.prompt_len, spec.prefix_len
        unique_from = None
        if need is not None and prompt_len - prefix_len >= need:
            unique_from = prefix_len + need - 1
        params = sampling.get(spec.max_tokens)
        if params is None:
            params = sampling[spec.max_tokens] = SamplingParams(max_tokens=int(spec.max_tokens), ignore_eos=True)
        head = spec.prefix_token_ids if prefix_len else ()
        return LazyRequest(spec.request_id, prompt_len, head, lambda: spec.prompt_token_ids, params,
                           float(arrival_time), unique_from)
    return make


def run_experiment(exp: Experiment, out_dir: str | Path, *, resume: bool = True, progress: bool = True,
                   echo: Callable[[str], None] = print, implementation: str = "auto") -> pd.DataFrame:
    """Simulate every cell not already in out_dir; returns the summary table of all cells.

    implementation: "auto", "fast" or "teaching" (module docstring); the files are the same.
    """
    out = Path(out_dir)
    writer = ResultsWriter(out, resume=resume)
    (out / "experiment.toml").write_text(exp.to_toml())
    series_path = out / "timeseries.csv"
    cells = [c for c in exp.cells() if not writer.is_done(c.engine, c.concurrency, c.request_rate)]
    keep_series_of_done_cells(series_path, {c.label for c in exp.cells()} - {c.label for c in cells})
    if len(cells) < len(exp.cells()):
        echo(f"resuming: {len(exp.cells()) - len(cells)} of {len(exp.cells())} cells already done in {out}")
    costs = {e.name: exp.cost_model_for(e) for e in exp.engines}
    for cell in tqdm(cells, desc=exp.name, unit="cell", disable=not progress):
        acc = writer.start_cell(cell.engine, cell.concurrency, cell.request_rate)
        wall = time.perf_counter()
        facts = simulate_cell(exp, cell, acc, costs[cell.engine], implementation=implementation, series_to=series_path)
        facts.pop("timeseries")
        writer.finish_cell(acc, slo=exp.slo, extra=dict(facts, cost_model=costs[cell.engine].describe()))
        if progress:
            tqdm.write(f"  {cell.label}: {len(acc)} requests, {facts['sim_time_s']:.1f} s simulated "
                       f"in {time.perf_counter() - wall:.1f} s")
    return pd.DataFrame(writer.summaries)


def keep_series_of_done_cells(path: Path, done: set[str]) -> None:
    """Drop time-series rows of cells that are not finished (a fresh run, or a cell cut off mid-run)."""
    if not path.exists():
        return
    series = pd.read_csv(path)
    kept = series[series["cell"].isin(done)] if "cell" in series.columns else series.iloc[0:0]
    if len(kept) == 0:
        path.unlink()
    elif len(kept) < len(series):
        kept.to_csv(path, index=False)
