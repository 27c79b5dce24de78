"""The time series drained as a cell runs (sim.lab.series_csv) is the file one DataFrame of all samples made."""
from __future__ import annotations

from pathlib import Path

import pytest

import sim.lab.simulate as simulate
from sim.lab.experiment import load_experiment
from sim.lab.metrics import CellAccumulator
from sim.lab.simulate import simulate_cell

TOML = """
name = "series"
seed = 2
model = "llama-3.1-8b"
[workload]
kind = "poisson"
rates = [30.0, inf]
num_requests = 80
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
[engines.vllm]
scheduler = "continuous"
num_blocks = 300
max_model_len = 2200
max_num_seqs = 32
[hardware]
preset = "h100-sxm"
replicas = 2
router = "least_outstanding"
"""


IDLE = TOML.replace('kind = "poisson"\nrates = [30.0, inf]\nnum_requests = 80', 'kind = "closed_loop"\nclients = [1]\n'
                   'num_requests = 3').replace("replicas = 2", "replicas = 3")


@pytest.mark.parametrize("drain_every,toml", [(1, TOML), (7, TOML), (4096, TOML), (1, IDLE), (4096, IDLE)])
def test_drained_series_is_the_dataframes_csv(tmp_path: Path, monkeypatch, drain_every, toml):
    """Also with replicas that never get a request (their one sample is at SimPy's int time 0)."""
    monkeypatch.setattr(simulate, "SERIES_DRAIN_EVERY", drain_every)
    exp = load_experiment(toml)
    whole, drained = tmp_path / "whole.csv", tmp_path / "drained.csv"
    for cell in exp.cells():
        facts = simulate_cell(exp, cell, CellAccumulator(cell.engine, cell.concurrency, cell.request_rate))
        series = facts.pop("timeseries")
        series.insert(0, "cell", cell.label)
        series.to_csv(whole, mode="a", header=not whole.exists(), index=False)  # what run_experiment wrote
        streamed = simulate_cell(exp, cell, CellAccumulator(cell.engine, cell.concurrency, cell.request_rate),
                                 series_to=drained)
        assert streamed.pop("timeseries") is None
        assert streamed == facts
        assert facts["preemptions"] > 0 or cell.request_rate != float("inf")
    assert whole.read_bytes() == drained.read_bytes()
    assert len(whole.read_text().splitlines()) > 5
    assert ",0.0," in whole.read_text()  # a sample at time 0, printed as the float column prints it
