"""The [published] table of a claims config: figures (each with its class), sweeps, seeds; and derived experiments.

Every figure is classed before anything is simulated (`class = ...` in its table):

- test:     the simulation could have come out otherwise; judged "reproduced", "differs" or
            "physically implausible", over `seeds` seeds.
- input:    the config takes the figure as given (e.g. the model's weight bytes): shown, not judged.
- identity: true by construction or arithmetic of the config (a memory plan's sizes, a ratio of two
            other published figures, an outcome an assumption decides): checked, not judged.
- fit:      used to fit a parameter of the simulator: never "reproduced".

Non-test classes must say why (`class_note`). A figure is read one way (`reading`, optional text
saying how, fixed in the config before looking at the result). `set = { "workload.num_requests" = 40 }`
measures a figure in a variant of the experiment (its own run under DIR/variants/<label>/).

Plain Python, no JAX.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass

from reference.errors import ConfigError
from sim.lab.audit import fmt_num
from sim.lab.experiment import Experiment, parse_experiment

CLASSES = {
    "test": "the simulation could have come out otherwise: judged over seeds",
    "input": "taken as given by the config: not judged",
    "identity": "true by construction or arithmetic of the config: checked, not judged",
    "fit": "used to fit a parameter of the simulator: never reproduced",
}
OPS = ("~", "<", "<=", ">", ">=")
DEFAULT_SEEDS = 5

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
    "max_concurrent": "requests of the workload's mean length whose KV fits beside the weights, capped by the "
                      "engine's own batch limit (max_num_seqs, max_batch_size) (engine-level; Ollama: the slots of "
                      "num_ctx that fit, the num_parallel at which loading runs out of memory)",
    "kv_utilization_pct": "tokens stored / KV slots reserved, time-averaged x 100 (cell; all cells if none given)",
    "capacity_rate": "the most completed requests per second in any swept cell: the engine's saturated throughput, "
                     "so the highest Poisson rate it sustains with bounded latency (engine-level; the sweep's top "
                     "rate must overload it)",
}
ENGINE_LEVEL = {"vram_allocated_gb", "vram_model_kv_gb", "weights_gb", "kv_pool_gb", "kv_capacity_tokens",
                "kv_kib_per_token", "max_concurrent", "capacity_rate"}
_SUMMARY_METRICS = ("num_requests", "completed", "failed", "refused", "timed_out", "duration", "request_throughput",
                    "output_throughput", "total_token_throughput", "request_goodput", "mean_queue_ms",
                    "mean_normalized_latency_s", "mean_preemptions", "prefix_cache_hit_rate", "peak_kv_usage",
                    "busy_fraction", "preemptions", "max_itl_ms")


@dataclass(frozen=True)
class Figure:
    """One published figure, its class, and where in the experiment it is measured."""

    id: str
    claim: str
    metric: str
    engine: str
    value: float | tuple[float, float]
    cls: str = "test"  # the TOML key `class`: test | input | identity | fit
    unit: str = ""
    source: str = ""
    concurrency: int | None = None
    rate: float | None = None
    op: str = "~"
    ratio_to: str | None = None
    notes: str = ""
    tokens_per_request: int | None = None
    audit: bool = True
    class_note: str = ""  # why a non-test class
    reading: str = ""  # how the published figure is read (one reading, fixed before simulating)
    settings: tuple[tuple[str, object], ...] = ()  # the TOML key `set`: dotted keys of a variant experiment

    @property
    def is_test(self) -> bool:
        return self.cls == "test"

    @property
    def is_range(self) -> bool:
        return isinstance(self.value, tuple)

    @property
    def point_value(self) -> float:
        """The published value (midpoint of a range)."""
        return (self.value[0] + self.value[1]) / 2 if self.is_range else self.value

    @property
    def variant(self) -> str:
        """The label of the run the figure is measured in: '' (the config itself) or 'num_requests=40'."""
        return variant_label(dict(self.settings))

    @property
    def cell_label(self) -> str:
        """'vllm@c=32', 'vllm/orca_max@rate=2', 'vllm' (engine-level), 'vllm[num_requests=40]'."""
        eng = f"{self.engine}/{self.ratio_to}" if self.ratio_to else self.engine
        if self.settings:
            eng += f"[{self.variant}]"
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
        return f"{self.param.rsplit('.', 1)[-1]}={_value_text(value)}"


@dataclass(frozen=True)
class Claims:
    """A config's [published] table, validated."""

    source: str = ""
    notes: str = ""
    figures: tuple[Figure, ...] = ()
    sweeps: tuple[Sweep, ...] = ()
    seeds: int = DEFAULT_SEEDS

    def figure(self, fid: str) -> Figure:
        for f in self.figures:
            if f.id == fid:
                return f
        raise KeyError(fid)

    def variants(self) -> dict[str, dict]:
        """{label: settings} of every run the figures need, the config itself ('': {}) first."""
        out: dict[str, dict] = {"": {}}
        for f in self.figures:
            out.setdefault(f.variant, dict(f.settings))
        return out


_FIGURE_KEYS = ("id", "claim", "metric", "engine", "value", "class", "class_note", "reading", "set", "unit", "source",
                "concurrency", "rate", "op", "ratio_to", "notes", "tokens_per_request", "audit")
_SWEEP_KEYS = ("id", "title", "param", "values", "figures", "engines", "loads", "notes")
_PUBLISHED_KEYS = ("source", "notes", "seeds", "figures", "sweeps")


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _value_text(v) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return f"{v:g}" if isinstance(v, float) else str(v)


def variant_label(settings: dict) -> str:
    """'num_requests=40' for {'workload.num_requests': 40}; '' for none (keys by their last part, sorted)."""
    return ",".join(f"{k.rsplit('.', 1)[-1]}={_value_text(v)}" for k, v in sorted(settings.items()))


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


def _flatten(table: dict, prefix: str = "") -> dict:
    """{'workload': {'num_requests': 40}} or {'workload.num_requests': 40} -> {'workload.num_requests': 40}."""
    out = {}
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _looks_like_summary_metric(name: str) -> bool:
    if name in _SUMMARY_METRICS:
        return True
    return any(name == f"{stat}_{m}_ms" for stat in ("mean", "median", "p90", "p95", "p99")
               for m in ("ttft", "tpot", "itl", "e2el"))


def _parse_value(t: dict, p: str):
    if "value" not in t:
        raise ConfigError(f"{p}.value", "required", "a number or [lo, hi]")
    value = t["value"]
    if isinstance(value, list):
        if len(value) != 2 or not all(_is_num(x) for x in value) or value[0] > value[1]:
            raise ConfigError(f"{p}.value", f"a range must be [lo, hi] with lo <= hi, got {value!r}", "[lo, hi]")
        return float(value[0]), float(value[1])
    if _is_num(value):
        return float(value)
    raise ConfigError(f"{p}.value", f"must be a number or [lo, hi], got {value!r}", "a number or [lo, hi]")


def _parse_figure(exp: Experiment, t: dict, p: str, source: str) -> Figure:
    _keys(t, p, _FIGURE_KEYS)
    fid = _str(t, "id", p, required=True)
    cls = t.get("class")
    if cls not in CLASSES:
        raise ConfigError(f"{p}.class", "required" if cls is None else f"unknown class {cls!r}",
                          " | ".join(CLASSES))
    class_note = _str(t, "class_note", p)
    if cls != "test" and not class_note.strip():
        raise ConfigError(f"{p}.class_note", f"a figure of class {cls!r} must say why it is not a test",
                          "a sentence: what makes it an input, an identity or a fit")
    metric = _str(t, "metric", p, required=True)
    if metric not in DERIVED_METRICS and not _looks_like_summary_metric(metric):
        raise ConfigError(f"{p}.metric", f"unknown metric {metric!r}",
                          "a summary.json metric (output_throughput, mean_ttft_ms, ...) or " + ", ".join(DERIVED_METRICS))
    engine = _str(t, "engine", p, required=True)
    engines = set(exp.engine_names)
    for key, name in (("engine", engine), ("ratio_to", t.get("ratio_to"))):
        if name is not None and name not in engines:
            raise ConfigError(f"{p}.{key}", f"no engine {name!r} in this config", ", ".join(sorted(engines)))
    value = _parse_value(t, p)
    op = t.get("op", "~")
    if op not in OPS:
        raise ConfigError(f"{p}.op", f"unknown op {op!r}", " ".join(OPS))
    if op != "~" and isinstance(value, tuple):
        raise ConfigError(f"{p}.op", "a range takes op = '~'", "~")
    settings = t.get("set", {})
    if not isinstance(settings, dict):
        raise ConfigError(f"{p}.set", f"must be a table of dotted keys, got {settings!r}",
                          '{ "workload.num_requests" = 40 }')
    settings = _flatten(settings)
    where = exp if not settings else derive_experiment(exp, settings=settings, where=f"{p}.set")
    conc, rate = t.get("concurrency"), t.get("rate")
    loads = set(where.workload.loads)
    if conc is not None and rate is not None:
        raise ConfigError(f"{p}.rate", "give concurrency or rate, not both", "one of them")
    if conc is not None and (not where.workload.is_closed_loop or conc not in loads):
        raise ConfigError(f"{p}.concurrency", f"{conc!r} is not a cell of this workload",
                          ", ".join(map(str, where.workload.loads)))
    if rate is not None:
        rate = float(rate)
        if where.workload.is_closed_loop or rate not in loads:
            raise ConfigError(f"{p}.rate", f"{rate!r} is not a cell of this workload",
                              ", ".join(map(str, where.workload.loads)))
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
    return Figure(fid, _str(t, "claim", p, required=True), metric, engine, value, cls, _str(t, "unit", p),
                  _str(t, "source", p, default=source), conc, rate, op, t.get("ratio_to"), _str(t, "notes", p), tpr,
                  aud, class_note, _str(t, "reading", p), tuple(sorted(settings.items())))


def _parse_sweep(exp: Experiment, t: dict, p: str, figures: list[Figure]) -> Sweep:
    _keys(t, p, _SWEEP_KEYS)
    sid = _str(t, "id", p, required=True)
    param = _str(t, "param", p, required=True)
    vals = t.get("values")
    if not isinstance(vals, list) or not vals:
        raise ConfigError(f"{p}.values", "must be a non-empty array", "[v1, v2, ...]")
    figs = t.get("figures", [])
    if not isinstance(figs, list) or not all(isinstance(x, str) for x in figs):
        raise ConfigError(f"{p}.figures", "must be an array of figure ids", "[\"A.1\", ...]")
    by_id = {f.id: f for f in figures}
    for x in figs:
        if x not in by_id:
            raise ConfigError(f"{p}.figures", f"no figure {x!r}", ", ".join(by_id))
        if by_id[x].settings:
            raise ConfigError(f"{p}.figures", f"figure {x!r} is measured in a variant (set = ...); a sweep varies "
                                              "the config itself", "figures without set")
    engines = set(exp.engine_names)
    sub_engines = t.get("engines")
    if sub_engines is not None:
        if not isinstance(sub_engines, list) or not set(sub_engines) <= engines:
            raise ConfigError(f"{p}.engines", f"must list engines of this config, got {sub_engines!r}",
                              ", ".join(sorted(engines)))
        for x in figs:
            for e in (by_id[x].engine, by_id[x].ratio_to):
                if e is not None and e not in sub_engines:
                    raise ConfigError(f"{p}.engines", f"figure {x} needs engine {e!r}", ", ".join(sub_engines))
        sub_engines = tuple(sub_engines)
    sub_loads = t.get("loads")
    if sub_loads is not None:
        if not isinstance(sub_loads, list) or not sub_loads:
            raise ConfigError(f"{p}.loads", "must be a non-empty array", "clients or rates")
        sub_loads = tuple(sub_loads)
    sweep = Sweep(sid, _str(t, "title", p, required=True), param, tuple(vals), tuple(figs), sub_engines, sub_loads,
                  _str(t, "notes", p))
    for v in sweep.values:  # every value must give a valid experiment
        sweep_experiment(exp, sweep, v)
    return sweep


def parse_claims(exp: Experiment) -> Claims:
    """The experiment's [published] table as Claims; ConfigError naming the key path when malformed."""
    pub = _keys(exp.published, "published", _PUBLISHED_KEYS)
    if not pub:
        return Claims()
    source = _str(pub, "source", "published")
    seeds = pub.get("seeds", DEFAULT_SEEDS)
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise ConfigError("published.seeds", f"must be an integer >= 1, got {seeds!r}",
                          f"integers >= 1 (default {DEFAULT_SEEDS})")
    raw = pub.get("figures", [])
    if not isinstance(raw, list):
        raise ConfigError("published.figures", "must be an array of tables", "[[published.figures]] tables")
    figures: list[Figure] = []
    seen: set[str] = set()
    for i, t in enumerate(raw):
        f = _parse_figure(exp, t, f"published.figures[{i}]", source)
        if f.id in seen:
            raise ConfigError(f"published.figures[{i}].id", f"duplicate id {f.id!r}", "distinct ids")
        seen.add(f.id)
        figures.append(f)
    raw = pub.get("sweeps", [])
    if not isinstance(raw, list):
        raise ConfigError("published.sweeps", "must be an array of tables", "[[published.sweeps]] tables")
    sweeps = []
    for i, t in enumerate(raw):
        sw = _parse_sweep(exp, t, f"published.sweeps[{i}]", figures)
        if sw.id in seen:
            raise ConfigError(f"published.sweeps[{i}].id", f"duplicate id {sw.id!r}", "distinct ids")
        seen.add(sw.id)
        sweeps.append(sw)
    return Claims(source, _str(pub, "notes", "published"), tuple(figures), tuple(sweeps), seeds)


# ---------------------------------------------------------------------------------------
# Experiments derived from a claims config: variants, sweep values, other seeds

def derive_experiment(exp: Experiment, *, settings: dict | None = None, engines=None, loads=None,
                      seed: int | None = None, name: str | None = None, where: str = "published") -> Experiment:
    """exp with dotted keys set, restricted to some engines and loads, at another seed ([published] dropped).

    ConfigError under `where` when a key does not exist or the result is not a valid experiment.
    """
    doc = copy.deepcopy(exp.to_dict())
    doc.pop("published", None)
    if engines is not None:
        doc["engines"] = {k: v for k, v in doc["engines"].items() if k in engines}
    if loads is not None:
        key = exp.workload.LOAD_KEY
        if key is None:
            raise ConfigError(f"{where}.loads", "a trace has one cell", "no loads")
        doc["workload"][key] = list(loads)
    for param, value in (settings or {}).items():
        node = doc
        parts = param.split(".")
        for k in parts[:-1]:
            if k not in node:
                if k == "cost_model" and node is doc:
                    node[k] = {}
                else:
                    raise ConfigError(where, f"no table {k!r} in {param!r}",
                                      "a dotted key of the experiment, e.g. engines.ollama.num_parallel")
            node = node[k]
            if not isinstance(node, dict):
                raise ConfigError(where, f"{k!r} is not a table", "a dotted key")
        node[parts[-1]] = value
    if seed is not None:
        doc["seed"] = seed
    doc["name"] = name or (f"{exp.name}-{variant_label(settings)}" if settings else exp.name)
    try:
        return parse_experiment(doc, base_dir=exp.base_dir, source=exp.source)
    except ConfigError as e:
        raise ConfigError(where, f"{json.dumps(settings or {})} gives an invalid experiment: {e}") from None


def sweep_experiment(exp: Experiment, sweep: Sweep, value) -> Experiment:
    """exp with sweep.param set to value, restricted to the sweep's engines and loads."""
    return derive_experiment(exp, settings={sweep.param: value}, engines=sweep.engines, loads=sweep.loads,
                             name=f"{exp.name}-{sweep.id}-{sweep.dir_name(value)}",
                             where=f"published.sweeps.{sweep.id}")
