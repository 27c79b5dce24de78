"""Why serve_http.py's in-process continuous run at 50 users was faster sampled (T=1) than greedy.

serve_http.py's in-process worker sends the workload's random prompts when greedy (as bench --url
does) and the article client's one chat prompt, the same for every request, when sampling at
T=1 (as the article client does). The continuous engine caches prompt prefixes (vLLM's automatic
prefix caching), so every request after the first finds 96 of its 111 prompt tokens (six full
16-token blocks) cached. This runs the server's engine (serve_http.py's worker: build_engine, every
shape compiled) on the four combinations of sampling and prompts, interleaved, and counts the
prompt tokens the prefix cache served.

    PYTHONPATH=$PWD python experiments/results/server16/t1_prefix.py [--users 50] [--requests 100] [--repeats 3]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import tempfile
import time
from pathlib import Path

from reference.engine import Engine
from sim.lab.experiment import load_experiment
from sim.lab.server.engine_loop import build_engine

ROOT = Path(__file__).resolve().parents[3]
_spec = importlib.util.spec_from_file_location("serve_http", ROOT / "experiments" / "benchmarks" / "serve_http.py")
serve_http = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve_http)
VARIANTS = {"greedy, random prompts": (0.0, False), "T=1, random prompts": (1.0, False),
            "greedy, article prompt": (0.0, True), "T=1, article prompt": (1.0, True)}


def run(cfg_path: Path, runner, cfg, temperature: float, article: bool) -> dict:
    """One closed-loop level on a fresh scheduler: tok/s, steps, ms per step, prompt tokens computed and cached."""
    exp = load_experiment(cfg_path)
    workload = exp.workload.build(exp.seed, exp.model_spec.vocab_size, exp.cells()[0].load)
    source = serve_http.SampledClosedLoopSource(workload, None, temperature,
                                                serve_http.ARTICLE_PROMPT_IDS if article else None)
    engine = Engine(cfg.build_scheduler(exp.plan(cfg)), runner)
    done = []
    steps = 0

    def stepped(record) -> None:
        nonlocal steps
        steps += 1

    t0 = time.perf_counter()
    engine.run(source, 0.0, on_finish=done.append, on_step=stepped)
    wall = time.perf_counter() - t0
    tokens = sum(r.num_output_tokens for r in done)
    cached = sum(r.num_cached_prompt_tokens for r in done)
    prompt = sum(r.num_prompt_tokens for r in done)
    return dict(tok_s=tokens / wall, steps=steps, ms_per_step=1e3 * wall / steps, cached=cached / prompt,
                prefilled=prompt - cached)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=50)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/servesim/jax"))
    args = ap.parse_args()
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_use_xnnpack=true".strip()
    serve_http.enable_compilation_cache(args.cache)
    out = Path(tempfile.mkdtemp(prefix="t1_prefix_"))
    cfg_path = serve_http.write_config(out / "c.toml", "continuous", args.users, args.requests // args.users,
                                       serve_http.OUTPUT_TOKENS)
    served, cfg = build_engine(load_experiment(cfg_path))
    runner = served.runner
    for shape in runner.shapes():
        runner.compile_shape(shape)
    for t, a in VARIANTS.values():  # each path once before any is timed
        run(cfg_path, runner, cfg, t, a)
    got: dict[str, list[dict]] = {k: [] for k in VARIANTS}
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, load {os.getloadavg()[0]:.1f}; "
          f"continuous engine in process, {args.users} users, {args.requests} requests, "
          f"{serve_http.PROMPT_TOKENS} in / {serve_http.OUTPUT_TOKENS} out", flush=True)
    for rep in range(args.repeats):
        for name, (t, a) in VARIANTS.items():
            m = run(cfg_path, runner, cfg, t, a)
            got[name].append(m)
            print(f"{name:24s} {m['tok_s']:6.0f} tok/s, {m['steps']} steps, {m['ms_per_step']:.2f} ms per step, "
                  f"prompt tokens prefilled {m['prefilled']} ({m['cached']:.0%} from the prefix cache); "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    print(f"\nmedians of {args.repeats}:")
    for name, runs in got.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"  {name:24s} {med['tok_s']:6.0f} tok/s, {med['steps']:.0f} steps, {med['ms_per_step']:.2f} ms per "
              f"step, prompt tokens prefilled {med['prefilled']:.0f} ({med['cached']:.0%} cached)")


if __name__ == "__main__":
    main()
