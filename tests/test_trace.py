"""`servesim trace` and the teaching figures: the real scheduler, step by step."""
from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from sim.lab.cli import main
from sim.lab.experiment import load_experiment
from sim.lab.teaching import block_table_states, make_all, occupancy, run_pool
from sim.lab.trace import format_trace, trace_cell, with_overrides

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


def _totals(records):
    tot = lambda attr: sum(len(v) for r in records for v in getattr(r, attr).values())  # noqa: E731
    return tot("allocated"), tot("shared"), tot("freed"), tot("released")


def test_one_request_allocates_grows_and_frees():
    records, sched = trace_cell(load_experiment(ONE))
    # prefill 5 tokens (2 blocks), decode at 5, 6, 7 (position 8 needs no block: the last token is never fed back)
    assert [r.chunks for r in records[:4]] == [[("r0", 0, 5, "prefill")], [("r0", 5, 1, "decode")],
                                               [("r0", 6, 1, "decode")], [("r0", 7, 1, "decode")]]
    assert records[0].allocated == {"r0": [1, 2]}
    assert all(not r.allocated for r in records[1:])
    assert records[-1].chunks == [] and records[-1].freed == {"r0": [1, 2]}
    assert records[-1].freed_reason == {"r0": "finished"}
    text = format_trace(records, sched)
    assert "allocated  r0: blocks 1 2" in text
    assert "freed      r0: blocks 1 2 (finished)" in text
    assert "totals: 4 steps; 2 blocks allocated" in text


def test_small_scenario_shares_preempts_and_balances_its_books():
    records, sched = trace_cell(load_experiment(SMALL))
    alloc, shared, freed, released = _totals(records)
    assert alloc + shared == freed + released  # every reference taken is given back
    assert shared > 0  # the common system prompt hits the prefix cache
    assert sum(len(r.preempted) for r in records) > 0  # the pool is too small for all of them
    assert any(k == "recompute" for r in records for _, _, _, k in r.chunks)
    assert sched.num_preemptions == sum(len(r.preempted) for r in records)
    assert records[-1].tables == {}  # nothing left allocated
    for r in records:  # reservations never exceed the pool
        assert r.reserved_tokens <= r.capacity_tokens


def test_slot_engine_reports_slots():
    records, sched = trace_cell(load_experiment(ONE), engine="slots")
    assert records[0].allocated == {"r0": [0]}
    assert records[-1].freed == {"r0": [0]}
    assert "allocated  r0: slot 0" in format_trace(records, sched)


def test_overrides_change_the_scenario():
    exp = with_overrides(load_experiment(SMALL), ["engines.paged.enable_prefix_caching=false",
                                                  "engines.paged.block_size=8", "engines.paged.num_blocks=8"])
    eng = exp.engine("paged")
    assert eng.block_size == 8 and eng.enable_prefix_caching is False
    records, _ = trace_cell(exp)
    assert _totals(records)[1] == 0  # no prefix cache, no sharing


def test_trace_command_prints_steps_and_totals():
    r = CliRunner().invoke(main, ["trace", str(SMALL), "--steps", "5"])
    assert r.exit_code == 0, r.output
    assert "step 1 " in r.output and "allocated  r0:" in r.output and "totals:" in r.output
    assert "more steps" in r.output
    bad = CliRunner().invoke(main, ["trace", str(SMALL), "--set", "engines.paged.blok=3"])
    assert bad.exit_code == 2 and "engines.paged.blok" in bad.output


def test_teaching_data_paging_wastes_less_and_finishes_sooner():
    static, paged = run_pool("max_model_len"), run_pool("none")
    (u_s, end_s), (u_p, end_p) = occupancy(static), occupancy(paged)
    assert u_p > 0.85 and u_s < 0.5
    assert end_p < end_s


def test_teaching_block_tables_share_then_copy_on_write():
    prefix, fork, cow = block_table_states()
    assert prefix.tables["A"][:2] == prefix.tables["B"][:2]  # the system prompt's two blocks
    assert all(prefix.refs[b] == 2 for b in prefix.tables["A"][:2])
    assert fork.tables["A'"] == fork.tables["A"]
    assert cow.tables["A'"][:-1] == cow.tables["A"][:-1] and cow.tables["A'"][-1] != cow.tables["A"][-1]


def test_teaching_figures_render(tmp_path):
    paths = make_all(tmp_path)
    assert [p.name for p in paths] == ["teaching_kv_over_time.png", "teaching_block_tables.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)
