"""Cost models: roofline against hand arithmetic, monotonicity, the calibrated fit, config errors, the CLI."""
from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.batch import ScheduledChunk, SchedulerOutput, StepShape
from reference.buckets import Padding
from reference.config import get_preset
from reference.errors import ConfigError
from reference.layout import PagedLayout
from reference.request import Request, SamplingParams
from sim.core.calibrated import FEATURES, CalibratedCostModel, features, nnls, shape_from_profile_row
from sim.core.hardware import get_hardware
from sim.core.roofline import RooflineCostModel
from sim.core.runtime_costmodel import make_runtime_cost_model
from sim.lab.commands.steptime import command as steptime_command
from sim.lab.experiment import load_experiment

LLAMA8 = get_preset("llama-3.1-8b")
LLAMA70 = get_preset("llama-3.1-70b")


def ideal(model=LLAMA8, hw="h100-sxm", **kw):
    """Roofline at 100% efficiency and no overhead: pure datasheet physics."""
    kw.setdefault("step_overhead_s", 0.0)
    return RooflineCostModel(model, hw, mem_efficiency=1.0, compute_efficiency=1.0, **kw)


# ---------------------------------------------------------------------------- StepShape


def brute_force_q_ctx(num_new, ctx_after):
    """Causal pairs counted one query at a time."""
    start = ctx_after - num_new
    return sum(start + i + 1 for i in range(num_new))


@given(st.lists(st.tuples(st.integers(1, 300), st.integers(0, 300)), max_size=8))
def test_from_chunks_matches_brute_force(chunks):
    pairs = [(n, n + cached) for n, cached in chunks]
    s = StepShape.from_chunks(pairs)
    assert s.kv_read_tokens == sum(c for _, c in pairs)
    assert s.attn_q_ctx == sum(brute_force_q_ctx(n, c) for n, c in pairs)
    assert s.new_tokens == sum(n for n, _ in pairs)
    assert s.decode_seqs == sum(1 for n, _ in pairs if n == 1)


def make_request(prompt_len, out_len=0):
    r = Request(f"r{prompt_len}-{out_len}", list(range(prompt_len)), SamplingParams(max_tokens=64))
    r.output_token_ids.extend([7] * out_len)
    return r


def test_from_scheduler_output():
    prefill_new = make_request(100)  # whole prompt in one chunk
    prefill_chunk = make_request(300)  # second chunk of a chunked prefill: tokens 256..299
    decode = make_request(50, out_len=10)  # decodes token 59 on top of 59 cached
    out = SchedulerOutput(chunks=[
        ScheduledChunk(prefill_new, start=0, num_tokens=100, slot=0),
        ScheduledChunk(prefill_chunk, start=256, num_tokens=44, slot=1),
        ScheduledChunk(decode, start=59, num_tokens=1, slot=2),
    ])
    s = out.shape
    assert s == StepShape.from_chunks([(100, 100), (44, 300), (1, 60)])
    assert s.prefill_tokens == 144 and s.decode_seqs == 1 and s.prefill_seqs == 2 and s.kind == "mixed"
    assert s.kv_read_tokens == 100 + 300 + 60
    assert SchedulerOutput().shape.is_empty and SchedulerOutput().shape.kind == "idle"
    cm = RooflineCostModel(LLAMA8, "h100-sxm")
    assert cm.step_seconds(out.shape) == cm.step_time(s).total_s > 0


def test_a_one_token_chunk_is_a_decode_wherever_it_comes_from():
    """The last token of a chunked prompt is computed like a decode, and priced like one."""
    last_prompt_token = ScheduledChunk(make_request(40), start=39, num_tokens=1, slot=0)
    output_token = ScheduledChunk(make_request(39, out_len=1), start=39, num_tokens=1, slot=1)
    assert last_prompt_token.is_decode and output_token.is_decode
    assert last_prompt_token.in_prompt and not output_token.in_prompt
    out = SchedulerOutput(chunks=[last_prompt_token, output_token])
    assert out.shape == StepShape.decode(2, 40) and out.shape.kind == "decode"
    assert StepShape.prefill(1, cached=39) == StepShape.decode(1, 40)


def test_shape_constructors():
    assert StepShape.decode(4, 100) == StepShape.from_chunks([(1, 100)] * 4)
    assert StepShape.prefill(64, cached=32, seqs=2) == StepShape.from_chunks([(64, 96)] * 2)
    assert (StepShape.decode(2, 10) + StepShape.prefill(5)).new_tokens == 7
    with pytest.raises(ConfigError) as e:
        StepShape.decode(-1, 10)
    assert e.value.field == "decode_seqs"
    with pytest.raises(ConfigError) as e:
        StepShape.prefill(10, cached=-5)
    assert e.value.field == "cached_context"
    with pytest.raises(ConfigError):
        StepShape.from_chunks([(5, 3)])


# ---------------------------------------------------------------------------- roofline vs hand arithmetic


def test_llama8b_fp16_batch1_decode_on_h100_is_weight_read():
    # 8.03e9 params x 2 bytes = 16.06 GB; / 3.35 TB/s = 4.79 ms
    cost = ideal().step_time(StepShape.decode(1, 1))
    assert LLAMA8.num_params * 2 == pytest.approx(16.06e9, rel=1e-3)
    assert cost.total_s == pytest.approx(16.06e9 / 3.35e12, rel=1e-3)
    assert cost.total_s == pytest.approx(4.79e-3, rel=2e-3)
    assert cost.bound == "memory"
    # defaults: 80% of the bandwidth, plus the H100's 0.5 ms step overhead
    real = RooflineCostModel(LLAMA8, "h100-sxm").step_time(StepShape.decode(1, 1))
    assert real.total_s == pytest.approx(16.06e9 / (3.35e12 * 0.8) + 0.5e-3, rel=2e-3)
    assert real.breakdown["overhead"] == 0.5e-3


def test_kv_read_arithmetic():
    # Llama-3.1-8B fp16 KV: 2 x 32 layers x 8 heads x 128 x 2 bytes = 128 KiB per token
    assert LLAMA8.kv_bytes_per_token(2) == 131072
    cm = ideal()
    s = StepShape.decode(16, 4096)
    cost = cm.step_time(s)
    kv_bytes = (16 * 4096 + 16) * 131072
    assert cost.breakdown["kv_reads"] == pytest.approx(kv_bytes / 3.35e12)
    assert cost.bytes_moved == pytest.approx(LLAMA8.weight_bytes(16) + kv_bytes)
    fp8 = ideal(kv_dtype="fp8").step_time(s)
    assert fp8.breakdown["kv_reads"] == pytest.approx(cost.breakdown["kv_reads"] / 2)


def test_large_prefill_is_compute_bound_and_matches_flop_count():
    tokens = 8192
    cost = ideal().step_time(StepShape.prefill(tokens))
    assert cost.bound == "compute"
    head = LLAMA8.embedding_params
    flops = (2 * (LLAMA8.matmul_params - head) * tokens + 2 * head
             + LLAMA8.attention_flops(1, tokens * (tokens + 1) // 2))
    assert cost.flops == pytest.approx(flops)
    assert cost.breakdown["compute"] == pytest.approx(flops / 989.4e12)
    assert cost.total_s == pytest.approx(cost.breakdown["compute"])
    # about 2 * params * tokens / peak: ~135 TFLOP at 989 TFLOP/s
    assert cost.total_s == pytest.approx(2 * LLAMA8.num_params * tokens / 989.4e12, rel=0.15)


def test_achieved_rates_never_exceed_peaks_by_construction():
    cm = ideal()
    h = get_hardware("h100-sxm")
    for s in [StepShape.decode(1, 10), StepShape.decode(256, 8000), StepShape.prefill(4096),
              StepShape.decode(64, 1000) + StepShape.prefill(512, 512)]:
        c = cm.step_time(s)
        assert c.achieved_bandwidth <= h.memory_bw * (1 + 1e-9)
        assert c.achieved_flops <= h.bf16_flops * (1 + 1e-9)


def test_quantised_weights_read_fewer_bytes_and_use_fp8_cores():
    s = StepShape.decode(1, 100)
    fp16 = ideal().step_time(s).breakdown["weights"]
    q4 = ideal(weight_format="gguf-q4_k_m").step_time(s).breakdown["weights"]
    assert q4 == pytest.approx(fp16 * 4.85 / 16, rel=1e-9)
    big = StepShape.prefill(8192)
    t16 = ideal().step_time(big).breakdown["compute"]
    t8 = ideal(weight_format="fp8").step_time(big).breakdown["compute"]
    assert t8 < 0.65 * t16  # linear layers at 2x rate, attention stays at the fp16 rate
    assert ideal(weight_format="fp8", hw="a100-80gb").compute_dtype == "fp16"


def test_empty_step_costs_nothing():
    c = RooflineCostModel(LLAMA8, "h100-sxm").step_time(StepShape())
    assert c.total_s == 0.0 and c.bound == "idle"


# ---------------------------------------------------------------------------- monotonicity and tp

MODEL = RooflineCostModel(LLAMA8, "h100-sxm")
MODEL_TP = RooflineCostModel(LLAMA70, "h100-sxm", weight_format="fp8", tp=4)


@settings(max_examples=200, deadline=None)
@given(b=st.integers(0, 512), ctx=st.integers(1, 32768), p=st.integers(0, 8192), cached=st.integers(0, 8192),
       db=st.integers(1, 64), dctx=st.integers(1, 4096), dp=st.integers(1, 2048),
       model=st.sampled_from([MODEL, MODEL_TP]))
def test_step_time_non_decreasing(b, ctx, p, cached, db, dctx, dp, model):
    def t(b, ctx, p, cached):
        return model.step_time(StepShape.decode(b, ctx) + StepShape.prefill(p, cached)).total_s

    base = t(b, ctx, p, cached)
    assert t(b + db, ctx, p, cached) >= base  # more decoding sequences
    assert t(b, ctx + dctx, p, cached) >= base  # longer contexts
    assert t(b, ctx, p + dp, cached) >= base  # more prefill tokens
    assert t(b, ctx, p, cached + dctx) >= base  # more cached context under the prefill


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_tensor_parallel_divides_weight_time_and_adds_communication(tp):
    s = StepShape.decode(8, 1024)
    one = RooflineCostModel(LLAMA70, "h100-sxm").step_time(s)
    many = RooflineCostModel(LLAMA70, "h100-sxm", tp=tp).step_time(s)
    assert many.breakdown["weights"] == pytest.approx(one.breakdown["weights"] / tp)
    assert many.breakdown["kv_reads"] == pytest.approx(one.breakdown["kv_reads"] / tp)  # 8 KV heads split
    assert many.breakdown["communication"] > 0 == one.breakdown["communication"]
    assert many.total_s < one.total_s


def test_allreduce_arithmetic():
    cm = ideal(model=LLAMA70, tp=4, comm_efficiency=1.0, allreduce_latency_s=0.0)
    tokens = 1000
    c = cm.step_time(StepShape.prefill(tokens))
    per_allreduce = 2 * 3 / 4 * tokens * 8192 * 2 / 450e9  # ring over 450 GB/s each way
    assert c.breakdown["communication"] == pytest.approx(2 * 80 * per_allreduce)


def test_kv_heads_replicate_beyond_their_count():
    s = StepShape.decode(8, 1024)
    kv8 = ideal(model=LLAMA70, tp=8).step_time(s).breakdown["kv_reads"]
    kv16 = ideal(model=LLAMA70, tp=16).step_time(s).breakdown["kv_reads"]
    assert kv16 == pytest.approx(kv8)  # 8 KV heads: ranks 9..16 hold replicas


def test_roofline_bad_input_names_field():
    with pytest.raises(ConfigError) as e:
        RooflineCostModel(LLAMA8, "cpu-generic", tp=2)
    assert e.value.field == "tp"
    with pytest.raises(ConfigError) as e:
        RooflineCostModel(LLAMA8, "h100-sxm", tp=3)
    assert e.value.field == "tp" and "8" in e.value.allowed
    with pytest.raises(ConfigError) as e:
        RooflineCostModel(LLAMA8, "h100-sxm", mem_efficiency=1.5)
    assert e.value.field == "mem_efficiency"
    with pytest.raises(ConfigError) as e:
        RooflineCostModel(LLAMA8, "h100-sxm", step_overhead_s=-1)
    assert e.value.field == "step_overhead_s"
    with pytest.raises(ConfigError) as e:
        RooflineCostModel(LLAMA8, "h100-sxm", weight_format="q4")
    assert e.value.field == "weight_format"


def test_sim_does_not_import_jax():
    code = ("import sys, sim.core.costmodel, sim.core.roofline, sim.core.calibrated, sim.core.replica, "
            "sim.core.memory, sim.lab.commands.steptime; assert 'jax' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------- calibrated

# A known law, in ms per unit of each feature.
LAW_MS = {"decode_step": 4.0, "decode_rows": 0.012, "decode_kv": 2.5e-4, "step": 5.0, "tokens": 0.03, "rows": 0.02,
          "mixed_decode_kv": 3e-4, "prefill_kv": 4e-6}
PADDING = Padding.for_layout(PagedLayout((1 << 16) + 1, 16), 1 << 20)  # what from_profile assumes with no metadata


def synthetic_profile(noise=0.0, seed=0, law=LAW_MS):
    rng = np.random.default_rng(seed)
    rows = []
    for b, ctx in itertools.product([1, 2, 4, 8, 16, 32, 64], [128, 512, 2048, 8192]):
        rows.append(("decode", b, ctx, 0, 0))
    for p, cached in itertools.product([16, 64, 256, 1024, 4096], [0, 512, 4096]):
        rows.append(("prefill", 1, 0, p, cached))
    for b, p, ctx in itertools.product([4, 32], [64, 512], [256, 1024]):
        rows.append(("mixed", b, ctx, p, 256))
    out = []
    for kind, b, ctx, p, cached in rows:
        f = features(shape_from_profile_row(kind, b, ctx, p, cached), PADDING)
        ms = sum(law[name] * x for name, x in zip(FEATURES, f))
        ms *= 1 + noise * rng.standard_normal()
        out.append({"kind": kind, "batch_size": b, "context_len": ctx, "prefill_tokens": p,
                    "cached_context": cached, "median_ms": ms, "p90_ms": ms * 1.1})
    return pd.DataFrame(out)


def write_profile(path, df, preset="llama-3.1-8b"):
    header = (f"# device: TestGPU 9000\n# preset: {preset}\n# dtype: bfloat16\n# jax: 0.4.30\n"
              f"# date: 2026-01-01\n")
    path.write_text(header + df.to_csv(index=False, float_format="%.12g"))
    return path


def test_calibrated_recovers_known_law(tmp_path):
    path = write_profile(tmp_path / "profile.csv", synthetic_profile())
    cm = CalibratedCostModel.from_profile(path, model_cfg=LLAMA8)
    for name, ms in LAW_MS.items():
        assert cm.coefficients[name] == pytest.approx(ms / 1e3, rel=0.01), name
    assert cm.fit_report.max_rel_error < 1e-6
    assert cm.fit_report.rows == len(synthetic_profile())
    assert cm.metadata["device"] == "TestGPU 9000" and cm.metadata["preset"] == "llama-3.1-8b"
    s = StepShape.decode(10, 1000) + StepShape.prefill(100, 50)
    expected = sum(LAW_MS[n] * x for n, x in zip(FEATURES, features(s, PADDING))) / 1e3
    cost = cm.step_time(s)
    assert cost.total_s == pytest.approx(expected, rel=1e-6)
    assert cost.bytes_moved > LLAMA8.weight_bytes(16) and cost.flops > 0
    assert "relative error" in cm.fit_report.summary()


def test_calibrated_reports_error_of_noisy_table():
    cm = CalibratedCostModel.from_profile(synthetic_profile(noise=0.03, seed=1))
    assert 0.005 < cm.fit_report.mean_rel_error < 0.06
    # Weakly exercised coefficients may move, but predictions stay within the noise of the true law.
    errors = []
    for row in synthetic_profile().itertuples():
        s = shape_from_profile_row(row.kind, row.batch_size, row.context_len, row.prefill_tokens, row.cached_context)
        errors.append(abs(cm.step_time(s).total_s / (row.median_ms / 1e3) - 1))
    assert np.mean(errors) < 0.03 and max(errors) < 0.1


def test_calibrated_coefficients_never_negative():
    # A law whose attention term is zero plus noise would fit a negative coefficient without the constraint.
    law = dict(LAW_MS, decode_kv=0.0, mixed_decode_kv=0.0, prefill_kv=0.0)
    cm = CalibratedCostModel.from_profile(synthetic_profile(noise=0.05, seed=3, law=law))
    assert all(c >= 0 for c in cm.coefficients.values())
    shapes = [StepShape.decode(b, 100) for b in range(1, 50)]
    times = [cm.step_time(s).total_s for s in shapes]
    assert times == sorted(times)


def test_nnls_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.standard_normal((12, 4))
        b = rng.standard_normal(12)
        x = nnls(a, b)
        assert (x >= 0).all()
        best = np.inf
        for mask in itertools.product([False, True], repeat=4):
            idx = np.array(mask)
            if not idx.any():
                best = min(best, np.linalg.norm(b))
                continue
            z = np.linalg.lstsq(a[:, idx], b, rcond=None)[0]
            if (z >= 0).all():
                best = min(best, np.linalg.norm(a[:, idx] @ z - b))
        assert np.linalg.norm(a @ x - b) == pytest.approx(best, rel=1e-7, abs=1e-9)


def test_profile_errors_name_the_problem(tmp_path):
    df = synthetic_profile()
    with pytest.raises(ConfigError) as e:
        CalibratedCostModel.from_profile(df.drop(columns=["cached_context"]))
    assert e.value.field == "profile" and "cached_context" in str(e.value)
    with pytest.raises(ConfigError) as e:
        CalibratedCostModel.from_profile(df.assign(kind="warmup"))
    assert e.value.field == "profile.kind" and "decode" in e.value.allowed
    with pytest.raises(ConfigError) as e:
        CalibratedCostModel.from_profile(df[df.kind == "decode"])
    assert "prefill_tokens" in str(e.value)
    with pytest.raises(ConfigError) as e:
        CalibratedCostModel.from_profile(tmp_path / "missing.csv")
    assert e.value.field == "profile"
    path = write_profile(tmp_path / "tiny.csv", df, preset="tiny")
    with pytest.raises(ConfigError) as e:
        CalibratedCostModel.from_profile(path, model_cfg=LLAMA8)
    assert "tiny" in str(e.value)


# ---------------------------------------------------------------------------- [cost_model] tables

EXP = """
model = "llama-3.1-8b"
[workload]
kind = "closed_loop"
clients = 1
requests_per_client = 1
[workload.prompt_tokens]
dist = "fixed"
value = 10
[workload.output_tokens]
dist = "fixed"
value = 10
[engines.vllm]
scheduler = "continuous"
max_model_len = 1024
weights = "fp8"
kv_dtype = "fp8"
"""


def cost_model(section: str, model: str = "llama-3.1-8b", base=None):
    """The engine's cost model of EXP with this [cost_model] table."""
    text = EXP.replace("llama-3.1-8b", model) + "[cost_model]\n" + section
    if base is None:
        exp = load_experiment(text)
    else:
        (base / "exp.toml").write_text(text)
        exp = load_experiment(base / "exp.toml")
    return exp.cost_model_for(exp.engines[0])


def test_cost_model_table_roofline():
    cm = cost_model('kind = "roofline"\nhardware = "a100-80gb"\nweight_format = "awq-int4"\ntp = 2\n'
                    'mem_efficiency = 0.9\nstep_overhead_s = 0.001\n')
    assert isinstance(cm, RooflineCostModel)
    d = cm.describe()
    assert d["hardware"] == "a100-80gb" and d["tp"] == 2 and d["mem_efficiency"] == 0.9
    assert d["compute_dtype"] == "fp16"
    # the engine's weights and KV dtype are defaults the table overrides
    cm = cost_model('hardware = "h100-sxm"\n')
    assert cm.describe()["weight_format"] == "fp8" and cm.describe()["kv_dtype"] == "fp8"


def test_cost_model_table_calibrated(tmp_path):
    write_profile(tmp_path / "prof.csv", synthetic_profile())
    cm = cost_model('kind = "calibrated"\nprofile = "prof.csv"\n', base=tmp_path)
    assert isinstance(cm, CalibratedCostModel)
    assert cm.describe()["kind"] == "calibrated"
    with pytest.raises(ConfigError) as e:
        cost_model('kind = "calibrated"\nprofile = "prof.csv"\n', "tiny", base=tmp_path)
    assert e.value.field == "cost_model.profile"
    cm = cost_model(f'kind = "calibrated"\nprofile = "{tmp_path / "prof.csv"}"\nallow_model_mismatch = true\n', "tiny")
    assert cm.step_time(StepShape.decode(1, 10)).total_s > 0


@pytest.mark.parametrize("section, field", [
    ('kind = "magic"', "cost_model.kind"),
    ('kind = "roofline"\nhardware = "h100-sxm"\nbandwidth = 3', "cost_model.bandwidth"),
    ('kind = "roofline"', "hardware.preset"),
    ('kind = "roofline"\nhardware = "tpu-v5"', "cost_model.hardware"),
    ('kind = "roofline"\nhardware = "h100-sxm"\nmem_efficiency = 0', "cost_model.mem_efficiency"),
    ('kind = "roofline"\nhardware = "h100-sxm"\ntp = 0', "cost_model.tp"),
    ('kind = "roofline"\nhardware = "h100-sxm"\nweight_format = "int3"', "cost_model.weight_format"),
    ('kind = "roofline"\nhardware = "h100-sxm"\nkv_dtype = "int3"', "cost_model.kv_dtype"),
    ('kind = "calibrated"', "cost_model.profile"),
    ('kind = "calibrated"\nprofile = "x.csv"\nhardware_name = "h100"', "cost_model.hardware_name"),
    ('kind = "calibrated"\nprofile = "does-not-exist.csv"', "cost_model.profile"),
])
def test_cost_model_table_errors_name_the_key(section, field):
    with pytest.raises(ConfigError) as e:
        cost_model(section + "\n")
    assert e.value.field == field


# ---------------------------------------------------------------------------- steptime CLI


def test_steptime_text():
    result = CliRunner().invoke(steptime_command, ["--model", "llama-3.1-8b", "--hardware", "h100-sxm",
                                                   "--decode-seqs", "1", "--context", "512"])
    assert result.exit_code == 0, result.output
    assert "memory-bound" in result.output
    for word in ("weights", "kv reads", "compute", "communication", "overhead", "GB/s", "TFLOP/s"):
        assert word in result.output


def test_steptime_json():
    result = CliRunner().invoke(steptime_command, ["--model", "llama-3.1-70b", "--hardware", "h100-sxm", "--tp", "4",
                                                   "--dtype", "fp8", "--prefill-tokens", "8192", "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.output)
    assert d["bound"] == "compute" and d["compute_dtype"] == "fp8"
    assert set(d["breakdown_ms"]) == {"weights", "kv_reads", "compute", "communication", "overhead"}
    assert d["breakdown_ms"]["communication"] > 0
    assert d["achieved_tflop_s"] <= d["peak_tflop_s"]


@pytest.mark.parametrize("args, option", [
    (["--hardware", "h100"], "--hardware"),
    (["--hardware", "h100-sxm", "--dtype", "int3"], "--dtype"),
    (["--hardware", "h100-sxm", "--tp", "3"], "--tp"),
    (["--hardware", "cpu-generic", "--tp", "2"], "--tp"),
    (["--hardware", "h100-sxm", "--kv-dtype", "fp4"], "--kv-dtype"),
])
def test_steptime_errors_are_usage_errors(args, option):
    result = CliRunner().invoke(steptime_command, ["--model", "llama-3.1-8b", "--decode-seqs", "1", *args])
    assert result.exit_code == 2
    assert option in result.output and "Traceback" not in result.output
    assert not isinstance(result.exception, ConfigError)


def test_steptime_requires_work():
    result = CliRunner().invoke(steptime_command, ["--model", "tiny", "--hardware", "h100-sxm"])
    assert result.exit_code == 2 and "computes nothing" in result.output


@pytest.mark.parametrize("runtime", ["llama.cpp", "vllm"])
def test_steptime_runtime_prices_the_step_by_the_runtime_law(runtime):
    """--runtime R: the step is priced by RuntimeCostModel (same breakdown keys), not the roofline."""
    args = ["--model", "llama-3.1-8b", "--hardware", "a100-sxm-80gb", "--decode-seqs", "5", "--context", "234",
            "--dtype", "bf16", "--json"]
    d = json.loads(CliRunner().invoke(steptime_command, [*args, "--runtime", runtime]).output)
    law = make_runtime_cost_model(LLAMA8, "a100-sxm-80gb", runtime, "bf16")
    expected = law.step_time(StepShape.decode(5, 234))
    assert d["cost_model"] == "runtime" and d["runtime"] == runtime
    assert d["step_ms"] == pytest.approx(expected.total_s * 1e3, rel=1e-12)
    assert d["breakdown_ms"] == pytest.approx({k: v * 1e3 for k, v in expected.breakdown.items()}, rel=1e-12)
    assert set(d["runtime_params"]) == set(law.params) and "mem_efficiency" not in d
    roof = json.loads(CliRunner().invoke(steptime_command, args).output)
    assert roof["cost_model"] == "roofline" and roof["step_ms"] != pytest.approx(d["step_ms"], rel=0.01)
    if runtime == "vllm":  # LL-A100-10's median TPOT pins this step (a fit, not a reproduction)
        assert d["step_ms"] == pytest.approx(12.01, abs=0.01)


def test_steptime_runtime_text_says_how_terms_combine():
    out = CliRunner().invoke(steptime_command, ["--model", "llama-3.1-8b", "--hardware", "h100-sxm", "--dtype",
                                                "gguf-q4_k_m", "--decode-seqs", "1", "--context", "200",
                                                "--runtime", "llama.cpp"]).output
    assert "llama.cpp's calibrated law" in out and "terms add up" in out
    for word in ("weights", "kv reads", "compute", "communication", "overhead", "GB/s", "TFLOP/s"):
        assert word in out


@pytest.mark.parametrize("args, option, allowed", [
    (["--runtime", "sglang"], "--runtime", "llama.cpp, vllm"),
    (["--runtime", "llama.cpp", "--dtype", "fp8"], "--dtype", "gguf-q4_k_m"),
    (["--runtime", "llama.cpp", "--hardware", "cpu-generic"], "--hardware", "h100-sxm"),
    (["--runtime", "llama.cpp", "--ubatch", "0"], "--ubatch", ""),
    (["--runtime", "vllm", "--mem-efficiency", "0.5"], "--mem-efficiency", "drop --runtime"),
    (["--runtime", "vllm", "--overhead-ms", "1"], "--overhead-ms", "drop --runtime"),
])
def test_steptime_runtime_errors_name_the_option(args, option, allowed):
    base = ["--model", "llama-3.1-8b", "--decode-seqs", "1"]
    if "--hardware" not in args:
        base += ["--hardware", "h100-sxm"]
    result = CliRunner().invoke(steptime_command, [*base, *args])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"Error: {option}:" in result.output and allowed in result.output
