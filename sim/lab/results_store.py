"""A results directory filled in the experiment's cell order, whatever order its cells finish in.

Workers finish cells out of order; the files must not depend on that. ResultsStore commits a
finished cell to DIR/requests.csv, summary.json, itl_histograms.json and timeseries.csv only when
every cell before it (in Experiment.cells() order) is committed; a cell that finishes early waits in
DIR/.cells/<cell>/ (its summary written last, so a half-written one is recognised and dropped). The
committed files are therefore byte for byte what sim.lab.simulate.run_experiment writes running the
cells one after another, and an interrupted run loses only the cells that were still running:
resume (the default) keeps committed and waiting cells alike, as run_experiment keeps finished ones.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path


from sim.lab.cell_tasks import CellFiles
from sim.lab.experiment import Cell, Experiment
from sim.lab.metrics import ResultsWriter, write_json_atomic
from sim.lab.simulate import keep_series_of_done_cells

STAGING = ".cells"
_UNSAFE = re.compile(r"[^A-Za-z0-9._=-]")


def cell_key(engine: str, concurrency: int | None, request_rate: float | None) -> tuple:
    """A cell's identity: (engine, concurrency or None, request rate or None)."""
    return (str(engine), None if concurrency is None else int(concurrency),
            None if request_rate is None else float(request_rate))


def _summary_key(s: dict) -> tuple:
    rate = s.get("request_rate")
    return cell_key(s.get("engine"), s.get("concurrency"), None if rate is None else float(rate))


class ResultsStore:
    """DIR's results for one experiment: which cells are done, and the commit of new ones in cell order."""

    def __init__(self, directory: str | Path, exp: Experiment, *, resume: bool = True):
        self.dir = Path(directory)
        self.exp = exp
        writer = ResultsWriter(self.dir, resume=resume)  # drops rows of cells cut off mid-write
        self.summary_path, self.hist_path, self.requests_path = writer.summary_path, writer.hist_path, \
            writer.requests_path
        self.series_path = self.dir / "timeseries.csv"
        self.staging = self.dir / STAGING
        (self.dir / "experiment.toml").write_text(exp.to_toml())
        self.summaries: list[dict] = writer.summaries
        self.histograms: dict[str, dict] = writer.histograms
        self.order = [cell_key(c.engine, c.concurrency, c.request_rate) for c in exp.cells()]
        self._cells = dict(zip(self.order, exp.cells()))
        self.committed = {_summary_key(s) for s in self.summaries}
        if not resume:
            self.series_path.unlink(missing_ok=True)
            shutil.rmtree(self.staging, ignore_errors=True)
        keep_series_of_done_cells(self.series_path, {c.label for k, c in self._cells.items() if k in self.committed})
        self.waiting: dict[tuple, CellFiles] = self._load_staged()
        self._cursor = 0
        self.commit_ready()

    @property
    def num_cells(self) -> int:
        """Cells in the experiment."""
        return len(self.order)

    @property
    def num_done(self) -> int:
        """Cells finished (committed or waiting for an earlier one)."""
        return sum(1 for k in self.order if k in self.committed or k in self.waiting)

    def pending(self) -> list[Cell]:
        """Cells still to simulate, in cell order."""
        return [self._cells[k] for k in self.order if k not in self.committed and k not in self.waiting]

    def add(self, files: CellFiles) -> None:
        """A finished cell: committed now if every earlier cell is, else kept in DIR/.cells until they are."""
        key = cell_key(files.engine, files.concurrency, files.request_rate)
        if key not in self._cells:
            raise ValueError(f"{files.label} is not a cell of {self.exp.name}")
        self.waiting[key] = files
        if self.order[self._cursor:self._cursor + 1] != [key]:
            self._stage(key, files)
        self.commit_ready()

    def commit_ready(self) -> None:
        """Commit waiting cells while the next cell in order is finished."""
        while self._cursor < len(self.order):
            key = self.order[self._cursor]
            if key in self.waiting:
                self._commit(key, self.waiting.pop(key))
            elif key not in self.committed:
                break
            self._cursor += 1
        if not self.waiting and self.staging.exists() and not any(self.staging.iterdir()):
            self.staging.rmdir()

    def _commit(self, key: tuple, f: CellFiles) -> None:
        """Append the cell to the four files in run_experiment's order (rows, series, histogram, summary last)."""
        _append_csv(self.requests_path, f.requests_csv)
        _append_csv(self.series_path, f.timeseries_csv)
        self.histograms[f.label] = f.histogram
        write_json_atomic(self.hist_path, self.histograms)
        self.summaries = [s for s in self.summaries if _summary_key(s) != key] + [f.summary]
        write_json_atomic(self.summary_path, self.summaries)
        self.committed.add(key)
        shutil.rmtree(self._stage_dir(key), ignore_errors=True)

    def _stage_dir(self, key: tuple) -> Path:
        label = self._cells[key].label
        digest = hashlib.sha1(repr(key).encode()).hexdigest()[:8]
        return self.staging / f"{_UNSAFE.sub('_', label)}-{digest}"

    def _stage(self, key: tuple, f: CellFiles) -> None:
        d = self._stage_dir(key)
        d.mkdir(parents=True, exist_ok=True)
        (d / "requests.csv").write_bytes(f.requests_csv)
        (d / "timeseries.csv").write_bytes(f.timeseries_csv)
        meta = {"engine": f.engine, "concurrency": f.concurrency, "request_rate": f.request_rate, "label": f.label,
                "requests": f.requests, "sim_time_s": f.sim_time_s, "wall_s": f.wall_s, "histogram": f.histogram,
                "summary": f.summary}
        write_json_atomic(d / "cell.json", meta)  # last: a folder without it is a cell cut off mid-write

    def _load_staged(self) -> dict[tuple, CellFiles]:
        """Cells finished in an earlier run but not committed; half-written ones and strangers are dropped."""
        found: dict[tuple, CellFiles] = {}
        if not self.staging.exists():
            return found
        for d in sorted(self.staging.iterdir()):
            meta_path = d / "cell.json"
            meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
            key = cell_key(meta["engine"], meta["concurrency"], _rate(meta["request_rate"])) if meta else None
            if meta is None or key not in self._cells or key in self.committed or d != self._stage_dir(key):
                shutil.rmtree(d, ignore_errors=True)
                continue
            found[key] = CellFiles(meta["engine"], meta["concurrency"], _rate(meta["request_rate"]), meta["label"],
                                   (d / "requests.csv").read_bytes(), (d / "timeseries.csv").read_bytes(),
                                   meta["summary"], meta["histogram"], meta["requests"], meta["sim_time_s"],
                                   meta["wall_s"])
        return found


def _rate(v) -> float | None:
    return None if v is None else float(v)  # write_json_atomic writes inf as "inf"


def _append_csv(path: Path, data: bytes) -> None:
    """Append one cell's CSV text (header line first) to path, leaving out the header when path has one; fsync."""
    if not data:
        return
    if path.exists() and path.stat().st_size > 0:
        data = data[data.index(b"\n") + 1:]
    with open(path, "ab") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
