"""The web console at /ui in a real browser: Debian's chromium driven by Playwright, against a
real gunicorn server with synthetic IR-18 weights, on the shared photos.

Nothing is downloaded: Playwright starts the system's chromium (``ADAFACE_CHROMIUM``, default
``/usr/bin/chromium``), and every request the page makes is checked to stay on the server.
A screenshot of each page is saved under ``test-artifacts/console/`` (``ADAFACE_TEST_ARTIFACTS``
moves it), not committed. Without chromium the tests are skipped locally and fail in CI.
"""
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FACEDATA, REPO, photo
from test_http import GREY, two_faces
from test_server import ir18_ckpt, request, start  # noqa: F401 (ir18_ckpt: a fixture)

pytestmark = [pytest.mark.server, pytest.mark.slow]

CHROMIUM = os.environ.get("ADAFACE_CHROMIUM", "/usr/bin/chromium")
#: what a browser in a closed network needs: no sandbox as root, and none of its own traffic
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("ADAFACE_TEST_ARTIFACTS", REPO / "test-artifacts")) / "console"
KEY = "console-test-key-0123456789"
TIMEOUT_MS = 120_000


def _browser_or_skip():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not (shutil.which(CHROMIUM) or Path(CHROMIUM).is_file()):
        message = f"chromium not found at {CHROMIUM} (apt-get install chromium; .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return sync_api


@pytest.fixture(scope="module")
def playwright_browser():
    sync_api = _browser_or_skip()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def open_server(ir18_ckpt, tmp_path_factory):
    server = start(tmp_path_factory.mktemp("console-open"), ir18_ckpt)
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    """Keys configured, and the built-in synthetic weights (the console warns about them)."""
    server = start(tmp_path_factory.mktemp("console-keyed"), "synthetic", ADAFACE_ARCH="ir_18", ADAFACE_API_KEYS=KEY,
                   ADAFACE_OPEN_GALLERIES="false")
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """The shared photos as files the file inputs can take."""
    folder = tmp_path_factory.mktemp("console-photos")
    out = {"group": folder / "group.png", "grey": folder / "grey.png"}
    out["group"].write_bytes(two_faces())
    out["grey"].write_bytes(GREY)
    for name in ("img1.jpg", "img2.jpg", "img3.jpg"):
        path = FACEDATA / "deepface" / name
        if not path.is_file():
            pytest.skip(f"shared photo {path} not found")
        out[name] = path
    out["img1.jpeg"] = folder / "img1.jpeg"
    out["img1.jpeg"].write_bytes(photo("img1.jpeg"))
    return out


class Page:
    """A browser tab on the console that records every request that leaves the server."""

    def __init__(self, browser, port: int, width: int = 1280):
        self.port = port
        self.context = browser.new_context(viewport={"width": width, "height": 900})
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.outside, self.console_errors = [], []
        origin = f"http://127.0.0.1:{port}"
        self.page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(origin)
                        else (self.outside.append(route.request.url), route.abort()))
        # script errors; an API answer of 4xx is logged by chromium as a failed load and shown by the page
        self.page.on("console", lambda m: self.console_errors.append(m.text)
                     if m.type == "error" and not m.text.startswith("Failed to load resource") else None)
        self.page.on("pageerror", lambda e: self.console_errors.append(str(e)))
        self.page.on("dialog", lambda d: d.accept())       # the delete confirmations

    def open(self, page: str):
        self.page.goto(f"http://127.0.0.1:{self.port}/ui/#{page}")
        self.page.wait_for_selector("body[data-ready=true]")
        return self.page

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def tab(playwright_browser, open_server):
    t = Page(playwright_browser, open_server.port)
    yield t
    t.close()
    assert t.outside == [], f"the console asked for something outside the service: {t.outside}"


def api(port: int, method: str, path: str, body: bytes = None, headers=None) -> dict:
    status, _, data = request(port, method, path, body, headers)
    assert status < 300, data
    return json.loads(data)


def test_a_browser_is_sent_to_the_console_and_api_clients_keep_the_json(open_server):
    status, headers, _ = request(open_server.port, "GET", "/", headers={"Accept": "text/html,*/*;q=0.8"})
    assert status == 303 and headers["Location"].endswith("/ui/")
    status, _, body = request(open_server.port, "GET", "/", headers={"Accept": "*/*"})
    assert status == 200 and json.loads(body)["service"] == "adaface"
    status, headers, body = request(open_server.port, "GET", "/ui/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    assert request(open_server.port, "GET", "/ui/../flask_http_server.py")[0] == 404
    assert request(open_server.port, "GET", "/ui/nothing-here.js")[0] == 404
    status, headers, _ = request(open_server.port, "GET", "/ui")
    assert status == 308 and headers["Location"].endswith("/ui/")


def test_every_console_asset_is_in_the_repository():
    folder = REPO / "serving" / "console"
    text = "\n".join(p.read_text() for p in folder.rglob("*") if p.is_file())
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text.replace("http://www.w3.org/2000/svg", "")), \
        "the console must not load anything from another host"
    for ref in re.findall(r'(?:src|href)="(/ui/[^"]+)"', (folder / "index.html").read_text()):
        assert (folder / ref.removeprefix("/ui/")).is_file(), ref
    for module in folder.glob("js/*.js"):
        for imported in re.findall(r'from "\./([^"]+)"', module.read_text()):
            assert (folder / "js" / imported).is_file(), f"{module.name} imports {imported}"


def test_inspect_a_group_photo(tab, files, open_server):
    page = tab.open("inspect")
    page.set_input_files("#inspect-file", str(files["group"]))
    page.click("#inspect-form button[type=submit]")
    page.wait_for_selector("#inspect-result li.face")
    expected = api(open_server.port, "POST", "/v1/embed?faces=all", files["group"].read_bytes())["faces"]
    assert len(expected) == 2
    assert page.locator("#inspect-result svg rect").count() == len(expected)
    assert page.locator("#inspect-result svg circle.landmark").count() == 5 * len(expected)
    qualities = page.locator("#inspect-result dd[data-fact=quality]").all_inner_texts()
    assert [float(q) for q in qualities] == [round(f["norm"], 2) for f in expected]
    crops = page.locator("#inspect-result img.crop")
    assert crops.count() == 2 and all(crops.nth(i).evaluate("i => i.naturalWidth") == 112 for i in range(2))
    areas = [(f["box"][2] - f["box"][0]) * (f["box"][3] - f["box"][1]) for f in expected]
    picked = page.locator("#inspect-result li.face:has(.tag)")
    assert picked.count() == 1 and picked.get_attribute("data-face") == str(int(np.argmax(areas)) + 1)
    assert page.locator("#inspect-result svg rect.picked").get_attribute("data-face") == str(int(np.argmax(areas)) + 1)
    with page.expect_download() as download:
        page.locator("#inspect-result li.face").first.get_by_role("button", name="Embedding as float32").click()
    vector = np.frombuffer(Path(download.value.path()).read_bytes(), "<f4")
    assert np.allclose(vector, expected[0]["embedding"], atol=1e-6)
    tab.shot("inspect")
    assert tab.console_errors == []


def test_inspect_shows_the_api_error_for_a_photo_without_a_face(tab, files):
    page = tab.open("inspect")
    page.set_input_files("#inspect-file", str(files["grey"]))
    page.click("#inspect-form button[type=submit]")
    alert = page.locator("#error")
    alert.wait_for(state="visible")
    assert alert.get_attribute("data-code") == "no_face" and "face" in alert.inner_text().lower()
    assert page.locator("#inspect-result li.face").count() == 0
    tab.shot("inspect-no-face")


def test_inspect_pasted_base64(tab, files):
    import base64
    page = tab.open("inspect")
    page.fill("#inspect-b64", base64.b64encode(files["img1.jpeg"].read_bytes()).decode())
    page.click("#inspect-form button[type=submit]")
    page.wait_for_selector("#inspect-result li.face")
    assert page.locator("#inspect-result li.face").count() == 1


def test_compare_two_photos(tab, files, open_server):
    page = tab.open("compare")
    page.set_input_files("#compare-a", str(files["img1.jpg"]))
    page.set_input_files("#compare-b", str(files["img2.jpg"]))
    page.click("#compare-form button[type=submit]")
    page.wait_for_selector("#compare-verdict")
    boundary = "console-test"
    body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"image{i}\"; filename=\"{i}.jpg\"\r\n"
                    f"Content-Type: image/jpeg\r\n\r\n".encode() + files[n].read_bytes() + b"\r\n"
                    for i, n in ((1, "img1.jpg"), (2, "img2.jpg"))) + f"--{boundary}--\r\n".encode()
    expected = api(open_server.port, "POST", "/v1/verify", body,
                   {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert float(page.inner_text("#compare-similarity")) == pytest.approx(expected["similarity"], abs=1e-4)
    verdict = page.inner_text("#compare-verdict")
    assert verdict == ("Same person" if expected["same_person"] else "Not the same person")
    assert page.locator("#compare-result .scale .mark").count() == 2
    tab.shot("compare")


def test_galleries_create_enroll_identify_rename_delete(tab, files, open_server):
    page = tab.open("galleries")
    page.fill("#gallery-name", "console")
    page.click("#gallery-create button")
    page.wait_for_selector("#gallery-detail:not([hidden])")
    page.fill("#enroll-name", "alice")
    page.set_input_files("#enroll-files", [str(files["img1.jpg"]), str(files["img2.jpg"]), str(files["grey"])])
    page.click("#enroll-form button")
    page.wait_for_selector("#enroll-status:has-text('2 of 3 photos enrolled')")
    assert "grey.png" in page.inner_text("#enroll-status")            # the photo without a face is named
    page.fill("#enroll-name", "bob")
    page.set_input_files("#enroll-files", str(files["img3.jpg"]))
    page.click("#enroll-form button")
    page.wait_for_selector("#identity-list li[data-identity=bob]")
    alice = page.locator("#identity-list li[data-identity=alice]")
    assert alice.locator("img.thumb").count() == 2
    assert alice.locator("img.thumb").first.evaluate("i => i.naturalWidth") == 112
    page.set_input_files("#identify-file", str(files["img1.jpg"]))
    page.click("#identify-form button")
    page.wait_for_selector("#identify-result .identified")
    first = page.locator("#identify-result tbody tr").first
    assert first.locator("td").nth(1).inner_text() == "alice"
    assert float(first.locator("td").nth(2).inner_text()) == pytest.approx(1.0, abs=1e-3)
    assert page.locator("#identify-result .identified").get_attribute("data-decision") == "match"
    assert first.locator("img.thumb").evaluate("i => i.naturalWidth") == 112
    tab.shot("galleries")

    rename = alice.locator("form.rename")
    rename.locator("input").fill("alicia")
    rename.locator("button").click()
    page.wait_for_selector("#identity-list li[data-identity=alicia]")
    names = [i["name"] for i in api(open_server.port, "GET", "/v1/galleries/console/identities")["identities"]]
    assert names == ["alicia", "bob"]
    alicia = page.locator("#identity-list li[data-identity=alicia]")
    alicia.locator("figure button.danger").first.click()
    page.wait_for_selector("#identity-list li[data-identity=alicia] .hint:text-is('1 face')")
    page.locator("#identity-list li[data-identity=bob] > button.danger").click()
    page.wait_for_selector("#identity-list li[data-identity=bob]", state="detached")
    assert api(open_server.port, "GET", "/v1/galleries/console")["faces"] == 1
    page.get_by_role("button", name="delete gallery console").click()
    page.wait_for_selector("#gallery-list li[data-gallery=console]", state="detached")
    assert request(open_server.port, "GET", "/v1/galleries/console")[0] == 404
    assert tab.console_errors == []


def test_status_page_shows_the_model_and_live_figures(tab, open_server):
    page = tab.open("status")
    page.wait_for_selector("#status-model dd[data-fact='weights fingerprint']")
    info = api(open_server.port, "GET", "/info")
    assert page.inner_text("#status-model dd[data-fact='weights fingerprint']") == info["weights_fingerprint"]
    assert page.inner_text("#status-model dd[data-fact=readiness]") == "ready"
    assert info["synthetic"] is False and not page.is_visible("#synthetic-banner")
    page.wait_for_selector("#status-live dd[data-fact='requests/s (last interval)']", timeout=20_000)
    tab.shot("status")


def test_phone_width_and_keyboard(playwright_browser, open_server, files):
    tab = Page(playwright_browser, open_server.port, width=390)
    try:
        page = tab.open("inspect")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        page.keyboard.press("Tab")                                      # the skip link comes first
        assert page.evaluate("document.activeElement.className") == "skip"
        for label in ("Photo (choose or drop a file)", "…or paste base64", "faces", "align", "min_face_size (px)"):
            assert page.get_by_label(label, exact=True).count() == 1, label
        page.get_by_role("link", name="Galleries").focus()
        page.keyboard.press("Enter")
        page.wait_for_selector("#page-galleries:not([hidden])")
        assert page.get_by_role("link", name="Galleries").get_attribute("aria-current") == "page"
        tab.shot("phone")
    finally:
        tab.close()


def test_the_key_prompt_when_keys_are_configured(playwright_browser, keyed_server):
    tab = Page(playwright_browser, keyed_server.port)
    try:
        page = tab.open("galleries")
        dialog = page.locator("#key-dialog")
        dialog.wait_for(state="visible")
        page.wait_for_selector("#synthetic-banner:not([hidden])")       # from /readyz, before any key
        tab.shot("key-prompt")
        page.fill("#key-input", "not-the-key")
        page.click("#key-form button[value=save]")
        alert = page.locator("#error")
        alert.wait_for(state="visible")
        assert alert.get_attribute("data-code") == "unauthorized"
        page.click("#key-button")
        page.fill("#key-input", KEY)
        page.click("#key-form button[value=save]")
        page.goto(f"http://127.0.0.1:{keyed_server.port}/ui/#status")
        page.wait_for_selector("#status-model dd[data-fact='weights fingerprint']")
        assert page.evaluate("sessionStorage.getItem('adaface-api-key')") == KEY
        assert page.inner_text("#status-model dd[data-fact='synthetic weights']") == "yes"
        page.goto(f"http://127.0.0.1:{keyed_server.port}/ui/#galleries")
        page.wait_for_selector("#gallery-list li")
        assert not page.is_visible("#key-dialog")
    finally:
        tab.close()
    assert tab.outside == []
