"""`servesim profile --model M --out FILE.csv`: step latencies of the reference engine on this machine."""
from __future__ import annotations

from pathlib import Path

import click

from reference.config import PRESETS
from sim.lab.profile import GRIDS, run_profile


@click.command("profile")
@click.option("--model", "model_name", default="tiny", show_default=True, help=f"Model preset ({', '.join(PRESETS)}).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="CSV file to write.")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--grid", default="default", show_default=True, type=click.Choice(list(GRIDS)),
              help="How many shapes to measure.")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1),
              help="Timed repetitions per shape (median kept).")
@click.option("--max-context", type=click.IntRange(min=2), default=None,
              help="Clip the grid at this many tokens per sequence: profile the regime your experiments serve "
                   "(their max_model_len / num_ctx) rather than the model's whole context.")
def command(model_name: str, out_path: Path, dtype: str, grid: str, repeats: int, max_context: int | None) -> None:
    """Measure step latency over a grid of batch shapes on this machine's JAX device."""
    table = run_profile(model_name, out_path, dtype=dtype, grid=grid, repeats=repeats, max_context=max_context)
    click.echo(f"{len(table)} shapes measured -> {out_path}")
