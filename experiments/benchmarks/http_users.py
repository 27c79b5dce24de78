"""Ollama-vs-vLLM article-style load client: N concurrent users send R chat requests in all; output tok/s.

The design follows the aiohttp benchmark client of the SitePoint article "Ollama vs vLLM:
Performance Benchmark 2026" (mirrored at https://capitolioxa.com/article/4899; issue 16 drove
servesim with it): an asyncio.Semaphore of `users` slots, `requests` POSTs to
/v1/chat/completions with model "llama3.1:8b", non-streaming, one aiohttp session; the level's
output throughput is the completion tokens of all answers (usage.completion_tokens) divided by
the level's wall time, first request sent to last answer received. (users, requests) levels as
used in the issue: (1, 20), (10, 50), (50, 100). This is not the article's file (third-party code
is not committed here); where it may differ: the article's prompt text and max_tokens were not
available to us, so both are parameters (defaults: a ~100-character prompt, 200 tokens, the
cpu_tiny experiments' 100 in / 200 out); ignore_eos is sent so that every answer has max_tokens
tokens on random weights, where a real model would stop at its own end of sequence.

    python experiments/benchmarks/http_users.py --url http://127.0.0.1:8101 [--levels 1:20,10:50,50:100]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import aiohttp

PROMPT = ("Explain, in a few sentences, why batching requests helps a language model server "
          "on a machine with one GPU.")


async def run_level(url: str, model: str, users: int, requests: int, max_tokens: int = 200,
                    prompt: str = PROMPT, timeout_s: float = 3600.0, api_key: str = "x") -> dict:
    """One level: `requests` chat completions through `users` concurrent slots; totals and throughput."""
    sem = asyncio.Semaphore(users)
    latencies: list[float] = []
    tokens = failed = 0
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "ignore_eos": True}

    async def one(session):
        nonlocal tokens, failed
        async with sem:
            t0 = time.perf_counter()
            try:
                async with session.post(url.rstrip("/") + "/v1/chat/completions", json=body) as r:
                    data = await r.json(content_type=None)
                    if r.status != 200:
                        failed += 1
                        return
                    tokens += data["usage"]["completion_tokens"]
                    latencies.append(time.perf_counter() - t0)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                failed += 1

    timeout = aiohttp.ClientTimeout(total=timeout_s)
    headers = {"Authorization": f"Bearer {api_key}"}
    async with aiohttp.ClientSession(timeout=timeout, headers=headers,
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(session) for _ in range(requests)))
        wall = time.perf_counter() - t0
    return dict(users=users, requests=requests, completed=len(latencies), failed=failed, completion_tokens=tokens,
                wall_s=wall, output_tok_s=tokens / wall if wall > 0 else 0.0,
                mean_latency_s=statistics.mean(latencies) if latencies else float("nan"))


def parse_levels(text: str) -> list[tuple[int, int]]:
    """'1:20,10:50' -> [(1, 20), (10, 50)]."""
    return [tuple(int(x) for x in part.split(":")) for part in text.split(",") if part]


async def run_levels(url: str, model: str, levels, max_tokens: int, prompt: str) -> list[dict]:
    """Every level in turn on the same server."""
    return [await run_level(url, model, u, r, max_tokens, prompt) for u, r in levels]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="server base URL (without /v1)")
    ap.add_argument("--model", default="llama3.1:8b")
    ap.add_argument("--levels", default="1:20,10:50,50:100", help="users:requests,...")
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--prompt", default=PROMPT)
    args = ap.parse_args()
    rows = asyncio.run(run_levels(args.url, args.model, parse_levels(args.levels), args.max_tokens, args.prompt))
    print(f"{'users':>5} {'requests':>8} {'done':>5} {'failed':>6} {'tokens':>7} {'wall s':>8} {'tok/s':>8}")
    for r in rows:
        print(f"{r['users']:>5} {r['requests']:>8} {r['completed']:>5} {r['failed']:>6} {r['completion_tokens']:>7} "
              f"{r['wall_s']:>8.2f} {r['output_tok_s']:>8.1f}")


if __name__ == "__main__":
    main()
