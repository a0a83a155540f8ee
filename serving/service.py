"""What every route shares in one worker: settings, extractor, runner, metrics, auth, readiness.

``create_app`` (``flask_http_server.py``) makes one :class:`Service` and keeps it in
``app.extensions["adaface"]``; views reach it with :func:`current`.
"""
from __future__ import annotations

import logging
import time

from flask import current_app

from adaface.options import EMBEDDING_SIZE
from adaface.threads import start_new_thread

from .access import Access, keyless_scopes
from .keys import KeyRing, admin_key, parse_line, parse_lines
from .rates import parse_rate
from .metrics import Metrics
from .requests import embed_options
from .runner import InferenceRunner

logger = logging.getLogger("adaface")


class Service:
    """The worker's state; ``settings`` is the entry point's settings object (read, never parsed
    here); ``metrics_dir`` is Prometheus's multiprocess folder, when there is one."""

    def __init__(self, settings, extractor, metrics_dir: str | None = None):
        self.settings = settings
        self.extractor = extractor
        self.metrics = Metrics(metrics_dir)
        int8 = extractor.model.int8
        self.metrics.model_precision(extractor.model.precision, None if int8 is None else int8.min_cosine)
        self.runner = InferenceRunner(extractor, settings, self.metrics)
        self.access = make_access(settings)
        self.model = f"adaface-{extractor.arch}"
        self.ready = False
        self.not_ready_reason = "warming up: running the first embedding"
        self.openapi = None  # the document, built on first request (serving/routes/ops.py)

    def start_warm_up(self) -> None:
        if not self.settings.warmup:
            self.ready = True
            return
        start_new_thread(self._warm_up, ())

    def _warm_up(self) -> None:
        try:
            began = time.perf_counter()
            self.runner.warm_up()
            logger.info("warm-up embedding done in %.2f s; ready", time.perf_counter() - began)
            self.ready = True
        except Exception as exc:  # the reason is served by /readyz
            logger.exception("warm-up failed")
            self.not_ready_reason = f"warm-up failed: {exc}"

    def embed(self, inputs: list, query) -> list:
        """Embed ``inputs`` with a route's parsed query (:class:`serving.schemas.EmbedQuery`)."""
        return self.runner.embed(inputs, embed_options(query, self.settings))

    def embedding_headers(self, face=None) -> dict:
        headers = {"X-Embedding-Dim": str(EMBEDDING_SIZE)}
        if face is not None:
            headers["X-Embedding-Norm"] = f"{face.norm:.4f}"
            if face.box is not None:
                headers["X-Face-Box"] = ",".join(f"{v:.1f}" for v in face.box)
        if self.extractor.synthetic:
            headers["X-AdaFace-Weights"] = "synthetic"
        return headers


def make_access(settings) -> Access:
    """The worker's :class:`serving.access.Access` from the settings: the configured keys, or,
    with none and galleries not open, the admin key made in ``settings.admin_key_path()``.
    Raises :class:`serving.keys.KeyFileError` for a keys line that cannot be used."""
    keys = parse_lines(settings.api_key_lines())
    configured = bool(keys)
    if not configured and not settings.open_galleries:
        path = settings.admin_key_path()
        keys = [k for n, line in enumerate(admin_key(path).splitlines(), 1)
                if (k := parse_line(line, f"{path} line {n}")) is not None]
    return Access(KeyRing(keys), keyless_scopes(configured, settings.open_galleries),
                  parse_rate(settings.keyless_rate))


def current() -> Service:
    """The service of the app handling this request."""
    return current_app.extensions["adaface"]
