"""Continuous vs sequential batching through `servesim serve`, over HTTP and in process: the table of issue 16.

Two engines of the tiny model (Ollama-like one slot vs vLLM-like continuous batching; ~100-token
prompts, 100 output tokens):
1. start `servesim serve --engine E --served-model-name llama3.1:8b` for both (ports PORT and
   PORT + 1, within 8101-8199; a persistent compilation cache under --cache), wait until /health is
   200 (every step shape compiled), read how many shapes each compiled;
2. drive them with the article-style client (experiments/benchmarks/http_users.py) at the levels
   (users, requests) = (1, 20), (10, 50), (50, 100), then `servesim bench --url` (closed loop, the
   same users and requests per user) and the same workload in process (`servesim bench`); every
   measurement runs on one engine then the other, so the machine's load hits both alike;
3. read /metrics (compiles on the serving path must be 0) and stop both (SIGTERM: they drain).
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
value = {out}
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
OUTPUT_TOKENS = 100  # per request (the article's value was not available; see http_users.py)
CLI = [sys.executable, "-c", "from sim.lab.cli import main; main()"]


def write_config(path: Path, engine: str, users: int, per_user: int) -> Path:
    path.write_text(CONFIG.format(engine=engine, users=users, per_user=per_user, out=OUTPUT_TOKENS) + ENGINES[engine])
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


def start_server(engine: str, port: int, out: Path, cache: str) -> subprocess.Popen:
    cfg = write_config(out / f"{engine}.toml", engine, 1, 1)
    log = open(out / f"serve-{engine}.log", "w")
    return subprocess.Popen(CLI + ["serve", str(cfg), "--engine", engine, "--port", str(port),
                                   "--served-model-name", "llama3.1:8b", "--served-model-name", "tiny",
                                   "--compilation-cache", cache, "--log-level", "warning", "--xla-flags", ""],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8101, help="sequential on PORT, continuous on PORT + 1")
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="serve_http_")))
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/servesim/jax"))
    ap.add_argument("--ready-timeout", type=float, default=3600)
    ap.add_argument("--max-tokens", type=int, default=OUTPUT_TOKENS)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    # The server's default XLA flags, for the server and the in-process bench alike (same matmul library)
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_use_xnnpack=true".strip()
    engines = ["sequential", "continuous"]
    urls = {e: f"http://127.0.0.1:{args.port + i}" for i, e in enumerate(engines)}
    procs = {e: start_server(e, args.port + i, args.out, args.cache) for i, e in enumerate(engines)}
    rows: dict[str, dict] = {e: {} for e in engines}
    load = [os.getloadavg()[0]]
    try:
        for e in engines:  # both compile at once; each reports its own start-up compile time
            rows[e]["ready_s"] = wait_ready(urls[e], procs[e], args.ready_timeout)
            rows[e]["startup_compiles"] = metric(urls[e], "servesim:compilations_startup")
            rows[e]["startup_compile_s"] = metric(urls[e], "servesim:compile_startup_seconds")
        load.append(os.getloadavg()[0])
        # Interleaved: each level runs on one engine then the other, so load changes hit both alike.
        for users, requests in LEVELS:
            for e in engines:
                level = asyncio.run(http_users.run_level(urls[e], "llama3.1:8b", users, requests,
                                                         max_tokens=args.max_tokens))
                rows[e][f"article {users}"] = level["output_tok_s"] if not level["failed"] else float("nan")
                print(e, "article", users, requests, level, f"load {os.getloadavg()[0]:.1f}", flush=True)
        for users, requests in LEVELS[1:]:
            for e in engines:
                cfg_u = write_config(args.out / f"{e}-{users}.toml", e, users, requests // users)
                rows[e][f"url {users}"] = bench(cfg_u, args.out / f"url-{e}-{users}", urls[e])
                print(e, "bench --url", users, rows[e][f"url {users}"], f"load {os.getloadavg()[0]:.1f}", flush=True)
                rows[e][f"proc {users}"] = bench(cfg_u, args.out / f"proc-{e}-{users}", None)
                print(e, "in process", users, rows[e][f"proc {users}"], f"load {os.getloadavg()[0]:.1f}", flush=True)
            load.append(os.getloadavg()[0])
        for e in engines:
            rows[e]["serving_compiles"] = metric(urls[e], "servesim:compilations_serving_total")
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            p.wait(120)
    print(f"\nload average {min(load):.1f}-{max(load):.1f}; output tok/s (tiny model, 100 in / {args.max_tokens} out)")
    print("| engine | ready s | compiles start / serving | article 1 | article 10 | article 50 | bench --url 10 | "
          "bench --url 50 | in process 10 | in process 50 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for e, r in rows.items():
        print(f"| {e} | {r.get('ready_s', float('nan')):.0f} | {r.get('startup_compiles', 0):.0f} / "
              f"{r.get('serving_compiles', float('nan')):.0f} | " + " | ".join(
                  f"{r.get(k, float('nan')):.0f}" for k in ("article 1", "article 10", "article 50", "url 10",
                                                            "url 50", "proc 10", "proc 50")) + " |")
    s, c = rows["sequential"], rows["continuous"]
    print("\ncontinuous / sequential: " + ", ".join(f"{k} {c[k] / s[k]:.1f}x" for k in
                                                   ("article 10", "article 50", "url 10", "url 50", "proc 10",
                                                    "proc 50") if k in c and k in s))
    print("continuous over HTTP / in process: " + ", ".join(
        f"{u} users: article {c[f'article {u}'] / c[f'proc {u}']:.2f}, bench --url {c[f'url {u}'] / c[f'proc {u}']:.2f}"
        for u in (10, 50) if f"proc {u}" in c))


if __name__ == "__main__":
    main()
