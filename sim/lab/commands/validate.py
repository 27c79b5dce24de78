"""`servesim validate CONFIG.toml... --out DIR [--profile FILE]`: the simulator against the reference engine."""
from __future__ import annotations

from pathlib import Path

import click

from sim.lab.profile import GRIDS
from sim.lab.validate import run_validate


@click.command("validate")
@click.argument("configs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Results directory: bench/, sim/, errors.csv, steps_check.csv, fidelity.png.")
@click.option("--profile", "profile", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A `servesim profile` CSV of this machine (default: profile now into DIR/profile.csv).")
@click.option("--grid", default="default", show_default=True, type=click.Choice(list(GRIDS)),
              help="Profile grid when profiling.")
@click.option("--clock", default="wall", show_default=True, type=click.Choice(["wall", "model"]),
              help="wall: time the engine on this machine. model: run the engine on the calibrated model's clock, "
                   "a deterministic check of everything but the cost model (every error must be ~0).")
def command(configs: tuple[Path, ...], out_dir: Path, profile: Path | None, grid: str, clock: str) -> None:
    """Run CONFIG on the real engine and on the simulator (calibrated on this machine); compare the metrics."""
    run_validate(list(configs), out_dir, profile, grid=grid, echo=click.echo, clock=clock)
    click.echo(f"errors: {out_dir / 'errors.csv'}")
