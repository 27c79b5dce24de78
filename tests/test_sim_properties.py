"""Simulator properties: conservation, same decisions as a direct driver, monotonicity, determinism, errors.

Small random experiments (hypothesis) run through sim.lab.simulate.simulate_cell with the roofline
cost model on an H100 SXM; every request must end exactly once, completed requests carry exactly
max_tokens output tokens, and every KV block is back in the pool at the end.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from unittest import mock

import hypothesis.strategies as st
import numpy as np
import pandas as pd
import pytest
import simpy
from hypothesis import HealthCheck, event, given, settings

import sim.core.replica
import sim.lab.simulate
from reference.errors import ConfigError
from reference.request import Request, SamplingParams
from reference.schedulers import ContinuousScheduler, OrcaScheduler, SequentialScheduler, StaticScheduler
from sim.lab.experiment import dumps_toml as to_toml
from sim.lab.experiment import load_experiment
from sim.lab.metrics import CellAccumulator
from sim.core.fast import FastContinuousScheduler, FastSequentialScheduler
from sim.core.replica import SIM_TOKEN, Replica
from sim.lab.simulate import run_experiment, simulate_cell


def examples(n: int) -> settings:
    """Hypothesis settings for simulations: n examples, no per-example deadline."""
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])


MAX_LEN = 512  # tokens: context of every engine in the random experiments


# ---------------------------------------------------------------------------------------
# Random experiments

@st.composite
def engines(draw, model: str) -> dict:
    """One engine table of any scheduler kind, small enough that queues, refusals and preemption happen.

    num_blocks = 0 (size the pool from memory) only for llama-3.1-8b: for the tiny model an H100's
    memory would be ~17 million blocks, and BlockManager keeps Python lists of that length.
    """
    kind = draw(st.sampled_from(["sequential", "static", "continuous", "orca"]))
    if kind == "sequential":
        n_batch = draw(st.sampled_from([64, 2048]))
        return dict(scheduler=kind, num_parallel=draw(st.integers(1, 4)), num_ctx=MAX_LEN,
                    max_queue=draw(st.sampled_from([0, 2, 512])), n_batch=n_batch, n_ubatch=min(512, n_batch),
                    weights="fp16")
    if kind == "static":
        return dict(scheduler=kind, max_batch_size=draw(st.integers(1, 6)), max_model_len=MAX_LEN,
                    reserve_max_len=draw(st.booleans()),
                    kv_capacity_tokens=draw(st.sampled_from([0, MAX_LEN, 3 * MAX_LEN])),
                    max_queue=draw(st.sampled_from([0, 3])))
    bs = draw(st.sampled_from([4, 16]))
    min_blocks = -(-MAX_LEN // bs)
    e = dict(scheduler=kind, block_size=bs, max_model_len=MAX_LEN,
             num_blocks=draw(st.sampled_from([0 if model != "tiny" else 2 * min_blocks, min_blocks + 1,
                                                3 * min_blocks])),
             max_num_seqs=draw(st.sampled_from([2, 8, 256])), max_queue=draw(st.sampled_from([0, 4])))
    if kind == "orca":
        e["reservation"] = draw(st.sampled_from(["max_model_len", "request"]))
    else:
        chunked = draw(st.booleans())
        e["enable_chunked_prefill"] = chunked
        e["enable_prefix_caching"] = draw(st.booleans())
        e["max_num_batched_tokens"] = max(e["max_num_seqs"], 64 if chunked else MAX_LEN)
    return e


@st.composite
def experiments(draw) -> dict:
    """A whole experiment document (one engine, one or two cells)."""
    kind = draw(st.sampled_from(["closed_loop", "poisson"]))
    low = draw(st.integers(1, 40))
    workload: dict = dict(kind=kind, timeout_s=draw(st.sampled_from([0.0, 0.0, 0.05, 0.5])),
                          prompt_tokens=dict(dist="uniform", low=low, high=draw(st.integers(low, 450))),
                          output_tokens=dict(dist="uniform", low=1, high=draw(st.integers(1, 300))))
    if kind == "closed_loop":
        workload.update(clients=draw(st.sampled_from([[1], [3], [2, 16]])),
                        requests_per_client=draw(st.integers(1, 4)))
    else:
        workload.update(rates=draw(st.sampled_from([[5.0], [200.0], [math.inf]])),
                        num_requests=draw(st.integers(1, 60)))
    if draw(st.booleans()):
        workload["shared_prefix"] = dict(fraction=0.5, tokens=24, num_prefixes=2)
    model = draw(st.sampled_from(["tiny", "llama-3.1-8b"]))
    return dict(name="prop", seed=draw(st.integers(0, 3)), model=model, workload=workload,
                engines=dict(e=draw(engines(model))),
                hardware=dict(preset="h100-sxm", replicas=draw(st.integers(1, 2)),
                              router=draw(st.sampled_from(["round_robin", "least_outstanding"]))),
                cost_model=dict(kind="roofline"))


@contextmanager
def captured_replicas():
    """Every Replica that sim.lab.simulate builds while inside, so a test can inspect their schedulers."""
    made: list[Replica] = []

    class Recording(Replica):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    with mock.patch.object(sim.lab.simulate, "Replica", Recording):
        yield made


def run_cell(exp, cell):
    """(accumulator, facts, replicas) of one simulated cell."""
    acc = CellAccumulator(cell.engine, cell.concurrency, cell.request_rate)
    with captured_replicas() as replicas:
        facts = simulate_cell(exp, cell, acc)
    return acc, facts, replicas


def expected_requests(exp, cell) -> int:
    w = exp.workload
    if w.kind == "closed_loop":
        return w.requests_per_client * cell.concurrency
    return w.num_requests


# ---------------------------------------------------------------------------------------
# Conservation

@examples(200)
@given(doc=experiments())
def test_every_request_ends_once_and_all_kv_returns(doc):
    exp = load_experiment(to_toml(doc))
    for cell in exp.cells():
        acc, facts, replicas = run_cell(exp, cell)
        rows = acc.rows
        n = expected_requests(exp, cell)
        assert len(rows) == len(acc) == n, "a request was lost or recorded twice"
        assert sorted(r["request_id"] for r in rows) == sorted(f"r{i}" for i in range(n))
        for outcome in sorted({r["outcome"] for r in rows}):
            event(f"outcome {outcome}")  # --hypothesis-show-statistics shows what the examples exercised
        if facts["preemptions"]:
            event("preemptions")
        for r in rows:
            assert r["outcome"] in ("completed", "refused", "timed_out"), r
            if r["outcome"] == "completed":
                assert r["output_tokens"] == r["max_tokens"]
                assert r["arrival_s"] <= r["first_scheduled_s"] <= r["first_token_s"] <= r["finish_s"]
            elif r["outcome"] == "refused":
                assert r["reason"] and r["output_tokens"] == 0
            else:
                assert exp.workload.timeout_s > 0
                assert r["finish_s"] - r["arrival_s"] == pytest.approx(exp.workload.timeout_s)
        for rep in replicas:
            sched = rep.scheduler
            assert not sched.has_unfinished() and not rep._done_events
            usage = sched.kv_usage()
            assert usage.stored_tokens == 0
            # llama.cpp slots stay reserved from load to exit; everything else gives its KV back.
            slots = isinstance(sched, (SequentialScheduler, FastSequentialScheduler))
            assert usage.reserved_tokens == (usage.capacity_tokens if slots else 0)
            if isinstance(sched, ContinuousScheduler):
                bm = sched.blocks
                assert bm.num_free_blocks == bm.num_usable_blocks, "KV blocks leaked"
                assert not bm.tables and sum(bm.ref_count) == 0
            elif isinstance(sched, (SequentialScheduler, FastSequentialScheduler)):
                assert sorted(sched.free_slots) == list(range(sched.layout.num_slots)) and not sched.slot_of
            elif isinstance(sched, FastContinuousScheduler):  # the simulator's event-driven twin (sim.core.fast)
                pool = sched.pool
                assert pool.free_total == pool.num_usable, "KV blocks leaked"
                assert not sched.holdings and not pool.dup and all(r == 0 for r in pool.ref.values())
            else:
                assert not sched.batch and not sched.slot_of
        series = facts["timeseries"]
        last = series.groupby("replica").tail(1)  # each replica samples itself when it goes idle
        assert (last.kv_stored_tokens == 0).all() and (last.running == 0).all() and (last.waiting == 0).all()
        assert facts["num_steps"] == sum(r.num_steps for r in replicas)


# ---------------------------------------------------------------------------------------
# Same decisions as a direct driver

def step_seconds(shape) -> float:
    """A fixed step-time law both drivers use (s): per step, per token and per sequence terms."""
    return 0.003 + 1e-5 * shape.new_tokens + 2e-4 * shape.num_seqs


def snapshot(out) -> tuple:
    """What a step decided: (request id, start, size) per chunk, and who was preempted."""
    return (tuple((c.request.request_id, c.start, c.num_tokens) for c in out.chunks),
            tuple(r.request_id for r in out.preempted))


def direct_drive(sched, reqs: list[Request], arrivals: list[float]) -> list[tuple[float, tuple]]:
    """The reference engine's loop with a simulated clock: add arrivals, schedule, 'execute', update."""
    pending = sorted(zip(arrivals, range(len(reqs))))
    t, steps = 0.0, []
    while pending or sched.has_unfinished():
        if not sched.has_unfinished() and pending[0][0] > t:
            t = pending[0][0]  # idle: the next step starts when the next request arrives
        while pending and pending[0][0] <= t:
            _, i = pending.pop(0)
            sched.add(reqs[i], t)
        if not sched.has_unfinished():
            continue  # all refused: wait for the next arrival (or stop)
        out = sched.schedule(t)
        if out.is_empty:  # nothing runnable until another request arrives
            assert pending
            t = pending[0][0]
            continue
        steps.append((t, snapshot(out)))
        t += step_seconds(out.shape)
        sched.update(out, [SIM_TOKEN] * sum(1 for c in out.chunks if c.samples), t)
        assert len(steps) < 100_000
    return steps


def replica_drive(sched, reqs: list[Request], arrivals: list[float]) -> list[tuple[float, tuple]]:
    """The same requests through a sim.core.replica.Replica in SimPy."""
    env = simpy.Environment()
    steps = []
    replica = Replica(env, "r0", sched, step_seconds, on_step=lambda now, out, dt: steps.append((now, snapshot(out))))

    def arrive(req, at):
        yield env.timeout(at)
        replica.submit(req)

    for req, at in zip(reqs, arrivals):
        env.process(arrive(req, at))
    env.run()
    return steps


DRIVER_SCHEDULERS = {
    "sequential-1": lambda: SequentialScheduler(num_parallel=1, num_ctx=96, max_queue=512, n_batch=16),
    "sequential-3": lambda: SequentialScheduler(num_parallel=3, num_ctx=96, max_queue=4, n_batch=16),
    "static": lambda: StaticScheduler(max_batch_size=3, max_model_len=96, kv_capacity_tokens=200,
                                      reserve_max_len=False),
    "continuous": lambda: ContinuousScheduler(num_blocks=30, block_size=4, max_num_seqs=4,
                                              max_num_batched_tokens=16, max_model_len=96),
    "continuous-no-cache": lambda: ContinuousScheduler(num_blocks=30, block_size=4, max_num_batched_tokens=12,
                                                       max_model_len=96, enable_prefix_caching=False),
    "orca": lambda: OrcaScheduler(num_blocks=60, block_size=4, max_num_batched_tokens=96, max_model_len=96,
                                  reservation="max_model_len", enable_chunked_prefill=False),
}

request_sets = st.lists(st.tuples(st.integers(0, 2), st.integers(1, 60), st.integers(1, 30),
                                  st.floats(0.0, 0.2, allow_nan=False)), min_size=1, max_size=20)


def build_requests(specs) -> tuple[list[Request], list[float]]:
    """Requests from (shared-prefix id, prompt length, max_tokens, arrival gap) tuples."""
    reqs, arrivals, t = [], [], 0.0
    for i, (prefix, plen, max_tokens, gap) in enumerate(specs):
        t += gap
        prompt = [100 + prefix] * 8 + [(7 * i + j) % 50 + 1 for j in range(plen)]  # shared first block(s)
        reqs.append(Request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens), arrival_time=t))
        arrivals.append(t)
    return reqs, arrivals


@pytest.mark.parametrize("name", DRIVER_SCHEDULERS)
@examples(50)
@given(specs=request_sets)
def test_replica_makes_the_same_decisions_as_a_direct_driver(name, specs):
    reqs_a, arrivals = build_requests(specs)
    reqs_b, _ = build_requests(specs)
    direct = direct_drive(DRIVER_SCHEDULERS[name](), reqs_a, arrivals)
    simulated = replica_drive(DRIVER_SCHEDULERS[name](), reqs_b, arrivals)
    if any(preempted for _, (_, preempted) in direct):
        event("preemptions")
    if any(r.num_cached_prompt_tokens for r in reqs_a):
        event("prefix-cache hits")
    if any(r.outcome.value == "refused" for r in reqs_a):
        event("refusals")
    assert [s for _, s in simulated] == [s for _, s in direct]
    np.testing.assert_allclose([t for t, _ in simulated], [t for t, _ in direct], rtol=0, atol=1e-9)
    for a, b in zip(reqs_a, reqs_b):
        assert (a.outcome, a.num_output_tokens, a.num_preemptions) == (b.outcome, b.num_output_tokens,
                                                                        b.num_preemptions)
        assert a.finish_time == pytest.approx(b.finish_time, abs=1e-9)


# ---------------------------------------------------------------------------------------
# Monotonicity

def closed_loop_doc(engines_: dict, clients: int, prompt_high: int, output_high: int, seed: int,
                    model: str = "llama-3.1-8b", requests_per_client: int = 3) -> dict:
    return dict(name="mono", seed=seed, model=model,
                workload=dict(kind="closed_loop", clients=[clients], requests_per_client=requests_per_client,
                              prompt_tokens=dict(dist="uniform", low=1, high=prompt_high),
                              output_tokens=dict(dist="uniform", low=1, high=output_high)),
                engines=engines_, hardware=dict(preset="h100-sxm"))


def summarize_cell(exp, cell) -> dict:
    acc, _, _ = run_cell(exp, cell)
    return acc.summary()


@examples(25)
@given(blocks=st.integers(9, 60), extra=st.integers(1, 60), clients=st.integers(1, 12),
       prompt_high=st.integers(1, 300), output_high=st.integers(1, 200), seed=st.integers(0, 5))
def test_more_kv_blocks_never_lowers_completed_requests(blocks, extra, clients, prompt_high, output_high, seed):
    def completed(num_blocks: int) -> tuple[int, int]:
        doc = closed_loop_doc(dict(v=dict(scheduler="continuous", num_blocks=num_blocks, max_model_len=128,
                                          max_num_batched_tokens=256)),
                              clients, prompt_high, output_high, seed)
        doc["workload"]["prompt_tokens"]["high"] = min(prompt_high, 127)
        exp = load_experiment(to_toml(doc))
        s = summarize_cell(exp, exp.cells()[0])
        return s["completed"], s["num_requests"] - s["refused"]

    small, large = completed(blocks), completed(blocks + extra)
    assert large[0] >= small[0] and large[1] >= small[1]


@examples(20)
@given(clients=st.integers(1, 24), prompt_high=st.integers(1, 600), output_high=st.integers(1, 300),
       seed=st.integers(0, 5), model=st.sampled_from(["tiny", "llama-3.1-8b"]))
def test_continuous_batching_throughput_is_never_below_sequential(clients, prompt_high, output_high, seed, model):
    vllm = dict(scheduler="continuous")  # vLLM defaults (pool sized from memory) for llama-3.1-8b
    if model == "tiny":
        vllm["num_blocks"] = 2048  # 32k tokens; from memory it would be ~17 million blocks
    doc = closed_loop_doc(dict(seq=dict(scheduler="sequential", num_parallel=1, weights="fp16", max_queue=512),
                               vllm=vllm),
                          clients, prompt_high, output_high, seed, model=model, requests_per_client=2)
    exp = load_experiment(to_toml(doc))
    seq, cont = (summarize_cell(exp, cell) for cell in exp.cells())
    assert seq["completed"] == cont["completed"] == seq["num_requests"]
    assert cont["output_throughput"] >= seq["output_throughput"] * (1 - 1e-9)


# ---------------------------------------------------------------------------------------
# Determinism

DETERMINISM_TOML = """
name = "determinism"
seed = 7
model = "llama-3.1-8b"
[workload]
kind = "poisson"
rates = [4.0, 40.0]
num_requests = 60
timeout_s = 5.0
[workload.prompt_tokens]
dist = "lognormal"
mean = 160
sigma = 1.0
max = 2000
[workload.output_tokens]
dist = "lognormal"
mean = 200
sigma = 1.0
max = 1000
[workload.shared_prefix]
fraction = 0.5
tokens = 64
[engines.vllm]
scheduler = "continuous"
[engines.ollama]
scheduler = "sequential"
num_parallel = 2
[hardware]
preset = "h100-sxm"
replicas = 2
router = "least_outstanding"
"""


def test_same_config_and_seed_give_identical_files(tmp_path):
    exp = load_experiment(DETERMINISM_TOML)
    run_experiment(exp, tmp_path / "a", progress=False)
    run_experiment(exp, tmp_path / "b", progress=False)
    for name in ("requests.csv", "summary.json", "timeseries.csv"):
        a, b = (tmp_path / "a" / name).read_bytes(), (tmp_path / "b" / name).read_bytes()
        assert a and a == b, name


# ---------------------------------------------------------------------------------------
# Bad configs name the key

BASE = dict(name="bad", model="llama-3.1-8b",
            workload=dict(kind="closed_loop", clients=[1], requests_per_client=1,
                          prompt_tokens=dict(dist="fixed", value=10), output_tokens=dict(dist="fixed", value=10)),
            # max_model_len fits the reference engine's 1 GiB pool too (without a device the default 131072 is
            # refused at load, as vLLM refuses a context whose KV does not fit, before the missing device is named)
            engines=dict(v=dict(scheduler="continuous", max_model_len=4096)), hardware=dict(preset="h100-sxm"))


def with_changes(**changes) -> str:
    doc = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}
    for path, value in changes.items():
        keys = path.split("__")
        d = doc
        for k in keys[:-1]:
            d[k] = dict(d[k])
            d = d[k]
        if value is None:
            d.pop(keys[-1])
        else:
            d[keys[-1]] = value
    return to_toml(doc)


@pytest.mark.parametrize("changes, field", [
    (dict(hardware__preset=None), "hardware.preset"),  # roofline needs a device
    (dict(hardware__router="random"), "hardware.router"),
    (dict(hardware__preset="h100-sxmm"), "hardware.preset"),
    (dict(cost_model=dict(kind="calibrated")), "cost_model.profile"),
    (dict(cost_model=dict(kind="calibrated", profile="no/such/profile.csv")), "cost_model.profile"),
    (dict(cost_model=dict(kind="roofline", mem_efficiency=1.5)), "cost_model.mem_efficiency"),
    (dict(model="llama-3.1-70b"), "engines.v.weights"),  # 140 GB of fp16 weights on an 80 GB device
    (dict(engines=dict(o=dict(scheduler="sequential", num_parallel=64, num_ctx=131072))),
     "engines.o.num_parallel"),
])
def test_run_level_errors_name_the_key(tmp_path, changes, field):
    with pytest.raises(ConfigError) as e:
        exp = load_experiment(with_changes(**changes))
        run_experiment(exp, tmp_path, progress=False)
    assert e.value.field == field, str(e.value)


DIRECT_TOML = """
name = "direct"
seed = {seed}
model = "llama-3.1-8b"
[workload]
{load}
num_requests = 120
[workload.prompt_tokens]
dist = "lognormal"
mean = 120
sigma = 1.0
max = 400
[workload.output_tokens]
dist = "lognormal"
mean = 60
sigma = 1.0
max = 100
[workload.shared_prefix]
fraction = 0.5
tokens = 32
[engines.vllm]
scheduler = "continuous"
max_num_seqs = 8
max_num_batched_tokens = 64
max_queue = {max_queue}
num_blocks = {blocks}
max_model_len = 512
[engines.orca]
scheduler = "orca"
max_num_seqs = 4
max_queue = {max_queue}
num_blocks = {blocks}
max_model_len = 512
[engines.ollama]
scheduler = "sequential"
num_parallel = 2
max_queue = {max_queue}
num_ctx = 1024
[hardware]
preset = "h100-sxm"
"""


CLOSED_LOOP = 'kind = "closed_loop"\nclients = [1, 9, 40]'
OPEN_LOOP = 'kind = "poisson"\nrates = [20.0, inf]'


@pytest.mark.parametrize("load", [CLOSED_LOOP, OPEN_LOOP])
@pytest.mark.parametrize("seed, max_queue, blocks", [(1, 0, 0), (2, 3, 40), (3, 1, 64)])
def test_clients_without_a_process_per_request_give_identical_files(tmp_path, load, seed, max_queue, blocks):
    """Replica.submit's `then` (no process or event per request) and steps without an event when nothing else is
    scheduled (Replica's FAST_FORWARD), against a SimPy process per request and a Timeout per step: the same
    files, with refusals (max_queue), preemptions (few blocks), the fast and the teaching paths."""
    exp = load_experiment(DIRECT_TOML.format(load=load, seed=seed, max_queue=max_queue, blocks=blocks))
    outcomes = set()
    for implementation in ("fast", "teaching"):
        for direct in (True, False):
            with mock.patch.object(sim.lab.simulate, "DIRECT_CLIENTS", direct), \
                    mock.patch.object(sim.core.replica, "FAST_FORWARD", direct):
                run_experiment(exp, tmp_path / f"{implementation}-{direct}", progress=False,
                               implementation="auto" if implementation == "fast" else "teaching")
        for name in ("requests.csv", "summary.json", "timeseries.csv", "itl_histograms.json"):
            a, b = ((tmp_path / f"{implementation}-{d}" / name).read_bytes() for d in (True, False))
            assert a and a == b, (implementation, name)
        outcomes |= set(pd.read_csv(tmp_path / f"{implementation}-True" / "requests.csv")["outcome"])
    if max_queue:
        assert "refused" in outcomes
