"""`servesim measured`: every calibration row with what the runtime laws predict, and the leave-one-GPU-out table."""
from __future__ import annotations

import json

import click

from sim.core import runtimes
from sim.lab import measured


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:+.1f}%"


def _num(x) -> str:
    if x is None:
        return "-"
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


@click.command("measured")
@click.option("--runtime", type=click.Choice(runtimes.RUNTIMES), default=None,
              help="Only this runtime's rows (default: both).")
@click.option("--json", "as_json", is_flag=True, help="Print rows, summaries and parameters as JSON.")
@click.option("--fit", "fit_path", type=click.Path(dir_okay=False), default=None,
              help=f"Parameters file (default {runtimes.FIT_PATH.name} in experiments/measured).")
@click.option("--refit", is_flag=True, help="Fit both laws to the rows again and write the parameters file first.")
def command(runtime: str | None, as_json: bool, fit_path: str | None, refit: bool) -> None:
    """Measured vs predicted for every calibration row (in-sample, held out), plus leave-one-GPU-out.

    Roles: fit = used to fit the law (its error is in-sample, not a reproduction); holdout = not used
    to fit; sim = a serving run that needs the whole simulator (listed, not predicted here).
    Leave-one-GPU-out (llama.cpp only; vLLM data has one card): refit without each card, predict it.
    """
    rows = measured.load_rows()
    if refit:
        measured.write_fit(fit_path, rows)
    fit = runtimes.load_fit(fit_path)
    results = measured.evaluate(fit, rows)
    logo = measured.leave_one_gpu_out(rows) if runtime in (None, "llama.cpp") else []
    if runtime:
        results = [r for r in results if r["runtime"] == runtime]
    summary = measured.summarize(results)
    logo_rows = [dict(r, runtime="llama.cpp", role="leave-one-gpu-out") for r in logo]
    logo_summary = measured.summarize(logo_rows) + measured.summarize(logo_rows, by=("runtime", "hardware", "kind"))
    if as_json:
        click.echo(json.dumps({"params": {rt: fit[rt] for rt in runtimes.RUNTIMES if runtime in (None, rt)},
                               "rows": results, "summary": summary, "leave_one_gpu_out": logo,
                               "leave_one_gpu_out_summary": logo_summary}, indent=2))
        return
    header = (f"{'row':<36} {'role':<7} {'hardware':<14} {'model':<13} {'format':<12} {'test':<13} "
              f"{'measured':>9} {'predicted':>9} {'error':>7}  unit")
    click.echo(header)
    click.echo("-" * len(header))
    for r in results:
        click.echo(f"{r['row_id']:<36} {r['role']:<7} {r['hardware']:<14} {r['model']:<13} {r['weight_format']:<12} "
                   f"{r['test']:<13} {_num(r['measured']):>9} {_num(r['predicted']):>9} {_pct(r['error']):>7}  "
                   f"{r['unit']}" + (f"  ({r['note']})" if r["note"] else ""))
    click.echo("\nmedian / max |error| by runtime, role, kind (fit rows are in-sample: fitted, not reproduced)")
    for s in summary:
        click.echo(f"  {s['runtime']:<10} {s['role']:<8} {s['kind']:<5} rows={s['rows']:<3} "
                   f"median={100 * s['median_abs_error']:5.1f}%  max={100 * s['max_abs_error']:5.1f}%")
    if logo:
        click.echo("\nleave-one-GPU-out (llama.cpp): refit on the other cards' fit rows, predict the held-out card")
        for s in logo_summary:
            who = s.get("hardware", "all cards")
            click.echo(f"  {who:<16} {s['kind']:<5} rows={s['rows']:<3} median={100 * s['median_abs_error']:5.1f}%  "
                       f"max={100 * s['max_abs_error']:5.1f}%")
    if runtime in (None, "vllm"):
        click.echo("\nvLLM: one card (A100 80GB SXM). Its two fit rows and the v0.6.0 release notes' CPU/GPU split "
                   "pin three parameters exactly (zero error by construction; bw_efficiency is assumed), so no "
                   "accuracy is claimed and no leave-one-GPU-out is possible. The 'sim' rows are checks for the "
                   "whole simulator.")
    click.echo("\nparameters:")
    for rt in runtimes.RUNTIMES:
        if runtime in (None, rt):
            click.echo(f"  {rt}: " + ", ".join(f"{k}={v:.4g}" for k, v in fit[rt].items()))
