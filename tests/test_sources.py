"""Datasets of every kind: file lists, tar shards (WebDataset layout), URLs.

Real tar files (written by tarfile and by the ``webdataset`` package), real
lists, a real S3-protocol server (moto) on 127.0.0.1 for the URLs.
"""

from __future__ import annotations

import csv
import io
import itertools
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from imgindex.pipeline.discover import (
    THUMBNAILS_MARKER,
    THUMBNAILS_SKIPPED,
    Failure,
    ImageRecord,
)
from imgindex.pipeline.embed import ModelSpec, embed_partition
from imgindex.pipeline.errors import DatasetError, DecodeError
from imgindex.pipeline.sources import (
    ShardStream,
    Source,
    expand_braces,
    parse_source,
)
from imgindex.pipeline.synthetic import write_photos
from tests.helpers import import_or_skip


def write_shard(path: Path, members: dict[str, bytes]) -> Path:
    """A tar file holding ``members`` (name -> bytes), in that order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return path


def shard_photos(paths: list[Path], folder: Path, per_shard: int) -> list[Path]:
    """``paths`` packed ``per_shard`` to a shard, as 00000.tar, 00001.tar, ..."""
    shards = []
    for n, start in enumerate(range(0, len(paths), per_shard)):
        chunk = paths[start : start + per_shard]
        members = {p.name: p.read_bytes() for p in chunk}
        shards.append(write_shard(folder / f"{n:05d}.tar", members))
    return shards


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    return write_photos(tmp_path_factory.mktemp("src"), 12, seed=5, max_side=400)


# What each DATASET argument is.


def test_each_kind_is_told_by_its_form(tmp_path, photos):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(photos[0].read_bytes())
    shards = shard_photos(photos, tmp_path / "shards", 5)
    listed = tmp_path / "photos.txt"
    listed.write_text("\n".join(str(p) for p in photos))
    tars = tmp_path / "shards.txt"
    tars.write_text("\n".join(s.name for s in shards))
    (tmp_path / "shards.txt").rename(tmp_path / "shards" / "all.txt")

    assert parse_source(folder).kind == "folder"
    assert parse_source(listed).kind == "list"
    assert parse_source(listed).name == "photos"
    by_pattern = parse_source(f"{tmp_path}/shards/{{00000..00002}}.tar")
    assert by_pattern.kind == "tar" and by_pattern.name == "shards"
    assert by_pattern.entries == ("00000.tar", "00001.tar", "00002.tar")
    assert parse_source(tmp_path / "shards").entries == by_pattern.entries
    one = parse_source(shards[1])
    assert (one.kind, one.name, one.entries) == ("tar", "00001", ("00001.tar",))
    assert parse_source(tmp_path / "shards" / "all.txt").entries == by_pattern.entries
    assert parse_source(tmp_path / "shards", "tar").kind == "tar"
    with pytest.raises(DatasetError, match="holds no .tar shards"):
        parse_source(folder, "tar")  # --input-format says what it must be


def test_brace_patterns_expand_as_webdataset_writes_them():
    assert expand_braces("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert expand_braces("{a,b}/{8..10}.tar") == [
        "a/8.tar",
        "a/9.tar",
        "a/10.tar",
        "b/8.tar",
        "b/9.tar",
        "b/10.tar",
    ]
    with pytest.raises(DatasetError, match="neither a range"):
        expand_braces("s/{0-3}.tar")


def test_bad_datasets_are_one_line_errors(tmp_path):
    with pytest.raises(DatasetError, match="file list .*nope.txt.* does not exist"):
        parse_source(tmp_path / "nope.txt")
    with pytest.raises(DatasetError, match="tar shard .*gone.tar.* does not exist"):
        parse_source(tmp_path / "gone.tar")
    with pytest.raises(DatasetError, match="unknown --input-format 'zip'"):
        parse_source(tmp_path, "zip")
    table = tmp_path / "photos.csv"
    table.write_text("file,label\na.jpg,cat\n")
    source = parse_source(table)
    with pytest.raises(DatasetError, match="no column 'path' .*'file', 'label'"):
        list(source.records([]))
    assert [r.path for r in parse_source(table, path_column="file").records([])] == []


# Listing.


def test_a_list_names_files_relative_to_itself_or_absolute(tmp_path, photos):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.jpg").write_bytes(photos[0].read_bytes())
    listed = tmp_path / "list.txt"
    listed.write_text(f"# comment\nsub/x.jpg\n\n{photos[1]}\nmissing.jpg\nsub/x.jpg\n")
    failures: list[Failure] = []
    source = parse_source(listed)
    records = list(source.records(failures))
    # In path order, as a plan holds them.
    assert [r.path for r in records] == [str(photos[1]), "sub/x.jpg"]
    assert records[1].size == (tmp_path / "sub" / "x.jpg").stat().st_size
    assert source.location("sub/x.jpg") == str(tmp_path / "sub" / "x.jpg")
    assert source.location(str(photos[1])) == str(photos[1])
    reasons = {f.path: f.reason for f in failures}
    assert reasons == {
        "missing.jpg": "file not found",
        "sub/x.jpg": "listed more than once (row 4); indexed once",
    }


def test_a_text_list_of_names_that_are_not_utf8_finds_them_as_a_walk_does(
    tmp_path, photos
):
    """``find`` over a disk of Latin-1 names writes a list that is not UTF-8:
    its names are the files' bytes, found as a walk of the folder finds them
    (the same text, so the same ids). A UTF-16 list is no list of paths."""
    name = os.fsdecode(b"caf\xe9.jpg")
    (tmp_path / name).write_bytes(photos[0].read_bytes())
    (tmp_path / "plain.jpg").write_bytes(photos[1].read_bytes())
    listed = tmp_path / "list.txt"
    listed.write_bytes(b"caf\xe9.jpg\nplain.jpg\nna\xefve.jpg\n")
    failures: list[Failure] = []
    records = list(parse_source(listed).records(failures))
    walked = list(parse_source(tmp_path).records([]))
    assert [r.path for r in records] == [name, "plain.jpg"]
    assert {r.path for r in walked} >= {name, "plain.jpg"}
    assert records[0].size == photos[0].stat().st_size
    assert [(f.path, f.reason) for f in failures] == [
        (os.fsdecode(b"na\xefve.jpg"), "file not found")
    ]

    wide = tmp_path / "wide.txt"
    wide.write_bytes("caf\u00e9.jpg\n".encode("utf-16"))
    with pytest.raises(DatasetError, match=r"wide.txt' is not text: it holds NUL"):
        list(parse_source(wide).records([]))


def test_lists_saved_with_a_byte_order_mark_are_read_as_written(tmp_path, photos):
    """Excel's "CSV UTF-8" and Windows editors begin the file with one: it is
    no part of the first column's name, nor of the first path."""
    table = tmp_path / "excel.csv"
    table.write_bytes(
        "\ufeffpath,label\n".encode()
        + "".join(f"{p},x{i}\n" for i, p in enumerate(photos[:2])).encode()
    )
    text = tmp_path / "notepad.txt"
    text.write_bytes("\ufeff".encode() + f"{photos[2]}\n{photos[3]}\n".encode())
    for listed, expected in ((table, photos[:2]), (text, photos[2:4])):
        failures: list[Failure] = []
        records = list(parse_source(listed).records(failures))
        assert [r.path for r in records] == [str(p) for p in expected], listed
        assert failures == []


def test_csv_and_parquet_lists_take_the_path_column(tmp_path, photos):
    pa = import_or_skip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"label": i, "image": str(p)} for i, p in enumerate(photos[:3])]
    with open(tmp_path / "t.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["label", "image"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    for name in ("t.csv", "t.parquet"):
        source = parse_source(tmp_path / name, path_column="image")
        assert [r.path for r in source.records([])] == [str(p) for p in photos[:3]]


def test_a_parquet_list_is_read_by_the_tasks_a_run_of_row_groups_each(
    client, tmp_path, photos, monkeypatch
):
    """The client reads a .parquet list's footer alone; the tasks read its
    row groups. Rows are numbered as one read numbers them, whatever the
    split, and each row's other columns come with it (the CSV of the same
    rows gives the same plan)."""

    import pyarrow as pa
    import pyarrow.parquet as pq

    from imgindex.pipeline import sources
    from imgindex.pipeline.build import plan_dataset
    from imgindex.pipeline.listing import Unit

    names = [str(p) for p in photos[:5]]
    cells = [*names, None, names[2], "missing.jpg", " ", names[4]]
    rows = [{"image": c, "well": f"A{n}", "n": n} for n, c in enumerate(cells)]
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=3)
    with open(tmp_path / "t.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["image", "well", "n"])
        writer.writeheader()
        writer.writerows(rows)

    monkeypatch.setattr(sources, "LIST_ROWS_PER_UNIT", 4)  # two groups a unit
    source = parse_source(tmp_path / "t.parquet", path_column="image")
    units = list(sources._list_units(source))
    assert units == [
        Unit(span=(0, 2), number=0, groups=True),
        Unit(span=(2, 4), number=1, groups=True),
    ]
    plans = {}
    for name in ("t.parquet", "t.csv"):
        table_source = parse_source(tmp_path / name, path_column="image")
        with plan_dataset(table_source, tmp_path / "out", cluster=client) as planned:
            plan = planned.plan
            plans[name] = (
                list(plan.to_embed.with_meta()),
                sorted((f.path, f.reason) for f in plan.known_failures),
            )
    # The same images and rows (a CSV's cells are text, Parquet's typed).
    embedded, failures = plans["t.parquet"]
    assert [r for r, _ in embedded] == [r for r, _ in plans["t.csv"][0]]
    assert failures == plans["t.csv"][1]
    assert [(r.path, meta) for r, meta in embedded] == [
        (p, {"well": f"A{n}", "n": n})
        for n, p in sorted(enumerate(names), key=lambda x: x[1])
    ]
    # Rows count the entries: empty path cells are not rows.
    assert failures == sorted(
        [
            ("missing.jpg", "file not found"),
            (names[2], "listed more than once (row 6); indexed once"),
            (names[4], "listed more than once (row 8); indexed once"),
        ]
    )


def test_a_parquet_list_that_is_not_parquet_is_one_line(tmp_path):
    (tmp_path / "t.parquet").write_text("image\nx.jpg\n")
    with pytest.raises(DatasetError, match=r"t\.parquet' is not a Parquet file"):
        parse_source(tmp_path / "t.parquet").listing(tmp_path / "parts")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"file": "x.jpg"}]), tmp_path / "u.parquet")
    with pytest.raises(DatasetError, match="has no column 'path'.*'file'"):
        parse_source(tmp_path / "u.parquet").listing(tmp_path / "parts")


def test_shards_are_planned_whole_and_their_members_found_in_one_pass(tmp_path, photos):
    shard = write_shard(
        tmp_path / "00000.tar",
        {
            "b.jpg": photos[0].read_bytes(),
            "b.json": b"{}",  # a WebDataset sample's other parts are not images
            "a/c.png": photos[1].read_bytes(),
        },
    )
    source = parse_source(shard)
    failures: list[Failure] = []
    (planned,) = source.records(failures)  # a stat, no read
    assert planned == ImageRecord(
        "00000.tar", shard.stat().st_size, shard.stat().st_mtime_ns
    )
    stream = ShardStream(source, [planned])
    got = [(rel, bytes(data)) for rel, data in stream]
    assert got == [
        ("00000.tar/b.jpg", photos[0].read_bytes()),
        ("00000.tar/a/c.png", photos[1].read_bytes()),
    ]
    # A member's record: its size, and its shard's mtime (written again:
    # embedded again).
    assert stream.records[0] == ImageRecord(
        "00000.tar/b.jpg", photos[0].stat().st_size, planned.mtime_ns
    )
    assert stream.failures == [] and failures == []
    assert source.location("00000.tar/a/c.png") == f"{shard}/a/c.png"
    missing = parse_source(f"{tmp_path}/{{00000..00001}}.tar")
    assert [r.path for r in missing.records(failures)] == ["00000.tar"]
    assert failures == [Failure("00001.tar", "tar shard not found")]


def test_webdataset_shards_are_read_as_written(tmp_path, photos):
    wds = import_or_skip("webdataset")
    folder = tmp_path / "wds"
    folder.mkdir()
    for n in range(2):
        with wds.TarWriter(str(folder / f"shard-{n:06d}.tar")) as sink:
            for i, p in enumerate(photos[n * 6 : n * 6 + 6]):
                sink.write({"__key__": f"s{n}{i:04d}", "jpg": p.read_bytes(), "cls": i})
    source = parse_source(f"{folder}/shard-{{000000..000001}}.tar")
    shards = list(source.records([]))
    assert [r.path for r in shards] == ["shard-000000.tar", "shard-000001.tar"]
    assert source.partitions(shards, size=4) == [(shards[0],), (shards[1],)]
    stream = ShardStream(source, shards)
    members = list(stream)
    assert [rel for rel, _ in members][:2] == [
        "shard-000000.tar/s00000.jpg",
        "shard-000000.tar/s00001.jpg",
    ]
    assert [bytes(data) for _, data in members] == [p.read_bytes() for p in photos]
    # Read again member by member (the service, duplicates):
    with source.reader([rel for rel, _ in members]) as reader:
        assert bytes(reader.read(members[7][0])) == photos[7].read_bytes()


def test_a_damaged_shard_is_one_failure_after_the_members_before_it(tmp_path, photos):
    whole = write_shard(
        tmp_path / "whole.tar", {p.name: p.read_bytes() for p in photos[:4]}
    )
    data = whole.read_bytes()
    cut = tmp_path / "cut.tar"
    # Cut inside the third member's data.
    third = 3 * 512 + sum(-(-photos[i].stat().st_size // 512) * 512 for i in range(2))
    cut.write_bytes(data[: third + 100])
    source = parse_source(cut)
    stream = ShardStream(source, list(source.records([])))
    assert [rel for rel, _ in stream] == [f"cut.tar/{p.name}" for p in photos[:2]]
    (failure,) = stream.failures
    assert failure.path == "cut.tar"
    assert failure.reason.startswith("damaged tar shard: ")
    with source.reader([f"cut.tar/{photos[2].name}"]) as reader:
        with pytest.raises(DecodeError, match="tar shard is damaged here"):
            reader.read(f"cut.tar/{photos[2].name}")
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"not a tar at all" * 100)
    empty = write_shard(tmp_path / "empty.tar", {"a.json": b"{}"})
    for path, reason in (
        (garbage, "not a readable tar shard"),
        (empty, "holds no image members"),
    ):
        source = parse_source(path)
        stream = ShardStream(source, list(source.records([])))
        assert list(stream) == []
        assert [(f.path, f.reason[: len(reason)]) for f in stream.failures] == [
            (path.name, reason)
        ]


def test_the_tar_reader_serves_any_order_and_asks_again(tmp_path, photos):
    shard = write_shard(tmp_path / "s.tar", {p.name: p.read_bytes() for p in photos})
    source = parse_source(shard)
    rels = [f"s.tar/{p.name}" for p in photos]
    with source.reader(rels) as reader:
        assert bytes(reader.read(rels[5])) == photos[5].read_bytes()
        assert bytes(reader.read(rels[2])) == photos[2].read_bytes()  # kept on the way
        assert bytes(reader.read(rels[5])) == photos[5].read_bytes()  # a new pass
        with pytest.raises(DecodeError, match="not in its tar shard"):
            reader.read("s.tar/never.jpg")


# Embedding from a source (a task, run here without a cluster).


@pytest.mark.parametrize("decoder", ["pillow", "batch"])
def test_tar_members_embed_as_the_same_files_do(tmp_path, photos, decoder):
    folder = tmp_path / "files"
    folder.mkdir()
    for p in photos[:6]:
        (folder / p.name).write_bytes(p.read_bytes())
    members = {p.name: p.read_bytes() for p in photos[:6]}
    members["bad.jpg"] = b"not an image"
    shard = write_shard(tmp_path / "s" / "00000.tar", members)
    spec = ModelSpec(device="cpu", decoder=decoder)
    from_files = embed_partition(
        str(folder), list(parse_source(folder).records([])), spec
    )
    source = parse_source(shard)
    from_tar = embed_partition(source.for_tasks(), list(source.records([])), spec)
    assert from_tar.records == [
        ImageRecord(f"00000.tar/{name}", len(data), shard.stat().st_mtime_ns)
        for name, data in members.items()
    ]
    assert from_tar.paths == [f"00000.tar/{p.name}" for p in photos[:6]]
    np.testing.assert_allclose(from_tar.vectors, from_files.vectors, atol=1e-5)
    by_path = dict(zip(from_files.paths, from_files.traits, strict=True))
    for path, row in zip(from_tar.paths, from_tar.traits, strict=True):
        assert row == by_path[path.split("/", 1)[1]]  # content hash included
    assert [(f.path, f.reason) for f in from_tar.failures] == [
        ("00000.tar/bad.jpg", "not an image Pillow can read")
    ]


def test_a_source_travels_to_tasks_without_its_shard_list(tmp_path, photos):
    shards = shard_photos(photos, tmp_path / "shards", 3)
    source = parse_source(tmp_path / "shards")
    assert len(source.entries) == len(shards) == 4
    slim = source.for_tasks()
    assert slim.entries == () and slim == source
    assert isinstance(slim, Source)


# Whole builds on a real (in-process) LocalCluster.


def test_tar_shards_build_search_rerun_and_find_copies(client, photo_sets, tmp_path):
    from imgindex.pipeline.build import run_build
    from imgindex.pipeline.duplicates import DuplicateSettings, find_duplicates
    from imgindex.pipeline.search import Searcher
    from tests.helpers import read_index

    beach = photo_sets["beach"]  # 36 photos
    shards = shard_photos(beach[:30], tmp_path / "shards", 10)
    # A fourth shard: a byte copy of a photo of the first, a member that is
    # not an image, and a cut-off end.
    extra = write_shard(
        tmp_path / "shards" / "00003.tar",
        {
            "copy.jpg": beach[0].read_bytes(),
            "notes.jpg": b"these are notes, not a photo",
            "late.jpg": beach[31].read_bytes(),
            "lost.jpg": beach[32].read_bytes(),
        },
    )
    whole = extra.read_bytes()
    extra.write_bytes(whole[: len(whole) - 1024 - 512 - beach[32].stat().st_size // 2])
    out = tmp_path / "out"
    pattern = f"{tmp_path}/shards/{{00000..00003}}.tar"

    first = run_build(client, pattern, out)
    assert first.name == "shards" and first.source == pattern
    assert first.partitions == 4  # one task a shard
    assert first.indexed == first.embedded == 32
    reasons = {f["path"]: f["reason"] for f in first.failed}
    assert reasons["00003.tar/notes.jpg"] == "not an image Pillow can read"
    assert "damaged tar shard" in reasons["00003.tar"]
    stored = read_index(out / "shards")
    assert stored.meta.source_kind == "tar" and stored.meta.format == 4
    assert stored.meta.source_base == str(tmp_path / "shards")

    searcher = Searcher(out / "shards")
    (hit, *_), *_ = searcher.search_images([str(beach[12])], k=2)
    assert hit.path == f"{shards[1]}/{beach[12].name}" and hit.score > 0.99

    # Nothing changed: kept. One shard written again without one photo:
    # only its members are embedded again.
    assert run_build(client, pattern, out).kept
    shard_photos(beach[:30], tmp_path / "again", 10)
    write_shard(shards[2], {p.name: p.read_bytes() for p in beach[20:29]})
    again = run_build(client, pattern, out)
    assert (again.added, again.updated, again.removed) == (0, 9, 1)
    assert again.embedded == 9 and again.indexed == 31

    report = find_duplicates(out / "shards", DuplicateSettings(), client)
    copies = [{m.path for m in g.members} for g in report.groups]
    assert {f"00000.tar/{beach[0].name}", "00003.tar/copy.jpg"} in copies
    (group,) = [
        g for g in report.groups if "00003.tar/copy.jpg" in {m.path for m in g.members}
    ]
    assert any(p.kind == "identical" for p in group.pairs)


def test_file_list_builds_with_its_failures_and_metadata_free_rows(
    client, photo_sets, tmp_path
):
    from imgindex.pipeline.build import run_build
    from tests.helpers import read_index

    forest = photo_sets["forest"]
    rows = [str(p) for p in forest[:20]] + ["missing.jpg", str(forest[0])]
    with open(tmp_path / "forest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "image"])
        writer.writerows([i, r] for i, r in enumerate(rows))
    source = parse_source(tmp_path / "forest.csv", path_column="image")
    summary = run_build(client, source, tmp_path / "out")
    assert summary.name == "forest" and summary.indexed == 20
    reasons = {f["path"]: f["reason"] for f in summary.failed}
    assert reasons == {
        "missing.jpg": "file not found",
        str(forest[0]): "listed more than once (row 22); indexed once",
    }
    stored = read_index(tmp_path / "out" / "forest")
    assert {r.path for r in stored.manifest} == {str(p) for p in forest[:20]}
    assert stored.meta.source_kind == "list"


def test_serve_shows_and_searches_images_from_shards_and_lists(
    client, service, photo_sets, tmp_path
):
    from imgindex.pipeline.build import run_build
    from imgindex.pipeline.discover import image_id

    forest = photo_sets["forest"][:8]
    shard_photos(forest, tmp_path / "packed", 4)
    pattern = f"{tmp_path}/packed/{{00000..00001}}.tar"
    run_build(client, pattern, service.index_root, name="packed")
    listed = tmp_path / "listed.txt"
    listed.write_text("\n".join(str(p) for p in forest))
    run_build(client, listed, service.index_root)

    # A folder of shards under the service's dataset root, built by the
    # service itself: taken as tar shards by its form.
    shard_photos(forest[:4], service.dataset_root / "packed-here", 2)
    built = service.wait(service.build("packed-here")["id"])
    assert built["state"] == "finished", built
    info = service.request("GET", "/api/indexes/packed-here").json()
    assert info["count"] == 4

    member = f"00001.tar/{forest[5].name}"
    for index, rel, where in (
        ("packed", member, f"{tmp_path}/packed/{member}"),
        ("listed", str(forest[5]), str(forest[5])),
    ):
        base = f"/api/indexes/{index}/images/{image_id(rel)}"
        image = service.request("GET", base)
        assert image.status_code == 200, image.text
        assert image.content == forest[5].read_bytes()
        assert image.headers["Content-Type"] == "image/jpeg"
        info = service.request("GET", f"{base}/info").json()
        assert (info["path"], info["bytes"]) == (where, forest[5].stat().st_size)
        thumb = service.request("GET", f"{base}/thumbnail?side=64")
        assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"
        found = service.request(
            "POST", f"/api/indexes/{index}/search", json={"path": rel, "k": 2}
        )
        assert found.status_code == 200, found.text
        hits = found.json()["hits"]
        assert hits[0]["relpath"] == rel and hits[0]["score"] > 0.999


@pytest.fixture
def s3_server():
    """A real S3-protocol server (moto's) on 127.0.0.1, and a client of it."""
    yield from _moto_server()


@pytest.fixture
def s3_server_enforcing():
    """moto's S3 server enforcing IAM policies once its first 100 requests
    are spent (its INITIAL_NO_AUTH_ACTION_COUNT): a test sets up its
    users and objects, then spends the rest (see _spend_free_requests)."""
    yield from _moto_server({"INITIAL_NO_AUTH_ACTION_COUNT": "100"})


def _moto_server(env: dict[str, str] | None = None):
    import_or_skip("moto")
    import_or_skip("s3fs")
    import_or_skip("boto3")
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    s3 = _aws("s3", url)
    try:
        for _ in range(100):
            try:
                s3.list_buckets()
                break
            except Exception:  # not listening yet
                time.sleep(0.1)
        yield url, s3
    finally:
        server.terminate()
        server.wait(10)


def _aws(
    service: str,
    url: str,
    key: str = "lab-key-id",
    secret: str = "lab-very-secret",
    **options,
):
    """A boto3 client of ``service`` at the moto server ``url``."""
    import boto3

    return boto3.client(
        service,
        endpoint_url=url,
        aws_access_key_id=key,
        aws_secret_access_key=secret,
        region_name="us-east-1",
        **options,
    )


def test_an_object_the_key_may_not_read_is_reported_as_permission_denied(
    s3_server_enforcing, client, photo_sets, tmp_path
):
    """A key whose policy denies one object (HTTP 403 from S3): the build
    indexes the rest and reports that object, with the reason, not as "not
    found" and not as a failed build."""
    import json

    import dask
    from botocore.config import Config
    from botocore.exceptions import ClientError

    from imgindex.pipeline.build import run_build

    url, s3 = s3_server_enforcing
    s3.create_bucket(Bucket="lab")
    beach = photo_sets["beach"][:3]
    for p in beach:
        s3.put_object(Bucket="lab", Key=f"photos/{p.name}", Body=p.read_bytes())
    s3.put_object(Bucket="lab", Key="photos/secret.jpg", Body=beach[0].read_bytes())
    iam = _aws("iam", url)
    iam.create_user(UserName="student")
    key = iam.create_access_key(UserName="student")["AccessKey"]
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
            {
                "Effect": "Deny",
                "Action": "s3:GetObject",
                "Resource": "arn:aws:s3:::lab/photos/secret.jpg",
            },
        ],
    }
    iam.put_user_policy(
        UserName="student", PolicyName="no-secrets", PolicyDocument=json.dumps(policy)
    )
    student = _aws(
        "s3",
        url,
        key["AccessKeyId"],
        key["SecretAccessKey"],
        config=Config(retries={"max_attempts": 1}),  # one request a call
    )
    for _ in range(100):  # spend the requests moto lets through unchecked
        try:
            student.get_object(Bucket="lab", Key="photos/secret.jpg")
        except ClientError as e:
            assert e.response["ResponseMetadata"]["HTTPStatusCode"] == 403
            break
    else:
        pytest.fail("moto never enforced the policy")

    options = {
        "endpoint_url": url,
        "key": key["AccessKeyId"],
        "secret": key["SecretAccessKey"],
    }
    with dask.config.set({"imgindex.storage-options": options}):
        summary = run_build(client, "s3://lab/photos/", tmp_path / "out")
    assert summary.indexed == 3
    assert summary.failed == [
        {"path": "secret.jpg", "reason": "permission denied (HTTP 403)"}
    ]


@pytest.mark.slow
def test_object_store_folders_lists_and_shards_build_with_the_cli(
    s3_server, photo_sets, tmp_path
):
    """`imgindex build s3://...` as a user runs it: its own LocalCluster's
    workers open the objects with imgindex.storage-options from the
    environment, and the credentials appear in no file it writes."""
    import json
    import subprocess
    import time

    from tests.helpers import imgindex_cmd, read_index

    url, s3 = s3_server
    s3.create_bucket(Bucket="lab")
    beach = photo_sets["beach"][:6]
    for p in beach:
        s3.put_object(Bucket="lab", Key=f"photos/{p.name}", Body=p.read_bytes())
    s3.put_object(Bucket="lab", Key="photos/bad.jpg", Body=b"not a photo")
    # A duplicates report's thumbnails, synced up with the photos.
    thumbs = "photos/report_thumbs/"
    s3.put_object(Bucket="lab", Key=thumbs + THUMBNAILS_MARKER, Body=b"")
    s3.put_object(Bucket="lab", Key=thumbs + "1.jpg", Body=beach[0].read_bytes())
    shard = write_shard(tmp_path / "00000.tar", {p.name: p.read_bytes() for p in beach})
    s3.put_object(Bucket="lab", Key="shards/00000.tar", Body=shard.read_bytes())
    rows = "\n".join(
        [*(f"s3://lab/photos/{p.name}" for p in beach[:3]), "s3://lab/photos/gone.jpg"]
    )
    s3.put_object(Bucket="lab", Key="lists/some.txt", Body=rows.encode())

    env = {
        **__import__("os").environ,
        "DASK_IMGINDEX__STORAGE_OPTIONS__ENDPOINT_URL": url,
        "DASK_IMGINDEX__STORAGE_OPTIONS__KEY": "lab-key-id",
        "DASK_IMGINDEX__STORAGE_OPTIONS__SECRET": "lab-very-secret",
        "DASK_IMGINDEX__LOCAL__N_WORKERS": "2",
    }
    out = tmp_path / "out"
    run = subprocess.run(
        imgindex_cmd(
            "build",
            "s3://lab/photos/",
            "s3://lab/shards/{00000..00000}.tar",
            "s3://lab/lists/some.txt",
            "--out",
            out,
            "--json",
        ),
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr
    datasets = {d["name"]: d for d in json.loads(run.stdout)["datasets"]}
    assert datasets["photos"]["indexed"] == 6
    assert datasets["photos"]["failed"] == [
        {"path": "bad.jpg", "reason": "not an image Pillow can read"},
        {"path": "report_thumbs", "reason": THUMBNAILS_SKIPPED},
    ]
    assert datasets["shards"]["indexed"] == 6
    assert datasets["some"]["indexed"] == 3
    assert datasets["some"]["failed"] == [
        {"path": "s3://lab/photos/gone.jpg", "reason": "file not found"}
    ]
    stored = read_index(out / "shards")
    assert stored.meta.source == "s3://lab/shards/{00000..00000}.tar"
    assert {r.path for r in stored.manifest} == {f"00000.tar/{p.name}" for p in beach}

    search = subprocess.run(
        imgindex_cmd("search", out / "photos", beach[2], "-k", "1", "--json"),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert search.returncode == 0, search.stderr
    assert json.loads(search.stdout)[0][0]["path"] == f"s3://lab/photos/{beach[2].name}"

    # Uploaded again, the same bytes: a new LastModified, each object read
    # and its vector kept.
    time.sleep(1.1)  # LastModified counts whole seconds
    for p in beach:
        s3.put_object(Bucket="lab", Key=f"photos/{p.name}", Body=p.read_bytes())
    again = subprocess.run(
        imgindex_cmd("build", "s3://lab/photos/", "--out", out, "--json"),
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert again.returncode == 0, again.stderr
    (photos,) = json.loads(again.stdout)["datasets"]
    assert (photos["touched"], photos["embedded"], photos["indexed"]) == (6, 0, 6)

    written = b"".join(p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert b"lab-very-secret" not in written and b"lab-key-id" not in written
    assert "lab-very-secret" not in run.stderr


def test_the_cli_says_what_is_wrong_with_a_dataset_in_one_line(tmp_path):
    from tests.helpers import invoke, one_error_line

    table = tmp_path / "t.csv"
    table.write_text("file\na.jpg\n")
    cases = {
        (str(tmp_path / "nope.txt"),): "does not exist",
        (str(table),): "has no column 'path' (it has 'file')",
        (f"{tmp_path}/{{0-3}}.tar",): "is neither a range",
        (str(tmp_path), "--input-format", "tar"): "holds no .tar shards",
    }
    for args, fragment in cases.items():
        run = invoke("build", *args, "--out", tmp_path / "out")
        assert run.exit_code != 0
        assert fragment in one_error_line(run.stderr), run.stderr
    written = (tmp_path / "out").glob("*") if (tmp_path / "out").exists() else []
    assert [p.name for p in written if not p.name.startswith(".")] == []


def test_a_tar_build_resumes_shard_by_shard(client, photo_sets, tmp_path):
    import shutil

    from imgindex.pipeline.build import run_build
    from imgindex.pipeline.shards import read_shard, staging_dir
    from imgindex.pipeline.store import SHARDS_DIR

    beach = photo_sets["beach"]
    shard_photos(beach[:30], tmp_path / "shards", 10)
    pattern = f"{tmp_path}/shards/{{00000..00002}}.tar"
    reference = run_build(client, pattern, tmp_path / "ref")
    # An interrupted build: the partitions of two tar shards had finished.
    staging = staging_dir(tmp_path / "out" / "shards")
    staging.mkdir(parents=True)
    done = []
    for path in sorted((tmp_path / "ref" / "shards" / SHARDS_DIR).iterdir()):
        units = [u.path for u in read_shard(path).units]
        if units != ["00001.tar"]:
            shutil.copy(path, staging / path.name)
            done += units
    assert sorted(done) == ["00000.tar", "00002.tar"]
    seen: list[tuple[int, int]] = []
    summary = run_build(
        client,
        pattern,
        tmp_path / "out",
        progress=lambda d, t, f: seen.append((d, t)),
    )
    assert summary.resumed_partitions == 2 and summary.resumed_images == 20
    assert summary.embedded == 10 and summary.indexed == reference.indexed == 30
    assert seen[-1] == (30, 30)  # the estimate is exact once every shard is read
    assert summary.images_per_second > 0


def test_tar_shards_touched_keep_their_vectors_and_one_edited_is_read_again(
    client, tmp_path
):
    """A tar shard whose time changed is read whole on a worker, its members'
    digests compared with those stored: 00000.tar, touched, keeps its
    vectors; 00001.tar, written again with a BMP edited in its middle (the
    same sizes, the same tar size), is embedded again."""
    from PIL import Image

    from imgindex.pipeline.build import run_build
    from imgindex.pipeline.shards import staging_dir
    from tests.helpers import read_index

    rng = np.random.default_rng(7)
    scans = [rng.integers(0, 256, (120, 160, 3), np.uint8) for _ in range(9)]

    def bmp(pixels: np.ndarray) -> bytes:
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, "BMP")
        return out.getvalue()

    def pack(n: int) -> Path:
        members = {f"scan{k}.bmp": bmp(scans[k]) for k in range(3 * n, 3 * n + 3)}
        return write_shard(tmp_path / "shards" / f"{n:05d}.tar", members)

    tars = [pack(n) for n in range(3)]
    pattern = f"{tmp_path}/shards/{{00000..00002}}.tar"
    out = tmp_path / "out"
    assert run_build(client, pattern, out).indexed == 9
    before = read_index(out / "shards")

    os.utime(tars[0], ns=(10**18, 10**18))  # the same bytes, another time
    size = tars[1].stat().st_size
    scans[4][50:70] = 255 - scans[4][50:70]
    pack(1)
    assert tars[1].stat().st_size == size
    again = run_build(client, pattern, out)
    assert (again.touched, again.embedded, again.indexed) == (3, 3, 9)
    assert (again.updated, again.unchanged, again.added) == (3, 6, 0)
    assert not staging_dir(out / "shards").exists()
    after = read_index(out / "shards")
    vectors = {r.path: after.index.reconstruct(r.id) for r in after.manifest}
    old = {r.path: before.index.reconstruct(r.id) for r in before.manifest}
    for k in (0, 1, 2, 6, 7, 8):  # touched, and unchanged
        path = f"{k // 3:05d}.tar/scan{k}.bmp"
        np.testing.assert_array_equal(vectors[path], old[path])
    assert np.abs(vectors["00001.tar/scan4.bmp"] - old["00001.tar/scan4.bmp"]).max() > 0
    stamps = {r.path: r.mtime_ns for r in after.manifest}
    assert stamps["00000.tar/scan0.bmp"] == 10**18
    assert run_build(client, pattern, out).kept


@pytest.fixture
def http_folder(tmp_path):
    """A folder served over HTTP on 127.0.0.1; names with "forbidden" get 403."""
    import functools
    import http.server
    import threading

    class Handler(http.server.SimpleHTTPRequestHandler):
        def send_head(self):
            if "forbidden" in self.path:
                self.send_error(403, "Forbidden")
                return None
            return super().send_head()

        def log_message(self, *args):
            pass

    folder = tmp_path / "served"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(folder))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_a_list_of_urls_is_listed_and_read_over_http(http_folder, photos):
    import_or_skip("aiohttp")
    folder, url = http_folder
    for p in photos[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    rows = [f"{url}/{p.name}" for p in photos[:3]]
    listed = "\n".join([*rows, f"{url}/forbidden.jpg", f"{url}/caf"]).encode()
    (folder / "list.txt").write_bytes(listed + b"\xe9.jpg\n")
    source = parse_source(f"{url}/list.txt")
    assert (source.kind, source.name) == ("list", "list")
    failures: list[Failure] = []
    records = list(source.records(failures))
    assert [r.path for r in records] == rows
    assert records[0].size == photos[0].stat().st_size
    assert records[0].mtime_ns > 0  # from Last-Modified: a change is seen
    # fsspec reports any status as "not found"; its cause says 403.
    assert [(f.path, f.reason) for f in failures] == [
        (f"{url}/forbidden.jpg", "file: permission denied (HTTP 403)"),
        (
            f"{url}/caf\udce9.jpg",
            "not UTF-8, as a URL must be (percent-encode other bytes)",
        ),
    ]
    with source.reader(rows) as reader:
        assert bytes(reader.read(rows[1])) == photos[1].read_bytes()
        with pytest.raises(DecodeError, match=r"permission denied \(HTTP 403\)"):
            reader.read(f"{url}/forbidden.jpg")


def test_a_list_of_ten_thousand_rows_is_planned_with_every_bad_row_named(
    tmp_path, photos
):
    from imgindex.pipeline.embed import ModelSpec
    from imgindex.pipeline.plan import plan_build

    folder = tmp_path / "many"
    folder.mkdir()
    data = photos[0].read_bytes()
    rows = []
    for i in range(10_000):
        name = f"d{i // 1000}/img{i:05d}.jpg"
        if i % 1000 != 999:  # every thousandth row names no file
            (folder / name).parent.mkdir(exist_ok=True)
            (folder / name).write_bytes(data)
        rows.append(name)
    listed = folder / "all.txt"
    listed.write_text("\n".join(rows))
    plan = plan_build(
        parse_source(listed), tmp_path / "out" / "all", ModelSpec(), False
    )
    assert len(plan.to_embed) == plan.added == 9_990
    first = list(itertools.islice(plan.to_embed, 2))
    assert [r.path for r in first] == ["d0/img00000.jpg", "d0/img00001.jpg"]
    assert sorted(f.path for f in plan.known_failures) == [
        f"d{k}/img{k * 1000 + 999:05d}.jpg" for k in range(10)
    ]
    assert {f.reason for f in plan.known_failures} == {"file not found"}


def test_a_tables_other_columns_travel_into_the_manifest_and_results(
    client, photo_sets, tmp_path
):
    import json

    from imgindex.pipeline.build import run_build
    from imgindex.pipeline.reindex import reindex
    from imgindex.pipeline.search import Searcher
    from imgindex.pipeline.store import MANIFEST_FILE
    from tests.helpers import read_index

    forest = photo_sets["forest"][:6]
    table = tmp_path / "plates.csv"

    def write(label_of_first: str, images: list[Path] = forest) -> None:
        with open(table, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["plate", "file", "stain"])
            for i, p in enumerate(images):
                writer.writerow([i, str(p), label_of_first if i == 0 else "DAPI"])

    write("GFP")
    out = tmp_path / "out"
    first = run_build(client, parse_source(table, path_column="file"), out)
    assert first.indexed == 6
    rows = [
        json.loads(line)
        for line in (out / "plates" / MANIFEST_FILE).read_text().splitlines()
    ]
    assert {r["path"]: r["meta"] for r in rows}[str(forest[0])] == {
        "plate": "0",
        "stain": "GFP",
    }
    assert read_index(out / "plates").meta.metadata_columns == ["plate", "stain"]
    (hit, *_), *_ = Searcher(out / "plates").search_images([str(forest[0])], k=1)
    assert hit.to_json()["meta"] == {"plate": "0", "stain": "GFP"}

    # A label edited, no image changed: nothing is embedded, the manifest is new.
    write("mCherry")
    again = run_build(client, parse_source(table, path_column="file"), out)
    assert not again.kept and again.embedded == 0 and again.indexed == 6
    stored = read_index(out / "plates")
    assert stored.metadata[str(forest[0])]["stain"] == "mCherry"
    assert run_build(client, parse_source(table, path_column="file"), out).kept
    reindex(out / "plates", client=client)
    assert read_index(out / "plates").metadata == stored.metadata

    # A row added: its image is embedded, and its columns come with it (the
    # others' from the kept rows).
    new = photo_sets["forest"][6]
    write("mCherry", [*forest, new])
    grown = run_build(client, parse_source(table, path_column="file"), out)
    assert (grown.added, grown.embedded, grown.indexed) == (1, 1, 7)
    metadata = read_index(out / "plates").metadata
    assert metadata[str(new)] == {"plate": "6", "stain": "DAPI"}
    assert metadata[str(forest[0])] == {"plate": "0", "stain": "mCherry"}


# Listing in parts (pipeline/listing.py).


def _tree_with_links(root: Path) -> Path:
    """Nested folders, images at every level, symbolic links across
    branches, to ancestors and to the root, a broken link and an empty file."""
    data = root / "data"
    for folder in ("a/x/deep/er", "a/y", "b/z", "c", "d/e/f/g"):
        (data / folder).mkdir(parents=True)
    for n, folder in enumerate(
        ("", "a", "a/x", "a/x/deep/er", "a/y", "b/z", "c", "d/e/f/g")
    ):
        (data / folder / f"img{n}.jpg").write_bytes(b"x" * (n + 1))
        (data / folder / f"note{n}.txt").write_text("not an image")
    (data / "a" / "x" / "up").symlink_to(data / "a")  # to an ancestor
    (data / "b" / "to-x").symlink_to(data / "a" / "x")  # across branches, later
    (data / "0-to-z").symlink_to(data / "b" / "z")  # across, sorts first
    (data / "c" / "root").symlink_to(data)  # to the root
    (data / "c" / "gone.jpg").symlink_to(data / "nowhere.jpg")
    return data


@pytest.mark.parametrize("target", [1, 2, 3, 5, 64])
def test_a_walk_split_in_parts_lists_what_one_walk_lists(tmp_path, target):
    from imgindex.pipeline.discover import discover_images
    from imgindex.pipeline.listing import (
        collect_listings,
        folder_units,
        list_unit,
        walk_conflicts,
    )
    from imgindex.pipeline.parts import record_of

    data = _tree_with_links(tmp_path)
    whole_failures: list[Failure] = []
    whole = list(discover_images(data, whole_failures))
    source = parse_source(data)
    parts = tmp_path / "parts"
    here, units = folder_units(source.base, parts, target)
    if 1 < target < 64:
        assert len(units) > 1  # the tree was split (64: all listed here)
    listings = [here, *(list_unit(source, u, parts) for u in units)]
    dropped, conflicts = walk_conflicts(listings)
    merged = collect_listings(listings, dropped)
    records = [record_of(row) for row in merged.items()]
    # In path order (a plan's and a manifest's), each image once.
    assert records == sorted(whole, key=lambda r: r.path)
    assert sorted((f.path, f.reason) for f in merged.failures + conflicts) == sorted(
        (f.path, f.reason) for f in whole_failures
    )
    assert "0-to-z/img5.jpg" in {r.path for r in whole}  # the first path wins


def test_listing_parts_are_parquet_any_reader_opens(tmp_path, photos):
    """A unit's part is a Parquet file sorted by path, with each row's id,
    list row and other columns: pyarrow reads it without imgindex."""
    import json

    import pyarrow.parquet as pq

    from imgindex.pipeline.discover import image_id
    from imgindex.pipeline.listing import Unit, list_unit

    table = tmp_path / "rows.csv"
    rows = [(photos[2].name, "b"), (photos[0].name, "a"), ("gone.jpg", "c")]
    table.write_text("file,plate\n" + "".join(f"{f},{p}\n" for f, p in rows))
    source = parse_source(table, path_column="file")
    # Entries relative to the table, which is not beside the photos here.
    unit = Unit(
        entries=tuple(str(photos[0].parent / f) for f, _ in rows),
        rows=(1, 2, 3),
        metas=tuple(json.dumps({"plate": p}) for _, p in rows),
    )
    listing = list_unit(source, unit, tmp_path / "parts")
    (part,) = listing.parts
    read = pq.read_table(part.file).to_pylist()
    assert [r["path"] for r in read] == [  # bytes, as file names are
        bytes(photos[0].parent / photos[n].name) for n in (0, 2)
    ]
    assert [(r["row"], json.loads(r["meta"])) for r in read] == [
        (2, {"plate": "a"}),
        (1, {"plate": "b"}),
    ]
    assert [r["id"] for r in read] == [image_id(r["path"].decode()) for r in read]
    assert [r["size"] for r in read] == [photos[n].stat().st_size for n in (0, 2)]
    assert [f.reason for f in listing.failures] == ["file not found"]
    assert listing.failure_rows == [3]


def test_a_large_listing_goes_to_the_workers_once_they_are_there(
    client, tmp_path, caplog, monkeypatch
):
    import logging
    from concurrent.futures import Future

    from imgindex.pipeline import listing, sources
    from imgindex.pipeline.build import plan_dataset
    from imgindex.pipeline.discover import discover_images

    # Small units, so that this small tree and list are split.
    monkeypatch.setattr(listing, "FOLDER_UNITS", 3)
    monkeypatch.setattr(sources, "LIST_SPAN_BYTES", 200)
    data = _tree_with_links(tmp_path)
    rows = [str(p) for p in sorted(data.rglob("*.jpg")) if p.is_file()]
    listed = tmp_path / "rows.txt"
    listed.write_text("\n".join(rows))
    spans = -(-listed.stat().st_size // 200)
    waiting: Future = Future()  # a cluster still starting: listed here
    with caplog.at_level(logging.INFO, logger="imgindex.pipeline.listing"):
        with plan_dataset(data, tmp_path / "out", cluster=waiting) as alone:
            assert not caplog.messages
            alone_records = list(alone.plan.to_embed)
        ready: Future = Future()
        ready.set_result(client)
        with plan_dataset(data, tmp_path / "out", cluster=ready) as planned:
            assert list(planned.plan.to_embed) == alone_records
        assert caplog.messages == ["listing data: 5 parts on the cluster"]
        with plan_dataset(listed, tmp_path / "out", cluster=client) as by_rows:
            assert [r.path for r in by_rows.plan.to_embed] == rows
        # Workers that cannot read the list (on the client's own disk) hand
        # their spans back, and the client lists them.
        monkeypatch.setattr(listing, "_list_readable", lambda spec: False)
        with plan_dataset(listed, tmp_path / "out", cluster=client) as unread:
            assert [r.path for r in unread.plan.to_embed] == rows
        monkeypatch.undo()
    whole = sorted(discover_images(data, []), key=lambda r: r.path)
    assert alone_records == whole
    assert caplog.messages[-2:] == [f"listing rows: {spans} parts on the cluster"] * 2


def test_a_text_list_read_in_spans_of_any_size_lists_what_one_read_lists(
    tmp_path, photos, monkeypatch
):
    """A .txt list is read by the tasks in byte spans: cut anywhere (inside
    a line, at its newline, inside a multi-byte character), the spans give
    each line once, with the row numbers one read gives."""
    from imgindex.pipeline import sources

    for n in range(3):
        (tmp_path / f"pic-é{n}.jpg").write_bytes(photos[n].read_bytes())
    lines = [
        "# a comment",
        "pic-é0.jpg",
        "",
        "pic-é1.jpg",
        "missing.jpg",
        "pic-é0.jpg",
        "   pic-é2.jpg   ",
        "missing.jpg",
        "pic-é1.jpg",
    ]
    listed = tmp_path / "list.txt"
    listed.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def listed_with(span: int):
        monkeypatch.setattr(sources, "LIST_SPAN_BYTES", span)
        failures: list[Failure] = []
        records = list(parse_source(listed).records(failures))
        return records, sorted((f.path, f.reason) for f in failures)

    whole = listed_with(1 << 20)
    assert [r.path for r in whole[0]] == [f"pic-é{n}.jpg" for n in range(3)]
    assert whole[1] == [
        ("missing.jpg", "file not found"),
        ("missing.jpg", "listed more than once (row 6); indexed once"),
        ("pic-é0.jpg", "listed more than once (row 4); indexed once"),
        ("pic-é1.jpg", "listed more than once (row 7); indexed once"),
    ]
    for span in range(1, listed.stat().st_size + 2):
        assert listed_with(span) == whole, span


def test_many_listing_parts_are_merged_in_groups_here_or_on_the_workers(
    client, tmp_path, monkeypatch, caplog
):
    """Parts beyond the merge's fan-in are merged in groups first (on the
    workers once they are there); a worker that does not see the plan's
    folder sends its rows back for the client to write. The plan is the
    same every way."""
    import logging
    from concurrent.futures import Future

    from imgindex.pipeline import parts, ranges, sources
    from imgindex.pipeline.build import plan_dataset
    from imgindex.pipeline.plan import plan_dir

    monkeypatch.setattr(sources, "LIST_ROWS_PER_UNIT", 2)
    monkeypatch.setattr(parts, "MERGE_FAN_IN", 2)
    data = _tree_with_links(tmp_path)
    rows = [str(p) for p in sorted(data.rglob("*.jpg")) if p.is_file()]
    listed = tmp_path / "rows.csv"  # read here, 2 rows to a unit
    # The list's order is not kept: a plan is in path order.
    listed.write_text("path\n" + "".join(f"{r}\n" for r in reversed(rows)))
    plans = []
    waiting: Future = Future()
    for cluster in (waiting, client, "unshared"):
        if cluster == "unshared":
            monkeypatch.setattr(ranges, "sees_folder", lambda folder, token: False)
            cluster = client
        with caplog.at_level(logging.INFO, logger="imgindex"):
            with plan_dataset(listed, tmp_path / "out", cluster=cluster) as planned:
                folder = plan_dir(planned.dest) / "listing"
                assert len(list(folder.glob("*.parquet"))) <= 2
                plans.append([r.path for r in planned.plan.to_embed])
    assert plans == [rows, rows, rows]
    assert len(rows) == 8  # 4 parts of 2 rows, merged into 2
    merging = "merge[rows]: 2 tasks on the cluster"  # 4 parts in 2 groups
    assert caplog.messages.count(merging) == 2  # not while the cluster starts


def test_thumbnails_of_shard_members_read_each_shard_once(
    tmp_path, photos, monkeypatch
):
    from imgindex.pipeline import sources
    from imgindex.pipeline.report_html import make_thumbnails

    shard_photos(photos[:8], tmp_path / "s", 4)
    source = parse_source(tmp_path / "s")
    # The page's order goes back and forth between the two shards.
    order = (5, 0, 6, 1, 7, 2, 4, 3)
    paths = [f"0000{n // 4}.tar/{photos[n].name}" for n in order]
    opened: list[str] = []
    real_open = sources._open
    monkeypatch.setattr(
        sources, "_open", lambda where: opened.append(where) or real_open(where)
    )
    thumbs = make_thumbnails(source, [*paths, "00000.tar/missing.jpg"], 32)
    assert sorted(opened) == [str(tmp_path / "s" / f"0000{k}.tar") for k in (0, 1)]
    # The same thumbnails as of the files themselves, in the page's order.
    loose = make_thumbnails(str(photos[0].parent), [photos[n].name for n in order], 32)
    assert thumbs == [*loose, None]


def test_pairs_across_two_shards_read_each_shard_once(tmp_path, photos, monkeypatch):
    """The duplicates' geometric check takes pairs whose images lie in two
    shards, back and forth: each shard is read in one pass all the same."""
    from imgindex.pipeline import sources
    from imgindex.pipeline.duplicates import verify_pairs

    shard_photos(photos[:8], tmp_path / "s", 4)
    source = parse_source(tmp_path / "s")
    numbers = ((0, 5), (1, 4), (2, 7), (3, 6), (0, 1))
    opened: list[str] = []
    real_open = sources._open
    monkeypatch.setattr(
        sources, "_open", lambda where: opened.append(where) or real_open(where)
    )
    found = verify_pairs(
        source,
        [(f"0000{a // 4}.tar/{photos[a].name}", f"0000{b // 4}.tar/{photos[b].name}")
         for a, b in numbers],
    )  # fmt: skip
    assert sorted(opened) == [str(tmp_path / "s" / f"0000{k}.tar") for k in (0, 1)]
    # The same answers as of the files themselves.
    loose = verify_pairs(
        str(photos[0].parent), [(photos[a].name, photos[b].name) for a, b in numbers]
    )
    assert found == loose and len(found) == len(numbers)


def test_planning_keeps_its_sets_in_parts_and_reports_id_collisions(
    tmp_path, photos, monkeypatch
):
    """The plan's sets are parts on disk, beside the index, removed with
    the plan; two paths of one id (forced here: a 63-bit hash never does it
    by chance) index the first and report the second."""
    from imgindex.pipeline import parts, plan
    from imgindex.pipeline.build import plan_dataset
    from imgindex.pipeline.discover import image_id

    data = tmp_path / "data"
    data.mkdir()
    for n, name in enumerate(("a.jpg", "b-twin.jpg", "c.jpg", "d-twin.jpg")):
        (data / name).write_bytes(photos[n].read_bytes())

    def forced(path: str) -> int:
        return 7 if "twin" in path else image_id(path)

    monkeypatch.setattr(parts, "image_id", forced)
    monkeypatch.setattr(plan, "image_id", forced)
    out = tmp_path / "out"
    with plan_dataset(data, out) as planned:
        work = plan.plan_dir(planned.dest)
        assert [r.path for r in planned.plan.to_embed] == [
            "a.jpg",
            "b-twin.jpg",
            "c.jpg",
        ]
        files = {Path(p.file).parent.name for p in planned.plan.to_embed.parts}
        assert files == {"embed"} and work.is_dir()
        assert [(f.path, f.reason) for f in planned.plan.known_failures] == [
            ("d-twin.jpg", "id collision with 'b-twin.jpg'; rename one")
        ]
        assert planned.plan.added == 3
    assert not work.exists()
    assert sorted(p.name for p in out.iterdir()) == [".data.lock"]  # the lock only


def test_partitions_of_a_plan_in_parts_are_slices_its_workers_read(
    client, tmp_path, photos, monkeypatch
):
    """A plan's partitions are slices of its parts: the same records, sizes
    and tapered tail as partitions of a list, none across two parts; a task
    carries the slice (not the records) to a worker that writes shards, and
    the index is the one the records themselves give."""
    from imgindex.pipeline import dispatch
    from imgindex.pipeline.build import run_build
    from imgindex.pipeline.discover import TAPER_FROM, partition_records
    from imgindex.pipeline.parts import PartRecords, PartSlice, PartWriter, row_of
    from tests.helpers import read_index

    records = [ImageRecord(f"d/{i:04d}.jpg", i, i) for i in range(1000)]
    writer = PartWriter(tmp_path / "parts", rows=300)
    writer.extend(row_of(r) for r in records)
    parts = PartRecords(writer.close())
    assert len(parts.parts) == 4
    before = {p.file: 300 * i for i, p in enumerate(parts.parts)}
    for size, tail in ((32, 0), (32, 3), (7, 0), (16, 2), (1000, 0)):
        slices = parts.slices(size, tail)
        assert all(isinstance(s, PartSlice) for s in slices)
        assert [r for s in slices for r in s] == records
        # As partition_records sizes them (the last tail * size images in
        # quarters), but cut where a part ends.
        tapered = tail and size >= TAPER_FROM
        head = max(0, 1000 - tail * size) // size * size if tapered else 1000
        assert len(partition_records(records, size, tail)) <= len(slices)
        for s in slices:
            start = before[s.file] + s.start
            limit = size if start < head else size // 4
            assert len(s) <= limit and (start >= head or start + len(s) <= head)
    half = parts.slices(32)[3][:16]
    assert (half.start, half.stop, [r.path for r in half][0]) == (96, 112, "d/0096.jpg")

    data = tmp_path / "data"
    data.mkdir()
    for p in photos[:12]:
        (data / p.name).write_bytes(p.read_bytes())
    packed: list[int] = []
    real_pack = dispatch.pack_records

    def pack(part):
        packed.append(len(part))
        return real_pack(part)

    monkeypatch.setattr(dispatch, "pack_records", pack)
    by_slices = run_build(client, data, tmp_path / "a", partition_size=4)
    assert packed == [] and by_slices.partitions > 1  # slices, read by the workers
    streamed = run_build(
        client, data, tmp_path / "b", partition_size=4, workers_write=False
    )
    # Records packed where the client writes the shards.
    assert sum(packed) == 12 and len(packed) == streamed.partitions
    assert by_slices.indexed == streamed.indexed == 12
    a, b = read_index(tmp_path / "a" / "data"), read_index(tmp_path / "b" / "data")
    assert a.manifest == b.manifest


def test_tar_planning_keeps_the_images_of_unchanged_shards_alone(tmp_path):
    """Of the index in place, a shard's images are kept only if every image
    and failure of it was read at the shard's current mtime: one read at two
    mtimes (indexed at the current, failed at another) is embedded whole."""
    from types import SimpleNamespace

    from imgindex.pipeline.plan import _plan_shards

    def rec(path: str, mtime: int) -> ImageRecord:
        return ImageRecord(path, 10, mtime)

    manifest = [
        rec("a.tar/1.jpg", 5), rec("a.tar/2.jpg", 5),  # a: unchanged
        rec("b.tar/1.jpg", 7),  # b: indexed at 7, failed at 6
        rec("c.tar/1.jpg", 3),  # c: written again since
        rec("d.tar/1.jpg", 2),  # d: gone
    ]  # fmt: skip
    failed = Failure("b.tar/2.jpg", "not an image Pillow can read")
    previous = SimpleNamespace(
        records=lambda: iter(manifest),
        failures=[failed],
        failed_records={failed.path: rec(failed.path, 6)},
    )
    shards = [rec("a.tar", 5), rec("b.tar", 7), rec("c.tar", 4)]
    plan = _plan_shards(shards, [], previous, tmp_path / "plan")
    assert sorted(r.path for r in plan.kept) == ["a.tar/1.jpg", "a.tar/2.jpg"]
    assert [s.path for s in plan.to_embed] == ["b.tar", "c.tar"]
    assert (plan.updated, plan.removed, plan.unchanged) == (2, 1, 2)
    assert plan.known_failures == []
