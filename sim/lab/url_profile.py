"""`servesim profile --url URL`: a step-time profile of any running OpenAI-compatible server, measured as a black box.

The server is driven with streaming /v1/completions (prompts as token ids, ignore_eos, a fresh
connection per request: sim.lab.http_bench.StreamingClient) in three controlled experiments,
each timed on the client:

    prefill  one request at a time, max_tokens = 1: its TTFT is the time of one step computing
             its prompt (plus the server's fixed request overhead; see below)
    decode   B requests sent together with equal prompts and max_tokens: once all of them stream,
             every inter-token gap is one decode step of batch B; the gaps of the window where all
             B decode, pooled over `decode_passes` passes of the grid (run apart in time, so a
             slow minute of a shared machine moves one pass only), make the row, at their mean
             context
    mixed    B requests decoding; one prompt injected at a time: the decoders' gap that ends with
             the injected request's first token is the step that computed that prompt together
             with B decodes

Every prompt is fresh random token ids (the workload generator under a probe seed), so no
prefix or prompt cache of the server hits. A row's time (`mean_ms`, '# time_column: mean_ms') is
the mean of its samples less the lowest and highest 5%: the simulator must reproduce mean
latencies, and on a shared machine a server's step times are skewed (llama-server at one client:
mean token gap 3% above the median), while one stall of a second in ~100 samples would move a
plain mean by 10%. The median is kept beside it (`median_ms`). The rows are written in the
profile CSV format the simulator loads (sim.core.calibrated.read_profile), with metadata
'# shapes: server context_pad=N': the law is priced on the step's real shape
(sim.core.calibrated.ServerShapes), decode steps from the measured table.
N = 1 by default, llama.cpp included: its K/V view is padded to 256 cells (src/llama-kv-cache.cpp
get_n_kv), but its CPU flash-attention kernel skips the masked cells (ggml-cpu/ops.cpp,
flash_attn_ext_f16_one_chunk: `if (mv == -INFINITY) continue;`), so the work follows the real
context (measured: a decode at 40 and at ~120 tokens of context differ although both read n_kv =
256); --context-pad N for a server whose attention does read padded K/V.

Request overhead: a TTFT also holds the time from the client's send to the server's scheduler
and back (HTTP, tokenizer bypass, IPC between vLLM's API server and engine core). The mixed
rows, timed between two tokens of the decoders, do not. The fit (fit_overhead) estimates the
overhead o as the one constant that makes the prefill rows (TTFT - o) and the mixed rows agree
on one law; the prefill rows are written as TTFT - o, and o goes into the metadata
('# request_overhead_ms'), where the validation adds it to the simulated TTFT and E2E.
"""
from __future__ import annotations

import asyncio
import datetime as _dt
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import numpy as np
import pandas as pd

from reference.errors import ConfigError
from reference.request import Outcome, Request
from sim.core.calibrated import PROFILE_COLUMNS, CalibratedCostModel, ServerShapes, nnls, shape_from_profile_row
from sim.lab.http_bench import StreamingClient, client_session, normalize_base_url
from sim.lab.workload import RequestSpec

SETTLE_S = 0.2  # idle time between probes, so each starts on an idle server
TRIM = 0.05  # a row's time is the mean of its samples without the lowest and highest 5% (see the module docstring)


@dataclass(frozen=True)
class UrlGrid:
    """What a black-box profile measures (tokens, sequences). Shapes past the server's limits are dropped."""

    prefill_tokens: tuple[int, ...]  # prompt lengths of the single-request TTFT probes
    prefill_repeats: int
    decode_batch: tuple[int, ...]  # requests decoding together
    decode_context: tuple[int, ...]  # their prompt length
    decode_tokens: int  # tokens each decode probe generates
    max_probe_tokens: int  # skip decode probes whose B x prompt exceeds this (their prefill alone takes long)
    decode_passes: int  # passes over the decode grid, pooled
    mixed_batch: tuple[int, ...]  # decoders running while a prompt is injected
    mixed_prefill: tuple[int, ...]  # injected prompt lengths
    mixed_repeats: int

    def describe(self) -> str:
        """One line for the CSV metadata."""
        return (f"prefill {list(self.prefill_tokens)} x {self.prefill_repeats}; decode batch {list(self.decode_batch)}"
                f" x prompt {list(self.decode_context)} x {self.decode_tokens} tokens (B x prompt <= "
                f"{self.max_probe_tokens}) x {self.decode_passes} passes; mixed batch {list(self.mixed_batch)} + prompt {list(self.mixed_prefill)}"
                f" x {self.mixed_repeats}")


URL_GRIDS: dict[str, UrlGrid] = {
    # Seconds against a fast server: for tests and a first look.
    "quick": UrlGrid((16, 64, 256), 2, (1, 2, 4), (16, 272), 24, 2048, 1, (1, 2), (64, 256), 1),
    "default": UrlGrid((16, 64, 128, 256, 512, 1024), 3, (1, 2, 3, 4, 5, 6, 8, 12, 16), (16, 100, 200, 500, 1000),
                       48, 4400, 2, (1, 3, 7), (32, 128, 512), 2),
}


@dataclass(frozen=True)
class ServerInfo:
    """What a server says about itself: its model id, what runs it, its limits (None: not said)."""

    base_url: str
    model: str
    kind: str  # "vllm", "llama.cpp" or "unknown"
    slots: int | None  # llama-server's parallel slots (/props total_slots)
    context: int | None  # most tokens per request: vLLM max_model_len, llama-server's per-slot n_ctx

    @property
    def context_pad(self) -> int:
        """The K/V rounding of its attention's work: 1 for both known servers (see the module docstring)."""
        return 1


async def _get(session, url: str) -> dict | None:
    try:
        async with session.get(url) as r:
            return await r.json(content_type=None) if r.status == 200 else None
    except (aiohttp.ClientError, OSError, ValueError):
        return None


async def _discover(base_url: str) -> ServerInfo:
    root = base_url[: -len("/v1")]
    async with client_session() as s:
        models = await _get(s, base_url + "/models")
        props = await _get(s, root + "/props")
    data = (models or {}).get("data") or []
    if not data:
        raise ConfigError("url", f"{base_url}/models lists no model (is it an OpenAI-compatible server?)",
                          "the base URL of a running server, e.g. http://127.0.0.1:8000/v1")
    m = data[0]
    owner = str(m.get("owned_by", "")).lower()
    if props and "total_slots" in props:  # llama-server (tools/server/server-context.cpp, /props)
        n_ctx = (props.get("default_generation_settings") or {}).get("n_ctx")
        return ServerInfo(base_url, m["id"], "llama.cpp", int(props["total_slots"]), int(n_ctx) if n_ctx else None)
    if owner == "vllm" or "max_model_len" in m:
        ctx = m.get("max_model_len")
        return ServerInfo(base_url, m["id"], "vllm", None, int(ctx) if ctx else None)
    return ServerInfo(base_url, m["id"], "unknown", None, None)


def discover(url: str) -> ServerInfo:
    """Ask the server at url (an OpenAI base URL) what it is."""
    return asyncio.run(_discover(normalize_base_url(url)))


class _Prompts:
    """Fresh random prompts: request k of the workload generator under the probe seed (never repeated)."""

    def __init__(self, seed: int, vocab_size: int):
        self.seed, self.vocab_size, self.k = seed, vocab_size, 0

    def spec(self, prompt_len: int, max_tokens: int) -> RequestSpec:
        self.k += 1
        return RequestSpec(f"probe-{self.k}", self.k, prompt_len, max_tokens, seed=self.seed,
                           vocab_size=self.vocab_size)


def _check(req: Request, what: str) -> None:
    if req.outcome is not Outcome.COMPLETED:
        raise RuntimeError(f"{what}: request {req.request_id} {req.outcome and req.outcome.value}: {req.reason}")


async def _prefill_rows(client: StreamingClient, prompts: _Prompts, grid: UrlGrid, echo) -> list[dict]:
    rows = []
    for p in grid.prefill_tokens:
        ttft = []
        for _ in range(grid.prefill_repeats):
            req = await client.send(prompts.spec(p, 1))
            _check(req, f"prefill probe of {p} tokens")
            ttft.append(req.first_token_time - req.arrival_time)
            await asyncio.sleep(SETTLE_S)
        rows.append(_row("prefill", 1, p, p, ttft, "ttft"))
        echo(f"  prefill {p:5d} tokens: TTFT median {1e3 * statistics.median(ttft):8.1f} ms")
    return rows


def decode_window(reqs: list[Request], prompt_len: int) -> tuple[list[float], list[int]]:
    """Gaps (s) between consecutive tokens of each request while all of them decode, and each gap's context.

    The window runs from the last first token to the first last token; a token k > 0 of a
    request is computed on a context of prompt_len + k tokens.
    """
    start = max(r.token_times[0] for r in reqs)
    end = min(r.token_times[-1] for r in reqs)
    gaps, ctx = [], []
    for r in reqs:
        t = r.token_times
        for k in range(1, len(t)):
            if t[k - 1] >= start and t[k] <= end:
                gaps.append(t[k] - t[k - 1])
                ctx.append(prompt_len + k)
    return gaps, ctx


async def _decode_rows(client: StreamingClient, prompts: _Prompts, grid: UrlGrid, echo) -> list[dict]:
    probes = [(b, p) for b in grid.decode_batch for p in grid.decode_context if b * p <= grid.max_probe_tokens]
    gaps: dict[tuple[int, int], list[float]] = {}
    ctxs: dict[tuple[int, int], list[int]] = {}
    for k in range(grid.decode_passes):
        for b, p in probes if k % 2 == 0 else probes[::-1]:  # other passes in reverse: apart in time
            reqs = await asyncio.gather(*(client.send(prompts.spec(p, grid.decode_tokens)) for _ in range(b)))
            for r in reqs:
                _check(r, f"decode probe B={b} prompt={p}")
            g, c = decode_window(list(reqs), p)
            gaps.setdefault((b, p), []).extend(g)
            ctxs.setdefault((b, p), []).extend(c)
            await asyncio.sleep(SETTLE_S)
    rows = []
    for b, p in probes:
        g = gaps[(b, p)]
        if len(g) < 3 * b * grid.decode_passes:
            echo(f"  decode B={b:2d} prompt {p:5d}: too few steps with all {b} decoding, skipped")
            continue
        rows.append(_row("decode", b, int(round(float(np.mean(ctxs[(b, p)])))), 0, g, "itl"))
        echo(f"  decode B={b:2d} prompt {p:5d}: step median {1e3 * statistics.median(g):8.2f} ms over {len(g)} gaps")
    return rows


def mixed_stall(decoders: list[Request], first_token_time: float, prompt_len: int) -> tuple[list[float], list[int]]:
    """Per decoder, the gap ending with its token closest to first_token_time, and that token's context.

    Skipped for a decoder whose nearest token is further than half its median gap from
    first_token_time (then it was not in the same step).
    """
    gaps, ctx = [], []
    for r in decoders:
        t = np.asarray(r.token_times)
        if len(t) < 3:
            continue
        k = int(np.argmin(np.abs(t - first_token_time)))
        if k == 0 or abs(t[k] - first_token_time) > 0.5 * float(np.median(np.diff(t))):
            continue
        gaps.append(float(t[k] - t[k - 1]))
        ctx.append(prompt_len + k)
    return gaps, ctx


async def _mixed_rows(client: StreamingClient, prompts: _Prompts, grid: UrlGrid, context: int, echo) -> list[dict]:
    rows = []
    prompt = 16
    for b in grid.mixed_batch:
        decoders = [client.request(prompts.spec(prompt, max(64, context - prompt - 1))) for _ in range(b)]
        tasks = [asyncio.create_task(client.run(r)) for r in decoders]

        async def decoded(n: int) -> bool:
            """Wait until every decoder has n tokens; False if one ended first."""
            while min(len(r.token_times) for r in decoders) < n:
                if any(t.done() for t in tasks):
                    return False
                await asyncio.sleep(0.002)
            return True

        stalls: dict[int, list[float]] = {}
        ctxs: dict[int, list[int]] = {}
        ok = await decoded(3)
        for p in [p for p in grid.mixed_prefill for _ in range(grid.mixed_repeats)] if ok else []:
            inj = await client.send(prompts.spec(p, 1))
            _check(inj, f"mixed probe B={b} prompt={p}")
            n = min(len(r.token_times) for r in decoders)
            if not await decoded(n + 3):  # three plain decode steps before the next injection
                break
            gaps, ctx = mixed_stall(decoders, inj.first_token_time, prompt)
            if len(gaps) == b:
                stalls.setdefault(p, []).extend(gaps)
                ctxs.setdefault(p, []).extend(ctx)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(5 * SETTLE_S)  # the server notices the closed streams and frees the slots
        for p, gaps in stalls.items():
            rows.append(dict(_row("mixed", b, int(round(float(np.mean(ctxs[p])))), p, gaps, "stall")))
            echo(f"  mixed  B={b:2d} + prompt {p:5d}: step median {1e3 * statistics.median(gaps):8.1f} ms")
    return rows


def trimmed_mean(x, cut: float = TRIM) -> float:
    """The mean of x without its lowest and highest `cut` share of values."""
    v = np.sort(np.asarray(x, dtype=float))
    k = int(len(v) * cut)
    return float(v[k:len(v) - k].mean()) if len(v) > 2 * k else float(v.mean())


def _row(kind: str, batch: int, context: int, prefill: int, times_s: list[float], source: str) -> dict:
    ms = np.asarray(times_s) * 1e3
    return dict(kind=kind, batch_size=batch, context_len=context, prefill_tokens=prefill, cached_context=0,
                median_ms=float(np.median(ms)), mean_ms=trimmed_mean(ms), min_ms=float(ms.min()),
                p90_ms=float(np.quantile(ms, 0.9)), samples=len(ms), source=source)


def fit_overhead(rows: pd.DataFrame, shapes: ServerShapes) -> float:
    """The request overhead o (ms) that best reconciles TTFT rows (t - o) with the step rows, by least squares.

    Fits the law with one extra feature that is 1 on the TTFT rows and 0 elsewhere; its
    coefficient is o (>= 0; 0 when the profile has no row without a TTFT to tell them apart).
    """
    if not (rows["source"] != "ttft").any() or not (rows["source"] == "ttft").any():
        return 0.0
    shp = [shape_from_profile_row(str(k), int(b), int(c), int(p), int(cc)) for k, b, c, p, cc in
           zip(rows["kind"], rows["batch_size"], rows["context_len"], rows["prefill_tokens"], rows["cached_context"])]
    a = np.array([shapes.features(s) + (1.0 if src == "ttft" else 0.0,) for s, src in zip(shp, rows["source"])])
    t = rows["median_ms"].to_numpy(dtype=float)
    aw = a / t[:, None]
    norms = np.linalg.norm(aw, axis=0)
    used = norms > 0
    coef = np.zeros(a.shape[1])
    coef[used] = nnls(aw[:, used] / norms[used], np.ones(len(t))) / norms[used]
    return float(coef[-1])


def run_url_profile(url: str, out_path: str | Path, *, grid: str | UrlGrid = "default", vocab_size: int = 32000,
                    preset: str | None = None, max_batch: int | None = None, context_pad: int | None = None,
                    seed: int | None = None, echo=print) -> pd.DataFrame:
    """Profile the server at url as a black box; write and return the profile table (with '# key: value' metadata).

    vocab_size: token ids are drawn from [1, vocab_size) (the served model's vocabulary).
    preset: the model preset the server serves, recorded so that an experiment can check it.
    max_batch: the most requests the server runs together (default: its slots, else the grid's).
    context_pad: the rounding of the K/V the server's attention computes over (default 1).
    seed: the probe prompts' seed (default: from the clock, so a second profile of the same
    server meets no cached prompt).
    """
    g = URL_GRIDS[grid] if isinstance(grid, str) else grid
    if isinstance(grid, str) and grid not in URL_GRIDS:
        raise ConfigError("grid", f"unknown grid {grid!r}", ", ".join(URL_GRIDS))
    info = discover(url)
    cap = max_batch or info.slots or max(g.decode_batch)
    longest = (info.context or 2048) - 1
    g = replace(g, prefill_tokens=tuple(p for p in g.prefill_tokens if p < longest),
                decode_batch=tuple(b for b in g.decode_batch if b <= cap),
                decode_context=tuple(p for p in g.decode_context if p + g.decode_tokens <= longest),
                mixed_batch=tuple(b for b in g.mixed_batch if b < cap),  # one slot left for the injected prompt
                mixed_prefill=tuple(p for p in g.mixed_prefill if p < longest))
    seed = int(time.time()) if seed is None else seed
    shapes = ServerShapes(context_pad or info.context_pad)
    echo(f"profiling {info.kind} server {info.base_url} (model {info.model!r}, slots {info.slots}, "
         f"context {info.context}), {shapes.metadata()}")
    t0 = time.perf_counter()

    async def go() -> list[dict]:
        prompts = _Prompts(seed, vocab_size)
        async with client_session() as session:
            client = StreamingClient(session, info.base_url, info.model, time.perf_counter(), 0.0)
            rows = await _prefill_rows(client, prompts, g, echo)
            rows += await _decode_rows(client, prompts, g, echo)
            rows += await _mixed_rows(client, prompts, g, longest, echo)
            return rows

    table = pd.DataFrame(asyncio.run(go()))
    overhead = fit_overhead(table.assign(median_ms=table["mean_ms"]), shapes)
    ttft = table["source"] == "ttft"
    table["ttft_ms"] = np.where(ttft, table["mean_ms"], np.nan)
    for col in ("median_ms", "mean_ms"):  # the step alone: the TTFT less the request overhead
        table.loc[ttft, col] = np.maximum(table.loc[ttft, col] - overhead, 0.05 * table.loc[ttft, col])
    meta = {
        "source": "servesim profile --url (black box)", "url": info.base_url, "server": info.kind,
        "served_model": info.model, "preset": preset or "", "slots": info.slots or "", "context": info.context or "",
        "shapes": shapes.metadata(), "time_column": "mean_ms", "request_overhead_ms": f"{overhead:.3f}",
        "grid": g.describe(),
        "probe_seed": seed, "vocab_size": vocab_size, "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "duration_s": f"{time.perf_counter() - t0:.1f}", "load_average": _load(),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
    }
    write_profile(table, out_path, meta)
    try:
        law = CalibratedCostModel.from_profile(out_path, check_model=False)
        echo(f"request overhead {overhead:.2f} ms; {law.fit_report.summary()}")
    except ConfigError as e:
        echo(f"request overhead {overhead:.2f} ms; the table cannot be fitted yet: {e}")
    return table


def write_profile(table: pd.DataFrame, path: str | Path, metadata: dict) -> None:
    """The profile CSV: '# key: value' lines, then PROFILE_COLUMNS and the extra columns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = list(PROFILE_COLUMNS) + [c for c in table.columns if c not in PROFILE_COLUMNS]
    with open(path, "w", encoding="utf-8") as f:
        for k, v in metadata.items():
            if v != "":
                f.write(f"# {k}: {v}\n")
        table[cols].to_csv(f, index=False, float_format="%.4f")


def _load() -> str:
    """The 1, 5 and 15 minute load averages (what else ran on this machine)."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return ""

