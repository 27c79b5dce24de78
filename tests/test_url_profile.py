"""`servesim profile --url` and `servesim validate --url`: the black-box probes, their analysis, and a fake server.

The fake server (tests/fake_server.py) has a known step law and request overhead. Its timing is
real (asyncio sleeps on a busy machine), so the checks on recovered figures are loose: they catch a
probe that times the wrong thing (off by a factor), not a few milliseconds of jitter.
"""
import math

import numpy as np
import pandas as pd
import pytest

from reference.batch import StepShape
from reference.errors import ConfigError
from reference.request import Request, SamplingParams
from sim.core.calibrated import CalibratedCostModel, ServerShapes, read_profile, shape_from_profile_row
from sim.lab.experiment import load_experiment
from sim.lab.server_metrics import cell_metrics, parse_prometheus
from sim.lab.url_profile import UrlGrid, decode_window, discover, fit_overhead, mixed_stall, run_url_profile
from sim.lab.url_validate import _SeenLater, cell_experiments, profile_overhead_s, run_url_validate, \
    with_capacity_rates
from tests.fake_server import DECODE_S, OVERHEAD_S, PER_SEQ_S, PER_TOKEN_S, FakeServer, step_seconds


def _req(times, rid="r"):
    r = Request(rid, [1, 2, 3], SamplingParams(max_tokens=len(times)))
    for t in times:
        r.append_token(5, t)
    return r


def test_decode_window_keeps_gaps_while_every_request_decodes():
    a = _req([1.0, 1.1, 1.2, 1.3, 1.4, 1.5])
    b = _req([1.2, 1.3, 1.4, 1.5, 1.6])  # starts later: the window opens at its first token
    gaps, ctx = decode_window([a, b], prompt_len=10)
    assert len(gaps) == 6 and np.allclose(gaps, 0.1)  # a: 1.2..1.5 (3 gaps), b: 1.2..1.5 (3 gaps)
    assert sorted(ctx) == [11, 12, 13, 13, 14, 15]


def test_mixed_stall_takes_the_gap_that_ends_with_the_injected_first_token():
    d = _req([0.0, 0.1, 0.2, 0.3, 0.8, 0.9, 1.0])  # the step ending at 0.8 computed a prompt too
    gaps, ctx = mixed_stall([d], first_token_time=0.801, prompt_len=16)
    assert np.allclose(gaps, [0.5]) and ctx == [20]
    assert mixed_stall([d], first_token_time=0.55, prompt_len=16) == ([], [])  # not a token of the same step


def test_fit_overhead_recovers_the_constant_that_only_ttfts_hold():
    law = lambda s: 10.0 + 2.0 * s.num_seqs + 0.5 * s.new_tokens  # ms, a prefill-step law with no attention term
    rows = []
    for p in (16, 64, 256, 1024):
        rows.append(dict(kind="prefill", batch_size=1, context_len=p, prefill_tokens=p, source="ttft"))
    for b in (1, 3):
        for p in (32, 128, 512):
            rows.append(dict(kind="mixed", batch_size=b, context_len=20, prefill_tokens=p, source="stall"))
    for b in (1, 4):
        rows.append(dict(kind="decode", batch_size=b, context_len=50, prefill_tokens=0, source="itl"))
    df = pd.DataFrame(rows)
    df["cached_context"] = 0
    o = 7.0
    df["median_ms"] = [law(shape_from_profile_row(k, b, c, p, 0)) + (o if src == "ttft" else 0.0)
                       for k, b, c, p, src in zip(df.kind, df.batch_size, df.context_len, df.prefill_tokens, df.source)]
    assert fit_overhead(df, ServerShapes(1)) == pytest.approx(o, rel=1e-3)
    assert fit_overhead(df[df.source == "ttft"], ServerShapes(1)) == 0.0  # nothing to tell them apart


def test_prometheus_text_and_a_cells_view_of_it():
    text = ('# HELP x\nvllm:num_requests_running{engine="0"} 2\nvllm:num_preemptions_total{engine="0"} 3\n'
            'vllm:num_preemptions_total{engine="1"} 1\nllamacpp:n_decode_total 10\nllamacpp:n_busy_slots_per_decode 2\n')
    m = parse_prometheus(text)
    assert m["vllm:num_preemptions_total"] == 4 and m["vllm:num_requests_running"] == 2
    later = dict(m, **{"vllm:num_preemptions_total": 9, "vllm:num_requests_running": 4, "llamacpp:n_decode_total": 30,
                       "llamacpp:n_busy_slots_per_decode": 3})
    out = cell_metrics([(0.0, m), (1.0, dict(m)), (3.0, later)])
    assert out["vllm:num_preemptions_total"] == 5
    assert out["vllm:num_requests_running_mean"] == pytest.approx(2.0) and out["vllm:num_requests_running_max"] == 4
    assert out["llamacpp:busy_slots_per_decode"] == pytest.approx((3 * 30 - 2 * 10) / 20)
    assert cell_metrics([]) == {}


EXP = """
name = "fake_closed"
model = "tiny"
seed = 3
[workload]
kind = "closed_loop"
clients = [1, 3]
requests_per_client = 2
[workload.prompt_tokens]
dist = "fixed"
value = 40
[workload.output_tokens]
dist = "fixed"
value = 8
[engines.fake]
scheduler = "continuous"
max_num_seqs = 16
max_num_batched_tokens = 4096
max_model_len = 2048
"""


def test_cells_draw_their_own_prompts_and_capacity_rates_scale():
    exp = load_experiment(EXP)
    pairs = cell_experiments(exp)
    assert [c.label for c, _ in pairs] == ["fake@c=1", "fake@c=3"]
    assert [e.seed for _, e in pairs] == [3, 1003] and [e.workload.clients for _, e in pairs] == [(1,), (3,)]
    pois = load_experiment(EXP.replace('kind = "closed_loop"\nclients = [1, 3]\nrequests_per_client = 2',
                                       'kind = "poisson"\nrates = [0.5, 0.9]\nnum_requests = 4'))
    assert with_capacity_rates(pois, 4.0).workload.rates == (2.0, 3.6)


def test_simulated_client_sees_tokens_overhead_later():
    class Acc:
        def add(self, req, client_id=None):
            self.req = req

    r = _req([1.0, 1.5])
    r.arrival_time = 0.5
    r.finish(r.outcome or __import__("reference.request", fromlist=["Outcome"]).Outcome.COMPLETED, 1.5)
    acc = Acc()
    _SeenLater(acc, 0.25).add(r)
    assert acc.req.first_token_time == 1.25 and acc.req.token_times == [1.25, 1.75] and acc.req.finish_time == 1.75


GRID = UrlGrid(prefill_tokens=(16, 512, 1024), prefill_repeats=2, decode_batch=(1, 2, 4), decode_context=(16, 100),
               decode_tokens=10, max_probe_tokens=4096, decode_passes=1, mixed_batch=(1,), mixed_prefill=(256,),
               mixed_repeats=2)


def test_profile_of_a_fake_server_recovers_its_law(tmp_path):
    with FakeServer() as url:
        info = discover(url)
        assert info.kind == "unknown" and info.context_pad == 1
        table = run_url_profile(url, tmp_path / "p.csv", grid=GRID, vocab_size=512, preset="tiny", max_batch=4,
                                echo=lambda *_: None)
    df, meta = read_profile(tmp_path / "p.csv")
    assert meta["shapes"] == "server context_pad=1" and meta["preset"] == "tiny"
    assert set(table["kind"]) == {"prefill", "decode", "mixed"}
    law = CalibratedCostModel.from_profile(tmp_path / "p.csv", check_model=False)
    # Loose: a probe that timed the wrong thing would be off by a factor.
    for b in (1, 2, 4):
        assert law.step_seconds(StepShape.decode(b, 20)) == pytest.approx(step_seconds(b, 0, 0), rel=0.35)
    assert law.step_seconds(StepShape.prefill(1024)) == pytest.approx(step_seconds(0, 1, 1024), rel=0.35)
    o = profile_overhead_s(tmp_path / "p.csv")
    assert 0.0 <= o <= 5 * OVERHEAD_S + 0.02


def test_validate_against_a_fake_server(tmp_path):
    cfg = tmp_path / "fake_closed.toml"
    cfg.write_text(EXP)
    with FakeServer() as url:
        run_url_profile(url, tmp_path / "p.csv", grid=GRID, vocab_size=512, preset="tiny", max_batch=4,
                        echo=lambda *_: None)
        errors = run_url_validate([cfg], url, tmp_path / "v", tmp_path / "p.csv", echo=lambda *_: None,
                                  metrics_poll_s=0.1)
    assert set(errors["cell"]) == {"fake_closed:fake@c=1", "fake_closed:fake@c=3"}
    out = errors.set_index(["cell", "metric"])["error_pct"]
    for cell in ("fake_closed:fake@c=1", "fake_closed:fake@c=3"):
        assert math.isfinite(out[(cell, "output_throughput")]) and abs(out[(cell, "output_throughput")]) < 50
    for name in ("errors.csv", "error_summary.csv", "server_checks.csv", "fidelity.png", "cells.json"):
        assert (tmp_path / "v" / name).exists()
    assert (tmp_path / "v" / "fake_closed" / "bench" / "server_metrics.csv").exists()
    _ = DECODE_S, PER_SEQ_S, PER_TOKEN_S  # the law's constants, for readers of the fake server
    # --sim-only, the server gone: the same measurements judged again give the same errors (same seed, same law)
    again = run_url_validate([cfg], "http://127.0.0.1:9/v1", tmp_path / "v", tmp_path / "p.csv",
                             echo=lambda *_: None, bench=False)
    pd.testing.assert_frame_equal(again, errors)
    reseeded = tmp_path / "reseeded" / "fake_closed.toml"  # the same name, other seeds: not what was measured
    reseeded.parent.mkdir()
    reseeded.write_text(EXP.replace("seed = 3", "seed = 4"))
    with pytest.raises(ConfigError, match="not the measured ones"):
        run_url_validate([reseeded], "http://127.0.0.1:9/v1", tmp_path / "v", tmp_path / "p.csv",
                         echo=lambda *_: None, bench=False)
    with pytest.raises(ConfigError, match="no measured cells"):
        run_url_validate([cfg], "http://127.0.0.1:9/v1", tmp_path / "empty", tmp_path / "p.csv",
                         echo=lambda *_: None, bench=False)


def test_server_checks_put_the_servers_figures_beside_the_simulated_ones(tmp_path):
    import json

    from sim.lab.url_validate import server_checks

    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "summary.json").write_text(json.dumps([{
        "cell": "llamacpp@c=4", "engine": "llamacpp", "concurrency": 4, "request_rate": None,
        "server_llamacpp:n_decode_total": 200.0, "server_llamacpp:busy_slots_per_decode": 3.5,
        "server_llamacpp:requests_deferred_mean": 0.0}]))
    checks = server_checks(bench, {"llamacpp@c=4": {"steps": 210, "busy_per_step": 3.5, "waiting_mean": 0.0}},
                           "llama.cpp")
    got = checks.set_index("check")
    assert got.loc["llama_decode calls (steps)", "diff_pct"] == pytest.approx(5.0)
    assert got.loc["busy slots per decode", "diff_pct"] == 0.0
    assert got.loc["deferred requests, time mean", "diff_pct"] == 0.0  # both zero
    assert "busy slots, time mean" not in got.index  # the server did not report it: no row
