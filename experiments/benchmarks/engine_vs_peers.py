"""The reference engine beside the real CPU engines, in one run: llama-server f16 and vLLM CPU (experiments/peers).

Workload (the same for all): small-100m, seed-0 weights, 100-token prompts (random ids), 128 output
tokens, greedy, ignore_eos. Per engine: per-token decode at 1 client (ms: the peers' mean time per
output token after the first, over 3 streamed requests; ours: the median decode step) and output
throughput with 16 concurrent requests (tok/s, prefill included; one warm-up wave first). The
servers run one at a time (ports 8121-8122, stopped after their measurement), so none competes
with another for the two cores. Cores: llama-server `-t 1` computes on one thread; vLLM's CPU
worker is pinned to one core (its API server on the other); ours runs XLA's CPU client with every
core it is given (both; `--our-cores 0` pins it to one with taskset). `--ours` names the variants of
experiments/benchmarks/engine_speed.py to run (default: the server's float32 runner, and the same
with bfloat16 matrix copies, ModelRunner matmul_dtype="bfloat16").

    PYTHONPATH=$PWD python experiments/benchmarks/engine_vs_peers.py [--peers /work/peers]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np

from sim.lab.http_bench import wait_healthy

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


async def stream_one(session, url: str, model: str, prompt: list[int], out_len: int) -> tuple[int, float, float]:
    """(tokens, first-token time, last-token time) of one streamed completion (s, perf_counter)."""
    body = {"model": model, "prompt": prompt, "max_tokens": out_len, "temperature": 0, "ignore_eos": True,
            "stream": True}
    first = last = None
    n = 0
    async with session.post(url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.content:
            line = line.strip()
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and (chunk["choices"][0].get("text") or chunk["choices"][0].get("token_ids")):
                now = time.perf_counter()
                first = first or now
                last = now
                n += 1
    return n, first, last


async def measure_http(url: str, model: str, prompts: list[list[int]], out_len: int) -> tuple[float, float]:
    """(per-token decode ms at 1 client, tok/s with len(prompts) concurrent requests)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as s:
        await stream_one(s, url, model, prompts[0], 8)  # warm-up
        tpot = []
        for p in prompts[:3]:
            n, first, last = await stream_one(s, url, model, p, out_len)
            tpot.append((last - first) / max(n - 1, 1))
        await asyncio.gather(*(stream_one(s, url, model, p, 16) for p in prompts))  # warm-up wave
        t0 = time.perf_counter()
        res = await asyncio.gather(*(stream_one(s, url, model, p, out_len) for p in prompts))
        wall = time.perf_counter() - t0
    return 1e3 * statistics.mean(tpot), sum(n for n, _, _ in res) / wall


def run_peer(name: str, cmd: list[str], env: dict, url: str, prompts, out_len: int, log: Path, timeout: float):
    proc = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=ROOT,
                            start_new_session=True)
    try:
        wait_healthy(url, proc, timeout, poll_s=1)
        return asyncio.run(measure_http(url, "servesim", prompts, out_len))
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", default="/work/peers")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--out-len", type=int, default=128)
    ap.add_argument("--our-cores", default=None, help="taskset CPU list for our engine (default: all cores)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["llama", "vllm", "ours"])
    ap.add_argument("--ours", nargs="+", default=["dynamic ctx", "dynamic ctx + bf16 matmuls"])
    ap.add_argument("--logs", type=Path, default=Path("/tmp"))
    args = ap.parse_args()
    peers = Path(args.peers)
    ckpt = peers / "ckpt-small-100m-s0"
    prompts = [np.random.default_rng(i).integers(300, 32000, 100).tolist() for i in range(args.clients)]
    rows = {}
    loads = [os.getloadavg()[0]]
    if "llama" not in args.skip:
        rows["llama-server f16 (-t 1, 1 core)"] = run_peer(
            "llama", [str(ROOT / "experiments/peers/llamacpp.sh"), "serve", str(ckpt / "gguf/model-f16.gguf"), "8121"],
            dict(os.environ, LLAMACPP_NP=str(args.clients), LLAMACPP_CTX=str(args.clients * 256)),
            "http://127.0.0.1:8121", prompts, args.out_len, args.logs / "peer-llama.log", 120)
        loads.append(os.getloadavg()[0])
    if "vllm" not in args.skip:
        rows["vLLM CPU bf16 (worker on 1 core)"] = run_peer(
            "vllm", [str(ROOT / "experiments/peers/vllm.sh"), "serve", str(ckpt / "hf"), "8122"], dict(os.environ),
            "http://127.0.0.1:8122", prompts, args.out_len, args.logs / "peer-vllm.log", 900)
        loads.append(os.getloadavg()[0])
    for variant in ([] if "ours" in args.skip else args.ours):
        cmd = [sys.executable, str(HERE / "engine_speed.py"), "--child", variant, "--model", "small-100m",
               "--prompt", "100", "--output", str(args.out_len), "--clients", "1", str(args.clients)]
        if args.our_cores:
            cmd = ["taskset", "-c", args.our_cores] + cmd
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
        res = json.loads(line[7:])
        cores = f"taskset {args.our_cores}" if args.our_cores else f"{os.cpu_count()} cores"
        flags = os.environ.get("XLA_FLAGS", "")
        rows[f"servesim JAX, server runner, {variant!r} ({cores}{', ' + flags if flags else ''})"] = \
            (res["1"][0], res[str(args.clients)][1])
        loads.append(os.getloadavg()[0])
    print(f"\nsmall-100m, 100 in / {args.out_len} out, greedy; load average {min(loads):.1f}-{max(loads):.1f}")
    print(f"| engine | decode ms/token, 1 client | output tok/s, {args.clients} concurrent |\n|---|---|---|")
    for k, (tpot, tps) in rows.items():
        print(f"| {k} | {tpot:.1f} | {tps:.0f} |")


if __name__ == "__main__":
    main()
