"""A cell's replica time series, drained while the cell runs, written to timeseries.csv when it ends.

A replica samples its state every sample_interval_s of simulated time (sim.core.replica.TimeSeries),
so a day of simulated traffic holds ~10^6 samples, ~40 bytes of Python objects a request in a
closed-loop run. SeriesCsv moves the samples out of the replicas' lists every so often as CSV text
(pandas' own to_csv of those rows) into one temporary file per replica, and at the cell's end
appends them to timeseries.csv replica by replica: the bytes run_experiment wrote from one
DataFrame of all samples (rows replica by replica), with memory flat in the run's length.
"""
from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from sim.core.replica import Replica, TimeSeries

SERIES_COLUMNS = ("replica", "time_s", "running", "waiting", "kv_reserved_tokens", "kv_stored_tokens",
                  "kv_capacity_tokens", "preemptions")


class SeriesCsv:
    """Collects the time series of a cell's replicas as CSV text on temporary files (one per replica)."""

    def __init__(self, replicas: list[Replica], cell_label: str):
        self.replicas = replicas
        self.cell_label = cell_label
        self.rows = 0
        self.peak_kv_usage = math.nan  # max over samples of reserved / capacity tokens (NaN-skipping, as pandas)
        self.float_time = False  # some sample's time_s is a float (SimPy's clock starts at the int 0)
        self._int_time_rows: list[list[dict]] = [[] for _ in replicas]  # samples held until a float time_s
        self._files = [tempfile.TemporaryFile(mode="w+", prefix="servesim-series-", newline="")
                       for _ in replicas]

    def drain(self) -> None:
        """Move every sample taken so far out of the replicas' TimeSeries lists, onto the files.

        A replica's samples at SimPy's initial time carry the int 0 as time_s; alone in a chunk they would
        print as "0" where the whole cell's float column prints "0.0", so they wait for its first float time.
        """
        for i, replica in enumerate(self.replicas):
            rows = replica.series.rows(replica.name)
            if not rows:
                continue
            _clear(replica.series)
            rows = self._int_time_rows[i] + rows
            df = pd.DataFrame(rows)
            if df["time_s"].dtype.kind != "f":
                self._int_time_rows[i] = rows
                continue
            self._int_time_rows[i] = []
            self.float_time = True
            self._write_chunk(i, df)

    def _write_chunk(self, i: int, df: pd.DataFrame) -> None:
        usage = float((df.kv_reserved_tokens / df.kv_capacity_tokens).max())
        if usage == usage and not usage <= self.peak_kv_usage:  # noqa: PLR0124 (NaN: skip it, as pandas does)
            self.peak_kv_usage = usage
        df.insert(0, "cell", self.cell_label)
        df.to_csv(self._files[i], header=False, index=False)
        self.rows += len(df)

    def write(self, path: Path) -> None:
        """Append the cell's samples to the CSV at path (its header first when new), replica by replica."""
        self.drain()
        for i, rows in enumerate(self._int_time_rows):
            if rows:  # a replica sampled at time 0 only: float like the rest of the column, if any of it is
                df = pd.DataFrame(rows)
                if self.float_time:
                    df["time_s"] = df["time_s"].astype(float)
                self._write_chunk(i, df)
        self._int_time_rows = [[] for _ in self.replicas]
        if self.rows:
            new = not path.exists() or path.stat().st_size == 0
            with open(path, "a", newline="") as out:
                if new:
                    out.write(",".join(("cell", *SERIES_COLUMNS)) + "\n")
                for f in self._files:
                    f.seek(0)
                    shutil.copyfileobj(f, out)
        self.close()

    def close(self) -> None:
        """Drop the temporary files."""
        for f in self._files:
            f.close()
        self._files = []


def _clear(series: TimeSeries) -> None:
    """Empty a TimeSeries' lists in place (the replica keeps appending to the same lists)."""
    for values in (series.time_s, series.running, series.waiting, series.kv_reserved_tokens, series.kv_stored_tokens,
                   series.kv_capacity_tokens, series.preemptions):
        values.clear()
