"""The incremental diff in path ranges, here and on the workers
(pipeline/diff.py): every split plans what one pass plans."""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from imgindex.pipeline import parts, ranges
from imgindex.pipeline import plan as plan_module
from imgindex.pipeline.diff import MetadataDigest
from imgindex.pipeline.discover import Failure, ImageRecord, image_id
from imgindex.pipeline.manifest_ids import IDS_FILE, ROW, manifest_line
from imgindex.pipeline.parts import PartWriter
from imgindex.pipeline.plan import _diff
from imgindex.pipeline.ranges import PathRange, path_ranges, rows_in_range
from imgindex.pipeline.sources import parse_source
from imgindex.pipeline.store import MANIFEST_FILE


def _dataset(tmp_path: Path) -> tuple[Path, list[str]]:
    """40 files (planning only stats them) and a table naming them, with a
    metadata column, two rows listed again and a missing file."""
    data = tmp_path / "data"
    data.mkdir()
    names = [f"{chr(ord('a') + n % 26)}{n:02d}.jpg" for n in range(40)]
    for n, name in enumerate(names):
        (data / name).write_bytes(b"x" * (100 + n))
    rows = [*names, names[3], "missing.jpg", names[17]]
    table = data / "list.csv"
    table.write_text(
        "path,plate\n" + "".join(f"{r},p{n % 5}\n" for n, r in enumerate(rows))
    )
    return table, sorted(names)


def _index_in_place(data: Path, names: list[str], folder: Path) -> SimpleNamespace:
    """An index in place as the diff reads it: its manifest file in
    ``folder`` (in no order: the spans sort their rows) and its failures."""

    def rec(name: str, mtime_shift: int = 0) -> ImageRecord:
        st = (data / name).stat()
        return ImageRecord(name, st.st_size, st.st_mtime_ns + mtime_shift)

    manifest = [rec(n) for n in names[:20]]  # unchanged
    manifest += [rec(n, 1) for n in names[20:25]]  # changed since
    manifest += [ImageRecord(f"gone{n}.jpg", 1, 1) for n in range(3)]  # removed
    random.Random(5).shuffle(manifest)
    folder.mkdir()
    (folder / MANIFEST_FILE).write_text("".join(map(manifest_line, manifest)))
    failed = {
        names[30]: rec(names[30]),  # unchanged: not tried again
        names[31]: rec(names[31], 1),  # changed: tried again
    }

    def check_count(count: int) -> None:
        assert count == len(manifest)

    return SimpleNamespace(
        folder=folder,
        check_count=check_count,
        failures=[Failure(p, "not an image Pillow can read") for p in failed],
        failed_records=failed,
    )


def _plan(table: Path, previous, work: Path, cluster=None):
    """The plan's sets and numbers, as plain values."""
    source = parse_source(table, path_column="path")
    listed = source.listing(work / "listing", cluster)
    plan = _diff(listed, previous, work, cluster, "data")
    return {
        "to_embed": [(r, m) for r, m in plan.to_embed.with_meta()],
        "kept": list(plan.kept),
        "numbers": (plan.added, plan.updated, plan.removed, plan.unchanged),
        "failures": sorted((f.path, f.reason) for f in plan.known_failures),
        "known": plan.known_records,
        "columns": plan.metadata_columns,
        "digest": plan.metadata_digest,
        "embed parts": plan.to_embed.parts,
    }


def test_the_diff_in_path_ranges_plans_what_one_pass_plans(
    client, tmp_path, monkeypatch, caplog
):
    table, names = _dataset(tmp_path)
    previous = _index_in_place(table.parent, names, tmp_path / "index")
    whole = _plan(table, previous, tmp_path / "one")
    assert whole["numbers"] == (13, 6, 3, 21)  # added, updated, removed, unchanged
    assert [r.path for r in whole["kept"]] == names[:20]
    assert [r.path for r, _ in whole["to_embed"]] == [
        n for n in names[20:] if n != names[30]
    ]
    # Each image with its first row's other columns.
    assert [m for _, m in whole["to_embed"]] == [
        {"plate": _plate(table, r.path)} for r, _ in whole["to_embed"]
    ]
    assert whole["failures"] == sorted(
        [
            (names[30], "not an image Pillow can read"),
            ("missing.jpg", "file not found"),
            (_nth(table, 41), _again(41)),
            (_nth(table, 43), _again(43)),
        ]
    )
    assert [r.path for r in whole["known"]] == [names[30]]
    assert whole["columns"] == ["plate"] and whole["digest"]
    assert len(whole["embed parts"]) == 1

    # Ranges split at row groups: 4 rows each here; the manifest is read in
    # spans of about 3 lines.
    monkeypatch.setattr(parts, "BATCH_ROWS", 4)
    monkeypatch.setattr(plan_module, "MANIFEST_SPAN_BYTES", 200)
    monkeypatch.setattr(ranges, "ROWS_PER_RANGE", 7)
    here = _plan(table, previous, tmp_path / "here")
    assert len(here["embed parts"]) > 3  # a part a range at least
    with caplog.at_level(logging.INFO, logger="imgindex.pipeline.ranges"):
        on_workers = _plan(table, previous, tmp_path / "workers", client)
        monkeypatch.setattr(ranges, "sees_folder", lambda folder, token: False)
        unseen = _plan(table, previous, tmp_path / "unseen", client)
    # The manifest read in spans, the diff in path ranges, the ids checked
    # in ranges of values: each on the workers, then (the workers not seeing
    # the plan's folder) here.
    unseen_folder = tmp_path / "unseen" / "listing"
    for kind in ("previous", "diff", "ids"):
        logged = [m for m in caplog.messages if m.startswith(f"{kind}[data]:")]
        n = int(logged[0].split()[1])
        assert logged == [
            f"{kind}[data]: {n} tasks on the cluster",
            f"{kind}[data]: {n} tasks on the cluster",
            f"{kind}[data]: {n} of {n} done here (the workers do not see "
            f"{unseen_folder})",
        ]
        assert n >= 5  # 43 rows, about 7 a range; 28 lines, about 3 a span
    for split in (here, on_workers, unseen):
        for key in ("to_embed", "kept", "numbers", "failures", "known", "digest"):
            assert split[key] == whole[key], key
    for work in ("one", "here", "workers", "unseen"):
        assert not list((tmp_path / work / "ids").glob("*.npy"))


def _nth(table: Path, row: int) -> str:
    """The path at ``row`` of the table (rows from 1)."""
    return table.read_text().splitlines()[row].split(",")[0]


def _plate(table: Path, path: str) -> str:
    """The plate of ``path``'s first row."""
    rows = [line.split(",") for line in table.read_text().splitlines()[1:]]
    return next(plate for name, plate in rows if name == path)


def _again(row: int) -> str:
    return f"listed more than once (row {row}); indexed once"


def test_ids_shared_across_path_ranges_are_found(client, tmp_path, monkeypatch):
    """Two paths of one id (forced: a 63-bit hash never does it by chance)
    in different ranges, on different workers: the first keeps it."""
    data = tmp_path / "data"
    data.mkdir()
    names = ["a-twin.jpg", *(f"m{n:02d}.jpg" for n in range(30)), "z-twin.jpg"]
    for name in names:
        (data / name).write_bytes(b"x")

    def forced(path: str) -> int:
        return 7 if "twin" in path else image_id(path)

    monkeypatch.setattr(parts, "image_id", forced)
    monkeypatch.setattr(parts, "BATCH_ROWS", 4)
    monkeypatch.setattr(ranges, "ROWS_PER_RANGE", 5)
    work = tmp_path / "plan"
    listed = parse_source(data).listing(work / "listing", client)
    plan = _diff(listed, None, work, client, "data")
    assert [r.path for r in plan.to_embed] == names[:-1]
    assert [(f.path, f.reason) for f in plan.known_failures] == [
        ("z-twin.jpg", "id collision with 'a-twin.jpg'; rename one")
    ]
    assert plan.added == len(names) - 1


def test_path_ranges_split_at_row_groups_and_cover_every_row(tmp_path, monkeypatch):
    monkeypatch.setattr(parts, "BATCH_ROWS", 16)  # row groups of 16 rows
    paths = sorted(os.urandom(6) + bytes([n % 256]) for n in range(1_000))
    writer = PartWriter(tmp_path, rows=300)
    for n, path in enumerate(paths):
        writer.add((path, n, 1, 1, n, None))
    written = writer.close()
    ranges = path_ranges(written, 100)
    assert 8 <= len(ranges) <= 12
    assert ranges[0].lo is None and ranges[-1].hi is None
    got = [[row[0] for p in written for row in rows_in_range(p, r)] for r in ranges]
    assert sorted(sum(got, [])) == paths  # each row in one range
    sizes = [len(g) for g in got]
    assert max(sizes) <= 100 + 16 and min(sizes) >= 100 - 16, sizes
    assert path_ranges(written, 1_000) == [PathRange()]


def test_a_tables_digest_is_the_same_whatever_the_split():
    rows = [(f"{n}.jpg", {"plate": n % 3, "well": f"A{n}"}) for n in range(10)]
    whole = MetadataDigest()
    for path, meta in rows:
        whole.add(path, meta)
    halves = [MetadataDigest(), MetadataDigest()]
    for n, (path, meta) in enumerate(reversed(rows)):
        halves[n % 2].add(path, meta)
    halves[0].merge(halves[1])
    assert halves[0].hexdigest() == whole.hexdigest() != ""
    edited = MetadataDigest()
    for path, meta in rows:
        edited.add(path, {**meta, "plate": 9} if path == "4.jpg" else meta)
    assert edited.hexdigest() != whole.hexdigest()
    assert MetadataDigest().hexdigest() == ""
    assert json.dumps(sorted(whole.columns)) == '["plate", "well"]'


def test_the_manifest_is_merged_in_path_ranges_on_the_workers(
    client, tmp_path, photo_sets, monkeypatch, caplog
):
    """A build's manifest (kept images and the new shards' merged) is
    written in path ranges by the workers: the same file, byte for byte, as
    one range writes; a re-run that adds and changes images merges them with
    those kept; a table's columns travel in every range."""
    import csv

    from imgindex.pipeline.build import run_build
    from imgindex.pipeline.store import MANIFEST_FILE
    from tests.helpers import read_index

    photos = photo_sets["beach"][:20]
    data = tmp_path / "data"
    data.mkdir()
    for p in photos[:16]:
        (data / p.name).write_bytes(p.read_bytes())
    table = tmp_path / "plates.csv"

    def write_table() -> None:
        with open(table, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "plate"])
            for n, p in enumerate(sorted(data.iterdir())):
                writer.writerow([str(p), f"p{n}"])

    def build(out: Path) -> bytes:
        summary = run_build(client, parse_source(table, path_column="file"), out)
        assert not summary.failed
        read_index(out / "plates")  # its index agrees with its manifest
        manifest = (out / "plates" / MANIFEST_FILE).read_bytes()
        # The ranges' ids files joined as their lines were: each line's id, length.
        lines = manifest.splitlines(keepends=True)
        ids = np.frombuffer((out / "plates" / IDS_FILE).read_bytes(), ROW)
        assert ids.tolist() == [(json.loads(x)["id"], len(x)) for x in lines]
        return manifest

    write_table()
    whole = build(tmp_path / "one")
    monkeypatch.setattr(parts, "BATCH_ROWS", 2)
    monkeypatch.setattr(ranges, "ROWS_PER_RANGE", 5)
    with caplog.at_level(logging.INFO, logger="imgindex.pipeline.ranges"):
        split = build(tmp_path / "split")
    assert split == whole
    logged = [m for m in caplog.messages if m.startswith("manifest[plates]:")]
    assert len(logged) == 1 and int(logged[0].split()[1]) >= 3
    assert not [m for m in caplog.messages if "done here" in m]  # all on workers
    rows = [json.loads(line) for line in split.splitlines()]
    assert [r["path"] for r in rows] == sorted(str(p) for p in data.iterdir())
    assert [r["meta"]["plate"] for r in rows] == [f"p{n}" for n in range(16)]

    # A re-run: four images added, one changed, the rest kept.
    for p in photos[16:]:
        (data / p.name).write_bytes(p.read_bytes())
    changed = data / photos[3].name
    changed.write_bytes(photos[19].read_bytes())
    write_table()
    monkeypatch.undo()
    again_whole = build(tmp_path / "one")
    monkeypatch.setattr(parts, "BATCH_ROWS", 2)
    monkeypatch.setattr(ranges, "ROWS_PER_RANGE", 5)
    again_split = build(tmp_path / "split")
    assert again_split == again_whole
    rows = [json.loads(line) for line in again_split.splitlines()]
    assert [r["path"] for r in rows] == sorted(str(p) for p in data.iterdir())
    assert len(rows) == 20 and [r["meta"]["plate"] for r in rows] == [
        f"p{n}" for n in range(20)
    ]
    (row,) = [r for r in rows if r["path"] == str(changed)]
    assert row["size"] == changed.stat().st_size


def test_a_damaged_manifest_read_on_the_workers_is_one_line(
    client, tmp_path, monkeypatch
):
    """A malformed line of the index in place's manifest, read by a worker's
    span, stops the plan with the reader's one-line error."""
    import pytest

    from imgindex.pipeline.errors import IndexDirError
    from imgindex.pipeline.plan import _previous_parts

    table, names = _dataset(tmp_path)
    previous = _index_in_place(table.parent, names, tmp_path / "index")
    manifest = tmp_path / "index" / MANIFEST_FILE
    lines = manifest.read_text().splitlines(keepends=True)
    lines[20] = lines[20][:30] + "\n"  # cut short
    manifest.write_text("".join(lines))
    monkeypatch.setattr(plan_module, "MANIFEST_SPAN_BYTES", 200)
    work = tmp_path / "plan"
    listed = parse_source(table, path_column="path").listing(work / "listing", client)
    seen = (str(work / "listing"), listed.token)
    with pytest.raises(IndexDirError) as raised:
        _previous_parts(previous, work, seen, client, "data")
    assert str(raised.value).startswith(
        f"index directory {str(tmp_path / 'index')!r} is unreadable: "
    )
    assert str(raised.value).endswith("rebuild it with `imgindex build --rebuild`")
    assert "\n" not in str(raised.value)


def test_a_tar_manifest_merged_in_ranges_is_the_one_range_manifest(
    client, tmp_path, photo_sets, monkeypatch, caplog
):
    """Tar shards' kept images come in parts each in order, not all of them:
    merged in path ranges on the workers, a re-run that writes one shard
    again gives the manifest one range gives."""
    import shutil

    from imgindex.pipeline.build import run_build
    from imgindex.pipeline.store import MANIFEST_FILE
    from tests.test_sources import shard_photos, write_shard

    beach = photo_sets["beach"][:24]
    shard_photos(beach, tmp_path / "shards", 6)
    pattern = f"{tmp_path}/shards/{{00000..00003}}.tar"
    one, split = tmp_path / "one", tmp_path / "split"
    assert run_build(client, pattern, one).indexed == 24
    shutil.copytree(one, split)  # the same index in place for both
    write_shard(
        tmp_path / "shards" / "00001.tar", {p.name: p.read_bytes() for p in beach[6:11]}
    )
    again = run_build(client, pattern, one)
    assert (again.updated, again.removed, again.indexed) == (5, 1, 23)
    monkeypatch.setattr(parts, "BATCH_ROWS", 2)
    monkeypatch.setattr(ranges, "ROWS_PER_RANGE", 4)
    with caplog.at_level(logging.INFO, logger="imgindex.pipeline.ranges"):
        assert run_build(client, pattern, split).indexed == 23
    logged = [m for m in caplog.messages if m.startswith("manifest[shards]:")]
    assert len(logged) == 1 and int(logged[0].split()[1]) >= 4
    manifest = (split / "shards" / MANIFEST_FILE).read_bytes()
    assert manifest == (one / "shards" / MANIFEST_FILE).read_bytes()
    paths = [json.loads(line)["path"] for line in manifest.splitlines()]
    assert paths == sorted(paths) and len(paths) == 23
