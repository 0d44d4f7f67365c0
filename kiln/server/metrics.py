"""Prometheus metrics for `GET /metrics`, named like vLLM's (`kiln:` for `vllm:`) so dashboards carry over.

Engine gauges and counters are read from the engine at scrape time; per-request latencies are observed by
the server as deltas stream out. Each server has its own registry, so several can live in one process.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kiln.engine.engine import Engine
from kiln.engine.outputs import RequestOutput

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds. Wide enough for a 2-core laptop and an H100 alike.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.2, 0.4, 1, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1, 1.5, 2, 2.5, 5, 10, 15, 20, 30, 40, 50, 60, 120, 300)

# Engine counters (EngineCounters fields) exported as <name>_total.
ENGINE_COUNTERS = {
    "num_steps": ("kiln:engine_steps", "Forward passes the engine has run."),
    "num_prompt_tokens_computed": (
        "kiln:prompt_tokens_computed",
        "Prompt tokens run through the model (prefix-cache hits excluded, recomputation included).",
    ),
    "num_prefix_cache_hit_tokens": ("kiln:prefix_cache_hit_tokens", "Prompt tokens served from the cache."),
    "num_preemptions": ("kiln:num_preemptions", "Sequences preempted because the KV cache ran out."),
}


class EngineCollector(Collector):
    """Reads the engine's gauges and counters when Prometheus scrapes (plain reads of ints; the engine
    thread only ever replaces or appends to what is read)."""

    def __init__(self, engine: Engine, model_name: str) -> None:
        self.engine, self.model_name = engine, model_name

    def collect(self) -> Iterator[Metric]:
        engine, labels = self.engine, [self.model_name]
        gauges = {
            "kiln:num_requests_running": ("Sequences in the running batch.", engine.num_running),
            "kiln:num_requests_waiting": ("Sequences waiting to be scheduled.", engine.num_waiting),
            "kiln:kv_cache_usage_perc": ("Fraction of KV cache blocks in use (1 = full).", engine.kv_usage),
        }
        for name, (documentation, value) in gauges.items():
            gauge = GaugeMetricFamily(name, documentation, labels=["model_name"])
            gauge.add_metric(labels, value)
            yield gauge
        for field, (name, documentation) in ENGINE_COUNTERS.items():
            counter = CounterMetricFamily(name, documentation, labels=["model_name"])
            counter.add_metric(labels, getattr(engine.counters, field))
            yield counter


class ServerMetrics:
    def __init__(self, engine: Engine, model_name: str) -> None:
        self.registry = registry = CollectorRegistry()
        registry.register(EngineCollector(engine, model_name))
        labels = {"model_name": model_name}

        def histogram(name: str, documentation: str, buckets: tuple[float, ...]) -> Histogram:
            metric = Histogram(name, documentation, ["model_name"], buckets=buckets, registry=registry)
            return metric.labels(**labels)

        def counter(name: str, documentation: str) -> Counter:
            return Counter(name, documentation, ["model_name"], registry=registry).labels(**labels)

        self.time_to_first_token = histogram(
            "kiln:time_to_first_token_seconds", "Arrival to first generated token.", TTFT_BUCKETS
        )
        self.inter_token_latency = histogram(
            "kiln:inter_token_latency_seconds", "Time between a request's successive tokens.", ITL_BUCKETS
        )
        self.e2e_latency = histogram(
            "kiln:e2e_request_latency_seconds", "Arrival to last token of finished requests.", E2E_BUCKETS
        )
        self.prompt_tokens = counter("kiln:prompt_tokens", "Prompt tokens of admitted requests.")
        self.generation_tokens = counter("kiln:generation_tokens", "Tokens generated and streamed.")
        self.requests_aborted = counter(
            "kiln:requests_aborted", "Requests stopped before they finished (client gone, shutdown)."
        )
        self.requests_rejected = counter(
            "kiln:requests_rejected", "Requests refused with 503 because the queue was full."
        )
        self._finished = Counter(
            "kiln:request_success",
            "Finished samples, by why they finished.",
            ["model_name", "finished_reason"],
            registry=registry,
        )
        self._model_name = model_name

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def track(self, num_prompt_tokens: int) -> RequestTracker:
        self.prompt_tokens.inc(num_prompt_tokens)
        return RequestTracker(self)

    def count_finish(self, reason: str) -> None:
        self._finished.labels(model_name=self._model_name, finished_reason=reason).inc()


class RequestTracker:
    """Observes one request's deltas: TTFT, the gaps between tokens, end-to-end latency."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics
        self.last_token_time: float | None = None
        self.finished = False

    def observe(self, output: RequestOutput) -> None:
        metrics = self.metrics
        num_new_tokens = sum(len(completion.token_ids) for completion in output.outputs)
        if num_new_tokens:
            now = time.monotonic()
            if self.last_token_time is None:
                ttft = output.metrics.time_to_first_token
                if ttft is not None:
                    metrics.time_to_first_token.observe(ttft)
            else:
                metrics.inter_token_latency.observe(now - self.last_token_time)
            self.last_token_time = now
            metrics.generation_tokens.inc(num_new_tokens)
        for completion in output.outputs:
            if completion.finish_reason is not None:
                metrics.count_finish(completion.finish_reason)
        if output.finished:
            self.finished = True
            if output.metrics.latency is not None:
                metrics.e2e_latency.observe(output.metrics.latency)

    def close(self) -> None:
        if not self.finished:
            self.metrics.requests_aborted.inc()
