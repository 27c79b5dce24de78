"""`servesim validate CONFIG.toml... --out DIR [--profile FILE]`: the simulator against the reference engine,
or, with --url URL, against any running OpenAI-compatible server (sim.lab.url_validate)."""
from __future__ import annotations

from pathlib import Path

import click

from sim.lab.profile import GRIDS
from sim.lab.url_profile import URL_GRIDS
from sim.lab.url_validate import run_url_validate
from sim.lab.validate import run_validate


@click.command("validate")
@click.argument("configs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Results directory: bench/, sim/, errors.csv, steps_check.csv (or server_checks.csv), fidelity.png.")
@click.option("--profile", "profile", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A `servesim profile` CSV (of this machine, or of the server with --url) "
                   "(default: profile now into DIR/profile.csv).")
@click.option("--grid", default="default", show_default=True, type=click.Choice(sorted(set(GRIDS) | set(URL_GRIDS))),
              help="Profile grid when profiling.")
@click.option("--clock", default="wall", show_default=True, type=click.Choice(["wall", "model"]),
              help="wall: time the engine on this machine. model: run the engine on the calibrated model's clock, "
                   "a deterministic check of everything but the cost model (every error must be ~0).")
@click.option("--url", default=None, help="Validate against the server at this OpenAI base URL: each CONFIG has one "
              "engine, the model of that server; its cells run on the server and on the simulator.")
@click.option("--capacity-fractions", is_flag=True, help="With --url: open-loop configs' rates are fractions of the "
              "capacity measured by the closed-loop configs before them (their highest request throughput).")
@click.option("--capacity", type=click.FloatRange(min=0, min_open=True), default=None,
              help="With --capacity-fractions: the capacity (req/s) instead of measuring it, e.g. a first run's.")
@click.option("--sim-only", is_flag=True, help="Judge the cells a `validate --url` measured into --out again with "
              "the current simulator (simulate and compare only; no server, --url optional).")
def command(configs: tuple[Path, ...], out_dir: Path, profile: Path | None, grid: str, clock: str, url: str | None,
            capacity_fractions: bool, capacity: float | None, sim_only: bool) -> None:
    """Run CONFIG on a real engine (the reference engine here, or a server with --url) and on the simulator; compare."""
    if url or sim_only:
        if grid not in URL_GRIDS:
            raise click.UsageError(f"--grid {grid} is not a --url grid; choose {', '.join(URL_GRIDS)}")
        run_url_validate(list(configs), url or "", out_dir, profile, grid=grid, capacity_fractions=capacity_fractions,
                         capacity=capacity, echo=click.echo, bench=not sim_only)
    else:
        if grid not in GRIDS:
            raise click.UsageError(f"--grid {grid} is a --url grid; choose {', '.join(GRIDS)}")
        run_validate(list(configs), out_dir, profile, grid=grid, echo=click.echo, clock=clock)
    click.echo(f"errors: {out_dir / 'errors.csv'}")
