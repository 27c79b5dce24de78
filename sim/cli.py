"""`servesim`: the command line. Each subcommand lives beside the code it drives; this file wires them.

Bad input anywhere (reference.errors.ConfigError) ends the command with one line naming the
field and what is allowed, and exit status 2, never a traceback.
"""
from __future__ import annotations

from pathlib import Path

import click

from reference.config import PRESETS
from reference.errors import ConfigError
from sim.audit import audit_command
from sim.claims import claims_command
from sim.cli_measured import measured_command
from sim.cli_physics import hardware_command, steptime_command
from sim.cli_serve import serve_command
from sim.cli_validate import validate_command
from sim.trace import trace_command


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ConfigError as e:
            raise click.UsageError(str(e), ctx) from None
        except FileNotFoundError as e:
            raise click.UsageError(f"file not found: {e.filename or e}", ctx) from None


@click.group(cls=_Group)
def main() -> None:
    """servesim: an LLM-serving lab. A JAX reference engine and a SimPy simulator that share schedulers."""


@main.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def models_command(as_json: bool) -> None:
    """List model presets: shape, parameters and KV bytes per token (16-bit)."""
    rows = [dict(name=c.name, layers=c.num_layers, hidden=c.hidden_size, heads=c.num_heads, kv_heads=c.num_kv_heads,
                 head_dim=c.head_dim, vocab=c.vocab_size, params=c.num_params,
                 weight_gb_16bit=c.weight_bytes(16) / 1e9, kv_bytes_per_token=c.kv_bytes_per_token(2),
                 source=c.source) for c in PRESETS.values()]
    if as_json:
        import json
        click.echo(json.dumps(rows, indent=2))
        return
    header = f"{'name':<16} {'layers':>6} {'hidden':>6} {'heads':>5} {'kv':>3} {'params':>8} {'GB@16b':>7} {'KV B/token':>10}"
    click.echo(header)
    click.echo("-" * len(header))
    for r in rows:
        p = r["params"]
        params = f"{p / 1e9:.2f}B" if p >= 1e9 else f"{p / 1e6:.1f}M" if p >= 1e6 else f"{p / 1e3:.0f}K"
        click.echo(f"{r['name']:<16} {r['layers']:>6} {r['hidden']:>6} {r['heads']:>5} {r['kv_heads']:>3} "
                   f"{params:>8} {r['weight_gb_16bit']:>7.2f} {r['kv_bytes_per_token']:>10}")


@main.command("run")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Results directory (default: runs/<experiment name>).")
@click.option("--fresh", is_flag=True, help="Start over instead of resuming the cells already in --out.")
@click.option("--no-plots", is_flag=True, help="Skip the figures.")
def run_command(config: Path, out_dir: Path | None, fresh: bool, no_plots: bool) -> None:
    """Simulate an experiment: DIR/requests.csv, summary.json, timeseries.csv, figures/."""
    from sim.experiment import load_experiment
    from sim.metrics import format_summary
    from sim.simulate import run_experiment

    exp = load_experiment(config)
    out_dir = out_dir or Path("runs") / exp.name
    summary = run_experiment(exp, out_dir, resume=not fresh)
    click.echo(format_summary(summary))
    if not no_plots:
        from sim.plots import plot_results
        for path in plot_results(out_dir):
            click.echo(f"figure: {path}")
    click.echo(f"results: {out_dir}")


@main.command("bench")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Results directory (default: runs/<experiment name>-bench).")
@click.option("--fresh", is_flag=True, help="Start over instead of resuming the cells already in --out.")
@click.option("--url", default=None, help="Drive a running server (e.g. `servesim serve`) at this OpenAI base URL "
              "over HTTP instead, e.g. http://127.0.0.1:8000/v1 (default --out: runs/<experiment name>-http).")
def bench_command(config: Path, out_dir: Path | None, fresh: bool, url: str | None) -> None:
    """Run an experiment on the JAX reference engine on this machine's device (or on a server, with --url)."""
    from reference.bench import run_bench
    from sim.experiment import load_experiment
    from sim.metrics import format_summary

    exp = load_experiment(config)
    if url:
        from reference.http_bench import run_http_bench
        out_dir = out_dir or Path("runs") / f"{exp.name}-http"
        summary = run_http_bench(exp, url, out_dir, resume=not fresh)
    else:
        out_dir = out_dir or Path("runs") / f"{exp.name}-bench"
        summary = run_bench(exp, out_dir, resume=not fresh)
    click.echo(format_summary(summary))
    click.echo(f"results: {out_dir}")


@main.command("profile")
@click.option("--model", "model_name", default="tiny", show_default=True, help=f"Model preset ({', '.join(PRESETS)}).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="CSV file to write.")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--grid", default="default", show_default=True, type=click.Choice(["quick", "default", "full"]),
              help="How many shapes to measure.")
@click.option("--repeats", default=5, show_default=True, type=int, help="Timed repetitions per shape (median kept).")
@click.option("--max-context", type=int, default=None,
              help="Clip the grid at this many tokens per sequence: profile the regime your experiments serve "
                   "(their max_model_len / num_ctx) rather than the model's whole context.")
def profile_command(model_name: str, out_path: Path, dtype: str, grid: str, repeats: int,
                    max_context: int | None) -> None:
    """Measure step latency over a grid of batch shapes on this machine's JAX device."""
    from reference.profile import run_profile

    table = run_profile(model_name, out_path, dtype=dtype, grid=grid, repeats=repeats, max_context=max_context)
    click.echo(f"{len(table)} shapes measured -> {out_path}")


for command in (hardware_command, steptime_command, claims_command, audit_command, trace_command, serve_command,
                validate_command):
    main.add_command(command)
main.add_command(measured_command)
