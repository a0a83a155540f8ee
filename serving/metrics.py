"""Prometheus metrics, correct with several gunicorn workers.

When ``PROMETHEUS_MULTIPROC_DIR`` is set (``gunicorn.conf.py`` sets it; the app factory passes
it as ``multiprocess_dir``), every worker writes its samples there and ``/metrics`` aggregates
all live workers; otherwise one process's registry.
"""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)


class Metrics:
    """The service's metrics on a private registry (so tests can build many apps)."""

    def __init__(self, multiprocess_dir: str | None = None):
        self.multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("adaface_requests_total", "HTTP requests by route and status",
                                ["route", "method", "status"], registry=r)
        self.callers = Counter("adaface_caller_requests_total", "HTTP requests by caller (an API key's name, "
                               "keyless, refused or open) and status", ["caller", "status"], registry=r)
        self.latency = Histogram("adaface_request_seconds", "HTTP request latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.faces = Histogram("adaface_faces_per_image", "faces embedded per image",
                               buckets=(0, 1, 2, 3, 5, 10, 20, 50), registry=r)
        self.batch = Histogram("adaface_batch_size", "faces per network forward",
                               buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.forward = Histogram("adaface_forward_seconds", "time of one batched network forward",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.errors = Counter("adaface_errors_total", "error answers by the error's code (the README's error "
                              "table)", ["code", "status"], registry=r)
        self.queue = Gauge("adaface_queue_depth", "images admitted and not yet answered",
                           registry=r, multiprocess_mode="livesum")
        self.precision = Gauge("adaface_precision", "1 for the precision the network runs at (fp32, int8)",
                               ["precision"], registry=r, multiprocess_mode="livemax")

    def model_precision(self, precision: str, int8_cosine: float | None) -> None:
        """Record the precision served and, when measured, the int8 gate's figure (the gauge
        exists only then: an unmeasured figure is absent, not 0)."""
        for name in ("fp32", "int8"):
            self.precision.labels(name).set(1 if name == precision else 0)
        if int8_cosine is not None:
            Gauge("adaface_int8_min_cosine", "the int8 gate's lowest cosine to fp32 over the calibration crops",
                  registry=self.registry, multiprocess_mode="livemin").set(int8_cosine)

    def observe_request(self, route: str, method: str, status: int, seconds: float, caller: str = "open") -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.callers.labels(caller, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def observe_error(self, code: str, status: int) -> None:
        self.errors.labels(code, str(status)).inc()

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch.observe(size)
        self.forward.observe(seconds)

    def observe_faces(self, count: int) -> None:
        self.faces.observe(count)

    def queue_depth(self, depth: int) -> None:
        self.queue.set(depth)

    def exposition(self) -> tuple:
        """(body bytes, content type) for ``GET /metrics``."""
        if self.multiprocess_dir:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
