"""Write lambdalabs_a100_sharegpt.csv: a 320-request trace standing in for LambdaLabs' vLLM 0.5.4 ShareGPT runs.

The runs (experiments/measured/vllm.csv rows LL-A100-10, LL-A100-40, LL-A100-320; LambdaLabsML/vllm-benchmark,
1x A100 80GB SXM, Meta-Llama-3-8B-Instruct) sent 10, 40 and 320 ShareGPT prompts at t = 0. vLLM's
benchmark sampler shuffles ShareGPT with seed 0 and takes the first prompts that pass its filters, so
the 10 and 40 prompts are the first 10 and 40 of the 320 (their published input totals, 1369 and
8595, are the sums of the first 10 and 40 input lengths the 320-prompt result lists). The outputs
were generated anew in each run (EOS allowed), so their totals differ from run to run.

What this trace keeps exactly: the number of requests and the published total input and output
tokens of each run, by building three strata, rows 0-9, 10-39 and 40-319, whose sums are
(1369, 1945), (8595 - 1369, 7721 - 1945) and (65578 - 8595, 65374 - 7721): replaying the first
10, 40 or 320 rows gives each run's totals (`num_requests` in the claims config).

What it approximates (the per-request lengths are not copied; the result files are not in this
repository): each stratum's lengths are the 320-prompt run's length distribution, given by its
deciles below (read from the result JSON of LL-A100-320), sampled at stratified points
((i + 0.5) / n, linear between deciles) and scaled to the stratum's totals (so the 10-prompt
stratum, whose real prompts are shorter than the 320-run average, keeps the shape but not the
scale of its own distribution); inputs and outputs are paired through a Gaussian copula with the
320-run's Spearman correlation (-0.35); the row order is random (seed 0); zero-length outputs (17 of
the 320-run's) become 1 token (the trace format needs >= 1; those requests then decode one token).
Every request arrives at t = 0, as the client sent them (it does not model the API server's
per-request tokenisation, which staggers their arrival at the engine).

    python experiments/traces/lambdalabs_a100_sharegpt.py   # rewrites the CSV next to this file
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

SOURCE = ("https://github.com/LambdaLabsML/vllm-benchmark/blob/a9b42a5f83bc39976bcb6bd44a96b2b15d820e10/results/"
          "prompt_320/1xA100-80GB-SXM/Meta-Llama-3-8B-Instruct_tp1_len2000.json")
#: Deciles (0, 10, ..., 100th percentile, numpy's linear interpolation) of the 320-prompt run's input_lens and
#: output_lens (SOURCE).
INPUT_DECILES = (4, 10, 16, 27, 45, 77, 178, 305, 391, 611, 933)
OUTPUT_DECILES = (0, 8, 18, 28, 76, 162, 235, 309, 385, 482, 780)
SPEARMAN = -0.35  # Spearman rank correlation of input and output lengths in SOURCE
#: (requests, total input tokens, total output tokens) of rows 0-9, 10-39, 40-319 (vllm.csv totals, differenced).
STRATA = ((10, 1369, 1945), (30, 8595 - 1369, 7721 - 1945), (280, 65578 - 8595, 65374 - 7721))
SEED = 0
OUT = Path(__file__).with_name("lambdalabs_a100_sharegpt.csv")


def stratified(deciles, n: int) -> np.ndarray:
    """n values of the distribution the deciles describe, at quantiles (i + 0.5) / n (ascending)."""
    u = (np.arange(n) + 0.5) / n
    return np.interp(u * 10, np.arange(11), np.asarray(deciles, dtype=float))


def integers_with_sum(x: np.ndarray, total: int) -> np.ndarray:
    """x scaled to sum to total, rounded to integers >= 1 that sum to total exactly (largest remainders)."""
    y = np.maximum(x * (total / x.sum()), 1.0)
    y *= total / y.sum()
    out = np.floor(y).astype(np.int64)
    out[np.argsort(-(y - out), kind="stable")[: total - out.sum()]] += 1
    while (out < 1).any():  # a value floored to 0: take a token from the largest
        out[np.argmin(out)] += 1
        out[np.argmax(out)] -= 1
    return out


def build(seed: int = SEED) -> np.ndarray:
    """rows of (arrival_s, prompt_tokens, output_tokens), 320 of them, strata in order."""
    rng = np.random.default_rng(seed)
    rho = 2 * math.sin(math.pi * SPEARMAN / 6)  # Gaussian copula correlation with that Spearman correlation
    rows = []
    for n, total_in, total_out in STRATA:
        z = rng.multivariate_normal([0.0, 0.0], [[1.0, rho], [rho, 1.0]], size=n)
        ins = integers_with_sum(stratified(INPUT_DECILES, n), total_in)  # ascending before pairing
        outs = integers_with_sum(stratified(OUTPUT_DECILES, n), total_out)
        rank_in = np.argsort(np.argsort(z[:, 0], kind="stable"), kind="stable")
        rank_out = np.argsort(np.argsort(z[:, 1], kind="stable"), kind="stable")
        rows += [(0.0, int(np.sort(ins)[a]), int(np.sort(outs)[b])) for a, b in zip(rank_in, rank_out)]
    return np.array(rows)


def main() -> None:
    rows = build()
    lines = ["arrival_s,prompt_tokens,output_tokens"] + [f"{a:g},{int(p)},{int(o)}" for a, p, o in rows]
    OUT.write_text("\n".join(lines) + "\n")
    for n in (10, 40, 320):
        print(f"first {n:>3}: {int(rows[:n, 1].sum())} input, {int(rows[:n, 2].sum())} output tokens, "
              f"longest request {int((rows[:n, 1] + rows[:n, 2]).max())}")


if __name__ == "__main__":
    main()
