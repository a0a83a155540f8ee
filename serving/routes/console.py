"""The web console at ``/ui``: static HTML, CSS and JavaScript modules from ``serving/console``.

Every asset is in the repository (no CDN, no external fonts); the pages call the same API as
any client, with the key the user types in (kept in the browser's session storage). The pages
are open endpoints: what they show is what the key lets the API answer. A browser asking ``/``
for HTML is sent here (:func:`serving.routes.ops.index`).
"""
from __future__ import annotations

from pathlib import Path

from flask import Blueprint, send_from_directory

from ..openapi import Reply, document

#: where the console's files are
CONSOLE_DIR = Path(__file__).resolve().parent.parent / "console"
#: the console loads only its own files and talks only to this service
POLICY = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
          "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

blueprint = Blueprint("console", __name__)
TAGS = ("Console",)


def _secured(response):
    response.headers["Content-Security-Policy"] = POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-cache"
    return response


@blueprint.get("/ui/")
@document("The web console (HTML; /ui is redirected here)", {200: Reply("the console's page", {"type": "string"},
                                                                         "text/html")}, tags=TAGS)
def console_page():
    return _secured(send_from_directory(CONSOLE_DIR, "index.html", mimetype="text/html"))


@blueprint.get("/ui/<path:name>")
@document("A file of the web console (JavaScript, CSS)",
          {200: Reply("the file, with its own content type", {"type": "string"}, "*/*")},
          path_params={"name": "the file's path under the console's folder"}, tags=TAGS, errors=(404,))
def console_asset(name):
    """A console file (404 JSON for anything not there; no listing, nothing outside the folder)."""
    return _secured(send_from_directory(CONSOLE_DIR, name))
