"""Plan files: the capacity planner's question (`servesim plan PLAN.toml`), declared like experiment files.

    name = "llama8b_h100_vs_4090"
    model = "llama-3.1-8b"
    seed = 0

    [load]                       # what the deployment must serve
    kind = "users"               # users: closed-loop users (each sends its next request when the last ends,
                                 #   after think_time_s) | rate: Poisson arrivals, req/s
    target = 200                 # the stated load: the cheapest configuration must serve this
    min = 1                      # each candidate's capacity is searched in [min, max] (default max = target)
    max = 200
    curve = [1, 4, 16, 64, 200]  # loads of the cost figure (default: powers of two from min, and max)

    [workload]                   # the requests: an experiment's length tables and shared prefix
    prompt_tokens = {dist = "fixed", value = 100}
    output_tokens = {dist = "fixed", value = 200}

    [slo]                        # any of p50/p95/p99 x ttft/tpot/e2el (ms); all must hold
    p95_e2el_ms = 5000
    [slo.goodput]                # optional, vLLM's goodput: a request is good when it meets every
    ttft_ms = 2000               #   objective here; at least min_fraction of requests must be good
    min_fraction = 0.9

    [hardware]                   # candidate devices (sim.core.hardware presets), tensor-parallel degrees,
    presets = ["h100-sxm", "rtx-4090"]   # and replicas per deployment unit (capacity is searched for a unit:
    tp = [1]                             #   replicas x tp GPUs; more units are added for larger loads)
    replicas = [1]

    [engines.ollama]             # candidate engines: an experiment's engine table, where any key may list
    scheduler = "sequential"     #   choices (one candidate each); `presets`, `tp`, `replicas` here narrow [hardware]
    num_parallel = [1, 4]
    [engines.vllm]
    scheduler = "continuous"
    max_num_seqs = 256

    [prices]                     # USD per GPU-hour by preset; defaults: sim.lab.prices (source and date there)
    "rtx-4090" = 0.74
    [cost_model]                 # default: kind = "runtime" (each engine's calibrated runtime law)
    [search]                     # requests per probe, replicates, confidence, resolution, max replicas

A candidate is one engine variant on one device at one tensor-parallel degree and a number of
replicas (a unit of replicas x tp GPUs, behind the router); the planner finds the highest load one
unit serves, and how many replicas each larger load needs. Every candidate is validated as an
experiment (key paths like `engines.vllm.max_num_seqs`) when the plan loads; one whose weights or
KV do not fit its device is reported as such, not raised. `plan_json_schema()` is the JSON Schema.
"""
from __future__ import annotations

import copy
import itertools
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, model_validator

from reference.config import PRESETS
from reference.errors import ConfigError, DoesNotFit
from sim.core.hardware import HARDWARE
from sim.lab.experiment import AnyEngine, Experiment, dumps_toml, parse_experiment
from sim.lab.schema import ConfigModel, Int, Number, Str, finite
from sim.lab.workload import Lengths, SharedPrefix

PositiveInt = Annotated[Int, Field(ge=1)]
Positive = Annotated[Number, Field(gt=0)]
NonNegative = Annotated[Number, Field(ge=0)]
Preset = Literal[tuple(HARDWARE)]
#: Percentile objectives: (stat, quantile) x metric; the keys are f"{stat}_{metric}_ms".
QUANTILES = {"p50": 0.50, "p95": 0.95, "p99": 0.99}
METRICS = ("ttft", "tpot", "e2el")
PLAN_KEYS = ("presets", "tp", "replicas")  # keys an engine table may carry that are the plan's, not the engine's


class LoadSpec(ConfigModel):
    """[load]: the kind of load, the stated target, the search range and the cost figure's loads."""

    kind: Literal["users", "rate"] = "users"
    target: Positive
    min: Positive | None = None  # default: 1 user, or max / 64 req/s
    max: Positive | None = None  # default: target
    think_time_s: NonNegative = 0.0  # users only
    think_time_dist: Literal["fixed", "exponential"] = "fixed"
    curve: tuple[Positive, ...] | None = None

    @model_validator(mode="after")
    def _range(self):
        finite(self.target, "target")
        hi = self.max if self.max is not None else self.target
        finite(hi, "max")
        lo = self.min if self.min is not None else (1 if self.kind == "users" else hi / 64)
        if self.kind == "users":
            for key in ("target", "min", "max"):
                v = getattr(self, key)
                if v is not None and v != int(v):
                    raise ConfigError(key, f"users are whole: got {v}", "integers >= 1")
            for v in self.curve or ():
                if v != int(v):
                    raise ConfigError("curve", f"users are whole: got {v}", "integers >= 1")
        elif self.think_time_s:
            raise ConfigError("think_time_s", "only users think between requests", "0 with kind = 'rate'")
        if lo >= hi:
            raise ConfigError("min", f"{lo:g} is not below max = {hi:g}", f"numbers below {hi:g}")
        if self.target > hi:
            raise ConfigError("target", f"{self.target:g} is above max = {hi:g}, so the search cannot reach it",
                              "numbers up to max, or a larger max")
        object.__setattr__(self, "min", int(lo) if self.kind == "users" else float(lo))
        object.__setattr__(self, "max", int(hi) if self.kind == "users" else float(hi))
        if self.kind == "users":
            object.__setattr__(self, "target", int(self.target))
        return self

    @property
    def is_users(self) -> bool:
        """True for closed-loop users, False for a Poisson rate."""
        return self.kind == "users"

    @property
    def unit(self) -> str:
        """'users' or 'req/s'."""
        return "users" if self.is_users else "req/s"

    def curve_loads(self) -> list[int | float]:
        """The loads of the cost figure, ascending, target included: `curve`, or powers of two from min and max."""
        if self.curve is not None:
            loads = [int(v) if self.is_users else float(v) for v in self.curve]
        else:
            loads, v = [], self.min
            while v < self.max:
                loads.append(int(v) if self.is_users else float(v))
                v *= 2
            loads.append(self.max)
        return sorted(set(loads) | {self.target})


class PlanWorkload(ConfigModel):
    """[workload]: the requests (an experiment's length tables, shared prefix and client timeout)."""

    prompt_tokens: Lengths
    output_tokens: Lengths
    shared_prefix: SharedPrefix | None = None
    timeout_s: NonNegative = 0.0

    def tables(self) -> dict:
        """The keys an experiment's [workload] takes from this table."""
        d = {"prompt_tokens": self.prompt_tokens.to_dict(), "output_tokens": self.output_tokens.to_dict(),
             "timeout_s": self.timeout_s}
        if self.shared_prefix is not None:
            d["shared_prefix"] = self.shared_prefix.model_dump()
        return d


class GoodputSLO(ConfigModel):
    """[slo.goodput]: vLLM's goodput (a request is good when it meets every objective set here, ms), and the
    fraction of requests that must be good (refused and timed-out requests are not)."""

    ttft_ms: Positive | None = None
    tpot_ms: Positive | None = None
    e2el_ms: Positive | None = None
    min_fraction: Annotated[Number, Field(gt=0, le=1)] = 0.9

    @model_validator(mode="after")
    def _some(self):
        if self.ttft_ms is None and self.tpot_ms is None and self.e2el_ms is None:
            raise ConfigError("", "sets no objective", "one or more of ttft_ms, tpot_ms, e2el_ms")
        return self

    def limits(self) -> dict[str, float]:
        """{metric: limit ms} of the objectives set."""
        return {m: getattr(self, f"{m}_ms") for m in METRICS if getattr(self, f"{m}_ms") is not None}


class PlanSLO(ConfigModel):
    """[slo]: percentile objectives (ms) and optionally goodput; a load meets the SLOs when all hold."""

    p50_ttft_ms: Positive | None = None
    p95_ttft_ms: Positive | None = None
    p99_ttft_ms: Positive | None = None
    p50_tpot_ms: Positive | None = None
    p95_tpot_ms: Positive | None = None
    p99_tpot_ms: Positive | None = None
    p50_e2el_ms: Positive | None = None
    p95_e2el_ms: Positive | None = None
    p99_e2el_ms: Positive | None = None
    goodput: GoodputSLO | None = None

    @model_validator(mode="after")
    def _some(self):
        if not self.percentiles() and self.goodput is None:
            keys = ", ".join(f"{s}_{m}_ms" for s in QUANTILES for m in METRICS)
            raise ConfigError("", "sets no objective", f"one or more of {keys}, or [slo.goodput]")
        return self

    def percentiles(self) -> list[tuple[str, float, float]]:
        """[(metric, quantile, limit ms)] of the percentile objectives set, in declaration order."""
        out = []
        for m in METRICS:
            for s, q in QUANTILES.items():
                v = getattr(self, f"{s}_{m}_ms")
                if v is not None:
                    out.append((m, q, float(v)))
        return out

    def describe(self) -> str:
        """'p95 E2E <= 5000 ms; goodput (TTFT <= 2000 ms) >= 90% of requests'."""
        parts = [f"p{round(q * 100)} {m.upper().replace('E2EL', 'E2E')} <= {v:g} ms" for m, q, v in self.percentiles()]
        if self.goodput is not None:
            lim = " and ".join(f"{m.upper().replace('E2EL', 'E2E')} <= {v:g} ms" for m, v in self.goodput.limits().items())
            parts.append(f"goodput ({lim}) >= {self.goodput.min_fraction:.0%} of requests")
        return "; ".join(parts)


class SearchSpec(ConfigModel):
    """[search]: how each probe is simulated and how a finite run's noise is handled (sim.lab.planner)."""

    requests_per_user: PositiveInt = 4  # users: requests per probe = max(min_requests, this x users)
    duration_s: Positive = 120.0  # rate: requests per probe = max(min_requests, rate x this)
    min_requests: PositiveInt = 400
    replicates: PositiveInt = 1  # independent seeds pooled per probe (seed, seed + 1, ...)
    confidence: Annotated[Number, Field(ge=0.5, lt=1)] = 0.95  # one-sided, for every objective
    rate_tolerance: Annotated[Number, Field(gt=0, lt=1)] = 0.05  # rate: bisection stops at hi / lo <= 1 + this
    max_replicas: PositiveInt = 64


class HardwareSpec(ConfigModel):
    """[hardware]: candidate devices, tensor-parallel degrees, and the router in front of replicas."""

    presets: Annotated[tuple[Preset, ...], Field(min_length=1)]
    tp: Annotated[tuple[PositiveInt, ...], Field(min_length=1)] = (1,)
    replicas: Annotated[tuple[PositiveInt, ...], Field(min_length=1)] = (1,)
    router: Literal["round_robin", "least_outstanding"] = "round_robin"


class Plan(ConfigModel):
    """A validated plan file (see the module docstring); `candidates()` are its engine x device x tp points."""

    name: Annotated[Str, Field(min_length=1)] = "plan"
    description: Str = ""
    seed: Annotated[Int, Field(ge=0)] = 0
    model: Literal[tuple(PRESETS)]
    load: LoadSpec
    workload: PlanWorkload
    slo: PlanSLO
    hardware: HardwareSpec
    engines: Annotated[dict[Str, dict[Str, Any]], Field(min_length=1)]
    prices: dict[Str, Positive] = {}
    cost_model: dict[Str, Any] = {"kind": "runtime"}
    search: SearchSpec = SearchSpec()

    @model_validator(mode="after")
    def _check(self):
        for preset, usd in self.prices.items():
            if preset not in HARDWARE:
                raise ConfigError(f"prices.{preset}", "not a hardware preset", ", ".join(HARDWARE))
            finite(usd, f"prices.{preset}")
        self.candidates()  # every candidate is a valid experiment, or ConfigError naming the key
        return self

    def candidates(self) -> list[Candidate]:
        """Every engine variant x device x tp, engines in file order; each validated as an experiment."""
        out = []
        for name, table in self.engines.items():
            if not isinstance(table, dict):
                raise ConfigError(f"engines.{name}", f"must be a table, got {table!r}", "[engines.<name>] keys")
            presets = _choices(table.get("presets", list(self.hardware.presets)), f"engines.{name}.presets")
            tps = _choices(table.get("tp", list(self.hardware.tp)), f"engines.{name}.tp")
            units = _choices(table.get("replicas", list(self.hardware.replicas)), f"engines.{name}.replicas")
            engine = {k: v for k, v in table.items() if k not in PLAN_KEYS}
            listed = [k for k, v in engine.items() if isinstance(v, list)]
            for values in itertools.product(*(engine[k] for k in listed)):
                variant = {**engine, **dict(zip(listed, values))}
                for preset, tp, replicas in itertools.product(presets, tps, units):
                    cand = Candidate(name, variant, dict(zip(listed, values)), preset, tp, replicas, self)
                    try:
                        cand.experiment(self.load.min, replicas)
                    except DoesNotFit:
                        pass  # well-formed; the planner reports it as a candidate that does not fit
                    except ConfigError as e:
                        raise ConfigError(e.field, f"in candidate {cand.label}: {e.message}", e.allowed) from None
                    out.append(cand)
        return out

    def to_dict(self) -> dict:
        """The plan file (defaults filled in)."""
        return self.model_dump(mode="json", exclude_none=True)

    def to_toml(self) -> str:
        """to_dict() as TOML text."""
        return dumps_toml(self.to_dict())


def _choices(value: Any, field: str) -> list:
    """A scalar or a non-empty list of distinct values, as a list."""
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ConfigError(field, "lists no values", "a value or a non-empty list")
    if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
        raise ConfigError(field, f"has duplicates: {values}", "distinct values")
    return values


@dataclass(frozen=True)
class Candidate:
    """One engine variant on one device at one tensor-parallel degree, in units of `replicas` replicas (tp GPUs each)."""

    engine_name: str
    engine_table: dict = field(hash=False)  # the [engines.<name>] table of this variant
    choices: dict = field(hash=False)  # the listed keys' values of this variant
    preset: str
    tp: int
    replicas: int
    plan: Plan = field(hash=False, compare=False, repr=False)

    @property
    def label(self) -> str:
        """'ollama num_parallel=4 on h100-sxm', with ' tp=2' and ' x2 replicas' where not 1."""
        knobs = "".join(f" {k}={_text(v)}" for k, v in self.choices.items())
        return (f"{self.engine_name}{knobs} on {self.preset}" + (f" tp={self.tp}" if self.tp > 1 else "")
                + (f" x{self.replicas} replicas" if self.replicas > 1 else ""))

    @property
    def unit_gpus(self) -> int:
        """GPUs of one deployment unit (replicas x tp)."""
        return self.replicas * self.tp

    def num_requests(self, load: float) -> int:
        """Requests one probe simulates at load (see SearchSpec)."""
        s = self.plan.search
        if self.plan.load.is_users:
            return max(s.min_requests, s.requests_per_user * int(load))
        return max(s.min_requests, math.ceil(load * s.duration_s))

    def document(self, load: float, replicas: int, seed: int | None = None) -> dict:
        """The experiment file of one probe: this candidate, `replicas` replicas, one cell at load."""
        plan = self.plan
        n = self.num_requests(load)
        if plan.load.is_users:
            workload = {"kind": "closed_loop", "clients": [int(load)], "num_requests": n,
                        "think_time_s": plan.load.think_time_s, "think_time_dist": plan.load.think_time_dist}
        else:
            workload = {"kind": "poisson", "rates": [float(load)], "num_requests": n}
        return {"name": plan.name, "seed": plan.seed if seed is None else seed, "model": plan.model,
                "workload": {**workload, **plan.workload.tables()},
                "engines": {self.engine_name: copy.deepcopy(self.engine_table)},
                "hardware": {"preset": self.preset, "tp": self.tp, "replicas": replicas,
                             "router": plan.hardware.router},
                "cost_model": copy.deepcopy(plan.cost_model)}

    def experiment(self, load: float, replicas: int, seed: int | None = None) -> Experiment:
        """document() validated as an Experiment (ConfigError naming the key)."""
        return parse_experiment(self.document(load, replicas, seed), default_name=self.plan.name)


def _text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return f"{v:g}" if isinstance(v, float) else str(v)


def load_plan(source: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Plan:
    """A Plan from a TOML file path or TOML text, with `KEY=VALUE` overrides (dotted key, TOML value) applied.

    ConfigError names the key (`load.target`, `engines.vllm.max_num_seqs`, ...) and what is allowed."""
    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source and "=" not in source):
        path = Path(source)
        try:
            text = path.read_text()
        except OSError as e:
            raise ConfigError("plan", f"cannot read {str(path)!r}: {e.strerror or e}") from None
        where, default_name = str(path), path.stem
    else:
        text, where, default_name = source, "<string>", "plan"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("plan", f"{where} is not valid TOML: {e}") from None
    for item in overrides:
        apply_override(data, item)
    data.setdefault("name", default_name)
    return Plan(**data)


def apply_override(doc: dict, item: str) -> None:
    """doc with `a.b.c=VALUE` set (VALUE parsed as a TOML value; a bare word is a string)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError("--set", f"{item!r} is not KEY=VALUE", "dotted keys such as load.target=100")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    node = doc
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}", f"{'.'.join(parts[:i + 1])} is not a table", "keys of tables")
    node[parts[-1]] = value


def plan_json_schema() -> dict:
    """The JSON Schema of a plan file; an engine table's keys are an engine's, each a value or a list of choices."""
    schema = TypeAdapter(Plan).json_schema(mode="validation")
    engine = TypeAdapter(AnyEngine).json_schema(mode="validation")
    defs = schema.setdefault("$defs", {})
    for name, d in engine.get("$defs", {}).items():
        props = d.get("properties", {})
        props.pop("name", None)
        for key, prop in list(props.items()):
            if key != "scheduler":
                props[key] = {"anyOf": [prop, {"type": "array", "items": prop, "minItems": 1}],
                              **({"title": prop["title"]} if "title" in prop else {})}
        props["presets"] = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}],
                            "description": "Narrow [hardware] presets for this engine."}
        props["tp"] = {"anyOf": [{"type": "integer"}, {"type": "array", "items": {"type": "integer"}}],
                       "description": "Narrow [hardware] tp for this engine."}
        d["required"] = [r for r in d.get("required", []) if r != "name"]
        defs[f"Plan{name}"] = json.loads(json.dumps(d).replace('"#/$defs/', '"#/$defs/Plan'))
    refs = [{"$ref": f"#/$defs/Plan{n}"} for n in engine.get("$defs", {})]
    schema["properties"]["engines"] = {"type": "object", "additionalProperties": {"anyOf": refs},
                                       "description": "Candidate engines: [engines.<name>], any key a list of choices."}
    return schema
