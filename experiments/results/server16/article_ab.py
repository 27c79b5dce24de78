"""The article client (non-streamed chat, experiments/benchmarks/http_users.py) against continuous servers of
several source trees side by side: tok/s, the engine thread's share of the wall stepping, and CPU per token of
the server's event loop and whole process, each level run on every tree in turn.

    PYTHONPATH=$PWD python experiments/results/server16/article_ab.py --tree before=/tmp/t/OLD --tree after=$PWD \\
        [--python /work/venvs/http16b/bin/python] [--repeats 4] [--levels 10:50,50:100]
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from sim.lab.http_bench import wait_healthy

ROOT = Path(__file__).resolve().parents[3]
_spec = importlib.util.spec_from_file_location("serve_http", ROOT / "experiments" / "benchmarks" / "serve_http.py")
serve_http = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve_http)
NAMES = ("servesim:engine_step_seconds", "vllm:generation_tokens")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", required=True, help="NAME=DIR (a source tree)")
    ap.add_argument("--python", default="/work/venvs/http16b/bin/python", help="the servers' Python")
    ap.add_argument("--port", type=int, default=8185)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--levels", type=serve_http.http_users.parse_levels, default=[(10, 50), (50, 100)])
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/servesim/jax"))
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="article_ab_"))
    trees = dict(t.split("=", 1) for t in args.tree)
    cfg = serve_http.write_config(out / "server.toml", "continuous", 1, 1, serve_http.OUTPUT_TOKENS)
    urls = {n: f"http://127.0.0.1:{args.port + i}" for i, n in enumerate(trees)}
    env = {**os.environ, "XLA_FLAGS": "--xla_cpu_use_xnnpack=true"}
    procs = {n: subprocess.Popen([args.python, "-c", "from sim.lab.cli import main; main()", "serve", str(cfg),
                                  "--port", str(args.port + i), "--served-model-name", "llama3.1:8b",
                                  "--compilation-cache", args.cache, "--log-level", "warning", "--xla-flags", ""],
                                 cwd=d, stdout=open(out / f"serve-{n}.log", "w"), stderr=subprocess.STDOUT,
                                 env={**env, "PYTHONPATH": d})
             for i, (n, d) in enumerate(trees.items())}
    got: dict[tuple, list[dict]] = {}
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; servers: {args.python}, --stream-interval 1; "
          + "; ".join(f"{n} = {d}" for n, d in trees.items()), flush=True)
    try:
        for n in trees:
            wait_healthy(urls[n], procs[n], 3600)
        for n in trees:  # one unmeasured level each
            asyncio.run(serve_http.http_users.run_level(urls[n], "llama3.1:8b", 10, 20, max_tokens=100))
        for _ in range(args.repeats):
            for users, requests in args.levels:
                for n in trees:
                    before, cpu0 = serve_http.metrics(urls[n], NAMES), serve_http.cpu_s(procs[n].pid)
                    lv = asyncio.run(serve_http.http_users.run_level(urls[n], "llama3.1:8b", users, requests,
                                                                     max_tokens=100))
                    after, cpu1 = serve_http.metrics(urls[n], NAMES), serve_http.cpu_s(procs[n].pid)
                    tokens = after[NAMES[1]] - before[NAMES[1]]
                    m = dict(tok_s=lv["output_tok_s"], stepping=(after[NAMES[0]] - before[NAMES[0]]) / lv["wall_s"],
                             loop_us=1e6 * (cpu1[0] - cpu0[0]) / tokens, server_us=1e6 * (cpu1[1] - cpu0[1]) / tokens)
                    assert not lv["failed"], f"{lv['failed']} requests failed"
                    got.setdefault((n, users), []).append(m)
                    print(f"{n:8s} {users:2d} users: {m['tok_s']:6.0f} tok/s, engine stepping {m['stepping']:.0%}; CPU per "
                          f"token: event loop {m['loop_us']:.1f} us, server {m['server_us']:.0f} us; "
                          f"load {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            p.wait(120)
    print(f"\nmedians of {args.repeats}:")
    for (n, users), runs in got.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"  {n:8s} {users:2d} users: {med['tok_s']:6.0f} tok/s, engine stepping {med['stepping']:.0%}; CPU per "
              f"token: event loop {med['loop_us']:.1f} us, server {med['server_us']:.0f} us")


if __name__ == "__main__":
    main()
