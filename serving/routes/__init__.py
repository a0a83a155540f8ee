"""The route groups, one Flask Blueprint each, with each route's OpenAPI declaration beside it.

- :mod:`.compat`: the original service's endpoints (``/b64_represent_json`` ...).
- :mod:`.embed`: ``/v1/embed`` and ``/v1/verify``.
- :mod:`.galleries`: ``/v1/galleries/...`` (1:N identification).
- :mod:`.ops`: ``/``, ``/livez``, ``/readyz``, ``/info``, ``/metrics``, ``/openapi.json``.
- :mod:`.audit`: ``/v1/audit`` (the gallery writes' trail).
- :mod:`.compreface`: CompreFace's REST API v1 (``/api/v1/...``) over the galleries.
- :mod:`.deepstack`: DeepStack's face API (``/v1/vision/face...``) over the galleries.

Adding a route: a view in its group's module, its scope in :data:`serving.access.SCOPE_OF`
(a route missing there is admin-only, and a test fails), decorated with ``@blueprint.post(...)`` (or
``get``...) and :func:`serving.openapi.document` (summary, query model, body, answers, error
statuses); answer models sit beside the views (shared ones in :mod:`serving.schemas`).
"""
from . import audit, compat, compreface, console, deepstack, embed, galleries, ops

BLUEPRINTS = (compat.blueprint, embed.blueprint, galleries.blueprint, ops.blueprint, audit.blueprint,
              compreface.blueprint, deepstack.blueprint, console.blueprint)
