"""The AdaFace embedding service: the Flask app factory and ``app``, what gunicorn imports.

    gunicorn -c gunicorn.conf.py flask_http_server:app                  # tuned defaults
    gunicorn --worker-class gevent -b 0.0.0.0:30035 --timeout 300 flask_http_server:app
    python flask_http_server.py                                         # development server (ADAFACE_BIND)

``create_app(config=None)`` builds an app (tests pass their own settings); the module attribute
``app`` is created from the ``ADAFACE_*`` environment on first access, which is when gunicorn
imports it, so the model is loaded once per worker before it serves. The routes are the
Blueprints of :mod:`serving.routes`; this module only reads the settings and wires the layers.
"""
from __future__ import annotations

import logging
import os
import sys

import torch
from flask import Flask

import net
from adaface.backends import BackendError
from AdaFaceFeature import AdaFaceFeature
from config import NO_WEIGHTS_HELP, Settings, SettingsError
from serving import errors, hooks, memory
from serving.gallery_state import GalleryState
from serving.hooks import OPEN_ROUTES
from serving.reembed_jobs import ReembedJobs
from serving.routes import BLUEPRINTS
from serving.service import Service

logger = logging.getLogger("adaface")

__all__ = ["OPEN_ROUTES", "create_app"]


def _settings_from(config) -> Settings:
    if isinstance(config, Settings):
        return config
    return Settings.from_env(**(config or {}))


def create_app(config: Settings | dict | None = None, extractor: AdaFaceFeature | None = None) -> Flask:
    """Build the app: ``config`` is a :class:`Settings`, a dict of overrides of the environment's
    settings, or None (the environment alone). ``extractor`` reuses an already-loaded model."""
    settings = _settings_from(config)
    memory.limit_arenas(settings.malloc_arenas)
    memory.set_onednn_cache(settings.onednn_cache, os.environ)  # before the model's first convolution
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    extractor = extractor or AdaFaceFeature.from_settings(settings)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    service = Service(settings, extractor, os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
    app.extensions["adaface"] = service
    app.extensions["adaface_gallery"] = GalleryState(settings.gallery_store_url(), settings.ann_min_faces,
                                                          settings.ann_nprobe)
    app.extensions["adaface_reembed"] = ReembedJobs(app.extensions["adaface_gallery"])
    errors.register(app)
    hooks.install(app, service)
    for blueprint in BLUEPRINTS:
        app.register_blueprint(blueprint)
    service.start_warm_up()
    return app


def _app_from_environment() -> Flask:
    """Create the app from ``ADAFACE_*``; on missing or bad weights or settings, say why and exit."""
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
        logger.error("%s", exc)
        sys.exit(4)  # gunicorn's "application failed to load": the master stops instead of retrying
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return create_app(settings)
    except net.WeightsNotFoundError as exc:
        logger.error("cannot start: %s\n%s", exc, NO_WEIGHTS_HELP)
        sys.exit(4)
    except (net.WeightsError, BackendError, ValueError) as exc:
        logger.error("cannot start: %s", exc)
        sys.exit(4)


def __getattr__(name: str):
    """``flask_http_server.app`` is built on first access (gunicorn's import), not on import."""
    if name == "app":
        globals()["app"] = _app_from_environment()
        return globals()["app"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _bind_address(bind: str) -> tuple:
    """``host:port`` (ADAFACE_BIND) -> (host, port)."""
    host, _, port = bind.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


if __name__ == "__main__":
    host, port = _bind_address(Settings.from_env().bind)
    _app_from_environment().run(host=host, port=port, threaded=True)
