"""What a running server says about itself: its Prometheus /metrics, sampled while a cell runs.

Both real engines export their scheduler's state, which is what a scheduling model is checked
against (sim.lab.url_validate): vLLM (vllm/v1/metrics/loggers.py) the gauges
`vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc` and the
counters `vllm:num_preemptions_total`, `vllm:prefix_cache_{queries,hits}_total`; llama-server
(tools/server/server-task.cpp, server_task_result_metrics::to_metrics) the gauges
`llamacpp:requests_processing` (busy slots), `llamacpp:requests_deferred` (requests waiting for a
slot) and the counters `llamacpp:n_decode_total` (llama_decode calls), `llamacpp:prompt_tokens_total`,
`llamacpp:prompt_tokens_cached_total`; its `llamacpp:n_busy_slots_per_decode` is a running average
since start (n_busy_slots / n_decode), so a cell's own average comes from two samples of it and of
n_decode_total.

A sample is (t seconds, {metric name: value summed over its label sets}).
"""
from __future__ import annotations

import asyncio
import math
from pathlib import Path

import aiohttp
import pandas as pd

COUNTERS = (
    "vllm:num_preemptions_total", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
    "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
    "vllm:iteration_tokens_total_count", "vllm:iteration_tokens_total_sum",  # engine steps, tokens they computed
    "llamacpp:n_decode_total", "llamacpp:prompt_tokens_total", "llamacpp:prompt_tokens_cached_total",
    "llamacpp:tokens_predicted_total",
    # servesim's engine thread: steps, seconds inside them, seconds waiting for work
    "servesim:engine_steps_total", "servesim:engine_step_seconds_total", "servesim:engine_idle_seconds_total",
)
GAUGES = (
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "llamacpp:requests_processing", "llamacpp:requests_deferred",
)
BUSY_PER_DECODE = "llamacpp:n_busy_slots_per_decode"


def parse_prometheus(text: str) -> dict[str, float]:
    """{metric name: sum of its samples over label sets} from Prometheus text exposition (comments skipped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0].strip()
        try:
            v = float(value)
        except ValueError:
            continue
        if name and not math.isnan(v):
            out[name] = out.get(name, 0.0) + v
    return out


class MetricsPoller:
    """Samples base_url's /metrics every interval_s until stop(); samples = [(t_s, {name: value})]."""

    def __init__(self, base_url: str, interval_s: float = 0.25):
        """base_url: the OpenAI base URL (".../v1"); /metrics is at the server's root."""
        root = base_url.rstrip("/")
        self.url = root.removesuffix("/v1") + "/metrics"
        self.interval_s = interval_s
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._stop = asyncio.Event()
        self.started = asyncio.Event()  # set once the first sample is taken (or failed)

    async def scrape(self, session, now) -> None:
        """One sample at now() (seconds); nothing when the server does not answer."""
        try:
            async with session.get(self.url) as r:
                if r.status == 200:
                    self.samples.append((now(), parse_prometheus(await r.text())))
        except (aiohttp.ClientError, OSError):
            pass

    async def run(self, now) -> None:
        """Sample until stop() is called, then once more; now() gives the time in seconds."""
        connector = aiohttp.TCPConnector(force_close=True)  # as the bench: servers drop kept-alive connections
        async with aiohttp.ClientSession(connector=connector) as session:
            await self.scrape(session, now)
            self.started.set()
            while not self._stop.is_set():
                try:
                    await asyncio.wait_for(self._stop.wait(), self.interval_s)
                except TimeoutError:
                    pass
                await self.scrape(session, now)

    def stop(self) -> None:
        """End run() after one last sample."""
        self._stop.set()

    def write(self, path: str | Path, cell: str) -> None:
        """Append this cell's samples of GAUGES (long format: cell, t_s, metric, value) and its first and last
        of COUNTERS and BUSY_PER_DECODE, replacing rows an earlier run of the same cell left."""
        path = Path(path)
        ends = {0, len(self.samples) - 1}
        rows = [dict(cell=cell, t_s=t, metric=k, value=v) for i, (t, s) in enumerate(self.samples)
                for k, v in s.items() if k in GAUGES or (i in ends and (k in COUNTERS or k == BUSY_PER_DECODE))]
        df = pd.DataFrame(rows, columns=["cell", "t_s", "metric", "value"])
        if path.exists():
            old = pd.read_csv(path)
            df = pd.concat([old[old["cell"] != cell], df], ignore_index=True)
        df.to_csv(path, index=False, float_format="%.6g")


def cell_metrics(samples: list[tuple[float, dict[str, float]]]) -> dict[str, float]:
    """A cell's view of the server: counter deltas (first to last sample), gauges' time-weighted mean and max.

    Keys: the counter's name (delta), '<gauge>_mean' and '<gauge>_max', and 'llamacpp:busy_slots_per_decode'
    (the cell's own average, from the running average and n_decode_total at both ends). Metrics the
    server does not export are absent.
    """
    if not samples:
        return {}
    first, last = samples[0][1], samples[-1][1]
    out: dict[str, float] = {}
    for name in COUNTERS:
        if name in first and name in last:
            out[name] = last[name] - first[name]
    for name in GAUGES:
        pts = [(t, s[name]) for t, s in samples if name in s]
        if not pts:
            continue
        out[f"{name}_max"] = max(v for _, v in pts)
        span = pts[-1][0] - pts[0][0]
        if span > 0:  # each value holds until the next sample
            out[f"{name}_mean"] = sum(v * (tb - ta) for (ta, v), (tb, _) in zip(pts, pts[1:])) / span
        else:
            out[f"{name}_mean"] = pts[0][1]
    d = "llamacpp:n_decode_total"
    if all(k in s for s in (first, last) for k in (d, BUSY_PER_DECODE)) and last[d] > first[d]:
        busy = last[BUSY_PER_DECODE] * last[d] - first[BUSY_PER_DECODE] * first[d]
        out["llamacpp:busy_slots_per_decode"] = busy / (last[d] - first[d])
    return out
