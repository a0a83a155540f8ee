"""The OpenAPI document, generated from the routes themselves (served at ``/openapi.json``).

Each view declares its operation with :func:`document`: a summary, the pydantic model of its
query options (the same model :func:`serving.requests.parse_query` parses them with), its body's
content types, its answers (pydantic models) and its error statuses. :func:`build_spec` walks
the app's URL map, so a route without a declaration fails the build (and its test), and turns
the declarations into an OpenAPI 3.1 document with apispec; the JSON schemas come from pydantic.
Error statuses are described by the codes :data:`serving.errors.STATUS` gives them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from apispec import APISpec
from pydantic.json_schema import models_json_schema

from .errors import codes_for

OPENAPI_VERSION = "3.1.0"
JSON = "application/json"
_ARGUMENT = re.compile(r"<(?:(\w+)(?:\([^)]*\))?:)?(\w+)>")
_CONVERTER_TYPES = {"int": "integer", "float": "number"}
_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
_REF = "#/components/schemas/{model}"


@dataclass(frozen=True)
class Reply:
    """One documented answer: a pydantic ``model`` for JSON, or a schema dict for other types."""

    description: str
    model: object = None
    content_type: str = JSON
    headers: tuple = ()


@dataclass(frozen=True)
class Operation:
    """What :func:`document` records on a view."""

    summary: str
    replies: dict
    description: str = ""
    query: Optional[type] = None
    body: Optional[dict] = None          # content type -> pydantic model or schema dict
    errors: tuple = ()
    path_params: dict = field(default_factory=dict)   # name -> description
    tags: tuple = ()


def document(summary: str, replies: dict, **fields):
    """Declare the decorated view's OpenAPI operation (see :class:`Operation`)."""
    operation = Operation(summary, replies, **fields)

    def mark(view):
        view.openapi = operation
        return view
    return mark


def openapi_path(rule: str) -> str:
    """Flask's ``/a/<int:b>/<c>`` as OpenAPI's ``/a/{b}/{c}``."""
    return _ARGUMENT.sub(r"{\2}", rule)


def _path_parameters(rule: str, descriptions: dict) -> list:
    params = []
    for converter, name in _ARGUMENT.findall(rule):
        param = {"name": name, "in": "path", "required": True,
                 "schema": {"type": _CONVERTER_TYPES.get(converter, "string")}}
        if name in descriptions:
            param["description"] = descriptions[name]
        params.append(param)
    return params


def _without_null(schema: dict) -> dict:
    """An ``Optional[X]`` field's schema as X's (a query option is simply absent when unset)."""
    options = [s for s in schema.get("anyOf", ()) if s.get("type") != "null"]
    if len(options) == 1:
        rest = {k: v for k, v in schema.items() if k not in ("anyOf", "default")}
        return {**options[0], **rest}
    return {k: v for k, v in schema.items() if k != "default"}


def _query_parameters(model: type) -> list:
    schema = model.model_json_schema()
    required = set(schema.get("required", ()))
    params = []
    for name, prop in schema.get("properties", {}).items():
        prop = _without_null(prop)
        description = prop.pop("description", None)
        prop.pop("title", None)
        param = {"name": name, "in": "query", "required": name in required, "schema": prop}
        if description:
            param["description"] = description
        params.append(param)
    return params


def _is_model(value) -> bool:
    return isinstance(value, type) and hasattr(value, "model_json_schema")


class _Schemas:
    """Every pydantic model the operations use, as components, and the refs to them."""

    def __init__(self, models: list):
        unique = list(dict.fromkeys(models))
        refs, top = models_json_schema([(m, "serialization") for m in unique], ref_template=_REF)
        self.refs = {m: refs[(m, "serialization")] for m in unique}
        self.components = top.get("$defs", {})

    def of(self, value) -> dict:
        return self.refs[value] if _is_model(value) else value


def _models(operations: list) -> list:
    found = []
    for op in operations:
        found += [r.model for r in op.replies.values() if _is_model(r.model)]
        found += [m for m in (op.body or {}).values() if _is_model(m)]
    return found


def _error_reply(status: int, error_schema: dict) -> dict:
    codes = codes_for(status)
    return {"description": "error codes: " + ", ".join(codes) if codes else "error",
            "content": {JSON: {"schema": error_schema}}}


def _operation(op: Operation, rule: str, schemas: _Schemas, error_schema: dict) -> dict:
    out = {"summary": op.summary}
    if op.description:
        out["description"] = op.description
    if op.tags:
        out["tags"] = list(op.tags)
    params = _path_parameters(rule, op.path_params) + (_query_parameters(op.query) if op.query else [])
    if params:
        out["parameters"] = params
    if op.body:
        out["requestBody"] = {"required": True, "content": {
            ctype: {"schema": schemas.of(schema)} for ctype, schema in op.body.items()}}
    responses = {}
    for status, reply in op.replies.items():
        entry = {"description": reply.description}
        if reply.model is not None:
            entry["content"] = {reply.content_type: {"schema": schemas.of(reply.model)}}
        if reply.headers:
            entry["headers"] = {h: {"schema": {"type": "string"}} for h in reply.headers}
        responses[str(status)] = entry
    # a route behind a key can also answer 403 (the key lacks the scope) and 429 (its rate)
    errors = sorted(set(op.errors) | ({403, 429} if 401 in op.errors else set()))
    for status in errors:
        responses[str(status)] = _error_reply(status, error_schema)
    out["responses"] = responses
    return out


def _routes(app) -> list:
    """(rule, method, Operation) for every route of ``app``; a route without one is a LookupError."""
    found = []
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        view = app.view_functions[rule.endpoint]
        operation = getattr(view, "openapi", None)
        if operation is None:
            raise LookupError(f"route {rule.rule} ({rule.endpoint}) has no OpenAPI declaration (serving.openapi.document)")
        for method in sorted(m for m in rule.methods if m in _METHODS):
            found.append((rule.rule, method, operation))
    return found


def build_spec(app, title: str, version: str, description: str, error_model: type) -> dict:
    """The OpenAPI 3.1 document of every route of ``app``; ``error_model`` describes error bodies."""
    routes = _routes(app)
    schemas = _Schemas(_models([op for _, _, op in routes]) + [error_model])
    spec = APISpec(title=title, version=version, openapi_version=OPENAPI_VERSION,
                   info={"description": description},
                   security=[{"bearer": []}, {"apiKey": []}, {}])
    for name, schema in sorted(schemas.components.items()):
        spec.components.schema(name, schema)
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    spec.components.security_scheme("apiKey", {"type": "apiKey", "in": "header", "name": "X-API-Key"})
    paths: dict = {}
    for rule, method, op in routes:
        paths.setdefault(rule, {})[method.lower()] = _operation(op, rule, schemas, schemas.of(error_model))
    for rule, operations in paths.items():
        spec.path(path=openapi_path(rule), operations=operations)
    return spec.to_dict()
