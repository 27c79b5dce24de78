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
        self._files = [tempfile.TemporaryFile(mode="w+", prefix="servesim-series-", newline="")
                       for _ in replicas]

    def drain(self) -> None:
        """Move every sample taken so far out of the replicas' TimeSeries lists, onto the files."""
        for replica, f in zip(self.replicas, self._files):
            rows = replica.series.rows(replica.name)
            if not rows:
                continue
            _clear(replica.series)
            df = pd.DataFrame(rows)
            usage = float((df.kv_reserved_tokens / df.kv_capacity_tokens).max())
            if usage == usage and not usage <= self.peak_kv_usage:  # noqa: PLR0124 (NaN: skip it, as pandas does)
                self.peak_kv_usage = usage
            df.insert(0, "cell", self.cell_label)
            df.to_csv(f, header=False, index=False)
            self.rows += len(df)

    def write(self, path: Path) -> None:
        """Append the cell's samples to the CSV at path (its header first when new), replica by replica."""
        self.drain()
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
