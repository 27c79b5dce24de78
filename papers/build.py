"""Regenerate the reproduction paper from scratch: claims experiments -> figures -> papers/reproduction.md.

    python papers/build.py            # simulate every experiments/claims_*.toml into experiments/results/<name>/
    python papers/build.py --reuse    # keep the cells already simulated there (re-judge, redraw, rewrite)

Every number in the paper comes from the result files (claims.csv, sweeps.csv, summary.json,
cell_stats.json), the configs, the presets and the runtime laws' fit (experiments/measured), never
typed by hand: the text is a template filled from them. Figures go to papers/figures/ as PNG.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from sim.core.hardware import get_hardware
from sim.core.roofline import DEFAULT_COMPUTE_EFFICIENCY, DEFAULT_MEM_EFFICIENCY
from sim.core.runtimes import PARAM_SPECS, RUNTIMES, load_fit
from sim.lab import measured
from sim.lab.audit import bound_for, fmt_num, format_label, mean_lengths, model_label, queueing_checks
from sim.lab.claims import (TOLERANCE, ClaimsReport, Results, counts, counts_text, run_claims, simulated_text,
                            value_text, verdict_text)
from sim.lab.experiment import load_experiment
from sim.lab.figures import subplots
from sim.lab.peer_errors import ENGINES, engine_table, summary_line
from sim.lab.teaching import make_all
from sim.lab.validate import compare, error_table

ROOT = Path(__file__).resolve().parents[1]
TOL = f"{100 * TOLERANCE:g}%"  # the verdicts' tolerance, as text

VERDICT_MARK = {"reproduced": "reproduced", "differs": "**differs**", "physically implausible": "**implausible**",
                "flips": "**flips**"}
VERDICT_COLOUR = {"reproduced": "tab:green", "differs": "tab:orange", "physically implausible": "tab:red",
                  "flips": "tab:purple", "agrees": "tab:green", "disagrees": "tab:orange"}
RUNTIME_NAMES = {"llama.cpp": "llama.cpp", "vllm": "vLLM"}
ENGINE_COLOURS = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive"]
GROUP_TITLES = {"claims_a_h100_llama8b": "A. H100 SXM, Llama-3.1-8B: Ollama Q4_K_M vs vLLM FP16",
                "claims_b_blackwell_70b": "B. Blackwell B200, Llama-3.1-70B NVFP4",
                "claims_c_a100_llama8b": "C. A100 80GB, Llama-3.1-8B, 1 to 64 clients",
                "claims_d_pagedattention": "D. The PagedAttention paper: memory waste and throughput",
                "claims_e_vllm054_a100": "E. vLLM 0.5.4 on an A100, measured: 10, 40 and 320 ShareGPT prompts at once"}


# ---------------------------------------------------------------------------------------
# Running

def run_all(configs: list[Path], results_root: Path, reuse: bool) -> list[ClaimsReport]:
    """run_claims for every config (resuming with reuse: only missing cells are simulated); a report per config."""
    reports = []
    for cfg in configs:
        exp = load_experiment(cfg)
        out = results_root / cfg.stem
        print(f"{cfg.name}: {'resuming' if reuse else 'simulating'} into {out}")
        report = run_claims(exp, out, reuse=reuse)
        print(f"  {counts_text(report.table)}")
        reports.append(report)
    return reports


# ---------------------------------------------------------------------------------------
# Figures

def _engine_colours(exp) -> dict[str, str]:
    return {e.name: ENGINE_COLOURS[i % len(ENGINE_COLOURS)] for i, e in enumerate(exp.engines)}


def _style(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", color="0.9", lw=0.6)
    ax.set_axisbelow(True)


def _marker(r) -> str:
    """Diamond: a value; X: beyond its physical bound; triangles: a bound (>= up, <= down); square: a fit."""
    if r["verdict"] == "physically implausible":
        return "X"
    if r["class"] == "fit":
        return "s"
    return {">": "^", ">=": "^", "<": "v", "<=": "v"}.get(r["op"], "D")


def _published_points(ax, table: pd.DataFrame, metrics, colours: dict) -> None:
    """Published figures of some metrics as hollow markers at their load, coloured by engine."""
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    for _, r in table[table.metric.isin(metrics)].iterrows():
        load = _load_of_cell(r["cell"])
        if load is None or "/" in r["cell"]:
            continue
        marker = _marker(r)
        ax.scatter([load], [r["published"]], s=80 if marker == "X" else 70, facecolors="white",
                   edgecolors=colours.get(r["engine"], "k"), linewidths=2, zorder=5, marker=marker)
        ax.annotate(r["id"], (load, r["published"]), textcoords="offset points", xytext=(6, 4), fontsize=7,
                    color="0.3")


def _load_of_cell(cell: str):
    if "@c=" in cell:
        return int(cell.split("@c=")[1])
    if "@rate=" in cell:
        return float(cell.split("@rate=")[1])
    return None


def _legend_markers(table: pd.DataFrame) -> list:
    h = [Line2D([], [], marker="D", ls="", mfc="white", mec="0.3", mew=2, label="published")]
    if (table.verdict == "physically implausible").any():
        h.append(Line2D([], [], marker="X", ls="", mfc="white", mec="0.3", mew=2,
                        label="published, beyond its physical bound"))
    if (table.op != "~").any():
        h.append(Line2D([], [], marker="^", ls="", mfc="white", mec="0.3", mew=2, label="published bound"))
    if (table["class"] == "fit").any():
        h.append(Line2D([], [], marker="s", ls="", mfc="white", mec="0.3", mew=2, label="published, used to fit"))
    return h


def closed_loop_figure(report: ClaimsReport, path: Path) -> Path:
    """Throughput and TTFT against clients: simulated lines (config's seed), roofline bounds, published points."""
    exp, table = report.exp, report.table
    res = Results(exp, report.out_dir)
    colours = _engine_colours(exp)
    metrics = [("output_throughput", "output tokens/s (all clients)", "log"),
               ("mean_ttft_ms", "mean TTFT (ms)", "log")]
    if "success_rate_pct" in set(table.metric):
        metrics.append(("success_rate_pct", "completed requests (%)", "linear"))
    if "p99_e2el_ms" in set(table.metric):
        metrics.append(("p99_e2el_ms", "p99 E2E latency (ms)", "log"))
    if len(metrics) == 4:
        fig, axes = subplots(2, 2, figsize=(10.5, 8.4), constrained_layout=True)
    else:
        fig, axes = subplots(1, len(metrics), figsize=(5.0 * len(metrics), 4.4), constrained_layout=True)
    for ax, (metric, label, scale) in zip(np.ravel(axes), metrics):
        for e in exp.engines:
            loads = sorted(s["concurrency"] for s in res.rows(e.name))
            vals = [res.metric(metric, e.name, c) for c in loads]
            ax.plot(loads, vals, "-o", color=colours[e.name], ms=4, lw=1.8, label=f"{e.name} (simulated)")
            if metric == "output_throughput":
                bounds = [bound_for(exp, metric, e.name, c).value for c in loads]
                ax.plot(loads, bounds, ":", color=colours[e.name], lw=1.3, label=f"{e.name} roofline bound")
        shown = [metric] + (["mean_e2el_ms"] if metric == "p99_e2el_ms" else [])
        _published_points(ax, table, shown, colours)
        ax.set_xscale("log", base=2)
        ax.set_yscale(scale)
        ax.set_xticks(list(exp.workload.loads))
        ax.set_xticklabels([str(x) for x in exp.workload.loads])
        _style(ax, label, "concurrent clients", label)
    h, _ = np.ravel(axes)[0].get_legend_handles_labels()
    h += _legend_markers(table)
    fig.legend(handles=h, loc="outside lower center", ncol=min(4, len(h)), fontsize=8, frameon=False)
    fig.suptitle(f"{exp.name}: {model_label(exp.model)} on {exp.hardware.preset}; lines simulated (runtime laws), "
                 f"markers published", fontsize=11)
    fig.savefig(path, dpi=110)
    return path


def open_loop_figure(report: ClaimsReport, path: Path) -> Path:
    """PagedAttention group: normalized latency vs rate, KV utilization, saturated request rate."""
    exp, table = report.exp, report.table
    res = Results(exp, report.out_dir)
    colours = _engine_colours(exp)
    fig, axes = subplots(1, 3, figsize=(15, 4.4), constrained_layout=True)
    ax = axes[0]
    for e in exp.engines:
        rates, lat = res.latency_curve(e.name)
        ax.plot(rates, lat, "-o", color=colours[e.name], ms=4, lw=1.8, label=e.name)
    ax.set_yscale("log")
    ax.legend(fontsize=8, loc="center right")
    _style(ax, "mean normalized latency (E2E / output tokens)", "request rate (req/s, Poisson)", "s per token")
    ax = axes[1]
    names = [e.name for e in exp.engines]
    sim = [res.kv_utilization(n) for n in names]
    ax.bar(names, sim, color=[colours[n] for n in names], alpha=0.85, label="simulated")
    for _, r in table[table.metric == "kv_utilization_pct"].iterrows():
        i = names.index(r["engine"])
        lo, hi = r["published_lo"], r["published_hi"]
        if r["op"] == "~" and lo != hi:
            ax.plot([i, i], [lo, hi], color="k", lw=5, alpha=0.5, solid_capstyle="butt")
        ax.scatter([i], [r["published"]], marker="D", s=60, facecolors="white", edgecolors="k", linewidths=2,
                   zorder=5)
        ax.annotate(f"{r['id']}: {r['published_text']}", (i, r["published"]), textcoords="offset points",
                    xytext=(8, -3), fontsize=7.5)
    for i, v in enumerate(sim):
        ax.text(i, v / 2, f"{v:.0f}%", ha="center", color="white", fontsize=9, weight="bold")
    ax.set_ylim(0, 105)
    _style(ax, "KV slots holding tokens (time average, seed 0); diamonds published", "", "% of reserved KV")
    ax = axes[2]
    cap = [res.metric("capacity_rate", n) for n in names]
    ax.bar(names, cap, color=[colours[n] for n in names], alpha=0.85)
    for i, v in enumerate(cap):
        ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=9)
    _style(ax, "saturated throughput (most completed req/s at any rate, seed 0)", "", "requests / s")
    fig.suptitle(f"{exp.name}: {model_label(exp.model)} on {exp.hardware.preset}, ShareGPT-like lengths",
                 fontsize=11)
    fig.savefig(path, dpi=110)
    return path


def trace_figure(report: ClaimsReport, path: Path) -> Path:
    """A trace group: each metric against the number of requests replayed, simulated (seed range) vs published."""
    exp, table = report.exp, report.table
    metrics = list(dict.fromkeys(table.metric))
    fig, axes = subplots(1, len(metrics), figsize=(4.2 * len(metrics), 4.0), constrained_layout=True, squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        rows = table[table.metric == metric]
        xs = [_requests_of(report, r["id"]) for _, r in rows.iterrows()]
        order = np.argsort(xs)
        xs = [xs[i] for i in order]
        rows = rows.iloc[order]
        sim = rows["simulated"].astype(float).to_numpy()
        lo, hi = rows["sim_min"].astype(float).to_numpy(), rows["sim_max"].astype(float).to_numpy()
        ax.plot(xs, sim, "-o", color="tab:blue", lw=1.8, ms=5, label="simulated (median of seeds)")
        ax.fill_between(xs, lo, hi, color="tab:blue", alpha=0.15, lw=0)
        for x, (_, r) in zip(xs, rows.iterrows()):
            m = _marker(r)
            ax.scatter([x], [r["published"]], s=70, facecolors="white", edgecolors="k", linewidths=2, zorder=5,
                       marker=m)
            ax.annotate(r["id"], (x, r["published"]), textcoords="offset points", xytext=(6, 4), fontsize=7,
                        color="0.3")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
        unit = rows["unit"].iloc[0]
        _style(ax, metric.replace("_", " "), "requests sent at t = 0", unit if isinstance(unit, str) else "")
    h, _ = axes.flat[0].get_legend_handles_labels()
    h += _legend_markers(table)
    fig.legend(handles=h, loc="outside lower center", ncol=len(h), fontsize=8, frameon=False)
    fig.suptitle(f"{exp.name}: {model_label(exp.model)} on {exp.hardware.preset}", fontsize=11)
    fig.savefig(path, dpi=110)
    return path


def _requests_of(report: ClaimsReport, fid: str) -> int:
    """How many trace requests a figure's run replays (its variant's workload.num_requests, else the config's)."""
    f = report.claims.figure(fid)
    return int(dict(f.settings).get("workload.num_requests", report.exp.workload.num_requests))


def sweep_figure(report: ClaimsReport, sweep_id: str, path: Path) -> Path:
    """One small panel per figure of the sweep: simulated vs the swept value, published value with its tolerance band."""
    g = report.sweeps[report.sweeps.sweep == sweep_id]
    ids = list(dict.fromkeys(g["id"]))
    n = len(ids)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), constrained_layout=True, squeeze=False)
    values = list(dict.fromkeys(g["value"]))
    numeric = all(isinstance(v, (int, float)) for v in values)
    xs = [float(v) for v in values] if numeric else list(range(len(values)))
    positive = numeric and all(x > 0 for x in xs)
    for ax, fid in zip(axes.flat, ids):
        gi = g[g.id == fid].set_index("value").reindex(values)
        r0 = gi.iloc[0]
        sim = gi["simulated"].astype(float).to_numpy()
        ax.plot(xs, sim, "-o", color="tab:blue", lw=1.8, ms=5, label="simulated")
        for x, y, v, c in zip(xs, sim, gi["verdict"], gi["check"]):
            mark = c if isinstance(c, str) and c else v
            if isinstance(mark, str):
                ax.scatter([x], [y], s=60, color=VERDICT_COLOUR.get(mark, "k"), zorder=5)
        lo, hi, op = float(r0["published_lo"]), float(r0["published_hi"]), r0["op"]
        if op == "~":
            ax.axhspan(lo * (1 - TOLERANCE), hi * (1 + TOLERANCE), color="tab:green", alpha=0.12,
                       label=f"published +-{TOL}")
            ax.axhline(float(r0["published"]), color="tab:green", lw=1.5, ls="--", label="published")
        else:
            ax.axhline(float(r0["published"]), color="tab:green", lw=1.5, ls="--", label=f"published ({op})")
        if positive and max(xs) / min(xs) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs)
        zero_is_off = r0["param"].endswith("timeout_s")
        ax.set_xticklabels(["none" if zero_is_off and v == 0 else value_text(v) for v in values], fontsize=8)
        finite = sim[np.isfinite(sim)]
        if len(finite) and finite.min() > 0 and max(finite.max(), hi) / max(min(finite.min(), lo), 1e-12) > 20:
            ax.set_yscale("log")
        _style(ax, f"{fid} ({r0['class']}): {_short(r0['claim'], 40)}\n({r0['cell']})",
               r0["param"].rsplit(".", 1)[-1], r0["unit"] if isinstance(r0["unit"], str) else "")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    h, _ = axes.flat[0].get_legend_handles_labels()
    h += [Line2D([], [], marker="o", ls="", color=VERDICT_COLOUR[v], label=v)
          for v in ("reproduced", "differs", "physically implausible")]
    fig.legend(handles=h, loc="outside lower center", ncol=len(h), fontsize=8, frameon=False)
    fig.suptitle(f"Sweep {sweep_id}: {g['title'].iloc[0]}", fontsize=11)
    fig.savefig(path, dpi=110)
    return path


def _audit_rows(reports: list[ClaimsReport]) -> list[tuple]:
    """(id, claim, cell, factor, flagged, what) for every published figure with a bound: physics, config, queueing."""
    rows = []
    for rep in reports:
        t = rep.table[rep.table.bound.notna() & (rep.table.bound_kind != "") & (rep.table.unit.isin(
            ["tok/s", "ms", "req/s", "s", "requests"]))]
        for _, r in t.iterrows():
            b = float(r["bound"])
            f = r["published"] / b if r["bound_kind"] == "upper" else b / r["published"]
            rows.append((r["id"], r["claim"], r["cell"], f, f > 1.005, "physics"))
        for q in queueing_checks(rep.exp, rep.claims.figures):
            f = q.edge / q.value if q.kind == "upper" else q.value / q.edge
            fig = rep.claims.figure(q.id)
            rows.append((q.id, fig.claim, fig.cell_label, f, q.violated, f"queueing vs {q.ref}"))
    return rows


def audit_figure(reports: list[ClaimsReport], path: Path) -> Path | None:
    """Every published figure with a bound: how far toward (or past) it, on a log scale; past 1 = beyond the limit."""
    rows = _audit_rows(reports)
    if not rows:
        return None
    rows.sort(key=lambda x: x[3])
    fig, ax = subplots(figsize=(9.5, 0.26 * len(rows) + 1.8), constrained_layout=True)
    y = np.arange(len(rows))
    colours = [("tab:purple" if r[5] != "physics" else "tab:red") if r[4] else
               ("tab:cyan" if r[5] != "physics" else "tab:blue") for r in rows]
    ax.barh(y, [r[3] for r in rows], color=colours, alpha=0.85)
    ax.axvline(1.0, color="k", lw=1.2)
    ax.set_xscale("log")
    ax.set_yticks(y)
    ax.set_yticklabels([f"{r[0]} {_short(r[1], 30)} ({r[2]}){'' if r[5] == 'physics' else ' [' + r[5] + ']'}"
                        for r in rows], fontsize=7)
    for yi, r in zip(y, rows):
        ax.text(r[3] * 1.08, yi, f"{r[3]:.2g}x", va="center", fontsize=6.5, color="0.25")
    ax.set_xlim(min(r[3] for r in rows) / 1.5, max(3.0, max(r[3] for r in rows) * 2.0))
    ax.axvspan(1.0, ax.get_xlim()[1], color="tab:red", alpha=0.06)
    ax.text(1.1, -0.9, "beyond the limit", fontsize=8, color="tab:red", va="center")
    _style(ax, "Published figures against their limits\n(throughput or concurrency / upper bound; lower bound / "
               "latency)\nblue: roofline or the engine's flags (red: beyond);\ncyan: queueing bound from the same "
               "article's single-user figure (purple: beyond)", "fraction of the limit (1 = at the limit)", "")
    ax.set_ylim(-1.5, len(rows) - 0.5)
    fig.savefig(path, dpi=110)
    return path


def _short(text: str, n: int = 40) -> str:
    text = str(text)
    return text if len(text) <= n else text[: n - 1] + "…"


# ---------------------------------------------------------------------------------------
# Markdown pieces

def _finite(x) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _verdict_cell(r) -> str:
    if r["class"] == "test":
        text = verdict_text(r)
        return VERDICT_MARK.get(r["verdict"], text) if r["verdict"] != "flips" else f"**{text}**"
    return f"*{r['class']}* ({r['check']})"


def md_table(table: pd.DataFrame) -> str:
    """The side-by-side table of one group."""
    lines = ["| id | class | published figure | cell | unit | published | simulated | ratio | bound | verdict |",
             "|---|---|---|---|---|---:|---:|---:|---:|---|"]
    for _, r in table.iterrows():
        ratio = f"{r['ratio']:.2f}" if _finite(r["ratio"]) else "-"
        bound = (("<= " if r["bound_kind"] == "upper" else ">= ") + fmt_num(r["bound"])) if _finite(r["bound"]) \
            else "-"
        lines.append(f"| {r['id']} | {r['class']} | {r['claim']} | `{r['cell']}` | "
                     f"{r['unit'] if isinstance(r['unit'], str) else ''} | {r['published_text']} | "
                     f"{simulated_text(r)} | {ratio} | {bound} | {_verdict_cell(r)} |")
    return "\n".join(lines)


def _text(x) -> str:
    return x if isinstance(x, str) else ""


def md_notes(table: pd.DataFrame) -> str:
    """Why tests that are not reproduced differ (the configs' notes)."""
    return "\n".join(f"- **{r['id']}** ({r['verdict']}): {r['notes']}" for _, r in table.iterrows()
                     if r["class"] == "test" and r["verdict"] != "reproduced" and _text(r["notes"]).strip())


def md_classes(table: pd.DataFrame) -> str:
    """Why each figure that is not a test is classed as it is, and how the figures are read."""
    items = [f"- **{r['id']}** ({r['class']}, {r['check']}): {r['class_note']}"
             + (f" {r['notes']}" if _text(r["notes"]).strip() and r["check"] == "disagrees" else "")
             for _, r in table.iterrows() if r["class"] != "test"]
    items += [f"- **{r['id']}**, read as: {r['reading'].rstrip('.')}." for _, r in table.iterrows()
              if r["class"] == "test" and _text(r["reading"]).strip()]
    return "\n".join(items)


def md_seeds(table: pd.DataFrame) -> str:
    """Test verdicts that flip across seeds, each seed's value and verdict."""
    items = []
    for _, r in table[(table["class"] == "test") & (table.verdict == "flips")].iterrows():
        seeds = str(r["seeds"]).split(";")
        vals = str(r["seed_values"]).split(";")
        verdicts = str(r["seed_verdicts"]).split(";")
        each = ", ".join(f"seed {s}: {fmt_num(float(v))} ({w})" for s, v, w in zip(seeds, vals, verdicts))
        items.append(f"- **{r['id']}** flips: {each}.")
    return "\n".join(items)


def md_sweep(report: ClaimsReport, sweep_id: str) -> str:
    g = report.sweeps[report.sweeps.sweep == sweep_id]
    values = list(dict.fromkeys(g["value"]))
    param = g["param"].iloc[0]
    head = "| figure | published | " + " | ".join(f"{param.rsplit('.', 1)[-1]} = {value_text(v)}"
                                                 for v in values) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(values)]
    for fid, gi in g.groupby("id", sort=False):
        cells = []
        for v in values:
            r = gi[gi["value"] == v]
            if not len(r):
                cells.append("-")
                continue
            r = r.iloc[0]
            s = fmt_num(r["simulated"]) if _finite(r["simulated"]) else "-"
            ok = r["verdict"] == "reproduced" or r["check"] == "agrees"
            cells.append(f"**{s}**" if ok else s)
        lines.append(f"| {fid} {_short(gi['claim'].iloc[0], 44)} | {gi['published_text'].iloc[0]} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + (f"\n\nBold: within {TOL} of (or satisfying) the published figure. Sweeps run at the "
                               "config's own seed: they explore an assumption, they do not judge.")


def _df_md(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(fmt_num(v) if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(lines)


class Facts:
    """Look-ups into the reports for templated sentences: f.sim('A.1'), f.pub('A.1'), f.m(group, metric, engine)."""

    def __init__(self, reports: list[ClaimsReport]):
        self.reports = {r.exp.name: r for r in reports}
        self.rows = {}
        for rep in reports:
            for _, r in rep.table.iterrows():
                self.rows[r["id"]] = r
        self._results = {}
        self._queue = {q.id: q for rep in reports for q in queueing_checks(rep.exp, rep.claims.figures)}

    def sim(self, fid: str) -> str:
        return fmt_num(float(self.rows[fid]["simulated"]))

    def pub(self, fid: str) -> str:
        return self.rows[fid]["published_text"]

    def ratio(self, fid: str) -> str:
        return f"{float(self.rows[fid]['ratio']):.2f}"

    def bound(self, fid: str) -> str:
        return fmt_num(float(self.rows[fid]["bound"]))

    def verdict(self, fid: str) -> str:
        """The verdict in words ('reproduced', 'differs', 'flips (2 of 5 reproduced)'), or the check of a non-test."""
        return verdict_text(self.rows[fid])

    def is_(self, fid: str, v: str) -> bool:
        return self.rows[fid]["verdict"] == v

    def ids(self, group: str, cls: str) -> list[str]:
        """The ids of one group's figures of one class, in table order."""
        t = self.reports[group].table
        return list(t[t["class"] == cls]["id"])

    def val(self, fid: str) -> float:
        """The simulated figure (median over seeds for a test)."""
        return float(self.rows[fid]["simulated"])

    def pub_val(self, fid: str) -> float:
        """The published figure (its middle for a range)."""
        return float(self.rows[fid]["published"])

    def agrees(self, *fids: str) -> bool:
        """Whether every one of these non-test figures agrees with the config's arithmetic."""
        return all(self.rows[i]["check"] == "agrees" for i in fids)

    def disagrees(self, *fids: str) -> bool:
        """Whether every one of these non-test figures disagrees with the config's arithmetic."""
        return all(self.rows[i]["check"] == "disagrees" for i in fids)

    def says(self, fid: str) -> str:
        """The verdict as a predicate: 'is reproduced', 'differs', 'flips (2 of 5 reproduced)', 'agrees'."""
        r = self.rows[fid]
        if r["class"] != "test":
            return r["check"]
        text = verdict_text(r)
        return text if r["verdict"] in ("differs", "flips") else f"is {text}"

    def queue_broken(self, fid: str) -> bool:
        """Whether the published figure breaks the queueing bound against its article's single-client figure."""
        return fid in self._queue and self._queue[fid].violated

    def sweep_hit_values(self, sweep_id: str, fid: str) -> list[str]:
        """The swept values (as text) at which a figure is within tolerance."""
        g = self._sweep(sweep_id)
        g = g[g.id == fid]
        return [value_text(v) for v, ok, c in zip(g["value"], g["verdict"], g["check"])
                if ok == "reproduced" or c == "agrees"]

    def exp(self, group: str):
        return self.reports[group].exp

    def m(self, group: str, metric: str, engine: str, concurrency=None) -> str:
        """A simulated metric of the group's main results (the config's seed), formatted."""
        if group not in self._results:
            rep = self.reports[group]
            self._results[group] = Results(rep.exp, rep.out_dir)
        return fmt_num(self._results[group].metric(metric, engine, concurrency))

    def _sweep(self, sweep_id: str) -> pd.DataFrame:
        for rep in self.reports.values():
            if not rep.sweeps.empty and sweep_id in set(rep.sweeps.sweep):
                return rep.sweeps[rep.sweeps.sweep == sweep_id]
        raise KeyError(sweep_id)

    def sweep_values(self, sweep_id: str) -> list:
        return list(dict.fromkeys(self._sweep(sweep_id)["value"]))

    def sweep_hits(self, sweep_id: str, fid: str) -> str:
        """The swept values at which a figure is within tolerance, as text ('none of the values' when none)."""
        g = self._sweep(sweep_id)
        g = g[g.id == fid]
        hits = [value_text(v) for v, ok, c in zip(g["value"], g["verdict"], g["check"])
                if ok == "reproduced" or c == "agrees"]
        return ", ".join(hits) if hits else "none of the values"

    def sweep_float(self, sweep_id: str, fid: str, value) -> float:
        """A figure's simulated value at one swept value (the config's seed)."""
        g = self._sweep(sweep_id)
        g = g[g.id == fid]
        for v, x in zip(g["value"], g["simulated"]):
            if value_text(v) == value_text(value):
                return float(x)
        raise KeyError((sweep_id, fid, value))

    def sweep_sim(self, sweep_id: str, fid: str, value) -> str:
        return fmt_num(self.sweep_float(sweep_id, fid, value))


def engine_line(exp, e) -> str:
    """How one engine of a config is modelled, from its table."""
    w, kv = format_label(e.weights), format_label(e.kv_dtype)
    return (f"`{e.name}` ({RUNTIME_NAMES.get(e.runtime, e.runtime)}'s law): "
            + e.describe().replace(f"{e.weights} weights, {e.kv_dtype} KV", f"{w} weights, {kv} KV"))


def workload_line(exp) -> str:
    w = exp.workload
    p, o = mean_lengths(exp)
    t = f", client timeout {fmt_num(w.timeout_s)} s (assumed)" if w.timeout_s else ""
    return f"{w.describe()}; mean {p:.0f} prompt and {o:.0f} output tokens{t}"


def real_engines_section(results: Path) -> str:
    """One paragraph per real engine judged in papers/real_engines.md: its verdict counts (sim.lab.peer_errors)."""
    lines = []
    for key, title in ENGINES.items():
        t = engine_table(results / key)
        if t is not None:
            lines.append(f"- {title}: {summary_line(t)}")
    if not lines:
        return ""
    return ("The same simulator, with a profile measured over HTTP (`servesim profile --url`) and each server's "
            "scheduling model, predicts cells that the profile never ran on the real vLLM and llama.cpp server "
            "running on this machine's CPU ([real_engines.md](real_engines.md) has every cell, the servers' own "
            "/metrics against the simulated scheduler, and where the real engines behave differently). "
            "Goal: |error| <= 10% on output throughput, mean TPOT and mean E2E, <= 15% on mean TTFT.\n\n"
            + "\n".join(lines))


def fidelity_section(path: Path) -> str:
    """What experiments/results/fidelity_cpu/ says (servesim validate's files), or that it is pending."""
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    if not (path / "errors.csv").exists():
        return (f"*Pending.* The fidelity check (the simulator against the JAX reference engine on the same "
                f"workload, which isolates the cost model's error) writes `{where}/errors.csv`; it does not exist "
                f"yet, so this paper makes no claim about the scheduler's fidelity beyond the runtime laws' own "
                f"errors above. Rebuild the paper once it exists.")
    errors = pd.read_csv(path / "errors.csv")
    out = [f"Results read from `{where}/` (`servesim validate`: the same workloads on the JAX engine and on the "
           f"simulator calibrated from a profile of that engine on the same machine). Signed error = "
           f"(predicted - measured) / measured.\n"]
    if (path / "error_summary.csv").exists():
        summary = pd.read_csv(path / "error_summary.csv")
        out.append(_df_md(summary.rename(columns={"median_abs_pct": "median abs err %", "worst_abs_pct": "worst abs err %",
                                                  "target_pct": "target %", "within_target": "cells within"})))
    table = errors.pivot_table(index="cell", columns="metric", values="error_pct", sort=False)
    out.append("\nSigned error (%) per cell and metric:\n")
    out.append(_df_md(table.reset_index()))
    repeat = path.parent / (path.name + "_repeat")  # the same benches run a second time: the engine's own spread
    if repeat.exists():
        diffs = pd.concat([compare(d, path / d.name / "bench") for d in sorted(repeat.iterdir())
                           if (d / "summary.json").exists() and (path / d.name / "bench" / "summary.json").exists()],
                          ignore_index=True)
        spread = error_table(diffs)[["metric", "median_abs_pct", "worst_abs_pct"]]
        out.append(f"\nThe noise floor: the engine against itself, the same benches run twice on this machine "
                   f"(`{repeat.relative_to(ROOT) if repeat.is_relative_to(ROOT) else repeat}` against the bench "
                   f"above; `experiments/benchmarks/engine_repeatability.py`). A simulator cannot be judged "
                   f"below these differences:\n")
        out.append(_df_md(spread.rename(columns={"median_abs_pct": "median abs diff %",
                                                 "worst_abs_pct": "worst abs diff %"})))
    if (path / "steps_check.csv").exists():
        checks = pd.read_csv(path / "steps_check.csv")
        cols = [c for c in ("cell", "experiment", "steps", "exec_err_pct", "host_err_pct", "step_err_pct")
                if c in checks.columns]
        out.append("\nThe engine's own steps priced by the cost model (same shapes, so this isolates the step-time "
                   "law from scheduling): error (%) of the summed execute, host and whole-step time per cell.\n")
        out.append(_df_md(checks[cols]))
    for png in sorted(path.glob("*.png")):
        out.append(f"\n![{png.stem}]({Path('..') / png.relative_to(ROOT) if png.is_relative_to(ROOT) else png})")
    return "\n".join(out)


def fitted_cards(rows=None) -> dict[str, list[str]]:
    """{runtime: the hardware presets of its fitting rows}, from experiments/measured."""
    rows = measured.load_rows() if rows is None else rows
    return {rt: sorted({r.hardware for r in rows if r.runtime == rt and r.role == "fit"}) for rt in RUNTIMES}


def runtime_section(used: set[str], fits: list[str]) -> str:
    """The runtime laws the claims use: parameters (from the fit file) and their measured errors.

    fits: the ids of the published figures classed fit (used to fit a law, so not judged)."""
    fit = load_fit()
    used_for_fit = (f"the articles' figures used to fit a law ({_and(fits)}) are classed fit and not judged"
                    if fits else "none of the articles' figures judged below was used")
    out = ["Each engine's steps are priced by the law of the runtime that executes it (`runtime` in each engine's "
           "table; `[cost_model] kind = \"runtime\"`): llama.cpp's CUDA kernels for Ollama, vLLM's for vLLM and the "
           "PagedAttention paper's systems. The laws (`sim/core/runtimes.py`) were fitted on published GPU "
           f"measurements only (`experiments/measured/`, every row with its source); {used_for_fit}. Parameters "
           "(`experiments/measured/runtime_fit.json`):\n",
           "| runtime | parameter | value | unit | meaning |", "|---|---|---:|---|---|"]
    for rt in RUNTIMES:
        for name, unit, meaning in PARAM_SPECS[rt]:
            out.append(f"| {rt} | `{name}` | {fit[rt][name]:.4g} | {unit} | {meaning} |")
    rows = measured.load_rows()
    results = measured.evaluate(fit, rows)  # every row: measured, predicted, error
    logo = measured.leave_one_gpu_out(rows)
    summary = {(s["runtime"], s["role"], s["kind"]): s for s in measured.summarize(results)}
    loso = {s["kind"]: s for s in measured.summarize([dict(r, runtime="llama.cpp", role="logo") for r in logo])}
    out += ["", "Median (max) |error| of the laws against the measured rows (`servesim measured`; error = predicted "
                "/ measured - 1):\n",
            "| runtime | rows | in-sample (fitted) | leave-one-GPU-out | held out |", "|---|---|---|---|---|"]

    def cell(s):
        return f"{100 * s['median_abs_error']:.1f}% ({100 * s['max_abs_error']:.1f}%), {s['rows']} rows" if s else "-"

    for kind, what in (("tg", "batch-1 decode (llama-bench tg)"), ("pp", "prefill (llama-bench pp)")):
        out.append(f"| llama.cpp | {what} | {cell(summary.get(('llama.cpp', 'fit', kind)))} | {cell(loso.get(kind))} "
                   f"| {cell(summary.get(('llama.cpp', 'holdout', kind)))} |")
    vfit = [r for r in rows if r.runtime == "vllm" and r.role == "fit"]
    vres = [s for s in measured.summarize(results) if s["runtime"] == "vllm" and s["role"] == "fit"]
    vmax = max((s["max_abs_error"] for s in vres), default=math.nan)
    pinned = [name for name, _, meaning in PARAM_SPECS["vllm"] if "ASSUMED" not in meaning]
    cards = fitted_cards(rows)
    out.append(f"| vLLM | {_and(sorted({r.row_id for r in vfit}))} | "
               f"{100 * vmax:.1f}% (max), {len(vfit)} rows: with the v0.6.0 release notes they pin {len(pinned)} "
               f"parameters, so the fit is exact by construction (class *fit* in the claims) | not possible: "
               f"{len(cards['vllm'])} card{'s' if len(cards['vllm']) != 1 else ''} | group E's other figures |")
    fitted_text = "; ".join(f"{RUNTIME_NAMES.get(rt, rt)} on {_and(c)}" for rt, c in cards.items())
    out.append(f"\nThe runtimes used here: {', '.join(sorted(used))}. Where a claim's card is not among the fitted "
               f"ones ({fitted_text}), the law extrapolates: its card dependence is the datasheet's (bandwidth, SM "
               f"count and clock, tensor rate). The audit keeps the datasheet roofline (efficiency 1.0): the simulator's former cost model, "
               f"{DEFAULT_MEM_EFFICIENCY:g} of the datasheet bandwidth and {DEFAULT_COMPUTE_EFFICIENCY:g} of the "
               "tensor peak for every engine, appears only in sweep C.s1 (as the question it answers is about it).")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------
# The paper

def _class_counts_sentence(total: pd.DataFrame, groups: int) -> str:
    """The paper's headline counts: tests by verdict; inputs, identities and fits by check (never 'reproduced')."""
    c = counts(total)
    cls = c["classes"]
    verdicts = ", ".join(f"{n} {name}" for name, n in c["verdicts"].items() if n)
    names = {"input": ("input", "inputs"), "identity": ("identity", "identities"), "fit": ("fit", "fits")}
    others = []
    for name, (one, many) in names.items():
        t = total[total["class"] == name]
        if not len(t):
            continue
        agree = int((t["check"] == "agrees").sum())
        others.append(f"{len(t)} {one if len(t) == 1 else many} ({agree} agree{'s' if agree == 1 else ''}, "
                      f"{len(t) - agree} disagree{'s' if len(t) - agree == 1 else ''})")
    tests = f"{cls['test']} test{'s' if cls['test'] != 1 else ''} of the simulation" + (
        f" ({verdicts})" if verdicts else "")
    rest = f"; {_and(others)}, none of which is counted as reproduced" if others else ""
    return f"Across {groups} claim groups, {c['figures']} published figures: {tests}{rest}."


def write_paper(reports: list[ClaimsReport], figures: dict[str, list[Path]], paper: Path, fidelity: Path,
                teaching: list[Path]) -> Path:
    """papers/reproduction.md from the reports (every number read from the result files, configs and fit)."""
    f = Facts(reports)

    def rel(p) -> str:  # a link from the paper to p, for GitHub's renderer
        return Path(os.path.relpath(Path(p).resolve(), paper.parent.resolve())).as_posix()

    total = pd.concat([r.table for r in reports], ignore_index=True) if reports else pd.DataFrame()
    seeds = sorted({r.claims.seeds for r in reports}) or [0]
    parts: list[str] = []
    P = parts.append

    P("# Ollama vs vLLM, reproduced: what the published numbers say, and what physics allows\n")
    P("*Generated by `python papers/build.py` from the result files in `experiments/results/claims_*/`, the configs "
      "`experiments/claims_*.toml` and the runtime laws' fit (`experiments/measured/`): the numbers in the tables "
      "and the text are read from them (the configs' notes, quoted where a figure differs, state the assumptions). "
      "Do not edit by hand.*\n")
    P("## Question\n")
    P("Public comparisons of Ollama (llama.cpp) and vLLM quote throughput, latency, memory and concurrency "
      "figures that disagree with each other by large factors. We ask, figure by figure: does a simulation of "
      "the two serving systems, on the stated hardware and model, produce the published number? Where it does "
      "not, which unstated assumption would explain the gap, and is the published number physically possible "
      "at all?" + _measured_groups_sentence(reports) + "\n")
    P("## What counts as a reproduction\n")
    P("Each published figure is classed in its config before anything is simulated (`class` in its table, with "
      "the reason in `class_note`):\n")
    P("- **test**: the simulation could have come out otherwise. Only tests are judged: *reproduced* when the "
      f"simulated figure is within {TOL} of the published one (inside a published range widened by {TOL}, or "
      "satisfying "
      "a stated inequality); *physically implausible* when the published figure lies beyond the physical limit of "
      "its hardware, model and weight format, whatever the simulation says (section [Audit](#audit)); *differs* "
      f"otherwise. Each test's cells are simulated at {', '.join(map(str, seeds))} seeds (seeds 0 to "
      f"{seeds[-1] - 1}); the table gives the median and, when they differ, the range of the simulated values, and "
      "a verdict that is not the same at every seed is reported as *flips*, with every seed's verdict.")
    P("- **input**: the config takes the figure as given (e.g. the model's weight bytes).")
    P("- **identity**: true by construction or by arithmetic of the config (a memory plan's sizes, the ratio of two "
      "other published figures, an outcome an assumption decides). Identities are checked, *agrees* or *disagrees*, "
      "never counted as reproduced: a disagreement says the article contradicts its own stated setup.")
    P("- **fit**: the figure was used to fit a parameter of the simulator; it is never *reproduced*.\n")
    P("Each figure is read one way, fixed in the config (its `reading`, where more than one is possible), before "
      "looking at the result.\n")
    if len(total):
        P(_class_counts_sentence(total, len(reports)) + "\n")

    P("## The two systems and how they are modelled\n")
    P("Both systems run in a SimPy discrete-event simulator that drives the *same scheduler objects* as the "
      "project's JAX reference engine (`reference/schedulers/`, `reference/block_manager.py`), so batching, "
      "admission, queueing, preemption and KV memory behave as in that engine; only the duration of each step "
      "comes from a cost model: here, the runtime laws (next section).\n")
    P("- **Ollama** is llama.cpp's server behind a bounded queue: `num_parallel` slots, each owning a contiguous "
      "KV region of `num_ctx` tokens allocated at load whether used or not; requests wait FCFS for a free slot, "
      "and beyond the queue limit are refused (HTTP 503). Busy slots are batched into one step; with one slot "
      "the server is strictly sequential. Weights are GGUF Q4_K_M.")
    P("- **vLLM** is continuous batching over a paged KV pool: blocks of 16 tokens handed out on demand from a "
      "pool sized as `gpu_memory_utilization` x memory minus weights and the activation peak; each step serves "
      "running requests first, then admits waiting ones within a token budget (chunked prefill); when blocks "
      "run out the newest running request is preempted and recomputed later; full blocks are prefix-cached.")
    P("- The PagedAttention paper's baselines are the same continuous scheduler with up-front reservations "
      "(Orca (Max): `max_model_len` per request; Orca (Oracle): exactly prompt + output) and static batching "
      "(FasterTransformer: a batch runs until its longest request ends).")
    P("- A configuration the real engine refuses at start-up is refused here too, naming the key and the largest "
      "value that fits: a `max_model_len` whose KV does not fit vLLM's pool, slots whose `num_parallel` x "
      "`num_ctx` do not fit beside llama.cpp's weights, weights that do not fit the card.\n")
    P("Each claim group's configuration (`experiments/claims_*.toml`) sets the engines as follows:\n")
    for rep in reports:
        P(f"- `{rep.exp.name}` ({rep.exp.hardware.preset}, {model_label(rep.exp.model)}; {workload_line(rep.exp)}):")
        for e in rep.exp.engines:
            P(f"  - {engine_line(rep.exp, e)}")
    P("")
    P("## Step times: the runtime laws\n")
    used = {e.runtime for rep in reports for e in rep.exp.engines}
    P(runtime_section(used, list(total[total["class"] == "fit"]["id"]) if len(total) else []) + "\n")
    hw_names = sorted({r.exp.hardware.preset for r in reports if r.exp.hardware.preset})
    sheet = "; ".join(f"{h}: {get_hardware(h).memory_bw / 1e12:.3g} TB/s, {get_hardware(h).bf16_flops / 1e12:,.0f} "
                      f"dense BF16 TFLOP/s, {get_hardware(h).memory_gb:g} GB" for h in hw_names)
    P(f"Datasheet figures of the cards used (`servesim hardware`): {sheet}.\n")
    P("### Fidelity of the scheduler (CPU)\n")
    P(fidelity_section(fidelity) + "\n")
    peers = real_engines_section(ROOT / "experiments" / "results" / "peers")
    if peers:
        P("### Fidelity against real engines (CPU)\n")
        P(peers + "\n")

    for rep in reports:
        exp = rep.exp
        P(f"## {GROUP_TITLES.get(exp.name, exp.description or exp.name)}\n")
        P(f"Config: `experiments/{Path(exp.source).name if exp.source else exp.name + '.toml'}`; results: "
          f"`{_rel_root(rep.out_dir)}/`. Source: *{rep.claims.source}*. {counts_text(rep.table)}.\n")
        if rep.claims.notes:
            P(f"Assumptions: {rep.claims.notes}\n")
        for fig in figures.get(exp.name, []):
            P(f"![{fig.stem}]({rel(fig)})\n")
        P(md_table(rep.table) + "\n")
        text = _group_text(exp.name, f)
        if text:
            P(text + "\n")
        flips = md_seeds(rep.table)
        if flips:
            P("Verdicts that flip across seeds:\n")
            P(flips + "\n")
        classes = md_classes(rep.table)
        if classes:
            P("Figures that are not tests, and readings fixed in the config:\n")
            P(classes + "\n")
        notes = md_notes(rep.table)
        if notes:
            P("Where a test differs, and why (from the config's notes):\n")
            P(notes + "\n")
        for sw in rep.claims.sweeps:
            P(f"### Sweep {sw.id}: {sw.title}\n")
            if sw.notes:
                P(sw.notes + "\n")
            for fig in figures.get(f"{exp.name}:{sw.id}", []):
                P(f"![{fig.stem}]({rel(fig)})\n")
            P(md_sweep(rep, sw.id) + "\n")

    P("## Audit\n")
    P("Whatever an engine does, a decode step reads every weight once and the K/V of every sequence in the batch "
      "once, and a token costs about 2 x parameters FLOPs. With datasheet peaks (efficiency 1.0) that bounds "
      "throughput from above and latency from below (`sim/lab/audit.py`; `servesim audit CONFIG.toml` prints the "
      "arithmetic). For N closed-loop clients with think time Z, Little's law for the closed system, X = N / (E2E + "
      "Z) requests/s with X <= R_N / out (R_N the bound on output tokens/s at N streams), bounds the mean "
      "response time from below: **mean E2E >= N x out / R_N - Z**. Published figures beyond a physical bound:\n")
    bad = total[(total.verdict == "physically implausible")] if len(total) else total
    for _, r in bad.iterrows():
        P(f"- **{r['id']}** ({r['claim']}, `{r['cell']}`): {r['audit']}.")
    beyond = [(rep, r) for rep in reports for _, r in rep.table.iterrows()
              if r["class"] != "test" and _finite(r["bound"]) and "configuration" in _text(r["audit"])]
    if not len(bad):
        P("- none.")
    if beyond:
        P("\nBeyond a limit the article's own configuration sets (not physics; these figures are identities):\n")
        for _, r in beyond:
            P(f"- **{r['id']}** ({r['claim']}, `{r['cell']}`): {r['audit']}.")
    P("\nThe queueing bound from the other side: a server that answers one request alone in S_1 seconds (the same "
      "article's single-client E2E, or out / X_1 - Z from its single-client throughput X_1), that is "
      "work-conserving, serves requests first-come-first-served or in shared steps and whose total output rate does "
      "not drop when it holds more requests, holds at most N equal requests, so **every E2E (and TTFT) <= N x S_1**, "
      "and N clients get **X_N >= N x out / (N x S_1 + Z)** (= X_1 when Z = 0). Published figures that break it "
      "contradict the same article's single-user figure unless the server slows down under load (CPU offload, "
      "swapping):\n")
    broken = [(rep, q) for rep in reports for q in queueing_checks(rep.exp, rep.claims.figures) if q.violated]
    for rep, q in broken:
        P(f"- **{q.id}** ({rep.claims.figure(q.id).claim}, `{rep.claims.figure(q.id).cell_label}`): published "
          f"{fmt_num(q.edge)} {q.unit}, bound {'<=' if q.kind == 'upper' else '>='} {fmt_num(q.value)} {q.unit}: "
          f"{q.text}.")
    if not broken:
        P("- none.")
    P("")
    for fig in figures.get("audit", []):
        P(f"![{fig.stem}]({rel(fig)})\n")
    P("The full audit of each group, with the arithmetic for every figure that has a bound, is in "
      "`experiments/results/<group>/audit.txt`.\n")
    if teaching:
        P("## Teaching figures\n")
        P(f"The PagedAttention tutorial (`papers/tutorial.md`) explains these {len(teaching)} figures, drawn by "
          "`sim/lab/teaching.py` from traces of the project's real schedulers and block manager "
          "(`reference/schedulers/`, `reference/block_manager.py`).\n")
        for fig in teaching:
            P(f"![{fig.stem}]({rel(fig)})\n")
    P("## Threats to validity\n")
    P(_extrapolation_threat(reports))
    P("- **Unstated settings were filled with defaults.** Where an article omits request lengths, Ollama's "
      "`OLLAMA_NUM_PARALLEL`/`num_ctx`, the client timeout or the load at which a figure was measured, each "
      "config states the assumption it makes, and the sweeps show how far the conclusions move with it; figures "
      "that an assumption decides are classed identity, not test.")
    P("- **Not modelled:** HTTP/API-server and tokenizer time beyond vLLM's fitted host time, client-side overhead "
      "(except as closed-loop think time), CPU offload, speculative decoding, swap-based preemption, external "
      "fragmentation of reservations, block-size-dependent kernel speed, vLLM 0.5's prefill-first (V0) step order, "
      "and per-request variation in output lengths for fixed-length workloads (requests run to their max tokens, "
      "as with `--ignore-eos`).")
    P(_seeds_threat(reports))
    P("- **Short runs.** To keep results small enough to commit, each cell serves a few hundred requests at "
      "most; open-loop curves include start-up and drain, and saturated throughputs are those of finite runs.")
    P("- **Model stand-ins.** OPT-13B is represented by Llama-2-13B with the same KV shape, Llama-3-8B by "
      "Llama-3.1-8B's shapes; Ollama serves the GGUF Q4_K_M build where an article names an NVFP4 checkpoint it "
      "cannot load.\n")
    paper.parent.mkdir(parents=True, exist_ok=True)
    paper.write_text("\n".join(parts))
    return paper


def _measured_groups_sentence(reports: list[ClaimsReport]) -> str:
    """' `claims_e...` holds the simulator itself against measured runs ...' for the groups that replay a trace."""
    names = [f"`{r.exp.name}`" for r in reports if r.exp.workload.kind == "trace"]
    if not names:
        return ""
    return (f" {_and(names)} {'hold' if len(names) > 1 else 'holds'} the simulator itself against measured runs of "
            "the engine it models, replayed from their requests.")


def _extrapolation_threat(reports: list[ClaimsReport]) -> str:
    """Which cards each runtime law prices outside the cards it was fitted on."""
    cards = fitted_cards()
    outside = []
    for rt, fitted in cards.items():
        used = sorted({rep.exp.hardware.preset for rep in reports for e in rep.exp.engines if e.runtime == rt})
        beyond = [h for h in used if not any(_same_card(h, c) for c in fitted)]
        if beyond:
            outside.append(f"{RUNTIME_NAMES.get(rt, rt)}'s on {_and(beyond)}")
    fitted_text = "; ".join(f"{RUNTIME_NAMES.get(rt, rt)}'s on {len(c)} card{'s' if len(c) != 1 else ''} "
                            f"({_and(c)})" for rt, c in cards.items())
    return ("- **The runtime laws extrapolate.** They were fitted on published measurements (llama.cpp: "
            "`llama-bench` tables; vLLM: a vLLM 0.5.4 run and the v0.6.0 release notes): " + fitted_text + ". "
            + (f"The claims use {_and(outside)}, outside the data. " if outside else "")
            + "Later builds (CUDA graphs in llama.cpp, int8 tensor-core matmuls for quantised weights, vLLM's "
            "multi-step scheduling) may be faster than the laws; the data has none of them. The audit uses the "
            "datasheet (efficiency 1.0), so its verdicts do not depend on the laws.")


def _same_card(a: str, b: str) -> bool:
    """Whether two presets are the same card under two names (every datasheet field equal)."""
    return replace(get_hardware(a), name=b) == get_hardware(b)


def _seeds_threat(reports: list[ClaimsReport]) -> str:
    """Which groups' tests vary with the seed (from the result tables), and how many verdicts flip."""
    varies, fixed = [], []
    for rep in reports:
        t = rep.table[rep.table["class"] == "test"]
        spread = any(_finite(a) and _finite(b) and fmt_num(float(a)) != fmt_num(float(b))
                     for a, b in zip(t["sim_min"], t["sim_max"]))
        (varies if spread else fixed).append(f"`{rep.exp.name}` ({rep.exp.workload.kind})")
    flips = sum(int((rep.table.verdict == "flips").sum()) for rep in reports)
    out = "- **Seeds.** "
    if fixed:
        out += (f"In {_and(fixed)} every test's simulated value is the same at every seed (fixed lengths or a trace: "
                f"the seed changes only token ids), so their spread says nothing about the step-time law's error. ")
    if varies:
        out += (f"In {_and(varies)} the values vary with the seed, and {flips} verdict{'s' if flips != 1 else ''} "
                f"{'flip' if flips != 1 else 'flips'} across seeds.")
    return out


def _rel_root(p: Path) -> str:
    p = Path(p).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def _group_text(name: str, f: Facts) -> str:
    """A short templated reading of each group's table (every number from the results or the configs)."""
    try:
        return _GROUP_TEXT[name](f)
    except KeyError:  # a group without a reading, or a figure the reading needs is missing
        return ""


def _and(items) -> str:
    """'a', 'a and b', 'a, b and c'."""
    items = [str(i) for i in items]
    if not items:
        return ""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _values_text(values: list[str], unit: str = "") -> str:
    """Swept values as text: 'only at 0 s', 'at 2 and 4 s', 'at none of the values'."""
    if not values:
        return "at none of the values"
    return ("only at " if len(values) == 1 else "at ") + _and(values) + (f" {unit}" if unit else "")


def _text_a(f: Facts) -> str:
    g = "claims_a_h100_llama8b"
    exp = f.exp(g)
    c = exp.workload.clients
    card = exp.hardware.preset
    prompt, _ = mean_lengths(exp)
    out = [f"Ollama's single-user rate {f.says('A.1')}: llama.cpp's law gives {f.sim('A.1')} tok/s for one Q4_K_M "
           f"stream on the {card}, against {f.pub('A.1')} published ({f.ratio('A.1')}x). "]
    if f.is_("A.2", "physically implausible"):
        out.append(f"vLLM's single-user {f.pub('A.2')} tok/s is physically implausible: one FP16 stream reads "
                   f"{f.m(g, 'weights_gb', 'vllm')} GB of weights per token and cannot exceed {f.bound('A.2')} tok/s "
                   f"on this card (audit); the simulation gives {f.sim('A.2')}.\n\n")
    else:
        out.append(f"vLLM's single-user rate {f.says('A.2')}: {f.sim('A.2')} simulated vs {f.pub('A.2')} tok/s "
                   f"(roofline bound {f.bound('A.2')}).\n\n")
    # Ollama under load: the queueing bound, one slot, and the slots sweep
    broken = [i for i in ("A.3", "A.5") if f.queue_broken(i)]
    out.append(f"Under load the article's Ollama gives {f.pub('A.3')} and {f.pub('A.5')} tok/s at {c[1]} and {c[2]} "
               f"clients against {f.pub('A.1')} for one; ")
    if broken:
        out.append(f"{_and(broken)} {'break' if len(broken) > 1 else 'breaks'} the queueing bound (audit): no server "
                   f"that keeps its rate under load delivers less to N clients than to one. ")
    else:
        out.append("both are within the queueing bound (audit). ")
    n1 = exp.engine("ollama").num_parallel
    slots = "one slot" if n1 == 1 else f"{n1} slots"
    if abs(f.val("A.5") / f.val("A.1") - 1) <= 0.02:
        out.append(f"With {slots} the simulation keeps its single-user rate at {c[2]} clients ({f.sim('A.5')} tok/s)")
    else:
        out.append(f"With {slots} the simulation gives {f.sim('A.5')} tok/s at {c[2]} clients ({f.sim('A.1')} for one)")
    out.append(f" and a {c[2]}-client TTFT of {f.sim('A.9')} ms against {f.pub('A.9')} published (A.9 "
               f"{f.says('A.9')}). ")
    npv = f.sweep_values("A.s1")
    hi1, hi2 = npv[-2], npv[-1]
    both = sorted(set(f.sweep_hit_values("A.s1", "A.9")) & set(f.sweep_hit_values("A.s1", "A.5")), key=float)
    out.append(f"In sweep A.s1 that TTFT is {f.sweep_sim('A.s1', 'A.9', hi1)} ms with {value_text(hi1)} slots and "
               f"{f.sweep_sim('A.s1', 'A.9', hi2)} ms with {value_text(hi2)}, where the {c[2]}-client throughput is "
               f"{f.sweep_sim('A.s1', 'A.5', hi1)} and {f.sweep_sim('A.s1', 'A.5', hi2)} tok/s; A.9 is within {TOL} "
               f"{_values_text(f.sweep_hit_values('A.s1', 'A.9'), 'slots')}, A.5 "
               f"{_values_text(f.sweep_hit_values('A.s1', 'A.5'), 'slots')}: ")
    out.append(f"OLLAMA_NUM_PARALLEL = {_and(both)} gives both published figures.\n\n" if both else
               "no OLLAMA_NUM_PARALLEL in the sweep gives both published figures.\n\n")
    # vLLM under load, and a client overhead
    growth_sim = f.val("A.6") / f.val("A.4")
    growth_pub = f.pub_val("A.6") / f.pub_val("A.4")
    out.append(f"vLLM at {c[1]} clients: {f.sim('A.4')} vs {f.pub('A.4')} tok/s (A.4 {f.says('A.4')}); at {c[2]} "
               f"clients the simulation gives {f.ratio('A.6')}x the published throughput (A.6 {f.says('A.6')}): from "
               f"{c[1]} to {c[2]} clients it grows {growth_sim:.2f}x, the published {growth_pub:.2f}x (in the model a "
               f"decode step at batch {c[2]} costs about one read of the weights, as at batch {c[1]}). ")
    think = f.sweep_values("A.s3")
    h4, h6 = f.sweep_hit_values("A.s3", "A.4"), f.sweep_hit_values("A.s3", "A.6")
    both = sorted(set(h4) & set(h6), key=float)
    out.append(f"A per-request client overhead (sweep A.s3, think times {_and(value_text(v) for v in think)} s) "
               f"brings A.4 within {TOL} {_values_text(h4, 's')} and A.6 {_values_text(h6, 's')}, ")
    out.append(f"so {_and(both)} s explains both. " if both else "so no single overhead in the sweep explains both. ")
    out.append(f"Single-user TTFTs: Ollama {f.sim('A.7')} vs {f.pub('A.7')} ms (A.7 {f.says('A.7')}; llama.cpp's law "
               f"dequantises the weights for a {prompt:.0f}-token prompt), vLLM {f.sim('A.8')} vs {f.pub('A.8')} ms "
               f"(A.8 {f.says('A.8')}); vLLM's TTFT at {c[2]} clients: {f.sim('A.10')} vs {f.pub('A.10')} ms (A.10 "
               f"{f.says('A.10')}).\n\n")
    # the memory figures (identities)
    ids = f.ids(g, "identity")
    bad = [i for i in ids if f.disagrees(i)]
    if len(bad) == len(ids):
        out.append(f"The memory figures ({_and(ids)}) are identities of the configuration, and every one disagrees "
                   f"with it. ")
    else:
        out.append(f"The memory figures ({_and(ids)}) are identities of the configuration; {len(bad)} of {len(ids)} "
                   f"disagree with it{' (' + _and(bad) + ')' if bad else ''}. ")
    e = exp.engine("vllm")
    alike = f.sim("A.12") == f.sim("A.14")
    out.append(f"Read as what each engine allocates (the article gives no load for them), vLLM holds {f.sim('A.12')} "
               f"GB from start with the article's --gpu-memory-utilization {e.gpu_memory_utilization:g}"
               + (", FP16 or FP8 alike" if alike else f" (FP8: {f.sim('A.14')} GB)")
               + f", against {f.pub('A.12')} / {f.pub('A.14')} GB published (A.12 {f.says('A.12')}, A.14 "
               f"{f.says('A.14')}); its own --max-num-seqs {e.max_num_seqs} caps the requests running at once at "
               f"{f.sim('A.16')} (FP8: {f.sim('A.17')}), against {f.pub('A.16')} and {f.pub('A.17')} published (A.16 "
               f"{f.says('A.16')}, A.17 {f.says('A.17')}).")
    return "".join(out)


def _text_b(f: Facts) -> str:
    g = "claims_b_blackwell_70b"
    exp = f.exp(g)
    c = exp.workload.clients
    timeout = fmt_num(exp.workload.timeout_s)
    np1 = exp.engine("ollama").num_parallel
    np4 = exp.engine("ollama_np4").num_parallel
    out = [f"vLLM's throughput at {c[2]} clients: {f.sim('B.1')} simulated vs {f.pub('B.1')} tok/s (B.1 "
           f"{f.says('B.1')}), and "]
    out.append(f"every one of its requests completes within the assumed {timeout} s " if f.val("B.6") >= 100 else
               f"{f.sim('B.6')}% of its requests complete within the assumed {timeout} s ")
    out.append(f"(B.6 {f.says('B.6')}). Ollama with {'its default single slot' if np1 == 1 else f'{np1} slots'} "
               f"decodes at about {f.m(g, 'mean_tpot_ms', 'ollama', 1)} ms per token of the 70B Q4_K_M model "
               f"(llama.cpp's law, extrapolated to the {exp.hardware.preset}); with a {timeout} s client timeout "
               f"{f.sim('B.7')}% of the requests of {c[2]} clients succeed, and without a timeout "
               f"{f.sweep_sim('B.s3', 'B.7', 0)}% do (sweep B.s3: B.7 is decided by the assumed timeout, so it is "
               f"classed identity). The simulated Ollama delivers {f.sim('B.2')} tok/s against {f.pub('B.2')} "
               f"published (B.2 {f.says('B.2')})")
    s1 = f.sweep_values("B.s1")
    out.append(f"; with {value_text(s1[-1])} slots {f.sweep_sim('B.s1', 'B.2', s1[-1])} tok/s (sweep B.s1).\n\n")
    # the queueing bound on B.9
    out.append(f"The article's response times, {f.pub('B.8')} ms with one user and {f.pub('B.9')} ms with {c[1]}, ")
    if f.queue_broken("B.9"):
        out.append(f"break the queueing bound: a server that answers one user in {f.pub('B.8')} ms keeps {c[1]} "
                   f"users within {c[1]} times that, unless it slows down under load (audit). ")
    else:
        out.append("are within the queueing bound (audit). ")
    out.append(f"The simulated single-user time is {f.sim('B.8')} ms with {np4} slots (B.8 {f.says('B.8')}). ")
    s2 = f.sweep_values("B.s2")
    worst = max(f.sweep_float("B.s2", "B.9", v) / f.sweep_float("B.s2", "B.8", v) for v in s2)
    out.append(f"Its p99 response time at {c[1]} users is {f.sweep_sim('B.s2', 'B.9', s2[0])} ms with "
               f"{value_text(s2[0])} slot{'s' if value_text(s2[0]) != '1' else ''} and {f.sim('B.9')} ms with {np4} "
               f"(sweep B.s2; B.9 {f.says('B.9')}): at most {worst:.1f} times its own single-user time at any slot "
               f"count of the sweep, "
               + ("within the bound's factor of " if worst <= c[1] * 1.005 else "beyond the bound's factor of ")
               + f"{c[1]}. Single-client TTFTs: vLLM {f.sim('B.4')} vs {f.pub('B.4')} ms (B.4 {f.says('B.4')}), "
               f"Ollama {f.sim('B.5')} vs {f.pub('B.5')} ms (B.5 {f.says('B.5')}).")
    return "".join(out)


def _text_c(f: Facts) -> str:
    g = "claims_c_a100_llama8b"
    exp = f.exp(g)
    c = exp.workload.clients
    out = [f"vLLM's single-client throughput: {f.sim('C.7')} simulated vs {f.pub('C.7')} tok/s (C.7 "
           f"{f.says('C.7')}); at {c[1]} clients {f.sim('C.8')} vs {f.pub('C.8')} (C.8 {f.says('C.8')}). From "
           f"{c[0]} to {c[-1]} clients the simulated throughput grows {f.val('C.12') / f.val('C.7'):.1f}x "
           f"(to {f.sim('C.12')} tok/s; decode stays bound by one read of the weights per step), the published "
           f"{f.pub_val('C.12') / f.pub_val('C.7'):.1f}x (to {f.pub('C.12')}); "]
    think = f.sweep_values("C.s2")
    t = think[-1]
    g0, gt = f.val("C.12") / f.val("C.7"), f.sweep_float("C.s2", "C.12", t) / f.sweep_float("C.s2", "C.7", t)
    gp = f.pub_val("C.12") / f.pub_val("C.7")
    closer = abs(math.log(gt / gp)) < abs(math.log(g0 / gp))
    out.append(f"with a per-request client overhead of {value_text(t)} s (sweep C.s2) the simulated growth is "
               f"{gt:.1f}x, " + ("closer to" if closer else "no closer to") + " the published curve's shape. ")
    roof = f.sweep_float("C.s1", "C.1", "roofline")
    law, pub = f.val("C.1"), f.pub_val("C.1")
    out.append(f"Ollama at one client: llama.cpp's law gives {f.sim('C.1')} tok/s against {f.pub('C.1')} published "
               f"(C.1 {f.says('C.1')}, {f.ratio('C.1')}x); the roofline this paper used before "
               f"({DEFAULT_MEM_EFFICIENCY:g} of the datasheet bandwidth, sweep C.s1) gives "
               f"{f.sweep_sim('C.s1', 'C.1', 'roofline')}")
    if roof > law > pub:
        out.append(f", so the measured law closes {100 * (roof - law) / (roof - pub):.0f}% of the roofline's gap in "
                   f"tok/s, and the rest needs kernels slower than llama.cpp's measured ones or layers offloaded to "
                   f"the CPU. ")
    else:
        out.append(". ")
    if f.agrees("C.6"):
        out.append(f"That requests queue at {c[-1]} clients is an identity of the single slot: {f.sim('C.6')}% of the "
                   f"mean response time is spent waiting.")
    else:
        out.append(f"C.6 (requests queue at {c[-1]} clients, an identity) disagrees: {f.sim('C.6')}% of the mean "
                   f"response time is spent waiting.")
    return "".join(out)


def _text_d(f: Facts) -> str:
    g = "claims_d_pagedattention"
    exp = f.exp(g)
    mml = exp.engine("orca_max").max_model_len
    setup = ("D.1", "D.2", "D.3", "D.4")
    bad = [i for i in setup if f.disagrees(i)]
    out = [("The memory accounting agrees with the paper's setup: " if not bad else
            f"The memory accounting disagrees with the paper's setup in {_and(bad)}: ")
           + f"{f.sim('D.1')} GB of weights (an input), {f.sim('D.2')} GB of KV cache and {f.sim('D.3')} token slots "
           f"of {f.sim('D.4')} KiB (identities) against the paper's {f.pub('D.1')} GB, {f.pub('D.2')} GB, "
           f"{f.pub('D.3')} and {f.pub('D.4')} KiB. "]
    out.append(f"With {mml}-token reservations {f.sim('D.5')}% (Orca (Max), D.5 {f.says('D.5')}) and {f.sim('D.7')}% "
               f"(static batching, D.7 {f.says('D.7')}) of the reserved KV holds tokens (medians over seeds); paging "
               f"holds {f.sim('D.8')}% (D.8, an identity of paging, {f.says('D.8')}). ")
    out.append(f"vLLM's saturated request rate is {f.sim('D.10')}x Orca (Max)'s (D.10 {f.says('D.10')}) and "
               f"{f.sim('D.11')}x static batching's (D.11 {f.says('D.11')}); against Orca (Oracle) it is "
               f"{f.sim('D.9')}x (D.9 {f.says('D.9')}; published {f.pub('D.9')}, within {TOL} from "
               f"{fmt_num(float(f.rows['D.9']['published_lo']) * (1 - TOLERANCE))}x). ")
    if f.val("D.6") > f.pub_val("D.6"):
        out.append(f"The simulated Oracle wastes less of its reservations than the paper's: {f.sim('D.6')}% of its "
                   f"reserved KV holds tokens against {f.pub('D.6')}% (D.6 {f.says('D.6')}); it has no external "
                   f"fragmentation, which the simulator does not model. ")
    else:
        out.append(f"The simulated Oracle's reserved KV holds {f.sim('D.6')}% tokens against the paper's "
                   f"{f.pub('D.6')}% (D.6 {f.says('D.6')}). ")
    bsv = f.sweep_values("D.s1")
    out.append(f"Across block sizes {value_text(bsv[0])} to {value_text(bsv[-1])} (sweep D.s1) the share of paged KV "
               f"holding tokens goes from {f.sweep_sim('D.s1', 'D.8', bsv[0])}% to "
               f"{f.sweep_sim('D.s1', 'D.8', bsv[-1])}%; the step-time law has no block-size term, so it cannot show "
               f"the paper's slowdown of small blocks.")
    return "".join(out)


E_METRICS = {"output_throughput": ("output throughput", "tok/s"), "median_ttft_ms": ("median TTFT", "ms"),
             "median_tpot_ms": ("median TPOT", "ms"), "median_e2el_ms": ("median E2E", "ms")}  # name, unit


def _text_e(f: Facts) -> str:
    g = "claims_e_vllm054_a100"
    rep = f.reports[g]
    table = rep.table
    runs = sorted({_requests_of(rep, i) for i in table.id})
    by_run = {n: {r["metric"]: r["id"] for _, r in table.iterrows() if _requests_of(rep, r["id"]) == n} for n in runs}
    metrics = [m for m in E_METRICS if any(m in ids for ids in by_run.values())]
    fits = f.ids(g, "fit")
    fit_runs = sorted({_requests_of(rep, i) for i in fits})
    other = [n for n in runs if n not in fit_runs]
    lines = ["| prompts at t = 0 | " + " | ".join(f"{' '.join(E_METRICS[m])} (published / simulated)"
                                               for m in metrics) + " |",
             "|---|" + "---|" * len(metrics)]
    for n in runs:
        ids = by_run[n]
        lines.append(f"| {n} | " + " | ".join(
            f"{f.pub(ids[m])} / {f.sim(ids[m])} ({f.verdict(ids[m])})" if m in ids else "-" for m in metrics) + " |")
    fit_what = _and(E_METRICS[f.rows[i]["metric"]][0] for i in fits)
    out = [f"The one group where the published figures are measurements of the system the simulator models, with the "
           f"setup stated: vLLM's runtime law was fitted on {len(fits)} figures of the {_and(fit_runs)}-prompt run "
           f"({fit_what}: {_and(fits)}, class fit) and the v0.6.0 release notes; everything else is the scheduler, "
           f"the memory plan and the law together"
           + (f", on runs {_and(f'{n / fit_runs[0]:g}' for n in other)} times larger" if len(fit_runs) == 1 else "")
           + ".\n\n" + "\n".join(lines) + "\n\n"]
    tests = [by_run[n][m] for n in other for m in metrics if m in by_run[n]]
    held = sum(f.is_(i, "reproduced") for i in tests)
    out.append(f"In the {_and(other)}-prompt runs {held} of the {len(tests)} tests are reproduced (within {TOL} at "
               f"every seed). ")
    first, last = other[0], other[-1]
    budget = rep.exp.engine("vllm").max_num_batched_tokens
    for m, why in (("median_ttft_ms", f"as prompts wait for the {budget}-token prefill budget"),
                   ("median_tpot_ms", "as the batch's host time per sequence and K/V reads grow")):
        a, b = by_run[first].get(m), by_run[last].get(m)
        if a and b:
            grows = f.val(b) > f.val(a) and f.pub_val(b) > f.pub_val(a)
            label = E_METRICS[m][0]
            out.append(f"{label[0].upper() + label[1:]} goes from {f.sim(a)} to {f.sim(b)} ms "
                       f"(published {f.pub(a)} and {f.pub(b)})" + (f", {why}" if grows else "") + ". ")
    rest = [i for n in fit_runs for i in by_run[n].values() if f.rows[i]["class"] == "test"]
    if rest:
        out.append("In the run the law was fitted on, the other figures are tests, though not independent of the "
                   "fit: " + "; ".join(f"{E_METRICS[f.rows[i]['metric']][0]} {f.says(i)} ({f.ratio(i)}x, {i})"
                                        for i in rest) + ".")
        if any(f.is_(i, "differs") for i in rest):
            out.append(" Where one differs, its note says why.")
    return "".join(out)


_GROUP_TEXT = {"claims_a_h100_llama8b": _text_a, "claims_b_blackwell_70b": _text_b,
               "claims_c_a100_llama8b": _text_c, "claims_d_pagedattention": _text_d,
               "claims_e_vllm054_a100": _text_e}


# ---------------------------------------------------------------------------------------

def build(configs: list[Path], results_root: Path, figures_dir: Path, paper: Path, fidelity: Path,
          reuse: bool = False, teaching: bool = True) -> Path:
    """Everything: run or reuse the claims results, draw the figures, write the paper."""
    reports = run_all(configs, results_root, reuse)
    figures_dir.mkdir(parents=True, exist_ok=True)
    figs: dict[str, list[Path]] = {}
    for rep in reports:
        name = rep.exp.name
        path = figures_dir / f"{name}.png"
        if rep.exp.workload.is_closed_loop:
            figs[name] = [closed_loop_figure(rep, path)]
        elif rep.exp.workload.kind == "trace":
            figs[name] = [trace_figure(rep, path)]
        else:
            figs[name] = [open_loop_figure(rep, path)]
        for sw in rep.claims.sweeps:
            if not rep.sweeps.empty and sw.id in set(rep.sweeps.sweep):
                figs[f"{name}:{sw.id}"] = [sweep_figure(rep, sw.id, figures_dir / f"{name}_{sw.id}.png")]
    a = audit_figure(reports, figures_dir / "audit.png")
    if a is not None:
        figs["audit"] = [a]
    teach = []
    if teaching:
        teach = make_all(figures_dir)
    out = write_paper(reports, figs, paper, fidelity, teach)
    print(f"paper: {out}")
    print(f"figures: {figures_dir} ({sum(len(v) for v in figs.values()) + len(teach)} PNG)")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reuse", action="store_true", help="keep results already in the results directories")
    ap.add_argument("--configs", nargs="*", type=Path, default=None,
                    help="claims configs (default: experiments/claims_*.toml)")
    ap.add_argument("--results-root", type=Path, default=ROOT / "experiments" / "results")
    ap.add_argument("--figures", type=Path, default=ROOT / "papers" / "figures")
    ap.add_argument("--paper", type=Path, default=ROOT / "papers" / "reproduction.md")
    ap.add_argument("--fidelity", type=Path, default=ROOT / "experiments" / "results" / "fidelity_cpu")
    ap.add_argument("--no-teaching", action="store_true", help="skip the teaching figures")
    args = ap.parse_args(argv)
    configs = args.configs if args.configs else sorted((ROOT / "experiments").glob("claims_*.toml"))
    build(configs, args.results_root, args.figures, args.paper, args.fidelity, args.reuse, not args.no_teaching)
    return 0


if __name__ == "__main__":
    sys.exit(main())
