"""Reproduce published figures: run a claims config and set each figure beside its simulation.

A claims config is an ordinary experiment TOML whose `[published]` table says what it targets:

    [published]
    source = "Ollama vs vLLM (GPU-cloud vendor blog, March 2026)"   # default source of every figure
    notes = "..."                                                    # the group's assumptions

    [[published.figures]]
    id = "A.2"                       # unique within the file
    claim = "single-user throughput" # as the source words it
    metric = "output_throughput"     # a summary.json metric or one of DERIVED_METRICS
    engine = "vllm"                  # an engine of this config
    concurrency = 1                  # the cell (closed loop); or rate = 2.0 (open loop)
    value = 510.0                    # or [lo, hi] for a published range
    unit = "tok/s"
    op = "~"                         # ~ (within 25%), or <, <=, >, >= for qualitative claims
    ratio_to = "orca_max"            # optional: simulated = metric(engine) / metric(ratio_to)
    notes = "why it differs, if it does"

    [[published.sweeps]]             # optional: vary one assumption and re-check some figures
    id = "A.s1"
    title = "Ollama OLLAMA_NUM_PARALLEL"
    param = "engines.ollama.num_parallel"  # a dotted key of the experiment document
    values = [1, 2, 4, 8]
    engines = ["ollama"]             # optional subset of engines to run
    loads = [1, 8, 32]               # optional subset of clients / rates
    figures = ["A.1", "A.3"]         # figures re-evaluated at every value
    notes = "..."

Verdicts: "physically implausible" when the published figure lies beyond the roofline bound of
sim.lab.audit (whatever the simulation says), else "reproduced" when the simulated figure is within
25% of the published one (inside the range widened by 25%, or satisfying op), else "differs".

`run_claims(config, DIR)` runs the experiment (sim.lab.simulate.run_experiment), every sweep value
under DIR/sweeps/<id>/<value>/, and writes DIR/claims.csv, DIR/sweeps.csv and DIR/audit.txt.
Per-cell KV statistics are taken from timeseries.csv into DIR/cell_stats.json before that file
is thinned to at most TIMESERIES_ROWS_PER_CELL rows per cell (results stay small enough to commit).

Plain Python, no JAX.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from reference.errors import ConfigError
from sim.lab.audit import Bound, audit_experiment, bound_for, fmt_num, format_audit, in_unit, mean_lengths
from sim.lab.experiment import Experiment, load_experiment, parse_experiment
from sim.lab.simulate import run_experiment

TOLERANCE = 0.25
VERDICTS = ("reproduced", "differs", "physically implausible")
OPS = ("~", "<", "<=", ">", ">=")
TIMESERIES_ROWS_PER_CELL = 400

#: Metrics computed here (beyond summary.json's); "engine-level" ones do not depend on the cell.
DERIVED_METRICS = {
    "success_rate_pct": "completed / requests x 100 (cell)",
    "queue_share_pct": "mean queue time / mean E2E latency x 100 (cell)",
    "vram_allocated_gb": "weights + activation peak + KV as allocated, GB (what nvidia-smi shows; engine-level)",
    "vram_model_kv_gb": "weights + KV as allocated, GB (engine-level)",
    "vram_in_use_gb": "weights + the peak KV reserved by live requests in the cell, GB",
    "weights_gb": "weight bytes, GB (engine-level)",
    "kv_pool_gb": "KV bytes allocated, GB (engine-level)",
    "kv_capacity_tokens": "tokens the KV allocation holds (engine-level)",
    "kv_kib_per_token": "K and V bytes of one token, KiB (engine-level)",
    "max_concurrent": "requests of the workload's mean length whose KV fits beside the weights (engine-level; "
                      "Ollama: slots of num_ctx)",
    "kv_utilization_pct": "tokens stored / KV slots reserved, time-averaged x 100 (cell; all cells if none given)",
    "capacity_rate": "the most completed requests per second in any swept cell: the engine's saturated throughput, "
                     "so the highest Poisson rate it sustains with bounded latency (engine-level; the sweep's top "
                     "rate must overload it)",
}
ENGINE_LEVEL = {"vram_allocated_gb", "vram_model_kv_gb", "weights_gb", "kv_pool_gb", "kv_capacity_tokens",
                "kv_kib_per_token", "max_concurrent", "capacity_rate"}


# ---------------------------------------------------------------------------------------
# The [published] table

@dataclass(frozen=True)
class Figure:
    """One published figure and where in the experiment it is measured."""

    id: str
    claim: str
    metric: str
    engine: str
    value: float | tuple[float, float]
    unit: str = ""
    source: str = ""
    concurrency: int | None = None
    rate: float | None = None
    op: str = "~"
    ratio_to: str | None = None
    notes: str = ""
    tokens_per_request: int | None = None
    audit: bool = True

    @property
    def is_range(self) -> bool:
        return isinstance(self.value, tuple)

    @property
    def point_value(self) -> float:
        """The published value (midpoint of a range)."""
        return (self.value[0] + self.value[1]) / 2 if self.is_range else self.value

    @property
    def cell_label(self) -> str:
        """'vllm@c=32', 'vllm/orca_max@rate=2', 'vllm' (engine-level)."""
        eng = f"{self.engine}/{self.ratio_to}" if self.ratio_to else self.engine
        if self.concurrency is not None:
            return f"{eng}@c={self.concurrency}"
        if self.rate is not None:
            return f"{eng}@rate={self.rate:g}"
        return eng

    @property
    def published_text(self) -> str:
        """'510', '1.7-2.7', '>= 96'."""
        v = f"{fmt_num(self.value[0])}-{fmt_num(self.value[1])}" if self.is_range else fmt_num(self.value)
        return v if self.op == "~" else f"{self.op} {v}"


@dataclass(frozen=True)
class Sweep:
    """One assumption varied over values, with the figures it might explain re-evaluated at each."""

    id: str
    title: str
    param: str
    values: tuple
    figures: tuple[str, ...]
    engines: tuple[str, ...] | None = None
    loads: tuple | None = None
    notes: str = ""

    def dir_name(self, value) -> str:
        return f"{self.param.rsplit('.', 1)[-1]}={value:g}" if isinstance(value, (int, float)) and not \
            isinstance(value, bool) else f"{self.param.rsplit('.', 1)[-1]}={value}"


@dataclass(frozen=True)
class Claims:
    """A config's [published] table, validated."""

    source: str = ""
    notes: str = ""
    figures: tuple[Figure, ...] = ()
    sweeps: tuple[Sweep, ...] = ()

    def figure(self, fid: str) -> Figure:
        for f in self.figures:
            if f.id == fid:
                return f
        raise KeyError(fid)


_FIGURE_KEYS = ("id", "claim", "metric", "engine", "value", "unit", "source", "concurrency", "rate", "op",
                "ratio_to", "notes", "tokens_per_request", "audit")
_SWEEP_KEYS = ("id", "title", "param", "values", "figures", "engines", "loads", "notes")
_PUBLISHED_KEYS = ("source", "notes", "figures", "sweeps")


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _keys(table, path: str, allowed) -> dict:
    if not isinstance(table, dict):
        raise ConfigError(path, f"must be a table, got {table!r}", ", ".join(allowed))
    for k in table:
        if k not in allowed:
            raise ConfigError(f"{path}.{k}", "unknown key", ", ".join(allowed))
    return table


def _str(table: dict, key: str, path: str, required: bool = False, default: str = "") -> str:
    if key not in table:
        if required:
            raise ConfigError(f"{path}.{key}", "required", "a string")
        return default
    v = table[key]
    if not isinstance(v, str) or (required and not v.strip()):
        raise ConfigError(f"{path}.{key}", f"must be a non-empty string, got {v!r}", "a string")
    return v


def parse_claims(exp: Experiment) -> Claims:
    """The experiment's [published] table as Claims; ConfigError naming the key path when malformed."""
    pub = _keys(exp.published, "published", _PUBLISHED_KEYS)
    if not pub:
        return Claims()
    source = _str(pub, "source", "published")
    notes = _str(pub, "notes", "published")
    metrics_ok = set(DERIVED_METRICS)
    figures = []
    seen = set()
    raw = pub.get("figures", [])
    if not isinstance(raw, list):
        raise ConfigError("published.figures", "must be an array of tables", "[[published.figures]] tables")
    engines = set(exp.engine_names)
    loads = set(exp.workload.loads)
    for i, t in enumerate(raw):
        p = f"published.figures[{i}]"
        _keys(t, p, _FIGURE_KEYS)
        fid = _str(t, "id", p, required=True)
        if fid in seen:
            raise ConfigError(f"{p}.id", f"duplicate id {fid!r}", "distinct ids")
        seen.add(fid)
        metric = _str(t, "metric", p, required=True)
        if metric not in metrics_ok and not _looks_like_summary_metric(metric):
            raise ConfigError(f"{p}.metric", f"unknown metric {metric!r}",
                              "a summary.json metric (output_throughput, mean_ttft_ms, ...) or "
                              + ", ".join(DERIVED_METRICS))
        engine = _str(t, "engine", p, required=True)
        for key, name in (("engine", engine), ("ratio_to", t.get("ratio_to"))):
            if name is not None and name not in engines:
                raise ConfigError(f"{p}.{key}", f"no engine {name!r} in this config", ", ".join(sorted(engines)))
        if "value" not in t:
            raise ConfigError(f"{p}.value", "required", "a number or [lo, hi]")
        value = t["value"]
        if isinstance(value, list):
            if len(value) != 2 or not all(_is_num(x) for x in value) or value[0] > value[1]:
                raise ConfigError(f"{p}.value", f"a range must be [lo, hi] with lo <= hi, got {value!r}", "[lo, hi]")
            value = (float(value[0]), float(value[1]))
        elif _is_num(value):
            value = float(value)
        else:
            raise ConfigError(f"{p}.value", f"must be a number or [lo, hi], got {value!r}", "a number or [lo, hi]")
        op = t.get("op", "~")
        if op not in OPS:
            raise ConfigError(f"{p}.op", f"unknown op {op!r}", " ".join(OPS))
        if op != "~" and isinstance(value, tuple):
            raise ConfigError(f"{p}.op", "a range takes op = '~'", "~")
        conc, rate = t.get("concurrency"), t.get("rate")
        if conc is not None and rate is not None:
            raise ConfigError(f"{p}.rate", "give concurrency or rate, not both", "one of them")
        if conc is not None:
            if not exp.workload.is_closed_loop or conc not in loads:
                raise ConfigError(f"{p}.concurrency", f"{conc!r} is not a cell of this workload",
                                  ", ".join(map(str, exp.workload.loads)))
        if rate is not None:
            rate = float(rate) if not isinstance(rate, str) else float(rate)
            if exp.workload.is_closed_loop or rate not in loads:
                raise ConfigError(f"{p}.rate", f"{rate!r} is not a cell of this workload",
                                  ", ".join(map(str, exp.workload.loads)))
        if metric not in ENGINE_LEVEL and metric != "kv_utilization_pct" and conc is None and rate is None \
                and len(loads) > 1:
            raise ConfigError(f"{p}.concurrency", f"metric {metric!r} is measured per cell: say which",
                              "concurrency = N or rate = R")
        tpr = t.get("tokens_per_request")
        if tpr is not None and (not isinstance(tpr, int) or isinstance(tpr, bool) or tpr < 1):
            raise ConfigError(f"{p}.tokens_per_request", f"must be an integer >= 1, got {tpr!r}", "integers >= 1")
        aud = t.get("audit", True)
        if not isinstance(aud, bool):
            raise ConfigError(f"{p}.audit", f"must be true or false, got {aud!r}", "true | false")
        figures.append(Figure(fid, _str(t, "claim", p, required=True), metric, engine, value,
                              _str(t, "unit", p), _str(t, "source", p, default=source), conc, rate, op,
                              t.get("ratio_to"), _str(t, "notes", p), tpr, aud))
    sweeps = []
    raw = pub.get("sweeps", [])
    if not isinstance(raw, list):
        raise ConfigError("published.sweeps", "must be an array of tables", "[[published.sweeps]] tables")
    for i, t in enumerate(raw):
        p = f"published.sweeps[{i}]"
        _keys(t, p, _SWEEP_KEYS)
        sid = _str(t, "id", p, required=True)
        if sid in seen:
            raise ConfigError(f"{p}.id", f"duplicate id {sid!r}", "distinct ids")
        seen.add(sid)
        param = _str(t, "param", p, required=True)
        vals = t.get("values")
        if not isinstance(vals, list) or not vals:
            raise ConfigError(f"{p}.values", "must be a non-empty array", "[v1, v2, ...]")
        figs = t.get("figures", [])
        if not isinstance(figs, list) or not all(isinstance(x, str) for x in figs):
            raise ConfigError(f"{p}.figures", "must be an array of figure ids", "[\"A.1\", ...]")
        for x in figs:
            if x not in {f.id for f in figures}:
                raise ConfigError(f"{p}.figures", f"no figure {x!r}", ", ".join(f.id for f in figures))
        sub_engines = t.get("engines")
        if sub_engines is not None:
            if not isinstance(sub_engines, list) or not set(sub_engines) <= engines:
                raise ConfigError(f"{p}.engines", f"must list engines of this config, got {sub_engines!r}",
                                  ", ".join(sorted(engines)))
            for x in figs:
                f = next(f for f in figures if f.id == x)
                for e in (f.engine, f.ratio_to):
                    if e is not None and e not in sub_engines:
                        raise ConfigError(f"{p}.engines", f"figure {x} needs engine {e!r}", ", ".join(sub_engines))
            sub_engines = tuple(sub_engines)
        sub_loads = t.get("loads")
        if sub_loads is not None:
            if not isinstance(sub_loads, list) or not sub_loads:
                raise ConfigError(f"{p}.loads", "must be a non-empty array", "clients or rates")
            sub_loads = tuple(sub_loads)
        sweep = Sweep(sid, _str(t, "title", p, required=True), param, tuple(vals), tuple(figs), sub_engines,
                      sub_loads, _str(t, "notes", p))
        for v in sweep.values:  # every value must give a valid experiment
            sweep_experiment(exp, sweep, v)
        sweeps.append(sweep)
    return Claims(source, notes, tuple(figures), tuple(sweeps))


def _looks_like_summary_metric(name: str) -> bool:
    base = ("num_requests", "completed", "failed", "refused", "timed_out", "duration", "request_throughput",
            "output_throughput", "total_token_throughput", "request_goodput", "mean_queue_ms",
            "mean_normalized_latency_s", "mean_preemptions", "prefix_cache_hit_rate", "peak_kv_usage",
            "busy_fraction", "preemptions", "max_itl_ms")
    if name in base:
        return True
    for stat in ("mean", "median", "p90", "p95", "p99"):
        for m in ("ttft", "tpot", "itl", "e2el"):
            if name == f"{stat}_{m}_ms":
                return True
    return False


def sweep_experiment(exp: Experiment, sweep: Sweep, value) -> Experiment:
    """exp with sweep.param set to value, restricted to the sweep's engines and loads."""
    doc = copy.deepcopy(exp.to_dict())
    doc.pop("published", None)
    if sweep.engines is not None:
        doc["engines"] = {k: v for k, v in doc["engines"].items() if k in sweep.engines}
    if sweep.loads is not None:
        key = exp.workload.LOAD_KEY
        if key is None:
            raise ConfigError(f"published.sweeps.{sweep.id}.loads", "a trace has one cell", "no loads")
        doc["workload"][key] = list(sweep.loads)
    node = doc
    parts = sweep.param.split(".")
    for k in parts[:-1]:
        if k not in node:
            if k == "cost_model" and node is doc:
                node[k] = {}
            else:
                raise ConfigError(f"published.sweeps.{sweep.id}.param", f"no table {k!r} in {sweep.param!r}",
                                  "a dotted key of the experiment, e.g. engines.ollama.num_parallel")
        node = node[k]
        if not isinstance(node, dict):
            raise ConfigError(f"published.sweeps.{sweep.id}.param", f"{k!r} is not a table", "a dotted key")
    node[parts[-1]] = value
    doc["name"] = f"{exp.name}-{sweep.id}-{sweep.dir_name(value)}"
    try:
        return parse_experiment(doc, base_dir=exp.base_dir, source=exp.source)
    except ConfigError as e:
        raise ConfigError(f"published.sweeps.{sweep.id}", f"{sweep.param} = {value!r} gives an invalid "
                          f"experiment: {e}") from None


# ---------------------------------------------------------------------------------------
# Verdicts

def verdict(published: float | tuple[float, float], simulated: float | None, op: str = "~",
            bound: Bound | None = None, tolerance: float = TOLERANCE) -> str:
    """'physically implausible' if published lies beyond bound, else 'reproduced' or 'differs'.

    op "~": within tolerance of a point (|sim / pub - 1| <= tolerance), or inside a range
    [lo, hi] widened to [lo x (1 - tolerance), hi x (1 + tolerance)]. Other ops compare
    simulated with published literally (simulated >= published for ">=").
    """
    if bound is not None:
        edge = published if not isinstance(published, tuple) else (
            published[0] if bound.kind == "upper" else published[1])
        if bound.violated_by(edge):
            return "physically implausible"
    if simulated is None or not math.isfinite(simulated):
        return "differs"
    if op == "~":
        if isinstance(published, tuple):
            lo, hi = published
            ok = lo * (1 - tolerance) <= simulated <= hi * (1 + tolerance)
        else:
            ok = abs(simulated - published) <= tolerance * abs(published)
    else:
        ok = {"<": simulated < published, "<=": simulated <= published, ">": simulated > published,
              ">=": simulated >= published}[op]
    return "reproduced" if ok else "differs"


def ratio(published: float | tuple[float, float], simulated: float) -> float:
    """simulated / published; for a range, to its nearest end (1.0 inside it)."""
    if simulated is None or not math.isfinite(simulated):
        return math.nan
    if isinstance(published, tuple):
        lo, hi = published
        if lo <= simulated <= hi:
            return 1.0
        published = lo if simulated < lo else hi
    return simulated / published if published else math.nan


# ---------------------------------------------------------------------------------------
# Reading results

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
    """Requests of tokens_per_request (default: the workload's mean prompt + output) whose KV fits at once.

    Paged: the pool's blocks over blocks per request. Ollama slots: how many slots of num_ctx fit
    beside the weights and activations (the num_parallel at which loading would run out of memory).
    Static: the KV capacity over the max-length reservation.
    """
    if tokens_per_request is None:
        p, o = mean_lengths(exp)
        tokens_per_request = round(p + o)
    return exp.engine(engine).max_concurrent(mem, tokens_per_request)


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
# Running and judging

@dataclass
class ClaimsReport:
    """What a claims run produced."""

    exp: Experiment
    claims: Claims
    out_dir: Path
    table: pd.DataFrame  # one row per published figure
    sweeps: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per (sweep value, figure)
    audit_text: str = ""


CLAIMS_COLUMNS = ("id", "claim", "engine", "cell", "metric", "unit", "published", "published_text", "published_lo",
                  "published_hi",
                  "op", "simulated", "ratio", "bound", "bound_kind", "verdict", "source", "notes", "audit")


def evaluate(exp: Experiment, claims: Claims, results: Results, figures: tuple[Figure, ...] | None = None
             ) -> list[dict]:
    """One row per figure: published, simulated, ratio, bound, verdict."""
    rows = []
    for f in figures if figures is not None else claims.figures:
        try:
            sim = results.metric(f.metric, f.engine, f.concurrency, f.rate, f.tokens_per_request)
            if f.ratio_to is not None:
                base = results.metric(f.metric, f.ratio_to, f.concurrency, f.rate, f.tokens_per_request)
                sim = sim / base if base else math.nan
        except KeyError:
            sim = math.nan
        b = None
        if f.audit and f.ratio_to is None:
            b = bound_for(exp, f.metric, f.engine, f.concurrency, f.rate, f.tokens_per_request)
            if b is not None:
                b = in_unit(b, f.unit)
        v = verdict(f.value, sim, f.op, b)
        pub = f.point_value
        rows.append({
            "id": f.id, "claim": f.claim, "engine": f.engine, "cell": f.cell_label, "metric": f.metric,
            "unit": f.unit, "published": pub, "published_text": f.published_text, "published_lo": f.value[0] if f.is_range else pub,
            "published_hi": f.value[1] if f.is_range else pub, "op": f.op, "simulated": sim,
            "ratio": ratio(f.value, sim),
            "bound": b.value if b is not None else math.nan, "bound_kind": b.kind if b is not None else "",
            "verdict": v, "source": f.source, "notes": f.notes,
            "audit": b.describe(pub, f.unit) if b is not None else "",
        })
    return rows


def _run(exp: Experiment, out: Path, reuse: bool, progress: bool, echo) -> None:
    """run_experiment into out (resuming when reuse), then the per-cell KV statistics."""
    if not reuse:  # run_experiment appends to timeseries.csv; a fresh run must not keep an old one
        for name in ("timeseries.csv", "cell_stats.json"):
            (out / name).unlink(missing_ok=True)
    run_experiment(exp, out, resume=reuse, progress=progress, echo=echo)
    update_cell_stats(out)


def run_claims(config: str | Path | Experiment, out_dir: str | Path, *, reuse: bool = False, progress: bool = False,
               echo=print) -> ClaimsReport:
    """Run (or, with reuse, resume) a claims config and its sweeps; write claims.csv, sweeps.csv, audit.txt."""
    exp = config if isinstance(config, Experiment) else load_experiment(config)
    claims = parse_claims(exp)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    quiet = (lambda _m: None)
    _run(exp, out, reuse, progress, echo if progress else quiet)
    results = Results(exp, out)
    table = pd.DataFrame(evaluate(exp, claims, results), columns=list(CLAIMS_COLUMNS))
    table.to_csv(out / "claims.csv", index=False, float_format="%.6g")

    sweep_rows = []
    for sw in claims.sweeps:
        figs = tuple(claims.figure(x) for x in sw.figures)
        for value in sw.values:
            sexp = sweep_experiment(exp, sw, value)
            sdir = out / "sweeps" / sw.id / sw.dir_name(value)
            sdir.mkdir(parents=True, exist_ok=True)
            _run(sexp, sdir, reuse, False, quiet)
            sres = Results(sexp, sdir)
            for r in evaluate(sexp, claims, sres, figs):
                sweep_rows.append({"sweep": sw.id, "title": sw.title, "param": sw.param, "value": value,
                                   "dir": str(sdir.relative_to(out)), **r})
    sweeps = pd.DataFrame(sweep_rows)
    if len(sweeps):
        sweeps.to_csv(out / "sweeps.csv", index=False, float_format="%.6g")
    else:
        (out / "sweeps.csv").unlink(missing_ok=True)
    audit_text = format_audit(exp, audit_experiment(exp, claims.figures))
    (out / "audit.txt").write_text(audit_text + "\n")
    return ClaimsReport(exp, claims, out, table, sweeps, audit_text)


def load_report(config: str | Path | Experiment, out_dir: str | Path) -> ClaimsReport:
    """A ClaimsReport from a results directory already written by run_claims (re-judged from its files)."""
    exp = config if isinstance(config, Experiment) else load_experiment(config)
    out = Path(out_dir)
    claims = parse_claims(exp)
    table = pd.read_csv(out / "claims.csv", keep_default_na=False, na_values=[""])
    sweeps = pd.read_csv(out / "sweeps.csv", keep_default_na=False, na_values=[""]) \
        if (out / "sweeps.csv").exists() else pd.DataFrame()
    audit = (out / "audit.txt").read_text() if (out / "audit.txt").exists() else ""
    return ClaimsReport(exp, claims, out, table, sweeps, audit)


# ---------------------------------------------------------------------------------------
# Printing

def _cell_text(v, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return fmt_num(v)


def format_table(table: pd.DataFrame, notes: bool = True) -> str:
    """The side-by-side table: id, claim, cell, published, simulated, ratio, verdict (+ notes of misses)."""
    if table.empty:
        return "(no published figures)"
    rows = []
    for _, r in table.iterrows():
        pub = fmt_num(r["published"]) if r["op"] == "~" and r["published_lo"] == r["published_hi"] else (
            f"{fmt_num(r['published_lo'])}-{fmt_num(r['published_hi'])}" if r["op"] == "~"
            else f"{r['op']} {fmt_num(r['published'])}")
        rows.append({"id": r["id"], "claim": str(r["claim"])[:38], "cell": r["cell"], "unit": r["unit"] or "",
                     "published": pub, "simulated": _cell_text(r["simulated"]),
                     "ratio": f"{r['ratio']:.2f}" if isinstance(r["ratio"], float) and math.isfinite(r["ratio"])
                     else "-", "bound": _cell_text(r["bound"]), "verdict": r["verdict"]})
    text = pd.DataFrame(rows).to_string(index=False)
    if notes:
        extra = [f"  {r['id']}: {r['notes']}" for _, r in table.iterrows()
                 if r["verdict"] != "reproduced" and isinstance(r["notes"], str) and r["notes"].strip()]
        if extra:
            text += "\n\nWhy figures differ (config notes):\n" + "\n".join(extra)
    return text


def _value_text(v) -> str:
    """A sweep value as written in the config: 4, 0.5, 16384."""
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            return v
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return f"{v:g}" if isinstance(v, float) else str(v)


def format_sweeps(sweeps: pd.DataFrame) -> str:
    """Per sweep: each value's simulated figures and verdicts."""
    if sweeps is None or sweeps.empty:
        return ""
    out = []
    for sid, g in sweeps.groupby("sweep", sort=False):
        out.append(f"Sweep {sid}: {g['title'].iloc[0]} ({g['param'].iloc[0]})")
        values = list(dict.fromkeys(g["value"]))
        lines = []
        for fid, gi in g.groupby("id", sort=False):
            row = {"id": fid, "published": gi["published_text"].iloc[0] if "published_text" in gi else
                   fmt_num(gi["published"].iloc[0])}
            for v in values:
                sim = gi[gi["value"] == v]["simulated"]
                row[_value_text(v)] = fmt_num(float(sim.iloc[0])) if len(sim) else "-"
            lines.append(row)
        out.append(pd.DataFrame(lines).to_string(index=False))
        hits = g[g.verdict == "reproduced"].groupby("id", sort=False)["value"].apply(
            lambda v: ", ".join(_value_text(x) for x in v))
        if len(hits):
            out.append("  reproduced at: " + "; ".join(f"{k}: {v}" for k, v in hits.items()))
        out.append("")
    return "\n".join(out)
