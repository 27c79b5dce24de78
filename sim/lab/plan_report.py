"""The planner's answer as files: a table, a figure, a paragraph, and every probe behind them.

    write_plan_report(result, DIR) -> paths of
      DIR/plan.toml          the plan, defaults filled in
      DIR/capacity.csv       one row per candidate: capacity of one unit (its replicas x tp GPUs), and the cheapest deployment of it
                             at the target (replicas, GPUs, USD per hour, USD per million output tokens)
      DIR/curve.csv          every candidate's curve: the fewest replicas meeting the SLOs at each load
      DIR/probes.csv         every probe: load, replicas, each objective's estimate and confidence bound
      DIR/plan.md            the paragraph, the table, the physics of each number, prices and method
      DIR/cost_vs_load.png   USD per million output tokens against load, one line per candidate

Everything is a function of the probes (themselves a function of the plan and its seed), so the same
plan writes the same files; simulation wall times are not written.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

from matplotlib.ticker import FuncFormatter, NullFormatter

from sim.lab.figures import subplots
from sim.lab.plan_config import Plan
from sim.lab.planner import CandidateResult, PlanResult
from sim.lab.prices import PRICE_SOURCE

METHOD = ("Capacity = the highest load at which one unit of the candidate (its replicas x tp GPUs) met every "
          "objective, found on the simulator by a galloping search (doubling the load from the range's min until "
          "a probe misses) and bisection (to one user, or to {tol:.0%} of a rate). Each percentile is judged on its one-sided "
          "{conf:.0%} upper confidence bound (an order statistic of the probe's {req} requests; failed requests "
          "count as infinitely late), goodput on the {conf:.0%} lower bound of the good fraction; every probe "
          "replays the same requests (seed {seed}, common random numbers){reps}. Requests of one run are "
          "correlated, so the confidence is nominal. Above one unit's capacity, the planner adds replicas "
          "(behind a {router} router) until a probe at that load meets the SLOs.")


def _fmt_load(x: float | None, plan: Plan) -> str:
    if x is None:
        return "-"
    return f"{int(x)}" if plan.load.is_users else f"{x:.3g}"


def _load_text(x: float | None, plan: Plan) -> str:
    """'1 user', '5 users', '2.5 req/s'."""
    unit = "user" if plan.load.is_users and x == 1 else plan.load.unit
    return f"{_fmt_load(x, plan)} {unit}"


def _money(x: float | None, digits: int = 2) -> str:
    return "-" if x is None or math.isinf(x) else f"${x:,.{digits}f}"


def capacity_text(r: CandidateResult, plan: Plan) -> str:
    """'4 users (misses at 5)', '>= 1000 users (the search's max)', 'none: misses at 1 user (p95 E2E 7,912 ms)',
    'does not fit', 'cannot be priced'."""
    if r.unfit:
        return r.unfit.split(":")[0]
    if r.capacity is None:
        first = r.probes[0].checks[0] if r.probes and r.probes[0].checks else None
        why = f" ({_check_text(first)})" if first is not None else ""
        return f"none: misses at {_load_text(plan.load.min, plan)}{why}"
    if r.capacity_at_max:
        return f">= {_load_text(r.capacity, plan)} (the search's max)"
    return (f"{_load_text(r.capacity, plan)} (misses at {_fmt_load(r.first_failure, plan)})"
            + (" (noisy)" if r.noisy else ""))


def _check_text(c) -> str:
    if c.name == "goodput_fraction":
        return f"good fraction {c.estimate:.1%}"
    stat, metric, _ = c.name.split("_")
    return f"{stat} {_metric(metric)} {c.estimate:,.0f} ms"


def capacity_rows(result: PlanResult) -> list[dict]:
    """One row per candidate (capacity.csv and the markdown table)."""
    plan = result.plan
    target = plan.load.target
    rows = []
    for i, r in enumerate(result.results, 1):
        p = r.point(target)
        row = {"candidate": r.candidate.label, "physics_note": i, "unit_gpus": r.candidate.unit_gpus,
               "usd_per_gpu_hour": r.usd_per_gpu_hour, "capacity_per_unit": capacity_text(r, plan),
               "target_replicas": p.replicas if p else None, "target_gpus": p.gpus if p else None,
               "target_usd_per_hour": p.usd_per_hour if p else None,
               "target_usd_per_mtok": p.usd_per_mtok if p else None,
               "target_output_tok_s": p.probe.outcome.output_throughput if p and p.replicas else None}
        for name, _, _ in _objectives(plan):
            c = p.probe.check(name) if p and p.replicas else None
            row[f"target_{name}"] = c.estimate if c else None
            row[f"target_{name}_bound"] = c.bound if c else None
        row["status"] = _status(r, plan)
        rows.append(row)
    return rows


def _objectives(plan: Plan) -> list[tuple[str, str, float]]:
    """(check name, label, limit) per objective."""
    out = [(f"p{round(q * 100)}_{m}_ms", f"p{round(q * 100)} {_metric(m)} (ms)", v) for m, q, v in plan.slo.percentiles()]
    if plan.slo.goodput is not None:
        out.append(("goodput_fraction", "good fraction", plan.slo.goodput.min_fraction))
    return out


def _metric(m: str) -> str:
    return {"ttft": "TTFT", "tpot": "TPOT", "e2el": "E2E"}[m]


def _status(r: CandidateResult, plan: Plan) -> str:
    if r.unfit:
        return r.unfit
    if r.capacity is None:
        return f"misses the SLOs at {_load_text(plan.load.min, plan)} on one unit"
    p = r.point(plan.load.target)
    if p is None or p.replicas is None:
        return f"needs more than {plan.search.max_replicas} replicas for the target"
    return "serves the target"


def curve_rows(result: PlanResult) -> list[dict]:
    """Every candidate's curve points (curve.csv)."""
    rows = []
    for r in result.results:
        for p in r.points:
            rows.append({"candidate": r.candidate.label, "load": p.load, "replicas": p.replicas, "gpus": p.gpus,
                         "usd_per_hour": p.usd_per_hour, "usd_per_mtok": p.usd_per_mtok,
                         "output_tok_s": p.probe.outcome.output_throughput, "meets": p.probe.meets})
    return rows


def probe_rows(result: PlanResult) -> list[dict]:
    """Every probe of every candidate, in the order the search asked for them (probes.csv)."""
    rows = []
    for r in result.results:
        for p in r.probes:
            o = p.outcome
            row = {"candidate": r.candidate.label, "load": p.load, "replicas": p.replicas,
                   "gpus": p.replicas * r.candidate.tp, "requests": o.num_requests, "completed": o.completed,
                   "output_tok_s": o.output_throughput, "sim_duration_s": o.duration_s, "meets": p.meets}
            for c in p.checks:
                row[c.name] = c.estimate
                row[f"{c.name}_bound"] = c.bound
            rows.append(row)
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    cols: list[str] = []
    for row in rows:
        cols += [k for k in row if k not in cols]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, lineterminator="\n")
        w.writeheader()
        for row in rows:
            w.writerow({k: _cell(v) for k, v in row.items()})


def _cell(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.10g}"
    return v


def _dist_text(d: dict) -> str:
    kind = d["dist"]
    if kind == "fixed":
        return f"{d['value']}"
    if kind == "uniform":
        return f"uniform {d['low']}-{d['high']}"
    if kind == "lognormal":
        centre = f"median {d['median']}" if d.get("median") is not None else f"mean {d.get('mean')}"
        return f"lognormal ({centre}, sigma {d['sigma']})"
    return f"empirical ({len(d['values'])} values)"


def workload_text(plan: Plan) -> str:
    """'100 prompt tokens in, 200 out' and the shared prefix, think time."""
    w = plan.workload
    text = f"{_dist_text(w.prompt_tokens.to_dict())} prompt tokens in, {_dist_text(w.output_tokens.to_dict())} out"
    if w.shared_prefix is not None:
        sp = w.shared_prefix
        text += f", {sp.fraction:.0%} of requests sharing one of {sp.num_prefixes} {sp.tokens}-token prefixes"
    if plan.load.is_users:
        think = plan.load.think_time_s
        text += f", {'no think time' if not think else f'{think:g} s {plan.load.think_time_dist} think time'}"
    else:
        text += ", Poisson arrivals"
    return text


def answer_paragraph(result: PlanResult) -> str:
    """The one-paragraph answer: the cheapest configuration for the target, each candidate's capacity, the physics."""
    plan = result.plan
    target = plan.load.target
    best = result.best()
    head = (f"{plan.model} for {_load_text(target, plan)} ({workload_text(plan)}) under "
            f"{plan.slo.describe()}: ")
    if best is None:
        head += (f"no candidate serves the target within {plan.search.max_replicas} replicas. ")
    else:
        p = best.point(target)
        head += (f"the cheapest configuration is {best.candidate.label}, {p.replicas} "
                 f"{'replica' if p.replicas == 1 else 'replicas'} = {p.gpus} GPU{'s' if p.gpus > 1 else ''} at "
                 f"{_money(p.usd_per_hour)}/h ({_money(p.usd_per_mtok)} per million output tokens). ")
    caps = []
    for r in result.results:
        p = r.point(target)
        tail = ""
        if p is not None and p.replicas is not None and r is not best:
            tail = f"; target: {p.gpus} GPUs, {_money(p.usd_per_hour)}/h, {_money(p.usd_per_mtok)}/M tok"
        elif r.capacity is not None and (p is None or p.replicas is None):
            tail = f"; target: more than {plan.search.max_replicas} replicas"
        gpus = r.candidate.unit_gpus
        caps.append(f"{r.candidate.label} ({gpus} GPU{'s' if gpus > 1 else ''}): "
                    + capacity_text(r, plan) + tail)
    body = "One unit of each candidate meets the SLOs up to: " + "; ".join(caps) + ". "
    runtimes = sorted({r.physics.split(" law")[0] for r in result.results if " law" in r.physics})
    physics = (f"Step times come from the {' and '.join(runtimes)} runtime laws fitted on published GPU "
               "measurements; each candidate's calibration status (card, model and weights measured or "
               "extrapolated) is listed under the table. " if runtimes else
               "Step times come from the cost model named under the table. ")
    listed = _prices(result)
    given = [f"{k} {_money(u)}" for k, (u, src) in listed.items() if src == "given"]
    default = [f"{k} {_money(u)}" for k, (u, src) in listed.items() if src != "given"]
    prices = "Prices per GPU-hour: " + "; ".join(
        ([", ".join(default) + f" ({PRICE_SOURCE})"] if default else []) + ([", ".join(given) + " (given in the plan)"]
                                                                           if given else [])) + "."
    return head + body + physics + prices


def markdown_table(rows: list[dict], plan: Plan) -> str:
    """The capacity table (capacity_rows) in markdown, physics as numbered notes."""
    objs = _objectives(plan)
    head = (["candidate", "GPUs per unit", "$/GPU-h", f"capacity per unit ({plan.load.unit})", "target: replicas",
             "GPUs", "$/h",
             "$/M output tok"] + [f"{label} at target (bound)" for _, label, _ in objs] + ["physics"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["candidate"], row["unit_gpus"], _money(row["usd_per_gpu_hour"]), row["capacity_per_unit"],
                 _dash(row["target_replicas"]), _dash(row["target_gpus"]), _money(row["target_usd_per_hour"]),
                 _money(row["target_usd_per_mtok"])]
        for name, _, _ in objs:
            est, bound = row[f"target_{name}"], row[f"target_{name}_bound"]
            if est is None:
                cells.append("-")
            elif name == "goodput_fraction":
                cells.append(f"{est:.1%} ({bound:.1%})")
            else:
                cells.append(f"{est:,.0f} ({'inf' if math.isinf(bound) else f'{bound:,.0f}'})")
        cells.append(f"[{row['physics_note']}]")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _dash(v) -> str:
    return "-" if v is None else str(v)


def plan_markdown(result: PlanResult) -> str:
    """plan.md: title, the answer, the table, physics notes, prices and method."""
    plan = result.plan
    rows = capacity_rows(result)
    s = plan.search
    reps = f", {s.replicates} replicates pooled per probe" if s.replicates > 1 else ""
    req = (f"max({s.min_requests}, {s.requests_per_user} x users)" if plan.load.is_users
           else f"max({s.min_requests}, rate x {s.duration_s:g} s)")
    lines = [f"# {plan.name}: {plan.model}", "", plan.description, "" if plan.description else None,
             answer_paragraph(result), "",
             f"Target: {_fmt_load(plan.load.target, plan)} {plan.load.unit}; SLOs: {plan.slo.describe()}; "
             f"workload: {workload_text(plan)}.", "", markdown_table(rows, plan), "",
             "![cost per million output tokens vs load](cost_vs_load.png)", "", "Physics of each row:", ""]
    lines += [f"{i}. {r.candidate.label}: " + (f"{r.physics} ({r.unfit})" if r.physics and r.unfit
                                                 else r.physics or r.unfit)
              for i, r in enumerate(result.results, 1)]
    lines += ["", "Prices (USD per GPU-hour): " + "; ".join(
        f"{preset} {_money(usd)} ({'given' if src == 'given' else 'default'})"
        for preset, (usd, src) in _prices(result).items()) + f". Defaults: {PRICE_SOURCE}.", "",
        "Method: " + METHOD.format(tol=s.rate_tolerance, conf=s.confidence, req=req, seed=plan.seed, reps=reps,
                                   router=plan.hardware.router.replace("_", "-")),
        "", "Files: capacity.csv (this table), curve.csv (every load of the figure), probes.csv (every simulated "
        "probe, with each objective's estimate and bound), plan.toml (the plan, defaults filled in).", ""]
    return "\n".join(x for x in lines if x is not None)


def _prices(result: PlanResult) -> dict[str, tuple[float, str]]:
    out = {}
    for r in result.results:
        out.setdefault(r.candidate.preset, (r.usd_per_gpu_hour, r.price_source))
    return out


def plot_cost(result: PlanResult, path: Path) -> Path:
    """USD per million output tokens (log) against load, one line per candidate over the loads it serves."""
    plan = result.plan
    fig, ax = subplots(figsize=(8.5, 5.2), constrained_layout=True)
    loads = plan.load.curve_loads()
    engines = list(dict.fromkeys(r.candidate.engine_name for r in result.results))
    styles = ["-", "--", ":", "-."]
    for r in result.results:
        pts = [p for p in r.points if p.replicas is not None and p.usd_per_mtok is not None]
        if not pts:  # listed in the legend, so the figure says why a candidate has no line
            ax.plot([], [], ls="none", label=f"not drawn: {r.candidate.label} ({capacity_text(r, plan)})")
            continue
        xs, ys = [p.load for p in pts], [p.usd_per_mtok for p in pts]
        style = styles[engines.index(r.candidate.engine_name) % len(styles)]
        line, = ax.plot(xs, ys, marker="o", ms=4, ls=style, label=f"{r.candidate.label} (one unit, {r.candidate.unit_gpus} GPU{'s' if r.candidate.unit_gpus > 1 else ''}: "
                              f"{capacity_text(r, plan)})")
        for p in pts:
            if p.load == plan.load.target:
                ax.annotate(f"{p.gpus} GPU{'s' if p.gpus > 1 else ''}", (p.load, p.usd_per_mtok), fontsize=7,
                            xytext=(4, 2), textcoords="offset points", color=line.get_color())
    ax.axvline(plan.load.target, color="0.6", lw=0.8, ls="--")
    if max(loads) / min(loads) > 10:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_yscale("log")
    dollars = FuncFormatter(lambda v, _: f"${v:g}")
    ax.yaxis.set_major_formatter(dollars)
    lo, hi = ax.get_ylim()
    ax.yaxis.set_minor_formatter(dollars if hi / lo < 30 else NullFormatter())  # label minor ticks on a short axis
    ax.set_xlabel(f"load ({plan.load.unit})")
    ax.set_ylabel("USD per million output tokens")
    ax.set_title(f"{plan.model}: the fewest replicas of each candidate that meet {plan.slo.describe()}, per load",
                 fontsize=9)
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=1, frameon=False)
    fig.savefig(path, dpi=130, metadata={"Software": None})
    return path


def write_plan_report(result: PlanResult, out_dir: str | Path) -> list[Path]:
    """Write the files of the module docstring into out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "plan.toml", out / "capacity.csv", out / "curve.csv", out / "probes.csv", out / "plan.md",
             out / "cost_vs_load.png"]
    paths[0].write_text(result.plan.to_toml())
    _write_csv(paths[1], capacity_rows(result))
    _write_csv(paths[2], curve_rows(result))
    _write_csv(paths[3], probe_rows(result))
    paths[4].write_text(plan_markdown(result))
    plot_cost(result, paths[5])
    return paths
