"""One cell as a unit of work a worker runs anywhere: an (Experiment, Cell) in, the cell's files out as bytes.

A cell is a pure function of its experiment and cell (same seed + config -> same requests, same
step times), so where it runs does not change what it gives. Workers (a local process pool, Ray
tasks on other machines) write nothing to the results directory: they return the cell's files as
bytes (`CellFiles`), and the driver commits them in the experiment's cell order (sim.lab.results_store),
so the files are byte for byte those `servesim run` writes one cell after another.

The bytes come from `servesim run`'s own code (sim.lab.simulate.run_experiment, unchanged) run on the
experiment cut down to this one cell (its engine, its load) in a scratch folder: nothing in a cell's
simulation depends on the other cells (the request sequence depends on the seed alone), so the cut
experiment writes exactly this cell's rows, summary, histogram and time series.
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sim.lab.experiment import Cell, Experiment, parse_experiment
from sim.lab.simulate import run_experiment


@dataclass(frozen=True)
class CellFiles:
    """One finished cell, as the driver commits it.

    requests_csv / timeseries_csv: the CSV text of a file holding just this cell (header line first;
    empty when the cell wrote none). summary: its summary.json record; histogram: its
    itl_histograms.json entry. requests: how many requests it recorded; sim_time_s: simulated seconds;
    wall_s: seconds the simulation took on the worker.
    """

    engine: str
    concurrency: int | None
    request_rate: float | None
    label: str
    requests_csv: bytes
    timeseries_csv: bytes
    summary: dict
    histogram: dict
    requests: int
    sim_time_s: float
    wall_s: float


def one_cell_experiment(exp: Experiment, cell: Cell) -> Experiment:
    """exp with only cell's engine and cell's load (its sweep, if any, dropped); validated like a file."""
    doc = exp.document
    doc.pop("sweep", None)
    doc["engines"] = {cell.engine: doc["engines"][cell.engine]}
    key = exp.workload.LOAD_KEY
    if key is not None:
        doc["workload"] = {**doc["workload"], key: [cell.load]}
    return parse_experiment(doc, base_dir=exp.base_dir, source=exp.source, default_name=exp.name)


def cell_files(exp: Experiment, cell: Cell, implementation: str = "auto") -> CellFiles:
    """Simulate one cell and return its files (see CellFiles); the same bytes `servesim run` writes.

    implementation: "auto", "fast" or "teaching" scheduler path (sim.lab.simulate); the bytes are the same."""
    one = one_cell_experiment(exp, cell)
    (only,) = one.cells()
    assert only.label == cell.label, (only.label, cell.label)
    with tempfile.TemporaryDirectory(prefix="servesim-cell-") as tmp:
        scratch = Path(tmp)
        wall = time.perf_counter()
        run_experiment(one, scratch, resume=False, progress=False, echo=lambda _: None,
                       implementation=implementation)
        wall = time.perf_counter() - wall
        (summary,) = json.loads((scratch / "summary.json").read_text())
        histograms = json.loads((scratch / "itl_histograms.json").read_text())
        return CellFiles(cell.engine, cell.concurrency, cell.request_rate, cell.label,
                         _read(scratch / "requests.csv"), _read(scratch / "timeseries.csv"), summary,
                         histograms[cell.label], int(summary["num_requests"]), float(summary["sim_time_s"]), wall)


def _read(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""
