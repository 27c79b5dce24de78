"""`servesim validate`, deterministically: the engine runs on the calibrated model's clock (each step takes
its predicted time), so the simulator must reproduce every metric of every cell to rounding.

This checks everything the fidelity figures rest on except the cost model itself: the same requests
from the same seed, the same engine kinds building the same schedulers, the engine loop and the
SimPy replica making the same decisions at the same times, and the same metrics. How close the
cost model is to this machine's real step times is a timing check, not a unit test:
experiments/benchmarks/fidelity_bound.py (run by CI after the test suite).
"""
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from sim.lab.cli import main
from sim.lab.validate import METRICS, run_validate

PROFILE = Path(__file__).resolve().parents[1] / "experiments" / "profiles" / "cpu_tiny.csv"

TOML = """
name = "validate_small"
seed = 0
model = "tiny"
dtype = "float32"

[workload]
kind = "{kind}"
{load}
num_requests = 24

[workload.prompt_tokens]
dist = "uniform"
low = 20
high = 90

[workload.output_tokens]
dist = "uniform"
low = 4
high = 40

[workload.shared_prefix]
fraction = 0.5
tokens = 32

[engines.sequential]
scheduler = "sequential"
num_parallel = 2
num_ctx = 256

[engines.static]
scheduler = "static"
max_batch_size = 4
max_model_len = 256

[engines.continuous]
scheduler = "continuous"
block_size = 16
max_num_seqs = 8
max_num_batched_tokens = 64
max_model_len = 256
num_blocks = 40
"""
CLOSED = TOML.format(kind="closed_loop", load="clients = [1, 4]")
OPEN = TOML.format(kind="poisson", load="rates = [200.0]")


@pytest.fixture(scope="module", params=[CLOSED, OPEN], ids=["closed_loop", "poisson"])
def validated(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("validate")
    (d / "small.toml").write_text(request.param)
    return d, run_validate(d / "small.toml", d / "out", PROFILE, progress=False, echo=lambda s: None, clock="model")


def test_the_simulator_reproduces_an_engine_on_its_clock(validated):
    _, errors = validated
    assert set(errors.metric) == set(METRICS)
    cells = set(errors.cell.str.split("@").str[0])
    assert cells == {"sequential", "static", "continuous"}
    worst = errors.error_pct.abs().max()
    assert worst < 1e-6, errors.loc[errors.error_pct.abs().idxmax()].to_dict()


def test_the_per_step_check_sees_the_model_s_own_times(validated):
    d, _ = validated
    checks = pd.read_csv(d / "out" / "steps_check.csv")
    assert (checks.step_err_pct.abs() < 1e-6).all(), checks.to_string()
    assert (checks.outside_s >= -1e-9).all()


def test_errors_csv_schema(validated):
    d, errors = validated
    df = pd.read_csv(d / "out" / "errors.csv")
    assert list(df.columns) == ["cell", "metric", "measured", "predicted", "error_pct"]
    row = df.iloc[0]
    assert row.error_pct == pytest.approx((row.predicted - row.measured) / row.measured * 100, abs=1e-6)
    assert (d / "out" / "fidelity.png").stat().st_size > 0
    assert {"exec_err_pct", "host_err_pct", "outside_s"} <= set(pd.read_csv(d / "out" / "steps_check.csv").columns)


def test_cli_validate_takes_the_model_clock(tmp_path):
    r = CliRunner().invoke(main, ["validate", "--help"])
    assert r.exit_code == 0 and "--profile" in r.output and "--clock" in r.output
    r = CliRunner().invoke(main, ["validate", str(PROFILE), "--out", str(tmp_path), "--clock", "sundial"])
    assert r.exit_code == 2 and "sundial" in r.output
