"""Continuous vs sequential batching through `servesim serve`, over HTTP and in process: the table of issue 16.

For each engine of CONFIG (default: the tiny model, Ollama-like one slot vs vLLM-like continuous
batching, 100-token prompts, 200 output tokens):
1. start `servesim serve CONFIG --engine E --served-model-name llama3.1:8b` on a port in 8101-8199
   (a persistent compilation cache under --cache), wait until /health is 200 (every step shape
   compiled), and read how many shapes it compiled;
2. drive it with the article-style client (experiments/benchmarks/http_users.py) at the levels
   (users, requests) = (1, 20), (10, 50), (50, 100), then with `servesim bench --url` (closed loop,
   the same users and requests per user);
3. read /metrics: compiles on the serving path must be 0; stop the server (SIGTERM: it drains);
4. run the same closed-loop workload in process (`servesim bench`).
Then print output tok/s per engine and level, continuous / sequential, and HTTP / in process.

    PYTHONPATH=$PWD python experiments/benchmarks/serve_http.py [--config C] [--port 8101] [--out DIR]
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
_spec = importlib.util.spec_from_file_location("http_users", HERE / "http_users.py")
http_users = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(http_users)

CONFIG = """
name = "serve_http_{engine}_{users}"
model = "tiny"
seed = 0
dtype = "float32"

[workload]
kind = "closed_loop"
clients = [{users}]
requests_per_client = {per_user}

[workload.prompt_tokens]
dist = "fixed"
value = 100

[workload.output_tokens]
dist = "fixed"
value = 200
"""
ENGINES = {"sequential": """
[engines.sequential]
scheduler = "sequential"
num_parallel = 1
num_ctx = 1024
""", "continuous": """
[engines.continuous]
scheduler = "continuous"
block_size = 16
max_num_seqs = 64
max_num_batched_tokens = 512
max_model_len = 1024
"""}
LEVELS = [(1, 20), (10, 50), (50, 100)]
CLI = [sys.executable, "-c", "from sim.lab.cli import main; main()"]


def write_config(path: Path, engine: str, users: int, per_user: int) -> Path:
    path.write_text(CONFIG.format(engine=engine, users=users, per_user=per_user) + ENGINES[engine])
    return path


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return time.time() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("server not ready")


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    m = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


def summary_tok_s(out: Path) -> float:
    rows = json.loads((out / "summary.json").read_text())
    return rows[0]["output_throughput"]


def bench(cfg: Path, out: Path, url: str | None) -> float:
    cmd = CLI + ["bench", str(cfg), "--out", str(out), "--fresh"] + (["--url", url + "/v1"] if url else [])
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)
    return summary_tok_s(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8101)
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="serve_http_")))
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/servesim/jax"))
    ap.add_argument("--ready-timeout", type=float, default=1800)
    ap.add_argument("--engines", nargs="+", default=["sequential", "continuous"])
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    # The server's default XLA flags, for the server and the in-process bench alike (same matmul library)
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_use_xnnpack=true".strip()
    url = f"http://127.0.0.1:{args.port}"
    rows: dict[str, dict] = {}
    load = [os.getloadavg()[0]]
    for engine in args.engines:
        cfg = write_config(args.out / f"{engine}.toml", engine, 1, 1)
        log = open(args.out / f"serve-{engine}.log", "w")
        proc = subprocess.Popen(CLI + ["serve", str(cfg), "--engine", engine, "--port", str(args.port),
                                       "--served-model-name", "llama3.1:8b", "--served-model-name", "tiny",
                                       "--compilation-cache", args.cache, "--log-level", "warning", "--xla-flags", ""],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        r = rows[engine] = {}
        try:
            r["ready_s"] = wait_ready(url, proc, args.ready_timeout)
            r["startup_compiles"] = metric(url, "servesim:compilations_startup")
            r["startup_compile_s"] = metric(url, "servesim:compile_startup_seconds")
            for users, requests in LEVELS:
                level = asyncio.run(http_users.run_level(url, "llama3.1:8b", users, requests, max_tokens=200))
                r[f"article {users}"] = level["output_tok_s"] if not level["failed"] else float("nan")
                print(engine, users, requests, level, flush=True)
            for users, requests in LEVELS[1:]:
                cfg_u = write_config(args.out / f"{engine}-{users}.toml", engine, users, requests // users)
                r[f"url {users}"] = bench(cfg_u, args.out / f"url-{engine}-{users}", url)
                print(engine, "bench --url", users, r[f"url {users}"], flush=True)
            r["serving_compiles"] = metric(url, "servesim:compilations_serving_total")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        for users, requests in LEVELS[1:]:
            cfg_u = write_config(args.out / f"{engine}-{users}.toml", engine, users, requests // users)
            r[f"proc {users}"] = bench(cfg_u, args.out / f"proc-{engine}-{users}", None)
            print(engine, "in process", users, r[f"proc {users}"], flush=True)
        load.append(os.getloadavg()[0])
    print(f"\nload average {min(load):.1f}-{max(load):.1f}; output tok/s (tiny model, 100 in / 200 out)")
    print("| engine | ready s | compiles start / serving | article 1 | article 10 | article 50 | bench --url 10 | "
          "bench --url 50 | in process 10 | in process 50 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for e, r in rows.items():
        print(f"| {e} | {r.get('ready_s', float('nan')):.0f} | {r.get('startup_compiles', 0):.0f} / "
              f"{r.get('serving_compiles', float('nan')):.0f} | " + " | ".join(
                  f"{r.get(k, float('nan')):.0f}" for k in ("article 1", "article 10", "article 50", "url 10",
                                                            "url 50", "proc 10", "proc 50")) + " |")
    if {"sequential", "continuous"} <= rows.keys():
        s, c = rows["sequential"], rows["continuous"]
        print("\ncontinuous / sequential: " + ", ".join(f"{k} {c[k] / s[k]:.1f}x" for k in
                                                       ("article 10", "article 50", "url 10", "url 50", "proc 10",
                                                        "proc 50") if k in c and k in s))
        print("continuous over HTTP / in process: " + ", ".join(
            f"{u} users: article {c[f'article {u}'] / c[f'proc {u}']:.2f}, bench --url {c[f'url {u}'] / c[f'proc {u}']:.2f}"
            for u in (10, 50)))


if __name__ == "__main__":
    main()
