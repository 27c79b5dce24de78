"""`servesim run CONFIG --out DIR`: an experiment on the simulator."""
from __future__ import annotations

from pathlib import Path

import click

from sim.lab.experiment import load_experiment
from sim.lab.metrics import format_summary
from sim.lab.plots import plot_results
from sim.lab.simulate import run_experiment


@click.command("run")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Results directory (default: runs/<experiment name>).")
@click.option("--fresh", is_flag=True, help="Start over instead of resuming the cells already in --out.")
@click.option("--no-plots", is_flag=True, help="Skip the figures.")
@click.option("--teaching-path", is_flag=True,
              help="Run the engine's own scheduler objects instead of their event-driven twins (sim.core.fast). "
                   "The results are the same, byte for byte; the teaching path is ~20x slower.")
def command(config: Path, out_dir: Path | None, fresh: bool, no_plots: bool, teaching_path: bool) -> None:
    """Simulate an experiment: DIR/requests.csv, summary.json, timeseries.csv, figures/."""
    exp = load_experiment(config)
    out_dir = out_dir or Path("runs") / exp.name
    summary = run_experiment(exp, out_dir, resume=not fresh, implementation="teaching" if teaching_path else "auto")
    click.echo(format_summary(summary))
    if not no_plots:
        for path in plot_results(out_dir):
            click.echo(f"figure: {path}")
    click.echo(f"results: {out_dir}")
