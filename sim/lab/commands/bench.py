"""`servesim bench CONFIG [--url URL]`: an experiment on the reference engine here, or on a server over HTTP."""
from __future__ import annotations

from pathlib import Path

import click

from sim.lab.bench import run_bench
from sim.lab.experiment import load_experiment
from sim.lab.http_bench import run_http_bench
from sim.lab.metrics import format_summary


@click.command("bench")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Results directory (default: runs/<experiment name>-bench).")
@click.option("--fresh", is_flag=True, help="Start over instead of resuming the cells already in --out.")
@click.option("--url", default=None, help="Drive a running server (e.g. `servesim serve`) at this OpenAI base URL "
              "over HTTP instead, e.g. http://127.0.0.1:8000/v1 (default --out: runs/<experiment name>-http).")
def command(config: Path, out_dir: Path | None, fresh: bool, url: str | None) -> None:
    """Run an experiment on the JAX reference engine on this machine's device (or on a server, with --url)."""
    exp = load_experiment(config)
    if url:
        out_dir = out_dir or Path("runs") / f"{exp.name}-http"
        summary = run_http_bench(exp, url, out_dir, resume=not fresh)
    else:
        out_dir = out_dir or Path("runs") / f"{exp.name}-bench"
        summary = run_bench(exp, out_dir, resume=not fresh)
    click.echo(format_summary(summary))
    click.echo(f"results: {out_dir}")
