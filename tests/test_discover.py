from pathlib import Path

import pytest

from imgindex.pipeline.discover import (
    Failure,
    discover_images,
    image_id,
    partition_records,
)
from imgindex.pipeline.errors import DatasetError


def test_recursive_case_insensitive_sorted(tmp_path: Path):
    names = ["b/2.JPG", "a.png", "b/1.jpeg", "c/d/e.WebP", "notes.txt", "x.jpg.bak"]
    more = ["phone/IMG_0001.HEIC", "phone/IMG_0002.heif", "web.avif"]
    more += ["saved.JFIF", "slide.jp2"]
    for rel in [*names, *more]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    (tmp_path / "folder.jpg").mkdir()
    (tmp_path / "folder.jpg" / "inside.jpg").write_bytes(b"x")
    paths = [r.path for r in discover_images(tmp_path)]
    assert paths == [
        "a.png",
        "b/1.jpeg",
        "b/2.JPG",
        "c/d/e.WebP",
        "folder.jpg/inside.jpg",
        "phone/IMG_0001.HEIC",
        "phone/IMG_0002.heif",
        "saved.JFIF",
        "slide.jp2",
        "web.avif",
    ]


def test_records_carry_size_and_mtime(tmp_path: Path):
    (tmp_path / "a.jpg").write_bytes(b"12345")
    (rec,) = discover_images(tmp_path)
    assert rec.size == 5
    assert rec.mtime_ns == (tmp_path / "a.jpg").stat().st_mtime_ns


def test_ids_are_stable_and_path_derived(tmp_path: Path):
    (tmp_path / "a.jpg").write_bytes(b"1")
    (rec,) = discover_images(tmp_path)
    assert rec.id == image_id("a.jpg")
    assert 0 <= rec.id < 2**63
    assert image_id("a.jpg") != image_id("b.jpg")


def test_broken_symlink_is_reported(tmp_path: Path):
    (tmp_path / "link.jpg").symlink_to(tmp_path / "gone.jpg")
    failures: list[Failure] = []
    assert list(discover_images(tmp_path, failures)) == []
    assert failures == [Failure("link.jpg", "broken symbolic link")]


def test_missing_dataset_is_a_clear_error(tmp_path: Path):
    with pytest.raises(DatasetError, match="does not exist"):
        list(discover_images(tmp_path / "nope"))


def test_partitions_cover_everything_once(tmp_path: Path):
    for i in range(10):
        (tmp_path / f"{i}.jpg").write_bytes(b"x")
    records = list(discover_images(tmp_path))
    parts = partition_records(records, 4)
    assert [len(p) for p in parts] == [4, 4, 2]
    assert [r for p in parts for r in p] == records
    # Too small to taper: the same with the threads given.
    assert partition_records(records, 4, tail_threads=2) == parts


def test_the_last_partitions_are_smaller_so_the_threads_end_together():
    from imgindex.pipeline.discover import ImageRecord

    records = [ImageRecord(f"{i}.jpg", 1, 0) for i in range(500)]
    parts = partition_records(records, 32, tail_threads=2)
    sizes = [len(p) for p in parts]
    # 13 whole partitions, then the last 84 images (2 threads x 32, and the
    # remainder) in partitions a quarter the size.
    assert sizes == [32] * 13 + [8] * 10 + [4]
    assert [r for p in parts for r in p] == records
    # Fewer images than the tail: all small.
    few = partition_records(records[:40], 32, tail_threads=2)
    assert [len(p) for p in few] == [8] * 5
    assert [r for p in few for r in p] == records[:40]


def test_deeply_nested_folders_are_walked(tmp_path: Path, monkeypatch):
    # 1,100 levels: a recursive walk hit RecursionError here (issue 8, item 13).
    import os

    monkeypatch.chdir(tmp_path)
    for _ in range(1100):  # os.makedirs itself recurses too deep
        os.mkdir("d")
        os.chdir("d")
    Path("deep.jpg").write_bytes(b"x")
    rel = "/".join(["d"] * 1100)
    try:
        (rec,) = discover_images(tmp_path)
        assert rec.path == rel + "/deep.jpg"
    finally:  # shutil.rmtree (pytest's clean-up) recurses too deep as well
        os.unlink("deep.jpg")
        for _ in range(1100):
            os.chdir("..")
            os.rmdir("d")


def test_linked_folders_are_followed_and_loops_reported(tmp_path: Path):
    cams = tmp_path / "elsewhere"
    for cam in ("cam1", "cam2"):
        (cams / cam).mkdir(parents=True)
        (cams / cam / "a.jpg").write_bytes(b"x")
    data = tmp_path / "data"
    data.mkdir()
    (data / "cam1").symlink_to(cams / "cam1")
    (data / "cam2").symlink_to(cams / "cam2")
    (data / "cam2-again").symlink_to(cams / "cam2")
    (data / "cam1" / "loop").symlink_to(data)  # back to the root
    failures: list[Failure] = []
    paths = [r.path for r in discover_images(data, failures)]
    assert paths == ["cam1/a.jpg", "cam2/a.jpg"]
    assert [f.path for f in failures] == ["cam1/loop", "cam2-again"]
    assert "the dataset root" in failures[0].reason
    assert "'cam2'" in failures[1].reason


def test_packed_records_come_back_as_they_were():
    from imgindex.pipeline.discover import ImageRecord, pack_records, unpack_records

    records = [
        ImageRecord("a/b.jpg", 10, 1_700_000_000_123_456_789),
        ImageRecord("caf\udce9/\u00e9t\u00e9 photo.png", 0, 0),  # a non-UTF-8 name
    ]
    packed = pack_records(records)
    assert isinstance(packed, bytes)
    assert unpack_records(packed) == records


def test_a_duplicates_reports_thumbnails_are_reported_not_indexed(tmp_path: Path):
    """`imgindex duplicates --html` marks its thumbnail folder: a report kept
    inside its dataset must not have its thumbnails indexed as copies of the
    photos. Walked whole, or from the folder (as a listing task walks one)."""
    from imgindex.pipeline.discover import (
        THUMBNAILS_MARKER,
        THUMBNAILS_SKIPPED,
        walk_folder,
    )

    for rel in ("a.jpg", "trip/b.jpg", "trip/report_thumbs/0001.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    (tmp_path / "trip/report_thumbs" / THUMBNAILS_MARKER).write_text("")
    (tmp_path / "thumbs.jpg").write_bytes(b"x")
    failures: list[Failure] = []
    paths = [r.path for r in discover_images(tmp_path, failures)]
    assert paths == ["a.jpg", "thumbs.jpg", "trip/b.jpg"]
    assert failures == [Failure("trip/report_thumbs", THUMBNAILS_SKIPPED)]
    failures.clear()
    walked = walk_folder(str(tmp_path), failures, start="trip/report_thumbs")
    assert list(walked) == []
    assert failures == [Failure("trip/report_thumbs", THUMBNAILS_SKIPPED)]
