"""Running a claims config: the experiment, its variants, their other seeds and the sweeps; then judging.

`run_claims(config, DIR)` simulates into DIR (sim.lab.simulate.run_experiment):

    DIR/                          the config at its own seed (every cell: the plots use it)
    DIR/seeds/seed=<s>/           the cells of its test figures at each further seed (summaries only)
    DIR/variants/<label>/         a variant some figures are measured in (`set = {...}`), and its seeds/
    DIR/sweeps/<id>/<value>/      each sweep value, at the config's seed (sweeps explore assumptions)

and writes DIR/claims.csv (one row per figure: class, published, simulated median and range over
seeds, each seed's verdict, the verdict), DIR/sweeps.csv and DIR/audit.txt.

Plain Python, no JAX.
"""
from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from sim.lab.audit import audit_experiment, figure_bound, format_audit, queueing_checks
from sim.lab.claims.results import Results, update_cell_stats
from sim.lab.claims.schema import ENGINE_LEVEL, Claims, Figure, derive_experiment, parse_claims, sweep_experiment
from sim.lab.claims.verdicts import across_seeds, check, ratio, verdict
from sim.lab.experiment import Experiment, load_experiment
from sim.lab.simulate import run_experiment

CLAIMS_COLUMNS = ("id", "class", "claim", "engine", "cell", "metric", "unit", "published", "published_text",
                  "published_lo", "published_hi", "op", "simulated", "sim_min", "sim_max", "seeds", "seed_values",
                  "seed_verdicts", "ratio", "bound", "bound_kind", "verdict", "check", "queueing", "source", "notes",
                  "reading", "class_note", "audit")
#: Files a further seed's run does not keep (its summary and KV statistics are all the verdicts read).
_SEED_RUN_DROPS = ("requests.csv", "itl_histograms.json", "timeseries.csv")


@dataclass
class Run:
    """One experiment (the config or a variant) and its results at each seed simulated."""

    exp: Experiment
    dir: Path
    results: dict[int, Results] = field(default_factory=dict)  # seed -> results (the exp's own seed first)


@dataclass
class ClaimsReport:
    """What a claims run produced."""

    exp: Experiment
    claims: Claims
    out_dir: Path
    table: pd.DataFrame  # one row per published figure
    sweeps: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per (sweep value, figure)
    audit_text: str = ""


def _metric(results: Results, f: Figure) -> float:
    """The simulated value of a figure in one run (a ratio when ratio_to is set); NaN when missing."""
    try:
        sim = results.metric(f.metric, f.engine, f.concurrency, f.rate, f.tokens_per_request)
        if f.ratio_to is not None:
            base = results.metric(f.metric, f.ratio_to, f.concurrency, f.rate, f.tokens_per_request)
            sim = sim / base if base else math.nan
    except KeyError:
        sim = math.nan
    return sim


def evaluate(claims: Claims, runs: dict[str, Run], figures: tuple[Figure, ...] | None = None,
             queue: dict | None = None) -> list[dict]:
    """One row per figure: class, published, simulated (median over seeds for tests), range, verdicts, bound."""
    rows = []
    for f in figures if figures is not None else claims.figures:
        run = runs[f.variant]
        seeds = sorted(run.results) if f.is_test else [run.exp.seed]
        values = [_metric(run.results[s], f) for s in seeds if s in run.results]
        b = figure_bound(run.exp, f)
        per_seed = [verdict(f.value, v, f.op, b) for v in values]
        finite = [v for v in values if math.isfinite(v)]
        sim = statistics.median(finite) if finite else math.nan
        pub = f.point_value
        q = (queue or {}).get(f.id)
        rows.append({
            "id": f.id, "class": f.cls, "claim": f.claim, "engine": f.engine, "cell": f.cell_label,
            "metric": f.metric, "unit": f.unit, "published": pub, "published_text": f.published_text,
            "published_lo": f.value[0] if f.is_range else pub, "published_hi": f.value[1] if f.is_range else pub,
            "op": f.op, "simulated": sim, "sim_min": min(finite) if finite else math.nan,
            "sim_max": max(finite) if finite else math.nan, "seeds": ";".join(map(str, seeds)),
            "seed_values": ";".join(f"{v:.6g}" for v in values), "seed_verdicts": ";".join(per_seed),
            "ratio": ratio(f.value, sim), "bound": b.value if b is not None else math.nan,
            "bound_kind": b.kind if b is not None else "",
            "verdict": across_seeds(per_seed) if f.is_test else f.cls,
            "check": "" if f.is_test else check(f.value, sim, f.op),
            "queueing": q.text if q is not None and q.violated else "",
            "source": f.source, "notes": f.notes, "reading": f.reading, "class_note": f.class_note,
            "audit": b.describe(pub, f.unit) if b is not None else "",
        })
    return rows


def _cells_of(exp: Experiment, figures: list[Figure]) -> tuple[tuple | None, tuple | None]:
    """(engines, loads) the figures read: their engines and cells (None: all loads)."""
    engines = tuple(dict.fromkeys(e for f in figures for e in (f.engine, f.ratio_to) if e is not None))
    loads: list = []
    for f in figures:
        load = f.concurrency if f.concurrency is not None else f.rate
        if load is None or f.metric in ENGINE_LEVEL:
            return engines, None
        loads.append(load)
    loads = list(dict.fromkeys(loads))
    return engines, (None if set(loads) == set(exp.workload.loads) else tuple(loads))


def _simulate(exp: Experiment, out: Path, reuse: bool, progress: bool, echo, summaries_only: bool = False) -> Results:
    """run_experiment into out (resuming when reuse), then the per-cell KV statistics; the results."""
    out.mkdir(parents=True, exist_ok=True)
    if not reuse:  # run_experiment appends to timeseries.csv; a fresh run must not keep an old one
        for name in ("timeseries.csv", "cell_stats.json"):
            (out / name).unlink(missing_ok=True)
    run_experiment(exp, out, resume=reuse, progress=progress, echo=echo)
    _relative_trace_path(exp, out)
    update_cell_stats(out)
    if summaries_only:
        for name in _SEED_RUN_DROPS:
            (out / name).unlink(missing_ok=True)
    return Results(exp, out)


def _relative_trace_path(exp: Experiment, out: Path) -> None:
    """Write a trace workload's path in out/experiment.toml relative to that file (results hold no machine paths)."""
    if exp.workload.kind != "trace":
        return
    toml = out / "experiment.toml"
    rel = Path(os.path.relpath(exp.workload.path, out.resolve())).as_posix()
    toml.write_text(toml.read_text().replace(json.dumps(exp.workload.path), json.dumps(rel)))


def _run(exp: Experiment, claims: Claims, label: str, out: Path, reuse: bool, progress: bool, echo) -> Run:
    """One experiment at its seed (all cells), then its test figures' cells at each further seed."""
    quiet = (lambda _m: None)
    run = Run(exp, out)
    run.results[exp.seed] = _simulate(exp, out, reuse, progress, echo if progress else quiet)
    tests = [f for f in claims.figures if f.variant == label and f.is_test]
    if not tests:
        return run
    engines, loads = _cells_of(exp, tests)
    for k in range(1, claims.seeds):
        seed = exp.seed + k
        sexp = derive_experiment(exp, engines=engines, loads=loads, seed=seed, name=f"{exp.name}-seed{seed}")
        run.results[seed] = _simulate(sexp, out / "seeds" / f"seed={seed}", reuse, False, quiet, summaries_only=True)
    return run


def run_claims(config: str | Path | Experiment, out_dir: str | Path, *, reuse: bool = False, progress: bool = False,
               echo=print) -> ClaimsReport:
    """Run (or, with reuse, resume) a claims config, its variants, seeds and sweeps; write claims.csv, sweeps.csv,
    audit.txt."""
    exp = config if isinstance(config, Experiment) else load_experiment(config)
    claims = parse_claims(exp)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = {}
    for label, settings in claims.variants().items():
        vexp = exp if not label else derive_experiment(exp, settings=settings, where=f"published.figures set {label}")
        runs[label] = _run(vexp, claims, label, out if not label else out / "variants" / label, reuse, progress, echo)
    queue = {q.id: q for q in queueing_checks(exp, claims.figures)}
    table = pd.DataFrame(evaluate(claims, runs, queue=queue), columns=list(CLAIMS_COLUMNS))
    table.to_csv(out / "claims.csv", index=False, float_format="%.6g")

    sweep_rows = []
    for sw in claims.sweeps:
        figs = tuple(claims.figure(x) for x in sw.figures)
        for value in sw.values:
            sexp = sweep_experiment(exp, sw, value)
            sdir = out / "sweeps" / sw.id / sw.dir_name(value)
            res = _simulate(sexp, sdir, reuse, False, lambda _m: None)
            single = {"": Run(sexp, sdir, {sexp.seed: res})}
            for r in evaluate(claims, single, figs):
                sweep_rows.append({"sweep": sw.id, "title": sw.title, "param": sw.param, "value": value,
                                   "dir": str(sdir.relative_to(out)), **r})
    sweeps = pd.DataFrame(sweep_rows)
    if len(sweeps):
        sweeps.to_csv(out / "sweeps.csv", index=False, float_format="%.6g")
    else:
        (out / "sweeps.csv").unlink(missing_ok=True)
    audit_text = format_audit(exp, audit_experiment(exp, claims.figures, lambda f: runs[f.variant].exp),
                              list(queue.values()))
    (out / "audit.txt").write_text(audit_text + "\n")
    return ClaimsReport(exp, claims, out, table, sweeps, audit_text)


def load_report(config: str | Path | Experiment, out_dir: str | Path) -> ClaimsReport:
    """A ClaimsReport from a results directory already written by run_claims (read back from its files)."""
    exp = config if isinstance(config, Experiment) else load_experiment(config)
    out = Path(out_dir)
    claims = parse_claims(exp)
    table = pd.read_csv(out / "claims.csv", keep_default_na=False, na_values=[""])
    sweeps = pd.read_csv(out / "sweeps.csv", keep_default_na=False, na_values=[""]) \
        if (out / "sweeps.csv").exists() else pd.DataFrame()
    audit = (out / "audit.txt").read_text() if (out / "audit.txt").exists() else ""
    return ClaimsReport(exp, claims, out, table, sweeps, audit)
