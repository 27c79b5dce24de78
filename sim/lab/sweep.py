"""Sweeps: an experiment's [sweep] grid expanded into points, and every cell of every point run in parallel.

    [sweep]
    grid = {"engines.vllm.max_num_seqs" = [64, 256], "hardware.preset" = ["h100-sxm", "a100-sxm-80gb"]}

A point sets each grid key in the file's tables as written (so defaults derived from a swept key,
such as vLLM's max_num_batched_tokens from enable_chunked_prefill, re-derive) and is validated like
any experiment file, memory plans included, before anything runs; an error names the point.

Results (`servesim run` with a sweep):

    DIR/experiment.toml     the file, [sweep] included
    DIR/sweep.json          the grid and its points: index, label, folder, values, cells
    DIR/summary.json        every cell of every point: its summary plus `point`, `point_dir` and one
                            `sweep.<key>` field per grid key
    DIR/points/<point>/     a results folder per point, as `servesim run` writes for one experiment
                            (experiment.toml, requests.csv, summary.json, itl_histograms.json, timeseries.csv)

Without a sweep, DIR is the one results folder, as before. Cells run on an executor (sim.lab.executors:
local processes by default, or Ray) and are committed in cell order (sim.lab.results_store), so the
files are the same bytes whatever the executor and the number of workers; an interrupted run keeps
every finished cell and resumes from there.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from reference.errors import ConfigError
from sim.lab.cell_tasks import cell_files
from sim.lab.executors import Executor, make_executor
from sim.lab.experiment import Experiment, parse_experiment
from sim.lab.metrics import load_results, write_json_atomic
from sim.lab.results_store import ResultsStore

POINTS_DIR = "points"
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")
_MAX_DIR_CHARS = 96


@dataclass(frozen=True)
class SweepPoint:
    """One point of a grid: the values of the grid keys, and the experiment they make."""

    index: int
    values: dict[str, Any] = field(hash=False)
    experiment: Experiment = field(hash=False, compare=False)

    @property
    def label(self) -> str:
        """'max_num_seqs=64 preset=h100-sxm' (the last part of each key, or the whole key where two share it)."""
        return " ".join(f"{k}={_value_text(v)}" for k, v in _short_keys(self.values).items())

    @property
    def dirname(self) -> str:
        """A folder name made of the values (readable, stable when the grid grows), a digest when too long."""
        text = _UNSAFE.sub("_", "_".join(f"{k}={_value_text(v)}" for k, v in _short_keys(self.values).items()))
        if len(text) > _MAX_DIR_CHARS:
            digest = hashlib.sha1(json.dumps(self.values, sort_keys=True, default=str).encode()).hexdigest()[:10]
            text = f"{text[:_MAX_DIR_CHARS - 11]}-{digest}"
        return text or "base"


def expand(exp: Experiment) -> list[SweepPoint]:
    """The experiment's points in grid order (first key slowest); [the experiment itself] without a sweep.

    Every point is validated and its engines' memory plans checked; a ConfigError names the point."""
    if exp.sweep is None:
        return [SweepPoint(0, {}, exp)]
    doc = exp.document
    doc.pop("sweep", None)
    keys = list(exp.sweep.grid)
    points = []
    for i, values in enumerate(itertools.product(*exp.sweep.grid.values())):
        chosen = dict(zip(keys, values))
        d = copy.deepcopy(doc)
        for key, value in chosen.items():
            _set(d, key, value)
        where = " ".join(f"{k}={_value_text(v)}" for k, v in chosen.items())
        try:
            point = parse_experiment(d, base_dir=exp.base_dir, source=exp.source, default_name=exp.name)
            for engine in point.engines:
                point.plan(engine)
        except ConfigError as e:
            raise ConfigError(e.field, f"in sweep point {where}: {e.message}", e.allowed) from None
        points.append(SweepPoint(i, chosen, point))
    return points


def point_dirs(out_dir: Path, points: list[SweepPoint], swept: bool) -> list[Path]:
    """Each point's results folder: out_dir itself without a sweep, out_dir/points/<dirname> with one
    (the index is prefixed where two points' names would collide)."""
    if not swept:
        return [out_dir]
    names = [p.dirname for p in points]
    if len(set(names)) != len(names):
        names = [f"{p.index:03d}-{n}" for p, n in zip(points, names)]
    return [out_dir / POINTS_DIR / n for n in names]


def run_sweep(exp: Experiment, out_dir: str | Path, *, executor: Executor | None = None, workers: int | None = None,
              ray_address: str | None = None, resume: bool = True, progress: bool = True,
              echo=print, implementation: str = "auto") -> pd.DataFrame:
    """Simulate every cell of every point not already in out_dir; returns the summary table of all cells.

    executor: where cells run (default: make_executor(workers, ray_address), i.e. this machine's cores).
    implementation: the scheduler path of every cell ("auto", "fast", "teaching"; sim.lab.simulate).
    Same files, byte for byte, whatever the executor and its number of workers."""
    out = Path(out_dir)
    points = expand(exp)
    swept = exp.sweep is not None
    dirs = point_dirs(out, points, swept)
    out.mkdir(parents=True, exist_ok=True)
    if swept:
        (out / "experiment.toml").write_text(exp.to_toml())
        write_json_atomic(out / "sweep.json", _sweep_index(exp, points, dirs, out))
    stores = [ResultsStore(d, p.experiment, resume=resume) for p, d in zip(points, dirs)]
    tasks, owners = [], []
    for i, (p, store) in enumerate(zip(points, stores)):
        for cell in store.pending():
            tasks.append((p.experiment, cell, implementation))
            owners.append(i)
    total = sum(s.num_cells for s in stores)
    done = total - len(tasks)
    if done:
        echo(f"resuming: {done} of {total} cells already done in {out}")
    if tasks:
        own = executor is None
        executor = executor or make_executor(workers, ray_address, tasks=len(tasks))
        try:
            bar = tqdm(total=len(tasks), desc=exp.name, unit="cell", disable=not progress)
            with bar:
                for t, files in executor.map_unordered(cell_files, tasks):
                    i = owners[t]
                    stores[i].add(files)
                    bar.update()
                    if progress:
                        where = f"[{points[i].label}] " if swept else ""
                        tqdm.write(f"  {where}{files.label}: {files.requests} requests, {files.sim_time_s:.1f} s "
                                   f"simulated in {files.wall_s:.1f} s")
        finally:
            if own:
                executor.close()
    if not swept:
        return pd.DataFrame(stores[0].summaries)
    rows = _sweep_summaries(points, stores, out)
    write_json_atomic(out / "summary.json", rows)
    return load_results(out)[1]


def _sweep_index(exp: Experiment, points: list[SweepPoint], dirs: list[Path], out: Path) -> dict:
    return {"name": exp.name, "grid": exp.sweep.grid if exp.sweep else {},
            "points": [{"index": p.index, "label": p.label, "dir": str(d.relative_to(out)), "values": p.values,
                        "cells": len(p.experiment.cells())} for p, d in zip(points, dirs)]}


def _sweep_summaries(points: list[SweepPoint], stores: list[ResultsStore], out: Path) -> list[dict]:
    rows = []
    for p, store in zip(points, stores):
        for s in store.summaries:
            rows.append({"point": p.label, "point_dir": str(store.dir.relative_to(out)),
                         **{f"sweep.{k}": v for k, v in p.values.items()}, **s})
    return rows


def _set(doc: dict, key: str, value: Any) -> None:
    """doc[a][b][c] = value for key 'a.b.c', making missing tables; ConfigError when a part is not a table."""
    parts = key.split(".")
    node = doc
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"sweep.grid[{json.dumps(key)}]",
                              f"{'.'.join(parts[:i + 1])} is {child!r}, not a table, so it has no key {parts[i + 1]!r}",
                              "keys of tables")
        node = child
    node[parts[-1]] = value


def _short_keys(values: dict[str, Any]) -> dict[str, Any]:
    """Each key by its last part, unless two keys share it (then the whole key)."""
    last = [k.split(".")[-1] for k in values]
    return {(k.split(".")[-1] if last.count(k.split(".")[-1]) == 1 else k): v for k, v in values.items()}


def _value_text(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (str, int)):
        return str(v)
    return json.dumps(v, sort_keys=True, separators=(",", ":"), default=str)
