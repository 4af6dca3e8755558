"""Prometheus metrics, named like vLLM's `vllm:*` with an `unlearn:` prefix so dashboards carry over.

Every request metric has `model_name` and `artifact` labels (`artifact="none"` without unlearning), and a
`key_name` label (the key file's entry name, `"none"` if unknown) when the server has API keys.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self, running_fn, waiting_fn, key_names: bool = False):
        self.registry = CollectorRegistry()
        self.key_names = key_names
        labels = ["model_name", "artifact"] + (["key_name"] if key_names else [])
        r = self.registry
        self.running = Gauge("unlearn:num_requests_running", "Sequences in the running batch.", registry=r)
        self.running.set_function(running_fn)
        self.waiting = Gauge("unlearn:num_requests_waiting", "Sequences waiting for a batch slot.", registry=r)
        self.waiting.set_function(waiting_fn)
        self.request_success = Counter(
            "unlearn:request_success", "Finished requests.", labels + ["finished_reason"], registry=r
        )
        self.http_requests = Counter(
            "unlearn:http_requests", "HTTP requests by endpoint and status.", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter("unlearn:prompt_tokens", "Prefilled prompt tokens.", labels, registry=r)
        self.generation_tokens = Counter("unlearn:generation_tokens", "Generated tokens.", labels, registry=r)
        self.ttft = Histogram(
            "unlearn:time_to_first_token_seconds", "Time to first token.", labels, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "unlearn:inter_token_latency_seconds", "Time between tokens.", labels, buckets=_ITL_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "unlearn:e2e_request_latency_seconds", "Request latency.", labels, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.queue_time = Histogram(
            "unlearn:request_queue_time_seconds", "Time waiting for a slot.", labels, buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    def _labels(self, model_name: str, artifact: str, key_name: str) -> tuple[str, ...]:
        return (model_name, artifact, key_name) if self.key_names else (model_name, artifact)

    def observe_finished(
        self, model_name: str, artifact: str, request, finish_reasons: list[str], key_name: str = "none"
    ) -> None:
        """Record a finished engine Request (timestamps are monotonic seconds set by the engine)."""
        labels = self._labels(model_name, artifact, key_name)
        for reason in finish_reasons:
            self.request_success.labels(*labels, reason or "unknown").inc()
        self.prompt_tokens.labels(*labels).inc(len(request.prompt_token_ids))
        self.generation_tokens.labels(*labels).inc(request.num_generated_tokens)
        if request.first_token_time is not None:
            self.ttft.labels(*labels).observe(request.first_token_time - request.arrival_time)
        if request.scheduled_time is not None:
            self.queue_time.labels(*labels).observe(request.scheduled_time - request.arrival_time)
        if request.finished_time is not None:
            self.e2e.labels(*labels).observe(request.finished_time - request.arrival_time)

    def observe_itl(self, model_name: str, artifact: str, seconds: float, tokens: int, key_name: str = "none") -> None:
        if tokens > 0:
            h = self.itl.labels(*self._labels(model_name, artifact, key_name))
            for _ in range(tokens):
                h.observe(seconds / tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
