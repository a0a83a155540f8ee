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

from .auth import ApiKeyAuth
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
        self.runner = InferenceRunner(extractor, settings, self.metrics)
        self.auth = ApiKeyAuth(settings.api_key_list())
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


def current() -> Service:
    """The service of the app handling this request."""
    return current_app.extensions["adaface"]
