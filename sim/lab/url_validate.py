"""`servesim validate CONFIG... --url URL --out DIR`: the simulator against a running server it never saw run these cells.

1. profile the server as a black box (sim.lab.url_profile) into DIR/profile.csv, unless a
   profile is given: single prompts, synchronized decode batches and injected prompts, none of
   them a cell of the experiments;
2. run every cell of every CONFIG against the server (sim.lab.http_bench) into DIR/<name>/bench,
   sampling the server's /metrics meanwhile;
3. simulate the same cells into DIR/<name>/sim: the config's one engine (its scheduling model of
   the server: experiments/peers/*.toml) timed by the profile's law, plus the profile's request
   overhead o on the client's side (below);
4. DIR/errors.csv (cell, metric, measured, predicted, error_pct), DIR/error_summary.csv against
   TARGETS, DIR/server_checks.csv (what the server reported about its scheduler, next to what
   the simulated scheduler did), DIR/fidelity.png.

Each cell draws its own prompts: the experiment's seed + CELL_SEED_STRIDE x (the cell's index),
in the bench and in the simulation alike. Both real servers cache prompts across requests, and
cells of one workload repeat the same requests (common random numbers), so a later cell would
otherwise find its prompts cached by an earlier one; the simulator starts each cell empty.

Request overhead o (the profile's '# request_overhead_ms'): the time between the client and the
server's scheduler (HTTP, IPC) that TTFTs show and step gaps do not. The simulated client sees
each request's tokens o later (added to TTFT and E2E, not to ITL), and a closed-loop client sends
its next request o later on average, so the server's clock runs as in the real loop. That delay
is random, exponential with mean o, since the path it measures varies: vLLM's clients that start
together drift apart (one request misses the step another starts; measured TTFT at 2 to 8
clients 9-16% below a lockstep simulation, within 1% with the jitter). Where o is 0 the delay is
0: llama-server keeps its clients in lockstep (it launches every task queued before a step, and
launching one, with the prompt caches' saves, takes long enough for the others to arrive: at 2
and 4 clients every cycle's prompts share one step, measured TTFTs ~2x and ~4x one prompt's),
and so does the simulation. A workload's own fixed think time is kept, o added to it.

With capacity_fractions, an open-loop config's `rates` are fractions of the capacity measured in
this run: the highest request throughput among the closed-loop cells run before it (or of a
given capacity, so that a second run repeats the first run's rates).

The bench's per-token timestamps are dropped from requests.csv once its summaries are written
(ITL histograms keep the gaps), so a results folder stays small enough to commit. With bench =
False the measured cells already in DIR are judged again (simulation, comparison, checks): a
simulator that changed is held against the same measurements, without the server.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from reference.errors import ConfigError
from reference.request import Request
from sim.core.calibrated import read_profile
from sim.lab.experiment import Cell, Experiment, load_experiment
from sim.lab.http_bench import run_http_bench
from sim.lab.metrics import ResultsWriter, load_results
from sim.lab.simulate import simulate_cell
from sim.lab.url_profile import ServerInfo, discover, run_url_profile
from sim.lab.validate import compare, drop_token_times, error_table, format_error_table, plot_fidelity, sim_experiment

METRICS = ("output_throughput", "mean_ttft_ms", "mean_tpot_ms", "mean_e2el_ms", "p99_ttft_ms", "p99_e2el_ms")
TARGETS = {"output_throughput": 10.0, "mean_e2el_ms": 10.0, "mean_tpot_ms": 10.0, "mean_ttft_ms": 15.0}
CELL_SEED_STRIDE = 1_000  # cell i of an experiment draws its requests under seed + i x this
OPEN_LOOP_WARMUP = 4  # a real server compiled nothing per shape: a few requests warm the client and the server


def cell_experiments(exp: Experiment) -> list[tuple[Cell, Experiment]]:
    """One single-load experiment per cell of exp, each under its own seed (see the module docstring)."""
    w = exp.workload
    out = []
    for i, load in enumerate(w.loads):
        wl = w.model_copy(update={w.LOAD_KEY: (load,)}) if w.LOAD_KEY else w
        e = exp.model_copy(update={"seed": exp.seed + CELL_SEED_STRIDE * i, "workload": wl})
        out.append((Cell(exp.engines[0].name, **w.cell_fields(load)), e))
    return out


def with_capacity_rates(exp: Experiment, capacity: float) -> Experiment:
    """exp with its open-loop `rates` read as fractions of capacity (req/s)."""
    w = exp.workload
    if w.is_closed_loop or w.LOAD_KEY != "rates":
        raise ConfigError("workload.kind", "capacity fractions apply to poisson or gamma workloads",
                          "poisson | gamma")
    return exp.model_copy(update={"workload": w.model_copy(update={"rates": tuple(r * capacity for r in w.rates)})})


class _SeenLater:
    """Forwards finished simulated requests to an accumulator with their token times moved o seconds later."""

    def __init__(self, acc, overhead_s: float):
        self.acc, self.o = acc, overhead_s
        self.cached_prompt_tokens = 0

    def add(self, req: Request, client_id: int | None = None) -> dict:
        if self.o:
            req.token_times = [t + self.o for t in req.token_times]
            if req.first_token_time is not None:
                req.first_token_time += self.o
            if req.finish_time is not None:
                req.finish_time += self.o
        self.cached_prompt_tokens += req.num_cached_prompt_tokens
        return self.acc.add(req, client_id)


class _StepStats:
    """What the simulated scheduler did, in the units the servers report (server_metrics)."""

    def __init__(self):
        self.steps = self.tokens = self.busy = 0
        self.scheduler = None

    def on_scheduler(self, scheduler) -> None:
        self.scheduler = scheduler

    def on_step(self, now: float, out, dt: float) -> None:
        self.steps += 1
        self.tokens += out.shape.new_tokens
        self.busy += self.scheduler.num_running


def simulate_cells(pairs: list[tuple[Cell, Experiment]], profile: Path, overhead_s: float, out_dir: Path,
                   echo=print) -> dict[str, dict]:
    """Simulate each (cell, experiment) with the profile's law into out_dir; per cell, the scheduler facts."""
    writer = ResultsWriter(out_dir, resume=False)
    facts_by_cell = {}
    for cell, exp in pairs:
        sexp = sim_experiment(exp, profile)
        w = sexp.workload
        if w.is_closed_loop and overhead_s > 0:
            if w.think_time_s > 0:  # the workload's own think time, o on top (the same distribution)
                think = {"think_time_s": w.think_time_s + overhead_s}
            else:
                think = {"think_time_s": overhead_s, "think_time_dist": "exponential"}
            sexp = sexp.model_copy(update={"workload": w.model_copy(update=think)})
        engine = sexp.engine(cell.engine)
        cost = sexp.cost_model_for(engine)
        acc = writer.start_cell(cell.engine, cell.concurrency, cell.request_rate)
        seen, stats = _SeenLater(acc, overhead_s), _StepStats()
        facts = simulate_cell(sexp, cell, seen, cost, on_step=stats.on_step, on_scheduler=stats.on_scheduler)
        series = facts.pop("timeseries")
        span = float(series.time_s.max() - series.time_s.min()) if len(series) > 1 else 0.0
        sim = {"steps": stats.steps, "step_tokens": stats.tokens,
               "busy_per_step": stats.busy / stats.steps if stats.steps else 0.0,
               "running_mean": _time_mean(series, "running") if span else 0.0,
               "waiting_mean": _time_mean(series, "waiting") if span else 0.0,
               "cached_prompt_tokens": seen.cached_prompt_tokens,
               "cached_prompt_tokens_scheduler": getattr(stats.scheduler, "num_cached_tokens", None)}
        facts_by_cell[cell.label] = dict(facts, **sim)
        writer.finish_cell(acc, slo=sexp.slo, extra=dict(facts, sim=sim, request_overhead_s=overhead_s,
                                                         cost_model=cost.describe()))
    return facts_by_cell


def _time_mean(series: pd.DataFrame, col: str) -> float:
    t = series.time_s.to_numpy()
    v = series[col].to_numpy(dtype=float)
    return float(np.sum(v[:-1] * np.diff(t)) / (t[-1] - t[0]))


# What each server reports, and the simulated figure that answers it: (server key, simulated key, what).
CHECKS = {
    "vllm": (("vllm:iteration_tokens_total_count", "steps", "engine steps"),
             ("vllm:iteration_tokens_total_sum", "step_tokens", "tokens computed in steps"),
             ("vllm:num_requests_running_mean", "running_mean", "running requests, time mean"),
             ("vllm:num_requests_waiting_mean", "waiting_mean", "waiting requests, time mean"),
             ("vllm:num_preemptions_total", "preemptions", "preemptions"),
             ("vllm:prefix_cache_hits_total", "cached_prompt_tokens", "prefix-cache hit tokens"),
             ("vllm:kv_cache_usage_perc_max", "peak_kv_usage", "peak KV usage (fraction)")),
    "llama.cpp": (("llamacpp:n_decode_total", "steps", "llama_decode calls (steps)"),
                  ("llamacpp:busy_slots_per_decode", "busy_per_step", "busy slots per decode"),
                  ("llamacpp:requests_processing_mean", "running_mean", "busy slots, time mean"),
                  ("llamacpp:requests_deferred_mean", "waiting_mean", "deferred requests, time mean"),
                  ("llamacpp:prompt_tokens_cached_total", "cached_prompt_tokens", "prompt tokens from a cache")),
}


def server_checks(bench_dir: Path, sim_facts: dict[str, dict], kind: str) -> pd.DataFrame:
    """Per cell: each scheduler figure the server reported (its /metrics over the cell) beside the simulated one."""
    _, meas = load_results(bench_dir)
    rows = []
    for _, m in meas.iterrows():
        facts = sim_facts.get(m["cell"])
        if facts is None:
            continue
        for server_key, sim_key, what in CHECKS.get(kind, ()):
            sv = m.get(f"server_{server_key}")
            if sv is None or (isinstance(sv, float) and np.isnan(sv)):
                continue
            pv = float(facts.get(sim_key, np.nan))
            sv = float(sv)
            diff = (pv - sv) / sv * 100 if sv else (0.0 if pv == 0 else np.nan)
            rows.append(dict(cell=m["cell"], check=what, server=sv, simulated=pv, diff_pct=diff))
    return pd.DataFrame(rows, columns=["cell", "check", "server", "simulated", "diff_pct"])


def _check_recorded(name: str, sub: Path, recorded: list[dict] | None, cells: list[dict]) -> None:
    """Judging again needs the measured cells of this very config: the same cells under the same seeds."""
    if not (sub / "bench" / "summary.json").exists():
        raise ConfigError("out", f"no measured cells of {name} in {sub / 'bench'} to judge again",
                          "a folder an earlier `servesim validate --url` wrote")
    if recorded is not None and recorded != cells:
        raise ConfigError(f"{name}.workload", f"the config's cells {[(c['cell'], c['seed']) for c in cells]} are not "
                          f"the measured ones {[(c['cell'], c['seed']) for c in recorded]} (cells.json)",
                          "the config the cells were measured with (its bench/experiment.toml)")


def profile_overhead_s(profile: str | Path) -> float:
    """The request overhead a black-box profile measured (s; 0 when it says none)."""
    _, meta = read_profile(profile)
    try:
        return float(meta.get("request_overhead_ms", "0")) / 1e3
    except ValueError:
        raise ConfigError("profile.request_overhead_ms", f"not a number: {meta['request_overhead_ms']!r}") from None


def run_url_validate(configs, url: str, out_dir: str | Path, profile: str | Path | None = None, *,
                     grid: str = "default", capacity_fractions: bool = False, capacity: float | None = None,
                     echo=print, metrics_poll_s: float = 0.5, bench: bool = True) -> pd.DataFrame:
    """Profile (unless given), bench each cell against url, simulate it, compare; returns the errors table.

    configs: experiment paths, each with exactly one engine (the model of the server at url).
    capacity (req/s): with capacity_fractions, the capacity open-loop rates are fractions of
    (default: measured by the closed-loop configs of this run). bench = False: judge the cells
    measured in out_dir before again (url is then only recorded; the server need not run).
    """
    configs = [configs] if isinstance(configs, (str, Path)) else list(configs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    exps = [load_experiment(c) for c in configs]
    for exp in exps:
        if len(exp.engines) != 1:
            raise ConfigError(f"{exp.name}.engines", f"{len(exp.engines)} engines; a server is one engine",
                              "exactly one [engines.<name>] table: the model of the server at --url")
    if not bench:
        recorded = json.loads((out / "cells.json").read_text()) if (out / "cells.json").exists() else {}
        info = ServerInfo(recorded.get("url", url), "", recorded.get("server", "unknown"), None, None)
        capacity = capacity or recorded.get("capacity_req_s")
    else:
        info = discover(url)
    if profile is None:
        profile = out / "profile.csv"
        if not profile.exists() and not bench:
            raise ConfigError("profile", f"judging again needs the server's profile; none given and no {profile}",
                              "the profile the cells were judged with")
        if not profile.exists():
            echo(f"profiling {url} -> {profile}")
            run_url_profile(url, profile, grid=grid, vocab_size=exps[0].model_spec.vocab_size,
                            preset=exps[0].model, echo=echo)
    profile = Path(profile)
    overhead = profile_overhead_s(profile)
    fixed_capacity = capacity is not None
    capacity = capacity or 0.0
    all_errors, all_checks, cells_info = [], [], {}
    for exp in exps:
        if capacity_fractions and not exp.workload.is_closed_loop:
            if capacity <= 0:
                raise ConfigError("configs", f"{exp.name}: capacity fractions need a closed-loop config before it",
                                  "closed-loop configs first")
            exp = with_capacity_rates(exp, capacity)
            echo(f"{exp.name}: rates {[round(r, 3) for r in exp.workload.rates]} req/s "
                 f"(of a measured capacity of {capacity:.3f} req/s)")
        sub = out / exp.name
        pairs = cell_experiments(exp)
        cells_info[exp.name] = [dict(cell=c.label, seed=e.seed) for c, e in pairs]
        if bench:
            for cell, e in pairs:
                run_http_bench(e, url, sub / "bench", resume=True, engine=cell.engine, echo=echo,
                               metrics_poll_s=metrics_poll_s, open_loop_warmup=OPEN_LOOP_WARMUP)
            (sub / "bench" / "experiment.toml").write_text(exp.to_toml())  # the whole config (cells: cells.json)
            drop_token_times(sub / "bench" / "requests.csv")
        else:
            _check_recorded(exp.name, sub, recorded.get("cells", {}).get(exp.name), cells_info[exp.name])
        facts = simulate_cells(pairs, profile, overhead, sub / "sim", echo=echo)
        errors = compare(sub / "bench", sub / "sim", METRICS)
        checks = server_checks(sub / "bench", facts, info.kind)
        errors.insert(0, "experiment", exp.name)
        checks.insert(0, "experiment", exp.name)
        all_errors.append(errors)
        all_checks.append(checks)
        if exp.workload.is_closed_loop and not fixed_capacity:
            _, meas = load_results(sub / "bench")
            capacity = max(capacity, float(meas["request_throughput"].max()))
    (out / "cells.json").write_text(json.dumps(dict(url=info.base_url, server=info.kind, profile=str(profile),
                                                    request_overhead_s=overhead, capacity_req_s=capacity,
                                                    cells=cells_info), indent=1))
    errors = pd.concat(all_errors, ignore_index=True)
    errors["cell"] = errors.pop("experiment") + ":" + errors["cell"]
    errors.to_csv(out / "errors.csv", index=False, float_format="%.8g")
    checks = pd.concat(all_checks, ignore_index=True)
    checks["cell"] = checks.pop("experiment") + ":" + checks["cell"]
    checks.to_csv(out / "server_checks.csv", index=False, float_format="%.6g")
    table = error_table(errors[errors.metric.isin(TARGETS)], TARGETS)
    table.to_csv(out / "error_summary.csv", index=False, float_format="%.4g")
    echo(format_error_table(table))
    if len(checks):
        echo("\nthe server's /metrics against the simulated scheduler:")
        echo(checks.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    echo(f"figure: {plot_fidelity(errors, out / 'fidelity.png', measured=f'measured ({info.kind} server)')}")
    return errors
