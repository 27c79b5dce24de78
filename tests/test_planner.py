"""The capacity planner: plan files (declared, validated with key paths), its statistics, and its answer on
cases with a closed-form answer (a single slot: closed-loop users whose E2E is N x service, and Poisson
arrivals whose sojourn time is M/M/1's)."""
from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.batch import StepShape
from reference.errors import ConfigError
from sim.lab.cli import main
from sim.lab.executors import ProcessExecutor, SerialExecutor
from sim.lab.plan_config import load_plan, plan_json_schema
from sim.lab.plan_report import capacity_rows, probe_rows
from sim.lab.planner import run_plan, usd_per_mtok
from sim.lab.slo_stats import (binom_pmf, fraction_lower_bound, quantile_estimate, quantile_rank,
                               quantile_upper_bound)

# One slot (Ollama, OLLAMA_NUM_PARALLEL=1), 4-token prompts, 10-token outputs, a 10 ms step (the roofline's
# fixed step overhead dwarfs the tiny model's compute): each request takes D = 10 steps ~ 100 ms, and N
# closed-loop users without think time queue behind each other, so every request's E2E is N x D once the
# first round is through (the first round's are 1..N x D). p95 E2E <= 1050 ms holds for N <= floor(1050 / D) = 10.
ONE_SLOT = """
name = "one_slot"
model = "tiny"

[load]
kind = "users"
target = 25
max = 40
curve = [10, 25]

[workload]
prompt_tokens = {dist = "fixed", value = 4}
output_tokens = {dist = "fixed", value = 10}

[slo]
p95_e2el_ms = 1050

[hardware]
presets = ["rtx-4090"]

[engines.ollama]
scheduler = "sequential"
num_parallel = 1
num_ctx = 64

[cost_model]
kind = "roofline"
step_overhead_s = 0.01

[prices]
"rtx-4090" = 1.0
"""


def _service_seconds(plan) -> float:
    """D: one request alone on the slot (a 4-token prefill that emits the first token, then 9 decodes), from the cost model."""
    exp = plan.candidates()[0].experiment(1, 1)
    cost = exp.cost_model_for(exp.engines[0])
    d = cost.step_seconds(StepShape(prefill_tokens=4, prefill_seqs=1, kv_read_tokens=4, attn_q_ctx=10,
                                    prefill_max_context=4))
    for c in range(5, 14):
        d += cost.step_seconds(StepShape(decode_seqs=1, kv_read_tokens=c, attn_q_ctx=c, decode_max_context=c))
    return d


def test_single_slot_capacity_is_the_closed_form_and_replicas_serve_the_target(tmp_path):
    plan = load_plan(ONE_SLOT)
    d = _service_seconds(plan)
    assert 0.1 <= d < 0.101  # the step overhead dominates
    out = tmp_path / "plan"
    r = CliRunner().invoke(main, ["plan", "--quiet", "--workers", "1", "--out", str(out)]
                           + [_write(tmp_path, ONE_SLOT)])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(out / "capacity.csv")))
    assert rows[0]["capacity_per_unit"] == f"{math.floor(1.050 / d)} users (misses at 11)" == "10 users (misses at 11)"
    # 25 users need at least ceil(25 / 10) = 3 replicas; round robin keeps each at ~8 users, inside the SLO.
    assert rows[0]["target_replicas"] == "3" and rows[0]["target_gpus"] == "3"
    assert float(rows[0]["target_usd_per_hour"]) == 3.0
    # Three slots always busy: 3 x 10 tokens per D; the run's last requests leave some slots idle for a moment.
    tok_s = float(rows[0]["target_output_tok_s"])
    assert tok_s == pytest.approx(3 * 10 / d, rel=0.03)
    assert float(rows[0]["target_usd_per_mtok"]) == pytest.approx(3.0 / (tok_s * 3600) * 1e6, rel=1e-5)
    probes = list(csv.DictReader(open(out / "probes.csv")))
    at = {int(float(p["load"])): p for p in probes if p["replicas"] == "1"}
    assert float(at[10]["p95_e2el_ms"]) == pytest.approx(10 * d * 1e3, rel=1e-6)  # N x D exactly
    assert at[10]["meets"] == "True" and at[11]["meets"] == "False"  # the bisection found the edge
    for name in ("plan.md", "cost_vs_load.png", "curve.csv", "plan.toml", "probe_cache.jsonl"):
        assert (out / name).exists()
    assert "10 users" in (out / "plan.md").read_text()


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "plan.toml"
    path.write_text(text)
    return str(path)


def test_probes_are_the_same_on_any_executor_and_reused_from_the_cache(tmp_path):
    plan = load_plan(ONE_SLOT.replace("curve = [10, 25]", "curve = [10]").replace("target = 25", "target = 10"))
    serial = run_plan(plan, tmp_path, executor=SerialExecutor(), progress=False)
    with ProcessExecutor(2) as pool:
        pooled = run_plan(plan, None, executor=pool, progress=False)
    assert probe_rows(serial) == probe_rows(pooled)
    assert capacity_rows(serial) == capacity_rows(pooled)

    class _Refuses(SerialExecutor):
        def map_unordered(self, fn, tasks):
            raise AssertionError(f"{len(tasks)} probes simulated again")

    again = run_plan(plan, tmp_path, executor=_Refuses(), progress=False)  # every probe from the cache
    assert probe_rows(again) == probe_rows(serial)


def test_poisson_single_slot_capacity_matches_mm1():
    """Poisson arrivals on one slot with near-exponential service (geometric output lengths, mean 20 steps of
    ~5 ms): M/M/1's sojourn time is exponential with rate mu - lambda, so p95 E2E <= X holds up to
    lambda* = mu - ln(20) / X. X is chosen for lambda* = mu / 2.

    Tolerance 15%: the finite run (2000 requests, one seed) moves the p95 by a few percent, the service is
    geometric x 5 ms rather than exponential (squared CV 0.95), and the sensitivity d ln(lambda) / d ln(p95)
    at rho = 1/2 is 1. Judging p50 or p99 instead would land at 1.7x or 0.5x lambda*."""
    p, step = 0.05, 0.005
    values = list(range(1, 201))
    weights = [p * (1 - p) ** (k - 1) for k in values]
    mean_k = sum(k * w for k, w in zip(values, weights)) / sum(weights)
    plan_text = f"""
name = "mm1"
model = "tiny"
[load]
kind = "rate"
target = 2.0
min = 2.0
max = 9.0
curve = [2.0]
[workload]
prompt_tokens = {{dist = "fixed", value = 4}}
output_tokens = {{dist = "empirical", values = {values}, weights = {weights}}}
[slo]
p95_e2el_ms = {{x}}
[hardware]
presets = ["h100-sxm"]
[engines.ollama]
scheduler = "sequential"
num_ctx = 512
max_queue = 0
[cost_model]
kind = "roofline"
step_overhead_s = {step}
[prices]
"h100-sxm" = 1.0
[search]
min_requests = 2000
duration_s = 1.0
confidence = 0.5
"""
    plan = load_plan(plan_text.replace("{x}", "1"))
    exp = plan.candidates()[0].experiment(2.0, 1)
    delta = exp.cost_model_for(exp.engines[0]).step_seconds(StepShape(decode_seqs=1, kv_read_tokens=30,
                                                                       attn_q_ctx=30, decode_max_context=30))
    mu = 1.0 / (mean_k * delta)
    x_s = math.log(20) / (mu / 2)
    lam_star = mu - math.log(20) / x_s
    plan = load_plan(plan_text.replace("{x}", f"{x_s * 1e3:.6f}"))
    result = run_plan(plan, None, executor=SerialExecutor(), progress=False).results[0]
    assert result.capacity == pytest.approx(lam_star, rel=0.15)
    assert result.first_failure / result.capacity <= 1 + plan.search.rate_tolerance


# ---------------------------------------------------------------------------------------------
# Statistics


def test_quantile_rank_is_the_binomial_order_statistic():
    # P(Bin(100, 1/2) <= 58) = 0.9557 >= 0.95 > P(<= 57) = 0.9334: the 59th smallest bounds the median.
    assert quantile_rank(100, 0.5, 0.95) == 59
    assert quantile_rank(10, 0.95, 0.95) is None  # too few values for a p95 bound at 95%
    assert quantile_upper_bound(np.arange(10.0), 0.95, 0.95) == math.inf


def test_fraction_bound_closed_form():
    # All n good: P(X >= n | p) = p^n = 1 - confidence, so the bound is (1 - confidence)^(1/n).
    assert fraction_lower_bound(10, 10, 0.95) == pytest.approx(0.05 ** 0.1, rel=1e-9)
    assert fraction_lower_bound(0, 10, 0.95) == 0.0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1e6), min_size=1, max_size=200), st.sampled_from([0.5, 0.95, 0.99]))
def test_quantile_estimate_is_numpys_percentile(values, q):
    assert quantile_estimate(np.array(values), q) == pytest.approx(float(np.percentile(values, q * 100)), rel=1e-12,
                                                                  abs=1e-9)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 400), st.floats(0.01, 0.99))
def test_binomial_pmf_sums_to_one(n, p):
    assert binom_pmf(n, p).sum() == pytest.approx(1.0, abs=1e-9)


def test_upper_bound_covers_the_true_quantile():
    """The bound is >= the true p95 in at least 95% of independent runs (exponential draws, n = 200)."""
    rng = np.random.default_rng(0)
    true_p95 = math.log(20)
    hits = sum(quantile_upper_bound(rng.exponential(size=200), 0.95, 0.95) >= true_p95 for _ in range(2000))
    assert hits / 2000 >= 0.94  # exact >= 0.95 for continuous draws; 2000 trials: one standard error ~0.5%
    failed = np.concatenate([rng.exponential(size=190), [math.inf] * 10])
    assert quantile_upper_bound(failed, 0.95, 0.95) == math.inf  # 5% failed requests: p95 unbounded


def test_cost_per_million_tokens():
    assert usd_per_mtok(3.6, 1000.0) == pytest.approx(1.0)  # $3.60/h at 1000 tok/s = 3.6M tok/h
    assert usd_per_mtok(1.0, 0.0) == math.inf


# ---------------------------------------------------------------------------------------------
# Plan files


@pytest.mark.parametrize("edit, field, words", [
    (("target = 25", "target = 50"), "load.target", "above max"),
    (("target = 25", "target = 2.5"), "load.target", "whole"),
    (("p95_e2el_ms = 1050", "p97_e2el_ms = 1050"), "slo.p97_e2el_ms", "p95_e2el_ms"),
    (("p95_e2el_ms = 1050", ""), "slo", "p95_e2el_ms"),
    (("num_parallel = 1", "num_parallel = [1, 0]"), "engines.ollama.num_parallel", "ollama num_parallel=0"),
    (('presets = ["rtx-4090"]', 'presets = ["rtx-9090"]'), "hardware.presets[0]", "h100-sxm"),
    (('"rtx-4090" = 1.0', '"rtx-9090" = 1.0'), "prices.rtx-9090", "rtx-4090"),
    (("step_overhead_s = 0.01", "step_overhead_s = -1"), "cost_model.step_overhead_s", ">= 0"),
])
def test_bad_plans_name_the_key(edit, field, words):
    with pytest.raises(ConfigError) as e:
        load_plan(ONE_SLOT.replace(*edit))
    assert e.value.field == field
    assert words in str(e.value)


def test_listed_engine_keys_are_candidates_and_overrides_apply():
    plan = load_plan(ONE_SLOT.replace("num_parallel = 1", "num_parallel = [1, 2]\npresets = [\"rtx-4090\", \"h100-sxm\"]"),
                     ["load.target=20", 'prices.h100-sxm=2.5'])
    assert [c.label for c in plan.candidates()] == [
        "ollama num_parallel=1 on rtx-4090", "ollama num_parallel=1 on h100-sxm",
        "ollama num_parallel=2 on rtx-4090", "ollama num_parallel=2 on h100-sxm"]
    assert plan.load.target == 20 and plan.prices["h100-sxm"] == 2.5
    assert load_plan(plan.to_toml()) == plan


def test_a_candidate_that_does_not_fit_is_reported_not_raised():
    text = ONE_SLOT.replace('model = "tiny"', 'model = "llama-3.1-70b"').replace(
        'num_ctx = 64', 'num_ctx = 64\nweights = "fp16"')
    result = run_plan(load_plan(text), None, executor=SerialExecutor(), progress=False)
    (r,) = result.results
    assert r.unfit and "GB" in r.unfit and result.best() is None
    assert capacity_rows(result)[0]["capacity_per_unit"] == "does not fit"


def test_a_device_without_a_price_is_refused():
    with pytest.raises(ConfigError) as e:
        run_plan(load_plan(ONE_SLOT.replace('presets = ["rtx-4090"]', 'presets = ["rtx-3090"]')), None,
                 executor=SerialExecutor(), progress=False)
    assert e.value.field == "prices.rtx-3090"


def test_plan_schema_lists_the_tables_and_engine_choices():
    schema = plan_json_schema()
    assert {"load", "workload", "slo", "hardware", "engines", "prices", "search"} <= set(schema["properties"])
    seq = schema["$defs"]["PlanSequentialEngine"]["properties"]
    assert any(alt.get("type") == "array" for alt in seq["num_parallel"]["anyOf"])
    r = CliRunner().invoke(main, ["plan", "--schema"])
    assert r.exit_code == 0 and '"PlanContinuousEngine"' in r.output
