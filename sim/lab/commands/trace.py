"""`servesim trace [CONFIG]`: a step-by-step account of a small scenario, for teaching; --html writes the page."""
from __future__ import annotations

import click

from sim.lab.experiment import load_experiment
from sim.lab.trace import trace_cell, with_overrides
from sim.lab.trace_html import write_page
from sim.lab.trace_text import format_trace


@click.command("trace")
@click.argument("config", type=click.Path(exists=True, dir_okay=False), default="experiments/trace_small.toml",
                required=False)
@click.option("--steps", type=int, default=None, help="Print only the first N records (totals still cover all).")
@click.option("--engine", default=None, help="Engine of the config to trace (default: the first).")
@click.option("--load", type=float, default=None, help="Clients or request rate (default: the config's first).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Change one key of the config first, e.g. --set engines.paged.block_size=8 (repeatable).")
@click.option("--html", "html", type=click.Path(dir_okay=False), default=None,
              help="Write a self-contained page that steps through the trace (open it in a browser).")
@click.option("--compare", default=None,
              help="With --html: the engine shown beside it (default: the first engine with another KV layout; "
                   "'none' for none).")
def command(config: str, steps: int | None, engine: str | None, load: float | None,
            overrides: tuple[str, ...], html: str | None, compare: str | None) -> None:
    """Print what the real scheduler does, step by step and in causal order: queue, batch, blocks, preemptions."""
    exp = with_overrides(load_experiment(config), overrides)
    trace = trace_cell(exp, engine, load)
    if html:
        path = write_page(exp, html, trace, compare=compare, load=load)
        click.echo(f"wrote {path} (open it in a browser; arrow keys step, Home/End jump)")
        return
    click.echo(format_trace(trace, steps))
