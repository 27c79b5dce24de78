"""Continuous vs sequential batching through `servesim serve`, over HTTP and in process: the table of issue 16.

Two engines of the tiny model (Ollama-like one slot vs vLLM-like continuous batching; prompts of
the article client's length, 111 tokens, and 100 output tokens):
1. start `servesim serve --engine E --served-model-name llama3.1:8b` for both (ports PORT and
   PORT + 1, within 8101-8199; a persistent compilation cache under --cache), wait until /health is
   200 (every step shape compiled), read how many shapes each compiled; start one in-process worker
   per engine (this script with --worker): the server's very engine (build_engine: the same
   scheduler, runner options and compiled shapes) driven by the same closed loop without HTTP;
2. at the levels (users, requests) = (1, 20), (10, 50), (50, 100) (--levels), --repeats times: the
   article-style client (experiments/benchmarks/http_users.py: non-streamed chat, no temperature, so
   OpenAI's default of 1), `servesim bench --url` (streamed greedy completions, the same users and
   requests per user) and the in-process worker, greedy on the workload's random prompts (as bench
   --url) and at temperature 1 on the article's chat prompt (as the article client); every measurement runs
   on one engine then the other, so the machine's load hits both alike; `servesim bench` in process
   (its own runner: context buckets, compiles off the clock) once per level unless --no-bench-in-process;
   each repeat writes its levels' configs with its own workload seed (bench --url and in process send the
   same random prompts; none of them is in a server's prefix cache from an earlier repeat);
3. read /metrics (compiles on the serving path must be 0) and stop both (SIGTERM: they drain).
Then print medians of output tok/s per engine and level, continuous / sequential, HTTP / in process
(the worker: the same workload on the same engine), and where each measurement went: engine
steps, ms per step, the share of the wall spent stepping (servesim:engine_* counters of /metrics; for
bench --url, over its measured cell alone, from the /metrics samples bench takes around it), and CPU
per generated token of the server process, its event-loop thread and the article client.
--stream-interval is passed to both servers; the first output line names it and whether this Python
has uvloop and httptools (uvicorn serves with them when installed, as vLLM does).

    PYTHONPATH=$PWD python experiments/benchmarks/serve_http.py [--port 8101] [--out DIR] [--repeats 3]
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from reference.engine import Engine
from reference.tokenizer import ByteTokenizer
from sim.lab.bench import ClosedLoopSource
from sim.lab.experiment import load_experiment
from sim.lab.http_bench import wait_healthy
from sim.lab.server.engine_loop import build_engine, enable_compilation_cache

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
_spec = importlib.util.spec_from_file_location("http_users", HERE / "http_users.py")
http_users = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(http_users)

CONFIG = """
name = "serve_http_{engine}_{users}"
model = "tiny"
seed = {seed}
dtype = "float32"

[workload]
kind = "closed_loop"
clients = [{users}]
requests_per_client = {per_user}

[workload.prompt_tokens]
dist = "fixed"
value = {prompt}

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
# The article client's chat prompt as the tiny model's tokenizer makes it (chat template included):
# the in-process runs and `bench --url` send prompts of this many tokens, so all three do the same work.
ARTICLE_PROMPT_IDS = ByteTokenizer(512).apply_chat_template([{"role": "user", "content": http_users.PROMPT}])
PROMPT_TOKENS = len(ARTICLE_PROMPT_IDS)
CLI = [sys.executable, "-c", "from sim.lab.cli import main; main()"]
COUNTERS = ("servesim:engine_steps", "servesim:engine_step_seconds", "servesim:engine_idle_seconds")


def serving_stack() -> str:
    """The event loop and HTTP parser uvicorn picks in this Python ("auto": uvloop and httptools when installed)."""
    have = [m for m in ("uvloop", "httptools") if importlib.util.find_spec(m) is not None]
    return f"{sys.executable}: " + (f"{' and '.join(have)} installed" if have else "asyncio's loop and h11")


def write_config(path: Path, engine: str, users: int, per_user: int, out: int, seed: int = 0) -> Path:
    """An experiment TOML of one engine and one closed-loop level; seed picks the workload's random prompts."""
    path.write_text(CONFIG.format(engine=engine, users=users, per_user=per_user, prompt=PROMPT_TOKENS, out=out,
                                  seed=seed) + ENGINES[engine])
    return path


def metrics(url: str, names) -> dict[str, float]:
    """The values of the named (single-series) metrics in url's /metrics."""
    text = httpx.get(url + "/metrics").text
    out = {}
    for name in names:
        m = re.search(rf"^{re.escape(name)}(?:_total)?\{{[^}}]*\}} (\S+)$", text, re.M)
        out[name] = float(m.group(1)) if m else float("nan")
    return out


def bench(cfg: Path, out: Path, url: str | None) -> dict:
    """`servesim bench` (in process, or --url) on cfg; the summary of its one cell (output_throughput: tok/s)."""
    cmd = CLI + ["bench", str(cfg), "--out", str(out), "--fresh"] + (["--url", url + "/v1"] if url else [])
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)
    return json.loads((out / "summary.json").read_text())[0]


def bench_engine(row: dict) -> dict:
    """The server's engine thread during bench --url's measured cell alone, from the /metrics samples bench
    took around it (server_* fields of its summary): steps, ms per step, the share of the cell's duration
    (first request sent to last answer) spent stepping."""
    steps, step_s = row["server_servesim:engine_steps_total"], row["server_servesim:engine_step_seconds_total"]
    return dict(steps=steps, ms_per_step=1e3 * step_s / max(steps, 1), stepping=step_s / row["duration"])


def start_server(engine: str, port: int, out: Path, cache: str, stream_interval: int = 1) -> subprocess.Popen:
    """`servesim serve` of engine on port (log in out)."""
    cfg = write_config(out / f"{engine}.toml", engine, 1, 1, OUTPUT_TOKENS)
    log = open(out / f"serve-{engine}.log", "w")
    return subprocess.Popen(CLI + ["serve", str(cfg), "--engine", engine, "--port", str(port),
                                   "--served-model-name", "llama3.1:8b", "--served-model-name", "tiny",
                                   "--compilation-cache", cache, "--log-level", "warning", "--xla-flags", "",
                                   "--stream-interval", str(stream_interval)],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


# ---- the in-process worker: the server's engine without HTTP ----------------------------------
def worker(cfg_path: str, cache: str) -> None:
    """Build the engine as `servesim serve` does, compile its shapes, say "ready", then run each level
    whose config path arrives on stdin (closed loop on a wall clock) and print its result as JSON."""
    enable_compilation_cache(cache)
    served, cfg = build_engine(load_experiment(cfg_path))
    runner = served.runner
    for shape in runner.shapes():
        runner.compile_shape(shape)
    for temperature in (0.0, 1.0):  # both sampling paths run once before any is timed
        run_level_in_process(cfg_path, runner, cfg, temperature, warmup=True)
    print("ready", flush=True)
    for line in sys.stdin:
        path, temperature = line.split()
        print(json.dumps(run_level_in_process(path, runner, cfg, float(temperature))), flush=True)


class SampledClosedLoopSource(ClosedLoopSource):
    """The bench's closed loop with every request sampled at one temperature (the bench's own is greedy),
    and its prompt replaced by prompt_ids when given (as long as the workload's prompts)."""

    def __init__(self, workload, limit_per_client: int | None, temperature: float, prompt_ids: list[int] | None):
        super().__init__(workload, limit_per_client)
        self.temperature = temperature
        self.prompt_ids = prompt_ids

    def _next(self, c: int, at: float) -> list:
        reqs = super()._next(c, at)
        for r in reqs:
            r.sampling = dataclasses.replace(r.sampling, temperature=self.temperature)
            if self.prompt_ids is not None:
                r.prompt_token_ids = list(self.prompt_ids)
        return reqs


def run_level_in_process(cfg_path: str, runner, cfg, temperature: float = 0.0, warmup: bool = False) -> dict:
    """One closed-loop level on a fresh scheduler over the compiled runner, every request sampled at
    temperature: output tok/s, steps, ms per step, CPU per token. Greedy (0) runs send the workload's
    random prompts, as `bench --url` does; sampled runs send the article client's chat prompt, as it does."""
    exp = load_experiment(cfg_path)
    cell = exp.cells()[0]
    workload = exp.workload.build(exp.seed, exp.model_spec.vocab_size, cell.load)
    source = SampledClosedLoopSource(workload, 1 if warmup else None, temperature,
                                     ARTICLE_PROMPT_IDS if temperature > 0 else None)
    engine = Engine(cfg.build_scheduler(exp.plan(cfg)), runner)
    tokens = steps = 0

    def finished(req) -> None:
        nonlocal tokens
        tokens += req.num_output_tokens

    def stepped(record) -> None:
        nonlocal steps
        steps += 1

    t0, cpu0, thread0 = time.perf_counter(), time.process_time(), time.thread_time()
    engine.run(source, 0.0, on_finish=finished, on_step=stepped)
    wall, cpu, thread = time.perf_counter() - t0, time.process_time() - cpu0, time.thread_time() - thread0
    serving = runner.serving_compilations
    return dict(output_tok_s=tokens / wall, tokens=tokens, wall_s=wall, steps=steps,
                ms_per_step=1e3 * wall / max(steps, 1), serving_compiles=serving,
                cpu_us_per_token=1e6 * cpu / max(tokens, 1), engine_thread_us_per_token=1e6 * thread / max(tokens, 1))


def cpu_s(pid: int) -> tuple[float, float]:
    """(main thread, whole process) CPU seconds (user + system) of pid, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")

    def read(path: str) -> float:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14 and 15 of stat)

    return read(f"/proc/{pid}/task/{pid}/stat"), read(f"/proc/{pid}/stat")


def client_cpu_s() -> float:
    """CPU seconds of this process (the article client runs in it) and of its waited-for children (bench --url)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class ServerCounters:
    """A server's engine-thread counters, generated tokens and CPU now, and the client's CPU; since(wall)
    gives what a measurement cost (see engine_text)."""

    NAMES = COUNTERS + ("vllm:generation_tokens",)

    def __init__(self, url: str, pid: int):
        self.url, self.pid = url, pid
        self.before = metrics(url, self.NAMES)
        self.cpu, self.client = cpu_s(pid), client_cpu_s()

    def since(self, wall_s: float) -> dict:
        """Steps run since; ms inside Engine.step per step; the share of wall_s (s) spent stepping; CPU per
        generated token (us) of the server's event-loop thread, of the whole server, and of the client."""
        after, cpu, client = metrics(self.url, self.NAMES), cpu_s(self.pid), client_cpu_s()
        d = {k: after[k] - self.before[k] for k in self.NAMES}
        steps, step_s, tokens = d[COUNTERS[0]], d[COUNTERS[1]], max(d["vllm:generation_tokens"], 1)
        return dict(steps=steps, ms_per_step=1e3 * step_s / max(steps, 1), stepping=step_s / wall_s,
                    loop_us=1e6 * (cpu[0] - self.cpu[0]) / tokens, server_us=1e6 * (cpu[1] - self.cpu[1]) / tokens,
                    client_us=1e6 * (client - self.client) / tokens)


def engine_text(m: dict) -> str:
    """Where a measurement's time and CPU went, in words."""
    text = (f"{m['steps']:.0f} steps, {m['ms_per_step']:.2f} ms per step, engine stepping {m['stepping']:.0%} of the "
            f"wall; CPU per token: server {m['server_us']:.0f} us")
    if "loop_us" in m:
        text += f" (event loop {m['loop_us']:.0f})"
    if "client_us" in m:
        text += f", client {m['client_us']:.0f} us"
    return text


class Worker:
    """A worker subprocess for one engine (see worker())."""

    def __init__(self, cfg: Path, cache: str):
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", str(cfg), "--cache", cache], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})

    def wait_ready(self) -> None:
        """Block until the worker compiled its shapes."""
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"in-process worker failed: {line!r}")

    def level(self, cfg: Path, temperature: float) -> dict:
        """Run the level of cfg at temperature; its result."""
        self.proc.stdin.write(f"{cfg} {temperature}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        """End the worker."""
        self.proc.stdin.close()
        self.proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8101, help="sequential on PORT, continuous on PORT + 1")
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="serve_http_")))
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/servesim/jax"))
    ap.add_argument("--ready-timeout", type=float, default=3600)
    ap.add_argument("--max-tokens", type=int, default=OUTPUT_TOKENS)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each HTTP and worker measurement (medians)")
    ap.add_argument("--no-bench-in-process", action="store_true", help="skip `servesim bench` in process")
    ap.add_argument("--levels", type=http_users.parse_levels, default=LEVELS,
                    help="users:requests,... (default 1:20,10:50,50:100)")
    ap.add_argument("--stream-interval", type=int, default=1,
                    help="the servers' --stream-interval (tokens per stream event; 1, vLLM's default: every token)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.cache)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    args.out.mkdir(parents=True, exist_ok=True)
    # The server's default XLA flags, for the servers and both in-process runs alike (same matmul library)
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_use_xnnpack=true".strip()
    engines = ["sequential", "continuous"]
    urls = {e: f"http://127.0.0.1:{args.port + i}" for i, e in enumerate(engines)}
    procs = {e: start_server(e, args.port + i, args.out, args.cache, args.stream_interval)
             for i, e in enumerate(engines)}
    print(f"# servers: --stream-interval {args.stream_interval}; {serving_stack()}", flush=True)
    workers: dict[str, Worker] = {}
    samples: dict[str, dict[str, list]] = {e: {} for e in engines}
    rows: dict[str, dict] = {e: {} for e in engines}
    load = [os.getloadavg()[0]]

    def record(e: str, key: str, value: float, detail: str = "") -> None:
        samples[e].setdefault(key, []).append(value)
        print(f"{e:10s} {key:14s} {value:8.0f} tok/s {detail} load {os.getloadavg()[0]:.1f}", flush=True)

    try:
        for e in engines:  # both compile at once; each reports its own start-up compile time
            rows[e]["ready_s"] = wait_healthy(urls[e], procs[e], args.ready_timeout)
            m = metrics(urls[e], ("servesim:compilations_startup", "servesim:compile_startup_seconds"))
            rows[e]["startup_compiles"] = m["servesim:compilations_startup"]
        for e in engines:
            workers[e] = Worker(args.out / f"{e}.toml", args.cache)
        for w in workers.values():
            w.wait_ready()
        load.append(os.getloadavg()[0])
        for rep in range(args.repeats):
            # Interleaved: each measurement runs on one engine then the other, so load changes hit both alike.
            for users, requests in args.levels:
                for e in engines:
                    counted = ServerCounters(urls[e], procs[e].pid)
                    lv = asyncio.run(http_users.run_level(urls[e], "llama3.1:8b", users, requests,
                                                          max_tokens=args.max_tokens))
                    engine = counted.since(lv["wall_s"])
                    samples[e].setdefault(f"engine article {users}", []).append(engine)
                    record(e, f"article {users}", lv["output_tok_s"] if not lv["failed"] else float("nan"),
                           f"({lv['failed']} failed; {engine_text(engine)})")
                if users == 1:
                    continue
                for e in engines:
                    # A seed per repeat: bench --url and in process send the same random prompts, and none of them
                    # is in the server's prefix cache from an earlier repeat (in process starts with an empty one).
                    cfg_u = write_config(args.out / f"{e}-{users}-{rep}.toml", e, users, requests // users,
                                         args.max_tokens, seed=rep)
                    counted = ServerCounters(urls[e], procs[e].pid)
                    t0 = time.perf_counter()
                    row = bench(cfg_u, args.out / f"url-{e}-{users}", urls[e])
                    # CPU per token over bench's warm-up and measured cells (both counted in the tokens); its
                    # client's is left out: its own start-up (Python, JAX) would swamp it.
                    engine = {**counted.since(time.perf_counter() - t0), **bench_engine(row)}
                    del engine["client_us"]
                    samples[e].setdefault(f"engine url {users}", []).append(engine)
                    record(e, f"url {users}", row["output_throughput"], f"({engine_text(engine)})")
                    # greedy as bench --url asks; temperature 1 as the article client gets (OpenAI's default)
                    for key, temperature in ((f"proc {users}", 0.0), (f"proc t1 {users}", 1.0)):
                        r = workers[e].level(cfg_u, temperature)
                        engine = dict(steps=r["steps"], ms_per_step=r["ms_per_step"], stepping=1.0,
                                      server_us=r["cpu_us_per_token"])
                        samples[e].setdefault(f"engine {key}", []).append(engine)
                        record(e, key, r["output_tok_s"], f"({engine_text(engine)})")
                    if rep == 0 and not args.no_bench_in_process:
                        record(e, f"bench {users}",
                               bench(cfg_u, args.out / f"proc-{e}-{users}", None)["output_throughput"])
            load.append(os.getloadavg()[0])
        for e in engines:
            rows[e]["serving_compiles"] = metrics(urls[e], ("servesim:compilations_serving",))[
                "servesim:compilations_serving"]
    finally:
        for w in workers.values():
            w.close()
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            p.wait(120)
    for e in engines:
        for k, v in samples[e].items():
            if not k.startswith("engine "):
                rows[e][k] = statistics.median(v)
    print_table(rows, samples, args, load)


def print_table(rows: dict, samples: dict, args, load: list[float]) -> None:
    """The medians, the ratios and where the continuous engine thread's time went."""
    print(f"\nload average {min(load):.1f}-{max(load):.1f}; output tok/s, median of {args.repeats} "
          f"(tiny model, {PROMPT_TOKENS} in / {args.max_tokens} out; `servesim bench` in process: one run)")
    cols = {"article 1": "article 1", "article 10": "article 10", "article 50": "article 50",
            "url 10": "bench --url 10", "url 50": "bench --url 50", "proc 10": "in process 10",
            "proc 50": "in process 50", "proc t1 10": "in process article T=1 10",
            "proc t1 50": "in process article T=1 50",
            "bench 10": "servesim bench 10", "bench 50": "servesim bench 50"}
    cols = {k: v for k, v in cols.items() if any(k in r for r in rows.values())}  # what was measured
    print("| engine | ready s | compiles start / serving | " + " | ".join(cols.values()) + " |")
    print("|---" * (3 + len(cols)) + "|")
    for e, r in rows.items():
        print(f"| {e} | {r.get('ready_s', float('nan')):.0f} | {r.get('startup_compiles', 0):.0f} / "
              f"{r.get('serving_compiles', float('nan')):.0f} | " + " | ".join(
                  f"{r.get(k, float('nan')):.0f}" for k in cols) + " |")
    s, c = rows["sequential"], rows["continuous"]
    print("\ncontinuous / sequential: " + ", ".join(f"{cols[k]} {c[k] / s[k]:.1f}x" for k in cols
                                                   if k != "article 1" and k in c and k in s))
    print("continuous over HTTP / in process (the server's engine, the same workload: the article client's\n"
          "requests send one chat prompt, prefix-cached after the first, and sample at temperature 1, OpenAI's\n"
          "default; bench --url's send random prompts, greedy): " + ", ".join(
              f"{u} users: article {c[f'article {u}'] / c[f'proc t1 {u}']:.2f}, "
              f"bench --url {c[f'url {u}'] / c[f'proc {u}']:.2f}" for u in (10, 50) if f"proc {u}" in c))
    print("\nwhere it went, medians (over HTTP: ms inside Engine.step per step; in process: wall per step; CPU\n"
          "per generated token: the server process (all its threads), its event-loop thread, the client's process):")
    for e in rows:
        for k, v in samples[e].items():
            if k.startswith("engine "):
                print(f"  {e:10s} {k[7:]:12s} " + engine_text({f: statistics.median(x[f] for x in v) for f in v[0]}))


if __name__ == "__main__":
    main()
