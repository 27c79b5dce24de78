"""Benchmark metrics over per-request records, shared by the reference engine and the simulator.

Definitions follow vLLM's benchmark_serving, so numbers compare with published ones:

- TTFT = first_token_time - arrival_time; E2EL = finish_time - arrival_time.
- TPOT = (E2EL - TTFT) / (output_tokens - 1), only for requests with output_tokens > 1.
- ITL = gaps between consecutive tokens of a request, pooled over all requests.
- All latency statistics (mean, median, p90, p95, p99; ms), token totals and throughputs
  count **completed** requests only (vLLM counts successful ones); refused, timed-out and
  aborted requests are `failed`, reported with their breakdown.
- duration = first arrival to last finish of the cell, over all requests whatever their
  outcome (s). vLLM times from just before the first request is sent to after the last
  response returns, which for our records is the same span. request_throughput =
  completed / duration, output_throughput = output tokens / duration,
  total_token_throughput = (prompt + output tokens) / duration.
- request_goodput = completed requests meeting every given SLO / duration (req/s); a
  1-token output has TPOT 0 for this test (as in vLLM).
- mean_preemptions and prefix_cache_hit_rate (cached prompt tokens / prompt tokens) are
  over admitted requests (those ever scheduled).
- mean_normalized_latency_s is the PagedAttention paper's metric: mean over completed
  requests of E2EL / output tokens (s per token).

ITL percentiles without every token time: the per-request record keeps the ITL count, sum
and max; a cell-level `ItlHistogram` (fixed log-spaced bins, 200 per decade from 1 us to
10^4 s) accumulates every gap. The pooled mean is exact (sum / count); percentiles from
the histogram are within one bin (+-1.2 % relative, 1 us absolute below 1 us) of numpy's
linear-interpolation percentile. When the token times are at hand (the accumulator keeps
up to `exact_itl_limit` gaps; records written with keep_token_times carry them)
percentiles are exact, and the summary says which with `itl_exact`.

Results layout: DIR/requests.csv (one row per request, appended as requests finish),
DIR/summary.json (one record per cell, rewritten atomically after each cell) and
DIR/itl_histograms.json (the ITL histogram of each cell, so summaries can be recomputed).
"""
from __future__ import annotations

import csv
import json
import math
import operator
import os
import tempfile
from array import array
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
from pydantic import Field, model_validator

from reference.request import Request
from sim.lab.float_spool import FloatSpool
from sim.lab.schema import ConfigModel, Number, finite

METRICS = ("ttft", "tpot", "itl", "e2el")
STATS = (("mean", None), ("median", 50.0), ("p90", 90.0), ("p95", 95.0), ("p99", 99.0))
OUTCOMES = ("completed", "refused", "timed_out", "aborted", "unfinished")
FAILED = ("refused", "timed_out", "aborted")
_OUTCOME_CODE = {name: i for i, name in enumerate(OUTCOMES)}

REQUEST_COLUMNS = (
    "engine", "concurrency", "request_rate", "request_id", "client_id", "outcome", "reason",
    "arrival_s", "first_scheduled_s", "first_token_s", "finish_s",
    "prompt_tokens", "output_tokens", "max_tokens", "cached_prompt_tokens", "preemptions",
    "queue_ms", "ttft_ms", "tpot_ms", "e2el_ms",
    "itl_count", "itl_sum_ms", "itl_mean_ms", "itl_max_ms",
    "token_times_s",
)
_INT_COLUMNS = ("concurrency", "client_id", "prompt_tokens", "output_tokens", "max_tokens",
                "cached_prompt_tokens", "preemptions", "itl_count")
_STR_COLUMNS = ("engine", "request_id", "outcome", "reason", "token_times_s")

NAN = float("nan")
_add_reduce, _max_reduce = np.add.reduce, np.maximum.reduce


class SLO(ConfigModel):
    """Service-level objectives for goodput (ms); None = not constrained."""

    ttft_ms: Annotated[Number, Field(gt=0)] | None = None
    tpot_ms: Annotated[Number, Field(gt=0)] | None = None
    e2el_ms: Annotated[Number, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _finite(self):
        for name in ("ttft_ms", "tpot_ms", "e2el_ms"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, finite(float(v), name))
        return self

    @property
    def is_empty(self) -> bool:
        """True when no objective is set."""
        return self.ttft_ms is None and self.tpot_ms is None and self.e2el_ms is None

    def to_dict(self) -> dict:
        """The set objectives."""
        return self.model_dump(exclude_none=True)


# ---------------------------------------------------------------------------------------
# Per-request records

def _ms(a: float | None, b: float | None) -> float:
    return NAN if a is None or b is None else (b - a) * 1e3


def request_record(req: Request, *, engine: str, concurrency: int | None = None, request_rate: float | None = None,
                   client_id: int | None = None, keep_token_times: bool = False) -> dict:
    """One flat row of requests.csv for req (times in s, latencies in ms; NaN where undefined).

    ttft/tpot/e2el/itl are filled whenever the timestamps exist (also for timed-out
    requests with partial output); summaries use completed requests only.
    token_times_s is the space-separated token times when keep_token_times, else "".
    """
    return _record_and_gaps(req, engine=engine, concurrency=concurrency, request_rate=request_rate,
                            client_id=client_id, keep_token_times=keep_token_times)[0]


def _record_and_gaps(req: Request, *, engine: str, concurrency: int | None, request_rate: float | None,
                     client_id: int | None, keep_token_times: bool) -> tuple[dict, np.ndarray | None]:
    """request_record's row, and the request's inter-token gaps (ms; None with fewer than 2 tokens)."""
    values, gaps = _record_values(req, engine, concurrency, request_rate, client_id, keep_token_times)
    return dict(zip(REQUEST_COLUMNS, values)), gaps


def _record_values(req: Request, engine: str, concurrency: int | None, request_rate: float | None,
                   client_id: int | None, keep_token_times: bool, itl: bool = True,
                   missing: float | None = NAN) -> tuple[list, np.ndarray | None]:
    """request_record's values in REQUEST_COLUMNS order, and the inter-token gaps (ms; None with < 2 tokens).

    itl=False leaves itl_sum_ms, itl_mean_ms and itl_max_ms of a request with >= 2 tokens as None (and
    returns no gaps) for the caller to fill in (CellAccumulator computes them for many requests at once).
    missing: the value of an undefined figure (NaN; None for a row bound for requests.csv, which the csv
    module writes as an empty field with no pass over the row).

    Runs once per simulated request (a million times in a large run), so it reads the fields once,
    inlines _ms and builds a list, not a dict; the arithmetic is the same, operation for operation.
    """
    out = len(req.output_token_ids)
    arrival = req.arrival_time
    first_token, finish, scheduled = req.first_token_time, req.finish_time, req.first_scheduled_time
    if arrival is None:
        ttft = e2el = queue = tpot = missing
    else:
        ttft = missing if first_token is None else (first_token - arrival) * 1e3
        e2el = missing if finish is None else (finish - arrival) * 1e3
        queue = missing if scheduled is None else (scheduled - arrival) * 1e3
        tpot = (e2el - ttft) / (out - 1) if out > 1 and finish is not None and first_token is not None else missing
    tt = req.token_times
    if len(tt) > 1 and not itl:
        gaps = None
        itl_count, itl_sum, itl_max, itl_mean = len(tt) - 1, None, None, None
    elif len(tt) > 1:
        t = np.frombuffer(tt) if tt.__class__ is array and tt.typecode == "d" else np.array(tt, dtype=float)
        gaps = t[1:] - t[:-1]  # np.diff(t) * 1e3
        gaps *= 1e3
        # The ufuncs' reduce is what ndarray.sum and .max call, without their Python-level wrappers.
        itl_count, itl_sum, itl_max = len(gaps), float(_add_reduce(gaps)), float(_max_reduce(gaps))
        itl_mean = itl_sum / itl_count
    else:
        gaps = None
        itl_count, itl_sum, itl_max, itl_mean = 0, 0.0, missing, missing
    outcome = req.outcome
    return [
        engine, concurrency, missing if request_rate is None else float(request_rate), req.request_id, client_id,
        outcome.value if outcome is not None else "unfinished", req.reason,
        arrival, missing if scheduled is None else scheduled, missing if first_token is None else first_token,
        missing if finish is None else finish,
        req.num_prompt_tokens, out, req.sampling.max_tokens, req.num_cached_prompt_tokens, req.num_preemptions,
        queue, ttft, tpot, e2el,
        itl_count, itl_sum, itl_mean, itl_max,
        " ".join(repr(float(t)) for t in tt) if keep_token_times else "",
    ], gaps


def _token_gaps_ms(token_times_s: str) -> np.ndarray:
    if not isinstance(token_times_s, str) or not token_times_s.strip():
        return np.empty(0)
    t = np.array(token_times_s.split(), dtype=float)
    return np.diff(t) * 1e3


# ---------------------------------------------------------------------------------------
# ITL histogram

class ItlHistogram:
    """Counts of inter-token gaps (ms) in fixed log-spaced bins, plus exact count, sum, min and max.

    Bin 0 holds [0, LO_MS); bins 1..N hold [LO_MS * 10^((k-1)/B), LO_MS * 10^(k/B)) with
    B = BINS_PER_DECADE; the last bin holds gaps >= HI_MS. Mergeable; 16 KiB whatever the count.
    """

    LO_MS = 1e-3
    BINS_PER_DECADE = 200
    DECADES = 10
    NBINS = BINS_PER_DECADE * DECADES + 2
    HI_MS = LO_MS * 10.0 ** DECADES

    def __init__(self):
        self.counts = np.zeros(self.NBINS, dtype=np.int64)
        self.count = 0
        self.sum_ms = 0.0
        self.min_ms = math.inf
        self.max_ms = -math.inf

    def _bin(self, x: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore"):
            k = np.floor(np.log10(np.maximum(x, 1e-300) / self.LO_MS) * self.BINS_PER_DECADE).astype(np.int64) + 1
        return np.clip(np.where(x < self.LO_MS, 0, k), 0, self.NBINS - 1)

    def _edges(self, k: int) -> tuple[float, float]:
        if k == 0:
            return 0.0, self.LO_MS
        if k == self.NBINS - 1:
            return self.HI_MS, max(self.max_ms, self.HI_MS)
        b = self.BINS_PER_DECADE
        return self.LO_MS * 10.0 ** ((k - 1) / b), self.LO_MS * 10.0 ** (k / b)

    def add(self, gaps_ms: Iterable[float] | np.ndarray) -> None:
        """Count some gaps (ms, >= 0)."""
        x = np.asarray(gaps_ms, dtype=float).ravel()
        if x.size == 0:
            return
        self.counts += np.bincount(self._bin(x), minlength=self.NBINS)
        self.count += int(x.size)
        self.sum_ms += float(x.sum())
        self.min_ms = min(self.min_ms, float(x.min()))
        self.max_ms = max(self.max_ms, float(x.max()))

    def merge(self, other: ItlHistogram) -> None:
        """Add other's counts to this one."""
        self.counts += other.counts
        self.count += other.count
        self.sum_ms += other.sum_ms
        self.min_ms = min(self.min_ms, other.min_ms)
        self.max_ms = max(self.max_ms, other.max_ms)

    @property
    def mean_ms(self) -> float:
        """Exact mean gap (ms)."""
        return self.sum_ms / self.count if self.count else NAN

    def _order_stat(self, r: int, cum: np.ndarray) -> float:
        """Estimate of the r-th smallest gap (0-based)."""
        if r <= 0:
            return self.min_ms
        if r >= self.count - 1:
            return self.max_ms
        k = int(np.searchsorted(cum, r, side="right"))
        c0 = int(cum[k - 1]) if k > 0 else 0
        c = int(self.counts[k])
        lo, hi = self._edges(k)
        f = (r - c0 + 0.5) / c
        v = lo + f * (hi - lo) if lo <= 0 else lo * (hi / lo) ** f
        return min(max(v, self.min_ms), self.max_ms)

    def percentile(self, q: float) -> float:
        """Approximate q-th percentile (ms), numpy 'linear' definition, within one bin width."""
        if self.count == 0:
            return NAN
        cum = np.cumsum(self.counts)
        r = q / 100.0 * (self.count - 1)
        lo_r = math.floor(r)
        a = self._order_stat(lo_r, cum)
        if r == lo_r:
            return a
        b = self._order_stat(lo_r + 1, cum)
        return a + (r - lo_r) * (b - a)

    def to_dict(self) -> dict:
        """Sparse, JSON-able form."""
        nz = np.flatnonzero(self.counts)
        return {"lo_ms": self.LO_MS, "bins_per_decade": self.BINS_PER_DECADE, "decades": self.DECADES,
                "count": self.count, "sum_ms": self.sum_ms,
                "min_ms": self.min_ms if self.count else None, "max_ms": self.max_ms if self.count else None,
                "bins": {str(int(k)): int(self.counts[k]) for k in nz}}

    @classmethod
    def from_dict(cls, d: dict) -> ItlHistogram:
        """Inverse of to_dict."""
        if (d.get("lo_ms"), d.get("bins_per_decade"), d.get("decades")) != (cls.LO_MS, cls.BINS_PER_DECADE,
                                                                           cls.DECADES):
            raise ValueError("ITL histogram written with a different binning")
        h = cls()
        for k, n in d["bins"].items():
            h.counts[int(k)] = n
        h.count, h.sum_ms = int(d["count"]), float(d["sum_ms"])
        if h.count:
            h.min_ms, h.max_ms = float(d["min_ms"]), float(d["max_ms"])
        return h


# ---------------------------------------------------------------------------------------
# Summaries

_SUMMARY_INPUTS = ("arrival_s", "first_scheduled_s", "finish_s", "prompt_tokens", "output_tokens",
                   "cached_prompt_tokens", "preemptions", "queue_ms", "ttft_ms", "tpot_ms", "e2el_ms",
                   "itl_count", "itl_sum_ms", "itl_max_ms")
# What CellAccumulator stores per request (69 bytes): these floats, these ints (C int), and the outcome code; the
# latencies (queue, TTFT, TPOT, E2EL) are recomputed at summary time with the same float operations.
_STORED_FLOATS = ("arrival_s", "first_scheduled_s", "first_token_s", "finish_s", "itl_sum_ms", "itl_max_ms")
_STORED_INTS = ("prompt_tokens", "output_tokens", "cached_prompt_tokens", "preemptions", "itl_count")
_STORED_INDEX = (7, 8, 9, 10, 21, 23, 11, 12, 14, 15, 20)  # their places in REQUEST_COLUMNS (CellAccumulator._take)
if tuple(REQUEST_COLUMNS[i] for i in _STORED_INDEX) != _STORED_FLOATS + _STORED_INTS:
    raise AssertionError("_STORED_INDEX does not match _STORED_FLOATS + _STORED_INTS in REQUEST_COLUMNS")


def _latency_columns(stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The _SUMMARY_INPUTS columns from the stored ones: _record_values' latency arithmetic, elementwise.

    IEEE operations are the same in numpy as in Python ((b - a) * 1e3, then / (out - 1)), so each
    value is the very float the row holds; NaN in, NaN out, as the row's None -> NaN rules give.
    """
    arrival, out = stored["arrival_s"], stored["output_tokens"]
    with np.errstate(invalid="ignore", divide="ignore"):
        ttft = (stored["first_token_s"] - arrival) * 1e3
        e2el = (stored["finish_s"] - arrival) * 1e3
        tpot = np.where(out > 1, (e2el - ttft) / (out - 1), NAN)
        queue = (stored["first_scheduled_s"] - arrival) * 1e3
    cols = {k: v for k, v in stored.items() if k in _SUMMARY_INPUTS}
    cols.update(queue_ms=queue, ttft_ms=ttft, tpot_ms=tpot, e2el_ms=e2el)
    return cols


def _non_nan(x: np.ndarray) -> np.ndarray:
    return x[~np.isnan(x)]


class _SummaryReduction:
    """What a cell's summary needs, reduced chunk by chunk of its requests (one chunk, or many).

    Counts, integer sums, minima and maxima are exact in any grouping; each float series that is
    summed or ranked goes to a FloatSpool, which gives numpy's very sum and percentile over the
    whole series with memory bounded by its memory_limit. So the summary is the same whether the
    columns come in one piece or in many (tests/test_metrics.py checks it).
    """

    def __init__(self, slo: SLO | None, memory_limit: int):
        self.slo = slo if slo is not None and not slo.is_empty else None
        self.counts = np.zeros(len(OUTCOMES), dtype=np.int64)
        self.finished = 0  # requests with a finish time
        self.last_finish = -math.inf
        self.first_arrival = math.inf  # NaN once any arrival is NaN (as np.min)
        self.total_in = self.total_out = self.good = self.itl_count = 0
        self.itl_max = -math.inf
        self.itl_maxed = 0  # completed requests with an ITL max
        self.admitted = 0
        self.admitted_preemptions = self.admitted_prompt = self.admitted_cached = 0.0
        spool = lambda: FloatSpool(memory_limit)  # noqa: E731
        self.ttft, self.tpot, self.e2el, self.itl_sum, self.queue, self.norm = (spool() for _ in range(6))

    def add(self, cols: dict[str, np.ndarray], outcome: np.ndarray) -> None:
        """Reduce one chunk: the _SUMMARY_INPUTS columns and the outcome codes of some requests, in order."""
        self.counts += np.bincount(outcome, minlength=len(OUTCOMES)).astype(np.int64)
        done = outcome == 0
        fin = _non_nan(cols["finish_s"])
        if fin.size:
            self.finished += fin.size
            self.last_finish = max(self.last_finish, float(fin.max()))
        if outcome.size:
            first = float(cols["arrival_s"].min())
            self.first_arrival = first if first != first else min(self.first_arrival, first)  # noqa: PLR0124 (NaN)
        self.total_in += int(cols["prompt_tokens"][done].sum())
        self.total_out += int(cols["output_tokens"][done].sum())
        ttft, tpot, e2el = cols["ttft_ms"][done], cols["tpot_ms"][done], cols["e2el_ms"][done]
        if self.slo is not None:
            good = np.ones(ttft.size, dtype=bool)
            if self.slo.ttft_ms is not None:
                good &= ttft <= self.slo.ttft_ms
            if self.slo.tpot_ms is not None:
                good &= np.nan_to_num(tpot, nan=0.0) <= self.slo.tpot_ms
            if self.slo.e2el_ms is not None:
                good &= e2el <= self.slo.e2el_ms
            self.good += int(good.sum())
        self.ttft.append(_non_nan(ttft))
        self.tpot.append(_non_nan(tpot))
        self.e2el.append(_non_nan(e2el))
        self.itl_count += int(cols["itl_count"][done].sum())
        self.itl_sum.append(cols["itl_sum_ms"][done])
        mx = _non_nan(cols["itl_max_ms"][done])
        if mx.size:
            self.itl_maxed += mx.size
            self.itl_max = max(self.itl_max, float(mx.max()))
        self.queue.append(_non_nan(cols["queue_ms"][done]))
        out_tok = cols["output_tokens"][done]
        self.norm.append(_non_nan((e2el / 1e3)[out_tok > 0] / out_tok[out_tok > 0]))
        admitted = ~np.isnan(cols["first_scheduled_s"])
        # Float sums of whole numbers (NaN, where a record lacks one, propagates): exact in any grouping.
        self.admitted += int(np.count_nonzero(admitted))
        self.admitted_preemptions += float(cols["preemptions"][admitted].sum())
        self.admitted_prompt += float(cols["prompt_tokens"][admitted].sum())
        self.admitted_cached += float(cols["cached_prompt_tokens"][admitted].sum())

    def close(self) -> None:
        """Drop the spools' temporary files."""
        for spool in (self.ttft, self.tpot, self.e2el, self.itl_sum, self.queue, self.norm):
            spool.close()

    def summary(self, *, itl: ItlHistogram | np.ndarray | None, duration: float | None, cell: dict) -> dict:
        """The summary dict (keys in the order summary.json has them)."""
        s: dict = dict(cell)
        n = int(self.counts.sum())
        counts = {name: int(self.counts[i]) for i, name in enumerate(OUTCOMES)}
        s["num_requests"] = n
        s["completed"] = counts["completed"]
        s["failed"] = sum(counts[k] for k in FAILED)
        for k in (*FAILED, "unfinished"):
            s[k] = counts[k]
        if duration is None:
            duration = float(self.last_finish - self.first_arrival) if self.finished and n else NAN
        s["duration"] = duration
        total_in, total_out = self.total_in, self.total_out
        s["total_input_tokens"] = total_in
        s["total_output_tokens"] = total_out
        ok = duration > 0 if not math.isnan(duration) else False
        s["request_throughput"] = s["completed"] / duration if ok else NAN
        s["output_throughput"] = total_out / duration if ok else NAN
        s["total_token_throughput"] = (total_in + total_out) / duration if ok else NAN
        if self.slo is not None:
            s["good_requests"] = self.good
            s["request_goodput"] = self.good / duration if ok else NAN
        else:
            s["good_requests"] = None
            s["request_goodput"] = None
        for k in ("ttft_ms", "tpot_ms", "e2el_ms"):
            s[f"slo_{k}"] = getattr(self.slo, k) if self.slo is not None else None

        _stats("ttft", self.ttft, s)
        _stats("tpot", self.tpot, s)
        itl_count = self.itl_count
        itl_sum = self.itl_sum.sum()
        s["mean_itl_ms"] = itl_sum / itl_count if itl_count else NAN
        if isinstance(itl, ItlHistogram):
            for name, q in STATS[1:]:
                s[f"{name}_itl_ms"] = itl.percentile(q)
            s["itl_exact"] = False
        elif itl is not None:
            x = np.asarray(itl, dtype=float)
            for name, q in STATS[1:]:
                s[f"{name}_itl_ms"] = float(np.percentile(x, q)) if x.size else NAN
            s["itl_exact"] = True
        else:
            for name, _ in STATS[1:]:
                s[f"{name}_itl_ms"] = NAN
            s["itl_exact"] = itl_count == 0
        s["max_itl_ms"] = self.itl_max if self.itl_maxed else NAN
        _stats("e2el", self.e2el, s)

        s["mean_queue_ms"] = self.queue.mean()
        s["mean_normalized_latency_s"] = self.norm.mean()
        s["mean_preemptions"] = self.admitted_preemptions / self.admitted if self.admitted else NAN
        p = self.admitted_prompt
        s["prefix_cache_hit_rate"] = self.admitted_cached / p if p > 0 else NAN
        return s


def _stats(prefix: str, x: FloatSpool, out: dict) -> None:
    """mean, median, p90, p95, p99 of a spool (no NaN in it) into out, as np.mean and np.percentile give them."""
    if len(x) == 0:
        for name, _ in STATS:
            out[f"{name}_{prefix}_ms"] = NAN
        return
    percentiles = iter(x.percentiles([q for _, q in STATS if q is not None]))
    for name, q in STATS:
        out[f"{name}_{prefix}_ms"] = x.mean() if q is None else next(percentiles)


def _summarize_columns(cols: dict[str, np.ndarray], outcome: np.ndarray, *, itl: ItlHistogram | np.ndarray | None,
                       duration: float | None, slo: SLO | None, cell: dict) -> dict:
    """The one summary computation over columns held in memory; `outcome` holds indices into OUTCOMES."""
    reduction = _SummaryReduction(slo, memory_limit=max(1, int(outcome.size)))
    reduction.add(cols, outcome)
    return reduction.summary(itl=itl, duration=duration, cell=cell)


def _cell_fields(df: pd.DataFrame) -> dict:
    cell = {}
    for k in ("engine", "concurrency", "request_rate"):
        if k in df.columns:
            u = df[k].dropna().unique()
            if len(u) == 1:
                v = u[0]
                cell[k] = v.item() if hasattr(v, "item") else v
            else:
                cell[k] = None
    if cell.get("concurrency") is not None:
        cell["concurrency"] = int(cell["concurrency"])
    return cell


def summarize(records: pd.DataFrame | Sequence[dict], *, duration: float | None = None, slo: SLO | None = None,
              itl: ItlHistogram | np.ndarray | Sequence[float] | None = None) -> dict:
    """Summary of one cell's per-request records (rows as written by request_record).

    duration (s) defaults to first arrival -> last finish. ITL percentiles come from `itl`
    (an ItlHistogram, or the exact pooled gaps in ms) when given; otherwise exact from the
    token_times_s column when every completed request with >= 2 tokens has it; otherwise NaN
    (the mean is exact either way).
    """
    df = records if isinstance(records, pd.DataFrame) else pd.DataFrame(list(records), columns=list(REQUEST_COLUMNS))
    cols = {k: pd.to_numeric(df[k], errors="coerce").to_numpy(dtype=float) if len(df) else np.empty(0)
            for k in _SUMMARY_INPUTS}
    outcome_names = df["outcome"].astype(str).to_numpy() if len(df) else np.empty(0, dtype=str)
    bad = set(outcome_names) - set(OUTCOMES)
    if bad:
        raise ValueError(f"unknown outcome(s) {sorted(bad)} (allowed: {', '.join(OUTCOMES)})")
    outcome = np.array([OUTCOMES.index(o) for o in outcome_names], dtype=np.int8)
    if itl is None and "token_times_s" in df.columns and len(df):
        done = outcome == 0
        tt = df["token_times_s"].to_numpy()[done]
        need = cols["itl_count"][done] > 0
        have = np.array([isinstance(t, str) and bool(t.strip()) for t in tt], dtype=bool)
        if np.all(have[need]):
            parts = [_token_gaps_ms(t) for t in tt[have]]
            itl = np.concatenate(parts) if parts else np.empty(0)
    if itl is not None and not isinstance(itl, ItlHistogram):
        itl = np.asarray(itl, dtype=float)
    return _summarize_columns(cols, outcome, itl=itl, duration=duration, slo=slo, cell=_cell_fields(df))


def summarize_cells(records: pd.DataFrame, *, slo: SLO | None = None,
                    itl_histograms: dict[str, ItlHistogram] | None = None) -> pd.DataFrame:
    """summarize() for each (engine, concurrency, request_rate) cell of a requests table."""
    rows = []
    keys = ["engine", "concurrency", "request_rate"]
    for _, g in records.groupby(keys, dropna=False, sort=False):
        cell = _cell_fields(g)
        hist = (itl_histograms or {}).get(cell_label(**cell))
        rows.append(summarize(g, slo=slo, itl=hist))
    return pd.DataFrame(rows)


def cell_label(engine: str | None, concurrency: int | None = None, request_rate: float | None = None) -> str:
    """A cell's name: 'vllm@c=16', 'vllm@rate=4', 'vllm@rate=inf' or 'vllm@trace'."""
    if concurrency is not None and not (isinstance(concurrency, float) and math.isnan(concurrency)):
        return f"{engine}@c={int(concurrency)}"
    if request_rate is not None and not math.isnan(request_rate):
        return f"{engine}@rate={request_rate:g}"
    return f"{engine}@trace"


# ---------------------------------------------------------------------------------------
# Cell accumulator: per-request rows out, compact summary state in

class CellAccumulator:
    """Collects one cell's finished requests: a row each, plus what the summary needs (69 bytes a request, held
    in memory for up to SPILL_EVERY requests, then on a temporary file: memory flat in the number of requests).

    Rows go to row_sink in chunks of sink_every, or as value lists (REQUEST_COLUMNS order) to
    values_sink (the ResultsWriter appends them to requests.csv), or, without a sink, stay in `rows`. Pooled ITL gaps of completed
    requests go to an ItlHistogram, and are also kept exactly until exact_itl_limit gaps.
    """

    PENDING_GAPS = 1 << 16  # ITL gaps buffered before they are binned
    DEFER_TOKENS = 1 << 16  # token times whose ITL figures record() computes together (numpy calls per batch)
    SPILL_EVERY = 1 << 16  # requests whose summary columns are held in memory before they go to the temporary file

    def __init__(self, engine: str, concurrency: int | None = None, request_rate: float | None = None, *,
                 keep_token_times: bool = False, exact_itl_limit: int = 1_000_000,
                 row_sink: Callable[[list[dict]], None] | None = None, sink_every: int = 10_000,
                 values_sink: Callable[[list[list]], None] | None = None):
        self.engine, self.concurrency, self.request_rate = engine, concurrency, request_rate
        self.keep_token_times = keep_token_times
        self.exact_itl_limit = exact_itl_limit
        self.row_sink, self.sink_every = row_sink, sink_every
        self.values_sink = values_sink  # takes rows as value lists in REQUEST_COLUMNS order (no dict per row)
        self.rows: list[dict] = []
        self._values: list[list] = []
        self._cols = {**{k: array("d") for k in _STORED_FLOATS}, **{k: array("i") for k in _STORED_INTS}}
        self._columns = tuple(self._cols.values())  # in _STORED_INDEX order (see _take)
        self._outcome = array("b")
        # Every SPILL_EVERY requests the columns above move to a temporary file (a chunk), so the memory a cell
        # holds does not grow with its requests; the summary reads the chunks back one at a time.
        self._spill_file = None
        self._spilled: list[int] = []  # requests in each chunk on the file
        self._itl_histogram = ItlHistogram()
        self._exact: array | None = array("d")
        # Gaps (ms) of completed requests not binned yet: binning a request at a time costs ~50 us of
        # numpy call overhead, which adds up in a million-request simulation, so they are binned in batches.
        self._pending_gaps: list[np.ndarray] = []
        self._pending_count = 0
        # Requests recorded by record() whose ITL figures are not computed yet: (row values, place in the columns
        # held, token times, completed), in order; see _settle_itl.
        self._deferred: list[tuple[list, int, Sequence[float], bool]] = []
        self._deferred_tokens = 0

    @property
    def cell(self) -> dict:
        """engine, concurrency, request_rate."""
        return {"engine": self.engine, "concurrency": self.concurrency, "request_rate": self.request_rate}

    @property
    def label(self) -> str:
        return cell_label(self.engine, self.concurrency, self.request_rate)

    def __len__(self) -> int:
        return sum(self._spilled) + len(self._outcome)

    def add(self, req: Request, client_id: int | None = None) -> dict:
        """Record a request (normally a finished one); returns its row."""
        self._settle_itl()  # the ITL gaps go to the histogram in order
        values = self._take(req, client_id)
        row = dict(zip(REQUEST_COLUMNS, values))
        self._buffer(row, values)
        return row

    def record(self, req: Request, client_id: int | None = None) -> None:
        """add() without building the row dict when a CSV sink takes the values (the simulator's per-request path).

        With a values sink the row's ITL figures are computed later, for many requests at once (_settle_itl),
        before any row leaves: the same values, with a few numpy calls per batch instead of seven a request.
        """
        if self.values_sink is None:
            self.add(req, client_id)
            return
        values, _ = _record_values(req, self.engine, self.concurrency, self.request_rate, client_id,
                                   self.keep_token_times, itl=False, missing=None)
        self._store(values)
        if values[21] is None:  # >= 2 tokens: ITL figures to come
            self._deferred.append((values, len(self._outcome) - 1, req.token_times, values[5] == "completed"))
            self._deferred_tokens += values[20] + 1
            if self._deferred_tokens >= self.DEFER_TOKENS:
                self._settle_itl()
        if len(self._outcome) >= self.SPILL_EVERY:
            self._spill()
        self._values.append(values)
        if len(self._values) >= self.sink_every:
            self.flush()

    def _store(self, values: list) -> None:
        """The summary columns of a row (None where undefined: NaN here; ITL sum and max may be filled in later)."""
        c = self._columns  # _STORED_INDEX, spelled out as this runs per request
        c[0].append(values[7])  # arrival_s
        v = values[8]
        c[1].append(NAN if v is None else v)  # first_scheduled_s
        v = values[9]
        c[2].append(NAN if v is None else v)  # first_token_s
        v = values[10]
        c[3].append(NAN if v is None else v)  # finish_s
        c[4].append(NAN if values[21] is None else values[21])  # itl_sum_ms
        c[5].append(NAN if values[23] is None else values[23])  # itl_max_ms
        c[6].append(values[11])  # prompt_tokens
        c[7].append(values[12])  # output_tokens
        c[8].append(values[14])  # cached_prompt_tokens
        c[9].append(values[15])  # preemptions
        c[10].append(values[20])  # itl_count
        self._outcome.append(_OUTCOME_CODE[values[5]])

    def _take(self, req: Request, client_id: int | None) -> list:
        """The request's values (REQUEST_COLUMNS order) into the summary columns and the ITL gaps; returns them."""
        values, gaps = _record_values(req, self.engine, self.concurrency, self.request_rate, client_id,
                                      self.keep_token_times)
        self._store(values)
        if len(self._outcome) >= self.SPILL_EVERY:
            self._spill()
        if values[5] == "completed" and gaps is not None:
            self._pending_gaps.append(gaps)
            self._pending_count += gaps.size
            if self._pending_count >= self.PENDING_GAPS:
                self._bin_pending()
        return values

    def _settle_itl(self) -> None:
        """The deferred requests' ITL sum, mean and max, into their rows and columns; their gaps, binned.

        Each value is the float _record_values computes: the gaps are the same elementwise operations on
        the same token times, each request's sum is np.add.reduce over its own contiguous gaps (pairwise
        summation depends only on the values and their number), its max is exact in any grouping. Gaps of
        completed requests go to the pending list request by request, so they are binned in the same batches.
        """
        deferred = self._deferred
        if not deferred:
            return
        self._deferred, self._deferred_tokens = [], 0
        times = [np.frombuffer(tt) if tt.__class__ is array and tt.typecode == "d" else np.asarray(tt, dtype=float)
                 for _, _, tt, _ in deferred]
        t = np.concatenate(times) if len(times) > 1 else times[0]
        gaps = t[1:] - t[:-1]
        gaps *= 1e3
        lengths = np.fromiter((x.size for x in times), dtype=np.int64, count=len(times))
        gaps = np.delete(gaps, np.cumsum(lengths)[:-1] - 1)  # the gaps between one request and the next
        counts = lengths - 1
        starts = np.cumsum(counts) - counts
        maxima = np.maximum.reduceat(gaps, starts).tolist()
        c_sum, c_max = self._columns[4], self._columns[5]
        for (values, place, _, completed), start, n, mx in zip(deferred, starts.tolist(), counts.tolist(), maxima):
            own = gaps[start:start + n]
            total = float(_add_reduce(own))
            values[21], values[22], values[23] = total, total / n, mx
            c_sum[place], c_max[place] = total, mx
            if completed:
                self._pending_gaps.append(own)
                self._pending_count += n
                if self._pending_count >= self.PENDING_GAPS:
                    self._bin_pending()

    def _spill(self) -> None:
        """Move the summary columns held in memory to the end of the temporary file, as one chunk."""
        self._settle_itl()
        if self._spill_file is None:
            self._spill_file = tempfile.TemporaryFile(prefix="servesim-cell-")
        f = self._spill_file
        f.seek(0, 2)
        self._spilled.append(len(self._outcome))
        for column in (*self._columns, self._outcome):
            f.write(column.tobytes())
            del column[:]

    def _buffer(self, row: dict | None, values: list) -> None:
        """Keep the row for the sink (as values when values_sink takes them) or for `rows`."""
        if self.values_sink is not None:
            self._values.append(_csv_row(values))
            if len(self._values) >= self.sink_every:
                self.flush()
            return
        self.rows.append(row)
        if self.row_sink is not None and len(self.rows) >= self.sink_every:
            self.flush()

    def _bin_pending(self) -> None:
        """Add the pending gaps to the histogram (and to the exact list while it lasts), in arrival order."""
        if not self._pending_gaps:
            return
        gaps = np.concatenate(self._pending_gaps)
        self._pending_gaps, self._pending_count = [], 0
        self._itl_histogram.add(gaps)
        if self._exact is not None:
            if len(self._exact) + gaps.size > self.exact_itl_limit:
                self._exact = None  # too many: percentiles from the histogram
            else:
                self._exact.frombytes(gaps.tobytes())

    @property
    def itl_histogram(self) -> ItlHistogram:
        """Every pooled ITL gap (ms) of the completed requests so far."""
        self._settle_itl()
        self._bin_pending()
        return self._itl_histogram

    def flush(self) -> None:
        """Hand buffered rows to the sink (no-op without one)."""
        self._settle_itl()
        if self.values_sink is not None and self._values:
            self.values_sink(self._values)
            self._values = []
        if self.row_sink is not None and self.rows:
            self.row_sink(self.rows)
            self.rows = []

    def records_df(self) -> pd.DataFrame:
        """The rows still held (all of them when there is no sink)."""
        self._settle_itl()
        return records_frame(self.rows + [dict(zip(REQUEST_COLUMNS, v)) for v in self._values])

    @property
    def itl_exact(self) -> bool:
        """True while every pooled gap is still held, so ITL percentiles are exact."""
        self._settle_itl()
        self._bin_pending()
        return self._exact is not None

    def summary(self, *, slo: SLO | None = None, duration: float | None = None) -> dict:
        """The cell's summary: the same numbers summarize() gives over all its rows."""
        self._settle_itl()
        self._bin_pending()
        itl = np.frombuffer(self._exact, dtype=float) if self._exact is not None and len(self._exact) \
            else (np.empty(0) if self._exact is not None else self.itl_histogram)
        reduction = _SummaryReduction(slo, memory_limit=self.SPILL_EVERY)
        try:
            for stored, outcome in self._stored_chunks():
                reduction.add(_latency_columns(stored), outcome)
            return reduction.summary(itl=itl, duration=duration, cell=self.cell)
        finally:
            reduction.close()

    def _stored_chunks(self):
        """(stored columns, outcome codes) of each chunk: those on the temporary file, then those in memory.

        Counts stay C ints, whose sums and means are exact either way.
        """
        dtypes = [np.dtype(float if c.typecode == "d" else np.intc) for c in self._columns]
        offset = 0
        for n in self._spilled:
            self._spill_file.seek(offset)
            stored = {}
            for name, dtype in zip(self._cols, dtypes):
                stored[name] = np.frombuffer(self._spill_file.read(n * dtype.itemsize), dtype=dtype)
            outcome = np.frombuffer(self._spill_file.read(n), dtype=np.int8)
            offset = self._spill_file.tell()
            yield stored, outcome
        # Views of the arrays held, no copies.
        yield ({k: np.frombuffer(v, dtype=dtype) if len(v) else np.empty(0, dtype)
                for (k, v), dtype in zip(self._cols.items(), dtypes)},
               np.frombuffer(self._outcome, dtype=np.int8) if len(self._outcome) else np.empty(0, np.int8))


# ---------------------------------------------------------------------------------------
# Files

def records_frame(rows: Sequence[dict]) -> pd.DataFrame:
    """Rows as a DataFrame with the requests.csv column order and dtypes."""
    df = pd.DataFrame(list(rows), columns=list(REQUEST_COLUMNS))
    return _fix_dtypes(df)


def _fix_dtypes(df: pd.DataFrame) -> pd.DataFrame:
    for c in _INT_COLUMNS:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("Int64")
    for c in _STR_COLUMNS:
        df[c] = df[c].fillna("").astype(str)
    for c in REQUEST_COLUMNS:
        if c not in _INT_COLUMNS and c not in _STR_COLUMNS:
            df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    return df


_row_values = operator.itemgetter(*REQUEST_COLUMNS)


def _csv_row(values: Sequence) -> list:
    """The values with NaN as None: the csv module writes None as an empty field and a float as its repr, in C."""
    return [None if v != v else v for v in values]  # noqa: PLR0124 (v != v: NaN)


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float):
        if math.isnan(v):
            return None
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
    return v


def write_json_atomic(path: str | Path, obj) -> None:
    """Write obj as JSON (NaN -> null, inf -> "inf") to path via a temporary file and rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_jsonable(obj), f, indent=1, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _missing(v) -> bool:
    return v is None or v == "" or (isinstance(v, float) and math.isnan(v))


def _cell_key(engine, concurrency, request_rate) -> tuple:
    """A hashable cell identity that survives CSV and JSON round trips."""
    c = None if _missing(concurrency) else int(float(concurrency))
    r = None if _missing(request_rate) else float(request_rate)
    return (str(engine), c, r)


class ResultsWriter:
    """Writes DIR/requests.csv, DIR/summary.json and DIR/itl_histograms.json cell by cell.

    A finished cell is never lost: its rows are appended (and fsynced) before its summary is
    written, and the summary files are replaced atomically. resume=True keeps finished cells
    (see done_cells) and drops rows of any cell that has no summary (one cut off mid-run);
    resume=False starts the three files afresh.

        w = ResultsWriter(out_dir)
        for cell in exp.cells():
            acc = w.start_cell(cell.engine, cell.concurrency, cell.request_rate)
            ... acc.add(req, client_id) as requests finish ...
            w.finish_cell(acc, slo=exp.slo)
    """

    def __init__(self, directory: str | Path, *, resume: bool = False):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.requests_path = self.dir / "requests.csv"
        self.summary_path = self.dir / "summary.json"
        self.hist_path = self.dir / "itl_histograms.json"
        self.summaries: list[dict] = []
        self.histograms: dict[str, dict] = {}
        if resume and self.summary_path.exists():
            self.summaries = json.loads(self.summary_path.read_text())
            if self.hist_path.exists():
                self.histograms = json.loads(self.hist_path.read_text())
            self._drop_unfinished_rows()
        else:
            for p in (self.requests_path, self.summary_path, self.hist_path):
                p.unlink(missing_ok=True)

    @property
    def done_cells(self) -> set[tuple]:
        """(engine, concurrency, request_rate) of the cells already summarized."""
        return {_cell_key(s.get("engine"), s.get("concurrency"), _rate(s.get("request_rate")))
                for s in self.summaries}

    def is_done(self, engine: str, concurrency: int | None = None, request_rate: float | None = None) -> bool:
        """True when this cell already has a summary."""
        return _cell_key(engine, concurrency, request_rate) in self.done_cells

    def _drop_unfinished_rows(self) -> None:
        if not self.requests_path.exists():
            return
        df = pd.read_csv(self.requests_path, dtype=str, keep_default_na=False)
        done = self.done_cells
        keep = [_cell_key(e, c, r) in done for e, c, r in zip(df["engine"], df["concurrency"], df["request_rate"])]
        if all(keep):
            return
        tmp = self.requests_path.with_suffix(".csv.tmp")
        df[keep].to_csv(tmp, index=False)
        os.replace(tmp, self.requests_path)

    def append_rows(self, rows: Sequence[dict]) -> None:
        """Append rows to requests.csv (header first if new) and fsync."""
        self.append_values([_csv_row(_row_values(r)) for r in rows])

    def append_values(self, rows: Sequence[Sequence]) -> None:
        """Append rows given as values in REQUEST_COLUMNS order, None where undefined (never NaN), to requests.csv.

        The header goes first if the file is new; the file is fsynced.
        """
        new = not self.requests_path.exists() or self.requests_path.stat().st_size == 0
        with open(self.requests_path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(REQUEST_COLUMNS)
            w.writerows(rows)
            f.flush()
            os.fsync(f.fileno())

    def start_cell(self, engine: str, concurrency: int | None = None, request_rate: float | None = None, *,
                   keep_token_times: bool = False, exact_itl_limit: int = 1_000_000) -> CellAccumulator:
        """An accumulator whose rows stream into requests.csv."""
        return CellAccumulator(engine, concurrency, request_rate, keep_token_times=keep_token_times,
                               exact_itl_limit=exact_itl_limit, values_sink=self.append_values)

    def finish_cell(self, acc: CellAccumulator, *, slo: SLO | None = None, duration: float | None = None,
                    extra: dict | None = None) -> dict:
        """Flush the cell's rows, then write its summary (plus `extra` fields); returns the summary."""
        acc.flush()
        s = acc.summary(slo=slo, duration=duration)
        s["cell"] = acc.label
        if extra:
            s.update(extra)
        key = _cell_key(acc.engine, acc.concurrency, acc.request_rate)
        self.summaries = [x for x in self.summaries
                          if _cell_key(x.get("engine"), x.get("concurrency"), _rate(x.get("request_rate"))) != key]
        self.summaries.append(_jsonable(s))
        self.histograms[acc.label] = acc.itl_histogram.to_dict()
        write_json_atomic(self.hist_path, self.histograms)
        write_json_atomic(self.summary_path, self.summaries)
        return s


def _rate(v):
    return None if _missing(v) else float(v)  # "inf" -> inf


def load_results(directory: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(requests_df, summary_df) from a results directory (either may be empty)."""
    d = Path(directory)
    rp, sp = d / "requests.csv", d / "summary.json"
    if not rp.exists() and not sp.exists():
        raise FileNotFoundError(f"{d}: no requests.csv or summary.json")
    if rp.exists():
        requests = _fix_dtypes(pd.read_csv(rp, dtype={c: str for c in _STR_COLUMNS}, keep_default_na=False,
                                           na_values=[""]))
    else:
        requests = records_frame([])
    summary = pd.DataFrame(json.loads(sp.read_text())) if sp.exists() else pd.DataFrame()
    if "request_rate" in summary.columns:
        summary["request_rate"] = pd.to_numeric(summary["request_rate"].map(_rate), errors="coerce").astype(float)
    if "concurrency" in summary.columns:
        summary["concurrency"] = pd.to_numeric(summary["concurrency"], errors="coerce").astype("Int64")
    return requests, summary


def load_itl_histograms(directory: str | Path) -> dict[str, ItlHistogram]:
    """The per-cell ITL histograms of a results directory, by cell label."""
    p = Path(directory) / "itl_histograms.json"
    if not p.exists():
        return {}
    return {k: ItlHistogram.from_dict(v) for k, v in json.loads(p.read_text()).items()}


_TABLE_COLUMNS = (
    ("cell", "cell"), ("completed", "ok"), ("failed", "fail"), ("request_throughput", "req/s"),
    ("output_throughput", "out tok/s"), ("total_token_throughput", "tot tok/s"),
    ("mean_ttft_ms", "TTFT mean"), ("p99_ttft_ms", "TTFT p99"), ("mean_tpot_ms", "TPOT mean"),
    ("p99_tpot_ms", "TPOT p99"), ("p99_itl_ms", "ITL p99"), ("mean_e2el_ms", "E2EL mean"),
    ("request_goodput", "goodput"), ("mean_preemptions", "preempt"), ("prefix_cache_hit_rate", "prefix hit"),
)


def format_summary(summary: pd.DataFrame | Sequence[dict]) -> str:
    """A fixed-width table of the main numbers per cell (latencies in ms)."""
    df = summary if isinstance(summary, pd.DataFrame) else pd.DataFrame(list(summary))
    if df.empty:
        return "(no cells)"
    df = df.copy()
    if "cell" not in df.columns:
        df["cell"] = [cell_label(e, c, r) for e, c, r in
                      zip(df.get("engine"), df.get("concurrency", [None] * len(df)),
                          df.get("request_rate", [None] * len(df)))]
    cols = [(k, h) for k, h in _TABLE_COLUMNS if k in df.columns and not df[k].isna().all()]
    t = df[[k for k, _ in cols]].rename(columns=dict(cols))
    return t.to_string(index=False, float_format=lambda x: f"{x:,.2f}", na_rep="-")
