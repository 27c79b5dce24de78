"""`servesim bench`: an experiment on the JAX reference engine, with the simulator's workload and results schema.

The same request sequence (sim.workload), the same scheduler construction (sim.engines), the
same per-request records and summaries (sim.metrics) as `servesim run`, so the two can be
compared request by request. Each cell is preceded by a warm-up on the same engine, and a step
shape first compiled during the measured run is taken off the clock (bench_cell), so that JIT
compilation does not count as serving time; how much was taken off is in the summary.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from reference.engine import ArrivalSource, Engine
from reference.request import Request
from sim.engines import build_scheduler, plan_memory
from sim.experiment import Cell, Experiment
from sim.metrics import ResultsWriter
from sim.workload import ClosedLoopWorkload, OpenLoopWorkload, build_workload, to_request

WARMUP_REQUESTS_PER_CLIENT = 1
WARMUP_OPEN_LOOP_REQUESTS = 32


class ClosedLoopSource(ArrivalSource):
    """N clients: each sends its next request when the previous one ends, after its think time."""

    def __init__(self, workload: ClosedLoopWorkload, limit_per_client: int | None = None):
        self.workload = workload
        self.client: dict[int, int] = {}
        self.sent = [0] * workload.num_clients
        self.limit = limit_per_client

    def _next(self, c: int, at: float) -> list[Request]:
        if self.limit is not None and self.sent[c] >= self.limit:
            return []
        spec = self.workload.next_for_client(c)
        if spec is None:
            return []
        self.sent[c] += 1
        req = to_request(spec, arrival_time=at)
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
    workload = build_workload(exp, cell)
    if isinstance(workload, ClosedLoopWorkload):
        return ClosedLoopSource(workload, WARMUP_REQUESTS_PER_CLIENT if warmup else None), workload.timeout_s
    return OpenLoopSource(workload, WARMUP_OPEN_LOOP_REQUESTS if warmup else None), workload.timeout_s


def make_runner(exp: Experiment, layout, params=None, **runner_options):
    """A ModelRunner for the experiment's model and dtype over a scheduler's KV layout.

    runner_options go to ModelRunner (min_seqs, min_tokens, min_blocks: larger buckets, fewer compilations).
    """
    from reference import kv_cache
    from reference.runner import ModelRunner
    from reference.schedulers import PagedLayout

    if isinstance(layout, PagedLayout):
        kv = kv_cache.PagedLayout(layout.num_blocks, layout.block_size)
    else:
        kv = kv_cache.ContiguousLayout(layout.num_slots, layout.max_len)
    return ModelRunner(exp.model_config, params, layout=kv, seed=exp.seed, dtype=exp.dtype, sampling_seed=exp.seed,
                       **runner_options)


def bench_cell(exp: Experiment, cell: Cell, on_finish, params=None) -> tuple[dict, Engine]:
    """Warm up, then run one cell on the real engine; on_finish(req, client) sees each request that ends.

    The runner compiles a step shape the first time it meets it (seconds on a CPU). The warm-up
    compiles the common shapes; a shape first met in the measured run is taken off the clock
    (Engine exclude_compilation), so the cell measures an engine that compiled everything at
    start-up, as production engines do. compilations_during_run and compile_s_excluded say how
    much that was.
    """
    engine_cfg = exp.engine(cell.engine)
    plan = plan_memory(engine_cfg, exp.model_config, None, 1, exp.dtype)
    runner = None
    for warmup in (True, False):
        scheduler = build_scheduler(engine_cfg, plan)
        runner = runner or make_runner(exp, scheduler.layout, params)
        source, timeout = _source(exp, cell, warmup)
        engine = Engine(scheduler, runner, exclude_compilation=True)
        compiled = runner.num_compilations
        engine.run(source, timeout, on_finish=None if warmup else (lambda r: on_finish(r, source.client_of(r))))
    steps = engine.steps
    facts = dict(
        num_steps=len(steps), memory=plan.to_dict(),
        compilations_during_run=runner.num_compilations - compiled, compile_s_excluded=engine.compile_s,
        median_schedule_ms=1e3 * statistics.median(s.schedule_s for s in steps) if steps else 0.0,
        median_execute_ms=1e3 * statistics.median(s.execute_s for s in steps) if steps else 0.0,
        median_update_ms=1e3 * statistics.median(s.update_s for s in steps) if steps else 0.0,
        busy_fraction=sum(s.total_s for s in steps) / engine.now() if steps else 0.0,
        preemptions=engine.scheduler.num_preemptions)
    return facts, engine


def run_bench(exp: Experiment, out_dir: str | Path, *, resume: bool = True, progress: bool = True,
              echo=print) -> pd.DataFrame:
    """Run every cell not already in out_dir on the reference engine; returns the summary of all cells."""
    import jax
    from tqdm import tqdm

    from reference.model import init_params
    from reference.runner import DTYPES

    out = Path(out_dir)
    writer = ResultsWriter(out, resume=resume)
    (out / "experiment.toml").write_text(exp.to_toml())
    params = init_params(exp.model_config, exp.seed, DTYPES[exp.dtype])
    cells = [c for c in exp.cells() if not writer.is_done(c.engine, c.concurrency, c.request_rate)]
    if len(cells) < len(exp.cells()):
        echo(f"resuming: {len(exp.cells()) - len(cells)} of {len(exp.cells())} cells already done in {out}")
    steps_path = out / "steps.csv.gz"  # one row per engine step: compressed, appended per cell
    for cell in tqdm(cells, desc=exp.name, unit="cell", disable=not progress):
        acc = writer.start_cell(cell.engine, cell.concurrency, cell.request_rate, keep_token_times=True)
        wall = time.perf_counter()
        facts, engine = bench_cell(exp, cell, acc.add, params)
        pd.DataFrame([dict(cell=cell.label, **vars(s)) for s in engine.steps]).to_csv(
            steps_path, mode="a", header=not steps_path.exists(), index=False)
        writer.finish_cell(acc, slo=exp.slo, extra=dict(facts, device=str(jax.devices()[0]), jax=jax.__version__))
        if progress:
            tqdm.write(f"  {cell.label}: {len(acc)} requests in {time.perf_counter() - wall:.1f} s")
    return pd.DataFrame(writer.summaries)
