"""End-to-end builds on a real (in-process) LocalCluster with real image files."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import imgindex
from imgindex import __version__
from imgindex.pipeline.assemble import IndexRequest
from imgindex.pipeline.build import run_build
from imgindex.pipeline.describe import describe_index
from imgindex.pipeline.errors import DatasetError, IndexDirError, IndexLocked
from imgindex.pipeline.lock import lock_index
from imgindex.pipeline.saved_report import load_report, save_report
from imgindex.pipeline.search import Searcher
from imgindex.pipeline.shards import staging_dir
from imgindex.pipeline.store import INDEX_FILE, SHARDS_DIR, read_meta
from imgindex.pipeline.synthetic import write_photos
from tests.conftest import copy_tree, crop_query, write_bad_files
from tests.helpers import invoke, read_index


@pytest.fixture(scope="module")
def built(client, photo_sets, tmp_path_factory):
    """Both photo sets built once into one output root."""
    tmp = tmp_path_factory.mktemp("built")
    roots = {
        name: copy_tree(paths, tmp / "data" / name)
        for name, paths in photo_sets.items()
    }
    out = tmp / "indexes"
    summaries = {name: run_build(client, root, out) for name, root in roots.items()}
    return roots, out, summaries


def test_two_datasets_give_two_complete_indexes(built, photo_sets):
    roots, out, summaries = built
    for name, paths in photo_sets.items():
        stored = read_index(out / name)
        assert stored.meta.count == len(paths) == stored.index.ntotal
        assert stored.meta.model == "efficientnet-lite0"
        assert stored.meta.dim == 1280 and stored.meta.metric == "cosine"
        assert sorted(r.path for r in stored.manifest) == sorted(p.name for p in paths)
        assert summaries[name].indexed == summaries[name].embedded == len(paths)
        assert summaries[name].failed == []
    assert sum(len(p) for p in photo_sets.values()) >= 60


def test_both_workers_took_part(built):
    _, _, summaries = built
    workers = set()
    for s in summaries.values():
        workers |= set(s.workers)
    assert len(workers) == 2


def test_near_duplicate_query_finds_its_source_first(built, tmp_path):
    roots, out, _ = built
    searcher = Searcher(out / "beach")
    for i in (0, 7, 23):
        src = roots["beach"] / f"img{i:05d}.jpg"
        query = crop_query(src, tmp_path / f"q{i}.jpg")
        hits = searcher.search_images([query], k=5)[0]
        assert hits[0].path == str(src)
        assert hits[0].score > 0.7
        assert hits[0].score > hits[1].score


def test_turned_query_finds_its_source_and_upright_ones_keep_their_scores(
    built, tmp_path
):
    from PIL import Image

    from imgindex.pipeline.search import TURN_PENALTY

    roots, out, _ = built
    turning = Searcher(out / "beach")
    plain = Searcher(out / "beach", turns=False)
    for i in (2, 11):
        src = roots["beach"] / f"img{i:05d}.jpg"
        turned = tmp_path / f"turned{i}.jpg"
        with Image.open(src) as im:
            im.transpose(Image.Transpose.ROTATE_90).save(turned, quality=92)
        hits = turning.search_images([turned], k=5)[0]
        assert hits[0].path == str(src)
        # Found turned back: about 1 (a re-encoded copy), less the penalty.
        assert hits[0].score > 0.9 - TURN_PENALTY
        as_is = plain.search_images([turned], k=5)[0]
        assert hits[0].score > next((h.score for h in as_is if h.path == str(src)), -1)
        # The same hits and scores (to float precision: the turns share the
        # query's forward pass, a batch of 4 instead of 1).
        upright = turning.search_images([src], k=5)[0]
        alone = plain.search_images([src], k=5)[0]
        assert [(h.rank, h.path) for h in upright] == [(h.rank, h.path) for h in alone]
        assert [h.score for h in upright] == pytest.approx(
            [h.score for h in alone], abs=1e-5
        )


def test_merged_results_keep_each_image_once_at_its_best_score():
    from imgindex.pipeline.search import _merged

    found = (np.array([[0.9, 0.5, 0.4]], np.float32), np.array([[1, 2, 3]]))
    more = (np.array([[0.95, 0.7, 0.2]], np.float32), np.array([[4, 2, -1]]))
    scores, ids = _merged(found, more, 0.1, 3)
    assert ids.tolist() == [[1, 4, 2]]
    np.testing.assert_allclose(scores, [[0.9, 0.85, 0.6]], rtol=1e-6)


def test_vectors_in_index_match_a_direct_embedding(built):
    from imgindex.pipeline.embed import Embedder, ModelSpec

    roots, out, _ = built
    stored = read_index(out / "forest")
    rec = stored.manifest[3]
    embedder = Embedder(ModelSpec(device="cpu"))
    direct = embedder.embed_pixels([embedder.decode(str(roots["forest"] / rec.path))])[
        0
    ]
    np.testing.assert_allclose(stored.index.reconstruct(rec.id), direct, atol=1e-4)


def test_bad_files_are_skipped_and_reported(client, dataset, tmp_path):
    expected = write_bad_files(dataset)
    n_good = len(list(dataset.glob("img*.jpg"))) + 1  # + good_ref.jpg
    summary = run_build(client, dataset, tmp_path / "out", partition_size=8)
    reasons = {f["path"]: f["reason"] for f in summary.failed}
    assert set(reasons) == set(expected)
    for name, fragment in expected.items():
        assert fragment in reasons[name], (name, reasons[name])
    assert summary.indexed == n_good
    stored = read_index(tmp_path / "out" / "beach")
    assert {f.path for f in stored.failures} == set(expected)


def test_incremental_rebuild_embeds_only_changes(client, dataset, tmp_path):
    out = tmp_path / "out"
    first = run_build(client, dataset, out)
    before = read_index(out / "beach")
    keep = before.manifest[5]

    (dataset / "img00001.jpg").unlink()
    changed = dataset / "img00002.jpg"
    changed.write_bytes((dataset / "img00003.jpg").read_bytes())
    new = dataset / "sub" / "new.jpg"
    new.parent.mkdir()
    new.write_bytes((dataset / "img00004.jpg").read_bytes())

    second = run_build(client, dataset, out)
    assert (second.added, second.updated, second.removed) == (1, 1, 1)
    assert second.unchanged == first.indexed - 2
    assert second.embedded == 2
    after = read_index(out / "beach")
    assert after.index.ntotal == first.indexed
    np.testing.assert_array_equal(
        after.index.reconstruct(keep.id), before.index.reconstruct(keep.id)
    )
    # img00002 now holds img00003's bytes, so it must have been re-embedded.
    np.testing.assert_allclose(
        vector_of(after, "img00002.jpg"), vector_of(after, "img00003.jpg"), atol=1e-5
    )
    assert "img00001.jpg" not in {r.path for r in after.manifest}

    third = run_build(client, dataset, out, rebuild=True)
    assert third.embedded == third.indexed == first.indexed


def vector_of(stored, path: str) -> np.ndarray:
    (rec,) = [r for r in stored.manifest if r.path == path]
    return stored.index.reconstruct(rec.id)


def test_a_moved_dataset_keeps_its_index_and_embeds_only_what_changed(
    client, dataset, tmp_path
):
    out, index_dir = tmp_path / "out", tmp_path / "out" / "beach"
    first = run_build(client, dataset, out)
    before = read_index(index_dir)
    save_report(index_dir, {"duplicate_groups": []}, before.meta.updated)
    moved = tmp_path / "scratch" / "beach"
    moved.parent.mkdir()
    os.rename(dataset, moved)  # as mv does: the files keep their times

    with pytest.raises(IndexDirError, match=r"\('.*beach', now gone\).*--moved"):
        run_build(client, moved, out)
    assert describe_index(index_dir)["source_found"] is False
    warned: list[logging.LogRecord] = []
    logger = logging.getLogger("imgindex.index")
    handler = logging.Handler()
    handler.emit = warned.append
    logger.addHandler(handler)
    try:
        imgindex.open(index_dir).close()
    finally:
        logger.removeHandler(handler)
    assert ["--moved` points the index at it" in r.getMessage() for r in warned] == [
        True
    ]
    shown = invoke("info", index_dir)
    assert "(not found: its dataset" in shown.stdout and "--moved" in shown.stdout
    again = run_build(client, moved, out, moved=True)
    assert again.moved_from == str(dataset)
    assert (again.embedded, again.indexed, again.added) == (0, first.indexed, 0)
    assert again.kept.startswith("nothing added, changed or removed")
    after = read_index(index_dir)
    assert after.meta.source == str(moved) and after.meta.count == first.indexed
    assert describe_index(index_dir)["source_found"] is True
    for record in before.manifest:
        np.testing.assert_array_equal(
            after.index.reconstruct(record.id), before.index.reconstruct(record.id)
        )
    # The saved report named the images where they were: it is gone with them.
    assert load_report(index_dir) is None
    query = moved / before.manifest[3].path
    hits = imgindex.open(index_dir).search([query], k=1)
    assert hits["path"].tolist() == [str(query)]

    # Copied on, keeping times, with one image changed: only that one is
    # embedded, and the index reads the copy from then on.
    copied = tmp_path / "project" / "beach"
    shutil.copytree(moved, copied)  # copy2: times kept
    (copied / "img00002.jpg").write_bytes((copied / "img00003.jpg").read_bytes())
    third = run_build(client, copied, out, moved=True)
    assert third.moved_from == str(moved) and not third.kept
    assert (third.embedded, third.updated, third.indexed) == (1, 1, first.indexed)
    assert read_meta(index_dir).source == str(copied)
    assert run_build(client, copied, out).kept  # its own place now


def test_a_copy_without_its_times_keeps_every_vector_but_an_edited_files(
    client, dataset, tmp_path
):
    """Copied without its times (cp -r), every file looks changed to its
    mtime; the whole file's digest tells which are: only an uncompressed
    image edited in its middle, the same size, its first and last 64 KiB
    as they were, is embedded again."""
    from PIL import Image

    from imgindex.pipeline.embed import Embedder, ModelSpec

    out, index_dir = tmp_path / "out", tmp_path / "out" / "beach"
    rng = np.random.default_rng(5)
    scan = rng.integers(0, 256, (400, 400, 3), np.uint8)  # 480 KB as a BMP
    Image.fromarray(scan).save(dataset / "scan.bmp")
    first = run_build(client, dataset, out, partition_size=10)
    assert first.indexed == 37
    before = read_index(index_dir)

    copied = tmp_path / "copy" / "beach"
    shutil.copytree(dataset, copied, copy_function=shutil.copyfile)  # new times
    scan[150:250] = 255 - scan[150:250]  # a band across the middle, inverted
    edited = copied / "scan.bmp"
    size = edited.stat().st_size
    Image.fromarray(scan).save(edited)
    assert edited.stat().st_size == size
    again = run_build(client, copied, out, moved=True, partition_size=10)
    assert (again.embedded, again.touched, again.updated) == (1, 36, 1)
    assert (again.unchanged, again.indexed, again.resumed_images) == (36, 37, 0)
    assert not staging_dir(index_dir).exists()  # the touched shards' folder too
    assert again.images_per_second == round(1 / again.seconds, 2)  # the BMP alone
    after = read_index(index_dir)
    for record in before.manifest:
        if record.path != "scan.bmp":
            np.testing.assert_array_equal(
                after.index.reconstruct(record.id),
                before.index.reconstruct(record.id),
            )
    embedder = Embedder(ModelSpec(device="cpu"))
    direct = embedder.embed_pixels([embedder.decode(str(edited))])[0]
    np.testing.assert_allclose(vector_of(after, "scan.bmp"), direct, atol=1e-4)
    assert np.abs(vector_of(before, "scan.bmp") - direct).max() > 1e-2
    # The manifest holds the copies' times now: nothing to do on a rerun.
    stamps = {r.path: r.mtime_ns for r in after.manifest}
    assert stamps == {p.name: p.stat().st_mtime_ns for p in copied.iterdir()}
    assert run_build(client, copied, out).kept
    assert invoke("reindex", index_dir).exit_code == 0
    assert read_index(index_dir).meta.count == 37


def test_moved_keeps_an_index_only_for_a_dataset_of_its_kind(client, dataset, tmp_path):
    out = tmp_path / "out"
    run_build(client, dataset, out)
    listed = tmp_path / "lists" / "beach.txt"
    listed.parent.mkdir()
    listed.write_text("".join(f"{p}\n" for p in sorted(dataset.iterdir())))
    with pytest.raises(IndexDirError, match="holds a folder .* not a file list"):
        run_build(client, listed, out, moved=True)
    assert read_meta(out / "beach").source == str(dataset)


def test_empty_and_missing_datasets_are_errors(client, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="contains no image files"):
        run_build(client, tmp_path / "empty", tmp_path / "out")
    with pytest.raises(DatasetError, match="does not exist"):
        run_build(client, tmp_path / "missing", tmp_path / "out")
    assert not (tmp_path / "out" / "empty").exists()


def test_existing_index_of_another_model_is_left_alone(client, dataset, tmp_path):
    out = tmp_path / "out"
    run_build(client, dataset, out)
    meta_path = out / "beach" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["model"] = "timm:resnet50"
    meta_path.write_text(json.dumps(meta))
    before = sorted(os.listdir(out / "beach"))
    with pytest.raises(
        IndexDirError, match="built with model 'timm:resnet50'.*--rebuild"
    ):
        run_build(client, dataset, out)
    assert sorted(os.listdir(out / "beach")) == before
    assert json.loads(meta_path.read_text())["model"] == "timm:resnet50"


def test_a_second_build_of_the_same_index_is_refused(client, dataset, tmp_path):
    out = tmp_path / "out"
    with lock_index(out / "beach"):
        with pytest.raises(IndexLocked, match="another build .* is writing the index"):
            run_build(client, dataset, out)


def test_index_dir_is_replaced_whole(client, dataset, tmp_path: Path):
    out = tmp_path / "out"
    run_build(client, dataset, out)
    run_build(client, dataset, out, rebuild=True)
    leftovers = [
        p.name
        for p in out.iterdir()
        if p.name.startswith(".beach.") and not p.name.endswith(".lock")
    ]
    assert leftovers == []


def test_unchanged_bad_files_are_not_retried_but_still_reported(
    client, dataset, tmp_path
):
    out = tmp_path / "out"
    (dataset / "broken.jpg").write_bytes(b"not a jpeg")
    first = run_build(client, dataset, out)
    assert [f["path"] for f in first.failed] == ["broken.jpg"]

    again = run_build(client, dataset, out)
    assert (again.added, again.updated, again.embedded) == (0, 0, 0)
    assert again.unchanged == first.indexed + 1
    assert [f["path"] for f in again.failed] == ["broken.jpg"]

    (dataset / "broken.jpg").write_bytes((dataset / "img00000.jpg").read_bytes())
    fixed = run_build(client, dataset, out)
    assert (fixed.updated, fixed.embedded, fixed.failed) == (1, 1, [])
    assert fixed.indexed == first.indexed + 1


def test_an_unchanged_dataset_keeps_its_index_as_it_was(client, dataset, tmp_path):
    out, index_dir = tmp_path / "out", tmp_path / "out" / "beach"
    (dataset / "broken.jpg").write_bytes(b"not a jpeg")
    first = run_build(client, dataset, out)
    written = _stamps(index_dir)
    staging = staging_dir(index_dir)  # an interrupted run's shard, no longer needed
    staging.mkdir()
    shutil.copy(next((index_dir / SHARDS_DIR).iterdir()), staging)

    again = run_build(client, dataset, out)
    assert again.kept.startswith("nothing added, changed or removed since ")
    assert (again.embedded, again.indexed) == (0, first.indexed)
    assert again.unchanged == first.indexed + 1
    assert again.failed == first.failed
    assert (again.index_key, again.quality) == (first.index_key, first.quality)
    assert again.shards == first.shards
    assert _stamps(index_dir) == written
    assert not staging.exists()


def test_a_collection_smaller_than_recall_k_keeps_its_index_too(client, tmp_path):
    # Its recall was measured at k = its size, not at imgindex.index.recall-k
    # (10): the index was rebuilt on every run before.
    folder = tmp_path / "few"
    write_photos(folder, 5, seed=5, max_side=320)
    first = run_build(client, folder, tmp_path / "out")
    assert first.quality["k"] == 5
    again = run_build(client, folder, tmp_path / "out")
    assert again.kept.startswith("nothing added, changed or removed since ")


def test_a_build_rewrites_the_index_when_anything_that_shapes_it_changed(
    client, dataset, tmp_path
):
    out, index_dir = tmp_path / "out", tmp_path / "out" / "beach"
    (dataset / "broken.jpg").write_bytes(b"not a jpeg")
    first = run_build(client, dataset, out)

    stricter = IndexRequest.from_config(recall_target=0.99)
    retuned = run_build(client, dataset, out, index=stricter)
    assert (retuned.kept, retuned.quality["target"]) == ("", 0.99)
    assert run_build(client, dataset, out, index=stricter).kept

    with open(index_dir / INDEX_FILE, "r+b") as f:
        f.truncate(1000)
    repaired = run_build(client, dataset, out, index=stricter)
    assert (repaired.kept, repaired.embedded) == ("", 0)
    assert read_index(index_dir).index.ntotal == first.indexed

    meta = json.loads((index_dir / "meta.json").read_text())
    (index_dir / "meta.json").write_text(
        json.dumps({**meta, "imgindex_version": "0.2.0"})
    )
    upgraded = run_build(client, dataset, out, index=stricter)
    assert upgraded.kept == ""
    assert read_meta(index_dir).imgindex_version == __version__

    (dataset / "broken.jpg").unlink()  # no longer a failure to report
    assert run_build(client, dataset, out, index=stricter).failed == []

    graph = run_build(client, dataset, out, index=IndexRequest.from_config("hnsw"))
    assert (graph.kept, graph.embedded) == ("", 0)
    assert "HNSW" in graph.index_key
    assert run_build(client, dataset, out, rebuild=True).kept == ""


def _stamps(folder: Path) -> dict[str, tuple[int, int]]:
    """Every entry of ``folder`` (and it) by inode and modification time."""
    return {
        str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in [folder, *folder.rglob("*")]
    }


@pytest.mark.parametrize("rebuild", [False, True])
def test_out_that_would_replace_the_dataset_is_refused(client, dataset, rebuild):
    before = sorted(p.name for p in dataset.iterdir())
    with pytest.raises(IndexDirError, match="holds the dataset itself"):
        run_build(client, dataset, dataset.parent, rebuild=rebuild)
    assert sorted(p.name for p in dataset.iterdir()) == before


def test_rebuild_never_replaces_a_folder_that_is_not_an_index(
    client, dataset, tmp_path
):
    foreign = tmp_path / "out" / "beach"
    foreign.mkdir(parents=True)
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(IndexDirError, match="is not an imgindex index"):
        run_build(client, dataset, tmp_path / "out", rebuild=True)
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_queries_obey_the_same_pixel_limit_as_indexed_images(built, tmp_path):
    # Issue 9: the spec comes from one place (ModelSpec.from_config) for both.
    import dask.config

    from imgindex.pipeline.errors import DecodeError

    roots, out, _ = built
    query = roots["beach"] / "img00000.jpg"
    with dask.config.set({"imgindex.max-image-pixels": 1000}):
        with pytest.raises(DecodeError, match="over the limit"):
            Searcher(out / "beach").search_images([query])


def test_a_rerun_matches_images_by_path_whatever_order_the_manifest_is_in(
    client, tmp_path
):
    """The diff streams the index in place against the listing, both in path
    order as bytes; an index written by imgindex 0.4 lists them in text
    order, which differs for names that are not UTF-8. Every image must be
    matched all the same: none embedded again, none counted removed."""
    data, out = tmp_path / "data", tmp_path / "out"
    a, b, c = write_photos(data, 3, min_side=64, max_side=96)
    # bytes order: a, b (EE 80 80), c (FF); text order: a, c (U+DCFF), b
    b = b.rename(data / "\ue000-b.jpg")
    c = c.rename(data / os.fsdecode(b"\xff-c.jpg"))
    first = run_build(client, data, out)
    assert first.indexed == 3
    manifest = out / "data" / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [r["path"] for r in rows] == [a.name, b.name, c.name]
    manifest.write_text(
        "".join(json.dumps(r) + "\n" for r in sorted(rows, key=lambda r: r["path"]))
    )

    again = run_build(client, data, out)
    assert again.kept and (again.embedded, again.removed) == (0, 0)

    c.write_bytes(a.read_bytes())
    a.unlink()
    third = run_build(client, data, out)
    assert (third.added, third.updated, third.removed) == (0, 1, 1)
    assert (third.embedded, third.unchanged, third.indexed) == (1, 1, 2)
    assert {r.path for r in read_index(out / "data").manifest} == {b.name, c.name}
