"""`imgindex serve` on a shared machine: private by default, images served as
images only, every malformed request a 4xx. Tried as another user of the node
would try it: without the token, from another origin, with crafted bodies."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
import requests
from PIL import Image

from imgindex.pipeline.discover import image_id
from imgindex.pipeline.synthetic import write_photos
from imgindex.service.pages import STATIC_DIR as STATIC
from tests.conftest import ARTIFACTS
from tests.helpers import RunningService, listening_ports

pytestmark = pytest.mark.slow

# Every operation but /health, with a path that reaches its handler.
PRIVATE = [
    ("GET", "/"),
    ("GET", "/static/app.js"),
    ("GET", "/static/index.html"),
    ("GET", "/api/status"),
    ("GET", "/api/openapi.json"),
    ("GET", "/metrics"),
    ("GET", "/api/indexes"),
    ("GET", "/api/indexes/beach"),
    ("GET", f"/api/indexes/beach/images/{image_id('img00000.jpg')}"),
    ("GET", f"/api/indexes/beach/images/{image_id('img00000.jpg')}/thumbnail"),
    ("GET", f"/api/indexes/beach/images/{image_id('img00000.jpg')}/info"),
    ("GET", "/api/indexes/beach/duplicates"),
    ("POST", "/api/indexes/beach/search"),
    ("GET", "/api/datasets"),
    ("GET", "/api/builds"),
    ("POST", "/api/builds"),
    ("GET", "/api/builds/abc"),
    ("DELETE", "/api/builds/abc"),
    ("POST", "/api/build_index"),
    ("GET", "/no/such/route"),
]


def test_every_route_but_health_needs_the_token(beach):
    for method, path in PRIVATE:
        r = beach.request(method, path, auth=False, json={"id": "1"})
        assert r.status_code == 401, (method, path, r.status_code, r.text[:200])
        if path == "/":  # a browser is asked for the token, with a form
            assert r.headers["Content-Type"].startswith("text/html")
            assert '<form method="get" action="/">' in r.text
            continue
        assert "needs its token" in r.json()["error"], path
        wrong = beach.request(
            method, path, auth=False, headers={"Authorization": "Bearer s3cret"}
        )
        assert wrong.status_code == 401, (method, path)
    # /health reveals nothing but that the service is up.
    health = beach.request("GET", "/health", auth=False)
    assert health.status_code == 200 and health.json() == {"status": "ok"}


def test_the_printed_url_sets_a_private_cookie_then_leaves_the_address(beach):
    session = requests.Session()
    first = session.get(beach.login_url, allow_redirects=False, timeout=30)
    assert first.status_code == 303 and first.headers["Location"] == "/"
    cookie = first.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    name, value = cookie.split(";")[0].split("=", 1)
    assert name.startswith("imgindex-") and beach.token not in cookie
    assert len(value) == 64  # derived from the token, not the token
    page = session.get(beach.url + "/", timeout=30)
    assert page.status_code == 200 and "<title>imgindex</title>" in page.text
    assert session.get(beach.url + "/api/indexes", timeout=30).status_code == 200

    wrong = requests.get(beach.url + "/?token=guess", allow_redirects=False, timeout=30)
    assert (
        wrong.status_code == 401
        and "That token is wrong for this service." in wrong.text
    )
    assert "Set-Cookie" not in wrong.headers


def test_a_page_of_another_origin_cannot_change_anything(beach):
    session = requests.Session()
    session.get(beach.login_url, timeout=30)  # holds the page's cookie now
    body = {"datasets": ["no-such-folder"]}
    own = beach.url
    other_port = re.sub(r":\d+$", ":1", own)
    for origin, fetch_site, status, words in [
        ("http://evil.example", None, 403, "may not change anything"),
        (other_port, None, 403, "may not change anything"),  # same site, other port
        ("null", None, 403, "opaque origin"),
        (None, None, 403, "must come from its page"),
        (None, "cross-site", 403, "must come from its page"),
        (own, "same-origin", 404, "no dataset folder"),  # past the check
        (None, "same-origin", 404, "no dataset folder"),
    ]:
        headers = {
            k: v for k, v in [("Origin", origin), ("Sec-Fetch-Site", fetch_site)] if v
        }
        for method, path in [("POST", "/api/builds"), ("POST", "/api/build_index")]:
            payload = (
                body if path == "/api/builds" else {"dataset_names": body["datasets"]}
            )
            r = session.request(
                method, beach.url + path, json=payload, headers=headers, timeout=30
            )
            assert r.status_code == status, (origin, path, r.text)
            assert words in r.json()["error"], (origin, r.text)
        gone = session.delete(
            beach.url + "/api/builds/abc", headers=headers, timeout=30
        )
        assert gone.status_code == (404 if status == 404 else 403), (origin, gone.text)
    # Reads are not state changes: the page's own GETs need no Origin.
    assert session.get(beach.url + "/api/builds", timeout=30).status_code == 200
    # A program with the token in a header is not a page: no Origin needed.
    r = beach.request("POST", "/api/builds", json=body)
    assert r.status_code == 404, r.text


def test_every_answer_forbids_scripts_framing_and_sniffing(beach):
    for path in [
        "/",
        "/static/app.js",
        "/api/indexes",
        f"/api/indexes/beach/images/{image_id('img00000.jpg')}",
        "/api/indexes/nope",
    ]:
        for auth in (True, False):
            r = beach.request("GET", path, auth=auth)
            csp = r.headers["Content-Security-Policy"]
            assert "script-src 'self'" in csp and "default-src 'none'" in csp, path
            assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
            assert r.headers["X-Content-Type-Options"] == "nosniff", path
            assert r.headers["Referrer-Policy"] == "no-referrer", path
    # The pages hold no inline script or style that such a policy would block.
    for name in ("index.html", "login.html"):
        text = (STATIC / name).read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)", text), name
        assert not re.search(r"\son\w+=|\sstyle=|<style", text), name
    assert "localStorage" not in (STATIC / "app.js").read_text()


def test_the_scheduler_address_is_never_shown_to_an_api_client(beach):
    texts = [
        beach.request("GET", path).text
        for path in ("/api/status", "/api/builds", "/health", "/metrics")
    ]
    status = json.loads(texts[0])
    assert status["cluster"]["kind"] == "local"
    assert "address" not in status["cluster"]
    service_port = int(beach.url.rsplit(":", 1)[1])
    dashboard_port = int(re.search(r":(\d+)/", status["cluster"]["dashboard"])[1])
    dask_ports = set(listening_ports(beach.process.pid)) - {
        service_port,
        dashboard_port,
    }
    assert len(dask_ports) >= 3  # the scheduler, and each worker and its nanny
    for text in texts:
        assert "tls://" not in text and "tcp://" not in text
        for port in dask_ports:
            assert f":{port}" not in text, (port, text[:300])


def test_a_dataset_file_replaced_by_a_page_is_never_served_as_one(
    service, browser, tmp_path
):
    folder = service.dataset_root / "swapped"
    photos = write_photos(folder, 4, seed=61, max_side=320)
    with Image.open(photos[0]) as im:
        im.save(folder / "scan.tif")  # a format browsers do not show
        im.save(folder / "phone.heic", "HEIF")  # nor this, lossy already
        im.save(folder / "really-a-jpeg.png", "JPEG")  # the name lies
    assert service.wait(service.build("swapped")["id"])["state"] == "finished"
    # After the build: one file becomes a link to a page in the dataset, one
    # is overwritten with a page. Their scripts would read the API as the user.
    script = (
        "<script>window.pwned = true; document.title = 'pwned';"
        "fetch('/api/status').then(r => r.text()).then(t => window.loot = t);"
        "</script>"
    )
    (folder / "page.html").write_text(f"<html><body>hello{script}</body></html>")
    photos[1].unlink()
    photos[1].symlink_to(folder / "page.html")
    photos[2].write_bytes(f"<!doctype html><html>{script}</html>".encode())

    def image(name: str, query: str = ""):
        return service.request(
            "GET", f"/api/indexes/swapped/images/{image_id(name)}{query}"
        )

    for name in (photos[1].name, photos[2].name):
        r = image(name)
        assert r.status_code == 415, r.text
        assert r.headers["Content-Type"].startswith("application/json")
        assert "is not an image" in r.json()["error"]
    tif = image("scan.tif")
    assert tif.headers["Content-Type"] == "image/png", tif.text[:200]
    assert "filename*=UTF-8''scan.png" in tif.headers["Content-Disposition"]
    with Image.open(io.BytesIO(tif.content)) as im, Image.open(photos[0]) as first:
        assert im.format == "PNG"
        assert im.size == first.size
    heic = image("phone.heic")
    assert heic.headers["Content-Type"] == "image/jpeg", heic.text[:200]
    assert "filename*=UTF-8''phone.jpg" in heic.headers["Content-Disposition"]
    with Image.open(io.BytesIO(heic.content)) as im, Image.open(photos[0]) as first:
        assert (im.format, im.size) == ("JPEG", first.size)
        jpeg_pixels = np.asarray(im.convert("RGB"), np.float32)
        assert np.abs(jpeg_pixels - np.asarray(first.convert("RGB"))).mean() < 4
    lying = image("really-a-jpeg.png")
    assert lying.headers["Content-Type"] == "image/jpeg"
    assert lying.content == (folder / "really-a-jpeg.png").read_bytes()
    plain = image(photos[0].name)
    assert plain.headers["Content-Disposition"].startswith("inline;")
    assert (
        image(photos[0].name, "?download=1")
        .headers["Content-Disposition"]
        .startswith("attachment;")
    )

    # In a real browser holding the page's cookie, the swapped file runs nothing.
    browser.get(service.login_url)
    for name in (photos[1].name, photos[2].name):
        browser.get(f"{service.url}/api/indexes/swapped/images/{image_id(name)}")
        assert browser.execute_script("return document.contentType") == (
            "application/json"
        )
        assert browser.execute_script("return window.pwned === undefined")
        assert browser.title != "pwned"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "serve-swapped-file.png"))


def test_malformed_requests_get_a_one_line_4xx(beach):
    deep = b"[" * 100_000 + b"]" * 100_000
    search = "/api/indexes/beach/search"
    cases = [
        ("GET", "/static/index.html%00", {}, 404),
        ("GET", "/static/%00", {}, 404),
        (
            "POST",
            search,
            {"headers": {"Content-Type": "multipart/form-data"}, "data": b"x"},
            400,
        ),
        (
            "POST",
            search,
            {
                "headers": {"Content-Type": "multipart/form-data; boundary=zz"},
                "data": b"--zz\r\nContent-Disposition: form-data; name=image\r\n",
            },
            400,
        ),
        ("POST", search, {"headers": _JSON, "data": deep}, 400),
        ("POST", "/api/builds", {"headers": _JSON, "data": deep}, 400),
        ("POST", "/api/build_index", {"headers": _JSON, "data": deep}, 400),
        ("POST", "/api/build_index", {"json": {"dataset_names": "beach"}}, 400),
        (
            "POST",
            "/api/build_index",
            {"json": {"dataset_names": ["beach"], "distributed": "maybe"}},
            400,
        ),
    ]
    for method, path, kwargs, status in cases:
        r = beach.request(method, path, **kwargs)
        assert r.status_code == status, (path, r.status_code, r.text[:300])
        error = r.json()["error"]
        assert error and "\n" not in error and "Traceback" not in error
    assert "Traceback" not in "".join(beach.log)


_JSON = {"Content-Type": "application/json"}


def test_the_old_services_build_request_is_followed_like_any_build(service):
    write_photos(service.dataset_root / "oldclient", 6, seed=71, max_side=320)
    r = service.request(
        "POST",
        "/api/build_index",
        json={"dataset_names": ["oldclient"], "distributed": True},
    )
    assert r.status_code == 202, r.text
    answer = r.json()
    assert answer["build_id"] == answer["id"]
    assert r.headers["Location"] == f"/api/builds/{answer['id']}"
    done = service.wait(answer["build_id"])
    assert done["state"] == "finished", done
    assert done["summaries"][0]["indexed"] == 6


def test_a_token_is_made_when_none_is_given_and_env_gives_one(tmp_path):
    made = RunningService(tmp_path / "a" / "indexes", None, None)
    try:
        assert len(made.token) >= 32
        assert made.request("GET", "/api/indexes", auth=False).status_code == 401
        assert made.request("GET", "/api/indexes").status_code == 200
        # The other defaults: loopback only, and no builds without --dataset-root.
        port = int(made.url.rsplit(":", 1)[1])
        assert _listening_hosts(made.process.pid, port) == {"127.0.0.1"}
        assert made.request("GET", "/api/status").json()["builds_allowed"] is False
        refused = made.request("POST", "/api/builds", json={"datasets": ["x"]})
        assert refused.status_code == 403
        assert "start `imgindex serve` with --dataset-root" in refused.json()["error"]
    finally:
        assert made.stop() == 0
    given = RunningService(
        tmp_path / "b" / "indexes", None, None, env={"IMGINDEX_SERVE_TOKEN": "from-env"}
    )
    try:
        assert given.token == "from-env"
        assert given.request("GET", "/api/indexes").status_code == 200
    finally:
        assert given.stop() == 0


def test_a_missing_index_root_is_made_only_where_builds_can_fill_it(service, tmp_path):
    from tests.helpers import invoke, one_error_line

    # The session's service was given a dataset root and a new index folder.
    ready = next(line for line in service.log if line.startswith("imgindex serve: "))
    assert f"indexes under {service.index_root} (created); builds of" in ready
    typo = tmp_path / "indxes"
    run = invoke("serve", "--index-root", typo, "--port", "0")
    assert run.exit_code == 2
    assert one_error_line(run.stderr) == (
        f"Error: Invalid value for --index-root: {typo} does not exist, and with "
        "no --dataset-root no build could make indexes there (mkdir it to serve "
        "indexes built into it later)"
    )
    deeper = tmp_path / "lab" / "indexes"
    run = invoke("serve", "--index-root", deeper, "--dataset-root", tmp_path)
    assert run.exit_code == 2
    assert one_error_line(run.stderr).endswith(
        f"{deeper}: its parent folder does not exist"
    )
    assert sorted(tmp_path.iterdir()) == []  # nothing made


def test_no_token_is_an_explicit_logged_choice(tmp_path):
    (tmp_path / "indexes").mkdir()
    open_service = RunningService(tmp_path / "indexes", None, None, "--no-token")
    try:
        assert "?token=" not in open_service.printed
        assert (
            open_service.request("GET", "/api/status", auth=False).json()[
                "token_required"
            ]
            is False
        )
    finally:
        assert open_service.stop() == 0
    log = "".join(open_service.log)
    assert "WARNING" in log and "serving without a token (--no-token)" in log


def test_a_unix_socket_only_its_owner_can_open(tmp_path):
    from tests.intruder import UnixConnection, http_status

    sock = tmp_path / "imgindex.sock"
    on_socket = RunningService(tmp_path / "indexes", None, None, "--unix-socket", sock)
    try:
        assert on_socket.printed == f"unix:{sock}"
        assert "ssh -N -L 8000:" in "".join(on_socket.log)
        assert sock.stat().st_mode & 0o777 == 0o600
        auth = {"Authorization": f"Bearer {on_socket.token}"}
        assert http_status(UnixConnection(str(sock)), "/api/indexes", auth).startswith(
            "200"
        )
        assert http_status(UnixConnection(str(sock)), "/api/indexes", {}).startswith(
            "401"
        )
    finally:
        assert on_socket.stop() == 0
    assert not sock.exists()  # ours, so removed on the way out

    # Something else at the path is never replaced.
    sock.write_text("not a socket")
    from tests.helpers import invoke, one_error_line

    run = invoke("serve", "--index-root", tmp_path / "indexes", "--unix-socket", sock)
    assert run.exit_code == 1
    assert "exists and is not a socket of yours" in one_error_line(run.stderr)
    assert sock.read_text() == "not a socket"


def _raw_get(service, path: str) -> tuple[int, str]:
    """GET ``path`` byte for byte: requests would normalise the dots away."""
    import http.client
    from urllib.parse import urlsplit

    where = urlsplit(service.url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
    try:
        conn.request("GET", path, headers=service.auth())
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        conn.close()


def test_no_route_reaches_a_file_outside_what_it_serves(beach):
    inside = image_id("img00000.jpg")
    for path in [
        "/static/../setup.cfg",
        "/static/..%2f..%2fsetup.cfg",
        "/static/%2e%2e/%2e%2e/setup.cfg",
        "/static//etc/passwd",
        "/api/indexes/..%2f..%2fetc",
        "/api/indexes/beach%2f..%2f..%2f/duplicates",
        "/api/indexes/beach/images/..%2f..%2fetc%2fpasswd",
        f"/api/indexes/beach/images/{inside}%2f..%2f..%2fsetup.cfg",
        "/api/builds/..%2f..%2fsetup.cfg",
    ]:
        status, body = _raw_get(beach, path)
        assert 400 <= status < 500, (path, status, body[:200])
        assert "[metadata]" not in body and "root:" not in body, path
        assert json.loads(body)["error"], path


def test_an_upload_claiming_billions_of_pixels_is_refused_unread(beach):
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG")
    png = bytearray(buffer.getvalue())
    # IHDR's width and height (bytes 16-24), then its CRC: 100,000 x 100,000.
    png[16:24] = struct.pack(">II", 100_000, 100_000)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    r = beach.request(
        "POST",
        "/api/indexes/beach/search",
        files={"image": ("bomb.png", bytes(png), "image/png")},
    )
    assert r.status_code == 400, r.text
    assert "over the limit" in r.json()["error"]


def test_health_answers_while_fifty_searches_wait(beach, photo_sets):
    """The loop is never blocked: /health is answered while many searches
    (each an embedding in the one model thread) are still waiting."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    upload = photo_sets["beach"][3].read_bytes()
    finished: list[tuple[str, int]] = []  # (what, status) in the order answered
    # All 50 sent at once, as the first /health is: on a fast machine half
    # of them once finished while the pool was still starting the rest, and
    # no /health was sent at all.
    together = threading.Barrier(51, timeout=60)

    def search() -> None:
        together.wait()
        r = beach.request(
            "POST",
            "/api/indexes/beach/search",
            files={"image": ("q.jpg", upload, "image/jpeg")},
        )
        finished.append(("search", r.status_code))

    # For each /health: the searches that finished while it was in flight,
    # and those left to finish when it was sent.
    waited: list[tuple[int, int]] = []
    with ThreadPoolExecutor(50) as pool:
        searches = [pool.submit(search) for _ in range(50)]
        together.wait()
        before = 0
        while before < 25:  # while half of them wait, and at least once
            before = sum(f.done() for f in searches)
            r = beach.request("GET", "/health", auth=False)
            finished.append(("health", r.status_code))
            waited.append((sum(f.done() for f in searches) - before, 50 - before))
        for f in searches:
            f.result()
    statuses = {status for _, status in finished}
    assert statuses == {200}, finished
    # /health did not wait for the searches queued ahead of it: a blocked
    # loop would answer each only after (nearly) all of them. Measured here,
    # 0 or 1 finished while one was in flight, 26-50 left. Any one will do:
    # counting the searches finished before the first answer (28 once, on a
    # busy 2-core machine) measured how fast that first round trip was.
    assert any(done < left / 2 for done, left in waited), waited


def _listening_hosts(pid: int, port: int) -> set[str]:
    import psutil

    conns = psutil.Process(pid).net_connections(kind="inet")
    return {c.laddr.ip for c in conns if c.status == "LISTEN" and c.laddr.port == port}


def test_max_builds_refuses_one_more_build_while_they_run(tmp_path, photo_sets):
    from tests.conftest import copy_tree

    datasets = tmp_path / "datasets"
    write_photos(datasets / "large", 120, seed=97, max_side=320)
    copy_tree(photo_sets["forest"][:4], datasets / "small")
    one = RunningService(
        tmp_path / "indexes",
        datasets,
        "t0ken",
        env={"DASK_IMGINDEX__SERVE__MAX_BUILDS": "1"},
    )
    try:
        first = one.build("large")
        second = one.request("POST", "/api/builds", json={"datasets": ["small"]})
        state = one.request("GET", f"/api/builds/{first['id']}").json()["state"]
        assert state in ("starting", "running"), "the first build ended too soon"
        assert second.status_code == 429, second.text
        assert "imgindex.serve.max-builds" in second.json()["error"]
        assert one.wait(first["id"])["state"] == "finished"
        assert one.wait(one.build("small")["id"])["state"] == "finished"
    finally:
        assert one.stop() == 0
