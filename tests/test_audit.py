"""The physical audit: roofline arithmetic on the Llama-3.1-8B FP16 / H100 example, and `servesim audit`."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from reference.config import get_preset
from sim.lab.claims import parse_claims
from sim.lab.audit import (Physics, audit_experiment, bound_for, fmt_num, format_audit, mean_lengths, min_lengths,
                           model_label, queueing_checks)
from sim.lab.cli import main
from sim.lab.experiment import load_experiment
from sim.core.hardware import get_hardware

ROOT = Path(__file__).resolve().parents[1]
CLAIMS_A = ROOT / "experiments" / "claims_a_h100_llama8b.toml"
CLAIMS_B = ROOT / "experiments" / "claims_b_blackwell_70b.toml"
CLAIMS_E = ROOT / "experiments" / "claims_e_vllm054_a100.toml"


@pytest.fixture
def h100_8b_fp16():
    return Physics(get_preset("llama-3.1-8b"), get_hardware("h100-sxm"), "fp16", "fp16")


def test_single_stream_bound_is_bandwidth_over_bytes_per_token(h100_8b_fp16):
    ph = h100_8b_fp16
    assert ph.weight_bytes == pytest.approx(16.06e9, rel=1e-3)
    assert ph.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2  # 128 KiB
    b = ph.output_throughput_bound(1, prompt=100, output=200)
    kv = (100 + 201 / 2) * ph.kv_bytes_per_token
    assert b.value == pytest.approx(3.35e12 / (16.06e9 + kv), rel=1e-3)
    assert b.value == pytest.approx(209, rel=0.005)  # 3.35 TB/s / 16.06 GB, and a little KV
    assert b.kind == "upper" and b.binding == "memory"
    assert "3.35 TB/s / 16.09 GB" in b.arithmetic and "16.06 GB weights" in b.arithmetic
    assert "= 208 tok/s" in b.arithmetic


def test_published_510_is_flagged_with_its_factor(h100_8b_fp16):
    b = h100_8b_fp16.output_throughput_bound(1, 100, 200)
    assert b.violated_by(510.0) and not b.violated_by(200.0)
    text = b.describe(510.0)
    assert "is 2.4x above it: physically implausible" in text
    assert "is 96% of the bound" in b.describe(200.0)


def test_batched_bound_grows_with_streams_until_compute(h100_8b_fp16):
    ph = h100_8b_fp16
    b1, b32 = ph.output_throughput_bound(1, 100, 200), ph.output_throughput_bound(32, 100, 200)
    assert 25 < b32.value / b1.value < 32  # weights shared, KV not
    huge = ph.output_throughput_bound(100_000, 100, 200)
    assert huge.binding == "compute"
    # 989.4 TFLOP/s over ~2 x 7 B matmul params x (100 + 200) / 200 per output token
    assert huge.value == pytest.approx(989.4e12 / ph.request_flops(100, 200) * 200, rel=1e-9)


def test_latency_bounds(h100_8b_fp16):
    ph = h100_8b_fp16
    t = ph.ttft_bound_s(100)
    assert t.kind == "lower" and t.value == pytest.approx(16.06e9 / 3.35e12, rel=1e-3)  # 4.79 ms: one weight read
    long = ph.ttft_bound_s(100_000)
    assert long.binding == "compute" and long.value > 1.0
    assert ph.step_bound_s().value == pytest.approx(t.value)
    assert t.violated_by(0.004) and not t.violated_by(0.028)


def test_quantised_weights_raise_the_bound():
    q4 = Physics(get_preset("llama-3.1-8b"), get_hardware("h100-sxm"), "gguf-q4_k_m", "fp16")
    assert q4.weight_bytes == pytest.approx(8.03e9 * 4.85 / 8, rel=0.01)
    assert q4.output_throughput_bound(1, 100, 200).value == pytest.approx(684, rel=0.01)


def test_bound_for_figures_of_claims_a():
    exp = load_experiment(CLAIMS_A)
    assert mean_lengths(exp) == (100.0, 200.0)
    thr = bound_for(exp, "output_throughput", "vllm", concurrency=1)
    assert thr.value == pytest.approx(208, rel=0.01)
    total = bound_for(exp, "total_token_throughput", "vllm", concurrency=1)
    assert total.value == pytest.approx(thr.value * 1.5)
    ttft = bound_for(exp, "mean_ttft_ms", "vllm", concurrency=1)
    assert ttft.unit == "ms" and ttft.value == pytest.approx(4.79, rel=0.01)
    assert bound_for(exp, "p99_itl_ms", "ollama", 1).value == pytest.approx(4.87e9 / 3.35e12 * 1e3, rel=0.01)
    assert bound_for(exp, "vram_allocated_gb", "vllm").value == pytest.approx(16.06, rel=1e-3)
    assert bound_for(exp, "success_rate_pct", "vllm", 1) is None


def test_audit_of_claims_a_flags_the_510_and_the_flag_the_article_contradicts():
    exp = load_experiment(CLAIMS_A)
    rows = audit_experiment(exp, parse_claims(exp).figures)
    assert [r.id for r in rows if r.implausible] == ["A.2", "A.17"]
    a17 = next(r for r in rows if r.id == "A.17")
    assert a17.bound.binding == "config" and a17.bound.value == 256  # --max-num-seqs 256, not memory
    text = format_audit(exp, rows)
    assert "[IMPLAUSIBLE] A.2" in text and "2.4x above" in text
    assert "[BEYOND CONFIG] A.17" in text and "contradicts the engine's stated configuration" in text


def test_audit_command_prints_the_arithmetic():
    r = CliRunner().invoke(main, ["audit", str(CLAIMS_A)])
    assert r.exit_code == 0, r.output
    assert "a single Llama-3.1-8B FP16 stream cannot exceed 3.35 TB/s / 16.09 GB" in r.output
    assert "1 of 16 figures exceed their physical limit" in r.output
    assert "A.17 exceeds a limit the engine's own flags set" in r.output
    assert "2 of 6 break the queueing bound" in r.output


# ---------------------------------------------------------------------------------------
# Queueing bounds

CLOSED = """
model = "llama-3.1-8b"
[workload]
kind = "closed_loop"
clients = [1, 8, 32]
requests_per_client = 2
think_time_s = {think}
[workload.prompt_tokens]
dist = "fixed"
value = 100
[workload.output_tokens]
dist = "fixed"
value = 200
[engines.vllm]
scheduler = "continuous"
max_model_len = 4096
[hardware]
preset = "h100-sxm"
"""


def test_littles_law_bounds_the_mean_e2e_of_n_closed_loop_clients():
    """X = N / (E2E + Z) <= R_N / out  =>  mean E2E >= N x out / R_N - Z, R_N the roofline bound at N streams."""
    exp = load_experiment(CLOSED.format(think=0.0))
    ph = Physics(get_preset("llama-3.1-8b"), get_hardware("h100-sxm"), "fp16", "fp16")
    for n in (8, 32):
        r_n = ph.output_throughput_bound(n, 100, 200).value
        b = bound_for(exp, "mean_e2el_ms", "vllm", concurrency=n)
        assert b.binding == "queueing" and b.kind == "lower"
        assert b.value == pytest.approx(n * 200 / r_n * 1e3, rel=1e-9)
        assert "Little's law" in b.arithmetic
    # one client: about the per-request bound (TTFT + 199 decode steps, each a read of the weights)
    one = bound_for(exp, "mean_e2el_ms", "vllm", concurrency=1).value
    assert one == pytest.approx(200 * ph.weight_bytes / 3.35e12 * 1e3, rel=0.01)
    # think time is subtracted; a percentile is not bounded by a mean law
    thinking = load_experiment(CLOSED.format(think=0.02))
    assert bound_for(thinking, "mean_e2el_ms", "vllm", concurrency=32).value == pytest.approx(
        bound_for(exp, "mean_e2el_ms", "vllm", concurrency=32).value - 20, rel=1e-9)
    assert bound_for(exp, "p99_e2el_ms", "vllm", concurrency=32).binding == "memory"


def test_queueing_checks_flag_figures_below_the_articles_own_single_user_figure():
    """A.3/A.5: 8 and 32 clients get 310 / 320 tok/s from a server that gives one client 420 (X_N >= X_1 at Z = 0)."""
    exp = load_experiment(CLAIMS_A)
    checks = {q.id: q for q in queueing_checks(exp, parse_claims(exp).figures)}
    assert {k for k, q in checks.items() if q.violated} == {"A.3", "A.5"}
    assert checks["A.3"].ref == "A.1" and checks["A.3"].kind == "lower"
    assert checks["A.3"].value == pytest.approx(420.0)  # 8 x 200 / (8 x 200 / 420)
    assert not checks["A.4"].violated and not checks["A.9"].violated  # 290 ms <= 32 x 0.476 s


def test_queueing_checks_flag_45_seconds_for_10_users_of_a_2_second_server():
    exp = load_experiment(CLAIMS_B)
    (q,) = [q for q in queueing_checks(exp, parse_claims(exp).figures) if q.id == "B.9"]
    assert q.ref == "B.8" and q.kind == "upper" and q.value == pytest.approx(20_000) and q.violated


def test_percentiles_are_bounded_at_the_shortest_request():
    """A median E2E of requests of varying length can sit below the mean-length request's bound."""
    exp = load_experiment(CLAIMS_E)
    p_mean, o_mean = mean_lengths(exp)
    p_min, o_min = min_lengths(exp)
    assert (p_mean, o_mean) == pytest.approx((65578 / 320, 65374 / 320))  # the trace rows replayed
    assert o_min < o_mean
    median = bound_for(exp, "median_e2el_ms", "vllm")
    mean = bound_for(exp, "mean_e2el_ms", "vllm")
    assert median.value < mean.value


def test_formatting_helpers():
    assert model_label("llama-3.1-8b") == "Llama-3.1-8B" and model_label("llama-2-13b") == "Llama-2-13B"
    assert fmt_num(1450.0) == "1,450" and fmt_num(35.0) == "35" and fmt_num(2.86) == "2.86" and fmt_num(0.0312) == "0.0312"
