"""`servesim profile --url` against the real servers, when they run (skipped otherwise).

    SERVESIM_VLLM_URL=http://127.0.0.1:8001 SERVESIM_LLAMACPP_URL=http://127.0.0.1:8002 \\
        PYTHONPATH=$PWD /work/venv/bin/python -m pytest -s tests/test_peers_profile.py

(experiments/peers/README.md starts them.) Checks what the black box must find out by itself:
what runs the server, its limits, a profile the simulator loads, and the scheduler figures its
/metrics exports. Timing figures are not asserted here (benchmarks: experiments/peers/run_validation.sh).
"""
from __future__ import annotations

import asyncio
import os
import urllib.error
import urllib.request

import pytest

from sim.core.calibrated import CalibratedCostModel, ServerShapes
from sim.lab.server_metrics import MetricsPoller
from sim.lab.url_profile import UrlGrid, discover, run_url_profile

SERVERS = {"vllm": ("SERVESIM_VLLM_URL", "vllm", 1), "llamacpp": ("SERVESIM_LLAMACPP_URL", "llama.cpp", 1)}
TINY = UrlGrid(prefill_tokens=(16, 128, 512), prefill_repeats=1, decode_batch=(1, 2), decode_context=(16, 272),
               decode_tokens=12, max_probe_tokens=1024, decode_passes=1, mixed_batch=(1,), mixed_prefill=(128,),
               mixed_repeats=1)


def _url(name: str) -> str:
    env, _, _ = SERVERS[name]
    url = os.environ.get(env, "")
    if not url:
        pytest.skip(f"{env} not set")
    try:
        with urllib.request.urlopen(url.rstrip("/").removesuffix("/v1") + "/health", timeout=5):
            pass
    except (urllib.error.URLError, OSError):
        pytest.skip(f"{url} does not answer")
    return url


@pytest.mark.parametrize("name", SERVERS)
def test_the_black_box_profile_of_a_real_server_loads_as_a_server_law(name, tmp_path):
    url = _url(name)
    _, kind, pad = SERVERS[name]
    info = discover(url)
    assert info.kind == kind and info.context and info.context >= 1024
    assert info.context_pad == pad
    run_url_profile(url, tmp_path / "p.csv", grid=TINY, vocab_size=32000, preset="small-100m", echo=print)
    law = CalibratedCostModel.from_profile(tmp_path / "p.csv", check_model=False)
    assert isinstance(law.padding, ServerShapes) and law.padding.context_pad == pad
    assert set(law.decode_table_s) == {1, 2}
    assert law.metadata["server"] == kind and float(law.metadata["request_overhead_ms"]) >= 0


@pytest.mark.parametrize("name", SERVERS)
def test_the_servers_export_the_scheduler_figures_the_checks_compare(name):
    url = _url(name)
    poller = MetricsPoller(url.rstrip("/") + "/v1", 0.1)

    async def once():
        t = asyncio.create_task(poller.run(lambda: 0.0))
        await poller.started.wait()
        poller.stop()
        await t

    asyncio.run(once())
    sample = poller.samples[0][1]
    wanted = {"vllm": ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                       "vllm:num_preemptions_total", "vllm:iteration_tokens_total_count"),
              "llamacpp": ("llamacpp:requests_processing", "llamacpp:requests_deferred", "llamacpp:n_decode_total",
                           "llamacpp:n_busy_slots_per_decode", "llamacpp:prompt_tokens_cached_total")}[name]
    assert set(wanted) <= set(sample), sorted(set(wanted) - set(sample))
