"""`search --copies`: each hit told a copy of its query, another shot of its
scene, or neither, by the geometric check of `imgindex duplicates`."""

from __future__ import annotations

import json
import shutil

import numpy as np
from PIL import Image

import imgindex
from imgindex.pipeline.search import KINDS
from tests.helpers import copies_truth, invoke


def test_search_copies_tells_copies_shots_and_the_same_bytes_from_the_rest(
    copies_archive,
):
    index_dir, folder, families, queries = copies_archive
    names = ["chelsea-crop.jpg", "stereo-right.jpg", "tissue-a.jpg"]
    k = len(families)  # every image of the index, against every query
    result = invoke(
        "search", index_dir, *(queries / n for n in names), "-k", k, "--copies",
        "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lists = json.loads(result.stdout)
    assert [len(hits) for hits in lists] == [k] * 3
    for name, hits in zip(names, lists, strict=True):
        told = {h["path"].rsplit("/", 1)[1]: h["kind"] for h in hits}
        assert set(told.values()) <= set(KINDS)
        expected = {hit: copies_truth(name, hit, families) for hit in told}
        assert told == expected, name
    # The crop finds all 11 files of its photo as copies, above the rest.
    crop_hits = [h["kind"] for h in lists[0]]
    assert crop_hits[:11] == ["copy"] * 11

    text = invoke("search", index_dir, queries / "stereo-right.jpg", "-k", 2,
                  "--copies").stdout  # fmt: skip
    first = text.splitlines()[1].split()
    assert first[:3] == ["1", first[1], "shot"] and first[3].endswith("stereo-left.jpg")

    # Without the flag nothing is read and the JSON is as it always was.
    plain = json.loads(
        invoke("search", index_dir, queries / "tissue-a.jpg", "-k", 2, "--json").stdout
    )
    assert [sorted(h) for h in plain[0]] == [["path", "rank", "score"]] * 2


def test_a_hit_whose_file_is_gone_is_undecided_and_the_others_are_told(
    copies_archive, tmp_path
):
    index_dir, folder, families, queries = copies_archive
    gone = folder / "chelsea.flipped.jpg"
    kept = tmp_path / "flipped.jpg"
    shutil.move(gone, kept)
    try:
        result = invoke("search", index_dir, queries / "chelsea-crop.jpg", "-k", 11,
                        "--copies", "--jsonl")  # fmt: skip
    finally:
        shutil.move(kept, gone)
    assert result.exit_code == 0, result.output
    (line,) = [json.loads(x) for x in result.stdout.splitlines()]
    told = {h["path"].rsplit("/", 1)[1]: h["kind"] for h in line["hits"]}
    assert told.pop("chelsea.flipped.jpg") == "undecided"
    assert set(told.values()) == {"copy"} and len(told) == 10


def test_python_search_with_copies_adds_a_kind_column_and_shows_it(copies_archive):
    index_dir, folder, families, queries = copies_archive
    pixels = np.asarray(Image.open(queries / "chelsea-crop.jpg"))
    with imgindex.open(index_dir) as idx:
        results = idx.search(
            [queries / "stereo-right.jpg", pixels, (folder / "flat.jpg").read_bytes()],
            k=2,
            copies=True,
        )
        plain = idx.search(queries / "stereo-right.jpg", k=2)
    assert "kind" not in plain.columns
    top = results[results["rank"] == 1].set_index("query")
    assert top["kind"].tolist() == ["shot", "copy", "identical"]
    assert top["path"].str.rsplit("/", n=1).str[1].tolist() == [
        "stereo-left.jpg",
        "chelsea.turned-90.jpg",
        "flat.jpg",
    ]
    assert "1. " in results._repr_html_() and " shot<" in results._repr_html_()


def test_hits_in_tar_shards_are_told_from_one_pass_over_each_shard(
    copies_archive, client, tmp_path, monkeypatch
):
    """A tar member is found by reading its shard up to it: each hit read on
    its own would read a shard once for every hit in it."""
    import tarfile

    from imgindex.pipeline import sources

    index_dir, folder, families, queries = copies_archive
    names = sorted(families)
    shards = tmp_path / "shards"
    shards.mkdir()
    for n in range(2):
        with tarfile.open(shards / f"{n:05d}.tar", "w") as tar:
            for name in names[n::2]:
                tar.add(folder / name, arcname=name)
    imgindex.build(shards, tmp_path / "out", client=client, progress=False)

    passes = []
    opened = sources._TarPass.__init__

    def counted(self, source, shard, wanted):
        passes.append(shard)
        opened(self, source, shard, wanted)

    monkeypatch.setattr(sources._TarPass, "__init__", counted)
    with imgindex.open(tmp_path / "out" / "shards") as idx:
        found = idx.search(queries / "chelsea-crop.jpg", k=len(names), copies=True)
    names_found = found["path"].str.rsplit("/", n=1).str[1]
    told = dict(zip(names_found, found["kind"], strict=True))
    assert told == {
        hit: copies_truth("chelsea-crop.jpg", hit, families) for hit in names
    }
    assert sorted(passes) == ["00000.tar", "00001.tar"]


def test_hits_past_the_features_held_at_once_are_told_the_same_in_parts(
    copies_archive, monkeypatch
):
    """A hit's features are ~150 KB: at -k 100 a batch's would be 240 MB."""
    from imgindex.pipeline import search as search_module
    from imgindex.pipeline.sources import Source

    index_dir, folder, families, queries = copies_archive
    names = ["chelsea-crop.jpg", "stereo-right.jpg", "tissue-a.jpg"]
    k = len(families)
    args = ["search", index_dir, *(queries / n for n in names), "-k", k,
            "--copies", "--json"]  # fmt: skip
    whole = invoke(*args)
    read: list[int] = []
    reader = Source.reader

    def counted(self, rels):
        read.append(len(rels))
        return reader(self, rels)

    monkeypatch.setattr(search_module, "HELD_FEATURES", 4)
    monkeypatch.setattr(Source, "reader", counted)
    parts = invoke(*args)
    assert parts.exit_code == whole.exit_code == 0, parts.output
    assert parts.stdout == whole.stdout
    # Each query's hits are every file, four at a time.
    assert max(read) == 4 and sum(read) == len(names) * k
