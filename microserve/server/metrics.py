"""Prometheus metrics for one engine: counters read from EngineStats at scrape time, gauges from
the KV cache, and latency histograms observed by the request handlers."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from microserve.engine.engine import Engine

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class EngineCollector:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self):
        e, s = self.engine, self.engine.stats
        c = CounterMetricFamily("microserve_requests", "Finished requests by finish reason", labels=["finish_reason"])
        for reason, n in sorted(s.requests_finished.items()):
            c.add_metric([reason], n)
        yield c
        for name, doc, value in (
            ("prompt_tokens", "Prompt tokens of finished requests", s.prompt_tokens),
            ("generation_tokens", "Generated tokens of finished requests", s.generation_tokens),
            ("prefix_cache_hit_tokens", "Prompt tokens whose KV was reused (prefix hit or received)", s.prefix_hit_tokens),
            ("kv_sent_bytes", "KV bytes written to other engines", s.kv_sent_bytes),
            ("kv_received_bytes", "KV bytes received from other engines", s.kv_received_bytes),
            ("kv_transfer_seconds", "Time KV copies to other engines took", s.kv_transfer_s),
            ("kv_transfer_exposed_seconds", "Part of the KV transfer time compute waited for", s.kv_exposed_s),
            ("engine_steps", "Engine steps run", s.steps),
            ("preemptions", "Requests preempted for recompute", e.scheduler.num_preemptions),
        ):
            yield CounterMetricFamily(f"microserve_{name}", doc, value=value)
        a = e.cache.accounting()
        used = a["total"] - a["free"] - a["evictable"]
        for name, doc, value in (
            ("kv_pages_total", "KV pages in the pool", a["total"]),
            ("kv_pages_free", "Free KV pages", a["free"]),
            ("kv_pages_used", "KV pages in use (owned by requests or locked in the prefix cache)", used),
            ("kv_pages_cached", "KV pages held by the prefix cache", a["cached"]),
            ("kv_pages_evictable", "Cached KV pages no request holds", a["evictable"]),
            ("kv_parked_requests", "Requests parked by prep_recv", a["parked"]),
            ("num_requests_running", "Running requests", len(e.scheduler.running)),
            ("num_requests_waiting", "Waiting requests", len(e.scheduler.waiting)),
            ("kv_transfer_hidden_ratio", "Share of KV transfer time hidden behind compute (a copy small enough to "
             "run inline on the compute thread, as most of a tiny model's are, counts as exposed)",
             1.0 - s.kv_exposed_s / s.kv_transfer_s if s.kv_transfer_s > 0 else 0.0),
        ):
            yield GaugeMetricFamily(f"microserve_{name}", doc, value=value)


class EngineMetrics:
    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine))
        self.ttft = Histogram("microserve_time_to_first_token_seconds", "Time to first token",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("microserve_time_per_output_token_seconds", "Time per output token after the first",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("microserve_e2e_request_latency_seconds", "End-to-end request latency",
                             buckets=LATENCY_BUCKETS, registry=self.registry)
