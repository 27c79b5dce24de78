"""bench --url's client: what reading a stream line by line (aiohttp's iterator) costs against splitting each
read's bytes itself, on one continuous server, alternately, each measured cell alone.

The client shares the machine's cores with the server, so its CPU per token is taken from the engine.
"line by line" is sim.lab.http_bench's stream reader (kept); "split reads" is the variant tried and not
kept (it bought nothing measurable: experiments/results/server16/http_client_ab.txt), kept here as a subclass.

    PYTHONPATH=$PWD python experiments/results/server16/http_client_ab.py [--python /work/venvs/http16b/bin/python]

Run by a Python with uvloop, a third client splits reads on uvloop's event loop.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import resource
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from reference.request import Outcome, Request
from sim.lab import http_bench
from sim.lab.experiment import Cell, load_experiment
from sim.lab.http_bench import normalize_base_url, wait_healthy

ROOT = Path(__file__).resolve().parents[3]
_spec = importlib.util.spec_from_file_location("serve_http", ROOT / "experiments" / "benchmarks" / "serve_http.py")
serve_http = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve_http)


LineByLineClient = http_bench.StreamingClient  # aiohttp's line iterator, a token timed when its line is parsed


class SplitReadsClient(http_bench.StreamingClient):
    """Each read's bytes split into lines here (one await per read instead of one per line), a token timed when
    the bytes carrying it arrived."""

    async def _read_stream(self, resp, req: Request) -> None:
        rest = b""
        async for data in resp.content.iter_any():
            t = self.now()
            lines = (rest + data).split(b"\n")
            rest = lines.pop()  # an incomplete last line waits for the next read
            for line in lines:
                if not line.startswith(b"data:"):
                    continue
                body = line[5:].strip()
                if body == b"[DONE]":
                    req.finish(Outcome.COMPLETED, t)
                    return
                chunk = json.loads(body)
                if "error" in chunk:
                    req.finish(Outcome.ABORTED, t, f"stream error: {http_bench._message(chunk)}")
                    return
                for choice in chunk.get("choices") or ():
                    ids = choice.get("token_ids")
                    for tid in (ids if ids is not None else ([0] if choice.get("text") else [])):
                        req.append_token(int(tid), t)
        req.finish(Outcome.ABORTED, self.now(), "stream ended without [DONE]")


def own_cpu_s() -> float:
    """CPU seconds (user + system) of this process (the client)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(url: str, pid: int, cfg: Path, client_cls, uvloop_policy) -> dict:
    """Warm-up cell, then the measured cell with client_cls on asyncio's loop (uvloop_policy None) or uvloop's:
    tok/s and CPU per token of client and server."""
    http_bench.StreamingClient = client_cls  # _run_cell builds its client from the module's name
    asyncio.set_event_loop_policy(uvloop_policy)
    exp = load_experiment(cfg)
    cell = Cell("http", **exp.workload.cell_fields(exp.workload.loads[0]))
    base = normalize_base_url(url)
    asyncio.run(http_bench._run_cell(exp, cell, base, "llama3.1:8b", lambda r, c: None, warm=True))
    done = []
    c0, s0 = own_cpu_s(), serve_http.cpu_s(pid)
    asyncio.run(http_bench._run_cell(exp, cell, base, "llama3.1:8b", lambda r, c: done.append(r), warm=False))
    c1, s1 = own_cpu_s(), serve_http.cpu_s(pid)
    tokens = sum(r.num_output_tokens for r in done)
    span = max(r.finish_time for r in done) - min(r.arrival_time for r in done)
    assert all(r.outcome is Outcome.COMPLETED for r in done), "a request failed"
    return dict(tok_s=tokens / span, tokens=tokens, client_us=1e6 * (c1 - c0) / tokens,
                server_us=1e6 * (s1[1] - s0[1]) / tokens, loop_us=1e6 * (s1[0] - s0[0]) / tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", default="/work/venvs/http16b/bin/python", help="the server's Python")
    ap.add_argument("--port", type=int, default=8176)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--levels", type=serve_http.http_users.parse_levels, default=[(10, 50), (50, 100)])
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/servesim/jax"))
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="http_client_ab_"))
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_use_xnnpack=true".strip()
    cfg = serve_http.write_config(out / "server.toml", "continuous", 1, 1, serve_http.OUTPUT_TOKENS)
    url = f"http://127.0.0.1:{args.port}"
    proc = subprocess.Popen([args.python, "-c", "from sim.lab.cli import main; main()", "serve", str(cfg), "--port",
                             str(args.port), "--served-model-name", "llama3.1:8b", "--compilation-cache", args.cache,
                             "--log-level", "warning", "--xla-flags", ""], cwd=ROOT,
                            stdout=open(out / "serve.log", "w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    clients = {"line by line": (LineByLineClient, None), "split reads": (SplitReadsClient, None)}
    if importlib.util.find_spec("uvloop") is not None:
        import uvloop
        clients["split, uvloop"] = (SplitReadsClient, uvloop.EventLoopPolicy())
    got: dict[tuple, list[dict]] = {}
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}; server: {args.python}, "
          f"--stream-interval 1", flush=True)
    try:
        wait_healthy(url, proc, 3600)
        for rep in range(args.repeats):
            for users, requests in args.levels:
                lv = serve_http.write_config(out / f"c-{users}-{rep}.toml", "continuous", users, requests // users,
                                             serve_http.OUTPUT_TOKENS, seed=rep + 1)
                for name, (cls, policy) in clients.items():
                    m = measure(url, proc.pid, lv, cls, policy)
                    got.setdefault((name, users), []).append(m)
                    print(f"{name:13s} {users:2d} users seed {rep + 1}: {m['tok_s']:6.0f} tok/s, {m['tokens']} tokens; "
                          f"CPU per token: client {m['client_us']:.0f} us, server {m['server_us']:.0f} us (event loop "
                          f"{m['loop_us']:.0f}); load {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    print(f"\nmedians of {args.repeats}:")
    for (name, users), runs in got.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"  {name:13s} {users:2d} users {med['tok_s']:6.0f} tok/s; CPU per token: client {med['client_us']:.0f} us, "
              f"server {med['server_us']:.0f} us (event loop {med['loop_us']:.0f})")


if __name__ == "__main__":
    main()
