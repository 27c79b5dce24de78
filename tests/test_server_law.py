"""The law of a server profiled as a black box (sim.core.calibrated.ServerShapes, decode_table_s) on synthetic tables."""
import hypothesis.strategies as st
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings

from reference.batch import StepShape
from reference.errors import ConfigError
from sim.core.calibrated import (FEATURES, PROFILE_COLUMNS, CalibratedCostModel, ServerShapes, features,
                                 server_shapes, shape_from_profile_row)

# A made-up server (ms): decode steps cost a per-batch amount (not linear in B, as llama.cpp's are on a CPU)
# plus 0.002 ms per K/V token read; steps with a prompt cost 3 ms + 0.5 ms per token + 0.0001 ms per pair.
DECODE_MS = {1: 8.0, 2: 21.0, 3: 30.0, 4: 24.0, 8: 40.0}
KV_MS, STEP_MS, TOKEN_MS, PAIR_MS = 0.002, 3.0, 0.5, 0.0001


def truth_ms(s: StepShape, pad: int) -> float:
    shapes = ServerShapes(pad)
    f = shapes.features(s)
    if not s.prefill_seqs:
        return DECODE_MS[s.decode_seqs] + KV_MS * f[2]
    return STEP_MS + TOKEN_MS * f[4] + PAIR_MS * f[7] + KV_MS * f[6]


def server_profile(pad: int) -> pd.DataFrame:
    rows = []
    for b in DECODE_MS:
        for ctx in (40, 300, 1100):
            rows.append(("decode", b, ctx, 0))
    for p in (16, 64, 128, 512, 1024):
        rows.append(("prefill", 1, p, p))
    for b in (1, 3):
        for p in (32, 128, 512):
            rows.append(("mixed", b, 30, p))
    df = pd.DataFrame(rows, columns=["kind", "batch_size", "context_len", "prefill_tokens"])
    df["cached_context"] = 0
    df["median_ms"] = [truth_ms(shape_from_profile_row(k, b, c, p, 0), pad)
                       for k, b, c, p in zip(df.kind, df.batch_size, df.context_len, df.prefill_tokens)]
    df.attrs["shapes"] = ServerShapes(pad).metadata()
    return df[list(PROFILE_COLUMNS)]


def test_server_shapes_price_real_sizes():
    s = StepShape.decode(3, 100)
    assert ServerShapes(1).features(s) == (1.0, 3, 300, 0.0, 0.0, 0.0, 0.0, 0.0)
    assert ServerShapes(256).features(s) == (1.0, 3, 768, 0.0, 0.0, 0.0, 0.0, 0.0)
    m = StepShape.decode(2, 300) + StepShape.prefill(100)
    f1, f256 = ServerShapes(1).features(m), ServerShapes(256).features(m)
    assert f1[3:6] == (1.0, 102, 3) and f256[3:6] == (1.0, 102, 3)
    assert f1[6] == 600 and f1[7] == m.attn_q_ctx - 600  # decode part's contexts, then the prompt's causal pairs
    assert f256[6] == 2 * 512 and f256[7] == 100 * 512  # every query reads the padded longest context
    assert features(s, ServerShapes(1)) == ServerShapes(1).features(s)


def test_server_shapes_metadata_round_trips_and_bad_values_name_the_field():
    assert server_shapes({"shapes": ServerShapes(256).metadata()}) == ServerShapes(256)
    assert server_shapes({"padding": "min_tokens=16"}) is None
    with pytest.raises(ConfigError, match="shapes"):
        server_shapes({"shapes": "server context_pad=x"})
    with pytest.raises(ConfigError, match="context_pad"):
        ServerShapes(0)


@pytest.mark.parametrize("pad", [1, 256])
def test_a_server_profile_is_fitted_with_one_fixed_cost_per_batch_size(pad):
    law = CalibratedCostModel.from_profile(server_profile(pad), check_model=False)
    assert isinstance(law.padding, ServerShapes) and law.padding.context_pad == pad
    assert law.fit_report.max_rel_error < 1e-6, law.fit_report.summary()
    for b, ms in DECODE_MS.items():  # measured points, at the K/V feature per sequence of each profiled context
        xs = [x for x, _ in law.decode_table_s[b]]
        assert len(xs) == 3 and law.decode_table_s[b][0][1] * 1e3 == pytest.approx(ms + KV_MS * b * xs[0], rel=1e-6)
    for s in (StepShape.decode(3, 700), StepShape.prefill(300), StepShape.decode(2, 50) + StepShape.prefill(70)):
        assert law.step_seconds(s) * 1e3 == pytest.approx(truth_ms(s, pad), rel=1e-6)


def test_decode_table_sizes_between_and_past_the_measured_ones():
    law = CalibratedCostModel.from_profile(server_profile(1), check_model=False)
    mid = law.step_seconds(StepShape.decode(6, 100)) - KV_MS * 600 / 1e3  # halfway from B=4 to B=8
    assert mid * 1e3 == pytest.approx((DECODE_MS[4] + DECODE_MS[8]) / 2, rel=1e-6)
    past = law.step_seconds(StepShape.decode(10, 100)) - law.step_seconds(StepShape.decode(8, 100))
    assert past >= 0  # extrapolated with decode_rows (>= 0) per extra sequence
    described = law.describe()
    assert described["padding"] == {"shapes": "server context_pad=1"} and set(described["decode_table_s"]) == set(DECODE_MS)


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 40), ctx=st.integers(1, 3000), p=st.integers(2, 2000))
def test_server_law_never_decreases_with_more_context_or_prompt(b, ctx, p):
    law = CalibratedCostModel.from_profile(server_profile(256), check_model=False)
    assert law.step_seconds(StepShape.decode(b, ctx + 300)) >= law.step_seconds(StepShape.decode(b, ctx))
    base = StepShape.decode(b, ctx)
    assert law.step_seconds(base + StepShape.prefill(p + 50)) >= law.step_seconds(base + StepShape.prefill(p))


def test_engine_profiles_keep_their_padded_law():
    """A profile without '# shapes: server' is the reference runner's: no per-batch table, padded features."""
    df = server_profile(1)
    df.attrs = {}
    law = CalibratedCostModel.from_profile(df, check_model=False)
    assert not law.decode_table_s and not isinstance(law.padding, ServerShapes)
    assert len(law.coefficients) == len(FEATURES)


def test_explicit_decode_table_is_checked():
    with pytest.raises(ConfigError, match="decode_table_s"):
        CalibratedCostModel(dict.fromkeys(FEATURES, 0.0), padding=ServerShapes(1), decode_table_s={0: [(10, 0.01)]})
    with pytest.raises(ConfigError, match="decode_table_s"):
        CalibratedCostModel(dict.fromkeys(FEATURES, 0.0), padding=ServerShapes(1), decode_table_s={2: []})
    law = CalibratedCostModel(dict.fromkeys(FEATURES, 0.0), padding=ServerShapes(1), decode_table_s={2: [(10, 0.02)]})
    assert law.step_seconds(StepShape.decode(1, 10)) == pytest.approx(0.02)  # below the table: its first entry
    assert np.isclose(law.step_time(StepShape.decode(2, 10)).breakdown["overhead"], 0.02)
