"""papers/tutorial.md: every exercise's command runs as written, and prints what the Answers section says.

Each check names a command exactly as the tutorial shows it (the test fails if the text changes
without it), runs it through the same entry point (the `servesim` CLI, `python -m
sim.lab.teaching`, or the Python it shows), and asserts both the output and the answer's words.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from sim.lab import teaching
from sim.lab.cli import main as servesim

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = (ROOT / "papers" / "tutorial.md").read_text()
ANSWERS = TUTORIAL[TUTORIAL.index("## Answers"):]


@pytest.fixture(autouse=True)
def _at_the_repository_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the commands name experiments/... as the tutorial does


def _answer(n: int) -> str:
    m = re.search(rf"^{n}\. (.*?)(?=^\d+\. |^</details>)", ANSWERS, re.S | re.M)
    assert m, f"no answer {n}"
    return " ".join(m.group(1).split())


def _shown(command: str) -> None:
    assert command in TUTORIAL, f"the tutorial no longer shows: {command}"


def _servesim(command: str) -> str:
    _shown(command)
    args = command.split()[1:]
    r = CliRunner().invoke(servesim, args)
    assert r.exit_code == 0, r.output
    return r.output


def _teaching(command: str, out_dir: Path) -> str:
    _shown(command)
    args = [a if a != "/tmp/fig" else str(out_dir) for a in command.split()[3:]]
    r = CliRunner().invoke(teaching.main, args)
    assert r.exit_code == 0, r.output
    return r.output


def _totals(output: str) -> dict[str, int]:
    last = output.strip().splitlines()[-1]
    assert last.startswith("totals:")
    found = {k: int(v) for v, k in re.findall(r"(\d+) (steps|blocks allocated|shared|preemptions|refused)", last)}
    return found


def test_exercise_1_kv_bytes_per_token():
    out = _servesim("servesim models")
    row = next(line for line in out.splitlines() if line.startswith("llama-2-13b"))
    assert row.split()[-1] == "819200"
    assert int(12 * 2**30 / 819_200) == 15_728
    assert "819,200 bytes" in _answer(1) and "15,728" in _answer(1)


def test_exercise_2_halving_the_reservation_refuses_requests(tmp_path):
    out = _teaching("python -m sim.lab.teaching /tmp/fig --max-model-len 24", tmp_path)
    reserve = next(line for line in out.splitlines() if line.startswith("reserve:"))
    assert "22 steps" in reserve and "at most 4 running" in reserve
    assert "refused 4: r1 r3 r6 r8" in reserve
    paged = next(line for line in out.splitlines() if line.startswith("paged:"))
    assert "41 steps" in paged and "refused" not in paged
    default = teaching.pool_runs()
    assert default["reserve"].steps == 78 and default["reserve"].max_running == 2 and not default["reserve"].refused
    a = _answer(2)
    assert "22 steps instead of 78" in a and "r1, r3, r6, r8" in a and "at most 4 running" in a and "41 steps" in a
    assert (tmp_path / "teaching_kv_over_time.png").stat().st_size > 10_000


def test_exercise_3_copy_on_write_depends_on_the_last_block(tmp_path):
    lines = {}
    for n in (11, 12):
        out = _teaching(f"python -m sim.lab.teaching /tmp/fig --fork-prompt-tokens {n}", tmp_path)
        lines[n] = next(line for line in out.splitlines() if line.startswith("fork with"))
    assert "no copy" in lines[11] and "A' [1, 2, 3, 6]" in lines[11]
    assert "copy-on-write 4 -> 7" in lines[12]
    assert "copy-on-write 3 -> 6" in teaching.fork_summary(10)
    a = _answer(3)
    assert "no copy" in a and "4 -> 7" in a and "3 -> 6" in a


def test_exercise_4_gather_through_a_block_table():
    m = re.search(r'python -c "(.*?)"', TUTORIAL)
    assert m and "gather_paged" in m.group(1)
    r = subprocess.run([sys.executable, "-c", m.group(1)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[6 7 2 3 0 1]"
    assert "`[6 7 2 3 0 1]`" in _answer(4)


def test_exercise_5_block_size():
    four = _totals(_servesim("servesim trace experiments/trace_small.toml"))
    eight = _totals(_servesim("servesim trace experiments/trace_small.toml --set engines.paged.block_size=8 "
                              "--set engines.paged.num_blocks=8"))
    assert (four["steps"], four["blocks allocated"], four["preemptions"]) == (23, 34, 3)
    assert (eight["steps"], eight["blocks allocated"], eight["preemptions"]) == (26, 19, 3)
    a = _answer(5)
    assert "same 3 preemptions" in a and "19 blocks allocated instead of 34" in a and "26 steps instead of 23" in a


def test_exercise_6_prefix_caching():
    off = _totals(_servesim("servesim trace experiments/trace_small.toml "
                            "--set engines.paged.enable_prefix_caching=false"))
    on = _totals(_servesim("servesim trace experiments/trace_small.toml"))
    assert (off["shared"], off["steps"], off["preemptions"]) == (0, 27, 4)
    assert (on["shared"], on["steps"], on["preemptions"]) == (11, 23, 3)
    full = _servesim("servesim trace experiments/trace_small.toml")
    step12 = full[full.index("step 12 "):full.index("step 13 ")]
    assert "r2 recompute 16:21" in step12
    assert "admitted   r2: revives cached blocks 1 2 9 11 from the free pool" in step12
    assert "r5 recompute 12:17" in full[full.index("step 17 "):full.index("step 18 ")]
    a = _answer(6)
    assert "0 blocks shared (11 with caching on)" in a and "27 steps instead of 23" in a
    assert "4 preemptions instead of 3" in a and "r2 recompute 16:21" in a and "1 2 9 11" in a


def test_exercise_7_reservation():
    oracle = _totals(_servesim("servesim trace experiments/trace_small.toml --set engines.paged.scheduler=orca "
                               "--set engines.paged.reservation=request"))
    maxlen = _totals(_servesim("servesim trace experiments/trace_small.toml --set engines.paged.scheduler=orca "
                               "--set engines.paged.reservation=max_model_len"))
    assert (oracle["steps"], oracle["preemptions"]) == (30, 0)
    assert (maxlen["steps"], maxlen["preemptions"]) == (59, 0)
    a = _answer(7)
    assert "30 steps" in a and "59" in a and "paging 23" in a and "0 preemptions" in a and "preempts 3 times" in a


def test_exercise_8_limits():
    cmd = ("servesim trace experiments/trace_small.toml --set engines.paged.max_model_len=24 "
           "--set engines.paged.num_blocks=7 --steps 3")
    out = _servesim(cmd)
    assert re.search(r"refused    r0 at t=0.00 ms: prompt \+ max_tokens = 26 exceeds max_model_len=24", out)
    assert re.search(r"refused    r2 at t=0.00 ms: prompt \+ max_tokens = 27 exceeds max_model_len=24", out)
    step2 = out[out.index("step 2 "):out.index("step 3 ")]
    assert "no room    r4" in step2
    tot = _totals(out)
    assert (tot["preemptions"], tot["refused"]) == (2, 2)
    full = _servesim(cmd.replace(" --steps 3", ""))
    blocks = full.split("\nstep ")[1:]
    assert [int(b.split()[0]) for b in blocks if "\n  preempted  " in b] == [4, 15]
    a = _answer(8)
    assert "r0 and r2" in a and "26 and 27" in a and "2 preemptions" in a and "steps 4 and 15" in a


def test_exercise_9_matches_the_report():
    report = (ROOT / "papers" / "reproduction.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| D.5 |"))
    cells = [c.strip() for c in row.split("|")]
    # | id | class | claim | cell | unit | published | simulated (min-max over seeds) | ...
    published, simulated = cells[6], cells[7].split()[0]
    assert published == "20.4"
    assert f"{simulated}%" in _answer(9) and "20.4%" in _answer(9)


def test_the_page_command_and_its_frame_link(tmp_path):
    _shown("servesim trace experiments/trace_small.toml --html trace.html")
    r = CliRunner().invoke(servesim, ["trace", "experiments/trace_small.toml", "--html", str(tmp_path / "t.html")])
    assert r.exit_code == 0, r.output
    assert "#scene=1&frame=7" in TUTORIAL
    assert (ROOT / "papers" / "figures" / "teaching_trace_page.png").is_file()


@pytest.mark.parametrize("figure", ["teaching_ollama_slots.png", "teaching_kv_over_time.png",
                                    "teaching_block_tables.png", "teaching_gather.png", "teaching_preemption.png",
                                    "teaching_trace_page.png"])
def test_every_figure_the_tutorial_shows_is_committed(figure):
    assert f"(figures/{figure})" in TUTORIAL
    assert (ROOT / "papers" / "figures" / figure).stat().st_size > 10_000
