"""Prometheus metrics of the server (`GET /metrics`), with prometheus_client.

Names follow vLLM's where one exists (num_requests_running/waiting, time_to_first_token_seconds,
inter_token_latency_seconds, spec_decode_*), under the `mellum2:` prefix. Each server has its own
CollectorRegistry, so several servers in one process (tests, the load benchmark) do not collide.
Tokens per second is a gauge over the last 10 s besides the counter Prometheus would rate().
"""
from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from mellum2.infer.window import Window

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0)
WINDOW_S = 10.0


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.running = Gauge("mellum2:num_requests_running", "requests in the running batch", registry=r)
        self.waiting = Gauge("mellum2:num_requests_waiting", "requests waiting for a slot", registry=r)
        self.kv_use = Gauge("mellum2:kv_cache_usage_perc", "fraction of the KV cache pool in use (0-1)", registry=r)
        self.tps = Gauge("mellum2:generation_tokens_per_second", f"generated tokens per second over the last "
                         f"{WINDOW_S:.0f} s", registry=r)
        self.gen_tokens = Counter("mellum2:generation_tokens", "generated tokens", registry=r)
        self.prompt_tokens = Counter("mellum2:prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.ttft = Histogram("mellum2:time_to_first_token_seconds", "submission to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("mellum2:inter_token_latency_seconds", "time between a request's consecutive outputs",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("mellum2:e2e_request_latency_seconds", "submission to the last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("mellum2:request_success", "finished requests by finish reason", ["finished_reason"],
                                registry=r)
        self.http_errors = Counter("mellum2:http_errors", "error responses by status", ["status"], registry=r)
        self.drafted = Counter("mellum2:spec_decode_num_draft_tokens", "MTP draft tokens proposed", registry=r)
        self.accepted = Counter("mellum2:spec_decode_num_accepted_tokens", "MTP draft tokens accepted", registry=r)
        self.acceptance = Gauge("mellum2:spec_decode_acceptance_rate", "accepted / proposed drafts so far", registry=r)
        self._window = Window(WINDOW_S)
        self._lock = threading.Lock()
        self._drafted = self._accepted = 0

    def tokens(self, n: int) -> None:
        now = time.perf_counter()
        self.gen_tokens.inc(n)
        with self._lock:
            self._window.add(now, n)
            self._rate(now)

    def _rate(self, now: float) -> None:
        self._window.expire(now)
        self.tps.set(self._window.total / WINDOW_S)

    def finished(self, reason: str, e2e_s: float) -> None:
        self.requests.labels(reason).inc()
        self.e2e.observe(e2e_s)

    def speculative(self, drafted: int, accepted: int) -> None:
        if drafted > 0:
            self.drafted.inc(drafted)
            self.accepted.inc(max(0, accepted))
            with self._lock:
                self._drafted += drafted
                self._accepted += max(0, accepted)
                self.acceptance.set(self._accepted / self._drafted)

    def render(self) -> bytes:
        with self._lock:
            self._rate(time.perf_counter())
        return generate_latest(self.registry)
