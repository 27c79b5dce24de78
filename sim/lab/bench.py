"""`servesim bench`: an experiment on the JAX reference engine, with the simulator's workload and results schema.

The same request sequence (sim.lab.workload), the same engine kinds (each builds its own
scheduler and KV layout), the same per-request records and summaries (sim.lab.metrics) as
`servesim run`, so the two can be compared request by request. Each cell is preceded by a
warm-up on the same engine, and a step shape first met during the measured run is compiled
off the clock (sim.lab.timing), so that JIT compilation does not count as serving time; how
much was taken off is in the summary. With a cost model given, the engine instead runs on
that model's clock (steps take their predicted time): a deterministic check of the pipeline.
"""
from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path

import jax
import pandas as pd
from tqdm import tqdm

from reference.engine import ArrivalSource, Engine, ManualClock, StepRecord
from reference.model import init_params
from reference.errors import ConfigError
from reference.request import Request
from reference.runner import DTYPES, ModelRunner
from sim.core.costmodel import CostModel
from sim.lab.experiment import Cell, EngineConfig, Experiment
from sim.lab.metrics import ResultsWriter
from sim.lab.timing import BenchClock, ModelTimedRunner, TimedRunner, TimedScheduler
from sim.lab.workload import ClosedLoopWorkload, OpenLoopWorkload, to_request

WARMUP_REQUESTS_PER_CLIENT = 1
WARMUP_OPEN_LOOP_REQUESTS = 32


class ClosedLoopSource(ArrivalSource):
    """N clients: each sends its next request when the previous one ends, after its think time."""

    def __init__(self, workload: ClosedLoopWorkload, limit_per_client: int | None = None):
        self.workload = workload
        self.client: dict[int, int] = {}
        # Every client's requests are drawn before the run: drawing a prompt inside the engine's loop
        # would put the clients' work on the engine's clock (real clients are other processes).
        self.specs: list[deque] = []
        for c in range(workload.num_clients):
            specs = deque()
            while limit_per_client is None or len(specs) < limit_per_client:
                spec = workload.next_for_client(c)
                if spec is None:
                    break
                specs.append(spec)
            self.specs.append(specs)

    def _next(self, c: int, at: float) -> list[Request]:
        if not self.specs[c]:
            return []
        req = to_request(self.specs[c].popleft(), arrival_time=at)
        self.client[id(req)] = c
        return [req]

    def initial(self) -> Iterable[Request]:
        """Every client's first request, now."""
        return [r for c in range(self.workload.num_clients) for r in self._next(c, 0.0)]

    def after(self, req: Request, now: float) -> Iterable[Request]:
        """The same client's next request, after its think time."""
        c = self.client[id(req)]
        return self._next(c, now + self.workload.think_time_s(c))

    def client_of(self, req: Request) -> int:
        """Which client sent req."""
        return self.client[id(req)]


class OpenLoopSource(ArrivalSource):
    """Requests at their scheduled times; with max_concurrency, held back while that many are in flight."""

    def __init__(self, workload: OpenLoopWorkload, limit: int | None = None):
        specs = list(workload)[:limit]
        self.requests = [to_request(s, arrival_time=s.arrival_time) for s in specs]
        self.client = {id(r): s.client_id for r, s in zip(self.requests, specs)}
        self.cap = workload.max_concurrency
        self._next = 0

    def initial(self) -> Iterable[Request]:
        """All requests, or the first max_concurrency of them."""
        n = self.cap or len(self.requests)
        self._next = min(n, len(self.requests))
        return self.requests[:self._next]

    def after(self, req: Request, now: float) -> Iterable[Request]:
        """With a concurrency cap, the next held-back request goes out when one ends."""
        if not self.cap or self._next >= len(self.requests):
            return []
        nxt = self.requests[self._next]
        self._next += 1
        nxt.arrival_time = max(nxt.arrival_time, now)
        return [nxt]

    def client_of(self, req: Request) -> int | None:
        """The trace's client id, if any."""
        return self.client.get(id(req))


def _source(exp: Experiment, cell: Cell, warmup: bool):
    workload = exp.workload.build(exp.seed, exp.model_spec.vocab_size, cell.load)
    if isinstance(workload, ClosedLoopWorkload):
        return ClosedLoopSource(workload, WARMUP_REQUESTS_PER_CLIENT if warmup else None), workload.timeout_s
    return OpenLoopSource(workload, WARMUP_OPEN_LOOP_REQUESTS if warmup else None), workload.timeout_s


def make_runner(exp: Experiment, engine: EngineConfig, params=None, **runner_options) -> ModelRunner:
    """A ModelRunner for the experiment's model and dtype over the engine's KV layout on this machine.

    runner_options go to ModelRunner (min_seqs, min_tokens, min_blocks: larger buckets, fewer compilations).
    """
    layout = engine.layout(exp.plan(engine))
    return ModelRunner(exp.model_spec, params, layout=layout, seed=exp.seed, dtype=exp.dtype, sampling_seed=exp.seed,
                       **runner_options)


def step_row(record: StepRecord, schedule_s: float, execute_s: float, update_s: float) -> dict:
    """One row of steps.csv: when the step started (s), where its time went (s), its shape."""
    return dict(start_s=record.start_s, schedule_s=schedule_s, execute_s=execute_s, update_s=update_s,
                num_preempted=record.num_preempted, **{f: getattr(record.shape, f) for f in record.shape.__slots__})


def bench_cell(exp: Experiment, cell: Cell, on_finish, params=None, cost: CostModel | None = None
               ) -> tuple[dict, list[dict], float]:
    """Warm up, then run one cell on the real engine; on_finish(req, client) sees each request that ends.

    The runner compiles a step shape the first time it meets it (seconds on a CPU). The warm-up
    compiles the common shapes; a shape first met in the measured run is compiled off the clock
    (sim.lab.timing.TimedRunner). compilations_during_run and compile_s_excluded say how much
    that was. With cost given, steps take cost's predicted time on a manual clock instead.
    Returns (facts, step rows, duration on the engine's clock (s)).
    """
    engine_cfg = exp.engine(cell.engine)
    plan = exp.plan(engine_cfg)
    runner = make_runner(exp, engine_cfg, params)
    for warmup in (True, False):
        source, timeout = _source(exp, cell, warmup)
        if cost is None:
            clock = BenchClock()
            scheduler, timed = TimedScheduler(engine_cfg.build_scheduler(plan)), TimedRunner(runner, clock)
        else:
            clock = ManualClock()
            scheduler, timed = engine_cfg.build_scheduler(plan), ModelTimedRunner(runner, clock, cost)
        engine = Engine(scheduler, timed, clock)
        # Each step's record and timings are kept as they come, and made rows after the run: the
        # measuring must not weigh on the loop it measures (building a row costs about as much as the
        # host work of a small step).
        taken: list[tuple] = []
        engine.run(source, timeout, on_finish=None if warmup else (lambda r: on_finish(r, source.client_of(r))),
                   on_step=lambda rec: taken.append((rec, getattr(scheduler, "schedule_s", 0.0), timed.execute_s,
                                                     getattr(scheduler, "update_s", 0.0))))
        rows = [step_row(*t) for t in taken]
    busy = sum(r["schedule_s"] + r["execute_s"] + r["update_s"] for r in rows)
    facts = dict(
        num_steps=len(rows), memory=plan.to_dict(), compilations_during_run=timed.compilations,
        compile_s_excluded=getattr(clock, "excluded_s", 0.0),
        median_schedule_ms=1e3 * statistics.median(r["schedule_s"] for r in rows) if rows else 0.0,
        median_execute_ms=1e3 * statistics.median(r["execute_s"] for r in rows) if rows else 0.0,
        median_update_ms=1e3 * statistics.median(r["update_s"] for r in rows) if rows else 0.0,
        busy_fraction=busy / engine.now() if rows and engine.now() > 0 else 0.0,
        preemptions=scheduler.num_preemptions)
    return facts, rows, engine.now()


def run_bench(exp: Experiment, out_dir: str | Path, *, resume: bool = True, progress: bool = True,
              echo=print, clock: str = "wall") -> pd.DataFrame:
    """Run every cell not already in out_dir on the reference engine; returns the summary of all cells.

    clock: "wall" (measure this machine) or "model" (each step takes the experiment's cost model's
    prediction on a manual clock: deterministic, a check of the pipeline rather than of the cost model).
    """
    if clock not in ("wall", "model"):
        raise ConfigError("clock", f"unknown clock {clock!r}", "wall | model")
    out = Path(out_dir)
    writer = ResultsWriter(out, resume=resume)
    (out / "experiment.toml").write_text(exp.to_toml())
    params = init_params(exp.model_spec, exp.seed, DTYPES[exp.dtype])
    cells = [c for c in exp.cells() if not writer.is_done(c.engine, c.concurrency, c.request_rate)]
    if len(cells) < len(exp.cells()):
        echo(f"resuming: {len(exp.cells()) - len(cells)} of {len(exp.cells())} cells already done in {out}")
    steps_path = out / "steps.csv.gz"  # one row per engine step: compressed, appended per cell
    for cell in tqdm(cells, desc=exp.name, unit="cell", disable=not progress):
        acc = writer.start_cell(cell.engine, cell.concurrency, cell.request_rate, keep_token_times=True)
        wall = time.perf_counter()
        cost = exp.cost_model_for(exp.engine(cell.engine)) if clock == "model" else None
        facts, rows, _ = bench_cell(exp, cell, acc.add, params, cost)
        pd.DataFrame([dict(cell=cell.label, **r) for r in rows]).to_csv(
            steps_path, mode="a", header=not steps_path.exists(), index=False)
        writer.finish_cell(acc, slo=exp.slo, extra=dict(facts, device=str(jax.devices()[0]), jax=jax.__version__,
                                                        clock=clock))
        if progress:
            tqdm.write(f"  {cell.label}: {len(acc)} requests in {time.perf_counter() - wall:.1f} s")
    return pd.DataFrame(writer.summaries)
