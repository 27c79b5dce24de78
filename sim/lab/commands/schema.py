"""`servesim schema`: the JSON Schema of experiment files, for editors that complete and check TOML."""
from __future__ import annotations

import json

import click

from sim.lab.experiment import json_schema


@click.command("schema")
def command() -> None:
    """Print the JSON Schema of an experiment file (e.g. for Taplo / Even Better TOML)."""
    click.echo(json.dumps(json_schema(), indent=2))
