"""/metrics through prometheus_client, under vLLM's metric names (and servesim's own, prefixed servesim:).

One CollectorRegistry per app (tests run several servers in one process). The engine thread
updates the counters and histograms as it steps (prometheus_client's metrics are thread-safe);
the gauges and the preemption count are read from the scheduler when /metrics is scraped.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# vLLM's histogram buckets (s).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _SchedulerCollector:
    """Gauges and the preemption counter, read from the engine at scrape time."""

    def __init__(self, loop, model: str):
        self.loop, self.model = loop, model

    def collect(self):
        running, waiting, kv = self.loop.gauges
        lab = ["model_name"]
        for name, doc, value in (("vllm:num_requests_running", "Requests in the running batch.", running),
                                 ("vllm:num_requests_waiting", "Requests waiting (queued or preempted).", waiting),
                                 ("vllm:kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent.", kv),
                                 ("servesim:compilations_startup", "Step shapes compiled before serving.",
                                  self.loop.startup_compilations),
                                 ("servesim:compile_startup_seconds", "Seconds spent compiling before serving.",
                                  self.loop.startup_compile_s),
                                 ("servesim:ready", "1 once every step shape is compiled and the engine serves.",
                                  int(self.loop.ready))):
            g = GaugeMetricFamily(name, doc, labels=lab)
            g.add_metric([self.model], value)
            yield g
        for name, doc, value in (("vllm:num_preemptions", "Preemptions (recompute).",
                                  self.loop.scheduler.num_preemptions),
                                 ("servesim:engine_steps", "Engine steps run.", self.loop.steps),
                                 ("servesim:engine_step_seconds", "Seconds the engine thread spent in its steps "
                                  "(schedule, model, update).", self.loop.step_s),
                                 ("servesim:engine_idle_seconds", "Seconds the engine thread waited for work.",
                                  self.loop.idle_now_s)):
            c = CounterMetricFamily(name, doc, labels=lab)
            c.add_metric([self.model], value)
            yield c


class ServerMetrics:
    """The counters and histograms the engine thread updates, and the exposition of all of them."""

    def __init__(self, model: str):
        self.model = model
        self.registry = CollectorRegistry(auto_describe=True)
        r, lab = self.registry, ["model_name"]
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of requests that were prefilled.", lab,
                                     registry=r).labels(model)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens.", lab, registry=r).labels(model)
        self._success = Counter("vllm:request_success", "Requests that finished normally.",
                                lab + ["finished_reason"], registry=r)
        self._refused = Counter("servesim:request_refused", "Requests refused (503 busy, 400 invalid).",
                                lab + ["reason"], registry=r)
        for why in ("stop", "length"):
            self._success.labels(model, why)
        for why in ("busy", "invalid"):
            self._refused.labels(model, why)
        self.aborted = Counter("servesim:request_aborted", "Requests aborted (client disconnect, shutdown).", lab,
                               registry=r).labels(model)
        self.errors = Counter("servesim:request_error", "Requests failed by an engine error.", lab,
                              registry=r).labels(model)
        self.serving_compilations = Counter(
            "servesim:compilations_serving", "Step shapes compiled while serving (a request waited for each).", lab,
            registry=r).labels(model)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token (s).", lab,
                              buckets=TTFT_BUCKETS, registry=r).labels(model)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end latency of finished requests (s).", lab,
                             buckets=E2E_BUCKETS, registry=r).labels(model)

    def success(self, reason: str) -> None:
        """A request finished normally ("stop" or "length")."""
        self._success.labels(self.model, reason).inc()

    def refused(self, reason: str) -> None:
        """A request was refused ("busy" or "invalid")."""
        self._refused.labels(self.model, reason).inc()

    def watch(self, loop) -> None:
        """Add the gauges read from loop (an EngineLoop) at scrape time."""
        self.registry.register(_SchedulerCollector(loop, self.model))

    def exposition(self) -> bytes:
        """The /metrics body (Prometheus text format 0.0.4)."""
        return generate_latest(self.registry)
