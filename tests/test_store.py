"""The index directory: recognised by its marker, swapped recoverably, read whole.

Issue 8, items 1, 6, 8, 9, 13, 14, 18 at the level of pipeline/store.py; the
same items through the command line are in test_hardening.py.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from imgindex import __version__
from imgindex.pipeline.discover import ImageRecord
from imgindex.pipeline.errors import IndexDirError, IndexLocked
from imgindex.pipeline.index import build_index
from imgindex.pipeline.lock import lock_index
from imgindex.pipeline.manifest_ids import IDS_FILE, ROW
from imgindex.pipeline.meta import IndexMeta
from imgindex.pipeline.store import (
    DUPLICATES_FILE,
    INDEX_FILE,
    MANIFEST_FILE,
    META_FILE,
    is_index_dir,
    read_index_dir,
    recover_index_dir,
    staging_path,
    write_index_dir,
    write_meta_version,
)
from tests.helpers import read_index

DIM = 8


def write_version(dest: Path, n: int, seed: int = 0, name: str = "ds") -> Path:
    """A real index directory of ``n`` random unit vectors (no model needed)."""
    rng = np.random.default_rng(seed)
    records = [ImageRecord(f"img{seed}-{i}.jpg", 100 + i, 1) for i in range(n)]
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = build_index(np.array([r.id for r in records], np.int64), vectors)
    meta = IndexMeta(
        name=name,
        source=f"/data/{name}",
        model="test",
        dim=DIM,
        count=n,
        created="2026-11-22T00:00:00+00:00",
        imgindex_version=__version__,
    )
    return write_index_dir(dest, index, records, meta, [])


def read_all(path: Path):
    stored = read_index(path)
    return stored, stored.index


def test_written_index_is_recognised_and_read_back(tmp_path):
    dest = write_version(tmp_path / "ds", 5)
    assert is_index_dir(dest)
    stored, index = read_all(dest)
    assert index.ntotal == 5 and len(stored.manifest) == 5
    # nothing but the index is left beside it
    assert sorted(os.listdir(tmp_path)) == ["ds"]


def test_a_meta_json_alone_is_not_an_index(tmp_path):
    folder = tmp_path / "good"
    (folder / "thesis").mkdir(parents=True)
    (folder / META_FILE).write_text('{"experiment": 1}')
    assert not is_index_dir(folder)
    with pytest.raises(IndexDirError, match="not an imgindex index"):
        write_version(folder, 3)
    assert (folder / "thesis").is_dir()
    # an index folder someone added a file to is no longer ours to replace
    dest = write_version(tmp_path / "ds", 3)
    (dest / "notes.txt").write_text("mine")
    assert not is_index_dir(dest)
    with pytest.raises(IndexDirError):
        write_version(dest, 4)
    assert (dest / "notes.txt").read_text() == "mine"


def test_reader_keeps_one_version_while_a_new_one_is_swapped_in(tmp_path):
    dest = write_version(tmp_path / "ds", 5, seed=1)
    stored = read_index_dir(dest)  # handles opened, index not read yet
    by_id = read_index_dir(dest, by_id=True)  # the manifest left unread
    write_version(dest, 7, seed=2)  # a build replaces it meanwhile
    assert stored.index.ntotal == by_id.index.ntotal == 5  # the version read
    first = int(stored.index.id_map.at(0))
    assert {r.id: r.path for r in stored.manifest}[first].startswith("img1-")
    assert by_id.lookup()[first] == by_id.lookup().row(first)["path"]
    assert by_id.lookup()[first].startswith("img1-") and len(by_id.lookup()) == 5
    by_id.close()
    assert read_index(dest).index.ntotal == 7


def test_reads_never_fail_while_builds_replace_the_index(tmp_path):
    dest = write_version(tmp_path / "ds", 50, seed=0)
    stop = threading.Event()
    errors: list[BaseException] = []

    def rewrite():
        seed = 1
        while not stop.is_set():
            try:
                with lock_index(dest):  # as a build does
                    write_version(dest, 50 + seed % 7, seed=seed)
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)
                return
            seed += 1

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        for _ in range(200):
            stored, index = read_all(dest)
            assert index.ntotal == len(stored.manifest) == stored.meta.count
    finally:
        stop.set()
        writer.join()
    assert not errors


def test_a_new_meta_version_shares_the_other_files_and_drops_the_report(tmp_path):
    dest = write_version(tmp_path / "ds", 5, seed=1)
    os.chmod(dest, 0o2750)  # as its owner left it
    (dest / DUPLICATES_FILE).write_text('{"duplicate_groups": []}')
    stored = read_index_dir(dest)  # a reader of the version in place
    before = {name: (dest / name).stat().st_ino for name in (INDEX_FILE, IDS_FILE)}
    moved = dataclasses.replace(stored.meta, source="/scratch/ds")
    write_meta_version(dest, moved)
    assert read_index(dest).meta.source == "/scratch/ds"
    assert stored.index.ntotal == 5 and stored.meta.source == "/data/ds"
    assert {n: (dest / n).stat().st_ino for n in before} == before  # linked
    assert read_index(dest).index.ntotal == 5
    assert not (dest / DUPLICATES_FILE).exists()
    assert stat.S_IMODE(dest.stat().st_mode) == 0o2750
    assert is_index_dir(dest) and sorted(os.listdir(tmp_path)) == ["ds"]


def test_group_umask_and_setgid_folder_are_honoured(tmp_path):
    shared = tmp_path / "project"
    shared.mkdir()
    os.chmod(shared, 0o2775)
    old = os.umask(0o002)
    try:
        with lock_index(shared / "ds"):
            dest = write_version(shared / "ds", 3)
    finally:
        os.umask(old)
    mode = os.stat(dest).st_mode
    assert mode & 0o777 == 0o775 and mode & stat.S_ISGID
    assert os.stat(shared / ".ds.lock").st_mode & 0o777 == 0o664
    assert os.stat(dest / MANIFEST_FILE).st_mode & 0o777 == 0o664


def _crash_between_renames(dest: Path, n_new: int) -> None:
    """The exact state a kill between the swap's two renames leaves."""
    write_version(staging_path(dest, "tmp-x"), n_new, seed=9)  # a complete copy
    os.rename(staging_path(dest, "tmp-x"), staging_path(dest, "new"))
    os.rename(dest, staging_path(dest, "old"))


def test_swap_interrupted_between_renames_is_finished_by_a_reader(tmp_path):
    dest = write_version(tmp_path / "ds", 5)
    _crash_between_renames(dest, 8)
    assert not dest.exists()
    stored, index = read_all(dest)  # search/info: finishes the swap
    assert index.ntotal == 8
    assert sorted(os.listdir(tmp_path)) == [".ds.lock", "ds"]


def test_swap_interrupted_is_read_but_not_repaired_while_a_build_holds_the_lock(
    tmp_path,
):
    dest = write_version(tmp_path / "ds", 5)
    _crash_between_renames(dest, 8)
    with lock_index(dest):  # a build is running
        _, index = read_all(dest)
        assert index.ntotal == 8
        assert not dest.exists()
        assert recover_index_dir(dest)  # what the build does under its lock
    assert read_all(dest)[1].ntotal == 8
    assert not staging_path(dest, "old").exists()


def test_swap_interrupted_before_the_new_version_was_complete_rolls_back(tmp_path):
    dest = write_version(tmp_path / "ds", 5)
    os.rename(dest, staging_path(dest, "old"))
    half = tmp_path / ".ds.tmp-abcd"  # a staging folder a kill left half written
    half.mkdir()
    (half / "STAGING").write_bytes(b"")
    (half / INDEX_FILE).write_bytes(b"IxM2")
    foreign = tmp_path / ".ds.tmp-mine"  # same pattern, not ours: kept
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with lock_index(dest):
        assert "previous index is back" in recover_index_dir(dest)
    assert read_all(dest)[1].ntotal == 5
    assert not half.exists()
    assert (foreign / "notes.txt").read_text() == "keep"


def test_index_parked_by_version_0_1_is_restored(tmp_path):
    dest = write_version(tmp_path / "ds", 5)
    parked = tmp_path / ".ds.old-k2j3"
    parked.mkdir()
    os.rename(dest, parked / "index")
    legacy_tmp = tmp_path / ".ds.tmp-q9"
    shutil.copytree(parked / "index", legacy_tmp)
    assert read_all(dest)[1].ntotal == 5
    assert sorted(os.listdir(tmp_path)) == [".ds.lock", "ds"]


def test_truncated_index_file_is_reported_not_read(tmp_path):
    dest = write_version(tmp_path / "ds", 20)
    data = (dest / INDEX_FILE).read_bytes()
    (dest / INDEX_FILE).write_bytes(data[: len(data) // 2])
    stored = read_index_dir(dest)
    with pytest.raises(IndexDirError, match="damaged.*truncated"):
        stored.index  # noqa: B018


@pytest.mark.slow  # starts a cluster or a process
def test_crafted_header_cannot_make_faiss_allocate_gigabytes(tmp_path):
    dest = write_version(tmp_path / "ds", 4)
    data = bytearray((dest / INDEX_FILE).read_bytes())
    # The codes table's length (in floats) sits after the two 37-byte headers.
    struct.pack_into("<Q", data, 74, 1 << 30)  # 4 GiB
    (dest / INDEX_FILE).write_bytes(bytes(data))
    # Read in a fresh process, whose own peak (VmHWM, as the benches measure
    # it) shows an allocation: this one's may already be higher than 4 GiB.
    script = (
        "import sys\n"
        "from bench.processes import peak_rss\n"
        "from imgindex.pipeline.errors import IndexDirError\n"
        "from imgindex.pipeline.store import read_index_dir\n"
        "try:\n"
        "    read_index_dir(sys.argv[1]).index\n"
        "except IndexDirError as e:\n"
        "    print(peak_rss(), e)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(dest)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    peak, _, error = run.stdout.strip().partition(" ")
    assert "disagree" in error
    assert int(peak) < 1 << 30, peak  # faiss and numpy loaded, no 4 GiB table


def test_manifest_out_of_step_with_the_index_is_an_error(tmp_path):
    dest = write_version(tmp_path / "ds", 6)
    lines = (dest / MANIFEST_FILE).read_text().splitlines()
    (dest / MANIFEST_FILE).write_text("\n".join(lines[1:]) + "\n")  # a line lost
    with pytest.raises(IndexDirError, match="counts 6 images.*lists 5"):
        read_index_dir(dest)
    row = json.loads(lines[0])
    other = json.dumps({**row, "id": row["id"] ^ 1, "path": "renamed.jpg"})
    (dest / MANIFEST_FILE).write_text("\n".join([other, *lines[1:]]) + "\n")
    with pytest.raises(IndexDirError, match="manifest and index.faiss disagree"):
        read_index_dir(dest).index  # noqa: B018


def test_manifest_rows_are_found_by_id_without_reading_the_manifest(tmp_path):
    """``manifest.ids`` gives each line's id and length, so a search reads its
    hits' rows only; an id the index does not hold finds nothing."""
    dest = write_version(tmp_path / "ds", 40, seed=3)
    lines = (dest / MANIFEST_FILE).read_bytes().splitlines(keepends=True)
    rows = np.frombuffer((dest / IDS_FILE).read_bytes(), ROW)
    assert rows.tolist() == [(json.loads(x)["id"], len(x)) for x in lines]
    with read_index_dir(dest, by_id=True) as stored:
        assert stored.manifest == []  # left on disk
        lookup = stored.lookup()
        assert len(lookup) == 40 and stored.index.ntotal == 40
        for line in lines[::-1]:
            row = json.loads(line)
            assert lookup.row(row["id"]) == row and lookup[row["id"]] == row["path"]
        absent = next(i for i in range(1, 100) if i not in set(lookup.ids))
        assert lookup.get(absent) is None and lookup.row(absent) is None
        with pytest.raises(KeyError):
            lookup[absent]


def test_index_written_before_the_ids_file_is_scanned(tmp_path):
    dest = write_version(tmp_path / "ds", 12, seed=4)
    lines = (dest / MANIFEST_FILE).read_bytes().splitlines()
    (dest / IDS_FILE).unlink()  # as imgindex 0.4 wrote it
    assert is_index_dir(dest)
    with read_index_dir(dest, by_id=True) as stored:
        assert stored.index.ntotal == 12  # its ids checked against the manifest's
        for line in lines:
            row = json.loads(line)
            assert stored.lookup().row(row["id"]) == row


def test_damaged_ids_file_is_one_clear_error(tmp_path):
    dest = write_version(tmp_path / "ds", 6, seed=5)
    good = (dest / IDS_FILE).read_bytes()
    (dest / IDS_FILE).write_bytes(good[:-3])  # cut short
    with read_index_dir(dest, by_id=True) as stored:
        with pytest.raises(
            IndexDirError, match=r"'.*ds' is damaged: its manifest.ids is trunc"
        ):
            stored.lookup()
    rows = np.frombuffer(good, ROW).copy()
    rows["length"][[0, 1]] += [1, -1]  # the right total, the lines misplaced
    (dest / IDS_FILE).write_bytes(rows.tobytes())
    with read_index_dir(dest, by_id=True) as stored:
        with pytest.raises(
            IndexDirError, match="damaged: its manifest.ids does not match its manifest"
        ):
            stored.lookup().row(int(rows["id"][1]))
    rows = np.frombuffer(good, ROW).copy()
    rows["id"][2] ^= 1  # an id the index does not hold
    (dest / IDS_FILE).write_bytes(rows.tobytes())
    with read_index_dir(dest, by_id=True) as stored:
        with pytest.raises(IndexDirError, match="manifest and index.faiss disagree"):
            stored.index  # noqa: B018


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not an imgindex meta file"),
        ('{"format": 1, "name": "x"}', "'source' is missing"),
    ],
)
def test_malformed_meta_is_one_clear_error(tmp_path, content, message):
    dest = write_version(tmp_path / "ds", 2)
    (dest / META_FILE).write_text(content)
    with pytest.raises(IndexDirError, match=message):
        read_index_dir(dest)


def test_index_path_that_is_a_file(tmp_path):
    (tmp_path / "ds").write_text("x")
    with pytest.raises(IndexDirError, match="is a file"):
        read_index_dir(tmp_path / "ds")


def test_an_index_not_there_yet_names_the_build_writing_it(tmp_path):
    """Searched while its first build runs: said so, not just 'does not
    exist'; once that build has ended, or for a path nobody builds, not."""
    dest = tmp_path / "ds"
    with lock_index(dest):
        with pytest.raises(IndexDirError) as during:
            read_index_dir(dest)
    assert str(during.value) == (
        f"index directory {str(dest)!r} does not exist yet: a build (pid "
        f"{os.getpid()} on {os.uname().nodename}) is writing it; it appears when "
        "that finishes"
    )
    with pytest.raises(IndexDirError, match=r"does not exist$"):
        read_index_dir(dest)  # that build ended, this process goes on
    lock = tmp_path / ".ds.lock"
    lock.write_text(f"pid 999999999 on {os.uname().nodename}")  # ended here
    with pytest.raises(IndexDirError, match=r"does not exist$"):
        read_index_dir(dest)
    lock.write_text("pid 12 on another-node")  # cannot be seen from here
    with pytest.raises(IndexDirError, match=r"12 on another-node\) may be writing"):
        read_index_dir(dest)
    with pytest.raises(IndexDirError, match=r"does not exist$"):
        read_index_dir(tmp_path / "other")


def test_lock_without_flock_uses_an_exclusive_file(tmp_path, monkeypatch):
    # Lustre mounted without -o flock answers ENOLCK; simulated here, since no
    # such file system is at hand. The fallback itself is real.
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    dest = tmp_path / "ds"
    with lock_index(dest):
        held = tmp_path / ".ds.lock.held"
        assert held.read_text().startswith(f"pid {os.getpid()} ")
        with pytest.raises(IndexLocked, match="another build"):
            with lock_index(dest):
                pass
    assert not held.exists()
    # left behind by a process that died on this host: taken over
    held.write_text(f"pid 999999999 on {os.uname().nodename}")
    with lock_index(dest):
        pass
    assert not held.exists()


def test_reserved_flat_index_holds_exactly_what_was_added():
    # pipeline.index.reserve grows FAISS's storage and shrinks it back: the
    # capacity stays, the contents must not change (edited in place too).
    from imgindex.pipeline.embed import normalize_rows
    from imgindex.pipeline.index import reserve

    rng = np.random.default_rng(3)
    first = normalize_rows(rng.standard_normal((5, DIM)))
    index = build_index(np.arange(5, dtype=np.int64), first)
    reserve(index, 1000)
    assert index.ntotal == 5
    more = normalize_rows(rng.standard_normal((300, DIM)))
    index.add_with_ids(more, np.arange(5, 305, dtype=np.int64))
    np.testing.assert_array_equal(
        index.reconstruct_batch(np.arange(305, dtype=np.int64)),
        np.concatenate([first, more]),
    )
    _, ids = index.search(more[:3], 1)
    assert ids[:, 0].tolist() == [5, 6, 7]
