"""`servesim bench` on the JAX engine: the vLLM-named results, cells that survive an interruption and
are not rerun, and bad configs refused with exit status 2 naming the key."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from click.testing import CliRunner

import sim.lab.bench as bench
from sim.lab.cli import main

CONFIG = """
name = "tiny_bench"
seed = 0
model = "tiny"
dtype = "float32"

[workload]
kind = "closed_loop"
clients = {clients}
requests_per_client = 2

[workload.prompt_tokens]
dist = "fixed"
value = 8

[workload.output_tokens]
dist = "fixed"
value = 4

[engines.seq]
scheduler = "sequential"
num_parallel = 1
num_ctx = 64

[engines.cont]
scheduler = "continuous"
block_size = 4
max_num_seqs = 8
max_num_batched_tokens = 64
max_model_len = 64
num_blocks = 65
"""

VLLM_METRICS = ["completed", "failed", "request_throughput", "output_throughput", "total_token_throughput",
                "request_goodput"] + [f"{s}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el")
                                      for s in ("mean", "median", "p90", "p95", "p99")]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def cells_run(monkeypatch):
    """Records every cell the bench actually runs."""
    ran = []
    real = bench.bench_cell

    def counting(exp, cell, on_finish, params=None, cost=None):
        ran.append(cell.label)
        return real(exp, cell, on_finish, params, cost)

    monkeypatch.setattr(bench, "bench_cell", counting)
    return ran


def cell_rows(requests: pd.DataFrame, engine: str, concurrency: int) -> pd.DataFrame:
    return requests[(requests.engine == engine) & (requests.concurrency.astype(int) == concurrency)]


def test_bench_writes_vllm_metrics_and_resumes(tmp_path, cells_run):
    out = tmp_path / "out"
    # A first run that covers only some of the cells (as if cut off after them) ...
    first = CliRunner().invoke(main, ["bench", str(write(tmp_path, "part.toml", CONFIG.format(clients="[1]"))),
                                      "--out", str(out)])
    assert first.exit_code == 0, first.output
    assert cells_run == ["seq@c=1", "cont@c=1"]
    assert "out tok/s" in first.output and "seq@c=1" in first.output
    summary = json.loads((out / "summary.json").read_text())
    assert [s["cell"] for s in summary] == ["seq@c=1", "cont@c=1"]
    for s in summary:
        for key in VLLM_METRICS:
            assert key in s, key
        assert s["completed"] == 2 and s["failed"] == 0 and s["output_throughput"] > 0
        assert s["device"] and s["compilations_during_run"] >= 0
    requests = pd.read_csv(out / "requests.csv")
    assert {"ttft_ms", "tpot_ms", "e2el_ms", "itl_mean_ms", "outcome", "token_times_s"} <= set(requests.columns)
    assert len(requests) == 4 and (requests.outcome == "completed").all()
    assert (requests.output_tokens == 4).all() and (requests.prompt_tokens == 8).all()
    before = cell_rows(requests, "seq", 1).reset_index(drop=True)

    # ... then the full experiment into the same directory: the finished cells are kept, not rerun.
    cells_run.clear()
    second = CliRunner().invoke(main, ["bench", str(write(tmp_path, "full.toml", CONFIG.format(clients="[1, 2]"))),
                                       "--out", str(out)])
    assert second.exit_code == 0, second.output
    assert "resuming: 2 of 4 cells already done" in second.output
    assert cells_run == ["seq@c=2", "cont@c=2"]
    summary2 = json.loads((out / "summary.json").read_text())
    assert [s["cell"] for s in summary2] == ["seq@c=1", "cont@c=1", "seq@c=2", "cont@c=2"]
    assert summary2[:2] == summary  # untouched
    requests2 = pd.read_csv(out / "requests.csv")
    assert len(requests2) == 4 + 8
    pd.testing.assert_frame_equal(cell_rows(requests2, "seq", 1).reset_index(drop=True), before)


def test_interrupted_cell_is_dropped_and_redone(tmp_path, monkeypatch):
    cfg = write(tmp_path, "exp.toml", CONFIG.format(clients="[2]"))
    out = tmp_path / "out"
    real = bench.bench_cell

    def cut_off(exp, cell, on_finish, params=None, cost=None):
        if cell.engine != "cont":
            return real(exp, cell, on_finish, params, cost)
        seen = []

        def finish_then_fail(req, client):
            on_finish(req, client)  # on_finish is the cell's CellAccumulator.add ...
            on_finish.__self__.flush()  # ... whose rows reach requests.csv in chunks (here: at once) ...
            seen.append(req)
            if len(seen) == 2:
                raise RuntimeError("power cut")  # ... and the run dies mid-cell

        return real(exp, cell, finish_then_fail, params, cost)

    monkeypatch.setattr(bench, "bench_cell", cut_off)
    crashed = CliRunner().invoke(main, ["bench", str(cfg), "--out", str(out)])
    assert crashed.exit_code != 0 and "power cut" in str(crashed.exception)
    assert [s["cell"] for s in json.loads((out / "summary.json").read_text())] == ["seq@c=2"]
    partial = pd.read_csv(out / "requests.csv")
    assert len(cell_rows(partial, "cont", 2)) == 2  # rows of the cut-off cell were written

    monkeypatch.setattr(bench, "bench_cell", real)
    resumed = CliRunner().invoke(main, ["bench", str(cfg), "--out", str(out)])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming: 1 of 2 cells already done" in resumed.output
    requests = pd.read_csv(out / "requests.csv")
    assert len(cell_rows(requests, "seq", 2)) == 4 and len(cell_rows(requests, "cont", 2)) == 4  # no duplicates
    assert [s["cell"] for s in json.loads((out / "summary.json").read_text())] == ["seq@c=2", "cont@c=2"]


@pytest.mark.parametrize("old, new, key", [
    ("num_parallel = 1", "num_paralel = 1", "engines.seq.num_paralel"),  # unknown key
    ("num_parallel = 1", 'num_parallel = "one"', "engines.seq.num_parallel"),  # wrong type
    ("num_parallel = 1", "num_parallel = 0", "engines.seq.num_parallel"),  # 0 slots
    ("block_size = 4", "block_size = 128", "engines.cont.block_size"),  # block larger than the context
    ('kind = "closed_loop"', 'kind = "closed_loop"\nclient = [1]', "workload.client"),  # unknown key, with a hint
    ("value = 8", "value = -8", "workload.prompt_tokens.value"),
])
def test_bad_config_exits_2_naming_the_key(tmp_path, old, new, key):
    text = CONFIG.format(clients="[1]")
    assert old in text
    cfg = write(tmp_path, "bad.toml", text.replace(old, new, 1))
    result = CliRunner().invoke(main, ["bench", str(cfg), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert key in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out" / "summary.json").exists()
