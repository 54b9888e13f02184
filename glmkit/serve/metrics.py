"""Prometheus metrics for /metrics, named as vLLM names them (with a `glmkit:` prefix), so dashboards built
for vLLM need only the prefix changed.

Latencies are measured where the events reach the HTTP layer: time to first token from submission, the
time between a request's successive tokens, and the whole request. Queue, batch and token counts are read
from the scheduler at scrape time. Each app has its own registry (several apps may share a process).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0)


class ServerMetrics:
    """The registry behind /metrics; `on_submit` / `on_event` feed the latency histograms."""

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry(auto_describe=True)
        self.labels = {"model_name": model_name}
        names = list(self.labels)
        self.ttft = Histogram("glmkit:time_to_first_token_seconds", "Time to first token.", names,
                              buckets=_TTFT_BUCKETS, registry=self.registry)  # fmt: skip
        self.tpot = Histogram("glmkit:time_per_output_token_seconds", "Time between a request's tokens.", names,
                              buckets=_TPOT_BUCKETS, registry=self.registry)  # fmt: skip
        self.e2e = Histogram("glmkit:e2e_request_latency_seconds", "Submission to the last token.", names,
                             buckets=_E2E_BUCKETS, registry=self.registry)  # fmt: skip
        self.finished = Counter("glmkit:request_success", "Finished requests, by finish reason.",
                                [*names, "finished_reason"], registry=self.registry)  # fmt: skip
        self.scheduler: Any = None
        self.registry.register(_SchedulerCollector(self))
        self._times: dict[str, list[float]] = {}  # request id -> [submitted, last token]

    def on_submit(self, request_id: str) -> None:
        self._times[request_id] = [time.monotonic(), 0.0]

    def on_event(self, request_id: str, new_tokens: int, finish_reason: str | None) -> None:
        """An engine event (engine thread): a token's latency, and the request's end."""
        times = self._times.get(request_id)
        if times is None:
            return
        now = time.monotonic()
        if new_tokens:
            (self.tpot if times[1] else self.ttft).labels(**self.labels).observe(now - (times[1] or times[0]))
            times[1] = now
        if finish_reason is not None:
            del self._times[request_id]
            if finish_reason in ("stop", "length"):
                self.e2e.labels(**self.labels).observe(now - times[0])
            self.finished.labels(**self.labels, finished_reason=finish_reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _SchedulerCollector:
    """Gauges and counters read from `scheduler.stats()` when scraped (none before a model is loaded)."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        scheduler = self.metrics.scheduler
        if scheduler is None:
            return
        stats = scheduler.stats()
        labels, values = list(self.metrics.labels), list(self.metrics.labels.values())
        gauges = [("num_requests_running", "Requests in the running batch.", "running"),
                  ("num_requests_waiting", "Requests queued or prefilling.", "waiting"),
                  ("kv_cache_usage_perc", "Written share of the KV slots (1 = full).", "kv_cache_usage")]  # fmt: skip
        for name, doc, key in gauges:
            gauge = GaugeMetricFamily(f"glmkit:{name}", doc, labels=labels)
            gauge.add_metric(values, float(stats.get(key, 0.0)))
            yield gauge
        counters = [("prompt_tokens", "Prefilled prompt tokens.", "prompt_tokens_total"),
                    ("generation_tokens", "Generated tokens.", "generation_tokens_total"),
                    ("prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache.",
                     "prefix_cache_hit_tokens_total")]  # fmt: skip
        for name, doc, key in counters:
            counter = CounterMetricFamily(f"glmkit:{name}", doc, labels=labels)
            counter.add_metric(values, float(stats.get(key, 0.0)))
            yield counter
