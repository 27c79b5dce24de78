"""`servesim profile`: the steps it times are the engine's steps, the table it writes is what the
calibrated cost model reads, and bad input is named. One real (quick-grid) profile per module."""
from __future__ import annotations

import math

import pytest
from click.testing import CliRunner

from reference.batch import StepShape
from reference.block_manager import BlockManager
from reference.buckets import Padding
from reference.config import get_preset
from reference.errors import ConfigError
from reference.layout import SlotLayout
from sim.core.calibrated import PROFILE_COLUMNS, CalibratedCostModel, read_profile, shape_from_profile_row
from sim.lab import profile as prof
from sim.lab.cli import main

TINY = get_preset("tiny")


@pytest.fixture(scope="module")
def quick_profile(tmp_path_factory):
    """`servesim profile --grid quick` on this machine (a few seconds for tiny on a CPU)."""
    path = tmp_path_factory.mktemp("profile") / "tiny.csv"
    result = CliRunner().invoke(main, ["profile", "--model", "tiny", "--out", str(path), "--grid", "quick",
                                       "--repeats", "3"])
    assert result.exit_code == 0, result.output
    assert "shapes measured" in result.output
    return path


def test_profile_csv_has_metadata_and_columns(quick_profile):
    lines = quick_profile.read_text().splitlines()
    meta = [line for line in lines if line.startswith("#")]
    assert lines[:len(meta)] == meta  # metadata first
    keys = {line[1:].split(":", 1)[0].strip() for line in meta}
    assert {"device", "preset", "dtype", "jax", "date", "grid", "repeats", "block_size", "command"} <= keys
    df, md = read_profile(quick_profile)
    assert md["preset"] == "tiny" and md["dtype"] == "float32" and md["repeats"] == "3"
    assert md["command"].startswith("servesim profile") and md["grid"].startswith("quick")
    assert set(PROFILE_COLUMNS) <= set(df.columns)
    assert {"min_ms", "p90_ms", "prepare_ms", "first_call_ms", "achieved_gbps", "schedule_ms"} <= set(df.columns)
    assert set(df.kind) == {"decode", "prefill", "mixed", "host"}
    steps = df[df.kind != "host"]
    n_shapes = len(prof.grid_shapes(prof.GRIDS["quick"], TINY.max_position))
    assert (steps.layout == "paged").sum() == (steps.layout == "contiguous").sum() == n_shapes
    assert (steps.min_ms <= steps.median_ms).all() and (steps.median_ms <= steps.p90_ms + 1e-9).all()
    assert (steps.prepare_ms < steps.median_ms).all()  # host preparation is part of the timed step
    assert (steps.first_call_ms > steps.median_ms).all()  # the first call compiled
    host = df[df.kind == "host"]
    quick = prof.GRIDS["quick"]
    assert list(host[host.prefill_tokens == 0].batch_size) == list(quick.host_batch)
    admissions = host[host.prefill_tokens > 0]  # one row per (batch, prompt length): batch x prompt tokens
    assert list(zip(admissions.batch_size, admissions.context_len)) == prof.host_admissions(quick)
    assert (admissions.prefill_tokens == admissions.batch_size * admissions.context_len).all()
    assert (host.schedule_ms + host.update_ms <= host.median_ms * 1.5).all()


def test_calibrated_cost_model_reads_the_profile(quick_profile):
    cm = CalibratedCostModel.from_profile(quick_profile, model_cfg=TINY)
    rep = cm.fit_report
    n_steps = len(prof.grid_shapes(prof.GRIDS["quick"], TINY.max_position))
    assert rep.rows == n_steps
    assert math.isfinite(rep.mean_rel_error) and rep.mean_rel_error < 1.0
    assert "relative error" in rep.summary()
    assert cm.host_coefficients["step"] + cm.host_coefficients["seq"] > 0  # host rows priced, not ignored
    s = StepShape.decode(8, 100)
    t = cm.step_time(s).total_s
    assert 0 < t < 1.0 and cm.step_time(StepShape.decode(16, 100)).total_s >= t
    # The host term is in the step time, as overhead.
    bare = CalibratedCostModel(cm.coefficients)
    assert cm.step_time(s).breakdown["overhead"] > bare.step_time(s).breakdown["overhead"]
    assert "host_coefficients" in cm.describe() and set(cm.host_coefficients) == {"step", "seq", "prefill_token"}
    # An engine over contiguous slots is priced by the law of the profile's contiguous rows.
    slots = CalibratedCostModel.from_profile(quick_profile, model_cfg=TINY, padding=Padding.for_layout(SlotLayout(1, 256), 256))
    assert rep.layout == "paged" and slots.fit_report.layout == "contiguous" and slots.fit_report.rows == n_steps
    assert slots.coefficients != cm.coefficients
    with pytest.raises(ConfigError) as e:  # measured on another model
        CalibratedCostModel.from_profile(quick_profile, model_cfg=get_preset("llama-3.1-8b"))
    assert "tiny" in str(e.value)


def test_grid_is_clipped_to_max_position():
    grid = prof.Grid(decode_batch=(2,), decode_context=(32, 4096), prefill_tokens=(64, 4096),
                     prefill_cached=(0, 64), mixed_prefill=(64,), mixed_cached=(0, 96), mixed_batch=(3,),
                     mixed_context=(8192,), host_batch=(1,))
    shapes = prof.grid_shapes(grid, max_position=128)
    assert [(s.batch_size, s.context_len) for s in shapes if s.kind == "decode"] == [(2, 32), (2, 128)]
    assert [(s.prefill_tokens, s.cached_context) for s in shapes if s.kind == "prefill"] == \
        [(64, 0), (64, 64), (128, 0)]
    assert [(s.prefill_tokens, s.cached_context, s.context_len) for s in shapes if s.kind == "mixed"] == \
        [(64, 0, 128)]
    for s in shapes:
        assert max([p + o for p, o, _ in s.sequences()]) <= 128
    full = prof.grid_shapes(prof.GRIDS["full"], get_preset("llama-3.1-8b").max_position)
    assert max(s.batch_size for s in full) == 256 and max(s.context_len for s in full) == 8192


@pytest.mark.parametrize("shape", [prof.Shape("decode", 5, 37), prof.Shape("prefill", 0, 0, 40, 24),
                                   prof.Shape("mixed", 3, 20, 17, 0)])
def test_profile_steps_are_engine_steps(shape):
    """Chunks built like the scheduler builds them: decodes are decodes, every chunk samples, real tables."""
    blocks = BlockManager(64, 4, enable_prefix_caching=False)
    chunks = prof.build_chunks(shape, blocks, TINY.vocab_size)
    assert all(c.samples for c in chunks)
    assert sum(c.is_decode for c in chunks) == shape.batch_size
    for c in chunks:
        assert c.block_table == blocks.block_table(c.request.request_id)
        assert len(c.block_table) == -(-c.end // 4) and 0 not in c.block_table
        assert all(0 <= t < TINY.vocab_size for t in c.request.token_ids())
    assert len({b for c in chunks for b in c.block_table}) == shape.blocks(4)  # no block shared
    expected = shape_from_profile_row(shape.kind, shape.batch_size, shape.context_len, shape.prefill_tokens,
                                      shape.cached_context)
    assert StepShape.from_chunks((c.num_tokens, c.end) for c in chunks) == expected


def test_host_cost_is_positive_and_split():
    stats = prof.time_host(prof._NullRunner(), 200, 8, repeats=3, warmup=1, block_size=16)
    assert stats["median_ms"] > 0 and stats["schedule_ms"] > 0 and stats["update_ms"] > 0
    assert stats["min_ms"] <= stats["median_ms"] <= stats["p90_ms"]
    admit = prof.time_host_admission(prof._NullRunner(), 200, 8, 128, repeats=3, warmup=1, block_size=16)
    assert admit["median_ms"] > stats["median_ms"]  # hashing 8 x 128 prompt tokens costs more than 8 decodes


@pytest.mark.parametrize("kwargs, field", [
    (dict(grid="huge"), "grid"), (dict(repeats=0), "repeats"), (dict(warmup=-1), "warmup"),
    (dict(block_size=0), "block_size"), (dict(dtype="int8"), "dtype"),
])
def test_bad_arguments_name_the_field(kwargs, field, tmp_path):
    with pytest.raises(ConfigError) as e:
        prof.run_profile("tiny", tmp_path / "x.csv", progress=False, **kwargs)
    assert e.value.field == field
    assert not (tmp_path / "x.csv").exists()
    with pytest.raises(ConfigError) as e:
        prof.run_profile("no-such-model", None, progress=False)
    assert e.value.field == "model"


def test_shapes_over_the_kv_budget_are_refused(monkeypatch):
    monkeypatch.setattr(prof, "CPU_KV_BUDGET", 1)
    with pytest.raises(ConfigError) as e:
        prof.run_profile("tiny", None, grid="quick", progress=False)
    assert e.value.field == "grid" and "KV pool" in str(e.value)
