"""The capacity planner (`servesim plan`): for each candidate, the highest load that meets the SLOs and the
fewest replicas that serve each load, by bisection on the simulator; then the cheapest configuration.

Per candidate (one engine variant on one device at one tp; sim.lab.plan_config):

1. Capacity of one unit (the candidate's replicas, 1 by default): a galloping search doubles the load
   from the range's min until a probe misses the SLOs or max is reached (so a weak candidate is never
   simulated at a load far above its capacity, and the probes are the cost curve's powers of two), then
   bisection (geometric midpoints) narrows the bracket to one user, or to hi / lo <= 1 + rate_tolerance
   for a rate. The capacity is the highest load that met the SLOs; the bisection assumes that meeting
   them is monotone in load (common random numbers, below, keep it so in practice; a probe below the
   capacity that failed is flagged `noisy`).
2. Each load of the cost curve (the target among them): the unit at or below the capacity, else
   ceil(load / capacity x unit replicas), probed; one more replica while the probe fails (up to max_replicas), since
   a router does not split load perfectly. The point is the fewest replicas that met the SLOs.
3. The cheapest configuration for the target: the candidate point with the lowest USD per hour
   (replicas x tp x price per GPU-hour); USD per million output tokens = USD per hour / (output
   tokens per second x 3600) x 1e6 at that load.

The noise of a finite run, handled three ways:
- common random numbers: every probe of a plan replays the same request sequence (one seed; lengths,
  prefixes and arrival pattern shared across loads and candidates, sim.lab.workload), so two probes
  differ by their load and configuration, not by their draw;
- each percentile objective is judged on a one-sided upper confidence bound of the percentile, and
  goodput on a lower bound of the good fraction, at `search.confidence` (sim.lab.slo_stats): a load
  passes only if the SLO holds with that confidence, not on a lucky draw; failed requests count as
  infinitely late;
- `search.replicates` > 1 pools independent seeds per probe, since requests of one run are correlated.

Probes of a round (every candidate's next probe) run together on an executor (sim.lab.executors: local
processes or Ray); results do not depend on which. Probes are memoised by their experiments' content
in DIR/probe_cache.jsonl, so an interrupted plan resumes and a re-run with changed SLOs or prices
re-judges without simulating again.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path

from reference.errors import ConfigError, DoesNotFit
from sim.lab.executors import Executor, make_executor
from sim.lab.plan_config import Candidate, Plan, PlanSLO
from sim.lab.plan_physics import physics_note
from sim.lab.plan_probe import ProbeOutcome, run_probe
from sim.lab.prices import price_per_gpu_hour
from sim.lab.slo_stats import fraction_lower_bound, quantile_estimate, quantile_upper_bound

CACHE_FILE = "probe_cache.jsonl"


@dataclass(frozen=True)
class Check:
    """One objective on one probe: its estimate, its confidence bound, the limit, and whether the bound holds.

    name: 'p95_e2el_ms' (estimate and bound in ms; ok when bound <= limit) or 'goodput_fraction'
    (fraction of requests that are good; ok when bound >= limit)."""

    name: str
    estimate: float
    bound: float
    limit: float
    ok: bool


@dataclass(frozen=True)
class Probe:
    """A candidate at one load and replica count, what it measured, and the SLO checks."""

    load: float
    replicas: int
    outcome: ProbeOutcome
    checks: tuple[Check, ...]

    @property
    def meets(self) -> bool:
        """Every objective holds at the plan's confidence."""
        return all(c.ok for c in self.checks)

    def check(self, name: str) -> Check | None:
        """The check called name, if the SLO has it."""
        return next((c for c in self.checks if c.name == name), None)


@dataclass(frozen=True)
class Point:
    """The fewest replicas of a candidate that met the SLOs at one load (replicas None: none up to max)."""

    load: float
    replicas: int | None
    probe: Probe  # the probe that met the SLOs, or the last one tried
    gpus: int | None
    usd_per_hour: float | None
    usd_per_mtok: float | None  # USD per million output tokens at this load


@dataclass
class CandidateResult:
    """What the planner found for one candidate."""

    candidate: Candidate
    physics: str
    usd_per_gpu_hour: float
    price_source: str
    unfit: str | None = None  # 'does not fit: ...' or 'cannot be priced: ...' (then nothing else is set)
    capacity: float | None = None  # highest load one unit (candidate.replicas) served within the SLOs (None: not even min)
    capacity_at_max: bool = False  # the SLOs held at the search range's max: capacity is at least that
    first_failure: float | None = None  # the lowest load one unit failed at (the bracket's top)
    noisy: bool = False  # a one-unit probe at or below the capacity failed
    points: list[Point] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)

    def point(self, load: float) -> Point | None:
        """The curve point at load, if any."""
        return next((p for p in self.points if p.load == load), None)


@dataclass
class PlanResult:
    """Every candidate's result, in candidate order, and the cheapest that serves the target."""

    plan: Plan
    results: list[CandidateResult]

    def best(self) -> CandidateResult | None:
        """The candidate whose target point costs the least per hour (ties: per million tokens, then order)."""
        served = [r for r in self.results if r.point(self.plan.load.target) is not None
                  and r.point(self.plan.load.target).replicas is not None]
        if not served:
            return None
        return min(served, key=lambda r: (r.point(self.plan.load.target).usd_per_hour,
                                          r.point(self.plan.load.target).usd_per_mtok))


def judge(outcome: ProbeOutcome, slo: PlanSLO, confidence: float) -> tuple[Check, ...]:
    """Each objective of slo on the probe, at the given one-sided confidence (see sim.lab.slo_stats)."""
    checks = []
    for metric, q, limit in slo.percentiles():
        x = outcome.latencies(metric)
        bound = quantile_upper_bound(x, q, confidence)
        checks.append(Check(f"p{round(q * 100)}_{metric}_ms", quantile_estimate(x, q), bound, limit, bound <= limit))
    if slo.goodput is not None:
        n = outcome.num_requests
        good = None
        for metric, limit in slo.goodput.limits().items():
            ok = outcome.latencies(metric) <= limit  # inf (failed) is never good
            good = ok if good is None else good & ok
        g = int(good.sum()) if n else 0
        frac = g / n if n else 0.0
        lb = fraction_lower_bound(g, n, confidence)
        checks.append(Check("goodput_fraction", frac, lb, slo.goodput.min_fraction, lb >= slo.goodput.min_fraction))
    return tuple(checks)


def usd_per_mtok(usd_per_hour: float, output_tok_s: float) -> float:
    """USD per million output tokens for a deployment costing usd_per_hour that emits output_tok_s tokens/s."""
    return usd_per_hour / (output_tok_s * 3600.0) * 1e6 if output_tok_s > 0 else math.inf


# A search step asks for probes (load, replicas) and receives them judged, in the same order.
Ask = list[tuple[float, int]]
Search = Generator[Ask, list[Probe], None]


def _midpoint(lo: float, hi: float, users: bool) -> float:
    mid = math.sqrt(lo * hi)
    if not users:
        return mid
    return min(max(int(round(mid)), int(lo) + 1), int(hi) - 1)


def _close(lo: float, hi: float, plan: Plan) -> bool:
    if plan.load.is_users:
        return hi - lo <= 1
    return hi / lo <= 1 + plan.search.rate_tolerance


def search(plan: Plan, result: CandidateResult) -> Search:
    """The candidate's search as a coroutine: yields the probes it needs next, receives them judged, and
    fills result (capacity, points, probes) as it goes."""
    load, s = plan.load, plan.search
    unit = result.candidate.replicas
    lo = load.min
    (p,) = yield [(lo, unit)]
    result.probes.append(p)
    if not p.meets:
        result.first_failure = lo
        return  # one unit misses the SLOs at the lowest load: nothing to scale
    hi = None
    while hi is None and lo < load.max:  # gallop: double until a probe fails or max is reached
        nxt = min(lo * 2, load.max)
        (p,) = yield [(nxt, unit)]
        result.probes.append(p)
        lo, hi = (nxt, None) if p.meets else (lo, nxt)
    if hi is None:
        result.capacity, result.capacity_at_max = lo, True
    else:
        while not _close(lo, hi, plan):  # bisect the bracket [met, missed]
            mid = _midpoint(lo, hi, load.is_users)
            (p,) = yield [(mid, unit)]
            result.probes.append(p)
            lo, hi = (mid, hi) if p.meets else (lo, mid)
        result.capacity, result.first_failure = lo, hi
    capacity = result.capacity
    todo = {x: (unit if x <= capacity else math.ceil(x / capacity * unit)) for x in load.curve_loads()}
    points: dict[float, tuple[int | None, Probe | None]] = {x: (None, None) for x, r in todo.items() if r > s.max_replicas}
    todo = {x: r for x, r in todo.items() if r <= s.max_replicas}
    while todo:
        asked = list(todo.items())
        probes = yield asked
        result.probes.extend(probes)
        for (x, r), p in zip(asked, probes):
            if r == unit and x <= capacity and not p.meets:
                result.noisy = True
            if p.meets:
                points[x] = (r, p)
                del todo[x]
            elif r + 1 > s.max_replicas:
                points[x] = (None, p)
                del todo[x]
            else:
                todo[x] = r + 1
    for x in sorted(points):
        r, p = points[x]
        gpus = r * result.candidate.tp if r is not None else None
        usd_h = gpus * result.usd_per_gpu_hour if gpus is not None else None
        mtok = usd_per_mtok(usd_h, p.outcome.output_throughput) if usd_h is not None else None
        if p is not None:
            result.points.append(Point(x, r, p, gpus, usd_h, mtok))


class ProbeCache:
    """Probe outcomes by the content of their experiments, kept in DIR/probe_cache.jsonl (one JSON line each)."""

    def __init__(self, path: Path | None, resume: bool = True):
        self.path = path
        self.outcomes: dict[str, ProbeOutcome] = {}
        if path is not None and path.exists():
            if resume:
                for line in path.read_text().splitlines():
                    try:
                        rec = json.loads(line)
                        self.outcomes[rec["key"]] = ProbeOutcome.from_dict(rec["outcome"])
                    except (ValueError, KeyError, TypeError):
                        continue  # a line cut off by an interruption
            else:
                path.unlink()

    def __contains__(self, key: str) -> bool:
        return key in self.outcomes

    def __getitem__(self, key: str) -> ProbeOutcome:
        return self.outcomes[key]

    def put(self, key: str, outcome: ProbeOutcome, about: dict) -> None:
        """Keep an outcome (and append it to the file)."""
        self.outcomes[key] = outcome
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"key": key, **about, "outcome": outcome.to_dict()}) + "\n")


def _probe_key(experiments) -> str:
    return hashlib.sha1("\n".join(e.to_toml() for e in experiments).encode()).hexdigest()


def run_plan(plan: Plan, out_dir: str | Path | None = None, *, executor: Executor | None = None,
             workers: int | None = None, ray_address: str | None = None, resume: bool = True,
             progress: bool = True, echo: Callable[[str], None] = print) -> PlanResult:
    """Search every candidate (rounds of probes run in parallel on the executor); see the module docstring.

    out_dir: where the probe cache lives (None: no cache). executor: default make_executor(workers,
    ray_address). ConfigError when a device has no price (give one in [prices])."""
    cache = ProbeCache(Path(out_dir) / CACHE_FILE if out_dir is not None else None, resume)
    results, searches, asks = [], {}, {}
    for i, cand in enumerate(plan.candidates()):
        usd, source = price_per_gpu_hour(cand.preset, plan.prices)
        try:
            exp = cand.experiment(plan.load.min, cand.replicas)
        except DoesNotFit as e:  # the real engine would refuse to start (weights, activations or KV too big)
            result = CandidateResult(cand, "", usd, source, unfit=f"does not fit: {e}")
        else:
            result = CandidateResult(cand, physics_note(exp), usd, source)
            try:
                exp.cost_model_for(exp.engines[0], exp.plan(exp.engines[0]))
            except ConfigError as e:  # e.g. a runtime law on a device without the card details it needs
                result.unfit = f"cannot be priced: {e}"
        results.append(result)
        if result.unfit:
            if progress:
                echo(f"  {cand.label}: {result.unfit}")
            continue
        searches[i] = search(plan, result)
        asks[i] = next(searches[i])
    own = executor is None
    rounds = 0
    try:
        while asks:
            rounds += 1
            wanted: dict[str, tuple] = {}
            keys: dict[int, list[str]] = {}
            for i, ask in asks.items():
                cand = results[i].candidate
                keys[i] = []
                for load, replicas in ask:
                    exps = [cand.experiment(load, replicas, plan.seed + k) for k in range(plan.search.replicates)]
                    key = _probe_key(exps)
                    keys[i].append(key)
                    if key not in cache and key not in wanted:
                        wanted[key] = (exps, {"candidate": cand.label, "load": load, "replicas": replicas})
            if wanted:
                if executor is None:  # not capped by this round's size: later rounds may be larger
                    executor = make_executor(workers, ray_address)
                order = list(wanted)
                if progress:
                    echo(f"round {rounds}: {len(order)} probes on {executor.describe()}")
                for t, outcome in executor.map_unordered(run_probe, [(wanted[k][0],) for k in order]):
                    about = wanted[order[t]][1]
                    cache.put(order[t], outcome, about)
                    if progress:
                        echo(f"  {about['candidate']} @ {about['load']:g} {plan.load.unit} x{about['replicas']}: "
                             f"{outcome.completed}/{outcome.num_requests} completed, {outcome.wall_s:.1f} s")
            for i in list(asks):
                probes = [Probe(load, r, cache[k], judge(cache[k], plan.slo, plan.search.confidence))
                          for (load, r), k in zip(asks[i], keys[i])]
                try:
                    asks[i] = searches[i].send(probes)
                except StopIteration:
                    del asks[i]
    finally:
        if own and executor is not None:
            executor.close()
    return PlanResult(plan, results)
