"""`search --scheduler` and ``Index.search(client=...)``: the queries embedded,
and the hits of --copies checked, by a cluster's worker processes; the client
only reads the queries and searches its index."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import imgindex
from imgindex.pipeline import search as search_module
from imgindex.pipeline import search_remote
from tests.helpers import copies_truth, invoke


@pytest.fixture
def no_model_here(monkeypatch):
    """Loading the model in this process fails the test: the worker
    processes import their own, untouched module."""

    def refused(spec):
        raise AssertionError("the model was loaded on the client")

    monkeypatch.setattr(search_module, "Embedder", refused)


def _task_prefixes(client) -> set[str]:
    """Every task prefix the scheduler has seen (kept after tasks are gone)."""
    prefixes = client.run_on_scheduler(
        lambda dask_scheduler: list(dask_scheduler.task_prefixes)
    )
    return set(prefixes)


def _without_scores(lists: list[list[dict]]) -> list[list[dict]]:
    return [[{**h, "score": None} for h in hits] for hits in lists]


def test_search_on_worker_processes_finds_and_tells_what_a_search_here_does(
    copies_archive, process_cluster, tmp_path, request
):
    from distributed import Client

    index_dir, folder, families, queries = copies_archive
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    args = ["search", index_dir, queries, bad, folder / "chelsea.jpg", "-k", 5,
            "--copies", "--json"]  # fmt: skip
    here = invoke(*args)
    assert here.exit_code == 1
    request.getfixturevalue("no_model_here")  # from here on
    address = process_cluster.scheduler_address
    there = invoke(*args, "--scheduler", address)
    assert there.exit_code == 1, there.output
    assert f"cluster: remote {address}: 2 workers" in there.stderr
    assert f"not searched: {bad}: not an image Pillow can read" in there.stderr
    remote, local = json.loads(there.stdout), json.loads(here.stdout)
    assert _without_scores(remote) == _without_scores(local)
    assert np.allclose(
        [h["score"] for hits in remote for h in hits],
        [h["score"] for hits in local for h in hits],
        atol=1e-4,
    )
    # The truth, not only agreement: each query's hits told as they are.
    names = sorted(p.name for p in queries.iterdir())
    for name, hits in zip(names, remote, strict=False):
        for h in hits:
            hit = h["path"].rsplit("/", 1)[1]
            assert h["kind"] == copies_truth(name, hit, families), (name, hit)
    assert remote[len(names)] == []  # the bad file's list, empty
    with Client(address, set_as_default=False) as c:
        prefixes = _task_prefixes(c)
    assert {"search.embed[archive]", "search.check[archive]"} <= prefixes


def test_many_queries_come_back_in_order_from_batches_in_flight(
    copies_archive, process_cluster, no_model_here
):
    """A query a batch (its turns make it four images), a few batches in
    flight on two workers: they finish out of order and come back in order;
    bytes and pixels travel as paths do."""
    from distributed import Client

    from imgindex.pipeline.search import Searcher

    index_dir, folder, families, queries = copies_archive
    files = sorted(folder.iterdir()) * 3
    with Client(process_cluster, set_as_default=False) as c:
        searcher = Searcher(index_dir, client=c)
        try:
            done = []
            found = list(
                searcher.iter_hits(
                    files, k=1, batch=4, progress=lambda n, total: done.append(n)
                )
            )
        finally:
            searcher.close()
        with imgindex.open(index_dir) as idx:
            given = [files[0].read_bytes(), np.asarray(Image.open(files[1]))]
            sent = idx.search(given, k=1, client=c)
    assert done == list(range(1, len(files) + 1))
    # Each file finds itself, or a byte-identical file, first.
    top = [hits[0].path.rsplit("/", 1)[1] for hits in found]
    assert [families[name] for name in top] == [families[f.name] for f in files]
    assert [families[p.rsplit("/", 1)[1]] for p in sent["path"]] == [
        families[files[0].name],
        families[files[1].name],
    ]


def test_workers_that_cannot_see_the_images_leave_the_checks_here(
    copies_archive, process_cluster, monkeypatch, caplog
):
    from distributed import Client

    index_dir, folder, families, queries = copies_archive
    with Client(process_cluster, set_as_default=False) as c:
        # The answer of workers on another file system (the probe itself is
        # proved by the next lines).
        assert search_remote.workers_seeing(c, str(folder))
        assert not search_remote.workers_seeing(c, str(folder / "not-here"))
        monkeypatch.setattr(search_remote, "workers_seeing", lambda *a: False)
        before = _task_prefixes(c)
        with imgindex.open(index_dir) as idx:
            found = idx.search(
                queries / "stereo-right.jpg", k=len(families), copies=True, client=c
            )
        assert "search.check[archive]" not in _task_prefixes(c) - before
    assert f"some workers cannot see {folder}: the hits are checked here" in caplog.text
    told = dict(
        zip(found["path"].str.rsplit("/", n=1).str[1], found["kind"], strict=True)
    )
    assert told == {
        hit: copies_truth("stereo-right.jpg", hit, families) for hit in told
    }
    assert len(told) == len(families)


def test_an_unreachable_scheduler_leaves_the_search_here_unless_told_not_to(
    copies_archive, refused_address
):
    index_dir, folder, families, queries = copies_archive
    query = queries / "tissue-a.jpg"
    here = invoke("search", index_dir, query, "-k", 1, "--scheduler", refused_address)
    assert here.exit_code == 0, here.output
    assert "searching here" in here.stderr and refused_address in here.stderr
    assert here.stdout.splitlines()[1].split()[2].endswith("tissue.view-a.jpg")

    strict = invoke("search", index_dir, query, "--scheduler", refused_address,
                    "--no-fallback")  # fmt: skip
    assert strict.exit_code == 1 and strict.stdout == ""
    (line,) = strict.stderr.splitlines()
    assert line.startswith("Error: cannot use the scheduler from --scheduler")


def test_a_task_that_fails_on_the_cluster_is_one_error_line(
    copies_archive, client, monkeypatch
):
    """A worker's failure (here: the in-process workers run this test's
    function) comes back as one line, with its cause."""

    def broken(spec, queries, turns):
        raise RuntimeError("the workers' environment\ndiffers") from KeyError("spec")

    monkeypatch.setattr(search_remote, "embed_queries", broken)
    index_dir, folder, families, queries = copies_archive
    with (
        imgindex.open(index_dir) as idx,
        pytest.raises(imgindex.ImgindexError) as failed,
    ):
        idx.search(queries / "tissue-a.jpg", client=client)
    assert str(failed.value) == (
        "a search's embed task failed on the cluster: RuntimeError: the workers' "
        "environment differs (KeyError: 'spec')"
    )


def _search_hit_on_a(
    dask_processes, index_dir, files, signum, mid_scatter=False, **options
):
    """Search ``files`` on two worker processes, a (no nanny to bring it
    back) and b. Every batch's bytes are put on a until, as the first results
    come in, a is sent ``signum``: the batches then in flight lose their
    bytes or their task. With ``mid_scatter`` it is sent as the third
    batch's bytes are sent to it. (The hits, the workers' addresses, the
    seconds the search took after the signal.)"""
    import os
    import signal
    import time

    from imgindex.pipeline.search import Searcher

    dask_processes.start_scheduler()
    dask_processes.start_worker("a", extra=("--no-nanny",))
    dask_processes.start_worker("b")
    addresses = dask_processes.wait_for_workers(2)
    hit = dask_processes.worker_pids()["a"]
    signalled: list[float] = []
    try:
        with dask_processes.client() as c:
            scatter = c.scatter

            scattered: list[int] = []

            def on_a_until_signalled(data, **kwargs):
                if not signalled:
                    kwargs["workers"] = [addresses["a"]]
                    scattered.append(1)
                    if mid_scatter and len(scattered) == 3:
                        os.kill(hit, signum)
                        signalled.append(time.monotonic())
                return scatter(data, **kwargs)

            def signal_a(done, total):
                if not signalled and not mid_scatter:
                    os.kill(hit, signum)
                    signalled.append(time.monotonic())

            c.scatter = on_a_until_signalled
            searcher = Searcher(index_dir, client=c)
            try:
                found = list(
                    searcher.iter_hits(files, batch=4, progress=signal_a, **options)
                )
            finally:
                searcher.close()
    finally:
        if signum == signal.SIGSTOP:
            os.kill(hit, signal.SIGCONT)
    return found, addresses, time.monotonic() - signalled[0]


def test_a_worker_killed_mid_search_costs_no_query(
    copies_archive, dask_processes, no_model_here, caplog
):
    """SIGKILL: the batches on worker a are sent again to b."""
    import signal

    index_dir, folder, families, queries = copies_archive
    files = sorted(folder.iterdir()) * 2
    found, _, _ = _search_hit_on_a(
        dask_processes, index_dir, files, signal.SIGKILL, k=2, copies=True
    )
    assert "task was lost with a worker" in caplog.text
    top = [hits[0] for hits in found]
    assert [families[hit.path.rsplit("/", 1)[1]] for hit in top] == [
        families[f.name] for f in files
    ]
    assert {hit.kind for hit in top} == {"identical"}


def test_a_worker_frozen_mid_search_is_dropped_and_costs_no_query(
    copies_archive, dask_processes, no_model_here, caplog
):
    """SIGSTOP (`scontrol suspend`, a dead NFS mount) keeps the connection:
    Dask would wait for worker a for 5 minutes. The build's watchdog drops
    it after imgindex.worker-unresponsive, and its batches are sent again."""
    import signal

    import dask.config

    index_dir, folder, families, queries = copies_archive
    files = sorted(folder.iterdir())
    with dask.config.set({"imgindex.worker-unresponsive": "3s"}):
        found, addresses, took = _search_hit_on_a(
            dask_processes, index_dir, files, signal.SIGSTOP, k=1, mid_scatter=True
        )
    assert f"worker {addresses['a']} has been unresponsive" in caplog.text
    # The bytes being sent to a as it froze wait until it is dropped, and go again.
    assert "could not send a batch of queries to the workers" in caplog.text
    assert "task was lost with a worker" in caplog.text
    assert took < 60  # not Dask's 5 minutes
    top = [hits[0].path.rsplit("/", 1)[1] for hits in found]
    assert [families[name] for name in top] == [families[f.name] for f in files]


@pytest.mark.slow
def test_a_query_whose_task_hangs_costs_that_query_alone(tmp_path, caplog):
    """A task running past imgindex.task-timeout is cancelled and its worker
    restarted (the build's watchdog), and its queries go again one a task:
    the query whose image hangs the model is reported, the one whose hit's
    file hangs its reader (a FIFO: a hung mount) has its hit left undecided,
    and the other is answered as it would be."""
    import os
    import shutil

    import dask.config

    from imgindex.pipeline.build import run_build
    from imgindex.pipeline.embed import ModelSpec
    from imgindex.pipeline.search import Searcher
    from imgindex.pipeline.synthetic import write_photos
    from tests.fault_models import fault_cluster

    photos = write_photos(tmp_path / "photos", 4, seed=3, max_side=300)
    queries = tmp_path / "queries"
    queries.mkdir()
    white = queries / "white.png"  # the model hangs on it
    Image.new("RGB", (320, 240), (255, 255, 255)).save(white)
    same = [shutil.copy(p, queries / p.name) for p in photos[:2]]
    unreadable: list[tuple[int, str]] = []
    with fault_cluster() as c:
        spec = ModelSpec(name="test-hang", device="cpu")
        run_build(c, tmp_path / "photos", tmp_path / "out", spec=spec)
        photos[1].unlink()
        os.mkfifo(photos[1])  # opening it to read waits for a writer
        searcher = Searcher(tmp_path / "out" / "photos", client=c)
        try:
            with dask.config.set({"imgindex.task-timeout": "2s"}):
                found = list(
                    searcher.iter_hits(
                        [same[0], white, same[1]],
                        k=1,
                        copies=True,
                        unreadable=lambda n, e: unreadable.append((n, e.reason)),
                    )
                )
        finally:
            searcher.close()
    assert unreadable == [
        (1, "timed out after 2 s (imgindex.task-timeout) while decoding or "
            "embedding this query")
    ]  # fmt: skip
    assert [[(h.path, h.kind) for h in hits] for hits in found] == [
        [(str(photos[0]), "identical")],
        [],
        [(str(photos[1]), "undecided")],
    ]
    assert "queries 1-3: their embed task ran past its time limit" in caplog.text
    assert f"{same[1]}: checking its hits timed out after 2 s" in caplog.text


def test_workers_without_imgindex_leave_the_search_here_unless_told_not_to(
    copies_archive, dask_processes
):
    """A DASK_SCHEDULER_ADDRESS set for some other cluster: its workers
    cannot run a search, and a search here loses nothing."""
    from tests.conftest import DaskProcesses

    address = dask_processes.start_scheduler()
    dask_processes.start_worker("bare", prelude=DaskProcesses.HIDE_IMGINDEX)
    dask_processes.wait_for_workers(1)
    index_dir, folder, families, queries = copies_archive
    query = queries / "tissue-a.jpg"
    env = {"DASK_SCHEDULER_ADDRESS": address}
    here = invoke("search", index_dir, query, "-k", 1, "--json", env=env)
    assert here.exit_code == 0, here.output
    (line,) = [x for x in here.stderr.splitlines() if "searching here" in x]
    assert line.startswith("cluster: worker") and "imgindex" in line
    assert json.loads(here.stdout)[0][0]["path"].endswith("tissue.view-a.jpg")

    strict = invoke("search", index_dir, query, "--no-fallback", env=env)
    assert strict.exit_code == 1 and strict.stdout == ""
    assert strict.stderr.splitlines()[-1].startswith("Error: worker")
