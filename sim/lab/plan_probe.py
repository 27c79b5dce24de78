"""One planner probe: a candidate at one load and replica count, simulated, as plain data a worker returns.

A probe is a pure function of its experiments (one per replicate seed), so any executor (this
process, local processes, Ray; sim.lab.executors) gives the same ProbeOutcome. The outcome keeps
every request's TTFT, TPOT and E2E latency (ms; +inf for a request that failed: refused, timed out
or unfinished), so the driver can judge any SLO with its confidence bounds (sim.lab.slo_stats)
without simulating again.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from reference.request import Request
from sim.lab.experiment import Experiment
from sim.lab.metrics import CellAccumulator
from sim.lab.simulate import simulate_cell


@dataclass(frozen=True)
class ProbeOutcome:
    """What a probe measured, pooled over its replicates.

    ttft_ms / tpot_ms / e2el_ms: one value per request (ms), +inf for failed requests; TPOT of a
    one-token output is 0 (vLLM's goodput counts it as meeting any TPOT objective). output_tokens:
    tokens of completed requests; duration_s: simulated seconds from first arrival to last finish,
    summed over replicates (so output_tokens / duration_s is the mean output throughput, tok/s).
    wall_s: seconds the simulation took (varies with the machine; never written to results).
    """

    num_requests: int
    completed: int
    output_tokens: int
    duration_s: float
    ttft_ms: tuple[float, ...]
    tpot_ms: tuple[float, ...]
    e2el_ms: tuple[float, ...]
    cost_model: str
    wall_s: float = 0.0

    @property
    def failed(self) -> int:
        """Requests that did not complete."""
        return self.num_requests - self.completed

    @property
    def output_throughput(self) -> float:
        """Output tokens per simulated second (tok/s)."""
        return self.output_tokens / self.duration_s if self.duration_s > 0 else 0.0

    def latencies(self, metric: str) -> np.ndarray:
        """The metric's per-request values (ms) as an array: metric is ttft, tpot or e2el."""
        return np.asarray(getattr(self, f"{metric}_ms"), dtype=float)

    def to_dict(self) -> dict:
        """JSON-able (inf kept as a float; json writes Infinity)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict) -> ProbeOutcome:
        """The inverse of to_dict()."""
        return cls(**{k: (tuple(float(x) for x in v) if isinstance(v, list) else v) for k, v in d.items()})


class _Recorder:
    """Stands in for a CellAccumulator in simulate_cell: records each request there and keeps its latencies."""

    def __init__(self, acc: CellAccumulator):
        self.acc = acc
        self.rows: list[tuple[float, float, float]] = []

    def add(self, req: Request, client_id: int | None = None) -> dict:
        row = self.acc.add(req, client_id)
        if row["outcome"] == "completed":
            tpot = row["tpot_ms"]
            self.rows.append((row["ttft_ms"], 0.0 if math.isnan(tpot) else tpot, row["e2el_ms"]))
        else:
            self.rows.append((math.inf, math.inf, math.inf))
        return row


def run_probe(experiments: list[Experiment]) -> ProbeOutcome:
    """Simulate the one cell of each experiment (the replicates of one probe) and pool what they measured."""
    wall = time.perf_counter()
    rows, n, completed, out_tokens, duration = [], 0, 0, 0, 0.0
    described = ""
    for exp in experiments:
        cell = exp.cells()[0]
        engine = exp.engine(cell.engine)
        cost = exp.cost_model_for(engine)
        described = _describe(cost.describe())
        acc = CellAccumulator(cell.engine, cell.concurrency, cell.request_rate)
        rec = _Recorder(acc)
        simulate_cell(exp, cell, rec, cost)
        s = acc.summary()
        n += s["num_requests"]
        completed += s["completed"]
        out_tokens += s["total_output_tokens"]
        duration += 0.0 if math.isnan(s["duration"]) else s["duration"]
        rows.extend(rec.rows)
    cols = list(zip(*rows)) if rows else [(), (), ()]
    return ProbeOutcome(n, completed, out_tokens, duration, tuple(cols[0]), tuple(cols[1]), tuple(cols[2]),
                        described, time.perf_counter() - wall)


def _describe(d: dict) -> str:
    """'runtime llama.cpp' / 'roofline' / 'calibrated <profile>' from a cost model's describe()."""
    kind = d.get("kind", "?")
    if kind == "runtime":
        return f"runtime {d.get('runtime')}"
    return str(kind)
