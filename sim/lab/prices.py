"""Default prices per GPU-hour for the capacity planner (`servesim plan`), with their source and date.

One consistent source for every card it prices: RunPod's Secure Cloud (its own data centres, on demand,
per-second billing), runpod.io/pricing as read on 2026-09-25, transcribed row by row with that URL and
date in the public dataset tgarg01/silybench-data (derived/csv/gpu_prices.csv). Secure Cloud is what a
production endpoint would rent. The same list shows the spread between providers for one card, larger
than most differences between configurations: an H100 SXM is $2.69 per GPU-hour on RunPod's Community
Cloud, $4.29 on Lambda (1x), and $10.98 on GCP (a3-highgpu-1g on demand, GPU + vCPU + RAM); an RTX 4090
$0.34 on Community Cloud. Override with your own rates ([prices] in the plan file, or
`--price PRESET=USD`). Cards that list does not price have no default; a plan that uses one must give
its price.
"""
from __future__ import annotations

from reference.errors import ConfigError
from sim.core.hardware import HARDWARE

PRICE_SOURCE = ("RunPod Secure Cloud on-demand list prices, runpod.io/pricing, read 2026-09-25; transcribed in "
                "tgarg01/silybench-data, derived/csv/gpu_prices.csv")
PRICE_DATE = "2026-09-25"

#: USD per GPU-hour by hardware preset (sim.core.hardware), from PRICE_SOURCE.
GPU_HOUR_USD: dict[str, float] = {
    "h100-sxm": 3.49,
    "h100-pcie": 2.89,
    "h100-nvl": 3.19,
    "h200": 4.59,
    "b200": 6.79,
    "a100-sxm-80gb": 1.59,
    "a100-80gb": 1.59,  # the same SXM 80GB card under its short name
    "a100-pcie-80gb": 1.59,
    "l40s": 1.09,
    "rtx-4090": 0.74,
}
assert set(GPU_HOUR_USD) <= set(HARDWARE)


def price_per_gpu_hour(preset: str, overrides: dict[str, float] | None = None, field: str = "prices") -> tuple[float, str]:
    """(USD per GPU-hour, where it comes from) for a hardware preset: an override if given, else the default.

    ConfigError naming `field`.<preset> when neither exists."""
    if overrides and preset in overrides:
        return float(overrides[preset]), "given"
    if preset in GPU_HOUR_USD:
        return GPU_HOUR_USD[preset], f"default ({PRICE_SOURCE})"
    raise ConfigError(f"{field}.{preset}", f"no default price for {preset} (the defaults come from one list, "
                      f"{PRICE_SOURCE}, which does not price it)",
                      f"a price in USD per GPU-hour, e.g. [prices] \"{preset}\" = 1.0; defaults exist for "
                      + ", ".join(GPU_HOUR_USD))
