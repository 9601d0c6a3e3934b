"""`imgindex serve` over HTTP: a real server process, real builds on its cluster."""

from __future__ import annotations

import io
import re
import shutil

import pytest
import requests
from PIL import Image

from imgindex.pipeline.discover import image_id
from imgindex.pipeline.synthetic import write_photos
from tests.conftest import copy_tree, crop_query
from tests.helpers import invoke

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def beach(service):
    """The 'beach' photos indexed through the API (built once for the module)."""
    build = service.build("beach")
    done = service.wait(build["id"])
    assert done["state"] == "finished", done
    return service


def test_build_then_search_a_cropped_copy(beach, photo_sets, tmp_path):
    service = beach
    builds = service.request("GET", "/api/builds").json()["builds"]
    build = next(b for b in builds if b["datasets"][0]["name"] == "beach")
    # The --progress-file shape, finished.
    (d,) = build["datasets"]
    assert d["state"] == "done" and d["done"] == d["total"] == 36
    assert build["cluster"]["kind"] == "local"
    assert build["cluster"]["dashboard"].startswith("http://127.0.0.1:")
    (summary,) = build["summaries"]
    assert summary["indexed"] == 36 and summary["failed"] == []

    source = photo_sets["beach"][5]
    query = crop_query(source, tmp_path / "query.jpg")
    with query.open("rb") as f:
        r = service.request(
            "POST",
            "/api/indexes/beach/search",
            files={"image": ("query.jpg", f, "image/jpeg")},
            data={"k": "5"},
        )
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert len(hits) == 5
    assert hits[0]["relpath"] == source.name
    assert hits[0]["id"] == str(image_id(source.name))
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert hits[0]["score"] > hits[1]["score"]

    # The hit's file and thumbnail.
    image = service.request("GET", hits[0]["image"])
    assert image.status_code == 200
    assert image.content == source.read_bytes()
    thumb = service.request("GET", hits[0]["thumbnail"] + "?side=64")
    assert thumb.headers["Content-Type"] == "image/jpeg"
    with Image.open(io.BytesIO(thumb.content)) as im:
        assert max(im.size) == 64


def test_search_arguments_in_the_url_are_taken_not_ignored(beach, photo_sets):
    """`POST .../search?k=3`, as HTTP clients often send it, asks for 3 hits,
    by upload or by id; given twice with two values, it is a 400."""
    source = photo_sets["beach"][2]
    search = "/api/indexes/beach/search"
    upload = beach.request(
        "POST", search + "?k=3", files={"image": (source.name, source.read_bytes())}
    )
    assert upload.status_code == 200, upload.text
    assert upload.json()["k"] == 3 and len(upload.json()["hits"]) == 3
    assert upload.json()["hits"][0]["relpath"] == source.name
    by_id = beach.request(
        "POST", search + "?k=2&copies=true", json={"id": str(image_id(source.name))}
    )
    assert by_id.status_code == 200, by_id.text
    hits = by_id.json()["hits"]
    assert len(hits) == 2 and hits[0]["kind"] == "identical"
    agreeing = beach.request(
        "POST", search + "?k=2", json={"path": source.name, "k": 2}
    )
    assert [h["id"] for h in agreeing.json()["hits"]] == [h["id"] for h in hits]
    twice = beach.request("POST", search + "?k=2", json={"path": source.name, "k": 4})
    assert twice.status_code == 400
    assert twice.json()["error"] == (
        "k is given twice, '2' in the URL and 4 in the body"
    )


def test_search_by_id_and_by_path(beach, photo_sets):
    name = photo_sets["beach"][3].name
    by_id = beach.request(
        "POST",
        "/api/indexes/beach/search",
        json={"id": str(image_id(name)), "k": 3},
    )
    assert by_id.status_code == 200, by_id.text
    first = by_id.json()["hits"][0]
    assert first["relpath"] == name and first["score"] > 0.999
    by_path = beach.request(
        "POST", "/api/indexes/beach/search", json={"path": name, "k": 3}
    )
    assert by_path.json()["hits"] == by_id.json()["hits"]


def test_index_list_and_info(beach):
    listed = beach.request("GET", "/api/indexes").json()
    entry = next(i for i in listed["indexes"] if i["name"] == "beach")
    assert entry["count"] == 36 and entry["duplicates"] is False
    info = beach.request("GET", "/api/indexes/beach").json()
    assert info["count"] == 36 and info["dim"] == 1280
    assert info["model"] == "efficientnet-lite0"


def test_two_builds_at_once_then_a_rebuild_is_seen(service, tmp_path_factory):
    root = service.dataset_root
    write_photos(root / "lake", 12, seed=11, max_side=320)
    write_photos(root / "hills", 12, seed=12, max_side=320)
    first = service.build("lake")
    second = service.build("hills")
    assert first["id"] != second["id"]
    # The second was taken while the first ran: both share the one cluster.
    still = service.request("GET", f"/api/builds/{first['id']}").json()
    assert still["state"] in ("starting", "running"), still
    states = [service.wait(b["id"]) for b in (first, second)]
    assert [s["state"] for s in states] == ["finished", "finished"]
    names = {
        i["name"] for i in service.request("GET", "/api/indexes").json()["indexes"]
    }
    assert {"lake", "hills"} <= names

    # A search opens the index; a build that changes it is seen by the next
    # search: the service reopens it (a stale searcher knows 12 images).
    def search(path: str) -> requests.Response:
        return service.request(
            "POST", "/api/indexes/lake/search", json={"path": path, "k": 15}
        )

    first = search("img00000.jpg")
    assert first.status_code == 200, first.text
    assert len(first.json()["hits"]) == 12
    write_photos(root / "lake", 3, seed=13, max_side=320, prefix="more")
    assert search("more00000.jpg").status_code == 404  # not indexed yet
    assert service.wait(service.build("lake")["id"])["state"] == "finished"
    new = search("more00000.jpg")
    assert new.status_code == 200, new.text
    hits = new.json()["hits"]
    assert len(hits) == 15 and hits[0]["relpath"] == "more00000.jpg"
    assert {h["relpath"] for h in hits} >= {"more00001.jpg", "more00002.jpg"}
    # Once more with nothing changed: kept, with no cluster asked for.
    unchanged = service.wait(service.build("lake")["id"])
    assert unchanged["state"] == "finished"
    assert unchanged["cluster"]["kind"] == "none", unchanged["cluster"]
    assert unchanged["summaries"][0]["kept"].startswith("nothing added")


def test_a_dataset_moved_under_the_root_keeps_its_index(service, tmp_path_factory):
    before = tmp_path_factory.mktemp("old-place") / "trip"
    write_photos(before, 6, seed=41, max_side=320)
    first = invoke("build", before, "--out", service.index_root)
    assert first.exit_code == 0, first.stderr
    shutil.copytree(before, service.dataset_root / "trip")  # copy2: times kept

    refused = service.wait(service.build("trip")["id"])
    assert refused["state"] == "failed", refused
    error = refused["datasets"][0]["error"]
    assert "holds another dataset" in error and "--moved" in error
    kept = service.wait(service.build("trip", moved=True)["id"])
    assert kept["state"] == "finished" and kept["moved"] is True, kept
    (summary,) = kept["summaries"]
    assert summary["moved_from"] == str(before) and summary["embedded"] == 0
    assert kept["cluster"]["kind"] == "none", kept["cluster"]
    info = service.request("GET", "/api/indexes/trip").json()
    assert info["source"] == str(service.dataset_root / "trip"), info
    hit = service.request(
        "POST", "/api/indexes/trip/search", json={"path": "img00002.jpg", "k": 1}
    ).json()["hits"][0]
    assert hit["path"] == str(service.dataset_root / "trip" / "img00002.jpg"), hit


def test_a_build_of_an_index_being_built_is_refused(service):
    write_photos(service.dataset_root / "busy", 40, seed=21, max_side=320)
    build = service.build("busy")
    r = service.request("POST", "/api/builds", json={"datasets": ["busy"]})
    assert r.status_code == 409, r.text
    assert "being built" in r.json()["error"]
    assert service.wait(build["id"])["state"] == "finished"


def test_cancel_keeps_finished_work_and_a_new_build_resumes(service):
    folder = service.dataset_root / "crowd"
    write_photos(folder, 160, seed=31, max_side=320)
    build = service.build("crowd")
    service.wait(build["id"], until=lambda s: s["datasets"][0]["done"] >= 32)
    r = service.request("DELETE", f"/api/builds/{build['id']}")
    assert r.status_code == 202, r.text
    over = service.wait(build["id"], timeout=60)
    assert over["state"] == "cancelled", over
    assert "cancelled" in over["error"]
    assert over["datasets"][0]["state"] == "cancelled"
    assert over["datasets"][0]["done"] < 160
    assert not (service.index_root / "crowd").exists()

    again = service.wait(service.build("crowd")["id"])
    assert again["state"] == "finished", again
    (summary,) = again["summaries"]
    assert summary["indexed"] == 160
    assert summary["resumed_images"] >= 32  # the cancelled build's partitions


def test_bad_requests_get_a_one_line_json_4xx(beach, tmp_path):
    service = beach
    text = tmp_path / "notes.jpg"
    text.write_text("not an image\n")
    big = b"\xff\xd8" + b"\0" * (21 * 2**20)  # over the 20 MiB default
    outside = tmp_path / "outside"
    copy_tree([text], outside)
    cases = [
        ("GET", "/api/indexes/nope", {}, 404, "no index named 'nope'"),
        ("GET", "/api/indexes/%2E%2E", {}, 404, "no index named '..'"),
        ("POST", "/api/indexes/nope/search", {"json": {"id": "1"}}, 404, "nope"),
        (
            "POST",
            "/api/indexes/beach/search",
            {"files": {"image": ("notes.jpg", text.read_bytes())}},
            400,
            "'notes.jpg' is not a usable image",
        ),
        (
            "POST",
            "/api/indexes/beach/search",
            {"files": {"image": ("big.jpg", big)}},
            413,
            "over the limit of 20,971,520 bytes",
        ),
        (
            "POST",
            "/api/indexes/beach/search",
            {"json": {"path": "../../etc/passwd"}},
            400,
            "outside the dataset root",
        ),
        (
            "POST",
            "/api/indexes/beach/search",
            {"json": {"path": "/etc/passwd"}},
            400,
            "outside the dataset root",
        ),
        (
            "POST",
            "/api/indexes/beach/search",
            {"json": {"path": "\ud800.jpg"}},  # no file name is this string
            404,
            "holds no image",
        ),
        ("POST", "/api/indexes/beach/search", {"json": {"id": "12", "k": 0}}, 400, "k"),
        (
            "POST",
            "/api/indexes/beach/search",
            {"json": {"id": "x"}},
            400,
            "not an image id",
        ),
        (
            "POST",
            "/api/indexes/beach/search",
            {"json": {"id": "12"}},
            404,
            "no image with id",
        ),
        ("POST", "/api/indexes/beach/search", {"data": b"x"}, 415, "multipart"),
        ("GET", "/api/indexes/beach/images/12", {}, 404, "no image with id 12"),
        ("GET", "/api/indexes/beach/images/12/thumbnail?side=9", {}, 400, "side"),
        ("GET", "/api/indexes/beach/duplicates", {}, 404, "--save"),
        (
            "POST",
            "/api/builds",
            {"json": {"datasets": [str(outside)]}},
            403,
            "outside the dataset roots",
        ),
        (
            "POST",
            "/api/builds",
            {"json": {"datasets": ["../outside"]}},
            403,
            "outside the dataset roots",
        ),
        (
            "POST",
            "/api/builds",
            {"json": {"datasets": ["absent"]}},
            404,
            "no dataset folder",
        ),
        (
            "POST",
            "/api/builds",
            {"json": {"datasets": "beach"}},
            400,
            "list",
        ),
        (
            "POST",
            "/api/builds",
            {
                "data": b"{",
                "headers": {"Content-Type": "application/json"},
            },
            400,
            "not JSON",
        ),
        # A form on another site could post text/plain here without a preflight.
        (
            "POST",
            "/api/builds",
            {
                "data": b'{"datasets": ["beach"]}',
                "headers": {"Content-Type": "text/plain"},
            },
            415,
            "application/json",
        ),
        # DNS rebinding: a page whose name resolves to 127.0.0.1 is refused.
        (
            "GET",
            "/api/indexes",
            {"headers": {"Host": "rebound.example:8000"}},
            403,
            "does not answer to host 'rebound.example'",
        ),
        (
            "POST",
            "/api/builds",
            {"json": {"datasets": ["beach"]}, "auth": False},
            401,
            "token",
        ),
        (
            "POST",
            "/api/builds",
            {
                "json": {"datasets": ["beach"]},
                "headers": {"Authorization": "Bearer no"},
            },
            401,
            "token",
        ),
        ("DELETE", "/api/builds/none", {}, 404, "no build"),
        ("DELETE", "/api/builds/none", {"auth": False}, 401, "token"),
        ("GET", "/api/builds/none", {}, 404, "no build with id 'none'"),
        ("GET", "/api/nothing", {}, 404, "no such route"),
        ("PUT", "/api/indexes", {}, 405, ""),
    ]
    for method, path, kwargs, status, words in cases:
        r = service.request(method, path, **kwargs)
        assert r.status_code == status, (method, path, r.status_code, r.text)
        assert r.headers["Content-Type"].startswith("application/json"), path
        error = r.json()["error"]
        assert words in error, (path, error)
        assert "\n" not in error and "Traceback" not in error


def test_images_outside_the_dataset_are_not_served(service, tmp_path):
    """A symbolic link in a dataset that leads out of it is indexed (it is the
    user's collection) but the service does not hand out its target."""
    folder = service.dataset_root / "linked"
    paths = write_photos(folder, 3, seed=41, max_side=320)
    secret = write_photos(tmp_path / "private", 1, seed=42, max_side=320)[0]
    (folder / "escape.jpg").symlink_to(secret)
    assert service.wait(service.build("linked")["id"])["state"] == "finished"
    escape = str(image_id("escape.jpg"))
    for suffix in ("", "/thumbnail"):
        r = service.request("GET", f"/api/indexes/linked/images/{escape}{suffix}")
        assert r.status_code == 403, r.text
        assert "outside the dataset" in r.json()["error"]
    ok = service.request("GET", f"/api/indexes/linked/images/{image_id(paths[0].name)}")
    assert ok.status_code == 200


def _thumbnails_served(service, index: str, members: list[dict]) -> None:
    """Each member carries its image id, and its thumbnail is served."""
    for member in members:
        assert member["id"] == str(image_id(member["path"]))
        thumb = service.request(
            "GET", f"/api/indexes/{index}/images/{member['id']}/thumbnail"
        )
        assert thumb.status_code == 200


def test_duplicates_report_saved_by_the_cli_is_served(service, album):
    r = service.request("GET", "/api/indexes/album/duplicates?limit=1")
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["images"] == len(album)
    assert report["groups"] == 2 and report["limit"] == 1
    (group,) = report["page"]
    assert len(group["members"]) == len(album) // 2
    assert {album[m["path"]] for m in group["members"]} == {"chelsea"}
    _thumbnails_served(service, "album", group["members"])
    second = service.request("GET", "/api/indexes/album/duplicates?offset=1").json()
    assert [m["path"] for m in second["page"][0]["members"]][0].startswith("coffee")
    listed = service.request("GET", "/api/indexes").json()["indexes"]
    assert next(i for i in listed if i["name"] == "album")["duplicates"] is True
    # Each index says whether a report is saved in it (other tests save one
    # for their own indexes, before this or after).
    from imgindex.pipeline.store import DUPLICATES_FILE

    saved = {
        i["name"]: (service.index_root / i["name"] / DUPLICATES_FILE).exists()
        for i in listed
    }
    assert {i["name"]: i["duplicates"] for i in listed} == saved


def test_other_shots_of_one_scene_are_served_apart_from_copies(service, scenes):
    """The stereo pair's two cameras: a group of other shots, its best
    first, apart from the photo and its copies (one an edit, kept)."""
    report = service.request("GET", "/api/indexes/scenes/duplicates").json()
    assert report["groups"] == 1 and report["shot_groups"] == 1
    assert "other_shots" not in report  # paged as shot_page
    (copies,) = report["page"]
    assert [m["path"] for m in copies["members"]] == [
        "rocket.jpg",
        "rocket-stickered.jpg",
        "rocket-small.jpg",
    ]
    assert copies["edited"] == ["rocket-stickered.jpg"] and report["removable"] == 1
    (shots,) = report["shot_page"]
    assert {m["path"] for m in shots["members"]} == {
        "stereo-left.jpg",
        "stereo-right.jpg",
    }
    assert shots["best"] == shots["members"][0]["path"]
    assert [p["kind"] for p in shots["pairs"]] == ["shot"]
    _thumbnails_served(service, "scenes", shots["members"])
    later = service.request("GET", "/api/indexes/scenes/duplicates?offset=1").json()
    assert later["shot_page"] == [] and later["shot_groups"] == 1


def test_search_with_copies_tells_each_hit_by_path_id_and_upload(
    service, scenes, tmp_path
):
    """The scenes index: the stereo pair's two cameras, a photo with a copy
    and an edit of it, an unrelated photo. Each hit says what it is."""
    url = "/api/indexes/scenes/search"
    by_path = service.request(
        "POST", url, json={"path": "stereo-left.jpg", "k": 6, "copies": True}
    )
    assert by_path.status_code == 200, by_path.text
    told = {h["relpath"]: h["kind"] for h in by_path.json()["hits"]}
    assert told == {
        "stereo-left.jpg": "identical",
        "stereo-right.jpg": "shot",
        "rocket.jpg": "neither",
        "rocket-small.jpg": "neither",
        "rocket-stickered.jpg": "neither",
        "astronaut.jpg": "neither",
    }
    rocket_id = str(image_id("rocket.jpg"))
    by_id = service.request("POST", url, json={"id": rocket_id, "k": 3, "copies": "1"})
    assert by_id.json()["query"] == {"id": rocket_id}  # its file read, not uploaded
    assert {h["relpath"]: h["kind"] for h in by_id.json()["hits"]} == {
        "rocket.jpg": "identical",
        "rocket-small.jpg": "copy",
        "rocket-stickered.jpg": "copy",
    }
    # An upload: a crop of the photo, turned, that the index does not hold.
    query = tmp_path / "rocket-crop.jpg"
    with Image.open(service.dataset_root / "scenes" / "rocket.jpg") as im:
        im.crop((40, 20, 400, 300)).rotate(90, expand=True).save(query, quality=80)
    with query.open("rb") as f:
        upload = service.request(
            "POST", url, files={"image": ("rocket-crop.jpg", f, "image/jpeg")},
            data={"k": "4", "copies": "true"},
        )  # fmt: skip
    assert upload.status_code == 200, upload.text
    kinds = [(h["relpath"], h["kind"]) for h in upload.json()["hits"]]
    assert sorted(kinds[:3]) == [
        ("rocket-small.jpg", "copy"),
        ("rocket-stickered.jpg", "copy"),
        ("rocket.jpg", "copy"),
    ]
    assert kinds[3][1] == "neither"
    # Without it no hit carries a kind; a bad value is a one-line 400.
    plain = service.request("POST", url, json={"id": rocket_id, "k": 3})
    assert all("kind" not in h for h in plain.json()["hits"])
    bad = service.request("POST", url, json={"id": rocket_id, "copies": "maybe"})
    assert bad.status_code == 400
    assert bad.json()["error"] == "copies 'maybe' is not true or false"


def test_status_and_prometheus_metrics(beach):
    status = beach.request("GET", "/api/status").json()
    assert status["status"] == "ok" and status["token_required"] is True
    assert status["builds_allowed"] is True and status["indexes"] >= 1
    for _ in range(3):
        beach.request(
            "POST", "/api/indexes/beach/search", json={"path": "img00000.jpg"}
        )
    beach.request("POST", "/api/indexes/nope/search", json={"id": "1"})
    text = beach.request("GET", "/metrics").text
    ok = re.search(r'imgindex_queries_total\{index="beach",outcome="ok"\} (\d+)', text)
    assert ok and float(ok.group(1)) >= 3, text
    # An unknown index is counted, but not as a series of its own.
    assert re.search(r'imgindex_queries_total\{index="-",outcome="404"\} [1-9]', text)
    assert 'index="nope"' not in text
    assert re.search(r'imgindex_query_seconds_bucket\{index="beach",le="0.05"\}', text)
    assert re.search(r'imgindex_builds_total\{state="finished"\} [1-9]', text)
    assert re.search(r"^imgindex_builds_running \d", text, re.M)
    assert re.search(r"^imgindex_indexes_open [1-9]", text, re.M)


def test_openapi_lists_every_route(service):
    spec = service.request("GET", "/api/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    assert {
        "/",
        "/health",
        "/api/status",
        "/metrics",
        "/api/indexes",
        "/api/indexes/{name}",
        "/api/indexes/{name}/search",
        "/api/indexes/{name}/images/{image_id}",
        "/api/indexes/{name}/images/{image_id}/thumbnail",
        "/api/indexes/{name}/images/{image_id}/info",
        "/api/indexes/{name}/duplicates",
        "/api/datasets",
        "/api/builds",
        "/api/builds/{build_id}",
        "/api/build_index",
    } == set(spec["paths"])
    page = service.request("GET", "/")
    assert page.status_code == 200 and "<title>imgindex</title>" in page.text
