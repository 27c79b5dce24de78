"""The fast path makes the teaching schedulers' decisions: a differential test, step by step.

reference.schedulers.ContinuousScheduler / SequentialScheduler (with reference.block_manager)
define each policy; sim.core.fast implements them event by event. Random workloads (arrivals,
lengths, shared prefixes, a tight or ample pool, preemptions, aborts mid-step and between steps)
go through both in lockstep, and every step must agree on: the batch (request, start, tokens per
chunk, in order), who was preempted, the step's shape, KV usage, free blocks, each running
request's block count, evictions, cached blocks, who finished, and every request's record
(outputs, token times, computed tokens, cache hits, preemptions, outcome). The fast pool's
handles are not BlockManager's block ids, so tables are compared by size (see sim.core.fast.pool).
Then whole simulations: simulate_cell and run_experiment give the same records and the same files
byte for byte whichever implementation runs.
"""
from __future__ import annotations

import math
import random
from pathlib import Path

import hypothesis.strategies as st
import pandas as pd
import pytest
from hypothesis import HealthCheck, event, given, settings

from reference.batch import StepShape
from reference.config import get_preset
from reference.errors import ConfigError
from reference.request import Outcome, Request, SamplingParams, Status
from reference.schedulers import (
    ContinuousScheduler,
    OrcaScheduler,
    SequentialScheduler,
    StaticScheduler,
)
from sim.core.fast import (
    FastContinuousScheduler,
    FastSequentialScheduler,
    LazyRequest,
    fast_twin,
)
from sim.core.fast.pool import HybridPool
from sim.core.replica import SIM_TOKEN
from sim.core.roofline import RooflineCostModel
from sim.lab.experiment import load_experiment
from sim.lab.metrics import CellAccumulator
from sim.lab.simulate import run_experiment, simulate_cell


def examples(n: int) -> settings:
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------
# Workloads: the same requests twice (plain for the teaching scheduler, lazy for the fast one)

PRIVATE_TOKEN = 1000  # first private token of request i is PRIVATE_TOKEN + i: its blocks are provably its own


@st.composite
def workloads(draw, max_requests: int = 30) -> dict:
    """Requests (prompt, max_tokens, arrival step, abort step or None) and how their content may be shared.

    unique = True: each prompt is a shared prefix (or none) then a token no other request has, so
    the fast pool may count the blocks after it; False: a 3-token vocabulary, repeated prompts,
    every block tracked exactly (the fast pool must then find the same hits, outputs included).
    """
    rnd = random.Random(draw(st.integers(0, 2 ** 32)))
    unique = draw(st.booleans())
    prefixes = [[rnd.randint(1, 3) for _ in range(rnd.randint(1, 40))] for _ in range(2)]
    heads = [tuple(p) for p in prefixes]  # one object per prefix, shared by its requests, as the simulator's are
    n = draw(st.integers(1, max_requests))
    spread = draw(st.sampled_from([0, 3, 40]))
    reqs = []
    for i in range(n):
        pid = rnd.choice([None, 0, 1])
        prefix = prefixes[pid] if pid is not None else []
        if unique:
            rest = [PRIVATE_TOKEN + i] + [rnd.randint(1, 3) for _ in range(rnd.randint(0, 20))]
        else:
            rest = [rnd.randint(1, 2) for _ in range(rnd.randint(1, 20))]
        abort = rnd.randint(0, 60) if rnd.random() < 0.15 else None
        reqs.append(dict(prompt=prefix + rest, max_tokens=rnd.randint(1, 25), arrival=rnd.randint(0, spread),
                         abort=abort, mid_step=rnd.random() < 0.5, unique_from=len(prefix) if unique else None,
                         head=heads[pid] if pid is not None else ()))
    return dict(requests=reqs, unique=unique)


def teaching_requests(w: dict) -> list[Request]:
    return [Request(f"r{i}", list(r["prompt"]), SamplingParams(max_tokens=r["max_tokens"]))
            for i, r in enumerate(w["requests"])]


def fast_requests(w: dict) -> list[LazyRequest]:
    return [LazyRequest(f"r{i}", len(r["prompt"]), r["head"], lambda p=r["prompt"]: list(p),
                        SamplingParams(max_tokens=r["max_tokens"]), 0.0, r["unique_from"])
            for i, r in enumerate(w["requests"])]


def record(r: Request) -> tuple:
    return (r.request_id, r.status, r.outcome, r.reason, r.num_computed_tokens, r.output_token_ids, list(r.token_times),
            r.first_scheduled_time, r.first_token_time, r.finish_time, r.num_cached_prompt_tokens, r.num_preemptions)


def teaching_batch(out) -> list[tuple]:
    return [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks]


def fast_batch(sched, step) -> list[tuple]:
    """The fast step as the teaching scheduler lists it: running requests in order, then admissions."""
    g = sched.group
    decodes = [(r.request_id, g.members[id(r)].position_at(step.index), 1)
               for r in sched.running.values() if id(r) in g.members]
    if isinstance(sched, FastSequentialScheduler):
        return decodes + [(r.request_id, s, n) for r, s, n in step.specials]
    # continuous: the partial (newest running) chunk is last among running ones, then admissions
    return decodes + [(r.request_id, s, n) for r, s, n in step.specials]


def cached_blocks(sched: FastContinuousScheduler) -> int:
    """len(BlockManager.cached) as the fast pool knows it (after an update, records settled)."""
    pool = sched.pool
    held = sum(pool.registered_private(sched.holdings[id(r)], r.num_computed_tokens) for r in sched.running.values())
    return len(pool.cached) + pool.cached_free_private() + held


def lockstep(teaching, fast, w: dict, step_seconds=lambda shape: 0.01 + 1e-4 * shape.new_tokens) -> dict:
    """Drive both schedulers with the same workload, checking they agree after every call. Returns what happened."""
    a_reqs, b_reqs = teaching_requests(w), fast_requests(w)
    specs = w["requests"]
    paged = isinstance(teaching, ContinuousScheduler)
    seen = dict(preemptions=0, hits=0, aborts=0, refusals=0, steps=0)
    t, step, nxt = 0.0, 0, 0
    order = sorted(range(len(specs)), key=lambda i: specs[i]["arrival"])

    def abort_due(mid_step: bool) -> None:
        for i in order[:nxt]:
            s = specs[i]
            if s["abort"] == step and s["mid_step"] == mid_step and a_reqs[i].status is not Status.FINISHED:
                teaching.abort(a_reqs[i], t, Outcome.TIMED_OUT, "client timeout")
                fast.abort(b_reqs[i], t, Outcome.TIMED_OUT, "client timeout")
                seen["aborts"] += 1

    while nxt < len(order) or teaching.has_unfinished():
        while nxt < len(order) and specs[order[nxt]]["arrival"] <= step:
            i = order[nxt]
            accepted = teaching.add(a_reqs[i], t)
            assert fast.add(b_reqs[i], t) == accepted
            seen["refusals"] += not accepted
            nxt += 1
        abort_due(mid_step=False)
        assert fast.has_unfinished() == teaching.has_unfinished()
        assert (fast.num_waiting, fast.num_running) == (teaching.num_waiting, teaching.num_running)
        if not teaching.has_unfinished():
            step, t = step + 1, t + 1.0
            continue
        out, fstep = teaching.schedule(t), fast.schedule(t)
        assert fast_batch(fast, fstep) == teaching_batch(out), f"step {step}"
        assert [r.request_id for r in fstep.preempted] == [r.request_id for r in out.preempted]
        assert fstep.is_empty == out.is_empty
        assert fstep.shape == out.shape
        assert fast.kv_usage() == teaching.kv_usage()
        assert fast.num_preemptions == teaching.num_preemptions
        if paged:
            bm = teaching.blocks
            assert fast.pool.free_total == bm.num_free_blocks
            for r in fast.running.values():
                assert fast.blocks_held(r) == len(bm.tables[r.request_id]), r.request_id
        seen["preemptions"] += len(out.preempted)
        abort_due(mid_step=True)
        t += step_seconds(out.shape)
        if not out.is_empty:
            seen["steps"] += 1
            done_a = teaching.update(out, [SIM_TOKEN] * sum(c.samples for c in out.chunks), t)
            done_b = fast.update(fstep, None, t)
            assert [r.request_id for r in done_b] == [r.request_id for r in done_a]
            fast.settle()
            if paged:
                assert fast.pool.num_evictions == teaching.blocks.num_evictions
                assert cached_blocks(fast) == len(teaching.blocks.cached)
            for a, b in zip(a_reqs, b_reqs):
                assert record(b) == record(a)
        step += 1
        assert step < 20_000
    for a, b in zip(a_reqs, b_reqs):
        assert record(b) == record(a)
    if paged:  # every block back in the pool, reference counts and all
        assert fast.pool.free_total == fast.pool.num_usable and not fast.pool.dup and not fast.holdings
        assert fast.kv_usage() == teaching.kv_usage()
    seen["hits"] = sum(r.num_cached_prompt_tokens for r in a_reqs)
    return seen


# ---------------------------------------------------------------------------------------
# Continuous batching: ContinuousScheduler vs FastContinuousScheduler

@st.composite
def continuous_configs(draw) -> dict:
    bs = draw(st.sampled_from([1, 2, 4, 16]))
    max_len = 64  # prompts <= 60 tokens, outputs <= 25: some requests are refused
    min_blocks = -(-max_len // bs) + 1
    seqs = draw(st.sampled_from([1, 2, 4, 8]))
    chunked = draw(st.booleans())
    budget = max(seqs, draw(st.sampled_from([1, 5, 8, 32, 64]))) if chunked else max(seqs, max_len)
    return dict(num_blocks=draw(st.sampled_from([min_blocks, min_blocks + 3, 2 * min_blocks, 8 * min_blocks])),
                block_size=bs, max_num_seqs=seqs, max_num_batched_tokens=budget, max_model_len=max_len,
                enable_chunked_prefill=chunked, enable_prefix_caching=draw(st.booleans()),
                max_queue=draw(st.sampled_from([0, 0, 3])))


@examples(300)
@given(cfg=continuous_configs(), w=workloads())
def test_fast_continuous_scheduler_decides_as_the_teaching_one(cfg, w):
    seen = lockstep(ContinuousScheduler(**cfg), FastContinuousScheduler(**cfg), w)
    for name, n in seen.items():
        if n and name != "steps":
            event(name)
    event("unique private content" if w["unique"] else "every block exact")


def test_private_blocks_recomputed_while_their_old_copies_are_cached():
    """The rarest path of the counted pool: a preempted request's shared prefix block is evicted while its
    private blocks stay cached; readmitted, it misses, recomputes, and its new private blocks stay unregistered
    (their keys are still held by the old copies), so they go back to the pool uncached."""
    unregistered = 0
    for num_blocks in (30, 34, 38):
        for t_max, r_extra, r_max in ((30, 4, 30), (40, 8, 40), (40, 2, 40)):
            prefix = [7, 7]
            specs = [([100, 101, 102, 103], t_max, 0), (prefix + [200], 1, 1), (prefix + [300] + [5] * r_extra, r_max, 1)]
            w = dict(unique=True, requests=[
                dict(prompt=p, max_tokens=m, arrival=at, abort=None, mid_step=False, unique_from=2 if i else 0,
                     head=tuple(prefix) if i else ()) for i, (p, m, at) in enumerate(specs)])
            cfg = dict(num_blocks=num_blocks, block_size=2, max_num_seqs=4, max_num_batched_tokens=5,
                       max_model_len=128)
            fast = FastContinuousScheduler(**cfg)
            register = fast.pool.register

            def spy(hold, req, num_computed, register=register):
                nonlocal unregistered
                before = len(hold.unreg)
                register(hold, req, num_computed)
                unregistered += len(hold.unreg) > before

            fast.pool.register = spy
            lockstep(ContinuousScheduler(**cfg), fast, w)
    assert unregistered, "the scenario no longer reaches the path it exists for"


# ---------------------------------------------------------------------------------------
# Slots: SequentialScheduler vs FastSequentialScheduler

@examples(150)
@given(num_parallel=st.integers(1, 4), n_batch=st.sampled_from([1, 4, 16, 2048]),
       max_queue=st.sampled_from([0, 2, 512]), w=workloads())
def test_fast_sequential_scheduler_decides_as_the_teaching_one(num_parallel, n_batch, max_queue, w):
    cfg = dict(num_parallel=num_parallel, num_ctx=72, max_queue=max_queue, n_batch=n_batch)
    lockstep(SequentialScheduler(**cfg), FastSequentialScheduler(**cfg), w)


# ---------------------------------------------------------------------------------------
# Which implementation runs

def test_fast_twins_exist_only_for_the_policies_they_implement():
    assert isinstance(fast_twin(ContinuousScheduler(100, 16, 8, 64, 512)), FastContinuousScheduler)
    assert isinstance(fast_twin(SequentialScheduler(2, 512)), FastSequentialScheduler)
    assert fast_twin(OrcaScheduler(100, 16, 8, 512, 512, enable_chunked_prefill=False)) is None
    assert fast_twin(StaticScheduler(2, 512, 1024)) is None
    assert fast_twin(ContinuousScheduler(100, 16, 64, 32, 512)) is None  # decoders could run out of budget
    with pytest.raises(ConfigError, match="max_num_seqs"):
        FastContinuousScheduler(100, 16, 64, 32, 512)


def test_lazy_request_draws_its_prompt_only_when_read():
    draws = []
    prompt = [5, 6, 7, 8, 9]

    def draw():
        draws.append(1)
        return list(prompt)

    r = LazyRequest("r0", 5, (5, 6), draw, SamplingParams(max_tokens=3), 0.5, unique_from=2)
    assert (r.num_prompt_tokens, r.num_tokens, r.max_total_tokens) == (5, 5, 8) and not draws
    assert list(r.prompt_head(2)) == [5, 6] and not draws
    assert r.token_ids() == prompt and r.prompt_token_ids == prompt and len(draws) == 1
    with pytest.raises(ConfigError, match="prompt"):
        LazyRequest("r1", 0, (), draw, SamplingParams(), 0.0)


def test_pool_counts_match_a_fresh_block_manager():
    pool = HybridPool(11, 4)
    assert (pool.free_total, pool.reserved_blocks(), pool.num_usable) == (10, 0, 10)


TOML = """
name = "fastpath"
seed = {seed}
model = "llama-3.1-8b"
[workload]
kind = "{kind}"
timeout_s = {timeout}
{load}
[workload.prompt_tokens]
dist = "lognormal"
mean = 120
sigma = 1.0
max = 1500
[workload.output_tokens]
dist = "lognormal"
mean = 80
sigma = 1.0
max = 600
[workload.shared_prefix]
fraction = 0.6
tokens = {prefix}
num_prefixes = 2
[engines.vllm]
scheduler = "continuous"
num_blocks = {blocks}
max_num_seqs = 32
max_model_len = 2200
[engines.ollama]
scheduler = "sequential"
num_parallel = 3
weights = "fp16"
max_queue = 20
[engines.orca]
scheduler = "orca"
num_blocks = 400
max_model_len = 2200
[hardware]
preset = "h100-sxm"
replicas = {replicas}
router = "least_outstanding"
"""


def test_implementation_is_validated():
    exp = load_experiment(TOML.format(seed=0, kind="closed_loop", timeout=0.0, load="clients = [2]\nnum_requests = 4",
                                      prefix=16, blocks=400, replicas=1))
    acc = CellAccumulator("orca", 2)
    cell = next(c for c in exp.cells() if c.engine == "orca")
    with pytest.raises(ConfigError, match="implementation"):
        simulate_cell(exp, cell, acc, implementation="quick")
    with pytest.raises(ConfigError, match="no fast path"):
        simulate_cell(exp, cell, acc, implementation="fast")


def rows_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            same = (x[k] == y[k]) or (isinstance(x[k], float) and math.isnan(x[k]) and math.isnan(y[k]))
            assert same, (k, x, y)


@examples(12)
@given(seed=st.integers(0, 5), closed=st.booleans(), timeout=st.sampled_from([0.0, 0.0, 0.3, 2.0]),
       prefix=st.sampled_from([16, 40]), blocks=st.sampled_from([160, 2000]), replicas=st.integers(1, 2))
def test_simulations_are_identical_whichever_implementation_runs(seed, closed, timeout, prefix, blocks, replicas):
    load = "clients = [8]\nnum_requests = 40" if closed else "rates = [20.0]\nnum_requests = 40"
    doc = TOML.format(seed=seed, kind="closed_loop" if closed else "poisson", timeout=timeout, load=load,
                      prefix=prefix, blocks=blocks, replicas=replicas)
    exp = load_experiment(doc)
    for cell in exp.cells():
        if cell.engine == "orca":
            continue
        results = []
        for impl in ("teaching", "fast"):
            acc = CellAccumulator(cell.engine, cell.concurrency, cell.request_rate, keep_token_times=True)
            facts = simulate_cell(exp, cell, acc, implementation=impl)
            results.append((acc, facts))
        (a, fa), (b, fb) = results
        rows_equal(a.rows, b.rows)
        pd.testing.assert_frame_equal(fa.pop("timeseries"), fb.pop("timeseries"))
        assert fa == fb
        if fa["preemptions"]:
            event("preemptions")
        if any(r["outcome"] == "timed_out" for r in a.rows):
            event("timeouts")


def test_results_files_are_byte_identical(tmp_path: Path):
    doc = TOML.format(seed=3, kind="poisson", timeout=1.0, load="rates = [10.0, inf]\nnum_requests = 60",
                      prefix=40, blocks=160, replicas=2)
    exp = load_experiment(doc)
    run_experiment(exp, tmp_path / "teaching", progress=False, implementation="teaching")
    run_experiment(exp, tmp_path / "auto", progress=False)
    for name in ("requests.csv", "summary.json", "timeseries.csv", "itl_histograms.json"):
        a, b = (tmp_path / "teaching" / name).read_bytes(), (tmp_path / "auto" / name).read_bytes()
        assert a and a == b, name
    summary = pd.read_json(tmp_path / "auto" / "summary.json")
    assert summary["preemptions"].sum() > 0 and summary["timed_out"].sum() > 0  # the test exercises both


def test_prompts_are_drawn_only_where_caching_could_hit():
    """With block-aligned shared prefixes, the fast path draws a prompt only when its random part is too short
    to make its blocks private (then every block of it is tracked exactly)."""
    doc = TOML.format(seed=1, kind="closed_loop", timeout=0.0, load="clients = [16]\nnum_requests = 300",
                      prefix=32, blocks=20000, replicas=1)
    exp = load_experiment(doc)
    cell = next(c for c in exp.cells() if c.engine == "vllm")
    seen = []
    simulate_cell(exp, cell, CellAccumulator("vllm", 16), implementation="fast", on_request=seen.append)
    assert len(seen) == 300 and all(isinstance(r, LazyRequest) for r in seen)
    drawn = [r for r in seen if r._prompt is not None]
    assert all(r.unique_from is None for r in drawn)
    assert len(drawn) < len(seen) / 10


@examples(300)
@given(st.integers(0, 8192), st.integers(0, 1024), st.integers(0, 8), st.integers(0, 10 ** 8),
       st.integers(0, 10 ** 11), st.sampled_from(["h100-sxm", "a100-80gb", "rtx-4090"]), st.sampled_from([1, 2]))
def test_roofline_step_seconds_is_step_time_total(prefill, decodes, prefill_seqs, kv, pairs, hardware, tp):
    """The simulator prices steps with step_seconds, which skips the StepCost: the same float as step_time's total."""
    try:
        cm = RooflineCostModel(get_preset("llama-3.1-8b"), hardware, tp=tp)
    except ConfigError:
        return  # no interconnect for tensor parallelism on this card
    shape = StepShape(prefill, decodes, prefill_seqs, kv, pairs)
    assert cm.step_seconds(shape) == cm.step_time(shape).total_s
