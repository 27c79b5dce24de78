"""`servesim audit CONFIG`: every published figure held against the physical and queueing limits of its setup."""
from __future__ import annotations

import click

from sim.lab.audit import audit_experiment, format_audit, queueing_checks
from sim.lab.claims import derive_experiment, parse_claims
from sim.lab.experiment import load_experiment


@click.command("audit")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
def command(config: str) -> None:
    """Hold every published figure of CONFIG against the roofline of its hardware, model and dtype, and against
    the queueing bound set by the same article's single-client figures."""
    exp = load_experiment(config)
    figures = parse_claims(exp).figures

    def exp_of(f):
        return derive_experiment(exp, settings=dict(f.settings)) if f.settings else exp

    click.echo(format_audit(exp, audit_experiment(exp, figures, exp_of), queueing_checks(exp, figures)))
