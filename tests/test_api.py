"""The Python API, `import imgindex`: build on the caller's client, open, search,
read vectors and the manifest, find duplicates, and show results in Jupyter."""

from __future__ import annotations

import io
import json
import os
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import imgindex
from imgindex.pipeline.errors import DecodeError, IndexDirError
from tests.conftest import copy_tree, crop_query
from tests.helpers import invoke

DATA_URI = re.compile(r'<img src="data:image/jpeg;base64,[A-Za-z0-9+/=]+"')


@pytest.fixture(scope="module")
def built(tmp_path_factory, photo_sets, client):
    """The beach photos indexed once through the API, on the session's client."""
    root = tmp_path_factory.mktemp("api")
    data = copy_tree(photo_sets["beach"], root / "beach")
    report = imgindex.build(data, root / "out", client=client, progress=False)
    return report, data, root / "out" / "beach"


def test_build_uses_the_callers_client_and_leaves_it_open(built, client):
    report, data, dest = built
    assert isinstance(report, imgindex.BuildReport)
    assert report.cluster["address"] == client.scheduler.address
    assert report.cluster["reason"].startswith("the caller's client")
    assert client.status == "running"  # used, never closed
    (summary,) = report.datasets
    assert summary.name == "beach"
    assert summary.indexed == len(os.listdir(data)) == 36
    assert summary.failed == []
    assert report["beach"] is summary
    assert list(report.stage_seconds)[:2] == ["checks", "plan"]


def test_report_is_what_build_json_prints(built, client):
    report, data, dest = built
    as_json = report.to_json()
    assert json.loads(json.dumps(as_json)) == as_json
    again = invoke(
        "build", data, "--out", dest.parent, "--scheduler", client.scheduler.address
    )
    # The CLI's second run keeps the index: same keys, per dataset and overall.
    cli_report = invoke(
        "build",
        data,
        "--out",
        dest.parent,
        "--json",
        "--scheduler",
        client.scheduler.address,
    )
    assert again.exit_code == 0, again.stderr
    printed = json.loads(cli_report.stdout)
    assert printed.keys() == as_json.keys()
    assert printed["datasets"][0].keys() == as_json["datasets"][0].keys()
    assert imgindex.BuildReport.from_json(printed).to_json() == printed


def test_build_without_a_client_finds_the_cluster_the_cli_would(
    tmp_path, photo_sets, process_cluster
):
    data = copy_tree(photo_sets["forest"][:6], tmp_path / "forest")
    report = imgindex.build(
        [data],
        tmp_path / "out",
        scheduler=process_cluster.scheduler_address,
        progress=False,
    )
    assert report.cluster["kind"] == "remote"
    assert report.cluster["address"] == process_cluster.scheduler_address
    assert report["forest"].indexed == 6
    # What the build opened it closed: the scheduler has no client of ours left.
    import distributed

    with distributed.Client(process_cluster) as c:
        assert len(c.scheduler_info()["workers"]) == 2


def test_bad_options_name_the_keyword(tmp_path, dataset):
    with pytest.raises(
        ValueError, match=r"^index_type: FAISS cannot build .*Nonsense42"
    ):
        imgindex.build(dataset, tmp_path / "out", index_type="Nonsense42,Flat")
    with pytest.raises(ValueError, match=r"^name: .*one index"):
        imgindex.build([dataset, dataset], tmp_path / "out", name="both")
    with pytest.raises(ValueError, match=r"^task_timeout: .*not a duration"):
        imgindex.build(dataset, tmp_path / "out", task_timeout="soon")
    with pytest.raises(
        ValueError, match=r"^partition_size: 0 is not auto or a whole number >= 1$"
    ):
        imgindex.build(dataset, tmp_path / "out", partition_size=0)
    with pytest.raises(ValueError, match=r"^batch_size: 'many' is not auto"):
        imgindex.build(dataset, tmp_path / "out", batch_size="many")
    assert not (tmp_path / "out" / "beach").exists()


def test_a_failed_dataset_raises_with_the_report(tmp_path, photo_sets, client):
    beach = copy_tree(photo_sets["beach"][:5], tmp_path / "beach")
    forest = copy_tree(photo_sets["forest"][:5], tmp_path / "forest")
    out = tmp_path / "out"
    imgindex.build(beach, out, client=client, progress=False)
    meta_path = out / "beach" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["model"] = "timm:resnet50"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(imgindex.BuildError, match="timm:resnet50") as caught:
        imgindex.build([beach, forest], out, client=client, progress=False)
    report = caught.value.report
    assert [d.name for d in report.failed] == ["beach"]
    assert "--rebuild" in report["beach"].error
    assert report["forest"].indexed == 5
    assert json.loads(meta_path.read_text())["model"] == "timm:resnet50"


def test_index_describes_itself_as_info_json_does(built):
    _, _, dest = built
    idx = imgindex.open(dest)
    info = idx.info()
    printed = json.loads(invoke("info", dest, "--json").stdout)
    assert info == printed
    assert info["count"] == len(idx) == 36
    assert (idx.model, idx.dim) == (info["model"], info["dim"])
    assert repr(idx).startswith("<imgindex.Index 'beach': 36 images")


def test_open_refuses_what_is_not_an_index(tmp_path):
    with pytest.raises(IndexDirError, match="does not exist"):
        imgindex.open(tmp_path / "nothing")
    (tmp_path / "folder").mkdir()
    with pytest.raises(IndexDirError, match="not an imgindex index"):
        imgindex.open(tmp_path / "folder")


def test_search_takes_paths_folders_bytes_pil_images_and_arrays(built, tmp_path):
    report, data, dest = built
    photos = sorted(data.iterdir())
    query = crop_query(photos[3], tmp_path / "query.jpg")
    (tmp_path / "more").mkdir()
    crop_query(photos[4], tmp_path / "more" / "q4.jpg")
    pixels = np.asarray(Image.open(photos[5]).convert("RGB"))
    with imgindex.open(dest) as idx:
        assert len(idx) == 36 and idx.name == "beach"
        results = idx.search(
            [
                query,
                tmp_path / "more",
                photos[6].read_bytes(),
                Image.open(photos[7]),
                pixels,
                pixels.astype(np.float32) / 255,
            ],
            k=3,
        )
    assert isinstance(results, pd.DataFrame)
    assert list(results.columns) == ["query", "rank", "path", "score", "id"]
    top = results[results["rank"] == 1].reset_index(drop=True)
    assert list(top["query"]) == [
        str(query),
        str((tmp_path / "more" / "q4.jpg").resolve()),
        "<image 2>",
        "<image 3>",
        "<image 4>",
        "<image 5>",
    ]
    expected = [photos[i] for i in (3, 4, 6, 7, 5, 5)]
    assert [os.path.basename(p) for p in top["path"]] == [p.name for p in expected]
    # An image indexed as it is finds itself, whatever form it came in.
    assert (top["score"][2:] > 0.99).all()
    assert top["score"][0] > 0.8
    for _, hits in results.groupby("query", sort=False):
        assert list(hits["rank"]) == [1, 2, 3]
        assert hits["score"].is_monotonic_decreasing
    manifest = idx.manifest()
    assert set(results["id"]) <= set(manifest["id"])


def test_a_query_that_is_no_image_is_named(built, tmp_path):
    _, _, dest = built
    bad = tmp_path / "notes.jpg"
    bad.write_text("not a picture")
    idx = imgindex.open(dest)
    with pytest.raises(DecodeError, match="notes.jpg"):
        idx.search(bad)
    with pytest.raises(DecodeError, match=r"<image 0>.*shape"):
        idx.search(np.zeros((4, 4, 7), np.uint8))
    with pytest.raises(imgindex.ImgindexError, match="a dict is not an image"):
        idx.search([{}])
    with pytest.raises(ValueError, match="k: 0"):
        idx.search(bad, k=0)
    with pytest.raises(TypeError, match="k: '5' is not a whole number"):
        idx.search(bad, k="5")


def test_unreadable_queries_can_be_skipped_and_are_listed(built, tmp_path, caplog):
    _, data, dest = built
    photos = sorted(data.iterdir())
    folder = tmp_path / "queries"
    folder.mkdir()
    for name, photo in (("a.jpg", photos[2]), ("c.jpg", photos[8])):
        (folder / name).write_bytes(photo.read_bytes())
    (folder / "b.jpg").write_text("not a picture")
    idx = imgindex.open(dest)
    with pytest.raises(DecodeError, match="b.jpg"):
        idx.search(folder)  # "raise" is the default
    results = idx.search(
        [folder, np.zeros((4, 4, 7), np.uint8)], k=2, unreadable="skip"
    )
    folder = folder.resolve()
    assert list(dict.fromkeys(results["query"])) == [
        str(folder / "a.jpg"),
        str(folder / "c.jpg"),
    ]
    top = results[results["rank"] == 1]
    assert [os.path.basename(p) for p in top["path"]] == [
        photos[2].name,
        photos[8].name,
    ]
    assert list(results.unreadable) == [str(folder / "b.jpg"), "<image 1>"]
    assert results.unreadable[str(folder / "b.jpg")] == "not an image Pillow can read"
    assert f"not searched: {folder / 'b.jpg'}: not an image Pillow can read" in (
        caplog.text
    )
    page = results._repr_html_()
    assert len(DATA_URI.findall(page)) == 2 + 2 * 2
    assert f"<div>not searched: {folder / 'b.jpg'}: not an image" in page
    with pytest.raises(ValueError, match="unreadable: 'ignore'"):
        idx.search(folder, unreadable="ignore")


def test_search_results_show_thumbnails_in_jupyter(built, tmp_path):
    _, data, dest = built
    photos = sorted(data.iterdir())
    idx = imgindex.open(dest)
    results = idx.search([photos[0], photos[1]], k=4)
    page = results._repr_html_()
    # Two queries and their four hits each, every one an inline JPEG.
    assert len(DATA_URI.findall(page)) == 2 + 2 * 4
    for path in results["path"]:
        assert os.path.basename(path) in page
    one = results[results["query"] == str(photos[1])]
    assert isinstance(one, imgindex.results.SearchResults)
    assert len(DATA_URI.findall(one._repr_html_())) == 1 + 4
    jpeg = re.search(r"base64,([A-Za-z0-9+/=]+)", page).group(1)
    import base64

    with Image.open(io.BytesIO(base64.b64decode(jpeg))) as thumb:
        assert max(thumb.size) == 96


def test_vectors_are_the_index_vectors_chunked_by_shard(built):
    import dask.array as da

    from imgindex.pipeline.search import Searcher
    from imgindex.pipeline.shards import SUFFIX

    _, _, dest = built
    idx = imgindex.open(dest)
    vectors, ids = idx.vectors(), idx.ids()
    assert isinstance(vectors, da.Array)
    shards = list((dest / "shards").glob(f"*{SUFFIX}"))
    assert len(vectors.chunks[0]) == len(shards) > 1
    assert vectors.shape == (36, idx.dim) and vectors.dtype == np.float32
    v, i = vectors.compute(), ids.compute()
    assert sorted(i) == sorted(idx.manifest()["id"])
    # The same vectors as the FAISS index holds, read another way.
    searcher = Searcher(dest, turns=False)
    np.testing.assert_allclose(v, searcher.stored_vectors(i), atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, atol=1e-3)


def test_manifest_lists_every_image_with_its_file_and_list_columns(
    built, tmp_path, client
):
    _, data, dest = built
    manifest = imgindex.open(dest).manifest()
    assert list(manifest.columns) == ["id", "path", "size", "mtime"]
    assert len(manifest) == 36
    for row in manifest.itertuples():
        stat = os.stat(row.path)
        assert row.size == stat.st_size
        assert row.mtime.value == stat.st_mtime_ns
    photos = sorted(data.iterdir())[:4]
    listed = tmp_path / "listed.csv"
    pd.DataFrame(
        {"path": [str(p) for p in photos], "label": ["a", "b", "c", "d"]}
    ).to_csv(listed, index=False)
    imgindex.build(listed, tmp_path / "out", client=client, progress=False)
    with_labels = imgindex.open(tmp_path / "out" / "listed").manifest()
    assert sorted(with_labels["label"]) == ["a", "b", "c", "d"]
    by_path = dict(zip(with_labels["path"], with_labels["label"], strict=True))
    assert by_path[str(photos[2])] == "c"


def test_duplicates_group_copies_and_show_them_as_thumbnails(
    tmp_path, photo_sets, client
):
    data = copy_tree(photo_sets["forest"][:8], tmp_path / "forest")
    original = sorted(data.iterdir())[2]
    with Image.open(original) as im:
        im.resize((im.width // 2, im.height // 2)).save(data / "half.jpg", quality=85)
    imgindex.build(data, tmp_path / "out", client=client, progress=False)
    report = imgindex.open(tmp_path / "out" / "forest").duplicates(client=client)
    (group,) = report.groups
    assert {os.path.basename(m.path) for m in group.members} == {
        original.name,
        "half.jpg",
    }
    assert group.keeper.path.endswith(original.name)  # the larger one
    page = report._repr_html_()
    assert len(DATA_URI.findall(page)) == 2
    assert "keep: " + original.name in page
    assert len(DATA_URI.findall(group._repr_html_())) == 2
    assert report.to_json()["groups"] == 1


def test_importing_imgindex_loads_nothing_heavy():
    import subprocess
    import sys

    code = (
        "import sys, imgindex; print(sorted(m for m in ('torch', 'faiss', "
        "'distributed', 'PIL', 'pandas') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_build_takes_every_option_the_command_line_build_takes():
    import inspect

    from imgindex.api import build_options
    from imgindex.building import check_build
    from imgindex.cli import cli

    ours = inspect.signature(imgindex.build).parameters
    checked = inspect.signature(check_build).parameters
    for name in build_options():
        assert ours[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert ours[name].default == checked[name].default, name
    flags = {p.name for p in cli.commands["build"].params}
    own = {"datasets", "out", "scheduler", "scheduler_file", "no_fallback"}
    own |= {"jobqueue", "jobs", "progress_file", "as_json"}
    assert flags - own == set(build_options())


def test_a_closed_client_is_refused_in_one_line(client, dataset, tmp_path):
    from distributed import Client

    other = Client(client.scheduler.address, set_as_default=False)
    other.close()
    with pytest.raises(imgindex.ImgindexError, match="^client is closed; pass a"):
        imgindex.build(dataset, tmp_path / "out", client=other, progress=False)
    assert not (tmp_path / "out" / "beach").exists()
    assert client.status == "running"
