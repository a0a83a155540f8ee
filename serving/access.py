"""Who may call what: the scope each route needs, the caller's key, gallery limits, rate limits.

Each route's endpoint needs one scope (:data:`SCOPE_OF`); the open ones (:data:`OPEN_ENDPOINTS`:
health, metrics, the OpenAPI document) need none. OPTIONS and HEAD need what GET on the same
path needs. A request without a key is *keyless* and has :func:`keyless_scopes`; one with a key
that matches none is refused (401), whatever the route, so a mistyped key is never taken for
no key. A key limited to some galleries gets 404 ``gallery_not_found`` for any other, the
answer a missing gallery gets, so names are not revealed. Rate limits
(:mod:`serving.rates`) count per key, and per address for keyless clients, after the checks.

Answers: 401 ``unauthorized`` (no key where one is needed, or a key that matches none), 403
``forbidden`` (the key lacks the scope; the message names it), 404 ``gallery_not_found``,
429 ``rate_limited`` with ``Retry-After``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from werkzeug.exceptions import HTTPException

from gallery.audit import Actor
from gallery.errors import GalleryNotFoundError

from .errors import ApiError
from .keys import ALL_SCOPES, Key, KeyRing
from .rates import Rate, RateLimiter, retry_after

#: endpoints anyone may call (no key, no scope)
OPEN_ENDPOINTS = frozenset({"ops.index", "ops.livez", "ops.readyz", "ops.metrics", "ops.openapi", "static",
                            "console.console_page", "console.console_asset"})
#: the scope each endpoint needs
SCOPE_OF = {
    **{f"compat.{name}": "embed" for name in ("b64_represent_json", "b64_represent_byte", "byte_represent_json",
                                              "byte_represent_byte", "represent_json", "represent_bytes")},
    "embed.embed": "embed",
    "embed.verify": "embed",
    **{f"galleries.{name}": "gallery:read" for name in ("list_galleries", "get_gallery", "list_identities",
                                                        "get_identity", "identify", "face_crop",
                                                        "verify_identity", "reembed_status")},
    **{f"galleries.{name}": "gallery:write" for name in ("create_gallery", "delete_gallery", "update_identity",
                                                         "delete_identity", "enroll", "delete_face",
                                                         "start_reembed")},
    "ops.info": "admin",
    "audit.audit": "admin",
    # CompreFace's API (serving/routes/compreface.py)
    **{f"compreface.{name}": "gallery:read" for name in (
        "list_subjects", "list_examples", "example_image", "verify_example", "recognize", "recognize_embeddings",
        "verify_embeddings_with_example")},
    **{f"compreface.{name}": "gallery:write" for name in (
        "add_subject", "rename_subject", "delete_subject", "delete_all_subjects", "add_example",
        "delete_examples_of_subject", "delete_example", "delete_examples")},
    **{f"compreface.{name}": "embed" for name in ("detect", "verify_images", "verify_embeddings")},
    # DeepStack's face API (serving/routes/deepstack.py)
    **{f"deepstack.{name}": "gallery:read" for name in ("recognize", "list_faces")},
    **{f"deepstack.{name}": "gallery:write" for name in ("register", "delete")},
    **{f"deepstack.{name}": "embed" for name in ("detect", "match")},
}
#: endpoints whose clients send the key in the form body (DeepStack's ``api_key``), read from
#: the body's first bytes when no header carries one
FORM_KEY_ENDPOINTS = frozenset(e for e in SCOPE_OF if e.startswith("deepstack."))
#: the form fields such a key may be in
FORM_KEY_FIELDS = ("api_key", "admin_key")
#: the name keyless callers have in logs, metrics and the audit trail
KEYLESS = "keyless"
#: where the request's caller is kept in the WSGI environ (the access log's ``{adaface.caller}e``)
CALLER_KEY = "adaface.caller"


def keyless_scopes(keys_configured: bool, open_galleries: bool) -> frozenset:
    """What a request without a key may do.

    ==================  ==================================  ====================================
    keys configured     ``ADAFACE_OPEN_GALLERIES=false``    ``true``
    ==================  ==================================  ====================================
    none (the default)  embed (galleries need the made       everything (a trusted network)
                        admin key)
    some                nothing                             gallery:read, gallery:write
    ==================  ==================================  ====================================
    """
    if not keys_configured:
        return ALL_SCOPES if open_galleries else frozenset({"embed"})
    return frozenset({"gallery:read", "gallery:write"}) if open_galleries else frozenset()


@dataclass(frozen=True)
class Caller:
    """Who sent the request: a key's name (or :data:`KEYLESS`), what it may do, its address."""

    name: str
    scopes: frozenset
    address: str = ""
    key: Optional[Key] = None

    def may(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes

    def sees(self, gallery: str) -> bool:
        return self.key is None or self.key.sees(gallery)

    @property
    def galleries(self) -> Optional[frozenset]:
        """The galleries this caller is limited to (None: all)."""
        return None if self.key is None else self.key.galleries

    @property
    def actor(self) -> Actor:
        """Who the audit trail records for this caller's writes."""
        return Actor(self.name, self.address)


def presented_key(headers) -> Optional[str]:
    """The key a request carries: ``Authorization: Bearer <key>``, a bare ``Authorization: <key>``
    (the original service's clients), or ``X-API-Key: <key>``; None without one. Another scheme's
    ``Authorization`` (``Basic`` from a proxy) is not a key."""
    key = headers.get("X-API-Key", "").strip()
    if key:
        return key
    auth = headers.get("Authorization", "").strip()
    if not auth:
        return None
    scheme, _, rest = auth.partition(" ")
    if scheme.lower() == "bearer" and rest.strip():
        return rest.strip()
    if scheme.lower() in ("basic", "digest", "negotiate") and rest.strip():
        return None
    return auth


class Access:
    """The checks of one worker: ``ring`` (the keys), the keyless scopes and rate, the buckets."""

    def __init__(self, ring: KeyRing, keyless: frozenset, keyless_rate: Optional[Rate] = None):
        self.ring = ring
        self.keyless = frozenset(keyless)
        self.keyless_rate = keyless_rate
        self.limiter = RateLimiter()

    def caller(self, headers, address: str, presented: Optional[str] = None) -> Caller:
        """The caller of a request with these headers from ``address`` (or with the key
        ``presented`` elsewhere in it); 401 for a key that matches none."""
        presented = presented_key(headers) or presented
        if presented is None:
            return Caller(KEYLESS, self.keyless, address)
        key = self.ring.find(presented)
        if key is None:
            raise ApiError(401, "unauthorized", "the API key is not valid", headers={"WWW-Authenticate": "Bearer"})
        return Caller(key.name, key.scopes, address, key)

    def check(self, caller: Caller, scope: Optional[str], gallery: Optional[str] = None) -> None:
        """Raise the answer for a ``caller`` that may not use a route needing ``scope`` (None: an
        open route) on ``gallery`` (the path's, if any), or that is over its rate."""
        if scope is None:
            return
        if not caller.may(scope):
            if caller.key is None:
                raise ApiError(401, "unauthorized", f"a valid API key with the scope {scope!r} is required "
                               "(Authorization: Bearer <key>, or X-API-Key: <key>)",
                               headers={"WWW-Authenticate": "Bearer"})
            raise ApiError(403, "forbidden", f"the key {caller.name!r} lacks the scope {scope!r}")
        if gallery is not None and not caller.sees(gallery):
            raise GalleryNotFoundError(gallery)
        rate = caller.key.rate if caller.key is not None else self.keyless_rate
        client = caller.name if caller.key is not None else f"{KEYLESS}@{caller.address}"
        wait = self.limiter.take(client, rate)
        if wait > 0:
            raise ApiError(429, "rate_limited", f"more than {rate} requests from {caller.name!r}: "
                           f"retry after {retry_after(wait)} s", headers={"Retry-After": retry_after(wait)})


def route_scope(app, request) -> Optional[str]:
    """The scope the request's route needs (None: open, or no route matches: the 404 or 405 is
    answered as it would be). OPTIONS and HEAD take GET's route on the same path where it has one."""
    endpoint = request.endpoint
    if request.method in ("OPTIONS", "HEAD"):
        try:
            endpoint, _ = app.url_map.bind_to_environ(request.environ).match(method="GET")
        except HTTPException:
            pass
    if endpoint is None or endpoint in OPEN_ENDPOINTS:
        return None
    return SCOPE_OF.get(endpoint, "admin")       # a route nobody classified: admins only
