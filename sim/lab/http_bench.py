"""`servesim bench CONFIG --url URL`: the experiment's workload against a running server, over HTTP.

The same request sequence (sim.lab.workload: prompts as token ids, output lengths as max_tokens
with ignore_eos) as `servesim bench` and `servesim run`, sent as streaming /v1/completions
requests with aiohttp; TTFT, ITL and E2E are measured on the client (send -> first token
chunk -> last chunk), as vLLM's benchmark_serving does, and written through sim.lab.metrics to
the same requests.csv / summary.json. The server runs one engine, so there is one cell per
load of the workload (clients or rates), labelled with the engine the server reports in
/v1/models (servesim_engine), else "http".

Outcomes: HTTP 503 and 400 are `refused` (the reason keeps the server's message), a client
timeout (workload.timeout_s) is `timed_out`, a broken connection or a stream error is
`aborted`. Tokens are counted from the chunks' token_ids (return_token_ids, a vLLM
extension servesim supports), else one per non-empty text chunk.

The warm-up sends other prompts than the measured run (the workload under another seed): both
real servers cache prompts (vLLM's prefix cache, llama-server's per-slot and RAM prompt caches),
so a warm-up that repeated a client's first prompt made that request's measured TTFT a cache hit
that no simulation of the workload would predict. With `metrics_poll_s` > 0 the server's
Prometheus /metrics are sampled during each measured cell (sim.lab.server_metrics) and kept
beside the results (server_metrics.csv; the cell's counter deltas and gauge means go into its
summary as `server_*` fields).
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import pandas as pd

from reference.request import Outcome, Request, SamplingParams
from sim.lab.experiment import Cell, Experiment
from sim.lab.metrics import ResultsWriter
from sim.lab.server_metrics import MetricsPoller, cell_metrics
from sim.lab.workload import ClosedLoopWorkload, RequestSpec

WARMUP_REQUESTS_PER_CLIENT = 1  # as sim.lab.bench
WARMUP_OPEN_LOOP_REQUESTS = 32
WARMUP_SEED_OFFSET = 7_919  # the warm-up's workload seed = experiment seed + this: other prompts, same shape


def normalize_base_url(url: str) -> str:
    """'http://host:8000' or 'http://host:8000/v1/' -> 'http://host:8000/v1'."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


class StreamingClient:
    """Streaming /v1/completions over one aiohttp session; times are seconds since t0 (perf_counter).

    send(spec) turns a RequestSpec into a finished Request record. request(spec) + run(req) do
    the same in two parts, so a caller can watch a request's token_times while it streams
    (sim.lab.url_profile injects prompts while others decode).
    """

    def __init__(self, session, base_url: str, model: str, t0: float, timeout_s: float):
        self.session, self.url, self.model = session, base_url + "/completions", model
        self.t0, self.timeout_s = t0, timeout_s

    def now(self) -> float:
        """Seconds since t0."""
        return time.perf_counter() - self.t0

    def request(self, spec: RequestSpec) -> Request:
        """The Request record of spec, arriving now (not sent yet)."""
        return Request(spec.request_id, spec.prompt_token_ids, SamplingParams(max_tokens=int(spec.max_tokens)),
                       arrival_time=self.now())

    async def send(self, spec: RequestSpec) -> Request:
        """Send spec and read its stream to the end; the finished Request (never raises for server errors)."""
        return await self.run(self.request(spec))

    async def run(self, req: Request) -> Request:
        """Send req (its prompt and max_tokens) and read its stream to the end, recording each token's time."""
        body = {"model": self.model, "prompt": req.prompt_token_ids, "max_tokens": req.sampling.max_tokens,
                "temperature": 0.0, "ignore_eos": True, "stream": True, "return_token_ids": True,
                "stream_options": {"include_usage": True}}
        try:
            async with asyncio.timeout(self.timeout_s or None):
                async with self.session.post(self.url, json=body) as resp:
                    if resp.status != 200:
                        req.finish(Outcome.REFUSED if resp.status in (400, 429, 503) else Outcome.ABORTED,
                                   self.now(), f"HTTP {resp.status}: {_message(await resp.text())}")
                        return req
                    await self._read_stream(resp, req)
        except TimeoutError:
            req.finish(Outcome.TIMED_OUT, self.now(), f"client timeout after {self.timeout_s} s")
        except (aiohttp.ClientError, OSError, ValueError) as e:
            req.finish(Outcome.ABORTED, self.now(), f"connection error: {e!r}")
        except asyncio.CancelledError:  # the caller gave up on it (the connection closes: the server aborts it)
            req.finish(Outcome.ABORTED, self.now(), "cancelled by the client")
            raise
        return req

    async def _read_stream(self, resp, req: Request) -> None:
        async for line in resp.content:
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                req.finish(Outcome.COMPLETED, self.now())
                return
            chunk = json.loads(data)
            if "error" in chunk:
                req.finish(Outcome.ABORTED, self.now(), f"stream error: {_message(chunk)}")
                return
            t = self.now()
            for choice in chunk.get("choices") or ():
                ids = choice.get("token_ids")
                for tid in (ids if ids is not None else ([0] if choice.get("text") else [])):
                    req.append_token(int(tid), t)
        req.finish(Outcome.ABORTED, self.now(), "stream ended without [DONE]")


def _message(text_or_body) -> str:
    body = text_or_body
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            return body[:200]
    err = body.get("error", body) if isinstance(body, dict) else body
    return str(err.get("message", err) if isinstance(err, dict) else err)[:200]


async def _closed_loop(wl: ClosedLoopWorkload, client: StreamingClient, on_finish, limit: int | None) -> None:
    async def one(c: int) -> None:
        sent = 0
        while (limit is None or sent < limit) and (spec := wl.next_for_client(c)) is not None:
            sent += 1
            on_finish(await client.send(spec), c)
            think = wl.think_time_s(c)
            if think > 0:
                await asyncio.sleep(think)

    await asyncio.gather(*(one(c) for c in range(wl.num_clients)))


async def _open_loop(wl, client: StreamingClient, on_finish, limit: int | None) -> None:
    cap = asyncio.Semaphore(wl.max_concurrency) if wl.max_concurrency else None
    tasks = []

    async def one(spec: RequestSpec) -> None:
        try:
            on_finish(await client.send(spec), spec.client_id)
        finally:
            if cap is not None:
                cap.release()

    for i, spec in enumerate(wl):
        if limit is not None and i >= limit:
            break
        delay = spec.arrival_time - client.now()
        if delay > 0:
            await asyncio.sleep(delay)
        if cap is not None:
            await cap.acquire()  # held back client-side, like vLLM's --max-concurrency
        tasks.append(asyncio.create_task(one(spec)))
    await asyncio.gather(*tasks)


def client_session():
    """The benchmark's aiohttp session: no connection cap, no total timeout, a new connection per request.

    force_close: a server may close a kept-alive connection between two requests (llama-server's
    HTTP library closes idle ones after a few seconds and after a number of requests); a request
    then written on it fails (ClientOSError "Can not write request body", ServerDisconnectedError)
    although the server never saw it. A fresh connection per request cannot meet a stale one (the
    older vLLM benchmark_serving.py opened a session per request); a loopback connect costs tens of
    microseconds, nothing next to a request.
    """
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True),
                                 timeout=aiohttp.ClientTimeout(total=None))


async def _run_cell(exp: Experiment, cell: Cell, base_url: str, model: str, on_finish, warm: bool,
                    poller: MetricsPoller | None = None, open_loop_warmup: int = WARMUP_OPEN_LOOP_REQUESTS) -> float:
    """Run one cell (warm: only the first request per client, or the first open-loop ones, on other prompts).

    on_finish(request, client_id) sees every request that ends, completed or not. poller, if
    given, samples the server's /metrics while the cell runs (once before and once after included).

    Returns the wall time (s).
    """
    seed = exp.seed + WARMUP_SEED_OFFSET if warm else exp.seed
    async with client_session() as session:
        wl = exp.workload.build(seed, exp.model_spec.vocab_size, cell.load)
        client = StreamingClient(session, base_url, model, time.perf_counter(), wl.timeout_s)
        polling = asyncio.create_task(poller.run(client.now)) if poller is not None else None
        if polling is not None:
            await poller.started.wait()  # the "before" sample precedes the first request
        try:
            if isinstance(wl, ClosedLoopWorkload):
                await _closed_loop(wl, client, on_finish, WARMUP_REQUESTS_PER_CLIENT if warm else None)
            else:
                await _open_loop(wl, client, on_finish, open_loop_warmup if warm else None)
            wall = client.now()
        finally:
            if polling is not None:
                poller.stop()
                await polling
        return wall


async def _get_json(base_url: str, path: str) -> dict:
    async with aiohttp.ClientSession() as s, s.get(base_url + path) as r:
        r.raise_for_status()
        return await r.json()


def server_model(base_url: str) -> dict:
    """The first entry of the server's /v1/models (its id, and whatever else the server says about it)."""
    models = asyncio.run(_get_json(normalize_base_url(base_url), "/models")).get("data") or []
    if not models:
        raise RuntimeError(f"{base_url}/models lists no model")
    return models[0]


def wait_healthy(base_url: str, proc: subprocess.Popen, timeout_s: float, poll_s: float = 0.5) -> float:
    """Seconds (wall) until base_url + "/health" answers 200, for a server started as proc (ours, vLLM, llama-server).

    RuntimeError if proc exits first (its exit code), TimeoutError after timeout_s seconds.
    """
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {base_url}/health answered")
        try:
            with urllib.request.urlopen(base_url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return time.time() - t0
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(poll_s)
    raise TimeoutError(f"{base_url}/health did not answer 200 within {timeout_s:g} s")


def run_http_bench(exp: Experiment, base_url: str, out_dir: str | Path, *, resume: bool = True,
                   warmup: bool = True, engine: str | None = None, echo=print,
                   metrics_poll_s: float = 0.25, open_loop_warmup: int = WARMUP_OPEN_LOOP_REQUESTS) -> pd.DataFrame:
    """Drive the server at base_url with every load of exp's workload; returns the summary of all cells.

    base_url: the OpenAI base URL (".../v1" is added when missing). engine: the cell label
    (default: the engine the server reports). Results go to out_dir like `servesim bench`.
    metrics_poll_s: sample the server's /metrics this often during each cell (0: not at all);
    samples go to out_dir/server_metrics.csv, per-cell aggregates into the summary.
    open_loop_warmup: requests of an open-loop cell's warm-up (at the cell's rate).
    """
    base_url = normalize_base_url(base_url)
    info = server_model(base_url)
    model = info["id"]
    label = engine or info.get("servesim_engine") or "http"
    out = Path(out_dir)
    writer = ResultsWriter(out, resume=resume)
    if not resume:
        (out / "server_metrics.csv").unlink(missing_ok=True)
    (out / "experiment.toml").write_text(exp.to_toml())
    w = exp.workload
    cells = [Cell(label, **w.cell_fields(load)) for load in w.loads]
    todo = [c for c in cells if not writer.is_done(c.engine, c.concurrency, c.request_rate)]
    if len(todo) < len(cells):
        echo(f"resuming: {len(cells) - len(todo)} of {len(cells)} cells already done in {out}")
    for cell in todo:
        acc = writer.start_cell(cell.engine, cell.concurrency, cell.request_rate, keep_token_times=True)
        if warmup:
            warm_failed: list[Request] = []
            asyncio.run(_run_cell(exp, cell, base_url, model, lambda r, c: r.outcome != Outcome.COMPLETED
                                  and warm_failed.append(r), warm=True, open_loop_warmup=open_loop_warmup))
            if warm_failed:  # unrecorded, but never hidden
                echo(f"  {cell.label}: {len(warm_failed)} warm-up request(s) failed, e.g. "
                     f"{warm_failed[0].outcome.value}: {warm_failed[0].reason}")
        poller = MetricsPoller(base_url, metrics_poll_s) if metrics_poll_s > 0 else None
        wall = asyncio.run(_run_cell(exp, cell, base_url, model, acc.add, warm=False, poller=poller))
        extra = dict(driver="http", url=base_url, model=model, wall_s=wall, preemptions=None)
        if poller is not None and poller.samples:
            server = cell_metrics(poller.samples)
            extra.update({f"server_{k}": v for k, v in server.items()})
            if "vllm:num_preemptions_total" in server:
                extra["preemptions"] = int(server["vllm:num_preemptions_total"])
            poller.write(out / "server_metrics.csv", cell.label)
        s = writer.finish_cell(acc, slo=exp.slo, extra=extra)
        failed = ", ".join(f"{s[k]} {k}" for k in ("refused", "timed_out", "aborted", "unfinished") if s.get(k))
        echo(f"  {cell.label}: {len(acc)} requests in {wall:.1f} s"
             + (f"; NOT COMPLETED: {failed} (reasons in requests.csv)" if failed else ""))
    return pd.DataFrame(writer.summaries)
