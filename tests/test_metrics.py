"""sim.lab.metrics: vLLM benchmark definitions over synthetic requests, ITL histogram, results files."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reference.errors import ConfigError
from reference.request import Outcome, Request, SamplingParams
from sim.lab.metrics import (REQUEST_COLUMNS, SLO, CellAccumulator, ItlHistogram, ResultsWriter, cell_label,
                         format_summary, load_itl_histograms, load_results, records_frame, request_record,
                         summarize, summarize_cells)

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_request(i: int, arrival: float, *, queue: float = 0.0, ttft: float = 0.01, gaps=(), outcome=Outcome.COMPLETED,
                 prompt: int = 8, cached: int = 0, preemptions: int = 0, finish_extra: float = 0.0) -> Request:
    """A request with given timings (s). Refused requests get no tokens and are never scheduled."""
    n_out = 1 + len(gaps)
    r = Request(f"r{i}", [1] * prompt, SamplingParams(max_tokens=n_out), arrival_time=arrival)
    if outcome is Outcome.REFUSED:
        r.finish(outcome, arrival + queue, reason="queue full")
        return r
    r.first_scheduled_time = arrival + queue
    r.num_cached_prompt_tokens = cached
    r.num_preemptions = preemptions
    t = arrival + queue + ttft
    r.append_token(7, t)
    for g in gaps:
        t += g
        r.append_token(7, t)
    r.finish(outcome, t + finish_extra)
    return r


req_strategy = st.fixed_dictionaries({
    "arrival": st.floats(0, 100),
    "queue": st.floats(0, 5),
    "ttft": st.floats(1e-4, 2),
    "gaps": st.lists(st.floats(1e-4, 0.5), max_size=12),
    "outcome": st.sampled_from([Outcome.COMPLETED] * 4 + [Outcome.REFUSED, Outcome.TIMED_OUT, Outcome.ABORTED]),
    "prompt": st.integers(1, 64),
    "cached": st.integers(0, 64),
    "preemptions": st.integers(0, 3),
})


def build(specs):
    reqs = []
    for i, s in enumerate(specs):
        s = dict(s)
        s["cached"] = min(s["cached"], s["prompt"])
        reqs.append(make_request(i, **s))
    return reqs


@FAST
@given(st.lists(req_strategy, min_size=1, max_size=25))
def test_summary_matches_hand_computation(specs):
    reqs = build(specs)
    df = records_frame([request_record(r, engine="e", concurrency=4) for r in reqs])
    s = summarize(df)

    done = [(sp, r) for sp, r in zip(specs, reqs) if r.outcome is Outcome.COMPLETED]
    ttft = [r.first_token_time - r.arrival_time for _, r in done]
    e2el = [r.finish_time - r.arrival_time for _, r in done]
    tpot = [(r.finish_time - r.first_token_time) / (r.num_output_tokens - 1) for _, r in done
            if r.num_output_tokens > 1]
    itl = [g for _, r in done for g in np.diff(r.token_times)]
    duration = max(r.finish_time for r in reqs) - min(r.arrival_time for r in reqs)

    assert s["num_requests"] == len(reqs)
    assert s["completed"] == len(done)
    assert s["refused"] == sum(r.outcome is Outcome.REFUSED for r in reqs)
    assert s["failed"] == len(reqs) - len(done)
    assert s["duration"] == pytest.approx(duration)
    out_tok = sum(r.num_output_tokens for _, r in done)
    in_tok = sum(r.num_prompt_tokens for _, r in done)
    assert s["total_output_tokens"] == out_tok and s["total_input_tokens"] == in_tok
    if duration > 0:
        assert s["request_throughput"] == pytest.approx(len(done) / duration)
        assert s["output_throughput"] == pytest.approx(out_tok / duration)
        assert s["total_token_throughput"] == pytest.approx((in_tok + out_tok) / duration)
    for name, xs in (("ttft", ttft), ("tpot", tpot), ("e2el", e2el), ("itl", itl)):
        if not xs:
            assert math.isnan(s[f"mean_{name}_ms"])
            continue
        ms = np.array(xs) * 1e3
        assert s[f"mean_{name}_ms"] == pytest.approx(ms.mean(), rel=1e-9, abs=1e-9)
        if name != "itl":  # pooled ITL percentiles need token times or a histogram (tested below)
            assert s[f"median_{name}_ms"] == pytest.approx(np.median(ms), rel=1e-9, abs=1e-9)
            assert s[f"p99_{name}_ms"] == pytest.approx(np.percentile(ms, 99), rel=1e-9, abs=1e-9)
    admitted = [r for r in reqs if r.first_scheduled_time is not None]
    if admitted:
        assert s["mean_preemptions"] == pytest.approx(np.mean([r.num_preemptions for r in admitted]))
        assert s["prefix_cache_hit_rate"] == pytest.approx(
            sum(r.num_cached_prompt_tokens for r in admitted) / sum(r.num_prompt_tokens for r in admitted))


@FAST
@given(st.lists(req_strategy, min_size=1, max_size=25))
def test_accumulator_equals_summarize_and_itl_is_exact(specs):
    reqs = build(specs)
    acc = CellAccumulator("e", request_rate=2.0, keep_token_times=True)
    for r in reqs:
        acc.add(r)
    a = acc.summary()
    b = summarize(acc.records_df())  # exact ITL from the token_times_s column
    itl = np.array([g for r in reqs if r.outcome is Outcome.COMPLETED for g in np.diff(r.token_times)]) * 1e3
    for k, v in a.items():
        if isinstance(v, float) and math.isnan(v):
            assert math.isnan(b[k]), k
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            assert b[k] == pytest.approx(v, rel=1e-12, abs=1e-12), k
        else:  # labels, flags, None: approx compares numbers only (pytest >= 9)
            assert b[k] == v, k
    if itl.size:
        assert a["itl_exact"] and b["itl_exact"]
        for q, name in ((50, "median"), (90, "p90"), (95, "p95"), (99, "p99")):
            assert a[f"{name}_itl_ms"] == pytest.approx(np.percentile(itl, q))
        assert a["max_itl_ms"] == pytest.approx(itl.max())


def _same(a: dict, b: dict) -> bool:
    """Equal dicts, NaN equal to NaN."""
    return a.keys() == b.keys() and all(
        (isinstance(v, float) and math.isnan(v) and isinstance(b[k], float) and math.isnan(b[k])) or b[k] == v
        for k, v in a.items())


@FAST
@given(st.lists(req_strategy, min_size=1, max_size=60), st.integers(1, 9),
       st.sampled_from([None, SLO(ttft_ms=500), SLO(tpot_ms=100, e2el_ms=2000)]))
def test_accumulator_spilling_to_file_gives_the_same_summary(specs, spill_every, slo):
    """Summary columns moved to the temporary file every few requests: the very same summary as held in memory."""
    reqs = build(specs)
    held, spilled = CellAccumulator("e", concurrency=3), CellAccumulator("e", concurrency=3)
    spilled.SPILL_EVERY = spill_every
    for r in reqs:
        held.add(r, client_id=1)
        spilled.add(r, client_id=1)
    assert len(spilled) == len(held) == len(reqs)
    assert len(spilled._outcome) < spill_every and sum(spilled._spilled) + len(spilled._outcome) == len(reqs)
    a, b = held.summary(slo=slo), spilled.summary(slo=slo)
    assert _same(a, b), {k: (a[k], b[k]) for k in a if not _same({k: a[k]}, {k: b[k]})}


@FAST
@given(st.lists(req_strategy, min_size=1, max_size=60), st.integers(1, 40), st.integers(1, 30), st.integers(1, 9),
       st.sampled_from([0, 25, 10 ** 6]))
def test_record_with_deferred_itl_gives_adds_rows_and_summary(specs, defer_tokens, pending_gaps, sink_every, exact):
    """record() with a values sink computes ITL figures in batches: the very rows (None where add() has NaN, as
    requests.csv takes them), summary and histogram of add()."""
    reqs = build(specs)
    rows = []
    deferred = CellAccumulator("e", concurrency=2, values_sink=rows.extend, sink_every=sink_every, exact_itl_limit=exact)
    deferred.DEFER_TOKENS, deferred.PENDING_GAPS, deferred.SPILL_EVERY = defer_tokens, pending_gaps, 5
    direct = CellAccumulator("e", concurrency=2, exact_itl_limit=exact)
    direct.PENDING_GAPS = pending_gaps
    for i, r in enumerate(reqs):
        deferred.record(r, client_id=i % 3)
        direct.add(r, client_id=i % 3)
    deferred.flush()
    assert [dict(zip(REQUEST_COLUMNS, v)) for v in rows] == [
        {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in w.items()} for w in direct.rows]
    assert _same(deferred.summary(), direct.summary())
    assert deferred.itl_histogram.to_dict() == direct.itl_histogram.to_dict()


def test_tpot_excludes_single_token_outputs():
    reqs = [make_request(0, 0.0, ttft=0.1),  # 1 token: no TPOT
            make_request(1, 0.0, ttft=0.1, gaps=[0.02, 0.04])]  # TPOT = 0.06 / 2 = 30 ms
    df = records_frame([request_record(r, engine="e") for r in reqs])
    assert math.isnan(df.loc[0, "tpot_ms"])
    assert df.loc[1, "tpot_ms"] == pytest.approx(30.0)
    s = summarize(df)
    assert s["mean_tpot_ms"] == pytest.approx(30.0)
    assert s["median_tpot_ms"] == pytest.approx(30.0)
    # goodput: a 1-token output meets any TPOT objective (TPOT 0, as in vLLM)
    g = summarize(df, slo=SLO(tpot_ms=10.0))
    assert g["good_requests"] == 1


def test_throughput_uses_first_arrival_to_last_finish():
    reqs = [make_request(0, 1.0, ttft=0.5, gaps=[0.5]),  # finishes at 2.0
            make_request(1, 2.0, ttft=0.5, gaps=[0.5, 0.5, 0.5]),  # finishes at 4.0
            make_request(2, 3.0, outcome=Outcome.REFUSED)]
    s = summarize([request_record(r, engine="e") for r in reqs])
    assert s["duration"] == pytest.approx(3.0)
    assert s["request_throughput"] == pytest.approx(2 / 3.0)
    assert s["output_throughput"] == pytest.approx(6 / 3.0)
    assert s["total_token_throughput"] == pytest.approx((6 + 16) / 3.0)
    assert (s["completed"], s["failed"], s["refused"]) == (2, 1, 1)
    assert summarize([request_record(r, engine="e") for r in reqs], duration=6.0)["request_throughput"] \
        == pytest.approx(2 / 6.0)


def test_goodput_counts_requests_meeting_all_slos():
    reqs = [make_request(0, 0.0, ttft=0.1, gaps=[0.01] * 4),   # ttft 100 ms, tpot 10 ms, e2el 140 ms
            make_request(1, 0.0, ttft=0.3, gaps=[0.01] * 4),   # ttft 300 ms, e2el 340 ms
            make_request(2, 0.0, ttft=0.1, gaps=[0.05] * 4)]   # tpot 50 ms, e2el 300 ms
    rows = [request_record(r, engine="e") for r in reqs]
    assert summarize(rows)["request_goodput"] is None
    s = summarize(rows, slo=SLO(ttft_ms=200, tpot_ms=20))
    assert s["good_requests"] == 1
    assert s["request_goodput"] == pytest.approx(1 / s["duration"])
    assert summarize(rows, slo=SLO(e2el_ms=320))["good_requests"] == 2
    with pytest.raises(ConfigError, match="ttft_ms"):
        SLO(ttft_ms=-1)


def test_refused_request_record_has_no_latencies():
    r = make_request(0, 5.0, queue=0.0, outcome=Outcome.REFUSED)
    row = request_record(r, engine="ollama", concurrency=64)
    assert row["outcome"] == "refused" and row["reason"] == "queue full"
    assert math.isnan(row["ttft_ms"]) and math.isnan(row["tpot_ms"]) and row["output_tokens"] == 0
    assert row["e2el_ms"] == pytest.approx(0.0)
    assert list(row) == list(REQUEST_COLUMNS)
    unfinished = Request("u", [1, 2], arrival_time=0.0)
    assert request_record(unfinished, engine="x")["outcome"] == "unfinished"


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0, 5e3), min_size=1, max_size=400), st.sampled_from([0, 1, 37.5, 50, 90, 95, 99, 100]))
def test_itl_histogram_percentile_within_one_bin(gaps, q):
    h = ItlHistogram()
    h.add(gaps)
    exact = float(np.percentile(gaps, q))
    width = 10 ** (1 / ItlHistogram.BINS_PER_DECADE) - 1
    assert h.percentile(q) == pytest.approx(exact, rel=width, abs=ItlHistogram.LO_MS)
    assert h.mean_ms == pytest.approx(np.mean(gaps))
    assert ItlHistogram.from_dict(json.loads(json.dumps(h.to_dict()))).percentile(q) == h.percentile(q)


def test_accumulator_falls_back_to_histogram_beyond_limit():
    rng = np.random.default_rng(0)
    acc = CellAccumulator("e", concurrency=1, exact_itl_limit=500)
    exact = []
    for i in range(100):
        gaps = rng.lognormal(-4, 0.5, size=20)
        acc.add(make_request(i, float(i), gaps=gaps))
        exact.extend(gaps * 1e3)
    s = acc.summary()
    assert not s["itl_exact"] and not acc.itl_exact
    assert s["mean_itl_ms"] == pytest.approx(np.mean(exact))
    assert s["p99_itl_ms"] == pytest.approx(np.percentile(exact, 99), rel=0.012)
    # records without token times: exact mean, no percentiles
    s2 = summarize(acc.records_df())
    assert s2["mean_itl_ms"] == pytest.approx(np.mean(exact)) and math.isnan(s2["p99_itl_ms"])
    assert summarize(acc.records_df(), itl=acc.itl_histogram)["p99_itl_ms"] == s["p99_itl_ms"]


def test_results_writer_round_trip_and_resume(tmp_path):
    w = ResultsWriter(tmp_path)
    slo = SLO(ttft_ms=150)
    for conc in (1, 4):
        acc = w.start_cell("vllm", concurrency=conc)
        acc.sink_every = 3  # stream rows in several appends
        for i in range(7):
            acc.add(make_request(i, i * 0.1, ttft=0.05 * conc, gaps=[0.01] * 3), client_id=i % conc)
        w.finish_cell(acc, slo=slo)
    acc = w.start_cell("vllm", request_rate=float("inf"))
    acc.add(make_request(0, 0.0, gaps=[0.02]))
    w.finish_cell(acc)
    requests, summary = load_results(tmp_path)
    assert len(requests) == 15 and len(summary) == 3
    assert list(requests.columns) == list(REQUEST_COLUMNS)
    assert summary["cell"].tolist() == ["vllm@c=1", "vllm@c=4", "vllm@rate=inf"]
    assert summary["request_rate"].iloc[2] == math.inf and summary["concurrency"].iloc[1] == 4
    assert set(requests["client_id"].dropna()) == {0, 1, 2, 3}
    # summaries recomputed from the files agree with the ones written
    again = summarize_cells(requests, slo=slo, itl_histograms=load_itl_histograms(tmp_path))
    for k in ("mean_ttft_ms", "p99_itl_ms", "request_throughput", "good_requests"):
        assert again[k].iloc[:2].tolist() == pytest.approx(summary[k].iloc[:2].tolist())
    json.loads((tmp_path / "summary.json").read_text())  # strict JSON (no NaN / Infinity tokens)
    assert "vllm@c=4" in format_summary(summary)

    # a cell cut off mid-run: rows appended, no summary. Resuming drops its rows, keeps the rest.
    acc = w.start_cell("ollama", concurrency=1)
    acc.add(make_request(0, 0.0))
    acc.flush()
    w2 = ResultsWriter(tmp_path, resume=True)
    assert w2.is_done("vllm", concurrency=4) and w2.is_done("vllm", request_rate=float("inf"))
    assert not w2.is_done("ollama", concurrency=1)
    requests, _ = load_results(tmp_path)
    assert len(requests) == 15 and "ollama" not in set(requests["engine"])
    # a fresh (non-resume) writer starts over
    ResultsWriter(tmp_path)
    assert not (tmp_path / "summary.json").exists()


def test_cell_labels_and_empty_summary():
    assert cell_label("vllm", 16) == "vllm@c=16"
    assert cell_label("vllm", None, 4.0) == "vllm@rate=4"
    assert cell_label("x") == "x@trace"
    s = summarize(pd.DataFrame(columns=list(REQUEST_COLUMNS)))
    assert s["num_requests"] == 0 and math.isnan(s["request_throughput"])
