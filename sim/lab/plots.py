"""Figures of a results directory: throughput and latency against load, KV memory over time.

    plot_results(DIR) -> [DIR/figures/throughput.png, e2el_p99.png, ttft.png, kv_usage.png]

Reads DIR/summary.json and DIR/requests.csv (sim.lab.metrics.load_results), DIR/timeseries.csv
(the simulator's per-replica samples; the KV figure is skipped without it) and, for titles,
DIR/experiment.toml. The load axis is the swept variable: closed-loop concurrency, or the
open-loop request rate (an infinite rate, "everything at once", sits one step right of the
largest finite rate, labelled inf); a trace has no load axis, so engines become bars. The axis
is logarithmic when its values span more than 10x. Points of cells where some requests failed
(refused or timed out) are drawn hollow: their latency statistics cover survivors only.

matplotlib figures written to files (no pyplot, no display); plain Python otherwise, no JAX.
"""
from __future__ import annotations

import math
import tomllib
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.ticker import FuncFormatter, NullFormatter

from sim.lab.figures import subplots
from sim.lab.metrics import load_results

FIGURES = ("throughput", "e2el_p99", "ttft", "kv_usage")
LOG_SPAN = 10.0  # use a log axis when max / min of positive values exceeds this


def _title(directory: Path) -> str:
    """'name: model on hardware' from experiment.toml, or the directory name."""
    path = directory / "experiment.toml"
    if not path.exists():
        return directory.name
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return directory.name
    parts = [str(doc.get("name", directory.name))]
    model = doc.get("model")
    hw = doc.get("hardware", {})
    where = hw.get("preset") or doc.get("cost_model", {}).get("hardware")
    if model:
        detail = f"{model} on {where}" if where else str(model)
        extras = [f"{hw['replicas']} replicas" if hw.get("replicas", 1) > 1 else "",
                  f"TP={hw['tp']}" if hw.get("tp", 1) > 1 else ""]
        if any(extras):
            detail += " (" + ", ".join(x for x in extras if x) + ")"
        parts.append(detail)
    return ": ".join(parts)


class _LoadAxis:
    """The swept variable of the summary rows: its label, x positions, ticks and scale."""

    def __init__(self, summary: pd.DataFrame):
        conc = summary["concurrency"] if "concurrency" in summary else pd.Series(dtype=float)
        rate = summary["request_rate"] if "request_rate" in summary else pd.Series(dtype=float)
        conc = pd.to_numeric(conc, errors="coerce").astype(float)
        rate = pd.to_numeric(rate, errors="coerce").astype(float)
        self.kind = "concurrency" if conc.notna().any() else ("rate" if rate.notna().any() else "none")
        self.inf_at = None
        if self.kind == "concurrency":
            self.values = conc.to_numpy()
            self.label = "Concurrency (closed-loop clients)"
        elif self.kind == "rate":
            self.values = rate.to_numpy().copy()
            self.label = "Request rate (req/s)"
            finite = self.values[np.isfinite(self.values)]
            if np.isinf(self.values).any():  # one step right of the largest finite rate
                top = finite.max() if finite.size else 1.0
                self.inf_at = 2.0 * top if self._log(finite) else top * 1.25 + (0.0 if finite.size else 1.0)
                self.values[np.isinf(self.values)] = self.inf_at
        else:
            self.values = np.zeros(len(summary))
            self.label = ""
        pos = self.values[np.isfinite(self.values) & (self.values > 0)]
        self.log = self._log(pos)

    @staticmethod
    def _log(values: np.ndarray) -> bool:
        v = values[values > 0]
        return v.size > 1 and v.max() / v.min() > LOG_SPAN

    def apply(self, ax) -> None:
        """Label, scale and ticks of the x axis."""
        ax.set_xlabel(self.label)
        if self.log:
            ax.set_xscale("log")
        ticks = np.unique(self.values[np.isfinite(self.values)])
        if 0 < ticks.size <= 12:
            ax.set_xticks(ticks)
            ax.set_xticklabels(["inf" if self.inf_at is not None and t == self.inf_at else f"{t:g}"
                                for t in ticks])
            ax.minorticks_off()


def _engines(summary: pd.DataFrame) -> list[str]:
    """Engine names in the order they first appear (the experiment's order)."""
    return list(dict.fromkeys(summary["engine"].astype(str)))


def _colors(engines: list[str]) -> dict[str, str]:
    cmap = matplotlib.colormaps["tab10"]
    return {e: cmap(i % 10) for i, e in enumerate(engines)}


def _failed(rows: pd.DataFrame) -> np.ndarray:
    if "failed" not in rows:
        return np.zeros(len(rows), dtype=bool)
    return pd.to_numeric(rows["failed"], errors="coerce").fillna(0).to_numpy() > 0


def _maybe_log_y(ax, values) -> None:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x) and x > 0])
    if v.size > 1 and v.max() / v.min() > LOG_SPAN:
        ax.set_yscale("log")
        _plain_log_labels(ax.yaxis, decades=math.log10(v.max() / v.min()))


def _plain_log_labels(axis, decades: float) -> None:
    """Tick labels 20, 500, 0.05 instead of 2x10^1 on a log axis; minor ticks labelled over < 2 decades."""

    plain = FuncFormatter(lambda v, _: f"{v:,.10g}")
    axis.set_major_formatter(plain)
    axis.set_minor_formatter(plain if decades < 2 else NullFormatter())


def _line_plot(ax, summary: pd.DataFrame, axis: _LoadAxis, column: str, colors: dict, *, scale: float = 1.0,
               style: str = "-", label_suffix: str = "", show_failed: bool = True) -> list[float]:
    """One line per engine of summary[column] * scale against the load; returns the values drawn."""
    drawn = []
    summary = summary.assign(_x=axis.values)
    for engine in _engines(summary):
        rows = summary[summary["engine"].astype(str) == engine].sort_values("_x")
        if column not in rows:
            continue
        y = pd.to_numeric(rows[column], errors="coerce").to_numpy(dtype=float) * scale
        x = rows["_x"].to_numpy(dtype=float)
        ok = np.isfinite(y)
        if not ok.any():
            continue
        ax.plot(x[ok], y[ok], style, color=colors[engine], label=engine + label_suffix, linewidth=1.8)
        failed = _failed(rows) & ok
        ax.plot(x[ok & ~failed], y[ok & ~failed], "o", color=colors[engine], markersize=5)
        if show_failed and failed.any():
            ax.plot(x[failed], y[failed], "o", markerfacecolor="white", markeredgecolor=colors[engine],
                    markersize=6, markeredgewidth=1.5)
        drawn.extend(y[ok].tolist())
    return drawn


def _bar_plot(ax, summary: pd.DataFrame, columns: list[tuple[str, str]], colors: dict, scale: float = 1.0) -> None:
    """Trace runs (no load axis): bars per engine, one group per column."""
    engines = _engines(summary)
    width = 0.8 / max(1, len(columns))
    for j, (column, label) in enumerate(columns):
        vals = [float(pd.to_numeric(summary.loc[summary["engine"].astype(str) == e, column], errors="coerce")
                      .iloc[0]) * scale if column in summary else math.nan for e in engines]
        ax.bar(np.arange(len(engines)) + (j - (len(columns) - 1) / 2) * width, vals, width,
               color=[colors[e] for e in engines], alpha=1.0 if j == 0 else 0.55, label=label)
    ax.set_xticks(np.arange(len(engines)))
    ax.set_xticklabels(engines)
    if len(columns) > 1:
        ax.legend(frameon=False)


def _finish(fig, ax, path: Path, title: str, subtitle: str, legend: bool = True, note: str = "") -> Path:
    ax.set_title(f"{title}\n{subtitle}", fontsize=11)
    ax.grid(True, which="major", alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(frameon=False, fontsize=9)
    if note:
        fig.text(0.01, 0.01, note, fontsize=8, color="0.35", ha="left", va="bottom")
    fig.tight_layout(rect=(0, 0.03 if note else 0, 1, 1))
    fig.savefig(path, dpi=120)
    return path


def _hollow_note(summary: pd.DataFrame) -> str:
    return ("hollow markers: cells where some requests were refused or timed out (latency over completed only)"
            if _failed(summary).any() else "")


# ---------------------------------------------------------------------------------------
# Time series: KV usage of the highest-load cell per engine

def _cell_load(label: str) -> float:
    """The load of a cell label ('vllm@c=16' -> 16, 'x@rate=inf' -> inf, trace -> 0)."""
    _, _, tail = label.partition("@")
    if "=" not in tail:
        return 0.0
    try:
        return float(tail.split("=", 1)[1])
    except ValueError:
        return 0.0


def _kv_fractions(series: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(time s, reserved fraction, stored fraction) summed over replicas on the union of their sample times.

    Each replica's sample holds until its next one (the replica samples when it changes state).
    """
    times = np.unique(series["time_s"].to_numpy(dtype=float))
    reserved = np.zeros(times.size)
    stored = np.zeros(times.size)
    capacity = np.zeros(times.size)
    for _, s in series.groupby("replica", sort=False):
        s = s.sort_values("time_s", kind="stable")
        t = s["time_s"].to_numpy(dtype=float)
        idx = np.searchsorted(t, times, side="right") - 1
        have = idx >= 0
        idx = np.clip(idx, 0, None)
        for out, col in ((reserved, "kv_reserved_tokens"), (stored, "kv_stored_tokens"),
                         (capacity, "kv_capacity_tokens")):
            out += np.where(have, s[col].to_numpy(dtype=float)[idx], 0.0)
        # a replica's capacity counts from its first sample on (all replicas sample at t = 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return times, np.where(capacity > 0, reserved / capacity, 0.0), np.where(capacity > 0, stored / capacity, 0.0)


def _plot_kv(series: pd.DataFrame, summary: pd.DataFrame, colors: dict, path: Path, title: str) -> Path | None:
    cells = []
    labels = series["cell"].astype(str).unique()
    for engine in _engines(summary):
        mine = [c for c in labels if c.split("@", 1)[0] == engine]
        if mine:
            cells.append((engine, max(mine, key=_cell_load)))
    if not cells:
        return None
    fig, axes = subplots(len(cells), 1, figsize=(8, 1.2 + 2.1 * len(cells)), sharex=False, squeeze=False)
    for ax, (engine, cell) in zip(axes[:, 0], cells):
        t, reserved, stored = _kv_fractions(series[series["cell"].astype(str) == cell])
        ax.step(t, 100 * reserved, where="post", color=colors[engine], linewidth=1.4, label="reserved")
        ax.fill_between(t, 100 * stored, step="post", color=colors[engine], alpha=0.35, linewidth=0,
                        label="holding tokens")
        ax.set_ylim(0, 122)  # headroom above 100 % for the legend
        ax.set_yticks([0, 25, 50, 75, 100])
        ax.set_ylabel("KV memory (%)")
        ax.set_title(cell, fontsize=10, loc="left")
        ax.grid(True, alpha=0.3)
        ax.legend(frameon=False, fontsize=8, loc="upper right", ncol=2)
    axes[-1, 0].set_xlabel("Simulated time (s)")
    fig.suptitle(f"{title}\nKV cache use at the highest load of each engine (% of the pool / slots)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


# ---------------------------------------------------------------------------------------

def plot_results(directory: str | Path) -> list[Path]:
    """Draw the figures of a results directory into DIR/figures/; returns the files written."""
    d = Path(directory)
    _, summary = load_results(d)
    if summary.empty or "engine" not in summary:
        return []
    out = d / "figures"
    out.mkdir(parents=True, exist_ok=True)
    title = _title(d)
    engines = _engines(summary)
    colors = _colors(engines)
    axis = _LoadAxis(summary)
    note = _hollow_note(summary)
    written: list[Path] = []

    def figure():
        return subplots(figsize=(7.5, 4.8))

    # Output throughput
    fig, ax = figure()
    if axis.kind == "none":
        _bar_plot(ax, summary, [("output_throughput", "output")], colors)
    else:
        ys = _line_plot(ax, summary, axis, "output_throughput", colors)
        axis.apply(ax)
        _maybe_log_y(ax, ys)
        if ax.get_yscale() != "log":
            ax.set_ylim(bottom=0)
    ax.set_ylabel("Output throughput (tokens/s)")
    written.append(_finish(fig, ax, out / "throughput.png", title, "Output token throughput", note=note))

    # p99 end-to-end latency
    fig, ax = figure()
    if axis.kind == "none":
        _bar_plot(ax, summary, [("p99_e2el_ms", "p99")], colors, scale=1e-3)
    else:
        ys = _line_plot(ax, summary, axis, "p99_e2el_ms", colors, scale=1e-3)
        axis.apply(ax)
        _maybe_log_y(ax, ys)
        if ax.get_yscale() != "log":
            ax.set_ylim(bottom=0)
    ax.set_ylabel("p99 end-to-end latency (s)")
    written.append(_finish(fig, ax, out / "e2el_p99.png", title, "p99 end-to-end latency (E2EL)", note=note))

    # TTFT: mean (solid) and p99 (dashed)
    fig, ax = figure()
    if axis.kind == "none":
        _bar_plot(ax, summary, [("mean_ttft_ms", "mean"), ("p99_ttft_ms", "p99")], colors)
    else:
        ys = _line_plot(ax, summary, axis, "mean_ttft_ms", colors, label_suffix=" mean")
        ys += _line_plot(ax, summary, axis, "p99_ttft_ms", colors, style="--", label_suffix=" p99")
        axis.apply(ax)
        _maybe_log_y(ax, ys)
        if ax.get_yscale() != "log":
            ax.set_ylim(bottom=0)
    ax.set_ylabel("Time to first token (ms)")
    subtitle = "Time to first token: mean and p99" + ("" if axis.kind == "none" else " (dashed)")
    written.append(_finish(fig, ax, out / "ttft.png", title, subtitle, note=note))

    # KV usage over time
    ts_path = d / "timeseries.csv"
    if ts_path.exists() and ts_path.stat().st_size > 0:
        series = pd.read_csv(ts_path)
        needed = {"cell", "replica", "time_s", "kv_reserved_tokens", "kv_stored_tokens", "kv_capacity_tokens"}
        if needed <= set(series.columns) and len(series):
            p = _plot_kv(series, summary, colors, out / "kv_usage.png", title)
            if p is not None:
                written.append(p)
    return written
