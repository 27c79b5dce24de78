"""`servesim run CONFIG --out DIR [--workers N | --ray ADDRESS]`: an experiment (or a sweep) on the simulator."""
from __future__ import annotations

from pathlib import Path

import click

from sim.lab.experiment import load_experiment
from sim.lab.metrics import format_summary
from sim.lab.plots import plot_results
from sim.lab.sweep import run_sweep


@click.command("run")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Results directory (default: runs/<experiment name>).")
@click.option("--fresh", is_flag=True, help="Start over instead of resuming the cells already in --out.")
@click.option("--no-plots", is_flag=True, help="Skip the figures.")
@click.option("--workers", type=int, default=None,
              help="Local processes that simulate cells at once (default: this machine's CPUs; 1 = this process).")
@click.option("--ray", "ray_address", default=None, metavar="ADDRESS",
              help="Run the cells on the Ray cluster at ADDRESS (HOST:PORT of `ray start --head`, or auto) "
                   "instead of local processes; needs the ray extra.")
@click.option("--teaching-path", is_flag=True,
              help="Run the engine's own scheduler objects instead of their event-driven twins (sim.core.fast). "
                   "The results are the same, byte for byte; the teaching path is ~20x slower.")
def command(config: Path, out_dir: Path | None, fresh: bool, no_plots: bool, workers: int | None,
            ray_address: str | None, teaching_path: bool) -> None:
    """Simulate an experiment: DIR/requests.csv, summary.json, timeseries.csv, figures/.

    With a [sweep] grid, one such folder per point under DIR/points/, and DIR/summary.json over all
    of them. The files are the same whatever --workers, --ray or --teaching-path."""
    exp = load_experiment(config)
    out_dir = out_dir or Path("runs") / exp.name
    summary = run_sweep(exp, out_dir, workers=workers, ray_address=ray_address, resume=not fresh,
                        implementation="teaching" if teaching_path else "auto")
    if exp.sweep is not None:
        summary = summary.assign(cell=summary["point"] + " " + summary["cell"])
    click.echo(format_summary(summary))
    if not no_plots:
        dirs = sorted(p.parent for p in out_dir.glob("points/*/summary.json")) if exp.sweep else [out_dir]
        for d in dirs:
            for path in plot_results(d):
                click.echo(f"figure: {path}")
    click.echo(f"results: {out_dir}")
