"""``GET /v1/audit``: the audit trail of gallery writes (:mod:`gallery.audit`), newest first.

Needs the ``admin`` scope; an admin key limited to some galleries reads only their rows. Pages
go back in time: pass the answer's ``next_before`` as ``before`` for the next page.
"""
from __future__ import annotations

from typing import Literal, Optional

from flask import Blueprint, current_app, g, request
from pydantic import Field

from gallery.audit import ACTIONS, MAX_EVENTS

from .. import requests
from ..openapi import Reply, document
from ..responses import json_response
from ..schemas import Answer, Query

blueprint = Blueprint("audit", __name__, url_prefix="/v1/audit")


class AuditQuery(Query):
    gallery: Optional[str] = Field(None, description="only this gallery's rows")
    identity: Optional[str] = Field(None, description="only rows about this identity name")
    action: Optional[Literal[tuple(ACTIONS)]] = Field(None, description="only this kind of write")
    before: Optional[int] = Field(None, ge=1, description="only rows older than this row id (paging)")
    limit: int = Field(100, ge=1, le=MAX_EVENTS, description="rows per page")


class AuditRow(Answer):
    id: int = Field(description="the row's id, increasing with time")
    at: float = Field(description="when, in seconds since the epoch (UTC)")
    actor: str = Field(description="the API key's name, keyless, or cli:<user>")
    address: str = Field(description="the client's address")
    action: str = Field(description=", ".join(f"{k}: {v}" for k, v in ACTIONS.items()))
    gallery: str
    identity: Optional[str] = None
    identity_id: Optional[int] = None
    face_ids: list = Field(description="the faces added or removed")
    detail: dict = Field(description="what else the write did (renamed_from, counts, model)")


class AuditPage(Answer):
    events: list[AuditRow]
    next_before: Optional[int] = Field(None, description="pass as before= for older rows; null at the end")


@blueprint.get("")
@document("The audit trail of gallery writes, newest first", {200: Reply("rows", AuditPage)}, query=AuditQuery,
          errors=(400, 401, 503))
def audit():
    query = requests.parse_query(AuditQuery, request.args)
    allowed = g.caller.galleries
    names = None if allowed is None else sorted(allowed)
    if query.gallery is not None:
        names = [query.gallery] if allowed is None or query.gallery in allowed else []
    events = current_app.extensions["adaface_gallery"].call(
        "audit_events", names, query.identity, query.action, query.before, query.limit)
    more = len(events) == query.limit
    return json_response({"events": [e.to_dict() for e in events],
                          "next_before": events[-1].id if events and more else None})
