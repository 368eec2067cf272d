"""The gateway's Prometheus metrics (``/metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """Prometheus metrics in a registry of their own (several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gateway_requests",
            "Chat requests by tenant and HTTP status",
            ["tenant", "status"],
            registry=r,
        )
        self.ttft = Histogram(
            "gateway_ttft_seconds",
            "Time to first content sent (streams)",
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.e2e = Histogram(
            "gateway_e2e_seconds",
            "End-to-end request latency",
            registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.overhead = Histogram(
            "gateway_overhead_seconds",
            "The gateway's own time per request (not waiting on upstream or client), guardrails included",
            registry=r,
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
        )
        self.guardrail = Histogram(
            "gateway_guardrail_seconds",
            "Guardrail chain time per request",
            registry=r,
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
        )
        self.verdicts = Counter(
            "gateway_guardrail_verdicts",
            "Guardrail verdicts",
            ["hook", "stage", "action"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors", "Upstream failures by kind", ["kind"], registry=r
        )
        self.client_aborts = Counter(
            "gateway_client_aborts",
            "Requests the client ended early: disconnect, or stalled (read nothing for write_timeout_s)",
            ["kind"],
            registry=r,
        )
        self.in_flight = Gauge(
            "gateway_in_flight", "Chat requests in flight", registry=r, multiprocess_mode="livesum"
        )
