"""The command line, driven through Click's CliRunner against real clusters."""

from __future__ import annotations

import json
import os
import shutil

import dask.config
import pytest

from imgindex.pipeline.manifest_ids import IDS_FILE
from imgindex.pipeline.shards import TOUCHED_WORK, staging_dir
from imgindex.pipeline.store import INDEX_FILE
from imgindex.pipeline.synthetic import write_photos
from tests.conftest import copy_tree, crop_query, write_bad_files
from tests.helpers import invoke, one_error_line, read_index


@pytest.fixture(scope="module")
def remote_build(process_cluster, photo_sets, tmp_path_factory):
    """`imgindex build --json` of both sets on worker processes (tasks pickle)."""
    tmp = tmp_path_factory.mktemp("cli")
    beach = copy_tree(photo_sets["beach"], tmp / "beach")
    write_bad_files(beach / "bad")
    forest = copy_tree(photo_sets["forest"], tmp / "forest")
    out = tmp / "out"
    result = invoke(
        "build",
        beach,
        forest,
        "--out",
        out,
        "--json",
        "--scheduler",
        process_cluster.scheduler_address,
    )
    return result, {"beach": beach, "forest": forest}, out


def test_build_json_summary(remote_build, process_cluster):
    result, roots, out = remote_build
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["cluster"]["kind"] == "remote"
    assert report["cluster"]["address"] == process_cluster.scheduler_address
    assert report["cluster"]["dashboard"].startswith("http://")
    by_name = {d["name"]: d for d in report["datasets"]}
    assert by_name["beach"]["indexed"] == 36 + 1  # + bad/good_ref.jpg
    assert by_name["forest"]["indexed"] == by_name["forest"]["embedded"] == 28
    assert {f["path"] for f in by_name["beach"]["failed"]} == {
        "bad/" + n
        for n in (
            "empty.jpg",
            "truncated.jpg",
            "random.jpg",
            "text.png",
            "broken_link.jpg",
        )
    }
    assert by_name["beach"]["index"] == str(out / "beach")
    assert by_name["beach"]["images_per_second"] > 0
    assert len(by_name["beach"]["workers"]) == 2  # both worker processes embedded
    assert "dashboard: http://" in result.stderr
    # Where the fixed cost went: all of the command's own time, stage by stage.
    stages = report["stage_seconds"]
    assert list(stages) == ["checks", "plan", "cluster", "workers", "builds", "close"]
    assert 0 < sum(stages.values()) <= report["seconds"] + 0.01


def test_search_json_ranks_the_source_first(remote_build, tmp_path):
    _, roots, out = remote_build
    src = roots["forest"] / "img00011.jpg"
    query = crop_query(src, tmp_path / "query.jpg")
    result = invoke("search", out / "forest", query, "-k", "3", "--json")
    assert result.exit_code == 0, result.stderr
    (hits,) = json.loads(result.stdout)
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert hits[0]["path"] == str(src)
    assert hits[0]["score"] > hits[1]["score"] >= hits[2]["score"]


def test_search_text_output(remote_build):
    _, roots, out = remote_build
    result = invoke(
        "search", out / "forest", roots["forest"] / "img00002.jpg", "-k", "2"
    )
    assert result.exit_code == 0
    assert str(roots["forest"] / "img00002.jpg") in result.stdout.splitlines()[1]


def test_many_queries_show_their_progress_on_stderr(remote_build):
    from imgindex.pipeline.search import Searcher

    _, roots, out = remote_build
    result = invoke("search", out / "forest", roots["forest"], "-k", "1", "--json")
    assert result.exit_code == 0, result.stderr
    lists = json.loads(result.stdout)  # the bar is on stderr only
    assert [hits[0]["path"] for hits in lists] == [
        str(p) for p in sorted(roots["forest"].iterdir())
    ]
    lines = invoke("search", out / "forest", roots["forest"], "-k", "1", "--jsonl")
    assert lines.exit_code == 0, lines.stderr
    assert [json.loads(line) for line in lines.stdout.splitlines()] == [
        {"query": str(p), "hits": hits}
        for p, hits in zip(sorted(roots["forest"].iterdir()), lists, strict=True)
    ]
    assert "forest: searching" in result.stderr  # its label; a terminal draws a bar
    calls = []
    searcher = Searcher(out / "forest", turns=True)
    searcher.search_images(
        sorted(roots["forest"].iterdir()), 1, progress=lambda *a: calls.append(a)
    )
    assert calls == [(16, 28), (28, 28)]  # a query and its 3 turns: 16 a batch
    # --jsonl prints each batch's lines before the next batch is read.
    calls.clear()
    found = searcher.iter_hits(
        sorted(roots["forest"].iterdir()), 1, progress=lambda *a: calls.append(a)
    )
    first = next(found)
    assert (first[0].path, calls) == (str(roots["forest"] / "img00000.jpg"), [(16, 28)])


def test_a_missing_query_is_named_before_any_query_is_searched(remote_build, tmp_path):
    _, roots, out = remote_build
    listed = tmp_path / "queries.txt"
    listed.write_text(f"{roots['forest'] / 'img00002.jpg'}\n{tmp_path / 'gone.jpg'}\n")
    result = invoke(
        "search", out / "forest", roots["forest"] / "img00003.jpg",
        "--queries-from", listed,
    )  # fmt: skip
    assert result.exit_code == 1
    assert result.stdout == ""  # not the first queries' hits, then an error
    # Not the build's "deleted after discovery?": nothing discovered it.
    assert one_error_line(result.stderr) == (
        f"Error: {tmp_path / 'gone.jpg'}: no such file or folder"
    )


def test_a_query_list_is_read_as_a_dataset_list_is(remote_build, tmp_path):
    """--queries-from: a byte-order mark, blank lines, # comments and the
    spaces around a path are no part of any query."""
    _, roots, out = remote_build
    first, second = (roots["forest"] / f"img0000{i}.jpg" for i in (2, 3))
    listed = tmp_path / "queries.txt"
    listed.write_bytes(f"\ufeff{first}\n\n# the rest\n  {second}  \n".encode())
    result = invoke(
        "search", out / "forest", "--queries-from", listed, "-k", "1", "--jsonl"
    )
    assert result.exit_code == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["query"] for line in lines] == [str(first), str(second)]
    assert [line["hits"][0]["path"] for line in lines] == [str(first), str(second)]


def test_a_query_image_read_from_stdin_is_searched_here_and_on_workers(
    remote_build, process_cluster
):
    """`curl URL | imgindex search INDEX -`: the bytes are the query, named
    `-`, searched here or by the workers alike, checked with --copies."""
    _, roots, out = remote_build
    photo = (roots["forest"] / "img00004.jpg").read_bytes()
    here = invoke("search", out / "forest", "-", "-k", "2", "--copies", "--jsonl",
                  stdin=photo)  # fmt: skip
    assert here.exit_code == 0, here.stderr
    (line,) = [json.loads(x) for x in here.stdout.splitlines()]
    assert line["query"] == "-"
    assert line["hits"][0]["path"] == str(roots["forest"] / "img00004.jpg")
    assert line["hits"][0]["kind"] == "identical"
    there = invoke(
        "search", out / "forest", "-", "-k", "2", "--copies", "--jsonl",
        "--scheduler", process_cluster.scheduler_address, stdin=photo,
    )  # fmt: skip
    assert there.exit_code == 0, there.stderr
    assert json.loads(there.stdout) == line
    empty = invoke("search", out / "forest", "-", stdin=b"")
    assert one_error_line(empty.stderr) == "Error: -: empty file (0 bytes)"
    both = invoke("search", out / "forest", "-", "--queries-from", "-", stdin=photo)
    assert both.exit_code == 2
    assert "standard input holds one thing" in one_error_line(both.stderr)


def test_info_json_counts(remote_build):
    _, _, out = remote_build
    result = invoke("info", out / "beach", "--json")
    info = json.loads(result.stdout)
    assert (info["count"], info["failed"], info["dim"]) == (37, 5, 1280)
    assert info["model"] == "efficientnet-lite0" and info["metric"] == "cosine"
    assert info["imgindex_version"]


def test_an_index_without_manifest_ids_searches_alike_until_reindex_writes_them(
    remote_build, process_cluster, tmp_path
):
    """An index written by imgindex 0.4 has no manifest.ids: search and info
    scan its manifest instead and answer the same; reindex writes the file."""
    _, roots, out = remote_build
    old = tmp_path / "old" / "forest"
    shutil.copytree(out / "forest", old)
    (old / IDS_FILE).unlink()
    query = roots["forest"] / "img00003.jpg"
    now, before = (
        invoke("search", d, query, "-k", "5", "--json") for d in (out / "forest", old)
    )
    assert before.exit_code == 0, before.stderr
    assert json.loads(before.stdout) == json.loads(now.stdout)
    assert json.loads(invoke("info", old, "--json").stdout)["count"] == 28
    address = process_cluster.scheduler_address
    result = invoke("reindex", old, "--scheduler", address, "--json")
    assert result.exit_code == 0, result.stderr
    assert (old / IDS_FILE).read_bytes() == (out / "forest" / IDS_FILE).read_bytes()


def test_unreadable_query_is_one_line(remote_build, tmp_path):
    _, _, out = remote_build
    bad = tmp_path / "q.jpg"
    bad.write_text("nope")
    result = invoke("search", out / "forest", bad)
    assert result.exit_code == 1
    assert result.stdout == ""
    assert (
        one_error_line(result.stderr) == f"Error: {bad}: not an image Pillow can read"
    )


def test_an_unreadable_query_among_others_loses_only_its_own_results(
    remote_build, tmp_path
):
    _, roots, out = remote_build
    queries = tmp_path / "queries"
    queries.mkdir()
    for name in ("a.jpg", "c.jpg"):
        shutil.copy(roots["forest"] / "img00004.jpg", queries / name)
    (queries / "b.jpg").write_bytes(b"not a jpeg")
    result = invoke("search", out / "forest", queries, "-k", "1", "--json")
    assert result.exit_code == 1
    lists = json.loads(result.stdout)  # one list per query, in their order
    assert [[h["path"] for h in hits] for hits in lists] == [
        [str(roots["forest"] / "img00004.jpg")],
        [],
        [str(roots["forest"] / "img00004.jpg")],
    ]
    assert result.stderr.splitlines() == [
        f"not searched: {queries / 'b.jpg'}: not an image Pillow can read",
        "Error: 1 of 3 queries could not be read (named above); the others were "
        "searched",
    ]
    lines = invoke("search", out / "forest", queries, "-k", "1", "--jsonl")
    assert lines.exit_code == 1
    assert [json.loads(line) for line in lines.stdout.splitlines()] == [
        {"query": str(queries / "a.jpg"), "hits": lists[0]},
        {"query": str(queries / "b.jpg"), "error": "not an image Pillow can read"},
        {"query": str(queries / "c.jpg"), "hits": lists[2]},
    ]
    text = invoke("search", out / "forest", queries, "-k", "1").stdout.splitlines()
    assert text[2:4] == [
        f"{queries / 'b.jpg'}:",
        "  not searched: not an image Pillow can read",
    ]
    (queries / "a.jpg").write_bytes(b"")
    (queries / "c.jpg").unlink()
    result = invoke("search", out / "forest", queries, "--json")
    assert (result.exit_code, result.stdout) == (1, "")  # nothing to print
    assert result.stderr.splitlines()[-1] == (
        "Error: none of the 2 queries could be read (named above)"
    )


def test_info_on_a_non_index_is_one_line(tmp_path):
    result = invoke("info", tmp_path)
    assert result.exit_code == 1
    assert "not an imgindex index directory" in one_error_line(result.stderr)


def test_missing_dataset_is_one_line(tmp_path):
    result = invoke("build", tmp_path / "nope", "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert "does not exist" in one_error_line(result.stderr)


def test_both_scheduler_options_is_a_usage_error(tmp_path):
    result = invoke(
        "build",
        tmp_path,
        "--out",
        tmp_path / "o",
        "--scheduler",
        "tcp://a:1",
        "--scheduler-file",
        "s.json",
    )
    assert result.exit_code == 2
    assert "--scheduler" in result.stderr


def test_no_fallback_fails_with_one_line_and_writes_nothing(
    dataset, tmp_path, refused_address
):
    address = refused_address
    out = tmp_path / "out"
    result = invoke(
        "build", dataset, "--out", out, "--scheduler", address, "--no-fallback"
    )
    assert result.exit_code == 1
    line = one_error_line(result.stderr)
    assert address in line and "--no-fallback" in line
    assert not (out / "beach").exists()


@pytest.mark.slow
def test_a_rerun_that_finds_nothing_to_do_starts_no_cluster(
    process_cluster, tmp_path, refused_address
):
    """Its scheduler refuses and fallback is off: a re-run that connected,
    or started a LocalCluster, would fail instead."""
    folder, out = tmp_path / "few", tmp_path / "out"
    write_photos(folder, 6, seed=34, max_side=320)
    first = invoke(
        "build", folder, "--out", out, "--scheduler", process_cluster.scheduler_address
    )
    assert first.exit_code == 0, first.stderr
    offline = ["--out", out, "--scheduler", refused_address, "--no-fallback"]

    progress = tmp_path / "progress.json"
    again = invoke("build", folder, *offline, "--json", "--progress-file", progress)
    assert again.exit_code == 0, again.stderr
    status = invoke("status", progress).stdout.splitlines()
    assert status[1:] == [
        "cluster: none started: every index is current "
        "(nothing added, changed or removed)",
        "  few: done (nothing to embed), 0 failed",
    ]
    report = json.loads(again.stdout)
    assert report["cluster"] == {
        "kind": "none",
        "address": "",
        "reason": "none started: every index is current "
        "(nothing added, changed or removed)",
        "dashboard": "",
        "workers": 0,
    }
    (summary,) = report["datasets"]
    assert summary["kept"].startswith("nothing added, changed or removed since ")
    assert (summary["indexed"], summary["embedded"]) == (6, 0)
    assert "cluster: none started" in again.stderr
    assert list(report["stage_seconds"]) == ["checks", "plan", "builds", "close"]

    # Files with only a new time are read here, while planning: no cluster.
    index_file = out / "few" / INDEX_FILE
    inode = index_file.stat().st_ino
    photos = sorted(folder.iterdir())
    for p in photos[:2]:
        os.utime(p, ns=(p.stat().st_atime_ns, p.stat().st_mtime_ns + 10**9))
    touched = invoke("build", folder, *offline, "--json")
    assert touched.exit_code == 0, touched.stderr
    report = json.loads(touched.stdout)
    assert (report["cluster"]["kind"], report["cluster"]["reason"]) == (
        "none",
        "none started: nothing to embed (files with only a new time were read "
        "here: the same bytes)",
    )
    (summary,) = report["datasets"]
    assert (summary["touched"], summary["embedded"], summary["indexed"]) == (2, 0, 6)
    assert not summary["kept"] and index_file.stat().st_ino == inode
    stamps = {r.path: r.mtime_ns for r in read_index(out / "few").manifest}
    assert all(stamps[p.name] == p.stat().st_mtime_ns for p in photos)
    assert not staging_dir(out / "few").exists()

    # An edit that keeps the file's size is found while planning: embedding
    # it needs the cluster, and nothing read here is left behind.
    edited = photos[3]
    data = bytearray(edited.read_bytes())
    data[len(data) // 2] ^= 0xFF
    edited.write_bytes(bytes(data))
    os.utime(photos[4], ns=(0, photos[4].stat().st_mtime_ns + 10**9))
    changed = invoke("build", folder, *offline)
    assert changed.exit_code == 1
    assert "--no-fallback" in one_error_line(changed.stderr)
    assert not (staging_dir(out / "few") / TOUCHED_WORK).exists()

    write_photos(folder, 1, seed=35, max_side=320, prefix="new")
    changed = invoke("build", folder, *offline)
    assert changed.exit_code == 1
    line = one_error_line(changed.stderr)
    assert refused_address in line and "--no-fallback" in line


@pytest.mark.slow
def test_unreachable_scheduler_falls_back_to_local(dataset, tmp_path, refused_address):
    address = refused_address
    with dask.config.set(
        {"imgindex.local.n-workers": 1, "imgindex.connect-timeout": "1s"}
    ):
        result = invoke(
            "build",
            dataset,
            "--out",
            tmp_path / "out",
            "--scheduler",
            address,
            "--json",
        )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["cluster"]["kind"] == "local"
    # A refused connect is retried by distributed until the deadline, so
    # either wording is right; both must name the address.
    assert report["cluster"]["reason"].startswith(f"local: {address}: ")
    assert report["datasets"][0]["indexed"] == 36
    assert "falling back to a LocalCluster" in result.stderr


def test_unwritable_out_is_one_line(dataset, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    result = invoke("build", dataset, "--out", blocker / "sub")
    assert result.exit_code == 1
    assert "is not writable" in one_error_line(result.stderr)
    result = invoke("build", dataset, "--out", blocker)
    assert result.exit_code == 1
    assert one_error_line(result.stderr) == (
        f"Error: output folder {str(blocker)!r} is a file, not a folder"
    )
    assert blocker.read_text() == "a file, not a folder"


@pytest.mark.parametrize("address", ["tcp//node1", "node1:notaport", "http://x:1"])
def test_malformed_scheduler_address_is_one_line(dataset, tmp_path, address):
    result = invoke("build", dataset, "--out", tmp_path / "out", "--scheduler", address)
    assert result.exit_code == 1
    line = one_error_line(result.stderr)
    assert f"invalid scheduler address {address!r} from --scheduler" in line


def test_empty_dataset_is_one_line(process_cluster, tmp_path):
    (tmp_path / "empty").mkdir()
    result = invoke(
        "build",
        tmp_path / "empty",
        "--out",
        tmp_path / "out",
        "--scheduler",
        process_cluster.scheduler_address,
    )
    assert result.exit_code == 1
    assert "contains no image files" in one_error_line(result.stderr)


def test_index_of_another_model_is_refused_and_kept(remote_build, process_cluster):
    """A model that loads (a tiny plug-in of the fault tests, registered here
    and on the workers), so that the refusal is the index's, not the name's."""
    from distributed import Client

    import tests.fault_models  # noqa: F401  (registers its loaders in this process)
    from tests.fault_models import RegisterFaultModels

    with Client(process_cluster, set_as_default=False) as client:
        client.register_plugin(RegisterFaultModels(), name="fault-models")
    _, roots, out = remote_build
    before = (out / "forest" / "index.faiss").read_bytes()
    result = invoke(
        "build",
        roots["forest"],
        "--out",
        out,
        "--model",
        "test-flaky:0",
        "--scheduler",
        process_cluster.scheduler_address,
    )
    assert result.exit_code == 1
    line = one_error_line(result.stderr)
    assert "was built with model 'efficientnet-lite0', not 'test-flaky:0'" in line
    assert line.endswith("pass --rebuild to replace it, or choose another --out")
    assert (out / "forest" / "index.faiss").read_bytes() == before


def _failed_build(process_cluster, dataset, tmp_path, *flags: str) -> str:
    """The one error line of a build of ``dataset`` on the session's cluster."""
    result = invoke(
        "build",
        dataset,
        "--out",
        tmp_path / "out",
        *flags,
        "--scheduler",
        process_cluster.scheduler_address,
    )
    assert result.exit_code == 1
    return one_error_line(result.stderr)


def test_cuda_on_cpu_workers_is_one_line(process_cluster, dataset, tmp_path):
    line = _failed_build(process_cluster, dataset, tmp_path, "--device", "cuda")
    assert line.startswith("Error: worker tcp://127.0.0.1:")
    assert "device 'cuda' asked for, but torch sees no GPU here" in line


def test_gpu_resource_that_no_worker_offers_is_one_line_not_a_wait(
    process_cluster, dataset, tmp_path
):
    """Tasks that ask for a resource no worker has would wait in the queue
    for ever; the build refuses them instead, and writes nothing."""
    line = _failed_build(process_cluster, dataset, tmp_path, "--gpu-resource")
    assert line.startswith("Error: --gpu-resource asks for workers with the resource")
    assert line.endswith("or drop --gpu-resource")
    assert not (tmp_path / "out" / dataset.name).exists()


@pytest.mark.slow  # starts a cluster or a process
def test_workers_that_disagree_about_the_model_are_one_line(dataset, tmp_path):
    """The client records the workers' model in meta.json without loading its
    own, so workers whose copies differ must be refused, not averaged."""
    from distributed import Client, LocalCluster

    # Defined here, so that it is pickled by value for the workers.
    def other_version(dask_worker=None) -> None:
        import dataclasses

        from imgindex.pipeline.models import (
            _CACHE,
            Preprocess,
            get_model,
            remember_card,
        )

        model = get_model("efficientnet-lite0", "cpu")
        other = dataclasses.replace(model, preprocess=Preprocess(resize=288, crop=256))
        _CACHE["efficientnet-lite0", "cpu"] = other
        remember_card(other.card())

    def this_version(dask_worker=None) -> None:
        from imgindex.pipeline.models import get_model

        get_model("efficientnet-lite0", "cpu")

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as lc,
        Client(lc) as client,
    ):
        first, second = sorted(client.scheduler_info()["workers"])
        client.run(other_version, workers=[first])
        # Both copies loaded before the build asks: it sends tasks once one
        # worker has the model, and refuses a later one's at its first shard
        # (tests/test_shards.py).
        client.run(this_version, workers=[second])
        result = invoke(
            "build", dataset, "--out", tmp_path / "out", "--runtime", "torch",
            "--scheduler", lc.scheduler_address,
        )  # fmt: skip
    assert result.exit_code == 1, result.stderr
    line = one_error_line(result.stderr)
    assert "workers disagree about model 'efficientnet-lite0'" in line
    assert "crop=256" in line and "crop=224" in line
    assert not (tmp_path / "out" / dataset.name / "index.faiss").exists()
