"""`servesim profile --model M --out FILE.csv`: step latencies of the reference engine on this machine;
`servesim profile --url URL --out FILE.csv`: of any running OpenAI-compatible server, as a black box."""
from __future__ import annotations

from pathlib import Path

import click

from reference.config import PRESETS, get_preset
from sim.lab.profile import GRIDS, run_profile
from sim.lab.url_profile import URL_GRIDS, run_url_profile


@click.command("profile")
@click.option("--model", "model_name", default=None, help=f"Model preset ({', '.join(PRESETS)}; default tiny). "
              "With --url: the preset the server serves (its vocabulary sizes the probe prompts; recorded so "
              "experiments can check it).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="CSV file to write.")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--grid", default="default", show_default=True, type=click.Choice(sorted(set(GRIDS) | set(URL_GRIDS))),
              help="How many shapes to measure.")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1),
              help="Timed repetitions per shape (median kept).")
@click.option("--max-context", type=click.IntRange(min=2), default=None,
              help="Clip the grid at this many tokens per sequence: profile the regime your experiments serve "
                   "(their max_model_len / num_ctx) rather than the model's whole context.")
@click.option("--url", default=None, help="Profile the running server at this OpenAI base URL instead "
              "(e.g. http://127.0.0.1:8000/v1): prefill from TTFTs, decode steps from token gaps at controlled "
              "concurrency, mixed steps from prompts injected while others decode (sim.lab.url_profile).")
@click.option("--vocab-size", type=click.IntRange(min=2), default=None,
              help="With --url and no --model: probe token ids are drawn below this (default 32000).")
@click.option("--max-batch", type=click.IntRange(min=1), default=None,
              help="With --url: the most requests the server runs together (default: its slots, else 16).")
@click.option("--context-pad", type=click.IntRange(min=1), default=None,
              help="With --url: the server's attention computes over K/V in multiples of this many tokens (default 1).")
def command(model_name: str | None, out_path: Path, dtype: str, grid: str, repeats: int, max_context: int | None,
            url: str | None, vocab_size: int | None, max_batch: int | None, context_pad: int | None) -> None:
    """Measure step latency over a grid of batch shapes on this machine's JAX device, or of a server (--url)."""
    if url:
        if grid not in URL_GRIDS:
            raise click.UsageError(f"--grid {grid} is not a --url grid; choose {', '.join(URL_GRIDS)}")
        vocab = vocab_size or (get_preset(model_name).vocab_size if model_name else 32000)
        table = run_url_profile(url, out_path, grid=grid, vocab_size=vocab, preset=model_name, max_batch=max_batch,
                                context_pad=context_pad, echo=click.echo)
    else:
        if grid not in GRIDS:
            raise click.UsageError(f"--grid {grid} is a --url grid; choose {', '.join(GRIDS)}")
        table = run_profile(model_name or "tiny", out_path, dtype=dtype, grid=grid, repeats=repeats,
                            max_context=max_context)
    click.echo(f"{len(table)} shapes measured -> {out_path}")
