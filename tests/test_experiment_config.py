"""sim.lab.experiment: the TOML schema, its defaults, its errors (full key path + what is allowed), round trips."""
from __future__ import annotations

import math
import re
import tomllib

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from reference.config import get_preset
from reference.errors import ConfigError
from sim.lab.experiment import (Cell, ContinuousEngine, Experiment, OrcaEngine, SequentialEngine, StaticEngine,
                                dumps_toml, json_schema, load_experiment)

CLOSED_LOOP = """
name = "cpu_tiny_sequential_vs_continuous"
description = "Ollama-style sequential slots vs vLLM-style continuous batching on the tiny model"
seed = 0
model = "tiny"
dtype = "float32"

[workload]
kind = "closed_loop"
clients = [1, 4, 16, 64]
think_time_s = 0.0
requests_per_client = 4
timeout_s = 0

[workload.prompt_tokens]
dist = "fixed"
value = 100

[workload.output_tokens]
dist = "fixed"
value = 200

[workload.shared_prefix]
fraction = 0.5
tokens = 64

[engines.ollama]
scheduler = "sequential"
num_parallel = 1
num_ctx = 2048
max_queue = 512
weights = "gguf-q4_k_m"

[engines.vllm]
scheduler = "continuous"
block_size = 16
max_num_seqs = 256
max_num_batched_tokens = 2048
enable_chunked_prefill = true
enable_prefix_caching = true
gpu_memory_utilization = 0.9
max_model_len = 2048
weights = "fp16"
kv_dtype = "fp16"
num_blocks = 0

[hardware]
preset = "cpu-generic"
replicas = 1
router = "round_robin"
tp = 1

[cost_model]
kind = "calibrated"
profile = "calibration/cpu_tiny.csv"

[slo]
ttft_ms = 500
tpot_ms = 50
"""

POISSON = """
name = "h100_llama8b_rates"
model = "llama-3.1-8b"
seed = 3
dtype = "bfloat16"  # the reference engine's 1 GiB pool then holds 8192 tokens: one max_model_len request fits

[workload]
kind = "gamma"
rates = [1.0, 4.0, 16.0, inf]
burstiness = 0.5
num_requests = 1000
max_concurrency = 256

[workload.prompt_tokens]
dist = "lognormal"
mean = 600.0
sigma = 0.8
max = 4096

[workload.output_tokens]
dist = "empirical"
values = [16, 128, 512]
weights = [0.2, 0.5, 0.3]

[engines.vllm]
scheduler = "continuous"
max_model_len = 8192
max_num_batched_tokens = 8192

[engines.orca_max]
scheduler = "orca"
max_model_len = 8192

[engines.orca_oracle]
scheduler = "orca"
reservation = "request"
max_model_len = 8192

[engines.ft]
scheduler = "static"
max_batch_size = 32
max_model_len = 8192

[hardware]
tp = 2
router = "least_outstanding"
replicas = 4

[published]
source = "article A"
vllm = { tok_s = [510, 1100, 1450], concurrency = [1, 8, 32] }
"""

MINIMAL = """
model = "tiny"
[workload]
kind = "poisson"
rates = 2.0
duration_s = 60
[workload.prompt_tokens]
dist = "uniform"
low = 10
high = 100
[workload.output_tokens]
dist = "fixed"
value = 20
[engines.ollama]
scheduler = "sequential"
[engines.vllm]
scheduler = "continuous"
"""


@pytest.mark.parametrize("text", [CLOSED_LOOP, POISSON, MINIMAL])
def test_round_trip(text):
    exp = load_experiment(text)
    again = load_experiment(exp.to_toml())
    assert again == exp
    assert again.to_dict() == exp.to_dict()
    assert tomllib.loads(exp.to_toml()) == exp.to_dict()


def test_cells_engine_major_in_toml_order():
    exp = load_experiment(CLOSED_LOOP)
    assert exp.cells()[:5] == [Cell("ollama", 1), Cell("ollama", 4), Cell("ollama", 16), Cell("ollama", 64),
                               Cell("vllm", 1)]
    assert len(exp.cells()) == 8
    rates = load_experiment(POISSON).cells()
    assert [c.request_rate for c in rates[:4]] == [1.0, 4.0, 16.0, math.inf]
    assert rates[3].label == "vllm@rate=inf" and rates[3].load == math.inf
    assert load_experiment(MINIMAL).cells() == [Cell("ollama", request_rate=2.0), Cell("vllm", request_rate=2.0)]


def test_defaults_are_the_real_engines_defaults():
    # vLLM's default max_model_len (131072) needs 17 GB of KV for one request: an H100 holds it (the reference
    # engine's 1 GiB pool would not, and vLLM would refuse to start).
    exp = load_experiment(MINIMAL.replace('model = "tiny"', 'model = "llama-3.1-8b"') + '[hardware]\npreset = "h100-sxm"\n')
    ollama, vllm = exp.engine("ollama"), exp.engine("vllm")
    assert isinstance(ollama, SequentialEngine)
    assert (ollama.num_parallel, ollama.max_queue, ollama.num_ctx, ollama.n_batch, ollama.n_ubatch) == \
        (1, 512, 4096, 2048, 512)
    assert ollama.weights == "gguf-q4_k_m" and ollama.weight_bits == 4.85
    assert isinstance(vllm, ContinuousEngine)
    assert (vllm.block_size, vllm.max_num_seqs, vllm.max_num_batched_tokens, vllm.gpu_memory_utilization) == \
        (16, 256, 2048, 0.9)
    assert vllm.enable_chunked_prefill and vllm.enable_prefix_caching and vllm.max_queue == 0
    assert vllm.max_model_len == 131072  # vLLM: the model's context length
    # tiny's context is 2048: Ollama's 4096 default is capped, vLLM's follows the model
    tiny = load_experiment(MINIMAL)
    assert tiny.engine("ollama").num_ctx == 2048 and tiny.engine("vllm").max_model_len == 2048
    assert (tiny.seed, tiny.dtype, tiny.name, tiny.workload.timeout_s) == (0, "float32", "experiment", 0.0)


def test_orca_and_static_defaults():
    exp = load_experiment(POISSON)
    orca = exp.engine("orca_max")
    assert isinstance(orca, OrcaEngine) and orca.reservation == "max_model_len"
    assert not orca.enable_chunked_prefill and not hasattr(orca, "enable_prefix_caching")
    assert orca.max_num_batched_tokens == 8192  # max(2048, max_model_len) without chunked prefill
    assert exp.engine("orca_oracle").reservation == "request"
    ft = exp.engine("ft")
    assert isinstance(ft, StaticEngine) and ft.reserve_max_len and ft.max_batch_size == 32
    assert ft.kv_capacity_tokens == 0 and ft.max_model_len == 8192
    assert exp.hardware.tp == 2 and exp.published["vllm"]["concurrency"] == [1, 8, 32]


def test_load_from_file_relative_trace(tmp_path):
    (tmp_path / "traces").mkdir()
    (tmp_path / "traces" / "t.csv").write_text("arrival_s,prompt_tokens,output_tokens\n0,10,5\n1,12,6\n")
    cfg = tmp_path / "my_exp.toml"
    cfg.write_text('model = "tiny"\n[workload]\nkind = "trace"\npath = "traces/t.csv"\n'
                   '[engines.v]\nscheduler = "continuous"\n')
    exp = load_experiment(cfg)
    assert exp.name == "my_exp" and exp.source == str(cfg)
    assert exp.workload.path == str((tmp_path / "traces" / "t.csv").resolve())
    assert load_experiment(str(cfg)) == exp
    assert load_experiment(exp.to_toml()) == exp


def err(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        load_experiment(text)
    return e.value


@pytest.mark.parametrize("old,new,field,allowed", [
    # unknown keys, with the allowed ones listed
    ("max_num_seqs = 256", "max_num_seq = 256", "engines.vllm.max_num_seq", "max_num_seqs"),
    ('dtype = "float32"', 'dtype = "float32"\nseeds = 1', "seeds", "seed"),
    ("think_time_s = 0.0", "think_time = 0.0", "workload.think_time", "think_time_s"),
    ("tokens = 64", "tokens = 64\nlength = 3", "workload.shared_prefix.length", "num_prefixes"),
    ("tp = 1", "tp = 1\ngpus = 2", "hardware.gpus", "replicas"),
    ("tpot_ms = 50", "tpot_ms = 50\nitl_ms = 5", "slo.itl_ms", "e2el_ms"),
    ("num_parallel = 1", "num_parallel = 1\nblock_size = 16", "engines.ollama.block_size", "num_ctx"),
    ('kind = "closed_loop"', 'kind = "closed_loop"\nrates = [1.0]', "workload.rates", "clients"),
    # wrong types
    ("max_num_seqs = 256", 'max_num_seqs = "256"', "engines.vllm.max_num_seqs", "integers >= 1"),
    ("enable_prefix_caching = true", 'enable_prefix_caching = true\nreservation = "request"',
     "engines.vllm.reservation", "enable_prefix_caching"),  # Orca's key, not vLLM's
    ("max_num_seqs = 256", "max_num_seqs = 256.0", "engines.vllm.max_num_seqs", "integers >= 1"),
    ("num_parallel = 1", "num_parallel = true", "engines.ollama.num_parallel", "integers >= 1"),
    ("enable_prefix_caching = true", "enable_prefix_caching = 1", "engines.vllm.enable_prefix_caching", "true"),
    ("seed = 0", 'seed = "zero"', "seed", "integers >= 0"),
    ("clients = [1, 4, 16, 64]", 'clients = ["one"]', "workload.clients[0]", "integers >= 1"),
    ("[workload.output_tokens]", "[workload.output_tokens.x]", "workload.output_tokens.dist", "fixed | uniform"),
    # impossible values
    ("num_parallel = 1", "num_parallel = 0", "engines.ollama.num_parallel", "integers >= 1"),
    ("max_model_len = 2048", "max_model_len = 8", "engines.vllm.block_size", "powers of two <= 8"),
    ("block_size = 16", "block_size = 24", "engines.vllm.block_size", "1, 2, 4, 8, 16"),
    ("max_num_batched_tokens = 2048\nenable_chunked_prefill = true",
     "max_num_batched_tokens = 1024\nenable_chunked_prefill = false", "engines.vllm.max_num_batched_tokens",
     "integers >= 2048, or enable_chunked_prefill"),
    ("max_num_batched_tokens = 2048", "max_num_batched_tokens = 128", "engines.vllm.max_num_batched_tokens",
     "integers >= 256"),
    ("gpu_memory_utilization = 0.9", "gpu_memory_utilization = 1.5", "engines.vllm.gpu_memory_utilization",
     "numbers > 0 and <= 1"),
    ("num_blocks = 0", "num_blocks = 4", "engines.vllm.num_blocks", ">= 128"),
    ("num_ctx = 2048", "num_ctx = 4096", "engines.ollama.num_ctx", "integers 1..2048"),
    ("max_model_len = 2048", "max_model_len = 100000", "engines.vllm.max_model_len", "integers 1..2048"),
    ('max_queue = 512', 'max_queue = -1', "engines.ollama.max_queue", "integers >= 0"),
    ('weights = "fp16"', 'weights = "fp12"', "engines.vllm.weights", "gguf-q4_k_m"),
    ('kv_dtype = "fp16"', 'kv_dtype = "int3"', "engines.vllm.kv_dtype", "q8_0"),
    ('scheduler = "continuous"', 'scheduler = "magic"', "engines.vllm.scheduler",
     "sequential | static | continuous | orca"),
    ('scheduler = "continuous"', 'reserve = "max"', "engines.vllm.scheduler", "sequential | static"),
    ('kind = "closed_loop"', 'kind = "open"', "workload.kind", "closed_loop | poisson | gamma | trace"),
    ("clients = [1, 4, 16, 64]", "clients = [1, 4, 4]", "workload.clients", "distinct"),
    ("clients = [1, 4, 16, 64]", "clients = []", "workload.clients", "integers >= 1"),
    ("requests_per_client = 4", "requests_per_client = 4\nnum_requests = 100", "workload.requests_per_client",
     "num_requests"),
    ("requests_per_client = 4", "num_requests = 10", "workload.num_requests", "integers >= 64"),
    ("fraction = 0.5", "fraction = 1.5", "workload.shared_prefix.fraction", "<= 1"),
    ("value = 100", "value = 0", "workload.prompt_tokens.value", "integers >= 1"),
    ("value = 200", "value = 2000", "workload.prompt_tokens", "requests of at most 2048 tokens"),
    ("timeout_s = 0", "timeout_s = -1", "workload.timeout_s", "numbers >= 0"),
    ('model = "tiny"', 'model = "gpt-5"', "model", "llama-3.1-8b"),
    ('dtype = "float32"', 'dtype = "fp8"', "dtype", "float32 | bfloat16 | float16"),
    ('router = "round_robin"', 'router = "random"', "hardware.router", "round_robin | least_outstanding"),
    ("tp = 1", "tp = 3", "hardware.tp", "1, 2, 4"),
    ('kind = "calibrated"', 'kind = "magic"', "cost_model.kind", "roofline | calibrated"),
    ("ttft_ms = 500", "ttft_ms = 0", "slo.ttft_ms", "numbers > 0"),
])
def test_errors_name_key_path_and_allowed(old, new, field, allowed):
    assert old in CLOSED_LOOP, old
    e = err(CLOSED_LOOP.replace(old, new, 1))
    assert e.field == field, str(e)
    assert allowed in (e.allowed or ""), str(e)
    assert str(e).startswith(f"{field}: ")


@pytest.mark.parametrize("old,new,field,allowed", [
    ("burstiness = 0.5", "burstiness = 0", "workload.burstiness", "numbers > 0"),
    ('kind = "gamma"', 'kind = "poisson"', "workload.burstiness", "rates, num_requests"),  # not for poisson
    ("num_requests = 1000", "duration_s = 10.0", "workload.num_requests", "integers >= 1"),  # rate inf
    ("rates = [1.0, 4.0, 16.0, inf]", "rates = [1.0, -4.0]", "workload.rates[1]", "numbers > 0"),
    ("max = 4096", "max = 0", "workload.prompt_tokens.max", "integers >= 1"),
    ("mean = 600.0", "median = 600.0\nmean = 600.0", "workload.prompt_tokens.mean", "mean = <tokens> or median"),
    ("weights = [0.2, 0.5, 0.3]", "weights = [0.2, 0.5]", "workload.output_tokens.weights", "one number >= 0"),
    ('reservation = "request"', 'reservation = "none"', "engines.orca_oracle.reservation", "max_model_len | request"),
    ("max_batch_size = 32", "max_batch_size = 0", "engines.ft.max_batch_size", "integers >= 1"),
    ("max_batch_size = 32", "max_batch_size = 32\nkv_capacity_tokens = 100", "engines.ft.kv_capacity_tokens",
     "integers >= 8192"),
    ("max_batch_size = 32", "max_batch_size = 32\nreserve_max_len = 1", "engines.ft.reserve_max_len", "true | false"),
    ("max_concurrency = 256", "max_concurrency = 1.5", "workload.max_concurrency", "integers >= 0"),
])
def test_open_loop_errors(old, new, field, allowed):
    assert old in POISSON, old
    e = err(POISSON.replace(old, new, 1))
    assert e.field == field, str(e)
    assert allowed in (e.allowed or ""), str(e)


def test_structural_errors():
    assert err("model = ").field == "experiment"  # not TOML
    assert "did you mean 'max_num_seqs'" in str(err(CLOSED_LOOP.replace("max_num_seqs =", "max_num_seq =")))
    e = err(MINIMAL.replace('model = "tiny"', ""))
    assert e.field == "model"
    e = err(MINIMAL.split("[engines.ollama]")[0])
    assert e.field == "engines" and "at least one engine" in str(e)
    e = err(MINIMAL.replace("[workload.output_tokens]\ndist = \"fixed\"\nvalue = 20\n", ""))
    assert e.field == "workload.output_tokens" and "required" in str(e)
    e = err(MINIMAL.replace("duration_s = 60", ""))
    assert e.field == "workload.num_requests" and "duration_s" in e.allowed
    e = err(MINIMAL.replace('scheduler = "sequential"', ""))
    assert e.field == "engines.ollama.scheduler" and "required" in str(e)
    e = err(MINIMAL + '[engines.bad]\nscheduler = "continuous"\n'.replace("bad", '"has space"'))
    assert e.field == "engines.has space.name"
    with pytest.raises(ConfigError, match="^experiment: cannot read"):
        load_experiment("/no/such/file.toml")


def test_python_construction_validates_too():
    with pytest.raises(ValueError, match="num_parallel"):
        SequentialEngine(name="o", num_parallel=0)
    with pytest.raises(ValueError, match="n_ubatch"):
        SequentialEngine(name="o", n_batch=256, n_ubatch=512)
    e = ContinuousEngine(name="v")
    assert e.max_model_len is None and e.max_num_batched_tokens is None  # resolved by an Experiment
    exp = load_experiment(MINIMAL)
    built = Experiment(name="x", model="tiny", workload=exp.workload, engines=(e,))
    assert built.engines[0].max_model_len == 2048 and built.engines[0].max_num_batched_tokens == 2048
    with pytest.raises(ConfigError, match="^engines.v.max_model_len"):
        Experiment(name="x", model="tiny", workload=exp.workload, engines=(ContinuousEngine(name="v",
                                                                                          max_model_len=4096),))


def test_dumps_toml_quotes_and_specials():
    doc = {"a": 1.5, "b": math.inf, "c": "q\"x", "t": {"odd key": [1, "two", True], "empty": {}},
           "n": None}
    assert tomllib.loads(dumps_toml(doc)) == {"a": 1.5, "b": math.inf, "c": "q\"x",
                                              "t": {"odd key": [1, "two", True], "empty": {}}}


def test_json_schema_describes_the_file():
    """Engines keyed by name, each kind a schema of its own keys (no `name`), unknown keys refused."""
    schema = json_schema()
    engines = schema["properties"]["engines"]
    assert engines["type"] == "object" and "additionalProperties" in engines
    continuous = schema["$defs"]["ContinuousEngine"]
    assert "name" not in continuous["properties"] and continuous["additionalProperties"] is False
    assert continuous["properties"]["scheduler"]["const"] == "continuous"
    assert {"sequential", "static", "continuous", "orca"} <= {
        d["properties"]["scheduler"].get("const") for k, d in schema["$defs"].items() if k.endswith("Engine")}


def test_module_docstring_example_is_valid():
    import sim.lab.experiment as m

    doc = m.__doc__
    lines = doc[doc.index("    name = "):doc.index("\nEngine defaults")].splitlines()
    text = "\n".join(line[4:] for line in lines)
    exp = load_experiment(text)
    assert [e.name for e in exp.engines] == ["ollama", "vllm", "orca_max", "ft"]
    assert exp.hardware.preset == "h100-sxm" and exp.slo.ttft_ms == 500.0


# ---------------------------------------------------------------------------------------
# Memory plans refuse what the real engines refuse at start-up

def _one_engine(table: str, hardware: str | None, model: str = "llama-3.1-8b", extra: str = "") -> str:
    hw = f'[hardware]\npreset = "{hardware}"\n' if hardware else ""
    return (f'model = "{model}"\n{extra}\n[workload]\nkind = "closed_loop"\nclients = [1]\nrequests_per_client = 1\n'
            '[workload.prompt_tokens]\ndist = "fixed"\nvalue = 1\n[workload.output_tokens]\ndist = "fixed"\n'
            f'value = 1\n[engines.e]\n{table}\n{hw}')


def _largest(e: ConfigError, key: str) -> int:
    """The largest value of key the error says would fit ('key <= N' in its allowed text)."""
    m = re.search(rf"{key} <= (\d+)", e.allowed or "")
    assert m, str(e)
    return int(m.group(1))


def test_vllm_default_context_on_a_24gb_card_is_refused_with_the_largest_that_fits():
    """Issue example: Llama-3.1-8B FP16 on a 24 GB card, max_model_len = 131072 (the default): one sequence
    needs 17 GB of KV; vLLM refuses ("The model's max seq len (131072) is larger than ...")."""
    e = err(_one_engine('scheduler = "continuous"', "rtx-4090"))
    assert e.field == "engines.e.max_model_len" and "(131072)" in e.message and "vLLM refuses" in e.message
    most = _largest(e, "max_model_len")
    assert 0 < most < 131072 and most % 16 == 0
    ok = load_experiment(_one_engine(f'scheduler = "continuous"\nmax_model_len = {most}', "rtx-4090"))
    assert ok.plan(ok.engines[0]).kv_capacity_tokens == most  # exactly the pool
    assert err(_one_engine(f'scheduler = "continuous"\nmax_model_len = {most + 1}', "rtx-4090")).field == \
        "engines.e.max_model_len"
    # 17 GB of KV beside 16 GB of weights fit a 24 GB card at no gpu_memory_utilization: none is suggested
    assert "gpu_memory_utilization" not in e.allowed


def test_vllm_8192_context_over_a_4096_token_pool_is_refused():
    """Issue example: max_model_len 8192 over a 4,096-token pool (the reference engine's 1 GiB pool of float32
    Llama-3.1-8B K/V) was run with 186 preemptions; vLLM refuses to start."""
    e = err(_one_engine('scheduler = "continuous"\nmax_model_len = 8192', None))
    assert e.field == "engines.e.max_model_len" and "(4096" in e.message
    assert _largest(e, "max_model_len") == 4096 and "num_blocks >= 513" in e.allowed
    load_experiment(_one_engine('scheduler = "continuous"\nmax_model_len = 4096', None))
    load_experiment(_one_engine('scheduler = "continuous"\nmax_model_len = 8192\nnum_blocks = 513', None))
    # On a device: the utilization that leaves exactly one 8192-token request's KV is named too.
    e = err(_one_engine('scheduler = "orca"\nmax_model_len = 8192\ngpu_memory_utilization = 0.72', "rtx-4090"))
    assert e.field == "engines.e.max_model_len"
    u = float(re.search(r"gpu_memory_utilization >= ([0-9.]+)", e.allowed).group(1))
    load_experiment(_one_engine(f'scheduler = "orca"\nmax_model_len = 8192\ngpu_memory_utilization = {u}',
                                "rtx-4090"))


def test_weights_that_do_not_fit_name_the_formats_and_tp_that_would():
    e = err(_one_engine('scheduler = "continuous"\nmax_model_len = 4096\nweights = "fp16"', "h100-sxm",
                        model="llama-3.1-70b"))
    assert e.field == "engines.e.weights" and "141" in e.message  # 141 GB of FP16 weights, 80 GB card
    assert "weights = " in e.allowed and "fp8" in e.allowed and "fp16" not in e.allowed.split("weights = ")[1]
    assert "[hardware] tp = 2" in e.allowed
    load_experiment(_one_engine('scheduler = "continuous"\nmax_model_len = 4096\nweights = "fp8"', "h100-sxm",
                                model="llama-3.1-70b"))
    e = err(_one_engine('scheduler = "continuous"\nmax_model_len = 2048\ngpu_memory_utilization = 0.5',
                        "rtx-4090"))
    assert e.field == "engines.e.gpu_memory_utilization" and "No available memory" in e.message


def test_ollama_slots_that_do_not_fit_name_num_parallel_and_num_ctx():
    table = 'scheduler = "sequential"\nnum_parallel = 8\nnum_ctx = 8192'
    e = err(_one_engine(table, "rtx-a6000", model="llama-3.1-70b"))  # 42.8 GB of Q4_K_M weights on 48 GiB
    assert e.field == "engines.e.num_parallel" and "llama.cpp fails to allocate its KV buffer" in e.message
    slots, ctx = _largest(e, "num_parallel"), _largest(e, "num_ctx")
    assert 0 < slots < 8 and 0 < ctx < 8192
    load_experiment(_one_engine(f'scheduler = "sequential"\nnum_parallel = {slots}\nnum_ctx = 8192', "rtx-a6000",
                                model="llama-3.1-70b"))
    load_experiment(_one_engine(f'scheduler = "sequential"\nnum_parallel = 8\nnum_ctx = {ctx}', "rtx-a6000",
                                model="llama-3.1-70b"))
    assert err(_one_engine(f'scheduler = "sequential"\nnum_parallel = {slots + 1}\nnum_ctx = 8192', "rtx-a6000",
                           model="llama-3.1-70b")).field == "engines.e.num_parallel"
    assert err(_one_engine(f'scheduler = "sequential"\nnum_parallel = 8\nnum_ctx = {ctx + 1}', "rtx-a6000",
                           model="llama-3.1-70b")).field == "engines.e.num_parallel"


_REFUSAL_KEYS = {"max_model_len", "weights", "gpu_memory_utilization", "num_parallel", "num_ctx", "max_batch_size",
                 "max_num_batched_tokens", "n_ubatch"}


@settings(max_examples=80, deadline=None)
@given(kind=st.sampled_from(["continuous", "orca", "static", "sequential"]),
       model=st.sampled_from(["llama-3.1-8b", "llama-3.1-70b", "llama-2-13b", "mistral-7b-v0.3"]),
       hardware=st.sampled_from(["rtx-4090", "l4", "a100-40gb", "a100-80gb", "h100-sxm", "rtx-a6000", "b200"]),
       weights=st.sampled_from(["fp16", "fp8", "gguf-q4_k_m", "gguf-q8_0"]),
       utilization=st.floats(0.3, 1.0), context=st.integers(16, 131072), slots=st.integers(1, 16),
       batch=st.integers(1, 8))
def test_every_config_the_simulator_accepts_fits_its_device(kind, model, hardware, weights, utilization, context,
                                                            slots, batch):
    """Accepted: weights, activations and KV fit the device (the utilization's share of it for vLLM-style
    engines) and one request of the engine's full context fits its KV. Refused: the error names a key, and the
    largest max_model_len it names is accepted."""
    context = min(context, get_preset(model).max_position)
    if kind == "sequential":
        table = f'scheduler = "sequential"\nnum_parallel = {slots}\nnum_ctx = {context}'
    elif kind == "static":
        table = (f'scheduler = "static"\nmax_batch_size = {batch}\nmax_model_len = {context}\n'
                 f'gpu_memory_utilization = {utilization}')
    else:
        table = f'scheduler = "{kind}"\nmax_model_len = {context}\ngpu_memory_utilization = {utilization}'
    table += f'\nweights = "{weights}"'
    try:
        exp = load_experiment(_one_engine(table, hardware, model))
    except ConfigError as e:
        assert e.field.startswith("engines.e.") and e.field.split(".")[-1] in _REFUSAL_KEYS, str(e)
        assert e.allowed, str(e)
        if e.field == "engines.e.max_model_len" and kind != "static":
            most = _largest(e, "max_model_len")
            load_experiment(_one_engine(table.replace(f"max_model_len = {context}", f"max_model_len = {most}"),
                                        hardware, model))
        return
    plan = exp.plan(exp.engines[0])
    engine = exp.engines[0]
    assert plan.capacity_bytes > 0
    if kind == "sequential":
        assert plan.total_bytes <= plan.capacity_bytes
        assert plan.kv_capacity_tokens == slots * min(context, exp.model_spec.max_position)
    else:
        assert plan.total_bytes <= plan.capacity_bytes * utilization
        assert plan.kv_capacity_tokens >= engine.max_model_len  # one request of the full context fits
