"""Hardware presets and weight/KV formats: datasheet figures, lookups and their errors."""
from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

from reference.config import get_preset
from reference.errors import ConfigError
from sim.core import formats
from sim.lab.commands.hardware import command as hardware_command
from sim.core.hardware import HARDWARE, Hardware, get_hardware

NAMES = ["rtx-4090", "l40s", "a100-40gb", "a100-80gb", "h100-sxm", "h100-pcie", "h200", "b200", "cpu-generic"]
# Presets added for the runtime laws (sim.runtimes), after the original ones.
NAMES += ["rtx-3090", "rtx-3090-ti", "rtx-4080", "rtx-a6000", "rtx-6000-ada", "l4", "a10g", "a40", "l40",
          "a100-pcie-40gb", "a100-pcie-80gb", "a100-sxm-40gb", "a100-sxm-80gb", "h100-nvl"]


def test_all_presets_present_and_sane():
    assert list(HARDWARE) == NAMES
    for h in HARDWARE.values():
        assert h.source, h.name
        assert h.memory_bytes == int(h.memory_gb * 2**30)
        assert h.memory_bw > 0 and h.fp16_flops > 0 and h.bf16_flops > 0
        assert h.default_step_overhead_s >= 0 and h.allreduce_latency_s >= 0
        # dense FP8 / INT8 are exactly 2x dense FP16 where they exist; FP4 is 2x FP8
        if h.fp8_flops and h.name != "cpu-generic":
            assert h.fp8_flops == pytest.approx(2 * h.bf16_flops, rel=0.02), h.name
        if h.fp4_flops:
            assert h.fp4_flops == pytest.approx(2 * h.fp8_flops)


def test_presets_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        HARDWARE["h100-sxm"].memory_bw = 1.0


@pytest.mark.parametrize("name, mem_gb, bw, bf16, fp8, link", [
    ("h100-sxm", 80, 3.35e12, 989.4e12, 1978.9e12, 900e9),
    ("h100-pcie", 80, 2.0e12, 756.5e12, 1513e12, 128e9),
    ("a100-80gb", 80, 2.039e12, 312e12, 0.0, 600e9),
    ("a100-40gb", 40, 1.555e12, 312e12, 0.0, 600e9),
    ("h200", 141, 4.8e12, 989.4e12, 1978.9e12, 900e9),
    ("b200", 180, 8.0e12, 2250e12, 4500e12, 1800e9),
    ("rtx-4090", 24, 1.008e12, 165.2e12, 330.3e12, 64e9),
    ("l40s", 48, 0.864e12, 362.05e12, 733e12, 64e9),
])
def test_datasheet_figures(name, mem_gb, bw, bf16, fp8, link):
    h = get_hardware(name)
    assert h.memory_gb == mem_gb
    assert h.memory_bw == pytest.approx(bw)
    assert h.bf16_flops == pytest.approx(bf16)
    assert h.fp8_flops == pytest.approx(fp8)
    assert h.interconnect_bw == pytest.approx(link)
    assert h.interconnect_bw_per_direction == pytest.approx(link / 2)


def test_only_blackwell_has_fp4():
    assert [h.name for h in HARDWARE.values() if h.supports("fp4")] == ["b200"]


def test_unknown_hardware_names_field_and_lists_presets():
    with pytest.raises(ConfigError) as e:
        get_hardware("h100")
    assert e.value.field == "hardware"
    assert "h100-sxm" in e.value.allowed and "cpu-generic" in e.value.allowed


def test_peak_flops_errors():
    a100 = get_hardware("a100-80gb")
    assert not a100.supports("fp8")
    with pytest.raises(ConfigError) as e:
        a100.peak_flops("fp8")
    assert e.value.field == "compute_dtype" and "bf16" in e.value.allowed
    assert a100.peak_flops("fp8", strict=False) == 0.0
    with pytest.raises(ConfigError) as e:
        a100.peak_flops("fp64")
    assert e.value.field == "compute_dtype"


# ---------------------------------------------------------------------------- formats


def test_bits_per_weight():
    bpw = {n: f.bits_per_weight for n, f in formats.WEIGHT_FORMATS.items()}
    assert bpw["fp16"] == bpw["bf16"] == 16
    assert bpw["fp8"] == bpw["int8"] == 8
    assert bpw["awq-int4"] == bpw["gptq-int4"] == pytest.approx(4 + 20 / 128)
    assert bpw["gguf-q4_k_m"] == 4.85
    assert bpw["gguf-q8_0"] == 8.5
    assert bpw["nvfp4"] == 4.5


def test_weight_bytes_match_real_checkpoints():
    m = get_preset("llama-3.1-8b")
    assert formats.weight_bytes(m, "fp16") == m.weight_bytes(16) == pytest.approx(16.06e9, rel=1e-3)
    # hugging-quants Llama-3.1-8B AWQ-INT4: ~5.73 GB (embedding + LM head stay fp16)
    assert formats.weight_bytes(m, "awq-int4") == pytest.approx(5.73e9, rel=0.01)
    # FP8 checkpoints (LM head / embedding bf16): ~9.08 GB
    assert formats.weight_bytes(m, "fp8") == pytest.approx(9.08e9, rel=0.01)
    # Ollama llama3.1:8b Q4_K_M: 4.9 GB
    assert formats.weight_bytes(m, "gguf-q4_k_m") == pytest.approx(4.9e9, rel=0.02)
    tiny = get_preset("small-100m")  # tied embeddings: counted once
    assert formats.weight_bytes(tiny, "fp16") == tiny.weight_bytes(16)


@pytest.mark.parametrize("fmt, hw, expected", [
    ("fp16", "h100-sxm", "fp16"), ("bf16", "a100-80gb", "bf16"),
    ("fp8", "h100-sxm", "fp8"), ("fp8", "a100-80gb", "fp16"), ("fp8", "rtx-4090", "fp8"),
    ("int8", "a100-40gb", "int8"), ("awq-int4", "h100-sxm", "fp16"), ("gptq-int4", "b200", "fp16"),
    ("gguf-q4_k_m", "h100-sxm", "fp16"), ("nvfp4", "b200", "fp4"), ("nvfp4", "h100-sxm", "fp16"),
    ("fp8", "cpu-generic", "fp16"),
])
def test_compute_dtype(fmt, hw, expected):
    assert formats.compute_dtype(fmt, get_hardware(hw)) == expected


def test_kv_dtypes():
    assert formats.get_kv_dtype("fp16").bytes_per_element == 2
    assert formats.get_kv_dtype("bf16").bytes_per_element == 2
    assert formats.get_kv_dtype("fp8").bytes_per_element == 1


def test_format_lookup_errors_name_field():
    with pytest.raises(ConfigError) as e:
        formats.get_weight_format("int4")
    assert e.value.field == "weight_format" and "awq-int4" in e.value.allowed
    with pytest.raises(ConfigError) as e:
        formats.get_kv_dtype("fp4")
    assert e.value.field == "kv_dtype" and "fp8" in e.value.allowed
    with pytest.raises(ConfigError) as e:
        formats.get_kv_dtype("int8", field="engine.kv_dtype")
    assert e.value.field == "engine.kv_dtype"


# ---------------------------------------------------------------------------- CLI


def test_hardware_command_lists_presets():
    result = CliRunner().invoke(hardware_command, [])
    assert result.exit_code == 0, result.output
    for name in NAMES:
        assert name in result.output
    assert "989.4" in result.output and "datasheet" in result.output


def test_hardware_command_json():
    result = CliRunner().invoke(hardware_command, ["--json"])
    assert result.exit_code == 0
    rows = json.loads(result.output)
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == set(NAMES)
    assert by_name["h100-sxm"]["bandwidth_tb_s"] == pytest.approx(3.35)
    assert by_name["h100-sxm"]["fp8_tflops"] == pytest.approx(1978.9)
    assert isinstance(HARDWARE["b200"], Hardware)
