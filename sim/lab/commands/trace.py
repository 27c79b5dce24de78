"""`servesim trace [CONFIG]`: a step-by-step account of a small scenario, for teaching."""
from __future__ import annotations

import click

from sim.lab.experiment import load_experiment
from sim.lab.trace import describe_scenario, format_trace, trace_cell, with_overrides


@click.command("trace")
@click.argument("config", type=click.Path(exists=True, dir_okay=False), default="experiments/trace_small.toml",
                required=False)
@click.option("--steps", type=int, default=None, help="Print only the first N steps (totals still cover all).")
@click.option("--engine", default=None, help="Engine of the config to trace (default: the first).")
@click.option("--load", type=float, default=None, help="Clients or request rate (default: the config's first).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Change one key of the config first, e.g. --set engines.paged.block_size=8 (repeatable).")
def command(config: str, steps: int | None, engine: str | None, load: float | None,
            overrides: tuple[str, ...]) -> None:
    """Print a step-by-step account of a small scenario: batch, blocks allocated, shared, freed, preempted."""
    exp = with_overrides(load_experiment(config), overrides)
    records, sched = trace_cell(exp, engine, load)
    click.echo(describe_scenario(exp, sched, engine or exp.engines[0].name))
    click.echo(format_trace(records, sched, steps))
