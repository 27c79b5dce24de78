"""sim.lab.plots: figures of a small simulated run (closed loop, open loop with rate inf, trace)."""
from __future__ import annotations

import pytest

from sim.lab.experiment import load_experiment
from sim.lab.plots import plot_results
from sim.lab.simulate import run_experiment

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

HEAD = """
name = "plots"
model = "llama-3.1-8b"
[engines.vllm]
scheduler = "continuous"
[engines.ollama]
scheduler = "sequential"
num_parallel = 2
max_queue = 4
[hardware]
preset = "h100-sxm"
"""
LENGTHS = """
[workload.prompt_tokens]
dist = "uniform"
low = 10
high = 300
[workload.output_tokens]
dist = "uniform"
low = 1
high = 120
"""
WORKLOADS = {
    "closed_loop": """
[workload]
kind = "closed_loop"
clients = [1, 4, 16]
requests_per_client = 3
""" + LENGTHS,
    "open_loop": """
[workload]
kind = "poisson"
rates = [2.0, 50.0, inf]
num_requests = 40
timeout_s = 3.0
""" + LENGTHS,
    "trace": """
[workload]
kind = "trace"
path = "trace.csv"
""",
}


@pytest.mark.parametrize("kind", WORKLOADS)
def test_figures_of_a_small_run(tmp_path, kind):
    (tmp_path / "trace.csv").write_text("arrival_s,prompt_tokens,output_tokens\n" +
                                        "".join(f"{0.05 * i},{20 + 7 * i},{5 + 3 * i}\n" for i in range(20)))
    config = tmp_path / "exp.toml"
    config.write_text(HEAD + WORKLOADS[kind])
    out = tmp_path / "results"
    run_experiment(load_experiment(config), out, progress=False)
    paths = plot_results(out)
    names = sorted(p.name for p in paths)
    assert names == ["e2el_p99.png", "kv_usage.png", "throughput.png", "ttft.png"]
    for p in paths:
        assert p.parent == out / "figures"
        data = p.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, p


def test_without_time_series_or_config_the_load_figures_remain(tmp_path):
    config = tmp_path / "exp.toml"
    config.write_text(HEAD + WORKLOADS["closed_loop"])
    out = tmp_path / "results"
    run_experiment(load_experiment(config), out, progress=False)
    (out / "timeseries.csv").unlink()
    (out / "experiment.toml").unlink()
    assert sorted(p.name for p in plot_results(out)) == ["e2el_p99.png", "throughput.png", "ttft.png"]
