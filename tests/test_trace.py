"""`servesim trace`: the real scheduler's calls, recorded in causal order, as text and as a page."""
from __future__ import annotations

import json
import re
from pathlib import Path

from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.lab.cli import main
from sim.lab.experiment import load_experiment
from sim.lab.trace import trace_cell, with_overrides
from sim.lab.trace_html import page_data, render_page
from sim.lab.trace_text import format_trace

ROOT = Path(__file__).resolve().parents[1]
SMALL = ROOT / "experiments" / "trace_small.toml"

ONE = """
name = "one_request"
model = "tiny"
[workload]
kind = "poisson"
rates = [inf]
num_requests = 1
[workload.prompt_tokens]
dist = "fixed"
value = 5
[workload.output_tokens]
dist = "fixed"
value = 4
[engines.paged]
scheduler = "continuous"
block_size = 4
num_blocks = 8
max_num_seqs = 4
max_num_batched_tokens = 16
max_model_len = 16
[engines.slots]
scheduler = "sequential"
num_parallel = 2
num_ctx = 16
n_batch = 16
n_ubatch = 16
[hardware]
preset = "cpu-generic"
"""


def _events(trace, *kinds):
    return [e for r in trace.records for e in r.events if e.kind in kinds]


def _books(trace) -> tuple[int, int]:
    """(references taken, references given back) over the whole trace, counted block by block."""
    taken = sum(len(e.blocks) + len(e.shared) for e in _events(trace, "admit", "alloc", "reserve", "fork"))
    taken += sum(len(e.copies) for e in _events(trace, "cow"))
    back = sum(len(e.blocks) + len(e.shared) for e in _events(trace, "preempt", "finish", "abort"))
    back += sum(len(e.copies) for e in _events(trace, "cow"))  # the shared source each copy lets go of
    return taken, back


def _replay(trace) -> set[int]:
    """Replay the events in order: a block is handed out only when free, and freed only when held.

    When the step runs (after the events before and during scheduling), the blocks held are
    exactly those in its block tables. Returns the blocks still held at the end.
    """
    order = {"before": 0, "schedule": 1, "after": 2}
    held: set[int] = set()

    def apply(rec, e):
        nonlocal held
        if e.kind in ("admit", "alloc", "reserve"):
            taken = set(e.blocks) | set(e.revived)
            assert not taken & held, f"step {rec.step}: {sorted(taken & held)} handed to {e.request} while held"
            held |= taken
        elif e.kind == "cow":
            held |= {dst for _, dst in e.copies}
        elif e.kind in ("preempt", "finish", "abort"):
            assert set(e.blocks) <= held, f"step {rec.step}: {e.request} frees blocks nobody held"
            held -= set(e.blocks)

    for rec in trace.records:
        phases = [order[e.phase] for e in rec.events]
        assert phases == sorted(phases)
        for e in rec.events:
            if e.phase != "after":
                apply(rec, e)
        assert held == {b for t in rec.tables.values() for b in t}, f"step {rec.step}"
        for e in rec.events:
            if e.phase == "after":
                apply(rec, e)
    return held


def test_one_request_is_admitted_grows_and_is_freed_at_the_end_of_its_last_step():
    trace = trace_cell(load_experiment(ONE))
    recs = trace.records
    # prefill 5 tokens (2 blocks), decode at 5, 6, 7 (position 8 needs no block: the last token is never fed back)
    assert [r.chunks for r in recs] == [[("r0", 0, 5, "prefill")], [("r0", 5, 1, "decode")],
                                       [("r0", 6, 1, "decode")], [("r0", 7, 1, "decode")]]
    assert [e.kind for e in recs[0].events] == ["arrive", "admit", "cached"]
    assert recs[0].of_kind("admit")[0].blocks == (1, 2)
    assert not any(r.of_kind("alloc") for r in recs)
    last = recs[-1].events[-1]
    assert (last.kind, last.blocks, last.phase) == ("finish", (1, 2), "after")
    assert last.time_s > recs[-1].time_s  # at the end of the step, not before it
    text = format_trace(trace)
    assert "admitted   r0: takes blocks 1 2" in text
    assert re.search(r"finished   r0 at t=[0-9.]+ ms: frees blocks 1 2", text)
    assert "totals: 4 steps" in text and "2 blocks allocated" in text


def test_small_scenario_shares_preempts_and_balances_its_books():
    trace = trace_cell(load_experiment(SMALL))
    taken, back = _books(trace)
    assert taken == back  # every reference taken is given back
    assert any(e.shared for e in _events(trace, "admit"))  # the common system prompt hits the prefix cache
    assert _events(trace, "preempt")  # the pool is too small for all of them
    assert any(k == "recompute" for r in trace.records for _, _, _, k in r.chunks)
    assert trace.scheduler.num_preemptions == len(_events(trace, "preempt"))
    assert _replay(trace) == set() and trace.scheduler.kv_holdings() == {}  # nothing left allocated
    for r in trace.records:  # reservations never exceed the pool
        assert r.reserved_tokens <= r.capacity_tokens


def test_trace_is_in_causal_order():
    """A block is freed before it is handed out again, in the text too (issue 19: step 7 printed it the other way)."""
    trace = trace_cell(load_experiment(SMALL))
    _replay(trace)
    first = next(r for r in trace.records if r.preempted)
    kinds = [e.kind for e in first.events]
    assert kinds.index("no_room") < kinds.index("preempt") < kinds.index("alloc")
    lines = format_trace(trace).splitlines()
    head = lines.index(next(l for l in lines if l.startswith(f"step {first.step} ")))
    block = lines[head:head + len(first.events) + 4]
    i_pre = next(i for i, l in enumerate(block) if l.strip().startswith("preempted"))
    i_alloc = next(i for i, l in enumerate(block) if l.strip().startswith("allocated"))
    assert i_pre < i_alloc


def test_slot_engine_reports_slots():
    trace = trace_cell(load_experiment(ONE), engine="slots")
    assert trace.records[0].of_kind("admit")[0].blocks == (0,)
    assert trace.records[-1].of_kind("finish")[0].blocks == (0,)
    assert "admitted   r0: takes slot 0" in format_trace(trace)


def test_overrides_change_the_scenario():
    exp = with_overrides(load_experiment(SMALL), ["engines.paged.enable_prefix_caching=false",
                                                  "engines.paged.block_size=8", "engines.paged.num_blocks=8"])
    eng = exp.engine("paged")
    assert eng.block_size == 8 and eng.enable_prefix_caching is False
    assert not any(e.shared for e in _events(trace_cell(exp), "admit"))  # no prefix cache, no sharing


def test_overrides_switch_an_engines_scheduler():
    """--set engines.paged.scheduler=orca works: overrides apply to the file as written, not the resolved document."""
    for reservation in ("request", "max_model_len"):
        exp = with_overrides(load_experiment(SMALL), ["engines.paged.scheduler=orca",
                                                      f"engines.paged.reservation={reservation}"])
        assert exp.engine("paged").scheduler == "orca" and exp.engine("paged").reservation == reservation
        trace = trace_cell(exp)
        assert _events(trace, "reserve")  # Orca holds the whole reservation at admission
        assert _books(trace)[0] == _books(trace)[1]
    # From a TOML string (no file), the explicitly set keys stand in for the document.
    exp = with_overrides(load_experiment(ONE), ["engines.paged.scheduler=orca"])
    assert exp.engine("paged").scheduler == "orca"


def test_trace_command_prints_steps_and_totals(tmp_path):
    r = CliRunner().invoke(main, ["trace", str(SMALL), "--steps", "5"])
    assert r.exit_code == 0, r.output
    assert "step 1 " in r.output and "admitted   r0:" in r.output and "totals:" in r.output
    assert "more records" in r.output
    bad = CliRunner().invoke(main, ["trace", str(SMALL), "--set", "engines.paged.blok=3"])
    assert bad.exit_code == 2 and "engines.paged.blok" in bad.output
    page = tmp_path / "t.html"
    r = CliRunner().invoke(main, ["trace", str(SMALL), "--html", str(page)])
    assert r.exit_code == 0, r.output
    assert page.stat().st_size > 20_000
    bad = CliRunner().invoke(main, ["trace", str(SMALL), "--html", str(page), "--compare", "nope"])
    assert bad.exit_code == 2 and "nope" in bad.output


def test_page_embeds_the_trace_it_was_made_from():
    exp = load_experiment(SMALL)
    paged, slots = trace_cell(exp, "paged"), trace_cell(exp, "slots")
    html = render_page(page_data(exp, [paged, slots]))
    data = json.loads(re.search(r'<script type="application/json" id="trace-data">(.*?)</script>', html, re.S)
                      .group(1).replace("<\\/", "</"))
    scene = data["scenes"][0]
    panel = scene["panels"][0]
    assert [s["step"] for s in panel["steps"]] == [r.step for r in paged.records]
    assert [s["tables"] for s in panel["steps"]] == [r.tables for r in paged.records]
    # frames: one per step of the traced engine, then the comparison's remaining steps, time never going back
    times = [f["t"] for f in scene["frames"]]
    assert times == sorted(times)
    assert [f["at"][0] for f in scene["frames"][:len(paged.records)]] == list(range(len(paged.records)))
    assert scene["frames"][-1]["at"] == [len(paged.records) - 1, len(slots.records) - 1]
    assert data["scenes"][1]["id"] == "fork"


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(block_size=st.sampled_from([2, 4, 8]), extra_blocks=st.integers(0, 6), caching=st.booleans(),
       seqs=st.integers(1, 6))
def test_any_small_pool_keeps_its_books_and_order(block_size, extra_blocks, caching, seqs):
    """Whatever the pool, every block is freed before it is handed out again, and all come back."""
    need = -(-32 // block_size)
    exp = with_overrides(load_experiment(SMALL), [
        f"engines.paged.block_size={block_size}", f"engines.paged.num_blocks={need + 1 + extra_blocks}",
        f"engines.paged.enable_prefix_caching={'true' if caching else 'false'}",
        f"engines.paged.max_num_seqs={seqs}"])
    trace = trace_cell(exp)
    taken, back = _books(trace)
    assert taken == back
    assert _replay(trace) == set()


def test_client_timeouts_free_what_they_held_and_the_books_still_balance():
    exp = with_overrides(load_experiment(SMALL), ["workload.timeout_s=0.0012"])
    for engine in ("paged", "slots"):
        trace = trace_cell(exp, engine)
        ended = _events(trace, "abort")
        assert ended and all(e.detail.startswith("timed_out") for e in ended)
        assert any(e.blocks for e in ended) and any(not e.blocks for e in ended)  # running ones free KV; waiting ones none
        taken, back = _books(trace)
        assert taken == back
        assert trace.scheduler.kv_holdings() == {}
    assert _replay(trace_cell(exp, "paged")) == set()
