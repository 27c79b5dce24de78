"""`servesim validate` in small: profile this machine, run 2 cells on the reference engine and on the
simulator, and check the simulator is within the loose CI bound (15%) on throughput and mean E2E."""
import pandas as pd
import pytest
from click.testing import CliRunner

from reference.profile import Grid
from sim.cli import main
from sim.validate import METRICS, run_validate

TOML = """
name = "validate_small"
seed = 0
model = "tiny"
dtype = "float32"

[workload]
kind = "closed_loop"
clients = [1, 4]
num_requests = 32

[workload.prompt_tokens]
dist = "fixed"
value = 64

[workload.output_tokens]
dist = "fixed"
value = 48

[engines.continuous]
scheduler = "continuous"
block_size = 16
max_num_seqs = 16
max_num_batched_tokens = 512
max_model_len = 256
"""

# The default grid cut to this workload's range (contexts <= 256, batches <= 16): about a minute.
GRID = Grid(decode_batch=(1, 2, 4, 8, 16), decode_context=(64, 256), prefill_tokens=(16, 64, 256), prefill_cached=(0, 256),
            mixed_prefill=(64, 256), mixed_cached=(0,), mixed_batch=(4, 16), mixed_context=(64, 256),
            host_batch=(1, 4, 16))


def _validate(d):
    """Profile this machine, then run the small config on the engine and the calibrated simulator."""
    from reference.profile import run_profile
    (d / "small.toml").write_text(TOML)
    run_profile("tiny", d / "profile.csv", grid=GRID, repeats=5, progress=False)
    return run_validate(d / "small.toml", d / "out", d / "profile.csv", progress=False, echo=lambda s: None)


def _ci_errors(errors):
    return errors[errors.metric.isin(("output_throughput", "mean_e2el_ms"))]


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    d = tmp_path_factory.mktemp("validate")
    return d, _validate(d)


def test_errors_csv_schema(validated):
    d, errors = validated
    df = pd.read_csv(d / "out" / "errors.csv")
    assert list(df.columns) == ["cell", "metric", "measured", "predicted", "error_pct"]
    assert set(df.cell) == {"continuous@c=1", "continuous@c=4"}
    assert set(df.metric) == set(METRICS)
    row = df.iloc[0]
    assert row.error_pct == pytest.approx((row.predicted - row.measured) / row.measured * 100, abs=1e-2)
    assert (d / "out" / "fidelity.png").stat().st_size > 0
    assert {"exec_err_pct", "host_err_pct", "outside_s"} <= set(pd.read_csv(d / "out" / "steps_check.csv").columns)


def test_simulator_within_ci_bound(validated, tmp_path):
    _, errors = validated
    e = _ci_errors(errors)
    assert len(e) == 4
    if (e.error_pct.abs() > 15).any():
        # One fresh profile + validation: a busy neighbour on a 2-core machine can spoil one timing run,
        # but a simulator that is really off misses twice.
        e = _ci_errors(_validate(tmp_path))
    assert (e.error_pct.abs() <= 15).all(), e.to_string()


def test_cli_validate_registered(validated):
    d, _ = validated
    r = CliRunner().invoke(main, ["validate", "--help"])
    assert r.exit_code == 0 and "--profile" in r.output
