"""`servesim validate`: the simulator against the reference engine on this machine, same config.

1. profile the reference engine here (sim.lab.profile.run_profile) unless a profile is given,
   over the regime the experiments serve (contexts up to their engines' longest context);
2. run the experiment on the real engine (sim.lab.bench.run_bench) into DIR/bench; a step
   shape first compiled during a measured run is compiled off the engine's clock (one
   compilation costs ~1-2 s on CPU, hundreds of steps; open-loop arrivals keep meeting new
   bucket combinations that no warm-up foresees), so the bench measures a fully compiled engine;
3. run it on the simulator with cost_model = {kind="calibrated", profile=...} and no hardware
   preset (so each engine plans its KV cache exactly as the bench does) into DIR/sim;
4. DIR/errors.csv: cell, metric, measured, predicted, error_pct ((pred - meas) / meas * 100);
5. DIR/fidelity.png: predicted vs measured, one panel per metric, y = x with +-5% / +-10% bands.

The simulator's step time is the calibrated model's: runner.execute (model + prepare + sampling +
token transfer) from the profile's step rows of the engine's KV layout, priced on the padded
shapes the runner builds (reference.buckets), plus the engine's host work outside the runner
(schedule + update + loop) from its 'host' rows. Nothing is fitted per experiment.

Where do errors come from? DIR/steps_check.csv replays the bench's own steps (DIR/bench/steps.csv.gz:
the real shape and time of every step) through the cost model: per cell, the measured and predicted
sums of execute_s and of host time (schedule_s + update_s), and the wall time outside steps (idle
or loop). If the per-step sums agree but the metrics do not, the error is not the cost model's.

With clock = "model" the bench runs the engine on the calibrated model's clock (each step takes its
predicted time): the simulator must then match it to rounding in every cell, which checks the
workload, the schedulers, the drivers and the metrics, everything but the cost model.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from reference.batch import StepShape
from reference.errors import ConfigError
from sim.lab.bench import run_bench
from sim.lab.figures import subplots
from sim.lab.experiment import CalibratedConfig, Experiment, load_experiment
from sim.lab.metrics import load_results
from sim.lab.profile import run_profile
from sim.lab.simulate import run_experiment

METRICS = ("output_throughput", "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "mean_e2el_ms", "p99_e2el_ms")
TARGETS = {"output_throughput": 5.0, "mean_e2el_ms": 5.0, "p99_e2el_ms": 5.0, "mean_ttft_ms": 10.0,
           "p99_ttft_ms": 10.0, "mean_tpot_ms": 10.0}  # |error| targets, percent


def drop_token_times(requests_csv: str | Path) -> None:
    """Blank the per-token timestamps of a bench's requests.csv (its ITL summaries are already written): MBs saved."""
    path = Path(requests_csv)
    df = pd.read_csv(path, keep_default_na=False, dtype=str)
    if "token_times_s" in df.columns and (df["token_times_s"] != "").any():
        df["token_times_s"] = ""
        df.to_csv(path, index=False)


def sim_experiment(exp: Experiment, profile: str | Path) -> Experiment:
    """The same experiment for the simulator: calibrated cost model from the profile, no hardware preset."""
    hardware = exp.hardware.model_copy(update=dict(preset=None, replicas=1, tp=1))
    cost = CalibratedConfig(kind="calibrated", profile=str(Path(profile).resolve()))
    return exp.model_copy(update=dict(cost_model=cost, hardware=hardware))


def compare(bench_dir: str | Path, sim_dir: str | Path, metrics=METRICS) -> pd.DataFrame:
    """errors.csv rows: one per (cell, metric) present in both summaries."""
    _, meas = load_results(bench_dir)
    _, pred = load_results(sim_dir)
    pred = pred.set_index("cell")
    rows = []
    for _, m in meas.iterrows():
        if m["cell"] not in pred.index:
            continue
        p = pred.loc[m["cell"]]
        for k in metrics:
            mv, pv = float(m.get(k, np.nan)), float(p.get(k, np.nan))
            err = (pv - mv) / mv * 100 if np.isfinite(mv) and mv != 0 and np.isfinite(pv) else np.nan
            rows.append(dict(cell=m["cell"], metric=k, measured=mv, predicted=pv, error_pct=err))
    return pd.DataFrame(rows, columns=["cell", "metric", "measured", "predicted", "error_pct"])


def error_table(errors: pd.DataFrame, targets: dict[str, float] | None = None) -> pd.DataFrame:
    """Median and worst |error| per metric, with the worst cell and how many cells meet the target (default TARGETS)."""
    targets = TARGETS if targets is None else targets
    out = []
    for k, g in errors.groupby("metric", sort=False):
        a = g["error_pct"].abs()
        worst = g.loc[a.idxmax()] if a.notna().any() else None
        out.append(dict(metric=k, cells=int(a.notna().sum()), median_abs_pct=float(a.median()),
                        worst_abs_pct=float(a.max()), worst_cell=None if worst is None else worst["cell"],
                        target_pct=targets.get(k), within_target=int((a <= targets.get(k, np.inf)).sum())))
    return pd.DataFrame(out)


def format_error_table(table: pd.DataFrame) -> str:
    lines = [f"{'metric':<18} {'cells':>5} {'median|err|%':>12} {'worst|err|%':>11} {'target':>6} {'ok':>5}  worst cell"]
    for r in table.itertuples():
        lines.append(f"{r.metric:<18} {r.cells:>5} {r.median_abs_pct:>12.1f} {r.worst_abs_pct:>11.1f} "
                     f"{r.target_pct:>6.0f} {r.within_target:>2}/{r.cells:<2}  {r.worst_cell}")
    return "\n".join(lines)


def check_steps(steps_path: str | Path, cost, engine: str | None = None) -> pd.DataFrame:
    """Per cell (of `engine`, or all): the bench's measured step times vs the cost model's predictions for the same shapes.

    exec_* = runner.execute (the profile's step rows); host_* = schedule + update (the 'host' rows);
    span_s = first step start to last step end; outside_s = span - sum of step times (idle, arrivals, loop).
    """
    steps = pd.read_csv(steps_path)
    if engine is not None:  # each engine's steps are priced by its own cost model (its layout's padding)
        steps = steps[steps.cell.str.split("@").str[0] == engine]
    fields = StepShape.__slots__
    if not set(fields) <= set(steps.columns):
        raise ConfigError("steps", f"{steps_path} lacks the step-shape columns {list(fields)}; re-run the bench")
    shapes = [StepShape(*map(int, row)) for row in steps[list(fields)].itertuples(index=False)]
    steps = steps.assign(
        pred_exec_s=[cost.device_seconds(s) for s in shapes], pred_host_s=[cost.host_seconds(s) for s in shapes],
        host_s=steps.schedule_s + steps.update_s, kind=[s.kind for s in shapes])
    rows = []
    for cell, g in steps.groupby("cell", sort=False):
        span = float((g.start_s + g.schedule_s + g.execute_s + g.update_s).max() - g.start_s.min())
        row = dict(cell=cell, steps=len(g), exec_s=g.execute_s.sum(), pred_exec_s=g.pred_exec_s.sum(),
                   host_s=g.host_s.sum(), pred_host_s=g.pred_host_s.sum(), span_s=span,
                   outside_s=span - float((g.execute_s + g.host_s).sum()))
        row["exec_err_pct"] = _pct(row["pred_exec_s"], row["exec_s"])
        row["host_err_pct"] = _pct(row["pred_host_s"], row["host_s"])  # nan on the model's clock: no host time
        row["step_err_pct"] = _pct(row["pred_exec_s"] + row["pred_host_s"], row["exec_s"] + row["host_s"])
        for kind in ("decode", "prefill", "mixed"):
            k = g[g.kind == kind]
            row[f"{kind}_steps"] = len(k)
            row[f"{kind}_exec_err_pct"] = ((k.pred_exec_s.sum() - k.execute_s.sum()) / k.execute_s.sum() * 100
                                           if len(k) else np.nan)
        rows.append(row)
    return pd.DataFrame(rows)


def _pct(predicted: float, measured: float) -> float:
    """(predicted - measured) / measured in percent; nan when nothing was measured."""
    return (predicted - measured) / measured * 100 if measured else np.nan


def plot_fidelity(errors: pd.DataFrame, path: str | Path, measured: str = "measured (reference engine)") -> Path:
    """Predicted vs measured, one panel per metric: y = x, +-5% and +-10% bands; `measured` labels the x axes."""

    metrics = [m for m in METRICS if m in set(errors.metric)]
    cols = 3
    rows = -(-len(metrics) // cols)
    fig, axes = subplots(rows, cols, figsize=(4.2 * cols, 4 * rows), squeeze=False)
    for ax, k in zip(axes.flat, metrics):
        g = errors[errors.metric == k].dropna(subset=["measured", "predicted"])
        lo = min(g.measured.min(), g.predicted.min()) * 0.8
        hi = max(g.measured.max(), g.predicted.max()) * 1.2
        x = np.geomspace(max(lo, 1e-9), hi, 50)
        ax.fill_between(x, x * 0.9, x * 1.1, color="tab:orange", alpha=0.15, label="±10%")
        ax.fill_between(x, x * 0.95, x * 1.05, color="tab:green", alpha=0.25, label="±5%")
        ax.plot(x, x, "k-", lw=0.8, label="y = x")
        engines = g.cell.str.split("@").str[0]
        for e in sorted(set(engines)):
            s = g[engines == e]
            ax.scatter(s.measured, s.predicted, s=18, label=e)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(x[0], x[-1])
        ax.set_ylim(x[0], x[-1])
        ax.set_title(k)
        ax.set_xlabel(measured)
        ax.set_ylabel("predicted (simulator)")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    return path


def run_validate(configs, out_dir: str | Path, profile: str | Path | None = None, *, grid="default",
                 progress: bool = True, echo=print, clock: str = "wall") -> pd.DataFrame:
    """Profile (unless given), bench, simulate, compare. configs: one path or several (each into DIR/<name>/).

    clock "wall" measures this machine; "model" runs the engine on the calibrated model's clock (see
    the module docstring), where every error must be zero to rounding.
    """
    configs = [configs] if isinstance(configs, (str, Path)) else list(configs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    exps = [load_experiment(c) for c in configs]
    if profile is None:
        profile = out / "profile.csv"
        if not profile.exists():
            echo(f"profiling {exps[0].model_spec.name} on this machine -> {profile}")
            # The regime the experiments serve: no sequence is longer than its engine's context.
            longest = max(e.context_len for x in exps for e in x.engines)
            run_profile(exps[0].model_spec.name, profile, dtype=exps[0].dtype, grid=grid, progress=progress,
                        max_context=longest)
    all_errors, all_checks = [], []
    for exp in exps:
        sub = out if len(exps) == 1 else out / exp.name
        sexp = sim_experiment(exp, profile)
        run_bench(sexp if clock == "model" else exp, sub / "bench", progress=progress, echo=echo, clock=clock)
        drop_token_times(sub / "bench" / "requests.csv")
        run_experiment(sexp, sub / "sim", progress=progress, echo=echo)
        errors = compare(sub / "bench", sub / "sim")
        checks = pd.concat([check_steps(sub / "bench" / "steps.csv.gz", sexp.cost_model_for(e), e.name)
                            for e in sexp.engines], ignore_index=True)
        if len(exps) > 1:
            errors.insert(0, "experiment", exp.name)
            checks.insert(0, "experiment", exp.name)
        all_errors.append(errors)
        all_checks.append(checks)
    errors = pd.concat(all_errors, ignore_index=True)
    if "experiment" in errors.columns:  # one cell column, as the schema says
        errors["cell"] = errors.pop("experiment") + ":" + errors["cell"]
    errors.to_csv(out / "errors.csv", index=False, float_format="%.8g")
    checks = pd.concat(all_checks, ignore_index=True)
    checks.to_csv(out / "steps_check.csv", index=False, float_format="%.6g")
    table = error_table(errors)
    table.to_csv(out / "error_summary.csv", index=False, float_format="%.4g")
    echo(format_error_table(table))
    cols = ["cell", "steps", "exec_err_pct", "host_err_pct", "step_err_pct", "outside_s", "span_s"]
    if "experiment" in checks.columns:
        checks["cell"] = checks.pop("experiment") + ":" + checks["cell"]
    echo("\nper-step check (bench steps through the cost model):")
    echo(checks[cols].to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    echo(f"figure: {plot_fidelity(errors, out / 'fidelity.png')}")
    return errors
