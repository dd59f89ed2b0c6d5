"""Prometheus metrics, named as vLLM names them with a `levante:` prefix.

Latency histograms and token counters are recorded per request by the serving layer;
queue, running and KV-cache gauges are read from the engines at scrape time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from levante.engine.llm_engine import EngineStats

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, EngineStats]]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        running = GaugeMetricFamily("levante:num_requests_running", "Requests in the running batch.", labels=["model_name"])
        waiting = GaugeMetricFamily("levante:num_requests_waiting", "Requests waiting to be scheduled.", labels=["model_name"])
        usage = GaugeMetricFamily("levante:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", labels=["model_name"])
        waste = GaugeMetricFamily("levante:kv_cache_waste_perc", "Fraction of held KV slots holding no token.", labels=["model_name"])
        hits = GaugeMetricFamily("levante:prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens.", labels=["model_name"])
        preempt = GaugeMetricFamily("levante:num_preemptions", "Sequences preempted since start.", labels=["model_name"])
        for name, s in self._stats().items():
            running.add_metric([name], s.num_running)
            waiting.add_metric([name], s.num_waiting)
            usage.add_metric([name], s.kv_usage)
            waste.add_metric([name], s.kv_waste)
            hits.add_metric([name], s.prefix_cache_hit_rate)
            preempt.add_metric([name], s.num_preemptions)
        return [running, waiting, usage, waste, hits, preempt]


class Metrics:
    """One registry per app (no global state), so tests and several apps in one process stay apart."""

    def __init__(self, engine_stats: Callable[[], dict[str, EngineStats]]) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.ttft = Histogram(
            "levante:time_to_first_token_seconds", "Time to first token.", labels, buckets=_LATENCY_BUCKETS, registry=self.registry
        )
        self.itl = Histogram(
            "levante:inter_token_latency_seconds", "Time between output tokens.", labels, buckets=_LATENCY_BUCKETS, registry=self.registry
        )
        self.e2e = Histogram(
            "levante:e2e_request_latency_seconds", "Request latency, arrival to last token.", labels, buckets=_E2E_BUCKETS, registry=self.registry
        )
        self.queue_time = Histogram(
            "levante:request_queue_time_seconds", "Time waiting before first scheduled.", labels, buckets=_E2E_BUCKETS, registry=self.registry
        )
        self.prompt_tokens = Counter("levante:prompt_tokens", "Prompt tokens processed.", labels, registry=self.registry)
        self.generation_tokens = Counter("levante:generation_tokens", "Tokens generated.", labels, registry=self.registry)
        self.request_success = Counter(
            "levante:request_success", "Finished requests by finish reason.", [*labels, "finished_reason"], registry=self.registry
        )
        self.http_requests = Counter(
            "levante:http_requests", "HTTP requests by route family and status.", ["route", "status"], registry=self.registry
        )
        self.registry.register(_EngineCollector(engine_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)
