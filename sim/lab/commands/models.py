"""`servesim models`: the model presets and what follows from their shapes."""
from __future__ import annotations

import json

import click

from reference.config import PRESETS


@click.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def command(as_json: bool) -> None:
    """List model presets: shape, parameters and KV bytes per token (16-bit)."""
    rows = [dict(name=c.name, layers=c.num_layers, hidden=c.hidden_size, heads=c.num_heads, kv_heads=c.num_kv_heads,
                 head_dim=c.head_dim, vocab=c.vocab_size, params=c.num_params,
                 weight_gb_16bit=c.weight_bytes(16) / 1e9, kv_bytes_per_token=c.kv_bytes_per_token(2),
                 source=c.source) for c in PRESETS.values()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    header = f"{'name':<16} {'layers':>6} {'hidden':>6} {'heads':>5} {'kv':>3} {'params':>8} {'GB@16b':>7} {'KV B/token':>10}"
    click.echo(header)
    click.echo("-" * len(header))
    for r in rows:
        p = r["params"]
        params = f"{p / 1e9:.2f}B" if p >= 1e9 else f"{p / 1e6:.1f}M" if p >= 1e6 else f"{p / 1e3:.0f}K"
        click.echo(f"{r['name']:<16} {r['layers']:>6} {r['hidden']:>6} {r['heads']:>5} {r['kv_heads']:>3} "
                   f"{params:>8} {r['weight_gb_16bit']:>7.2f} {r['kv_bytes_per_token']:>10}")
