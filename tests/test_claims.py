"""Claims: verdict logic, the [published] schema, a tiny claims run with a sweep, and papers/build.py end to end."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pandas as pd
import pytest

from reference.errors import ConfigError
from sim.lab.audit import Bound
from sim.lab.claims import (Results, across_seeds, check, counts, counts_text, format_sweeps, format_table,
                            parse_claims, ratio, run_claims, verdict)
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
class = "test"
claim = "single-user throughput"
metric = "output_throughput"
engine = "vllm"
concurrency = 1
value = 510.0
unit = "tok/s"
notes = "above the roofline"
[[published.figures]]
id = "T.2"
class = "test"
claim = "vLLM over Ollama at 2 clients"
metric = "output_throughput"
engine = "vllm"
ratio_to = "ollama"
concurrency = 2
value = [1.0, 3.0]
unit = "x"
[[published.figures]]
id = "T.3"
class = "identity"
class_note = "FP16 weights: 2 bytes per parameter"
claim = "weights"
metric = "weights_gb"
engine = "vllm"
value = 16.0
unit = "GB"
[[published.figures]]
id = "T.4"
class = "test"
claim = "all complete"
metric = "success_rate_pct"
engine = "ollama"
concurrency = 2
op = ">="
value = 100.0
unit = "%"
[[published.figures]]
id = "T.5"
class = "test"
claim = "Ollama throughput at 2 clients with two slots (a variant)"
metric = "output_throughput"
engine = "ollama"
concurrency = 2
set = { "engines.ollama.num_parallel" = 2 }
value = 10.0
unit = "tok/s"
[[published.sweeps]]
id = "T.s1"
title = "Ollama slots"
param = "engines.ollama.num_parallel"
values = [1, 2]
engines = ["ollama", "vllm"]
loads = [2]
figures = ["T.2"]
"""


def test_parse_claims_reads_figures_classes_and_sweeps():
    c = parse_claims(load_experiment(TINY))
    assert c.source == "a test article" and c.seeds == 5
    assert [f.id for f in c.figures] == ["T.1", "T.2", "T.3", "T.4", "T.5"]
    assert [f.cls for f in c.figures] == ["test", "test", "identity", "test", "test"]
    t2 = c.figure("T.2")
    assert t2.value == (1.0, 3.0) and t2.ratio_to == "ollama" and t2.cell_label == "vllm/ollama@c=2"
    assert t2.published_text == "1-3"
    assert c.figure("T.1").source == "a test article"  # inherited
    assert c.figure("T.3").class_note.startswith("FP16")
    assert c.figure("T.4").published_text == ">= 100"
    t5 = c.figure("T.5")
    assert t5.settings == (("engines.ollama.num_parallel", 2),) and t5.variant == "num_parallel=2"
    assert t5.cell_label == "ollama[num_parallel=2]@c=2"
    assert c.variants() == {"": {}, "num_parallel=2": {"engines.ollama.num_parallel": 2}}
    assert c.sweeps[0].values == (1, 2) and c.sweeps[0].dir_name(2) == "num_parallel=2"


@pytest.mark.parametrize("edit, field", [
    (('metric = "weights_gb"', 'metric = "weight_gb"'), "published.figures[2].metric"),
    (('engine = "vllm"\nconcurrency = 1', 'engine = "sglang"\nconcurrency = 1'), "published.figures[0].engine"),
    (('id = "T.2"', 'id = "T.1"'), "published.figures[1].id"),
    (('concurrency = 1\nvalue = 510.0', 'concurrency = 4\nvalue = 510.0'), "published.figures[0].concurrency"),
    (('value = [1.0, 3.0]', 'value = [3.0, 1.0]'), "published.figures[1].value"),
    (('figures = ["T.2"]', 'figures = ["T.9"]'), "published.sweeps[0].figures"),
    (('figures = ["T.2"]', 'figures = ["T.5"]'), "published.sweeps[0].figures"),  # a variant's figure
    (('engines = ["ollama", "vllm"]', 'engines = ["ollama"]'), "published.sweeps[0].engines"),
    (('param = "engines.ollama.num_parallel"', 'param = "engines.ollama.num_paralel"'), "published.sweeps.T.s1"),
    # classes: declared, known, and justified when not a test
    (('id = "T.1"\nclass = "test"\n', 'id = "T.1"\n'), "published.figures[0].class"),
    (('id = "T.1"\nclass = "test"', 'id = "T.1"\nclass = "reproduced"'), "published.figures[0].class"),
    (('class_note = "FP16 weights: 2 bytes per parameter"\n', ''), "published.figures[2].class_note"),
    (('set = { "engines.ollama.num_parallel" = 2 }', 'set = { "engines.ollama.slots" = 2 }'),
     "published.figures[4].set"),
    (('set = { "engines.ollama.num_parallel" = 2 }', 'set = 2'), "published.figures[4].set"),
    (('source = "a test article"', 'source = "a test article"\nseeds = 0'), "published.seeds"),
])
def test_malformed_published_tables_name_the_key(edit, field):
    text = TINY.replace(*edit)
    assert text != TINY
    with pytest.raises(ConfigError) as e:
        parse_claims(load_experiment(text))
    assert e.value.field.startswith(field), str(e.value)


CLAIMS_CONFIGS = sorted((ROOT / "experiments").glob("claims_*.toml"))


@pytest.mark.parametrize("path", CLAIMS_CONFIGS, ids=lambda p: p.stem)
def test_every_claims_config_validates_and_chooses_its_runtimes(path):
    """Each figure classed (non-tests say why), and the step time of every engine priced by its runtime's law."""
    exp = load_experiment(path)
    c = parse_claims(exp)
    assert c.figures and c.source and c.seeds >= 5
    for f in c.figures:
        assert f.source and f.cls in ("test", "input", "identity", "fit"), f.id
        assert f.is_test or f.class_note, f.id
    assert exp.cost_model is not None and exp.cost_model.kind == "runtime"
    text = path.read_text()
    for e in exp.engines:  # explicit in the file, not the scheduler's default
        table = text.split(f"[engines.{e.name}]", 1)[1].split("\n[", 1)[0]
        assert f'runtime = "{e.runtime}"' in table, e.name


def test_lambdalabs_trace_keeps_each_runs_published_totals():
    """The E group's trace: its first 10 / 40 / 320 rows hold the LL-A100 runs' request counts and token totals."""
    import csv

    trace = pd.read_csv(ROOT / "experiments" / "traces" / "lambdalabs_a100_sharegpt.csv")
    assert len(trace) == 320 and (trace.arrival_s == 0).all() and (trace.output_tokens >= 1).all()
    with open(ROOT / "experiments" / "measured" / "vllm.csv", newline="") as fh:
        rows = {r["row_id"]: r for r in csv.DictReader(fh)}
    for n in (10, 40, 320):
        r = rows[f"LL-A100-{n}"]
        assert int(r["num_prompts"]) == n
        assert trace.prompt_tokens[:n].sum() == int(float(r["total_input_tokens"]))
        assert trace.output_tokens[:n].sum() == int(float(r["total_output_tokens"]))


# ---------------------------------------------------------------------------------------
# Seeds and classes

def test_a_verdict_that_flips_across_seeds_is_reported_as_such():
    assert across_seeds(["reproduced"] * 5) == "reproduced"
    assert across_seeds(["reproduced", "reproduced", "differs", "reproduced", "differs"]) == "flips"
    assert across_seeds(["physically implausible"] * 5) == "physically implausible"
    assert check(26.0, 26.0) == "agrees" and check(17.5, 77.3) == "disagrees" and check(350.0, 256.0, ">=") == \
        "disagrees"


# ---------------------------------------------------------------------------------------
# A tiny claims run

@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("claims")
    return run_claims(load_experiment(TINY), out / "run")


def test_run_claims_writes_the_side_by_side_table(tiny_report):
    out = tiny_report.out_dir
    t = pd.read_csv(out / "claims.csv", keep_default_na=False, na_values=[""])
    assert list(t["id"]) == ["T.1", "T.2", "T.3", "T.4", "T.5"]
    rows = t.set_index("id")
    assert rows.loc["T.1", "verdict"] == "physically implausible"  # 510 tok/s > 3.35 TB/s / 16 GB
    assert rows.loc["T.1", "bound"] == pytest.approx(208, rel=0.01)
    # an identity is checked, never judged: no verdict of a test
    assert rows.loc["T.3", "verdict"] == "identity" and rows.loc["T.3", "check"] == "agrees"
    assert rows.loc["T.4", "verdict"] == "reproduced"
    assert rows.loc["T.2", "simulated"] > 1.5  # two vLLM streams batch, one Ollama slot does not
    assert (out / "audit.txt").read_text().count("IMPLAUSIBLE") == 1
    text = format_table(tiny_report.table)
    assert "physically implausible" in text and "above the roofline" in text  # notes of a miss are printed
    c = counts(tiny_report.table)
    assert c["classes"] == {"test": 4, "input": 0, "identity": 1, "fit": 0}
    assert sum(c["verdicts"].values()) == 4  # only tests are counted
    assert counts_text(tiny_report.table).startswith("5 figures: 4 tests (")


def test_tests_run_at_five_seeds_and_report_each(tiny_report):
    t = tiny_report.table.set_index("id")
    for fid in ("T.1", "T.2", "T.4", "T.5"):
        assert t.loc[fid, "seeds"] == "0;1;2;3;4"
        assert len(t.loc[fid, "seed_verdicts"].split(";")) == 5 and len(t.loc[fid, "seed_values"].split(";")) == 5
        assert t.loc[fid, "sim_min"] <= t.loc[fid, "simulated"] <= t.loc[fid, "sim_max"]
    assert t.loc["T.3", "seeds"] == "0"  # not a test: the config's own seed only
    out = tiny_report.out_dir
    for s in (1, 2, 3, 4):  # further seeds keep their summaries only, and only the test figures' cells
        d = out / "seeds" / f"seed={s}"
        assert (d / "summary.json").exists() and not (d / "requests.csv").exists()
        assert load_experiment(d / "experiment.toml").seed == s
    # the variant (T.5) ran in its own directory, at five seeds too
    v = out / "variants" / "num_parallel=2"
    assert load_experiment(v / "experiment.toml").engine("ollama").num_parallel == 2
    assert (v / "seeds" / "seed=4" / "summary.json").exists()
    assert t.loc["T.5", "simulated"] > t.loc["T.2", "simulated"]  # two slots beat one


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
    # Ollama slots of 256 tokens beside 16 GB of weights on 80 GB: thousands (a sizing: no cap)
    assert res.metric("max_concurrent", "ollama") > 1000
    # vLLM: the pool holds thousands of 96-token requests, but it runs at most max_num_seqs (256) at once
    assert res.metric("max_concurrent", "vllm") == exp.engine("vllm").max_num_seqs == 256


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
    assert "## Teaching figures" not in text  # teaching=False: no section that names figures it does not show
    assert "5 figures: 4 tests" in text  # counts follow from the classes
    assert (tmp_path / "results" / "claims_tiny" / "claims.csv").exists()
    pngs = sorted(p.name for p in (tmp_path / "figures").glob("*.png"))
    assert pngs == ["audit.png", "tiny_claims.png", "tiny_claims_T.s1.png"]
    assert build.build(reuse=True, **args).read_text() == text
