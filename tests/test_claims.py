"""Claims: verdict logic, the [published] schema, a tiny claims run with a sweep, and papers/build.py end to end."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pandas as pd
import pytest

from reference.errors import ConfigError
from sim.lab.audit import Bound
from sim.lab.claims import (Results, format_sweeps, format_table, parse_claims, ratio, run_claims, verdict)
from sim.lab.experiment import load_experiment

ROOT = Path(__file__).resolve().parents[1]

UPPER = Bound("upper", 208.0, "tok/s", "roofline")
LOWER = Bound("lower", 4.8, "ms", "one weight read")


# ---------------------------------------------------------------------------------------
# Verdicts

@pytest.mark.parametrize("sim, expected", [
    (100.0, "reproduced"), (125.0, "reproduced"), (75.0, "reproduced"), (124.9, "reproduced"),
    (125.2, "differs"), (74.8, "differs"), (300.0, "differs"), (0.0, "differs"), (math.nan, "differs"),
    (None, "differs"),
])
def test_within_25_percent_is_reproduced(sim, expected):
    assert verdict(100.0, sim) == expected


def test_published_beyond_the_roofline_is_implausible_whatever_the_simulation():
    assert verdict(510.0, 154.0, bound=UPPER) == "physically implausible"
    assert verdict(510.0, 500.0, bound=UPPER) == "physically implausible"  # even a "match" is wrong
    assert verdict(200.0, 190.0, bound=UPPER) == "reproduced"
    assert verdict(209.0, 190.0, bound=UPPER) == "reproduced"  # within rounding (0.5%) of the bound
    # Latencies: published below the least possible time.
    assert verdict(2.0, 2.1, bound=LOWER) == "physically implausible"
    assert verdict(28.0, 6.5, bound=LOWER) == "differs"


def test_ranges_and_inequalities():
    assert verdict((1.7, 2.7), 2.0) == "reproduced"
    assert verdict((1.7, 2.7), 1.7 * 0.75) == "reproduced"
    assert verdict((1.7, 2.7), 1.2) == "differs"
    assert verdict((1.7, 2.7), 2.7 * 1.25 + 0.01) == "differs"
    assert verdict(96.0, 98.3, op=">=") == "reproduced"
    assert verdict(96.0, 95.9, op=">=") == "differs"
    assert verdict(100.0, 8.3, op="<") == "reproduced"
    assert verdict(100.0, 100.0, op="<") == "differs"
    # A range is implausible only when its near end is beyond the bound.
    assert verdict((150.0, 300.0), 180.0, bound=UPPER) == "reproduced"
    assert verdict((250.0, 300.0), 180.0, bound=UPPER) == "physically implausible"


def test_ratio_to_a_range_is_to_its_nearest_end():
    assert ratio(100.0, 150.0) == pytest.approx(1.5)
    assert ratio((1.7, 2.7), 2.0) == 1.0
    assert ratio((1.7, 2.7), 1.3) == pytest.approx(1.3 / 1.7)
    assert ratio((2.7, 8.0), 16.0) == pytest.approx(2.0)
    assert math.isnan(ratio(100.0, math.nan))


# ---------------------------------------------------------------------------------------
# The [published] schema

TINY = """
name = "tiny_claims"
seed = 0
model = "llama-3.1-8b"
[workload]
kind = "closed_loop"
clients = [1, 2]
requests_per_client = 1
[workload.prompt_tokens]
dist = "fixed"
value = 32
[workload.output_tokens]
dist = "fixed"
value = 64
[engines.ollama]
scheduler = "sequential"
num_ctx = 256
weights = "fp16"
[engines.vllm]
scheduler = "continuous"
max_model_len = 256
max_num_batched_tokens = 512
[hardware]
preset = "h100-sxm"
[published]
source = "a test article"
[[published.figures]]
id = "T.1"
claim = "single-user throughput"
metric = "output_throughput"
engine = "vllm"
concurrency = 1
value = 510.0
unit = "tok/s"
notes = "above the roofline"
[[published.figures]]
id = "T.2"
claim = "vLLM over Ollama at 2 clients"
metric = "output_throughput"
engine = "vllm"
ratio_to = "ollama"
concurrency = 2
value = [1.0, 3.0]
unit = "x"
[[published.figures]]
id = "T.3"
claim = "weights"
metric = "weights_gb"
engine = "vllm"
value = 16.0
unit = "GB"
[[published.figures]]
id = "T.4"
claim = "all complete"
metric = "success_rate_pct"
engine = "ollama"
concurrency = 2
op = ">="
value = 100.0
unit = "%"
[[published.sweeps]]
id = "T.s1"
title = "Ollama slots"
param = "engines.ollama.num_parallel"
values = [1, 2]
engines = ["ollama", "vllm"]
loads = [2]
figures = ["T.2"]
"""


def test_parse_claims_reads_figures_and_sweeps():
    c = parse_claims(load_experiment(TINY))
    assert c.source == "a test article"
    assert [f.id for f in c.figures] == ["T.1", "T.2", "T.3", "T.4"]
    t2 = c.figure("T.2")
    assert t2.value == (1.0, 3.0) and t2.ratio_to == "ollama" and t2.cell_label == "vllm/ollama@c=2"
    assert t2.published_text == "1-3"
    assert c.figure("T.1").source == "a test article"  # inherited
    assert c.figure("T.4").published_text == ">= 100"
    assert c.sweeps[0].values == (1, 2) and c.sweeps[0].dir_name(2) == "num_parallel=2"


@pytest.mark.parametrize("edit, field", [
    (('metric = "weights_gb"', 'metric = "weight_gb"'), "published.figures[2].metric"),
    (('engine = "vllm"\nconcurrency = 1', 'engine = "sglang"\nconcurrency = 1'), "published.figures[0].engine"),
    (('id = "T.2"', 'id = "T.1"'), "published.figures[1].id"),
    (('concurrency = 1\nvalue = 510.0', 'concurrency = 4\nvalue = 510.0'), "published.figures[0].concurrency"),
    (('value = [1.0, 3.0]', 'value = [3.0, 1.0]'), "published.figures[1].value"),
    (('figures = ["T.2"]', 'figures = ["T.9"]'), "published.sweeps[0].figures"),
    (('engines = ["ollama", "vllm"]', 'engines = ["ollama"]'), "published.sweeps[0].engines"),
    (('param = "engines.ollama.num_parallel"', 'param = "engines.ollama.num_paralel"'), "published.sweeps.T.s1"),
])
def test_malformed_published_tables_name_the_key(edit, field):
    text = TINY.replace(*edit)
    assert text != TINY
    with pytest.raises(ConfigError) as e:
        parse_claims(load_experiment(text))
    assert e.value.field.startswith(field)


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("claims_*.toml")), ids=lambda p: p.stem)
def test_every_claims_config_validates(path):
    exp = load_experiment(path)
    c = parse_claims(exp)
    assert c.figures and c.source
    for f in c.figures:
        assert f.source, f.id
        assert f.notes or f.op != "~" or True  # notes are optional; a reproduced figure needs none


# ---------------------------------------------------------------------------------------
# A tiny claims run

@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("claims")
    return run_claims(load_experiment(TINY), out / "run")


def test_run_claims_writes_the_side_by_side_table(tiny_report):
    out = tiny_report.out_dir
    t = pd.read_csv(out / "claims.csv")
    assert list(t["id"]) == ["T.1", "T.2", "T.3", "T.4"]
    rows = t.set_index("id")
    assert rows.loc["T.1", "verdict"] == "physically implausible"  # 510 tok/s > 3.35 TB/s / 16 GB
    assert rows.loc["T.1", "bound"] == pytest.approx(208, rel=0.01)
    assert rows.loc["T.3", "verdict"] == "reproduced"  # 16.06 GB of FP16 weights
    assert rows.loc["T.4", "verdict"] == "reproduced"
    assert rows.loc["T.2", "simulated"] > 1.5  # two vLLM streams batch, one Ollama slot does not
    assert (out / "audit.txt").read_text().count("IMPLAUSIBLE") == 1
    text = format_table(tiny_report.table)
    assert "physically implausible" in text and "above the roofline" in text  # notes of a miss are printed


def test_sweeps_rerun_the_figures_at_each_value(tiny_report):
    s = pd.read_csv(tiny_report.out_dir / "sweeps.csv")
    assert list(s["value"]) == [1, 2] and set(s["id"]) == {"T.2"}
    one, two = s["simulated"]
    assert one > two  # a second Ollama slot closes the gap to vLLM
    assert (tiny_report.out_dir / "sweeps" / "T.s1" / "num_parallel=2" / "summary.json").exists()
    assert "Sweep T.s1" in format_sweeps(tiny_report.sweeps)


def test_results_metrics(tiny_report):
    exp = tiny_report.exp
    res = Results(exp, tiny_report.out_dir)
    assert res.metric("kv_kib_per_token", "vllm") == 128.0
    assert res.metric("success_rate_pct", "vllm", 2) == 100.0
    assert 0 < res.metric("kv_utilization_pct", "vllm") <= 100
    assert res.metric("vram_in_use_gb", "vllm", 2) > res.metric("weights_gb", "vllm")
    assert res.metric("vram_allocated_gb", "vllm") > res.metric("vram_in_use_gb", "vllm", 2)
    # Ollama slots of 256 tokens beside 16 GB of weights on 80 GB: thousands
    assert res.metric("max_concurrent", "ollama") > 1000


def test_reuse_resumes_without_simulating_again(tiny_report):
    before = (tiny_report.out_dir / "requests.csv").read_text()
    again = run_claims(tiny_report.exp, tiny_report.out_dir, reuse=True)
    assert (tiny_report.out_dir / "requests.csv").read_text() == before
    pd.testing.assert_frame_equal(again.table, tiny_report.table)


# ---------------------------------------------------------------------------------------
# papers/build.py

def _build_module():
    spec = importlib.util.spec_from_file_location("papers_build", ROOT / "papers" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_build_smoke_fresh_then_reuse(tmp_path):
    build = _build_module()
    cfg = tmp_path / "claims_tiny.toml"
    cfg.write_text(TINY)
    args = dict(configs=[cfg], results_root=tmp_path / "results", figures_dir=tmp_path / "figures",
                paper=tmp_path / "paper" / "reproduction.md", fidelity=tmp_path / "no_fidelity", teaching=False)
    paper = build.build(reuse=False, **args)
    text = paper.read_text()
    assert "| T.1 |" in text and "**implausible**" in text
    assert "*Pending.*" in text  # no fidelity results yet
    assert (tmp_path / "results" / "claims_tiny" / "claims.csv").exists()
    pngs = sorted(p.name for p in (tmp_path / "figures").glob("*.png"))
    assert pngs == ["audit.png", "tiny_claims.png", "tiny_claims_T.s1.png"]
    assert build.build(reuse=True, **args).read_text() == text
