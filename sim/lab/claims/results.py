"""Reading a claims run's results: summary rows, per-cell KV statistics, derived metrics.

Per-cell KV statistics are taken from timeseries.csv into DIR/cell_stats.json before that file is
thinned to at most TIMESERIES_ROWS_PER_CELL rows per cell (results stay small enough to commit).

Plain Python, no JAX.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from sim.lab.audit import mean_lengths
from sim.lab.claims.schema import ENGINE_LEVEL
from sim.lab.experiment import Experiment, SequentialEngine

TIMESERIES_ROWS_PER_CELL = 400


class Results:
    """One results directory of an experiment: summary rows and per-cell KV statistics."""

    def __init__(self, exp: Experiment, directory: str | Path):
        self.exp = exp
        self.dir = Path(directory)
        path = self.dir / "summary.json"
        if not path.exists():
            raise FileNotFoundError(str(path))
        self.summary = json.loads(path.read_text())
        stats_path = self.dir / "cell_stats.json"
        self.cell_stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}

    def rows(self, engine: str) -> list[dict]:
        return [s for s in self.summary if s.get("engine") == engine]

    def row(self, engine: str, concurrency: int | None = None, rate: float | None = None) -> dict:
        rows = self.rows(engine)
        if concurrency is not None:
            rows = [s for s in rows if s.get("concurrency") == concurrency]
        elif rate is not None:
            rows = [s for s in rows if _rate(s.get("request_rate")) == rate]
        if not rows:
            raise KeyError(f"no results for {engine} at concurrency={concurrency} rate={rate} in {self.dir}")
        return rows[0]

    def metric(self, metric: str, engine: str, concurrency: int | None = None, rate: float | None = None,
               tokens_per_request: int | None = None) -> float:
        """The simulated value of metric for engine in a cell (engine-level metrics ignore the cell)."""
        if metric == "capacity_rate":
            rows = self.rows(engine)
            if not rows:
                raise KeyError(f"no results for {engine} in {self.dir}")
            return max(_f(s.get("request_throughput")) for s in rows)
        if metric == "kv_utilization_pct":
            return self.kv_utilization(engine, concurrency, rate)
        if metric in ENGINE_LEVEL:
            return self._memory_metric(metric, engine, self.row(engine, concurrency, rate), tokens_per_request)
        s = self.row(engine, concurrency, rate)
        if metric == "success_rate_pct":
            return 100.0 * s["completed"] / s["num_requests"] if s.get("num_requests") else math.nan
        if metric == "queue_share_pct":
            q, e = _f(s.get("mean_queue_ms")), _f(s.get("mean_e2el_ms"))
            return 100.0 * q / e if e and math.isfinite(e) and e > 0 else math.nan
        if metric == "vram_in_use_gb":
            mem = s["memory"]
            st = self.cell_stats.get(s["cell"], {})
            peak = _f(st.get("peak_kv_reserved_tokens"))  # None (no busy sample: a run under 0.1 s) -> NaN
            return (mem["weights_bytes"] + peak * mem["kv_bytes_per_token"]) / 1e9
        return _f(s.get(metric))

    def _memory_metric(self, metric: str, engine: str, s: dict, tokens_per_request: int | None) -> float:
        mem = s["memory"]
        if metric == "vram_allocated_gb":
            return mem["total_bytes"] / 1e9
        if metric == "vram_model_kv_gb":
            return (mem["weights_bytes"] + mem["kv_bytes"]) / 1e9
        if metric == "weights_gb":
            return mem["weights_bytes"] / 1e9
        if metric == "kv_pool_gb":
            return mem["kv_bytes"] / 1e9
        if metric == "kv_capacity_tokens":
            return float(mem["kv_capacity_tokens"])
        if metric == "kv_kib_per_token":
            return mem["kv_bytes_per_token"] / 1024
        if metric == "max_concurrent":
            return float(max_concurrent(self.exp, engine, mem, tokens_per_request))
        raise KeyError(metric)

    def kv_utilization(self, engine: str, concurrency: int | None = None, rate: float | None = None) -> float:
        """Stored / reserved KV (%), time-averaged over busy samples; all the engine's cells when no cell is given."""
        if concurrency is not None or rate is not None:
            cells = [self.row(engine, concurrency, rate)["cell"]]
        else:
            cells = [s["cell"] for s in self.rows(engine)]
        stored = sum(self.cell_stats.get(c, {}).get("sum_stored", 0.0) for c in cells)
        reserved = sum(self.cell_stats.get(c, {}).get("sum_reserved", 0.0) for c in cells)
        return 100.0 * stored / reserved if reserved > 0 else math.nan

    def latency_curve(self, engine: str, metric: str = "mean_normalized_latency_s") -> tuple[list, list]:
        """(loads, values) of a metric over the engine's cells, in load order."""
        rows = sorted(self.rows(engine), key=lambda s: _load(s))
        return [_load(s) for s in rows], [_f(s.get(metric)) for s in rows]


def max_concurrent(exp: Experiment, engine: str, mem: dict, tokens_per_request: int | None = None) -> int:
    """Requests of tokens_per_request (default: the workload's mean prompt + output) that can run at once.

    Paged: the pool's blocks over blocks per request, capped by max_num_seqs (the engine runs no more
    sequences than that, whatever the memory: vLLM's --max-num-seqs). Static: the KV capacity over
    the max-length reservation, capped by max_batch_size. Ollama slots: how many slots of num_ctx fit
    beside the weights and activations (the num_parallel at which loading would run out of memory).
    """
    if tokens_per_request is None:
        p, o = mean_lengths(exp)
        tokens_per_request = round(p + o)
    eng = exp.engine(engine)
    fits = eng.max_concurrent(mem, tokens_per_request)
    return fits if isinstance(eng, SequentialEngine) else min(fits, eng.max_batch)


def _f(v) -> float:
    if v is None:
        return math.nan
    if isinstance(v, str):
        return float(v)
    return float(v)


def _rate(v):
    if v is None:
        return None
    return float(v)


def _load(s: dict):
    c = s.get("concurrency")
    if c is not None:
        return c
    return _rate(s.get("request_rate"))


# ---------------------------------------------------------------------------------------
# Per-cell KV statistics from the time series

def cell_stats_from_timeseries(directory: str | Path) -> dict:
    """{cell: {sum_stored, sum_reserved, peak_kv_reserved_tokens, samples}} over busy samples.

    Busy: a request running and KV reserved. The replica samples at most every 0.1 s of simulated
    time, so a cell shorter than that has no busy sample (its KV statistics are NaN).
    """
    path = Path(directory) / "timeseries.csv"
    if not path.exists():
        return {}
    ts = pd.read_csv(path)
    out = {}
    for cell, g in ts.groupby("cell", sort=False):
        busy = g[(g.kv_reserved_tokens > 0) & (g.running > 0)]
        out[str(cell)] = {"sum_stored": float(busy.kv_stored_tokens.sum()),
                          "sum_reserved": float(busy.kv_reserved_tokens.sum()),
                          "peak_kv_reserved_tokens": float(busy.kv_reserved_tokens.max()) if len(busy) else None,
                          "samples": int(len(g))}
    return out


def update_cell_stats(directory: str | Path, max_rows_per_cell: int = TIMESERIES_ROWS_PER_CELL) -> dict:
    """Add statistics for cells not yet in DIR/cell_stats.json, then thin timeseries.csv to max_rows_per_cell."""
    d = Path(directory)
    stats_path = d / "cell_stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    fresh = cell_stats_from_timeseries(d)
    changed = False
    for cell, st in fresh.items():
        if cell not in stats:
            stats[cell] = st
            changed = True
    if changed or not stats_path.exists():
        stats_path.write_text(json.dumps(stats, indent=1))
    path = d / "timeseries.csv"
    if path.exists():
        ts = pd.read_csv(path)
        parts = []
        for _, g in ts.groupby("cell", sort=False):
            if len(g) > max_rows_per_cell:
                idx = np.unique(np.linspace(0, len(g) - 1, max_rows_per_cell).round().astype(int))
                g = g.iloc[idx]
            parts.append(g)
        if parts and sum(len(p) for p in parts) < len(ts):
            pd.concat(parts).to_csv(path, index=False, float_format="%.6g")
    return stats


# ---------------------------------------------------------------------------------------
