"""What the server tests share: the tiny experiment, servers on loopback in a thread, /metrics parsing.

Each module starts its servers once (module fixtures). Their runners pad every step to one
bucket (min_seqs, min_tokens, min_blocks equal to the scheduler's limits), so each compiles a
handful of step shapes at start-up; prompts stay short so one context bucket serves them.
"""
from __future__ import annotations

import re
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import uvicorn

from sim.lab.experiment import load_experiment
from sim.lab.server import GracefulServer

CONFIG = """
name = "serve_tiny"
model = "tiny"
seed = 0

[workload]
kind = "closed_loop"
clients = [3]
requests_per_client = 2

[workload.prompt_tokens]
dist = "fixed"
value = 12

[workload.output_tokens]
dist = "fixed"
value = 6

[engines.continuous]
scheduler = "continuous"
max_num_seqs = 64
max_num_batched_tokens = 256
max_model_len = 128
num_blocks = 512

[engines.ollama]
scheduler = "sequential"
num_parallel = 1
num_ctx = 64
max_queue = 8
"""
EXP = load_experiment(CONFIG)
MODEL = "tiny"
PAGED_BUCKETS = dict(min_seqs=64, min_tokens=256, min_blocks=8)
SLOT_BUCKETS = dict(min_seqs=1, min_tokens=64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(app, timeout: float = 300.0):
    """Run app with uvicorn (GracefulServer) on a free loopback port in a thread; yields the base URL (no /v1)."""
    port = free_port()
    server = GracefulServer(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"),
                            app.state.servesim)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.time() < deadline, "server did not become healthy"
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(60)


def metrics(url: str, model: str = MODEL) -> dict[str, float]:
    """/metrics as {sample name with labels minus model_name: value}; also checks the format."""
    out = {}
    text = httpx.get(url + "/metrics").text
    for line in text.splitlines():
        if not line or line.startswith("#"):
            assert line.startswith(("# HELP ", "# TYPE ")) or not line
            continue
        name, value = line.rsplit(" ", 1)
        name = re.sub(r'[{,]model_name="[^"]*"', lambda m: m.group(0)[0], name).replace("{,", "{").replace("{}", "")
        out[name.replace(",}", "}")] = float(value)
    return out


def wait_idle(url: str, timeout: float = 10.0) -> dict[str, float]:
    """Metrics once nothing runs or waits and no KV is in use."""
    deadline = time.time() + timeout
    while True:
        m = metrics(url)
        if m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0 \
                and m["vllm:kv_cache_usage_perc"] == 0:
            return m
        assert time.time() < deadline, f"server not idle: {m}"
        time.sleep(0.05)


def prompt_ids(i: int, n: int = 6) -> list[int]:
    return [8 + (37 * i + 11 * k) % 500 for k in range(n)]
