"""Router metrics (Prometheus): per-strategy requests, TTFT and JCT, sub-request latency per call
and engine, and KV bytes moved (read from the engines' own counters at scrape time)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("microserve_router_requests", "Requests by strategy and outcome",
                                ["strategy", "outcome"], registry=r)
        self.ttft = Histogram("microserve_router_time_to_first_token_seconds", "TTFT seen by the router",
                              ["strategy"], buckets=BUCKETS, registry=r)
        self.jct = Histogram("microserve_router_job_completion_seconds", "End-to-end latency (JCT)",
                             ["strategy"], buckets=BUCKETS, registry=r)
        self.sub = Histogram("microserve_router_subrequest_seconds", "Latency of engine calls",
                             ["call", "engine"], buckets=BUCKETS, registry=r)
        self.kv_bytes = 0
        r.register(self)

    def count_kv_bytes(self, n: int) -> None:
        """A remote_send finished: the bytes its engine reported moving (so the counter is current
        the moment a request completes, not as of the engines' last health check)."""
        self.kv_bytes += n

    def collect(self):
        yield CounterMetricFamily("microserve_router_kv_bytes_moved", "KV bytes moved between engines by this "
                                  "router's remote_sends, as the sending engines reported them", value=self.kv_bytes)

    def observe_call(self, call: str, url: str, seconds: float) -> None:
        self.sub.labels(call, url).observe(seconds)
