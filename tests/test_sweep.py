"""Sweeps: the [sweep] grid (declared, validated with key paths), its points, and parallel runs whose files
are the same bytes whatever the executor, the number of workers, the order cells finish in, and interruptions."""
from __future__ import annotations

import filecmp
import json
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reference.errors import ConfigError
from sim.lab.cell_tasks import cell_files
from sim.lab.executors import Executor, ProcessExecutor, SerialExecutor, make_executor
from sim.lab.experiment import json_schema, load_experiment
from sim.lab.ray_local import local_ray_cluster
from sim.lab.results_store import ResultsStore
from sim.lab.simulate import run_experiment
from sim.lab.sweep import expand, run_sweep

BASE = """
name = "tiny_sweep"
seed = 3
model = "tiny"

[workload]
kind = "closed_loop"
clients = [1, 4]
requests_per_client = 3
prompt_tokens = {dist = "uniform", low = 8, high = 24}
output_tokens = {dist = "uniform", low = 4, high = 12}

[engines.ollama]
scheduler = "sequential"
num_ctx = 64

[engines.vllm]
scheduler = "continuous"
max_model_len = 64
max_num_batched_tokens = 64
max_num_seqs = 8
num_blocks = 512             # a pool sized from an H100's memory would be ~18M blocks of the tiny model

[hardware]
preset = "h100-sxm"
"""
GRID = '\n[sweep]\ngrid = {"engines.vllm.max_num_seqs" = [2, 8], "hardware.preset" = ["h100-sxm", "rtx-4090"]}\n'
FILES = ("requests.csv", "summary.json", "itl_histograms.json", "timeseries.csv", "experiment.toml")


def _same_tree(a: Path, b: Path) -> None:
    """Every file under a is in b with the same bytes, and the other way round."""
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        assert filecmp.cmp(a / rel, b / rel, shallow=False), rel


# ---------------------------------------------------------------------------------------------
# The declaration


def test_grid_round_trips_and_is_in_the_schema():
    exp = load_experiment(BASE + GRID)
    assert exp.sweep.num_points == 4
    assert load_experiment(exp.to_toml()) == exp
    assert "sweep" in json_schema()["properties"]


def test_no_sweep_keeps_the_document_as_before():
    """An experiment without [sweep] writes the same TOML as before the table existed."""
    assert "[sweep" not in load_experiment(BASE).to_toml()


@pytest.mark.parametrize("grid, field, words", [
    ("{}", "sweep.grid", "at least one key"),
    ('{"engines.nope.max_num_seqs" = [1]}', 'sweep.grid["engines.nope.max_num_seqs"]', "engines.ollama.<key>"),
    ('{"engines.vllm" = [1]}', 'sweep.grid["engines.vllm"]', "engines.<name>.<key>"),
    ('{"bogus.x" = [1]}', 'sweep.grid["bogus.x"]', "workload"),
    ('{"seed" = [1, 1]}', 'sweep.grid["seed"]', "distinct"),
    ('{"seed" = []}', 'sweep.grid["seed"]', "non-empty"),
    ('{"sweep.grid" = [1]}', 'sweep.grid["sweep.grid"]', "cannot be swept"),
    ('{"a b" = [1]}', 'sweep.grid["a b"]', "dotted"),
    ("3", "sweep.grid", "table"),
])
def test_bad_grids_name_the_key(grid, field, words):
    with pytest.raises(ConfigError) as e:
        load_experiment(BASE + f"\n[sweep]\ngrid = {grid}\n")
    assert e.value.field == field
    assert words in str(e.value)


def test_unknown_sweep_key_is_refused():
    with pytest.raises(ConfigError) as e:
        load_experiment(BASE + "\n[sweep]\ngrids = {}\ngrid = {seed = [1]}\n")
    assert e.value.field == "sweep.grids"


# ---------------------------------------------------------------------------------------------
# Points


def test_points_set_keys_in_grid_order():
    points = expand(load_experiment(BASE + GRID))
    assert [p.values for p in points] == [
        {"engines.vllm.max_num_seqs": 2, "hardware.preset": "h100-sxm"},
        {"engines.vllm.max_num_seqs": 2, "hardware.preset": "rtx-4090"},
        {"engines.vllm.max_num_seqs": 8, "hardware.preset": "h100-sxm"},
        {"engines.vllm.max_num_seqs": 8, "hardware.preset": "rtx-4090"}]
    p = points[3].experiment
    assert p.engine("vllm").max_num_seqs == 8 and p.hardware.preset == "rtx-4090" and p.sweep is None
    assert points[3].label == "max_num_seqs=8 preset=rtx-4090"
    assert points[3].dirname == "max_num_seqs=8_preset=rtx-4090"


def test_points_rederive_defaults_from_the_swept_key():
    """Chunked prefill off: vLLM's token budget default becomes max(2048, max_model_len), as in a file that says so."""
    text = BASE.replace("max_model_len = 64\nmax_num_batched_tokens = 64\n", "max_model_len = 4096\n").replace(
        'model = "tiny"', 'model = "llama-3.1-8b"')
    points = expand(load_experiment(text + '\n[sweep]\ngrid = {"engines.vllm.enable_chunked_prefill" = [true, false]}\n'))
    assert [p.experiment.engine("vllm").max_num_batched_tokens for p in points] == [2048, 4096]


def test_a_bad_point_is_named_before_anything_runs():
    # The file itself fits (a B200 holds 70B in fp16); its second point does not (an H100 does not).
    text = (BASE.replace('model = "tiny"', 'model = "llama-3.1-70b"').replace('preset = "h100-sxm"', 'preset = "b200"')
            .replace("num_ctx = 64", "num_ctx = 64\nweights = \"fp16\""))
    exp = load_experiment(text + '\n[sweep]\ngrid = {"hardware.preset" = ["b200", "h100-sxm"]}\n')
    with pytest.raises(ConfigError) as e:
        expand(exp)
    assert e.value.field == "engines.ollama.weights"
    assert "in sweep point hardware.preset=h100-sxm" in str(e.value) and "141.1 GB" in str(e.value)


def test_a_swept_value_of_the_wrong_type_is_named_with_the_point():
    exp = load_experiment(BASE + '\n[sweep]\ngrid = {"engines.vllm.max_num_seqs" = [4, "many"]}\n')
    with pytest.raises(ConfigError) as e:
        expand(exp)
    assert e.value.field == "engines.vllm.max_num_seqs" and "max_num_seqs=many" in str(e.value)


# ---------------------------------------------------------------------------------------------
# Same bytes whatever runs the cells


def test_parallel_run_writes_what_the_serial_run_writes(tmp_path):
    """No sweep: `servesim run` through 2 worker processes gives run_experiment's files byte for byte."""
    exp = load_experiment(BASE)
    run_experiment(exp, tmp_path / "serial", progress=False)
    with ProcessExecutor(2) as pool:
        run_sweep(exp, tmp_path / "pool", executor=pool, progress=False)
    _same_tree(tmp_path / "serial", tmp_path / "pool")


def test_sweep_files_do_not_depend_on_the_number_of_workers(tmp_path):
    exp = load_experiment(BASE + GRID)
    one = run_sweep(exp, tmp_path / "one", workers=1, progress=False)
    run_sweep(exp, tmp_path / "two", workers=2, progress=False)
    _same_tree(tmp_path / "one", tmp_path / "two")
    assert len(one) == 16 and set(one["point"]) == {p.label for p in expand(exp)}
    assert list(one["sweep.hardware.preset"][:4]) == ["h100-sxm"] * 4
    index = json.loads((tmp_path / "one" / "sweep.json").read_text())
    assert [p["dir"] for p in index["points"]][0] == "points/max_num_seqs=2_preset=h100-sxm"
    point = tmp_path / "one" / index["points"][1]["dir"]
    for name in FILES:
        assert (point / name).exists()
    assert load_experiment(point / "experiment.toml").hardware.preset == "rtx-4090"


def test_ray_cluster_on_loopback_writes_the_local_files(tmp_path):
    """A Ray head started on 127.0.0.1 (2 CPUs) runs the sweep's cells and the files are the local run's, byte for byte."""
    pytest.importorskip("ray", reason="ray is not installed; the test extra has it: pip install -e '.[test]'")
    exp = load_experiment(BASE + GRID)
    run_sweep(exp, tmp_path / "local", workers=1, progress=False)
    with local_ray_cluster(num_cpus=2) as address:
        run_sweep(exp, tmp_path / "ray", ray_address=address, progress=False)
    _same_tree(tmp_path / "local", tmp_path / "ray")


def test_a_ray_address_without_a_cluster_is_a_config_error():
    pytest.importorskip("ray", reason="ray is not installed; the test extra has it: pip install -e '.[test]'")
    with pytest.raises(ConfigError) as e:
        make_executor(ray_address="127.0.0.1:1")
    assert e.value.field == "--ray"


class _Shuffled(Executor):
    """Runs tasks in this process in a given order, and stops (as Ctrl-C would) after `stop_after` of them."""

    def __init__(self, order=None, stop_after=None):
        self.order, self.stop_after = order, stop_after

    def map_unordered(self, fn, tasks):
        order = self.order if self.order is not None else range(len(tasks))
        for n, i in enumerate(o for o in order if o < len(tasks)):
            if self.stop_after is not None and n == self.stop_after:
                raise KeyboardInterrupt
            yield i, fn(*tasks[i])


class _Counting(SerialExecutor):
    """This process, counting the tasks it is given."""

    def __init__(self):
        self.calls = []

    def map_unordered(self, fn, tasks):
        self.calls.append(len(tasks))
        return super().map_unordered(fn, tasks)


def test_interrupted_run_keeps_finished_cells_and_resumes_to_the_same_files(tmp_path):
    """Cells finishing in reverse order wait in .cells/; an interruption keeps them, and a resumed run ends
    with the files of an uninterrupted one, without simulating them again."""
    exp = load_experiment(BASE + GRID)
    run_sweep(exp, tmp_path / "clean", executor=SerialExecutor(), progress=False)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        run_sweep(exp, out, executor=_Shuffled(order=list(range(15, -1, -1)), stop_after=3), progress=False)
    staged = sorted(p.name for p in out.glob("points/*/.cells/*"))
    assert len(staged) == 3  # the last three cells finished, waiting for the ones before them
    resumed = _Counting()
    run_sweep(exp, out, executor=resumed, progress=False)
    calls = resumed.calls
    assert calls == [13]
    assert not list(out.glob("points/*/.cells"))
    _same_tree(tmp_path / "clean", out)


def test_a_cell_cut_off_while_waiting_is_run_again(tmp_path):
    """A .cells/ folder without its cell.json (cut off mid-write) is dropped and its cell simulated again."""
    exp = load_experiment(BASE)
    run_experiment(exp, tmp_path / "clean", progress=False)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        run_sweep(exp, out, executor=_Shuffled(order=[3, 2, 1, 0], stop_after=2), progress=False)
    half = next((out / ".cells").iterdir())
    (half / "cell.json").unlink()
    run_sweep(exp, out, executor=SerialExecutor(), progress=False)
    _same_tree(tmp_path / "clean", out)


@pytest.fixture(scope="module")
def tiny_cells():
    """The four cells of BASE, simulated once: (experiment, [CellFiles in cell order])."""
    exp = load_experiment(BASE)
    return exp, [cell_files(exp, c) for c in exp.cells()]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=st.permutations(range(4)), cut=st.integers(0, 4), seed=st.integers(0, 10 ** 6))
def test_commit_order_does_not_depend_on_finish_order(tiny_cells, tmp_path_factory, order, cut, seed):
    """Whatever order cells finish in and wherever a run is cut, resuming gives the in-order files."""
    exp, files = tiny_cells
    ref = tmp_path_factory.mktemp("ref")
    store = ResultsStore(ref, exp)
    for f in files:
        store.add(f)
    out = tmp_path_factory.mktemp("shuffled")
    first = ResultsStore(out, exp)
    for i in order[:cut]:
        first.add(files[i])
    second = ResultsStore(out, exp)  # a new run on the same folder: resume
    rest = [files[[c.label for c in exp.cells()].index(c.label)] for c in second.pending()]
    random.Random(seed).shuffle(rest)
    for f in rest:
        second.add(f)
    assert second.num_done == 4 and not second.pending()
    _same_tree(ref, out)


def test_fresh_starts_over(tmp_path):
    exp = load_experiment(BASE + GRID)
    run_sweep(exp, tmp_path, workers=1, progress=False)
    again, fresh = _Counting(), _Counting()
    run_sweep(exp, tmp_path, executor=again, progress=False)
    run_sweep(exp, tmp_path, executor=fresh, resume=False, progress=False)
    calls = again.calls + fresh.calls
    assert calls == [16]  # nothing left on resume; everything again when fresh


def test_worker_config_errors_arrive_as_config_errors():
    """A ConfigError raised in a worker process is a ConfigError in the driver, field and all."""
    with ProcessExecutor(2) as pool:
        with pytest.raises(ConfigError) as e:
            list(pool.map_unordered(_raise_config_error, [(1,), (2,)]))
    assert e.value.field == "engines.x.y" and e.value.allowed == "1, 2"


def _raise_config_error(n):
    raise ConfigError("engines.x.y", f"bad {n}", "1, 2")


def test_make_executor_choices():
    assert isinstance(make_executor(1), SerialExecutor)
    assert isinstance(make_executor(8, tasks=1), SerialExecutor)
    pool = make_executor(2, tasks=10)
    assert isinstance(pool, ProcessExecutor) and pool.workers == 2
    with pytest.raises(ConfigError) as e:
        make_executor(0)
    assert e.value.field == "--workers"
