"""papers/build.py's prose: every verdict and count it states is computed from the results, so it follows them.

Group E's committed results are copied and re-judged (reuse: nothing is simulated), then a verdict is changed by hand
to see the text change with it.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import shutil
from pathlib import Path

import pandas as pd
import pytest

from sim.lab.claims import run_claims
from sim.lab.experiment import load_experiment

ROOT = Path(__file__).resolve().parents[1]
GROUP_E = "claims_e_vllm054_a100"


def _build_module():
    spec = importlib.util.spec_from_file_location("papers_build", ROOT / "papers" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def build():
    return _build_module()


@pytest.fixture(scope="module")
def group_e(tmp_path_factory):
    out = tmp_path_factory.mktemp("results") / GROUP_E
    shutil.copytree(ROOT / "experiments" / "results" / GROUP_E, out)
    return run_claims(load_experiment(ROOT / "experiments" / f"{GROUP_E}.toml"), out, reuse=True)


def _with_verdict(report, fid: str, verdict: str):
    table = report.table.copy()
    table.loc[table.id == fid, "verdict"] = verdict
    return dataclasses.replace(report, table=table)


def test_group_e_counts_follow_the_verdicts(build, group_e):
    t = group_e.table
    fits = list(t[t["class"] == "fit"]["id"])
    assert fits == ["E.2", "E.3"]  # the config's classes: the fitted run's TTFT and TPOT
    judged = t[(t["class"] == "test") & ~t.cell.str.contains("num_requests=10")]
    held = int((judged.verdict == "reproduced").sum())
    text = build._text_e(build.Facts([group_e]))
    assert f"{held} of the {len(judged)} tests are reproduced" in text
    assert "E.2 and E.3, class fit" in text
    worse = build._text_e(build.Facts([_with_verdict(group_e, "E.9", "differs")]))
    assert f"{held - 1} of the {len(judged)} tests are reproduced" in worse
    # a fit is never called reproduced, whatever its check
    row = next(line for line in text.splitlines() if line.startswith("| 10 |"))
    assert "(fit (agrees))" in row or "(fit (disagrees))" in row


def test_the_fitted_run_says_which_of_its_tests_differ(build, group_e):
    f = build.Facts([_with_verdict(group_e, "E.1", "differs")])
    text = build._text_e(f)
    assert "output throughput differs" in text and "its note says why" in text
    f = build.Facts([_with_verdict(_with_verdict(group_e, "E.1", "reproduced"), "E.4", "reproduced")])
    text = build._text_e(f)
    assert "median E2E is reproduced" in text and "its note says why" not in text


def test_headline_counts_come_from_classes_and_checks(build):
    total = pd.DataFrame({"class": ["test", "test", "test", "identity", "identity", "fit"],
                          "verdict": ["reproduced", "differs", "flips", "identity", "identity", "fit"],
                          "check": ["", "", "", "agrees", "disagrees", "agrees"]})
    s = build._class_counts_sentence(total, 2)
    assert s == ("Across 2 claim groups, 6 published figures: 3 tests of the simulation (1 reproduced, 1 differs, "
                 "1 flips); 2 identities (1 agrees, 1 disagrees) and 1 fit (1 agrees, 0 disagree), none of which is "
                 "counted as reproduced.")


def test_seeds_and_extrapolation_threats_follow_the_results(build, group_e):
    seeds = build._seeds_threat([group_e])
    assert f"`{GROUP_E}` (trace) every test's simulated value is the same at every seed" in seeds
    assert "vary with the seed" not in seeds
    # group E runs vLLM on the card its law was fitted on (a100-sxm-80gb is the a100-80gb preset renamed)
    assert "outside the data" not in build._extrapolation_threat([group_e])
    assert build._same_card("a100-80gb", "a100-sxm-80gb")
    assert not build._same_card("a100-80gb", "a100-pcie-80gb")
