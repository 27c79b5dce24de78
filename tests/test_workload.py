"""sim.lab.workload: determinism, distributions, arrival processes, closed-loop streams, traces."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reference.errors import ConfigError
from reference.request import Request
from sim.lab.experiment import Cell, load_experiment
from sim.lab.schema import validate
from sim.lab.workload import (BLOCK, ClosedLoopWorkload, EmpiricalLength, FixedLength, Lengths, LognormalLength,
                              OpenLoopWorkload, RequestSequence, SharedPrefix, ThinkTime, UniformLength, gamma_arrivals,
                              read_trace, to_request)

FAST = settings(max_examples=25, deadline=None)

dists = st.one_of(
    st.integers(1, 300).map(lambda v: FixedLength(value=v)),
    st.tuples(st.integers(1, 100), st.integers(0, 200)).map(lambda t: UniformLength(low=t[0], high=t[0] + t[1])),
    st.tuples(st.floats(2, 500), st.floats(0, 1.5)).map(lambda t: LognormalLength(sigma=t[1], mean=t[0])),
    st.lists(st.integers(1, 500), min_size=1, max_size=5).map(lambda v: EmpiricalLength(values=tuple(v))),
)


def seq(seed=0, prompt=None, output=None, shared=None, vocab=512):
    return RequestSequence(seed, vocab, prompt_tokens=prompt or UniformLength(low=1, high=200),
                           output_tokens=output or UniformLength(low=1, high=50), shared_prefix=shared)


@FAST
@given(st.integers(0, 2 ** 32), dists, dists, st.floats(0, 1))
def test_same_seed_same_sequence(seed, prompt, output, frac):
    shared = SharedPrefix(fraction=frac, tokens=16, num_prefixes=2)
    a, b = seq(seed, prompt, output, shared), seq(seed, prompt, output, shared)
    idx = [0, 1, 5, BLOCK - 1, BLOCK, 3 * BLOCK + 7]
    specs_a = [a.spec(i) for i in idx]
    specs_b = [b.spec(i) for i in reversed(idx)][::-1]  # access order does not matter
    assert specs_a == specs_b
    assert [s.prompt_token_ids for s in specs_a] == [s.prompt_token_ids for s in specs_b]
    for s in specs_a:
        assert s.prompt_len == len(s.prompt_token_ids) and s.max_tokens >= 1
        assert all(1 <= t < 512 for t in s.prompt_token_ids)


def test_different_seeds_differ_and_features_are_independent():
    a, b = seq(0), seq(1)
    assert [a.spec(i).prompt_len for i in range(50)] != [b.spec(i).prompt_len for i in range(50)]
    # changing the output distribution leaves prompt lengths and tokens alone (own streams)
    c = seq(0, output=FixedLength(value=7))
    assert [a.spec(i).prompt_len for i in range(50)] == [c.spec(i).prompt_len for i in range(50)]
    assert a.spec(3).prompt_token_ids == c.spec(3).prompt_token_ids


def test_cache_eviction_keeps_determinism():
    s = RequestSequence(3, 1000, prompt_tokens=UniformLength(low=1, high=9), output_tokens=FixedLength(value=2), cache_blocks=1)
    first = [s.spec(i * BLOCK).prompt_len for i in range(4)]
    assert [s.spec(i * BLOCK).prompt_len for i in reversed(range(4))][::-1] == first


def test_length_distributions():
    rng = np.random.default_rng(0)
    assert set(FixedLength(value=5).sample(rng, 10)) == {5}
    u = UniformLength(low=3, high=6).sample(rng, 20000)
    assert u.min() == 3 and u.max() == 6 and abs(u.mean() - 4.5) < 0.05
    e = EmpiricalLength(values=(10, 20, 30), weights=(1, 0, 3)).sample(rng, 40000)
    assert set(e) == {10, 30} and abs(np.mean(e == 30) - 0.75) < 0.01
    assert EmpiricalLength(values=(10, 20, 30), weights=(1, 0, 3)).max_value == 30


@pytest.mark.parametrize("mean,sigma", [(100.0, 0.5), (500.0, 1.0), (30.0, 0.2)])
def test_lognormal_mean_matches_target(mean, sigma):
    x = LognormalLength(sigma=sigma, mean=mean).sample(np.random.default_rng(1), 200_000)
    assert x.min() >= 1
    assert x.mean() == pytest.approx(mean, rel=0.02)
    m = LognormalLength(sigma=sigma, median=mean, max=int(mean * 2)).sample(np.random.default_rng(2), 100_000)
    assert np.median(m) == pytest.approx(mean, rel=0.02) and m.max() <= mean * 2


def test_length_tables_and_their_errors():
    assert validate(Lengths, {"dist": "uniform", "low": 1, "high": 4}) == UniformLength(low=1, high=4)
    with pytest.raises(ConfigError, match="dist.*fixed \\| uniform \\| lognormal \\| empirical"):
        validate(Lengths, {"dist": "normal"})
    with pytest.raises(ConfigError, match="^mu: unknown key"):
        validate(Lengths, {"dist": "lognormal", "mu": 3, "sigma": 1})
    with pytest.raises(ConfigError, match="^sigma: required"):
        validate(Lengths, {"dist": "lognormal", "mean": 3})
    with pytest.raises(ConfigError, match="exactly one of mean and median"):
        LognormalLength(sigma=1.0, mean=3, median=3)
    with pytest.raises(ConfigError, match="^high: 4 is below low = 5"):
        UniformLength(low=5, high=4)
    with pytest.raises(ConfigError, match="^weights: must be a list as long as values"):
        EmpiricalLength(values=(1, 2), weights=(1.0,))
    with pytest.raises(ConfigError, match="^value: must be an integer"):
        FixedLength(value=True)


@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_gamma_gaps_mean_and_cv(burstiness):
    rate, n = 8.0, 100_000
    gen = gamma_arrivals(rate, burstiness, seed=5)
    t = np.fromiter((next(gen) for _ in range(n + 1)), float)
    assert t[0] == 0.0
    gaps = np.diff(t)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.03)
    if burstiness == 1.0:  # exponential: P(gap > mean) = 1/e
        assert np.mean(gaps > 1 / rate) == pytest.approx(math.exp(-1), abs=0.01)


def test_arrivals_at_different_rates_share_one_pattern():
    a = gamma_arrivals(2.0, 0.5, seed=9)
    b = gamma_arrivals(8.0, 0.5, seed=9)
    ta = np.array([next(a) for _ in range(1000)])
    tb = np.array([next(b) for _ in range(1000)])
    np.testing.assert_allclose(ta, 4 * tb, rtol=1e-12)
    inf = gamma_arrivals(math.inf)
    assert [next(inf) for _ in range(3)] == [0.0, 0.0, 0.0]


def test_open_loop_limits():
    s = seq(0)
    specs = list(OpenLoopWorkload(s, gamma_arrivals(10.0, seed=0), num_requests=50))
    assert [x.index for x in specs] == list(range(50))
    assert all(x.arrival_time is not None for x in specs)
    assert np.all(np.diff([x.arrival_time for x in specs]) >= 0)
    by_time = list(OpenLoopWorkload(seq(0), gamma_arrivals(10.0, seed=0), duration_s=5.0))
    assert all(x.arrival_time < 5.0 for x in by_time) and 25 < len(by_time) < 80
    assert [x.prompt_len for x in by_time[:50]] == [x.prompt_len for x in specs[:len(by_time[:50])]]


def test_shared_prefix_only_where_it_should():
    s = seq(4, prompt=FixedLength(value=40), shared=SharedPrefix(fraction=0.5, tokens=32, num_prefixes=1))
    specs = [s.spec(i) for i in range(2000)]
    shared = [x for x in specs if x.prefix_id is not None]
    assert abs(len(shared) / len(specs) - 0.5) < 0.05
    first = shared[0].prompt_token_ids[:32]
    assert all(x.prompt_token_ids[:32] == first and x.prompt_len == 72 for x in shared)
    others = [x.prompt_token_ids[:16] for x in specs if x.prefix_id is None]
    assert all(x.prompt_len == 40 for x in specs if x.prefix_id is None)
    assert len({tuple(t) for t in others}) == len(others)  # no two unshared prompts share a 16-token block
    assert first[:16] not in others
    two = seq(4, prompt=FixedLength(value=40), shared=SharedPrefix(fraction=1.0, tokens=32, num_prefixes=2))
    heads = {tuple(two.spec(i).prompt_token_ids[:32]) for i in range(200)}
    assert len(heads) == 2


def test_closed_loop_streams_do_not_depend_on_timing():
    def run(order):
        wl = ClosedLoopWorkload(seq(2), 3, num_requests=8, think_time=ThinkTime(0.5, "exponential"))
        got = {c: [] for c in range(3)}
        for c in order:
            spec = wl.next_for_client(c)
            if spec is not None:
                got[c].append((spec.index, spec.prompt_len, wl.think_time_s(c)))
        return got, wl

    a, wl = run([0, 1, 2] * 4)
    b, _ = run([2, 2, 2, 2, 1, 1, 1, 0, 0, 0, 0, 1])
    assert a == b
    assert [i for i, _, _ in a[0]] == [0, 3, 6] and [i for i, _, _ in a[2]] == [2, 5]
    assert wl.requests_for_client(0) == 3 and wl.requests_for_client(2) == 2
    assert wl.next_for_client(0) is None
    per_client = ClosedLoopWorkload(seq(2), 4, requests_per_client=3)
    assert per_client.total_requests == 12 and per_client.next_for_client(3).client_id == 3
    assert ThinkTime(0.0).sample(np.random.default_rng()) == 0.0
    assert ThinkTime(2.0).sample(np.random.default_rng()) == 2.0


def test_to_request():
    spec = seq(1).spec(10, arrival_time=3.5)
    r = to_request(spec)
    assert isinstance(r, Request) and r.request_id == "r10" and r.arrival_time == 3.5
    assert r.prompt_token_ids == spec.prompt_token_ids and r.sampling.max_tokens == spec.max_tokens
    assert r.sampling.ignore_eos and r.sampling.temperature == 0.0
    assert to_request(seq(1).spec(10), arrival_time=7.0).arrival_time == 7.0
    with pytest.raises(ValueError):
        to_request(seq(1).spec(10))


TRACE_EXP = """
model = "tiny"
[workload]
kind = "trace"
path = "{path}"
speedup = 2.0
[engines.vllm]
scheduler = "continuous"
"""


def test_trace_replay(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("arrival_s,prompt_tokens,output_tokens,extra\n10.0,5,3,a\n10.5,7,1,b\n12.0,9,2,c\n")
    arrival, prompt, output = read_trace(p)
    assert arrival.tolist() == [0.0, 0.5, 2.0] and prompt.tolist() == [5, 7, 9] and output.tolist() == [3, 1, 2]
    exp = load_experiment(TRACE_EXP.format(path=p))
    assert exp.cells() == [Cell("vllm")]
    specs = list(exp.workload.build(exp.seed, exp.model_spec.vocab_size, exp.cells()[0].load))
    assert [(s.arrival_time, s.prompt_len, s.max_tokens) for s in specs] == [(0.0, 5, 3), (0.25, 7, 1), (1.0, 9, 2)]


@pytest.mark.parametrize("body,match", [
    ("arrival_s,prompt_tokens\n0,5\n", "lacks column.*output_tokens"),
    ("arrival_s,prompt_tokens,output_tokens\n0,5,1\n2,5,1\n1,5,1\n", "row 2 \\(line 4\\).*before the previous"),
    ("arrival_s,prompt_tokens,output_tokens\n0,5,1\n1,0,1\n", "row 1 \\(line 3\\), column prompt_tokens"),
    ("arrival_s,prompt_tokens,output_tokens\n0,5,1\n1,5,x\n", "column output_tokens.*'x'"),
    ("arrival_s,prompt_tokens,output_tokens\n", "no rows"),
])
def test_trace_errors(tmp_path, body, match):
    p = tmp_path / "bad.csv"
    p.write_text(body)
    with pytest.raises(ConfigError, match=match) as e:
        load_experiment(TRACE_EXP.format(path=p))
    assert e.value.field == "workload.path"


def test_trace_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="workload.path: trace file .* not found"):
        load_experiment(TRACE_EXP.format(path=tmp_path / "nope.csv"))


def test_build_workload_same_requests_in_every_cell_and_driver():
    exp = load_experiment("""
model = "tiny"
seed = 11
[workload]
kind = "closed_loop"
clients = [1, 4]
num_requests = 8
[workload.prompt_tokens]
dist = "uniform"
low = 4
high = 64
[workload.output_tokens]
dist = "fixed"
value = 3
[engines.a]
scheduler = "sequential"
[engines.b]
scheduler = "continuous"
""")

    def drain(wl):
        out = []
        for c in range(wl.num_clients):
            while (s := wl.next_for_client(c)) is not None:
                out.append((s.index, tuple(s.prompt_token_ids), s.max_tokens))
        return sorted(out)

    cells = exp.cells()
    runs = [drain(exp.workload.build(exp.seed, exp.model_spec.vocab_size, c.load)) for c in cells]
    assert all(r == runs[0] for r in runs) and len(runs[0]) == 8
