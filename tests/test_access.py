"""Access control: the keys file, scopes per route, gallery-limited keys, rate limits, the made
admin key of the default configuration, and what logs and metrics show of a key (its name only).

The matrix (every route × no key / wrong key / each scope / a gallery-limited key on its own
gallery, another one, and the listing) runs on a real gunicorn server with gevent workers.
"""
import re
import stat
import time

import pytest

from AdaFaceFeature import AdaFaceFeature
from adaface.options import SCOPES
from flask_http_server import create_app
from serving import access
from serving.keys import KeyFileError, KeyRing, hashed_form, parse_line, parse_lines
from serving.rates import Rate, RateLimiter, parse_rate, retry_after
from test_gallery_server import Server, call
from test_server import request
from test_gallery_support import crop_png, store_url


@pytest.fixture(scope="module")
def extractor():
    return AdaFaceFeature("synthetic", arch="ir_18", device="cpu")


# -- the keys file -----------------------------------------------------------------------------


def test_a_bare_key_can_do_everything_everywhere():
    key = parse_line("s3cret")
    assert key.scopes == frozenset(SCOPES) and key.galleries is None and key.rate is None
    assert re.fullmatch(r"key-[0-9a-f]{8}", key.name) and "s3cret" not in key.name


def test_attributes_and_hashed_keys():
    line = f"{hashed_form('door-key')} name=door scopes=embed,gallery:read galleries=home,office rate=5/min"
    key = parse_line(line)
    assert (key.name, key.scopes, key.galleries) == ("door", {"embed", "gallery:read"}, {"home", "office"})
    assert key.rate == Rate(5, 60.0)
    ring = KeyRing([key, parse_line("other name=other")])
    assert ring.find("door-key") is key and ring.find("door-key ") is None and ring.find(hashed_form("door-key")) is None
    assert ring.find("other").name == "other" and ring.find("") is None
    assert parse_line("   # a comment") is None and parse_line("") is None


@pytest.mark.parametrize("line, says", [
    ("k scopes=embed,root", "scopes="), ("k scopes=", "scopes="), ("k galleries=a/b", "galleries="),
    ("k galleries=", "galleries="), ("k rate=fast", "N/s"), ("k rate=0/s", "above 0"),
    ("k colour=red", "not an attribute"), ("k name=a name=b", "twice"), ("k name=has space", "not an attribute"),
    ("k name=bad/name", "name="), ("sha256:abc", "64 hex"), ("name=x", "starts with the key"),
])
def test_bad_lines_say_what_is_wrong(line, says):
    with pytest.raises(KeyFileError, match=re.escape(says)):
        parse_line(line, "keys.txt line 1")


def test_two_keys_with_one_name_are_refused():
    with pytest.raises(KeyFileError, match="'cam'"):
        parse_lines([("1", "a name=cam"), ("2", "b name=cam")])


def test_a_bad_keys_file_stops_the_app(tmp_path, extractor):
    keys = tmp_path / "keys.txt"
    keys.write_text("good name=good\nbad scopes=everything\n")
    with pytest.raises(KeyFileError, match="line 2"):
        create_app({"weights": "synthetic", "arch": "ir_18", "api_keys_file": str(keys), "warmup": False,
                    "gallery_url": f"sqlite:///{tmp_path}/g.db"}, extractor=extractor)


# -- rates -------------------------------------------------------------------------------------


def test_rates_parse_and_refill():
    assert parse_rate("10/s") == Rate(10, 1.0) and parse_rate("600/min") == Rate(600, 60.0)
    assert parse_rate("") is None and str(parse_rate("5/h")) == "5/h"
    now = [100.0]
    limiter = RateLimiter(clock=lambda: now[0])
    rate = Rate(2, 1.0)
    assert [limiter.take("a", rate) for _ in range(2)] == [0.0, 0.0]
    wait = limiter.take("a", rate)
    assert 0.49 < wait <= 0.5 and retry_after(wait) == "1"
    assert limiter.take("b", rate) == 0.0            # buckets are per client
    now[0] += 0.5
    assert limiter.take("a", rate) == 0.0            # half a second refilled one request
    assert limiter.take("a", None) == 0.0            # no rate, no limit


def test_keyless_buckets_are_bounded():
    limiter = RateLimiter(max_clients=3)
    for n in range(10):
        limiter.take(f"addr{n}", Rate(1, 1.0))
    assert len(limiter._buckets) == 3


def test_keyless_scopes_table():
    assert access.keyless_scopes(keys_configured=False, open_galleries=False) == {"embed"}
    assert access.keyless_scopes(keys_configured=False, open_galleries=True) == frozenset(SCOPES)
    assert access.keyless_scopes(keys_configured=True, open_galleries=False) == frozenset()
    assert access.keyless_scopes(keys_configured=True, open_galleries=True) == {"gallery:read", "gallery:write"}


def test_every_route_has_a_scope_or_is_open(tmp_path, extractor):
    app = create_app({"weights": "synthetic", "arch": "ir_18", "open_galleries": True, "warmup": False,
                      "gallery_url": f"sqlite:///{tmp_path}/g.db"}, extractor=extractor)
    endpoints = {rule.endpoint for rule in app.url_map.iter_rules()}
    unclassified = endpoints - set(access.SCOPE_OF) - access.OPEN_ENDPOINTS
    assert not unclassified, f"add these endpoints to serving.access.SCOPE_OF: {sorted(unclassified)}"
    assert set(access.SCOPE_OF.values()) <= set(SCOPES)
    assert not set(access.SCOPE_OF) - endpoints     # no stale entries


# -- the matrix on a real server ---------------------------------------------------------------

KEYS = {  # name -> (key, attributes)
    "admin": ("admin-key-0123456789", ""),
    "embedder": ("embed-key-0123456789", "scopes=embed"),
    "reader": ("read-key-0123456789", "scopes=gallery:read"),
    "writer": ("write-key-0123456789", "scopes=gallery:write"),
    "home": ("home-key-0123456789", "scopes=gallery:read,gallery:write galleries=home"),
}
HASHED = "hashed-key-0123456789"
LIMITED = "limited-key-0123456789"


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """A server with the keys file above, two galleries (home, other) each with identity a and a face."""
    root = tmp_path_factory.mktemp("access")
    keys = root / "keys.txt"
    lines = [f"{key} name={name} {attrs}" for name, (key, attrs) in KEYS.items()]
    lines += ["# a comment", f"{hashed_form(HASHED)} name=hashed scopes=gallery:read",
              f"{LIMITED} name=limited scopes=embed rate=2/s"]
    keys.write_text("\n".join(lines) + "\n")
    server = Server(store_url("sqlite", root), root / "server.log",
                    env={"ADAFACE_API_KEYS_FILE": str(keys), "ADAFACE_OPEN_GALLERIES": "false"})
    try:
        server.wait_ready()
        admin = bearer(KEYS["admin"][0])
        for n, gallery in enumerate(("home", "other")):
            assert call(server.port, "POST", "/v1/galleries", {"name": gallery}, headers=admin)[0] == 201
            status, body = call(server.port, "POST", f"/v1/galleries/{gallery}/identities/a/faces", crop_png(n),
                                headers=admin)
            assert status == 201, body
            server.face_ids = getattr(server, "face_ids", {})
            server.face_ids[gallery] = body["results"][0]["face_id"]
        yield server
    finally:
        server.kill()


def routes(gallery: str, face_id: int) -> list:
    """(scope or None, method, path, body) for every route, with requests that do no harm: writes
    aim at identities and faces that do not exist, or bodies that are refused after the checks."""
    g = f"/v1/galleries/{gallery}"
    photo = crop_png(7)
    return [
        (None, "GET", "/", None), (None, "GET", "/livez", None), (None, "GET", "/readyz", None),
        (None, "GET", "/metrics", None), (None, "GET", "/openapi.json", None),
        ("admin", "GET", "/info", None), ("admin", "GET", f"/v1/audit?gallery={gallery}", None),
        *[("embed", "POST", p, b"") for p in ("/b64_represent_json", "/b64_represent_byte", "/byte_represent_json",
                                              "/byte_represent_byte", "/represent_json", "/represent_bytes",
                                              "/v1/embed", "/v1/verify")],
        ("gallery:read", "GET", "/v1/galleries", None),
        ("gallery:read", "GET", g, None),
        ("gallery:read", "GET", f"{g}/identities", None),
        ("gallery:read", "GET", f"{g}/identities/a", None),
        ("gallery:read", "POST", f"{g}/identify", photo),
        ("gallery:read", "GET", f"{g}/faces/{face_id}/crop", None),
        ("gallery:read", "POST", f"{g}/identities/a/verify", photo),
        ("gallery:read", "GET", f"{g}/reembed", None),
        ("gallery:write", "POST", "/v1/galleries", b'{"name": 1}'),
        ("gallery:write", "DELETE", "/v1/galleries/ghost", None),
        ("gallery:write", "PATCH", f"{g}/identities/nobody", b'{"name": "b"}'),
        ("gallery:write", "DELETE", f"{g}/identities/nobody", None),
        ("gallery:write", "POST", f"{g}/identities/a/faces", b""),
        ("gallery:write", "DELETE", f"{g}/faces/999999", None),
        ("gallery:write", "POST", f"{g}/reembed", None),
    ]


def _credentials() -> dict:
    creds = {"no key": {}, "wrong key": bearer("not-a-key"), "wrong X-API-Key": {"X-API-Key": "nope"},
             "hashed": bearer(HASHED)}
    creds.update({name: bearer(key) for name, (key, _) in KEYS.items()})
    return creds


SCOPES_OF = {"no key": set(), "wrong key": None, "wrong X-API-Key": None, "hashed": {"gallery:read"},
             "admin": set(SCOPES), "embedder": {"embed"}, "reader": {"gallery:read"},
             "writer": {"gallery:write"}, "home": {"gallery:read", "gallery:write"}}


def test_every_route_for_every_credential(keyed):
    failures = []
    for who, headers in _credentials().items():
        scopes = SCOPES_OF[who]
        for gallery in ("home", "other"):
            for scope, method, path, body in routes(gallery, keyed.face_ids[gallery]):
                sent = {**headers, **({"Content-Type": "application/json"} if body and body.startswith(b"{") else {})}
                status, _, answer = request(keyed.port, method, path, body, sent)
                if scope is None:
                    expected = "200"
                elif scopes is None:
                    expected = "401"                                 # a key that matches none
                elif scope not in scopes and "admin" not in scopes:
                    expected = "401" if who == "no key" else "403"
                elif who == "home" and gallery == "other" and path.startswith("/v1/galleries/other"):
                    expected = "404 gallery_not_found"              # hidden, as if it did not exist
                elif path == "/v1/galleries/ghost":
                    expected = "404 gallery_not_found"              # allowed; there is no such gallery
                else:
                    expected = "allowed"
                ok = (status == 200 if expected == "200" else
                      status not in (401, 403, 429) and b"gallery_not_found" not in answer if expected == "allowed" else
                      status == 404 and b'"gallery_not_found"' in answer if expected.startswith("404") else
                      status == int(expected))
                if not ok:
                    failures.append(f"{who} {method} {path}: {status} {answer[:120]!r}, expected {expected}")
                if status in (401, 403):
                    assert b'"error"' in answer and b"-key-0123456789" not in answer
    assert not failures, "\n".join(failures)
    # nothing the matrix sent changed the galleries
    status, body = call(keyed.port, "GET", "/v1/galleries", headers=bearer(KEYS["admin"][0]))
    assert [(g["name"], g["faces"]) for g in body["galleries"]] == [("home", 1), ("other", 1)]


def test_head_and_options_need_what_get_needs(keyed):
    for method in ("HEAD", "OPTIONS"):
        for path in ("/v1/galleries", "/v1/galleries/home/identities", "/info"):
            assert request(keyed.port, method, path)[0] == 401, (method, path)
        assert request(keyed.port, method, "/v1/galleries/home", headers=bearer(KEYS["reader"][0]))[0] == 200
        assert request(keyed.port, method, "/v1/galleries/home", headers=bearer(KEYS["writer"][0]))[0] == 403
        assert request(keyed.port, method, "/v1/galleries/other", headers=bearer(KEYS["home"][0]))[0] == 404
        assert request(keyed.port, method, "/livez")[0] == 200


def test_a_gallery_limited_key_sees_and_makes_only_its_galleries(keyed):
    home = bearer(KEYS["home"][0])
    status, body = call(keyed.port, "GET", "/v1/galleries", headers=home)
    assert status == 200 and [g["name"] for g in body["galleries"]] == ["home"]
    status, body = call(keyed.port, "POST", "/v1/galleries", {"name": "elsewhere"}, headers=home)
    assert status == 403 and body["error"]["code"] == "forbidden"
    # the 404 for a hidden gallery is the 404 for a missing one, word for word
    hidden = call(keyed.port, "GET", "/v1/galleries/other", headers=home)
    missing = call(keyed.port, "GET", "/v1/galleries/nosuch", headers=bearer(KEYS["admin"][0]))
    assert hidden[0] == missing[0] == 404
    assert hidden[1]["error"]["message"].replace("other", "X") == missing[1]["error"]["message"].replace("nosuch", "X")
    status, body = call(keyed.port, "GET", "/v1/audit", headers=home)
    assert status == 403                                      # the audit trail is admin's
    # deleting: another gallery is out of reach, its own is not (and it may make it again)
    assert call(keyed.port, "DELETE", "/v1/galleries/other", headers=home)[0] == 404
    assert call(keyed.port, "GET", "/v1/galleries/other", headers=bearer(KEYS["admin"][0]))[1]["faces"] == 1
    assert call(keyed.port, "DELETE", "/v1/galleries/home", headers=home)[0] == 200
    assert call(keyed.port, "POST", "/v1/galleries", {"name": "home"}, headers=home)[0] == 201
    status, body = call(keyed.port, "GET", "/v1/audit?gallery=home&limit=2", headers=bearer(KEYS["admin"][0]))
    assert [(e["action"], e["actor"], e["address"]) for e in body["events"]] == [
        ("gallery.create", "home", "127.0.0.1"), ("gallery.delete", "home", "127.0.0.1")]


def test_rate_limited_key_gets_429_then_recovers(keyed):
    limited = bearer(LIMITED)
    time.sleep(1.1)                                           # a full bucket
    statuses = [request(keyed.port, "POST", "/v1/embed", b"", limited) for _ in range(4)]
    assert [s for s, _, _ in statuses[:2]] == [400, 400]      # allowed (and refused for the empty body)
    status, headers, body = statuses[2]
    assert status == 429 and b'"rate_limited"' in body and int(headers["Retry-After"]) >= 1
    time.sleep(1.1)
    assert request(keyed.port, "POST", "/v1/embed", b"", limited)[0] == 400
    # another key is not slowed by this one's limit
    assert all(request(keyed.port, "POST", "/v1/embed", b"", bearer(KEYS["embedder"][0]))[0] == 400 for _ in range(5))


def test_logs_and_metrics_name_keys_never_show_them(keyed):
    request(keyed.port, "GET", "/v1/galleries", headers=bearer(KEYS["reader"][0]))
    request(keyed.port, "GET", "/v1/galleries", headers=bearer("not-a-key"))
    _, _, metrics = request(keyed.port, "GET", "/metrics")
    text = metrics.decode()
    assert re.search(r'adaface_caller_requests_total\{caller="reader",status="200"\} [1-9]', text)
    assert re.search(r'adaface_caller_requests_total\{caller="refused",status="401"\} [1-9]', text)
    time.sleep(0.5)                                           # the access log line is written after the answer
    log = keyed.log.read_text()
    assert re.search(r'127\.0\.0\.1 reader \[.*"GET /v1/galleries HTTP/1\.1" 200', log)
    for key, _ in KEYS.values():
        assert key not in log and key not in text
    assert HASHED not in log and LIMITED not in log


# -- the default configuration -----------------------------------------------------------------


def test_the_default_makes_an_admin_key_and_keeps_embeddings_open(tmp_path):
    key_file = tmp_path / "data" / "admin.key"
    env = {"ADAFACE_ADMIN_KEY_FILE": str(key_file), "ADAFACE_OPEN_GALLERIES": "", "ADAFACE_KEYLESS_RATE": "3/s"}
    # two workers make the key at once: both must end up with the same one
    server = Server(store_url("sqlite", tmp_path), tmp_path / "server.log", workers=2, env=env)
    try:
        server.wait_ready()
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert [p.name for p in key_file.parent.iterdir()] == ["admin.key"]      # no file left aside
        key = key_file.read_text().split()[0]
        assert len(key) >= 40 and str(key_file) in server.log.read_text() and key not in server.log.read_text()
        # galleries and admin routes need the key; the original embedding endpoint does not
        assert call(server.port, "GET", "/v1/galleries")[0] == 401
        assert call(server.port, "POST", "/v1/galleries", {"name": "g"})[0] == 401
        assert call(server.port, "GET", "/info")[0] == 401
        assert all(call(server.port, "GET", "/v1/galleries", headers=bearer(key))[0] == 200 for _ in range(8))
        status, _, body = request(server.port, "POST", "/byte_represent_json", crop_png(1))
        assert status == 200 and len(body) > 1000
        # the keyless rate counts per address, in each worker: a burst of 3 per worker, then 429
        time.sleep(1.1)
        statuses = [request(server.port, "POST", "/v1/embed", b"")[0] for _ in range(8)]
        assert statuses.count(400) <= 6 and 429 in statuses
        assert request(server.port, "GET", "/livez")[0] == 200          # open routes are not counted
    finally:
        server.kill()
    # a restart keeps the key
    again = Server(store_url("sqlite", tmp_path), tmp_path / "server2.log", env=env)
    try:
        again.wait_ready()
        assert key_file.read_text().split()[0] == key
        assert call(again.port, "GET", "/v1/galleries", headers=bearer(key))[0] == 200
    finally:
        again.kill()
