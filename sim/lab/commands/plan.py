"""`servesim plan PLAN.toml`: which engine, how many GPUs, at what cost, for a load and its SLOs."""
from __future__ import annotations

import json
from pathlib import Path

import click

from reference.errors import ConfigError
from sim.lab.plan_config import load_plan, plan_json_schema
from sim.lab.plan_report import markdown_table, answer_paragraph, capacity_rows, write_plan_report
from sim.lab.planner import run_plan


@click.command("plan")
@click.argument("plan_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=False)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Results directory (default: runs/plans/<plan name>).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a plan key (dotted key, TOML value), e.g. --set load.target=100 "
                   "--set slo.p95_e2el_ms=3000 --set 'hardware.presets=[\"h100-sxm\"]'. Repeatable.")
@click.option("--price", "prices", multiple=True, metavar="PRESET=USD",
              help="USD per GPU-hour of a device, over [prices] and the defaults. Repeatable.")
@click.option("--workers", type=int, default=None,
              help="Local processes that simulate probes at once (default: this machine's CPUs).")
@click.option("--ray", "ray_address", default=None, metavar="ADDRESS",
              help="Simulate the probes on the Ray cluster at ADDRESS instead (needs the ray extra).")
@click.option("--fresh", is_flag=True, help="Simulate every probe again instead of reusing DIR/probe_cache.jsonl.")
@click.option("--quiet", is_flag=True, help="No progress lines.")
@click.option("--schema", is_flag=True, help="Print the JSON Schema of plan files and exit.")
def command(plan_file: Path | None, out_dir: Path | None, overrides: tuple[str, ...], prices: tuple[str, ...],
            workers: int | None, ray_address: str | None, fresh: bool, quiet: bool, schema: bool) -> None:
    """Find, for each candidate engine x device, the highest load meeting the SLOs and the cheapest deployment
    of the target load: DIR/plan.md (answer and table), capacity.csv, curve.csv, probes.csv, cost_vs_load.png."""
    if schema:
        click.echo(json.dumps(plan_json_schema(), indent=2))
        return
    if plan_file is None:
        raise ConfigError("PLAN_FILE", "missing", "a plan TOML file (see experiments/plans/), or --schema")
    sets = list(overrides)
    for item in prices:
        preset, sep, usd = item.partition("=")
        if not sep:
            raise ConfigError("--price", f"{item!r} is not PRESET=USD", "e.g. --price h100-sxm=2.50")
        sets.append(f"prices.{preset.strip()}={usd.strip()}")
    plan = load_plan(plan_file, sets)
    out = out_dir or Path("runs") / "plans" / plan.name
    result = run_plan(plan, out, workers=workers, ray_address=ray_address, resume=not fresh,
                      progress=not quiet, echo=click.echo)
    paths = write_plan_report(result, out)
    click.echo("")
    click.echo(answer_paragraph(result))
    click.echo("")
    click.echo(markdown_table(capacity_rows(result), plan))
    for path in paths:
        click.echo(f"wrote {path}")
