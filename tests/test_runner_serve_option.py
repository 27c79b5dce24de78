"""The bfloat16 matmul copies as a user reaches them: `servesim serve --matmul-dtype` and build_engine's
runner_options set ModelRunner(matmul_dtype=...); the bytes the copies add are counted in weight_bytes;
a bad value is refused naming the field and the allowed values."""
import pytest
from click.testing import CliRunner

from reference.errors import ConfigError
from reference.layout import PagedLayout
from reference.model import param_bytes
from reference.runner import ModelRunner
from sim.lab.commands import serve as serve_command
from sim.lab.server.engine_loop import build_engine
from tests.server_harness import CONFIG, EXP
from tests.test_runner import CFG, PARAMS


@pytest.mark.parametrize("matmul_dtype", ["bfloat16", "float32"])
def test_weight_bytes_count_the_matmul_copies_once(matmul_dtype):
    plain = ModelRunner(CFG, PARAMS, layout=PagedLayout(16, 4))
    runner = ModelRunner(CFG, PARAMS, layout=PagedLayout(16, 4), matmul_dtype=matmul_dtype)
    assert plain.weight_bytes == param_bytes(PARAMS) and plain.matmul_copy_bytes == 0
    copies = runner.matmul_copy_bytes
    assert runner.weight_bytes == param_bytes(PARAMS) + copies
    # The transposed [out, in] matrices are new arrays in either dtype; arrays a copy shares with params
    # (norms, and in float32 the [in, out] matrices and the embedding) are counted once, not per copy.
    transposed = sum(int(m.t.nbytes) for lp in runner.few_rows_params.layers
                     for m in (lp.wq, lp.wk, lp.wv, lp.wo, lp.w_gate, lp.w_up, lp.w_down))
    assert transposed <= copies < param_bytes(runner.few_rows_params) + param_bytes(runner.batched_params)
    assert runner.few_rows_params.final_norm is runner.params.final_norm


def test_build_engine_passes_matmul_dtype_to_the_runner():
    engine, _ = build_engine(EXP, "continuous", runner_options={"matmul_dtype": "bfloat16"})
    assert engine.runner.matmul_dtype == "bfloat16" and engine.runner.matmul_copy_bytes > 0
    engine, _ = build_engine(EXP, "continuous")
    assert engine.runner.matmul_dtype is None and engine.runner.matmul_copy_bytes == 0  # the default: float32


def test_build_engine_refuses_a_bad_matmul_dtype_naming_the_field():
    with pytest.raises(ConfigError, match="matmul_dtype.*float32, bfloat16"):
        build_engine(EXP, "continuous", runner_options={"matmul_dtype": "int8"})


class _NotServing:
    """Stands in for GracefulServer: records the app it was given instead of serving it."""

    seen = []

    def __init__(self, config, state):
        self.seen.append(state)

    def run(self):
        pass


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "serve_tiny.toml"
    path.write_text(CONFIG)
    return path


def test_serve_flag_reaches_the_runner(config_file, monkeypatch):
    monkeypatch.setattr(serve_command, "GracefulServer", _NotServing)
    _NotServing.seen.clear()
    args = [str(config_file), "--no-warmup", "--compilation-cache", "", "--xla-flags", ""]
    res = CliRunner().invoke(serve_command.command, args + ["--matmul-dtype", "bfloat16"])
    assert res.exit_code == 0, res.output
    runner = _NotServing.seen[-1].loop.engine.runner
    assert runner.matmul_dtype == "bfloat16" and runner.batched_params is not None
    assert f"of which {runner.matmul_copy_bytes / 1e6:.0f} MB bfloat16 matmul copies" in res.output
    res = CliRunner().invoke(serve_command.command, args)
    assert res.exit_code == 0, res.output
    assert _NotServing.seen[-1].loop.engine.runner.matmul_dtype is None and "no matmul copies" in res.output


def test_serve_flag_refuses_a_bad_value_naming_it(config_file, monkeypatch):
    monkeypatch.setattr(serve_command, "GracefulServer", _NotServing)
    res = CliRunner().invoke(serve_command.command, [str(config_file), "--no-warmup", "--matmul-dtype", "int8"])
    assert res.exit_code == 2
    assert "--matmul-dtype" in res.output and "float32" in res.output and "bfloat16" in res.output
