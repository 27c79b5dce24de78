"""The real JAX engine (tiny model, float32): outputs that do not depend on scheduling, sampling
that does not depend on the batch, complete timing records, the simulator making the very same
scheduling decisions given the same step times, and client timeouts that free KV.

Compilation dominates the runtime, so every test reuses a handful of KV layouts (and so the
same compiled steps).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import simpy

from reference.config import get_preset
from reference.engine import ArrivalSource, Engine, ManualClock
from reference.layout import PagedLayout, SlotLayout
from reference.model import forward_dense, init_params
from reference.request import Outcome, Request, SamplingParams, Status
from reference.runner import ModelRunner
from reference.schedulers import ContinuousScheduler, OrcaScheduler, SequentialScheduler, StaticScheduler
from sim.core.replica import Replica

CFG = get_preset("tiny")
PARAMS = init_params(CFG, seed=11)
MAX_LEN = 64  # tokens per request, at most (and the dense reference's padded length)
GREEDY = SamplingParams(max_tokens=8)

_rng = np.random.default_rng(2024)
PREFIX = _rng.integers(0, CFG.vocab_size, 16).tolist()  # one block of 16, four of 4: prefix-cache hits
PROMPTS = [PREFIX + _rng.integers(0, CFG.vocab_size, 5).tolist(),
           _rng.integers(0, CFG.vocab_size, 13).tolist(),
           PREFIX + _rng.integers(0, CFG.vocab_size, 14).tolist(),
           _rng.integers(0, CFG.vocab_size, 3).tolist(),
           PREFIX + _rng.integers(0, CFG.vocab_size, 2).tolist()]

# ---------------------------------------------------------------------------------- helpers

_dense = jax.jit(forward_dense, static_argnums=1)


@functools.cache
def dense_greedy(prompt: tuple[int, ...], n: int) -> tuple[int, ...]:
    """Greedy tokens by full recomputation of the whole sequence at every step (no KV cache)."""
    toks = list(prompt)
    for _ in range(n):
        x = np.zeros((1, MAX_LEN), np.int32)  # causal: padding after the sequence changes nothing
        x[0, :len(toks)] = toks
        toks.append(int(jnp.argmax(_dense(PARAMS, CFG, jnp.asarray(x))[0, len(toks) - 1])))
    return tuple(toks[len(prompt):])


def expected(i: int, n: int = GREEDY.max_tokens) -> list[int]:
    return list(dense_greedy(tuple(PROMPTS[i]), n))


# One device cache shape per block size (and one for slots), at least as large as any scheduler's
# pool, and buckets no smaller than the largest step here: every runner of this file then runs
# the same few compiled steps (a compilation costs seconds on CPU, a step a millisecond).
RUNNER_LAYOUTS = {1: PagedLayout(257, 1), 4: PagedLayout(65, 4), 16: PagedLayout(17, 16)}
RUNNER_SLOTS = SlotLayout(3, MAX_LEN)


def make_runner(sched) -> ModelRunner:
    """A runner for the scheduler's KV layout; its block ids / slots index the runner's cache."""
    lay = sched.layout
    if isinstance(lay, PagedLayout):
        kv = RUNNER_LAYOUTS[lay.block_size]
        assert lay.num_blocks <= kv.num_blocks
        min_blocks = MAX_LEN // lay.block_size
    else:
        kv = RUNNER_SLOTS
        assert lay.num_slots <= kv.num_slots and lay.max_len == kv.max_len
        min_blocks = 4
    return ModelRunner(CFG, PARAMS, layout=kv, min_tokens=64, min_seqs=8, min_blocks=min_blocks)


SCHEDULERS = {
    "sequential-1": lambda: SequentialScheduler(1, num_ctx=MAX_LEN),
    "sequential-3": lambda: SequentialScheduler(3, num_ctx=MAX_LEN, n_batch=16),  # prompts in chunks of <= 16
    "static": lambda: StaticScheduler(max_batch_size=3, max_model_len=MAX_LEN),
    "continuous-bs16": lambda: ContinuousScheduler(17, 16, max_model_len=MAX_LEN),
    "continuous-bs4-chunked": lambda: ContinuousScheduler(65, 4, max_num_batched_tokens=8, max_model_len=MAX_LEN),
    "continuous-bs4-no-prefix": lambda: ContinuousScheduler(65, 4, max_model_len=MAX_LEN,
                                                            enable_prefix_caching=False),
    "continuous-bs1-no-prefix": lambda: ContinuousScheduler(257, 1, max_model_len=MAX_LEN,
                                                            enable_prefix_caching=False),
    "orca": lambda: OrcaScheduler(65, 4, max_num_batched_tokens=MAX_LEN, max_model_len=MAX_LEN,
                                  enable_chunked_prefill=False, reservation="max_model_len"),
    # 11 usable blocks of 4 tokens for requests of up to 38 tokens: preemptions and recompute.
    "preempt": lambda: ContinuousScheduler(12, 4, max_num_batched_tokens=16, max_model_len=MAX_LEN),
    "preempt-no-prefix": lambda: ContinuousScheduler(12, 4, max_num_batched_tokens=16, max_model_len=MAX_LEN,
                                                     enable_prefix_caching=False),
}


def make_engine(name: str, **kw) -> Engine:
    sched = SCHEDULERS[name]()
    return Engine(sched, make_runner(sched), **kw)


def serve(engine: Engine, prompts, arrivals=None, sampling=GREEDY, ids=None, steps: list | None = None) -> list[Request]:
    """Request i joins at step arrivals[i]; run to completion; requests in prompt order (step records into steps)."""
    ids = ids or [f"r{i}" for i in range(len(prompts))]
    sps = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
    reqs = [Request(rid, list(p), sp) for rid, p, sp in zip(ids, prompts, sps)]
    arrivals = arrivals or [0] * len(reqs)
    pending = sorted(range(len(reqs)), key=lambda i: arrivals[i])
    step = 0
    while pending or engine.scheduler.has_unfinished():
        while pending and arrivals[pending[0]] <= step:
            assert engine.add(reqs[pending.pop(0)])
        record = engine.step()
        if record is not None and steps is not None:
            steps.append(record)
        step += 1
        assert step < 2000
    assert all(r.outcome is Outcome.COMPLETED for r in reqs), [r.reason for r in reqs]
    return reqs


# (which prompts, arrival step of each): all at once, staggered, a subset in another order.
MIXES = [([0, 1, 2, 3, 4], [0, 0, 0, 0, 0]),
         ([0, 1, 2, 3, 4], [0, 4, 6, 1, 12]),
         ([4, 2, 0], [0, 0, 3])]


# ---------------------------------------------------------------------------------- greedy


def test_dense_reference_agrees_with_the_engine():
    """The no-cache reference against one plain engine run (the other tests compare with it too)."""
    reqs = make_engine("continuous-bs16").generate(PROMPTS, GREEDY)
    assert [r.output_token_ids for r in reqs] == [expected(i) for i in range(len(PROMPTS))]


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_greedy_outputs_do_not_depend_on_scheduling(name):
    for which, arrivals in MIXES:
        engine = make_engine(name)
        steps = []
        reqs = serve(engine, [PROMPTS[i] for i in which], arrivals, steps=steps)
        assert [r.output_token_ids for r in reqs] == [expected(i) for i in which], (name, which, arrivals)
        sched = engine.scheduler
        if name.startswith("preempt") and len(which) == 5:
            assert sched.num_preemptions > 0
            assert any(r.num_preemptions for r in reqs)
        if isinstance(sched, ContinuousScheduler):
            hits = sum(r.num_cached_prompt_tokens for r in reqs)
            if not sched.blocks.enable_prefix_caching:
                assert hits == 0
            elif arrivals != [0] * len(which):  # a later request finds the shared prefix computed
                assert hits > 0, name
            assert sched.blocks.num_free_blocks == sched.blocks.num_usable_blocks  # all KV back
    if name.startswith("sequential"):
        assert steps and all(s.shape.num_seqs <= int(name[-1]) for s in steps)
    if name == "continuous-bs4-chunked":
        assert max(s.shape.new_tokens for s in steps) <= 8
        assert max(r.num_prompt_tokens for r in reqs) > 8  # so a prompt really was chunked


# ---------------------------------------------------------------------------------- sampling


SAMPLED = SamplingParams(max_tokens=8, temperature=0.9, top_k=40, top_p=0.95, seed=1234)


def test_same_seed_same_tokens_whatever_the_batch():
    alone = serve(make_engine("continuous-bs4-no-prefix"), [PROMPTS[1]], sampling=SAMPLED)[0].output_token_ids
    mix = [SAMPLED if i == 1 else GREEDY for i in range(5)]
    crowd = serve(make_engine("continuous-bs4-chunked"), PROMPTS, arrivals=[0, 3, 0, 1, 2], sampling=mix,
                  ids=list("abcde"))[1].output_token_ids
    assert crowd == alone
    seq = serve(make_engine("sequential-3"), PROMPTS[::-1], sampling=mix[::-1])[3].output_token_ids
    assert seq == alone
    other = SamplingParams(**{**SAMPLED.__dict__, "seed": 99})
    assert serve(make_engine("continuous-bs4-no-prefix"), [PROMPTS[1]], sampling=other)[0].output_token_ids != alone


@pytest.mark.parametrize("name", ["continuous-bs4-chunked", "sequential-3"])
def test_stop_tokens_and_max_tokens(name):
    full = expected(1)
    stop = full[4]
    k = full.index(stop)
    params = [SamplingParams(max_tokens=5), SamplingParams(max_tokens=8, stop_token_ids=(stop,)),
              SamplingParams(max_tokens=3), SamplingParams(max_tokens=1)]
    reqs = serve(make_engine(name), PROMPTS[:4], sampling=params)
    assert reqs[1].output_token_ids == full[:k + 1]  # ends on the stop token, early
    for i in (0, 2, 3):
        assert reqs[i].output_token_ids == expected(i)[:params[i].max_tokens]


# ---------------------------------------------------------------------------------- online API


class ListSource(ArrivalSource):
    """Fixed requests with their arrival times."""

    def __init__(self, reqs):
        self.reqs = reqs

    def initial(self):
        return self.reqs


class Clients(ArrivalSource):
    """Closed loop: each client sends its next request the moment its previous one ends."""

    def __init__(self, per_client: list[list[Request]]):
        self.queues = [list(q) for q in per_client]
        self.client = {id(r): c for c, q in enumerate(per_client) for r in q}

    def initial(self):
        firsts = [q.pop(0) for q in self.queues if q]
        for r in firsts:
            r.arrival_time = 0.0
        return firsts

    def after(self, req, now):
        q = self.queues[self.client[id(req)]]
        if not q:
            return []
        nxt = q.pop(0)
        nxt.arrival_time = now
        return [nxt]


@pytest.mark.parametrize("name, limit", [("continuous-bs4-no-prefix", "max_model_len"), ("sequential-3", "num_ctx"),
                                         ("static", "max_model_len")])
def test_timing_records_and_refusals(name, limit):
    engine = make_engine(name)
    reqs = [Request(f"r{i}", list(p), GREEDY, arrival_time=0.004 * i) for i, p in enumerate(PROMPTS)]
    too_long = Request("long", [1] * (MAX_LEN - 2), GREEDY, arrival_time=0.002)
    ended = []
    engine.run(ListSource(reqs + [too_long]), on_finish=ended.append)
    assert sorted(r.request_id for r in ended) == sorted(r.request_id for r in reqs + [too_long])
    for i, r in enumerate(reqs):
        assert r.outcome is Outcome.COMPLETED and r.status is Status.FINISHED
        assert r.arrival_time <= r.first_scheduled_time <= r.first_token_time <= r.finish_time
        assert len(r.token_times) == r.num_output_tokens == GREEDY.max_tokens
        assert r.token_times == sorted(r.token_times) and r.token_times[0] == r.first_token_time
        assert r.token_times[-1] <= r.finish_time
        assert r.output_token_ids == expected(i)
    assert too_long.outcome is Outcome.REFUSED and limit in too_long.reason and str(MAX_LEN) in too_long.reason
    assert too_long.first_scheduled_time is None and not too_long.token_times


class TimedRunner:
    """A real runner whose steps take exactly dt on a manual clock."""

    def __init__(self, runner, clock: ManualClock, dt: float):
        self.runner, self.clock, self.dt = runner, clock, dt

    def execute(self, out):
        tokens = self.runner.execute(out)
        self.clock.advance(self.dt)
        return tokens


def record_schedule(sched, log: list) -> None:
    """Log every non-empty batch the scheduler decides: (time, chunks, preempted ids)."""
    decide = sched.schedule

    def schedule(now):
        out = decide(now)
        if not out.is_empty:
            log.append(snapshot(now, out))
        return out

    sched.schedule = schedule


def snapshot(now, out):
    return (now, [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks],
            [r.request_id for r in out.preempted])


DT = 1.0  # s per step, in both systems
# Arrival times off the step grid (no ties between an arrival and a step's end), one after an idle gap.
ARRIVALS = [0.0, 0.0, 0.5, 2.5, 2.5, 7.5, 11.5, 200.5]
SIM_PROMPTS = [PROMPTS[0], PROMPTS[2], PROMPTS[1], PROMPTS[4], _rng.integers(0, CFG.vocab_size, 27).tolist(),
               PROMPTS[3], PREFIX + [5, 6, 7], PROMPTS[1]]
SIM_MAX_TOKENS = [9, 4, 12, 7, 6, 10, 5, 3]


def sim_requests():
    return [Request(f"q{i}", list(p), SamplingParams(max_tokens=m), arrival_time=a)
            for i, (p, m, a) in enumerate(zip(SIM_PROMPTS, SIM_MAX_TOKENS, ARRIVALS))]


@pytest.mark.parametrize("name", ["preempt", "sequential-3"])
def test_simulator_makes_the_engines_decisions(name):
    # The real engine, each step taking DT on its clock.
    sched = SCHEDULERS[name]()
    clock = ManualClock()
    engine = Engine(sched, TimedRunner(make_runner(sched), clock, DT), clock)
    real_log: list = []
    record_schedule(sched, real_log)
    real = sim_requests()
    engine.run(ListSource(real))

    # The simulator: the same scheduler class, the same requests and arrival times, steps of DT.
    env = simpy.Environment()
    sim_sched = SCHEDULERS[name]()
    sim_log: list = []
    replica = Replica(env, "r0", sim_sched, lambda shape: DT, on_step=lambda now, out, dt: sim_log.append(
        snapshot(now, out)))
    sim = sim_requests()

    def arrive():
        for req in sim:  # requests due at the same time all go in before the replica next looks
            if req.arrival_time > env.now:
                yield env.timeout(req.arrival_time - env.now)
            replica.submit(req)

    env.process(arrive())
    env.run()

    assert len(real_log) == len(sim_log) > 20
    for step, (r, s) in enumerate(zip(real_log, sim_log)):
        assert r[1:] == s[1:], f"step {step}: engine {r} vs simulator {s}"
        assert r[0] == pytest.approx(s[0]), step
    for r, s in zip(real, sim):
        assert r.outcome is s.outcome is Outcome.COMPLETED
        assert (r.first_scheduled_time, r.first_token_time, r.finish_time) == pytest.approx(
            (s.first_scheduled_time, s.first_token_time, s.finish_time))
        assert r.token_times == pytest.approx(s.token_times) and r.num_preemptions == s.num_preemptions
    if name == "preempt":
        assert sched.num_preemptions == sim_sched.num_preemptions > 0
        assert any(r[2] for r in real_log)


def test_closed_loop_client_timeout_frees_kv():
    sched = SCHEDULERS["preempt"]()
    clock = ManualClock()
    engine = Engine(sched, TimedRunner(make_runner(sched), clock, DT), clock)
    short, long_ = SamplingParams(max_tokens=3), SamplingParams(max_tokens=30)
    mk = lambda rid, i, sp: Request(rid, list(PROMPTS[i]), sp)  # noqa: E731
    clients = [[mk("a0", 1, short), mk("a1", 3, long_)],
               [mk("b0", 1, long_), mk("b1", 1, short)],
               [mk("c0", 4, short), mk("c1", 0, short)]]
    ended = []

    def on_finish(req):
        ended.append(req)
        assert not sched.blocks.has_seq(req.request_id)  # its KV is freed by the time the client hears

    engine.run(Clients(clients), timeout_s=10.0, on_finish=on_finish)
    by_id = {r.request_id: r for r in ended}
    assert sorted(by_id) == ["a0", "a1", "b0", "b1", "c0", "c1"]
    for rid in ("a1", "b0"):
        r = by_id[rid]
        assert r.outcome is Outcome.TIMED_OUT and "timeout" in r.reason
        assert r.num_output_tokens < 30 and r.finish_time - r.arrival_time == pytest.approx(11.0)
    for rid in ("a0", "b1", "c0", "c1"):
        assert by_id[rid].outcome is Outcome.COMPLETED and by_id[rid].num_output_tokens == 3
    assert by_id["b1"].arrival_time == by_id["b0"].finish_time  # the client moved on after giving up
    assert by_id["b1"].output_token_ids == expected(1, 3)
    assert not sched.has_unfinished() and sched.blocks.num_free_blocks == sched.blocks.num_usable_blocks
