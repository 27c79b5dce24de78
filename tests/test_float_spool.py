"""FloatSpool: numpy's very sum, mean and percentiles over a series held partly on a temporary file."""
from __future__ import annotations

import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.lab.float_spool import FloatSpool

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
QS = [0.0, 33.3, 50.0, 90.0, 95.0, 99.0, 100.0]

values = st.one_of(
    st.floats(-1e6, 1e6, allow_nan=False),
    st.sampled_from([0.0, 1.0, 2.5, 1e-9, 3.0000000001]),  # ties: selection must find equal keys
)


def fill(x: np.ndarray, memory_limit: int, pieces: list[int]) -> FloatSpool:
    spool = FloatSpool(memory_limit)
    i, k = 0, 0
    while i < x.size:
        step = pieces[k % len(pieces)] if pieces else x.size
        spool.append(x[i:i + step])
        i, k = i + step, k + 1
    return spool


@SETTINGS
@given(st.lists(values, min_size=1, max_size=1500), st.sampled_from([1, 128, 200, 1 << 17]),
       st.lists(st.integers(1, 300), min_size=1, max_size=5))
def test_spool_sum_mean_percentiles_are_numpys(xs, memory_limit, pieces):
    x = np.array(xs, dtype=float)
    spool = fill(x, memory_limit, pieces)
    assert len(spool) == x.size
    assert np.array_equal(np.concatenate(list(spool.chunks())), x)
    assert spool.sum() == float(np.sum(x))
    assert spool.mean() == float(np.mean(x))
    assert spool.percentiles(QS) == [float(np.percentile(x, q)) for q in QS]
    ranks = {0, x.size - 1, x.size // 2}
    assert spool.order_statistics(ranks) == {r: float(np.sort(x)[r]) for r in ranks}
    spool.close()


def test_long_spool_on_file_matches_numpy():
    """A million lognormal values through 4096-value memory: several split levels, several selection passes."""
    x = np.random.default_rng(7).lognormal(3.0, 1.0, 1_000_003)
    spool = fill(x, 4096, [65536])
    assert spool._file is not None and spool._in_memory <= 4096
    assert spool.sum() == float(np.sum(x))
    assert spool.percentiles(QS) == [float(np.percentile(x, q)) for q in QS]


def test_empty_spool_is_nan():
    spool = FloatSpool()
    assert len(spool) == 0 and spool.sum() == 0.0 and math.isnan(spool.mean())
    assert all(math.isnan(v) for v in spool.percentiles(QS))
