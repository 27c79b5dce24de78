"""Where bench --url loses against in process: continuous servers side by side, each measured cell alone.

serve_http.py's "engine stepping N% of the wall" for bench --url divided the server's step time by a
wall that held bench's own start-up (a Python process importing JAX and pandas) and its warm-up
cell, and its step counts held the warm-up's steps. Here the client runs in this process
(sim.lab.http_bench's closed loop, as `servesim bench --url` sends it: streamed greedy completions
of the workload's random prompts, 111 in / 100 out), the warm-up cell runs first, and the
server's counters (/metrics: engine steps, seconds inside Engine.step, seconds the engine thread
waited for work, generated tokens) and CPU (/proc: event-loop thread, whole process) are read
just before and after the measured cell. Each repeat uses its own workload seed (no prompt of an
earlier repeat is in a server's prefix cache); the in-process worker of serve_http.py (the
server's engine, the same closed loop without HTTP) runs the same seed's workload.

    PYTHONPATH=$PWD python experiments/results/server16/http_idle_ab.py \\
        --server base=/tmp/freshvenv2/bin/python --server uvloop=/work/venvs/http16b/bin/python \\
        [--server "si10=/tmp/freshvenv2/bin/python --stream-interval 10"] [--repeats 3] [--levels 10:50,50:100]

Each --server is NAME=PYTHON [extra `servesim serve` arguments]; the servers are up at once on
PORT, PORT + 1, ...; every measurement runs on each server in turn, then in process.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import resource
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from sim.lab.experiment import Cell, load_experiment
from sim.lab.http_bench import _run_cell, normalize_base_url, wait_healthy

ROOT = Path(__file__).resolve().parents[3]
_spec = importlib.util.spec_from_file_location("serve_http", ROOT / "experiments" / "benchmarks" / "serve_http.py")
serve_http = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve_http)
NAMES = ("servesim:engine_steps", "servesim:engine_step_seconds", "servesim:engine_idle_seconds",
         "vllm:generation_tokens")


def start(name: str, python: str, extra: list[str], port: int, out: Path, cache: str) -> subprocess.Popen:
    """The continuous server (serve_http.py's config) run by python with extra serve arguments."""
    cfg = serve_http.write_config(out / f"continuous-{name}.toml", "continuous", 1, 1, serve_http.OUTPUT_TOKENS)
    log = open(out / f"serve-{name}.log", "w")
    return subprocess.Popen([python, "-c", "from sim.lab.cli import main; main()", "serve", str(cfg), "--port",
                             str(port), "--served-model-name", "llama3.1:8b", "--compilation-cache", cache,
                             "--log-level", "warning", "--xla-flags", "", *extra],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of pid's threads by kind: the event loop (the main thread), the engine
    thread (named servesim-engine in the OS), and the rest (XLA's compute threads, asyncio.to_thread's workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = dict.fromkeys(("loop", "engine", "other"), 0.0)
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        kind = "loop" if task.name == str(pid) else "engine" if comm == "servesim-engine" else "other"
        out[kind] += (int(fields[11]) + int(fields[12])) / tick
    return out


def own_cpu_s() -> float:
    """CPU seconds (user + system) of this process (the client)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure_url(url: str, pid: int, cfg: Path) -> dict:
    """Warm-up cell, then the measured cell alone: tok/s (client clock) and the server's share of it."""
    exp = load_experiment(cfg)
    cell = Cell("http", **exp.workload.cell_fields(exp.workload.loads[0]))
    base = normalize_base_url(url)
    asyncio.run(_run_cell(exp, cell, base, "llama3.1:8b", lambda r, c: None, warm=True))
    done = []
    before, cpu0, client0, th0 = serve_http.metrics(url, NAMES), serve_http.cpu_s(pid), own_cpu_s(), thread_cpu_s(pid)
    asyncio.run(_run_cell(exp, cell, base, "llama3.1:8b", lambda r, c: done.append(r), warm=False))
    after, cpu1, client1, th1 = serve_http.metrics(url, NAMES), serve_http.cpu_s(pid), own_cpu_s(), thread_cpu_s(pid)
    d = {k: after[k] - before[k] for k in NAMES}
    tokens = sum(r.num_output_tokens for r in done)
    span = max(r.finish_time for r in done) - min(r.arrival_time for r in done)
    n = max(d["vllm:generation_tokens"], 1)
    users = exp.workload.loads[0]
    first = sorted(done, key=lambda r: r.arrival_time)[:users]  # each client's first request
    ttfts = sorted(r.first_token_time - r.arrival_time for r in first)
    return dict(tok_s=tokens / span, ttft_ms=1e3 * statistics.median(ttfts), ttft_max_ms=1e3 * ttfts[-1], failed=sum(r.outcome.value != "completed" for r in done),
                steps=d[NAMES[0]], ms_per_step=1e3 * d[NAMES[1]] / max(d[NAMES[0]], 1), stepping=d[NAMES[1]] / span,
                idle=d[NAMES[2]] / span, engine_us=1e6 * (th1["engine"] - th0["engine"]) / n,
                other_us=1e6 * (th1["other"] - th0["other"]) / n, loop_us=1e6 * (cpu1[0] - cpu0[0]) / n,
                server_us=1e6 * (cpu1[1] - cpu0[1]) / n, client_us=1e6 * (client1 - client0) / n)


def text(m: dict) -> str:
    """One measurement in words."""
    s = (f"{m['tok_s']:6.0f} tok/s, {m['steps']:.0f} steps, {m['ms_per_step']:.2f} ms per step, stepping "
         f"{m['stepping']:.0%}")
    if "idle" in m:
        s += (f", waiting {m['idle']:.0%}; first requests' TTFT median {m['ttft_ms']:.0f} ms, max "
              f"{m['ttft_max_ms']:.0f} ms; CPU per token: server {m['server_us']:.0f} us (event loop "
              f"{m['loop_us']:.0f}, engine thread {m['engine_us']:.0f}, XLA and to_thread workers {m['other_us']:.0f}), "
              f"client {m['client_us']:.0f} us")
    else:
        s += f"; CPU per token: {m['server_us']:.0f} us (engine thread {m['engine_us']:.0f})"
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", action="append", required=True, help="NAME=PYTHON [serve args]")
    ap.add_argument("--port", type=int, default=8171)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--levels", type=serve_http.http_users.parse_levels, default=[(10, 50), (50, 100)])
    ap.add_argument("--no-proc", action="store_true", help="skip the in-process worker")
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="http_idle_ab_")))
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/servesim/jax"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_use_xnnpack=true".strip()
    servers = {}
    for spec in args.server:
        name, _, rest = spec.partition("=")
        python, *extra = rest.split()
        servers[name] = (python, extra)
    urls = {n: f"http://127.0.0.1:{args.port + i}" for i, n in enumerate(servers)}
    procs = {n: start(n, py, extra, args.port + i, args.out, args.cache)
             for i, (n, (py, extra)) in enumerate(servers.items())}
    got: dict[tuple, list[dict]] = {}
    load = [os.getloadavg()[0]]
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; servers: "
          + "; ".join(f"{n} = {py} {' '.join(x)}" for n, (py, x) in servers.items()), flush=True)
    worker = None
    try:
        for n in servers:
            wait_healthy(urls[n], procs[n], 3600)
        if not args.no_proc:
            worker = serve_http.Worker(serve_http.write_config(args.out / "proc.toml", "continuous", 1, 1,
                                                               serve_http.OUTPUT_TOKENS), args.cache)
            worker.wait_ready()
        for rep in range(args.repeats):
            for users, requests in args.levels:
                cfg = serve_http.write_config(args.out / f"continuous-{users}-{rep}.toml", "continuous", users,
                                              requests // users, serve_http.OUTPUT_TOKENS, seed=rep + 1)
                for n in servers:
                    m = measure_url(urls[n], procs[n].pid, cfg)
                    got.setdefault((n, users), []).append(m)
                    print(f"{n:10s} url {users:2d} seed {rep + 1}: {text(m)}; load {os.getloadavg()[0]:.1f}", flush=True)
                if worker is not None:
                    r = worker.level(cfg, 0.0)
                    m = dict(tok_s=r["output_tok_s"], steps=r["steps"], ms_per_step=r["ms_per_step"], stepping=1.0,
                             server_us=r["cpu_us_per_token"], engine_us=r["engine_thread_us_per_token"])
                    got.setdefault(("in process", users), []).append(m)
                    print(f"{'in process':10s} {users:2d} seed {rep + 1}: {text(m)}; load {os.getloadavg()[0]:.1f}",
                          flush=True)
            load.append(os.getloadavg()[0])
    finally:
        if worker is not None:
            worker.close()
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            p.wait(120)
    print(f"\nload average {min(load):.1f}-{max(load):.1f}; medians of {args.repeats}; ratio: median of the "
          "per-repeat ratios to in process (same seed, run right after)")
    for users, _ in args.levels:
        for n in [*servers, "in process"]:
            runs = got.get((n, users))
            if not runs:
                continue
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            ratio = ""
            if n != "in process" and ("in process", users) in got:
                ratio = " (%.2f of in process)" % statistics.median(
                    a["tok_s"] / b["tok_s"] for a, b in zip(runs, got[("in process", users)]))
            print(f"  {users:2d} users {n:10s} {text(med)}{ratio}")


if __name__ == "__main__":
    main()
