"""`servesim audit CONFIG`: every published figure held against the physical limit of its setup."""
from __future__ import annotations

import click

from sim.lab.audit import audit_experiment, format_audit
from sim.lab.claims import parse_claims
from sim.lab.experiment import load_experiment


@click.command("audit")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
def command(config: str) -> None:
    """Hold every published figure of CONFIG against the roofline of its hardware, model and dtype."""
    exp = load_experiment(config)
    click.echo(format_audit(exp, audit_experiment(exp, parse_claims(exp).figures)))
