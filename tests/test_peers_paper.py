"""experiments/peers/write_paper.py on a synthetic results folder: verdicts, spread and the section's parts."""
import importlib.util
import re
from pathlib import Path

import pandas as pd
import pytest

from sim.lab.url_profile import write_profile
from tests.test_server_law import server_profile

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "peers" / "write_paper.py"


def _module():
    spec = importlib.util.spec_from_file_location("write_paper", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _errors(path: Path, measured: dict, predicted: dict) -> None:
    path.mkdir(parents=True)
    rows = [dict(cell="x_closed:e@c=1", metric=m, measured=measured[m], predicted=predicted[m],
                 error_pct=(predicted[m] - measured[m]) / measured[m] * 100) for m in measured]
    pd.DataFrame(rows).to_csv(path / "errors.csv", index=False)
    pd.DataFrame([dict(cell="x_closed:e@c=1", check="engine steps", server=100.0, simulated=101.0, diff_pct=1.0)]
                 ).to_csv(path / "server_checks.csv", index=False)


def test_paper_section_from_two_runs(tmp_path):
    wp = _module()
    results = tmp_path / "results"
    folder = results / "vllm"
    pred = {"output_throughput": 100.0, "mean_ttft_ms": 100.0, "mean_tpot_ms": 100.0, "mean_e2el_ms": 100.0}
    _errors(folder / "run1", {"output_throughput": 100.0, "mean_ttft_ms": 95.0, "mean_tpot_ms": 80.0,
                              "mean_e2el_ms": 50.0}, pred)
    _errors(folder / "run2", {"output_throughput": 100.0, "mean_ttft_ms": 95.0, "mean_tpot_ms": 100.0,
                              "mean_e2el_ms": 50.0}, pred)
    write_profile(server_profile(1), folder / "profile.csv", {"shapes": "server context_pad=1", "date": "d"})
    (folder / "setup.tsv").write_text("run\tphase\tseconds\tload_before\tload_after\n1\tserver start\t50\t1 1 1\t2 2 2\n")
    t = wp.engine_table(folder)
    verdict = t.set_index("metric")["verdict"]
    assert verdict["output_throughput"] == "ok" and verdict["mean_ttft_ms"] == "ok"
    assert verdict["mean_tpot_ms"] == "noise"  # +25% against run 1, 0% against run 2: runs 22% apart
    assert verdict["mean_e2el_ms"] == "miss"  # +100% in both runs, which agree
    text = wp.write(results, tmp_path / "paper.md")
    assert "## vLLM" in text and "| engine steps | 2 |" in text and "Decode steps" in text
    assert "1 of 4" not in text and "2 of 4 (cell, metric) pairs within the goal" in text


def test_committed_paper_is_written_from_the_committed_results(tmp_path):
    """papers/real_engines.md is write_paper.py's output on experiments/results/peers (links aside, which
    depend on where it is written): regenerate it after changing either."""
    repo = SCRIPT.parents[2]
    results, paper = repo / "experiments" / "results" / "peers", repo / "papers" / "real_engines.md"
    if not results.is_dir() or not paper.exists():
        pytest.skip("no committed peer results")
    text = _module().write(results, tmp_path / "papers" / "real_engines.md")
    links = re.compile(r"\]\([^)]*\)")
    assert links.sub("]()", text) == links.sub("]()", paper.read_text())
