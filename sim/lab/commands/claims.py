"""`servesim claims CONFIG --out DIR`: published figures against the simulation, with classes and verdicts."""
from __future__ import annotations

from pathlib import Path

import click

from sim.lab.claims import counts_text, format_sweeps, format_table, run_claims
from sim.lab.experiment import load_experiment


@click.command("claims")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Results directory (default: runs/<experiment name>).")
@click.option("--reuse", is_flag=True, help="Keep the cells already simulated in --out (resume) instead of starting over.")
def command(config: str, out_dir: str | None, reuse: bool) -> None:
    """Run a claims config (test figures at several seeds) and print published vs simulated with verdicts."""
    exp = load_experiment(config)
    out = Path(out_dir) if out_dir else Path("runs") / exp.name
    report = run_claims(exp, out, reuse=reuse, progress=True, echo=click.echo)
    click.echo(format_table(report.table))
    if not report.sweeps.empty:
        click.echo("")
        click.echo(format_sweeps(report.sweeps))
    click.echo("")
    click.echo(report.audit_text)
    click.echo(f"\n{counts_text(report.table)}  ->  {out / 'claims.csv'}")
