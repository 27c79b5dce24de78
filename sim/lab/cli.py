"""`servesim`: the command line. Each command is a module of sim.lab.commands, imported when it runs.

Bad input anywhere (reference.errors.ConfigError) ends the command with one line naming the
field and what is allowed, and exit status 2, never a traceback.
"""
from __future__ import annotations

import importlib

import click

from reference.errors import ConfigError

COMMANDS = ("run", "bench", "profile", "validate", "serve", "claims", "audit", "trace", "steptime", "hardware",
            "measured", "models", "schema", "plan")


class _Commands(click.Group):
    """Loads a command's module only when that command runs: `servesim run` does not import JAX."""

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        return importlib.import_module(f"sim.lab.commands.{name}").command

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ConfigError as e:
            raise click.UsageError(str(e), ctx) from None
        except FileNotFoundError as e:
            raise click.UsageError(f"file not found: {e.filename or e}", ctx) from None


@click.group(cls=_Commands)
def main() -> None:
    """servesim: an LLM-serving lab. A JAX reference engine and a SimPy simulator that share schedulers."""
