"""What each server change bought: the continuous server of several source trees side by side.

One `servesim serve` (the continuous engine of serve_http.py, tiny model) per source tree (a
commit unpacked with `git archive C | tar -x -C DIR`, or the worktree), all up at once on ports
PORT, PORT + 1, ...; then, --repeats times, each level (users, requests) runs the article-style
client (non-streamed chat) and `servesim bench --url` (streamed completions, this tree's client)
on every tree in turn, so the machine's load hits them alike. Prints the median output tok/s per
tree, level and client, and the median of each tree's per-round ratio to the first tree; and,
less sensitive to the machine's load than throughput, the CPU the server spent per output token
(/proc: its event-loop thread, which does all HTTP work, and the whole process), in microseconds.

    PYTHONPATH=$PWD python experiments/results/server16/serve_ab.py --tree before=/tmp/t/0f0a169 \\
        --tree after=$PWD [--port 8181] [--repeats 3] [--levels 10:50,50:100] [--env after:VAR=VALUE]
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


serve_http = _load("serve_http")
http_users = serve_http.http_users


def start(tree: Path, port: int, out: Path, cache: str, env: dict[str, str]) -> subprocess.Popen:
    """The continuous server of tree on port (its log in out)."""
    cfg = serve_http.write_config(out / f"continuous-{port}.toml", "continuous", 1, 1, serve_http.OUTPUT_TOKENS)
    log = open(out / f"serve-{port}.log", "w")
    return subprocess.Popen([sys.executable, "-c", "from sim.lab.cli import main; main()", "serve", str(cfg),
                             "--port", str(port), "--served-model-name", "llama3.1:8b", "--compilation-cache", cache,
                             "--log-level", "warning", "--xla-flags", ""],
                            cwd=tree, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(tree), **env})


def cpu_s(pid: int) -> tuple[float, float]:
    """(main thread, whole process) CPU seconds (user + system) of pid."""
    tick = os.sysconf("SC_CLK_TCK")

    def read(path: str) -> float:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14, 15 of stat)

    return read(f"/proc/{pid}/task/{pid}/stat"), read(f"/proc/{pid}/stat")


def generated(url: str) -> float:
    """The server's generated-token counter."""
    return serve_http.metrics(url, ("vllm:generation_tokens",))["vllm:generation_tokens"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", action="append", required=True, help="NAME=DIR (a source tree); the first is the base")
    ap.add_argument("--env", action="append", default=[], help="NAME:VAR=VALUE, an environment variable for one tree")
    ap.add_argument("--port", type=int, default=8181)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--levels", type=http_users.parse_levels, default=[(10, 50), (50, 100)])
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="serve_ab_")))
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/servesim/jax"))
    args = ap.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree)
    envs: dict[str, dict[str, str]] = {n: {} for n in trees}
    for e in args.env:
        name, _, kv = e.partition(":")
        var, _, value = kv.partition("=")
        if name not in envs or not var:
            ap.error(f"--env {e!r}: want NAME:VAR=VALUE with NAME one of {list(trees)}")
        envs[name][var] = value
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_use_xnnpack=true".strip()
    urls = {n: f"http://127.0.0.1:{args.port + i}" for i, n in enumerate(trees)}
    procs = {n: start(Path(d), args.port + i, args.out, args.cache, envs[n]) for i, (n, d) in enumerate(trees.items())}
    got: dict[tuple, list[float]] = {}
    load = [os.getloadavg()[0]]
    try:
        for n in trees:
            serve_http.wait_ready(urls[n], procs[n], 3600)
        for _ in range(args.repeats):
            for users, requests in args.levels:
                cfg = serve_http.write_config(args.out / f"continuous-{users}.toml", "continuous", users,
                                              requests // users, serve_http.OUTPUT_TOKENS)
                for n in trees:
                    pid = procs[n].pid
                    for client in ("article", "bench --url"):
                        cpu0, tok0 = cpu_s(pid), generated(urls[n])
                        if client == "article":
                            lv = asyncio.run(http_users.run_level(urls[n], "llama3.1:8b", users, requests,
                                                                  max_tokens=100))
                            tok_s = lv["output_tok_s"] if not lv["failed"] else float("nan")
                        else:
                            tok_s = serve_http.bench(cfg, args.out / f"url-{n}-{users}", urls[n])
                        cpu1, tokens = cpu_s(pid), generated(urls[n]) - tok0
                        got.setdefault((n, client, users), []).append(tok_s)
                        got.setdefault((n, client + " loop us", users), []).append(1e6 * (cpu1[0] - cpu0[0]) / tokens)
                        got.setdefault((n, client + " proc us", users), []).append(1e6 * (cpu1[1] - cpu0[1]) / tokens)
                        print(n, client, users, f"{tok_s:.0f} tok/s, CPU per token: event loop "
                              f"{got[(n, client + ' loop us', users)][-1]:.0f} us, process "
                              f"{got[(n, client + ' proc us', users)][-1]:.0f} us", f"load {os.getloadavg()[0]:.1f}",
                              flush=True)
            load.append(os.getloadavg()[0])
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            p.wait(120)
    base = next(iter(trees))
    print(f"\n{time.strftime('%H:%M UTC', time.gmtime())}, load average {min(load):.1f}-{max(load):.1f}; "
          f"continuous server, output tok/s, median of {args.repeats} (ratio: median of per-round ratios to {base})")
    print("| tree | " + " | ".join(f"{c} {u}" for u, _ in args.levels for c in ("article", "bench --url")) + " |")
    print("|---" * (1 + 2 * len(args.levels)) + "|")
    for n in trees:
        cells = []
        for users, _ in args.levels:
            for c in ("article", "bench --url"):
                v, b = got[(n, c, users)], got[(base, c, users)]
                ratio = statistics.median(x / y for x, y in zip(v, b))
                cells.append(f"{statistics.median(v):.0f} ({ratio:.2f}x)")
        print(f"| {n} | " + " | ".join(cells) + " |")
    print("\nCPU per output token (us, median): event-loop thread / whole server process")
    print("| tree | " + " | ".join(f"{c} {u}" for u, _ in args.levels for c in ("article", "bench --url")) + " |")
    print("|---" * (1 + 2 * len(args.levels)) + "|")
    for n in trees:
        print(f"| {n} | " + " | ".join(
            f"{statistics.median(got[(n, c + ' loop us', u)]):.0f} / {statistics.median(got[(n, c + ' proc us', u)]):.0f}"
            for u, _ in args.levels for c in ("article", "bench --url")) + " |")


if __name__ == "__main__":
    main()
