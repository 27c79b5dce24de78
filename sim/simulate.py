"""`servesim run`: an experiment on the simulator, cell by cell, with results that survive interruption.

Per cell (engine variant x concurrency or rate): a fresh SimPy environment, `hardware.replicas`
replicas (each the reference scheduler built by sim.engines, timed by the cost model) behind a
router, and the workload as SimPy processes (closed-loop clients, or an open-loop arrival process).
Each finished request streams into DIR/requests.csv; the cell's summary goes to DIR/summary.json
and its time series to DIR/timeseries.csv as soon as the cell ends.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import simpy

from reference.request import Outcome, Request
from sim.costmodel import CostModel, make_cost_model
from sim.engines import MemoryPlan, build_scheduler, plan_memory, runner_padding
from sim.experiment import Cell, EngineConfig, Experiment
from sim.hardware import Hardware, get_hardware
from sim.metrics import CellAccumulator, ResultsWriter
from sim.replica import Cluster, Replica
from sim.workload import ClosedLoopWorkload, build_workload, to_request


def hardware_of(exp: Experiment) -> Hardware | None:
    """The device the experiment simulates ([hardware] preset, else the cost model's), or None."""
    name = exp.hardware.preset or exp.cost_model.get("hardware")
    return get_hardware(name) if name else None


def cost_model_for(exp: Experiment, engine: EngineConfig) -> CostModel:
    """The engine's cost model: the [cost_model] table, with the engine's weights/KV dtype and [hardware] as defaults."""
    section = dict(exp.cost_model)
    if section.get("kind", "roofline") == "roofline" and "hardware" not in section:
        if exp.hardware.preset is None:
            from reference.errors import ConfigError
            raise ConfigError("hardware.preset", "a roofline cost model needs a device",
                              "a name from `servesim hardware`, or cost_model.kind = 'calibrated'")
        section["hardware"] = exp.hardware.preset
    return make_cost_model(section, exp.model_config, weight_format=engine.weights, kv_dtype=engine.kv_dtype,
                           tp=exp.hardware.tp, base_dir=exp.base_dir,
                           padding=runner_padding(engine, exp.model_config))


def simulate_cell(exp: Experiment, cell: Cell, acc: CellAccumulator, cost: Callable | None = None,
                  plan: MemoryPlan | None = None, on_request: Callable[[Request], None] | None = None,
                  sample_interval_s: float = 0.1, on_step=None,
                  make_scheduler: Callable = build_scheduler) -> dict:
    """Run one cell to completion; finished requests go to acc. Returns simulation facts and time series.

    on_step(now, out, dt) sees every step; on_request(req) every request that ends;
    make_scheduler(engine, plan) builds each replica's scheduler (a tracer can keep a handle on it).
    """
    engine = exp.engine(cell.engine)
    plan = plan or plan_memory(engine, exp.model_config, hardware_of(exp), exp.hardware.tp, exp.dtype)
    cost = cost or cost_model_for(exp, engine)
    env = simpy.Environment()
    replicas = [Replica(env, f"r{i}", make_scheduler(engine, plan), cost,
                        sample_interval_s=sample_interval_s, on_step=on_step)
                for i in range(exp.hardware.replicas)]
    cluster = Cluster(replicas, exp.hardware.router)
    workload = build_workload(exp, cell)
    timeout = workload.timeout_s

    def record(req: Request, client: int | None) -> None:
        acc.add(req, client)
        if on_request:
            on_request(req)

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
            yield from serve(to_request(spec, arrival_time=env.now), c)
            think = workload.think_time_s(c)
            if think > 0:
                yield env.timeout(think)

    def open_loop():
        cap = simpy.Resource(env, workload.max_concurrency) if workload.max_concurrency else None
        for spec in workload:
            if spec.arrival_time > env.now:
                yield env.timeout(spec.arrival_time - env.now)
            if cap is None:
                env.process(serve(to_request(spec, arrival_time=env.now), spec.client_id))
            else:
                slot = cap.request()
                yield slot  # like vLLM's --max-concurrency: the client holds the request back
                env.process(_hold(cap, slot, serve(to_request(spec, arrival_time=env.now), spec.client_id)))

    def _hold(cap, slot, proc):
        yield from proc
        cap.release(slot)

    if isinstance(workload, ClosedLoopWorkload):
        for c in range(workload.num_clients):
            env.process(client(c))
    else:
        env.process(open_loop())
    env.run()
    series = pd.DataFrame([row for r in replicas for row in r.series.rows(r.name)])
    return dict(
        sim_time_s=env.now, num_steps=sum(r.num_steps for r in replicas),
        busy_fraction=sum(r.busy_s for r in replicas) / (env.now * len(replicas)) if env.now else 0.0,
        preemptions=sum(r.scheduler.num_preemptions for r in replicas),
        peak_kv_usage=float((series.kv_reserved_tokens / series.kv_capacity_tokens).max()) if len(series) else 0.0,
        memory=plan.to_dict(), timeseries=series)


def run_experiment(exp: Experiment, out_dir: str | Path, *, resume: bool = True, progress: bool = True,
                   echo: Callable[[str], None] = print) -> pd.DataFrame:
    """Simulate every cell not already in out_dir; returns the summary table of all cells."""
    from tqdm import tqdm

    out = Path(out_dir)
    writer = ResultsWriter(out, resume=resume)
    (out / "experiment.toml").write_text(exp.to_toml())
    series_path = out / "timeseries.csv"
    cells = [c for c in exp.cells() if not writer.is_done(c.engine, c.concurrency, c.request_rate)]
    _keep_series_of_done_cells(series_path, {c.label for c in exp.cells()} - {c.label for c in cells})
    if len(cells) < len(exp.cells()):
        echo(f"resuming: {len(exp.cells()) - len(cells)} of {len(exp.cells())} cells already done in {out}")
    costs = {e.name: cost_model_for(exp, e) for e in exp.engines}
    for cell in tqdm(cells, desc=exp.name, unit="cell", disable=not progress):
        acc = writer.start_cell(cell.engine, cell.concurrency, cell.request_rate)
        wall = time.perf_counter()
        facts = simulate_cell(exp, cell, acc, costs[cell.engine])
        series = facts.pop("timeseries")
        if len(series):
            series.insert(0, "cell", cell.label)
            series.to_csv(series_path, mode="a", header=not series_path.exists(), index=False)
        writer.finish_cell(acc, slo=exp.slo, extra=dict(facts, cost_model=costs[cell.engine].describe()))
        if progress:
            tqdm.write(f"  {cell.label}: {len(acc)} requests, {facts['sim_time_s']:.1f} s simulated "
                       f"in {time.perf_counter() - wall:.1f} s")
    return pd.DataFrame(writer.summaries)


def _keep_series_of_done_cells(path: Path, done: set[str]) -> None:
    """Drop time-series rows of cells that are not finished (a fresh run, or a cell cut off mid-run)."""
    if not path.exists():
        return
    series = pd.read_csv(path)
    kept = series[series["cell"].isin(done)] if "cell" in series.columns else series.iloc[0:0]
    if len(kept) == 0:
        path.unlink()
    elif len(kept) < len(series):
        kept.to_csv(path, index=False)
