"""`servesim hardware`: the hardware presets with their datasheet figures and sources."""
from __future__ import annotations

import json

import click

from sim.core.hardware import HARDWARE


@click.command("hardware")
@click.option("--json", "as_json", is_flag=True, help="Print the presets as JSON.")
def command(as_json: bool) -> None:
    """List hardware presets with their datasheet figures (dense tensor-core peaks)."""
    rows = []
    for h in HARDWARE.values():
        rows.append({
            "name": h.name, "memory_gb": h.memory_gb, "bandwidth_tb_s": h.memory_bw / 1e12,
            "bf16_tflops": h.bf16_flops / 1e12, "fp8_tflops": h.fp8_flops / 1e12, "fp4_tflops": h.fp4_flops / 1e12,
            "int8_tops": h.int8_ops / 1e12, "interconnect": h.interconnect,
            "interconnect_gb_s": h.interconnect_bw / 1e9, "source": h.source,
        })
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    header = (f"{'name':<12} {'mem GB':>6} {'BW TB/s':>7} {'bf16 TF':>8} {'fp8 TF':>7} {'fp4 TF':>7} "
              f"{'link GB/s':>9}  link")
    click.echo(header)
    click.echo("-" * len(header))
    for r in rows:
        fp8 = f"{r['fp8_tflops']:7.0f}" if r["fp8_tflops"] else f"{'-':>7}"
        fp4 = f"{r['fp4_tflops']:7.0f}" if r["fp4_tflops"] else f"{'-':>7}"
        link = f"{r['interconnect_gb_s']:9.0f}" if r["interconnect_gb_s"] else f"{'-':>9}"
        click.echo(f"{r['name']:<12} {r['memory_gb']:6.0f} {r['bandwidth_tb_s']:7.3f} {r['bf16_tflops']:8.1f} "
                   f"{fp8} {fp4} {link}  {r['interconnect'] or 'none'}")
    click.echo("\nSources (dense figures; interconnect is the bidirectional datasheet total):")
    for r in rows:
        click.echo(f"  {r['name']}: {r['source']}")
