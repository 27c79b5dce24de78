"""Runtime laws (sim.runtimes) and RuntimeCostModel: reproducible fit, physical monotonicity, errors that name the field.

Accuracy against the measured rows is NOT asserted here: it is a measurement, printed by
`servesim measured` (and written up in experiments/measured/README.md).
"""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.config import get_preset
from reference.errors import ConfigError
from reference.batch import StepShape
from sim.core import runtimes as R
from sim.core.costmodel import BREAKDOWN_KEYS
from sim.core.hardware import HARDWARE, get_hardware
from sim.core.runtime_costmodel import RuntimeCostModel, make_runtime_cost_model
from sim.lab import measured as M
from sim.lab.commands.measured import command as measured_command
from sim.lab.experiment import load_experiment

M8 = get_preset("llama-3.1-8b")
M70 = get_preset("llama-3.1-70b")
GPU_PRESETS = [n for n, h in HARDWARE.items() if h.sm_count > 0]
LLAMACPP_FORMATS = ["gguf-q4_0", "gguf-q4_k_m", "gguf-q8_0", "fp16"]


@pytest.fixture(scope="module")
def rows():
    return M.load_rows()


@pytest.fixture(scope="module")
def fit():
    return R.load_fit()


# ---------------------------------------------------------------------------- data and fit


def test_rows_and_roles(rows):
    by = {}
    for r in rows:
        by.setdefault((r.runtime, r.role), []).append(r)
    assert len(by["llama.cpp", "fit"]) == 104  # the XiongjieDai table: 5 cards
    assert len(by["llama.cpp", "holdout"]) == 13  # llama.cpp PR rows: other builds, a card not fitted
    assert len(by["vllm", "fit"]) == 2  # LL-A100-10 median TPOT and TTFT
    assert len(by["vllm", "sim"]) == 5  # serving runs left to the simulator
    assert {r.hardware for r in by["llama.cpp", "fit"]} == {"rtx-3090", "rtx-4090", "rtx-a6000", "a100-pcie-80gb",
                                                           "h100-pcie"}
    for r in rows:
        assert r.source_url.startswith("https://") and r.precision in ("A", "B", "C"), r.row_id
        assert r.measured > 0


def test_fit_is_reproducible_and_matches_the_stored_file(rows, fit):
    a = M.fit_all(rows)
    b = M.fit_all(rows)
    assert a == b  # deterministic: same data -> same parameters
    for rt in R.RUNTIMES:
        for name, value in a[rt].items():
            assert value == pytest.approx(fit[rt][name], rel=1e-6), (rt, name)


def test_stored_file_documents_every_parameter():
    doc = json.loads(R.FIT_PATH.read_text())
    assert doc["generated_by"] == R.FIT_COMMAND
    for rt, specs in R.PARAM_SPECS.items():
        assert set(doc[rt]["params"]) == set(doc[rt]["units"]) == set(doc[rt]["meaning"]) == {n for n, _, _ in specs}
        assert doc[rt]["fit_rows"]


def test_vllm_fit_reproduces_its_pinning_rows_exactly(rows, fit):
    # three equations, three unknowns: these rows are fitted, not reproduced
    for r in rows:
        if r.runtime == "vllm" and r.role == "fit":
            assert M.predict_row(r, fit) == pytest.approx(r.measured, rel=1e-6)
    host = fit["vllm"]["host_step_s"] + M.VLLM_BLOG_BATCH * fit["vllm"]["host_seq_s"]
    assert host == pytest.approx(M.VLLM_BLOG_HOST_OVER_GPU * M.vllm_blog_gpu_seconds(fit["vllm"]), rel=1e-6)


def test_every_prediction_is_positive_and_finite(rows, fit):
    for res in M.evaluate(fit, rows):
        if res["role"] == "sim":
            assert res["predicted"] is None
        else:
            assert res["predicted"] > 0 and math.isfinite(res["predicted"]), res["row_id"]


def test_leave_one_gpu_out_covers_every_fit_row(rows):
    logo = M.leave_one_gpu_out(rows)
    assert sorted(x["row_id"] for x in logo) == sorted(r.row_id for r in rows
                                                      if r.role == "fit" and r.runtime == "llama.cpp")
    assert all(x["predicted"] > 0 for x in logo)


def test_summarize_medians():
    res = [{"g": "a", "error": e} for e in (0.1, -0.3, 0.2)] + [{"g": "b", "error": None}]
    (s,) = M.summarize(res, by=("g",))
    assert s == {"g": "a", "rows": 3, "median_abs_error": 0.2, "max_abs_error": 0.3}


# ---------------------------------------------------------------------------- the cost model


@pytest.mark.parametrize("runtime, fmt", [("llama.cpp", "gguf-q4_k_m"), ("vllm", "fp16")])
def test_cost_model_agrees_with_itself(runtime, fmt, fit):
    cm = make_runtime_cost_model(M8, "h100-sxm", runtime, fmt, fit=fit)
    assert isinstance(cm, RuntimeCostModel)
    for s in (StepShape.decode(1, 200), StepShape.decode(16, 1000), StepShape.prefill(700, 300),
              StepShape.prefill(2048) + StepShape.decode(3, 50)):
        c = cm.step_time(s)
        assert set(c.breakdown) == set(BREAKDOWN_KEYS)
        assert c.total_s == pytest.approx(cm.step_seconds(s)) and c.total_s > 0
        assert c.bytes_moved > 0 and c.flops > 0 and c.bound
    empty = cm.step_time(StepShape())
    assert empty.total_s == 0.0 and cm.step_seconds(StepShape()) == 0.0
    d = cm.describe()
    assert d["kind"] == "runtime" and d["runtime"] == runtime and d["params"] == fit[runtime]


def test_llamacpp_micro_batches_reread_the_weights(fit):
    one = make_runtime_cost_model(M8, "rtx-4090", "llama.cpp", "gguf-q4_k_m", ubatch=2048, fit=fit)
    four = make_runtime_cost_model(M8, "rtx-4090", "llama.cpp", "gguf-q4_k_m", ubatch=512, fit=fit)
    s = StepShape.prefill(2048)
    assert four.law.micro_batches(2048) == (4, 4)
    assert four.law.micro_batches(520) == (2, 1)  # the 8-token remainder runs without dequantising
    extra = 3 * (four.law.o_step + four.law.m_step + four.law.m_dequant)
    assert four.step_seconds(s) == pytest.approx(one.step_seconds(s) + extra)


def test_llamacpp_dequantises_only_above_the_mmq_batch(fit):
    cm = make_runtime_cost_model(M8, "rtx-4090", "llama.cpp", "gguf-q4_k_m", fit=fit)
    t32, t33 = cm.step_seconds(StepShape.prefill(32)), cm.step_seconds(StepShape.prefill(33))
    assert t33 - t32 >= cm.law.m_dequant > 0
    fp16 = make_runtime_cost_model(M8, "rtx-4090", "llama.cpp", "fp16", fit=fit)
    assert fp16.law.m_dequant == 0.0


RUNTIME_EXP = """
model = "llama-3.1-8b"
[workload]
kind = "closed_loop"
clients = 1
requests_per_client = 1
[workload.prompt_tokens]
dist = "fixed"
value = 100
[workload.output_tokens]
dist = "fixed"
value = 100
[engines.ollama]
scheduler = "sequential"
[engines.vllm]
scheduler = "continuous"
max_model_len = 8192
[hardware]
preset = "h100-sxm"
"""


def test_an_engine_kind_says_which_runtime_runs_it():
    """Ollama's slots run on llama.cpp, vLLM on vLLM; a runtime cost model prices each with its own law."""
    exp = load_experiment(RUNTIME_EXP + '[cost_model]\nkind = "runtime"\n')
    ollama, vllm = exp.engine("ollama"), exp.engine("vllm")
    assert (ollama.runtime, vllm.runtime) == ("llama.cpp", "vllm")
    for e in (ollama, vllm):
        cm = exp.cost_model_for(e)
        assert isinstance(cm, RuntimeCostModel) and cm.runtime == e.runtime and cm.describe()["kind"] == "runtime"
    assert exp.cost_model_for(ollama).ubatch == ollama.n_ubatch
    swapped = load_experiment(RUNTIME_EXP.replace('scheduler = "sequential"', 'scheduler = "sequential"\nruntime = "vllm"')
                              + '[cost_model]\nkind = "runtime"\n')
    assert exp.cost_model_for(swapped.engine("ollama")).step_seconds(StepShape.decode(1, 200)) != \
        exp.cost_model_for(ollama).step_seconds(StepShape.decode(1, 200))
    with pytest.raises(ConfigError) as e:
        load_experiment(RUNTIME_EXP.replace('scheduler = "continuous"', 'scheduler = "continuous"\nruntime = "tgi"'))
    assert e.value.field == "engines.vllm.runtime" and "llama.cpp" in e.value.allowed


# ---------------------------------------------------------------------------- errors name the field


def test_unknown_runtime_names_the_field(fit):
    with pytest.raises(ConfigError) as e:
        make_runtime_cost_model(M8, "h100-sxm", "tgi", "fp16", fit=fit)
    assert e.value.field == "runtime" and e.value.allowed == "llama.cpp, vllm"
    with pytest.raises(ConfigError) as e:
        RuntimeCostModel(M8, "h100-sxm", "ollama", fit=fit, field_prefix="engines.a.")
    assert e.value.field == "engines.a.runtime"


def test_unknown_hardware_names_the_field(fit):
    with pytest.raises(ConfigError) as e:
        make_runtime_cost_model(M8, "h100", "vllm", "fp16", fit=fit)
    assert e.value.field == "hardware" and "h100-sxm" in e.value.allowed


def test_llamacpp_needs_sm_details_and_gguf_or_16bit_weights(fit):
    with pytest.raises(ConfigError) as e:
        make_runtime_cost_model(M8, "cpu-generic", "llama.cpp", "gguf-q4_k_m", fit=fit)
    assert e.value.field == "hardware" and "rtx-4090" in e.value.allowed
    with pytest.raises(ConfigError) as e:
        make_runtime_cost_model(M8, "h100-sxm", "llama.cpp", "awq-int4", fit=fit)
    assert e.value.field == "weight_format" and "gguf-q4_k_m" in e.value.allowed
    with pytest.raises(ConfigError) as e:
        make_runtime_cost_model(M8, "h100-sxm", "llama.cpp", "gguf-q4_k_m", ubatch=0, fit=fit)
    assert e.value.field == "ubatch"
    with pytest.raises(ConfigError) as e:
        make_runtime_cost_model(M8, "rtx-4090", "vllm", "fp16", tp=3, fit=fit)
    assert e.value.field == "tp"


def test_missing_fit_file_names_the_regenerate_command(tmp_path):
    with pytest.raises(ConfigError) as e:
        R.load_fit(tmp_path / "none.json")
    assert e.value.field == "runtime_fit" and R.FIT_COMMAND in str(e.value)
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ConfigError) as e:
        R.load_fit(bad)
    assert e.value.field == "runtime_fit"


# ---------------------------------------------------------------------------- physics: monotone


shapes = st.one_of(
    st.builds(StepShape.decode, st.integers(1, 64), st.integers(1, 8192)),
    st.builds(StepShape.prefill, st.integers(1, 4096), st.integers(0, 4096), st.integers(1, 4)),
)


@settings(max_examples=150, deadline=None)
@given(runtime=st.sampled_from(R.RUNTIMES), hw=st.sampled_from(GPU_PRESETS), shape=shapes,
       more_ctx=st.integers(0, 4096), more_seqs=st.integers(0, 32))
def test_more_context_or_more_sequences_is_never_faster(runtime, hw, shape, more_ctx, more_seqs):
    fmt = "gguf-q4_k_m" if runtime == "llama.cpp" else "fp16"
    cm = make_runtime_cost_model(M8, hw, runtime, fmt, fit=R.load_fit())
    t = cm.step_seconds(shape)
    longer = dataclasses.replace(shape, kv_read_tokens=shape.kv_read_tokens + more_ctx,
                                 attn_q_ctx=shape.attn_q_ctx + more_ctx * max(1, shape.num_seqs))
    assert cm.step_seconds(longer) >= t
    assert cm.step_seconds(shape + StepShape.decode(more_seqs, 100) if more_seqs else shape) >= t


@settings(max_examples=100, deadline=None)
@given(hw=st.sampled_from(GPU_PRESETS), shape=shapes, kv=st.sampled_from(["q4_0", "q8_0", "fp16"]),
       model=st.sampled_from([M8, M70]))
def test_llamacpp_more_bytes_is_never_faster(hw, shape, kv, model):
    # every llama.cpp format shares the compute path, so the step time orders like the bytes moved
    fit = R.load_fit()
    costs = [make_runtime_cost_model(model, hw, "llama.cpp", f, kv_dtype=kv, fit=fit).step_time(shape)
             for f in LLAMACPP_FORMATS]
    for a in costs:
        for b in costs:
            if a.bytes_moved >= b.bytes_moved:
                assert a.total_s >= b.total_s * (1 - 1e-12)
    by_kv = [make_runtime_cost_model(model, hw, "llama.cpp", "gguf-q4_k_m", kv_dtype=k, fit=fit).step_seconds(shape)
             for k in ("q4_0", "q8_0", "fp16")]
    assert by_kv == sorted(by_kv)


@settings(max_examples=150, deadline=None)
@given(runtime=st.sampled_from(R.RUNTIMES), base=st.sampled_from(GPU_PRESETS), shape=shapes,
       bw=st.floats(1.0, 4.0), sms=st.floats(1.0, 2.0), clock=st.floats(1.0, 1.5), flops=st.floats(1.0, 4.0))
def test_a_faster_card_of_the_same_kind_is_never_slower(runtime, base, shape, bw, sms, clock, flops):
    h = get_hardware(base)
    faster = dataclasses.replace(
        h, name=h.name + "-faster", memory_bw=h.memory_bw * bw, sm_count=math.ceil(h.sm_count * sms),
        boost_clock_ghz=h.boost_clock_ghz * clock, fp16_flops=h.fp16_flops * flops, bf16_flops=h.bf16_flops * flops,
        fp8_flops=h.fp8_flops * flops, int8_ops=h.int8_ops * flops, fp4_flops=h.fp4_flops * flops,
        fp16_acc16_flops=h.fp16_acc16_flops * flops)  # same memory type and architecture
    fmt = "gguf-q4_k_m" if runtime == "llama.cpp" else "fp16"
    fit = R.load_fit()
    slow = make_runtime_cost_model(M8, h, runtime, fmt, fit=fit).step_seconds(shape)
    fast = make_runtime_cost_model(M8, faster, runtime, fmt, fit=fit).step_seconds(shape)
    assert fast <= slow * (1 + 1e-12)


@settings(max_examples=60, deadline=None)
@given(hw=st.sampled_from(GPU_PRESETS), n=st.integers(1, 4096))
def test_achieved_bandwidth_never_exceeds_the_datasheet(hw, n):
    p = R.load_fit()["llama.cpp"]
    h = get_hardware(hw)
    b = R.achieved_bandwidth(h, p["bw_bytes_per_sm_clock"], p["bw_sharpness"])
    assert 0 < b <= h.memory_bw
    assert b <= R.sm_bandwidth_cap(h, p["bw_bytes_per_sm_clock"])


# ---------------------------------------------------------------------------- presets and CLI


def test_gpu_presets_have_the_details_the_laws_need():
    for name in GPU_PRESETS:
        h = get_hardware(name)
        assert h.memory_type in ("HBM", "GDDR") and h.arch in ("ampere", "ada", "hopper", "blackwell"), name
        assert h.boost_clock_ghz > 0 and h.fp16_flops_acc16 >= h.fp16_flops > 0, name
    assert get_hardware("a100-sxm-80gb").memory_bw == get_hardware("a100-80gb").memory_bw
    assert get_hardware("rtx-3090").fp16_flops_acc16 == pytest.approx(2 * get_hardware("rtx-3090").fp16_flops,
                                                                      rel=0.01)


def test_measured_command_text_and_json():
    runner = CliRunner()
    out = runner.invoke(measured_command, [])
    assert out.exit_code == 0, out.output
    assert "leave-one-GPU-out" in out.output and "XD-409024GB-8BQ4_K_M-tg512" in out.output
    out = runner.invoke(measured_command, ["--runtime", "vllm", "--json"])
    assert out.exit_code == 0, out.output
    doc = json.loads(out.output)
    assert {r["runtime"] for r in doc["rows"]} == {"vllm"} and doc["leave_one_gpu_out"] == []
    out = runner.invoke(measured_command, ["--runtime", "tgi"])
    assert out.exit_code == 2 and "llama.cpp" in out.output
