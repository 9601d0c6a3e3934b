"""Real `dask scheduler` and `dask worker` processes, as users run them on HPC nodes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import dask.config
import pytest

from imgindex import __version__
from imgindex.pipeline.cancel import CANCEL_BATCH
from imgindex.pipeline.synthetic import write_photos
from tests.conftest import DaskProcesses, copy_tree
from tests.helpers import imgindex_cmd, invoke, read_index, wait_for_progress

pytestmark = pytest.mark.slow


def build_summary(dataset, tmp_path, *extra) -> dict:
    """`imgindex build DATASET --json` with ``extra`` flags; the dataset's summary."""
    result = invoke("build", dataset, "--out", tmp_path / "out", "--json", *extra)
    assert result.exit_code == 0, result.stderr
    (summary,) = json.loads(result.stdout)["datasets"]
    return summary


def test_build_runs_on_the_scheduler_s_workers(real_cluster, dataset, tmp_path):
    address, _, workers = real_cluster
    result = invoke(
        "build", dataset, "--out", tmp_path / "out", "--json", "--scheduler", address
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["cluster"]["kind"] == "remote"
    assert report["cluster"]["reason"] == f"remote {address}: 2 workers"
    (summary,) = report["datasets"]
    assert set(summary["workers"]) == set(workers.values())
    assert sum(summary["workers"].values()) == summary["indexed"] == 36


def test_build_with_a_scheduler_file(real_cluster, dataset, tmp_path):
    _, procs, workers = real_cluster
    summary = build_summary(dataset, tmp_path, "--scheduler-file", procs.scheduler_file)
    assert set(summary["workers"]) <= set(workers.values())
    assert summary["indexed"] == 36


def test_gpu_resource_routes_tasks_to_gpu_workers_only(real_cluster, dataset, tmp_path):
    address, _, workers = real_cluster
    summary = build_summary(dataset, tmp_path, "--scheduler", address, "--gpu-resource")
    assert summary["workers"] == {workers["gpu"]: 36}


def test_doctor_reports_a_healthy_cluster(real_cluster):
    address, _, workers = real_cluster
    result = invoke("doctor", "--scheduler", address, "--json")
    assert result.exit_code == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and report["problems"] == []
    by_address = {w["address"]: w for w in report["workers"]}
    assert set(by_address) == set(workers.values())
    for w in by_address.values():
        assert w["ok"] and w["device"] == "cpu" and w["dim"] == 1280
        assert w["threads"] == 1 and w["embed_seconds"] > 0
        assert w["versions"]["imgindex"] == report["client_versions"]["imgindex"]
    assert by_address[workers["gpu"]]["resources"] == {"GPU": 1}

    text = invoke("doctor", "--scheduler", address)
    assert text.exit_code == 0
    assert text.stdout.count("  ok    tcp://") == 2


def test_concurrent_builds_on_one_cluster_do_not_mix(
    real_cluster, photo_sets, tmp_path
):
    address, _, _ = real_cluster
    roots = {n: copy_tree(p, tmp_path / n) for n, p in photo_sets.items()}
    # The client takes the model's dim and preprocessing from the workers
    # rather than loading its own copy: it never imports torch.
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    procs = {
        n: subprocess.Popen(
            imgindex_cmd(
                "build",
                root,
                "--out",
                tmp_path / f"out-{n}",
                "--json",
                "--scheduler",
                address,
                "--partition-size",
                "3",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for n, root in roots.items()
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        imported = {line.rsplit("|", 1)[-1].strip() for line in err.splitlines()}
        assert "distributed" in imported and "torch" not in imported
        (summary,) = json.loads(out)["datasets"]
        stored = read_index(tmp_path / f"out-{name}" / name)
        assert stored.meta.dim == 1280 and stored.meta.preprocess["crop"] == 224
        expected = sorted(p.name for p in photo_sets[name])
        assert sorted(r.path for r in stored.manifest) == expected
        assert summary["indexed"] == stored.index.ntotal == len(expected)


@pytest.fixture(scope="module")
def small_photos(tmp_path_factory) -> Path:
    return write_photos(
        tmp_path_factory.mktemp("small") / "small",
        240,
        seed=11,
        min_side=200,
        max_side=320,
    )[0].parent


def test_workers_joining_late_get_work(dask_processes, small_photos, tmp_path):
    address = dask_processes.start_scheduler()
    progress = tmp_path / "progress.json"
    env = {**os.environ, "DASK_IMGINDEX__WORKER_WAIT": "120s"}
    build = subprocess.Popen(
        imgindex_cmd(
            "build",
            small_photos,
            "--out",
            tmp_path / "out",
            "--json",
            "--scheduler",
            address,
            "--partition-size",
            "4",
            "--progress-file",
            progress,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    waiting = "has no workers; waiting up to 120 s"
    seen = []  # stderr up to the line that says the build waits for a worker
    while not seen or waiting not in seen[-1]:
        line = build.stderr.readline()
        assert line, "".join(seen)  # it ended without waiting
        seen.append(line)
    dask_processes.start_worker("first")
    wait_for_progress(progress, 1, build)
    # A worker's start (imports, model, timing the runtimes) takes about as
    # long as one worker needs for all 240 images, so a second one started
    # now arrived once to find nothing left. The first is suspended (as
    # `scontrol suspend` would) until the scheduler sees the second holding
    # a finished partition. (Not until the progress file moves: the client
    # may be fetching a result from the suspended worker meanwhile.)
    first = dask_processes.worker_pids()["first"]
    os.kill(first, signal.SIGSTOP)
    try:
        dask_processes.start_worker("second")  # joins mid-build
        dask_processes.wait_for_results_on("second", build)
    finally:
        os.kill(first, signal.SIGCONT)
    out, err = build.communicate(timeout=300)
    assert build.returncode == 0, err
    report = json.loads(out)
    (summary,) = report["datasets"]
    assert summary["indexed"] == 240
    assert len(summary["workers"]) == 2, summary["workers"]
    # counted at the end, not when the build connected (issue 8, item 25)
    assert report["cluster"]["reason"] == f"remote {address}: 2 workers"
    assert report["cluster"]["workers"] == 2
    final = json.loads(progress.read_text())
    assert final["state"] == "finished"
    assert final["datasets"][0]["done"] == 240


def test_no_worker_in_time_is_an_error_with_no_fallback(
    dask_processes, dataset, tmp_path
):
    address = dask_processes.start_scheduler()
    with dask.config.set({"imgindex.worker-wait": "1s"}):
        result = invoke(
            "build",
            dataset,
            "--out",
            tmp_path / "out",
            "--scheduler",
            address,
            "--no-fallback",
        )
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: cannot use the scheduler from --scheduler: {address}: no workers "
        "after 1 s; start `dask scheduler` and `dask worker`, fix the address, or "
        "drop --no-fallback"
    )


def test_worker_without_imgindex_is_reported_in_plain_words(
    dask_processes, dataset, tmp_path
):
    address = dask_processes.start_scheduler()
    dask_processes.start_worker("bare", prelude=DaskProcesses.HIDE_IMGINDEX)
    dask_processes.wait_for_workers(1)

    doctor = invoke("doctor", "--scheduler", address)
    assert doctor.exit_code == 1
    assert "cannot import imgindex (No module named " in doctor.stdout
    assert "Traceback" not in doctor.output

    result = invoke("build", dataset, "--out", tmp_path / "out", "--scheduler", address)
    assert result.exit_code == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: worker tcp://127.0.0.1:")
    assert "cannot import imgindex" in line and "install imgindex" in line
    assert "Traceback" not in result.output
    assert not (tmp_path / "out" / "beach").exists()


def test_worker_with_another_imgindex_version_is_refused(
    dask_processes, dataset, tmp_path
):
    address = dask_processes.start_scheduler()
    dask_processes.start_worker("old", prelude=DaskProcesses.OTHER_VERSION)
    dask_processes.wait_for_workers(1)
    result = invoke("build", dataset, "--out", tmp_path / "out", "--scheduler", address)
    assert result.exit_code == 1
    assert f"has imgindex 0.0.0.other, the client {__version__}" in result.stderr


# Elements matching arguments[0], inside the shadow roots Bokeh renders into.
DEEP = """
const found = [];
const walk = (node) => {
  if (node.shadowRoot) walk(node.shadowRoot);
  for (const child of node.children || []) {
    if (child.matches(arguments[0])) found.push(child);
    walk(child);
  }
};
walk(document.body);
return found;
"""


def test_dashboard_shows_the_whole_build(
    dask_processes, small_photos, photo_sets, tmp_path, browser
):
    """Mid-build, on a real scheduler, the dashboard's bars count every
    partition of every dataset; the Fine Performance Metrics page can pick
    the build's span. Screenshots: test-artifacts/dashboard-*.png."""
    from distributed import Client
    from selenium.common.exceptions import (
        ElementNotInteractableException,
        StaleElementReferenceException,
    )
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.conftest import ARTIFACTS

    # Defined here, so that they are pickled by value: the scheduler cannot
    # import this test module.
    def _embed_progress(dask_scheduler=None) -> dict:
        """(tasks, finished) of each embed prefix, as /status's bars count them
        (Dask leaves forgotten tasks out of a bar)."""
        return {
            str(name): (
                sum(n for state, n in tp.states.items() if state != "forgotten"),
                tp.states["memory"] + tp.states["released"],
            )
            for name, tp in dask_scheduler.task_prefixes.items()
            if str(name).startswith("embed[")
        }

    def _span_names(dask_scheduler=None) -> list:
        spans = dask_scheduler.extensions["spans"].spans.values()
        return [list(s.name) for s in spans]

    address = dask_processes.start_scheduler()
    dask_processes.start_worker("one")
    dask_processes.start_worker("two")
    dask_processes.wait_for_workers(2)
    beach = photo_sets["beach"][0].parent
    # A third, larger dataset makes the build outlast the screenshots on a
    # fast machine (a fresh CI run once finished 240 images in 3 s).
    more = tmp_path / "more"
    for part in "abc":
        copy_tree(sorted(small_photos.iterdir()), more / part)
    build = subprocess.Popen(
        imgindex_cmd(
            "build", small_photos, more, beach, "--out", tmp_path / "out", "--json",
            "--scheduler", address, "--partition-size", "1", "--runtime", "torch",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        with Client(address) as client:
            deadline = time.monotonic() + 180
            seen: dict = {}
            while time.monotonic() < deadline and build.poll() is None:
                seen = client.run_on_scheduler(_embed_progress)
                # Each dataset is planned and submitted before any is collected;
                # the first may start running while the last is being planned.
                if len(seen) == 3 and seen["embed[small]"][1] >= 2:
                    break
                time.sleep(0.2)
            if build.poll() is not None:
                pytest.fail(f"the build ended early:\n{build.communicate()[1][-3000:]}")
            # Every dataset whole from the start, one partition an image, the
            # later ones queued behind the first.
            assert seen["embed[small]"][0] == 240, seen
            assert seen["embed[more]"] == (720, 0), seen
            assert seen["embed[beach]"] == (36, 0), seen
            browser.get(client.dashboard_link)
            WebDriverWait(browser, 30).until(lambda b: b.execute_script(DEEP, "canvas"))
            time.sleep(2)  # the bars redraw every 100 ms
            browser.save_screenshot(str(ARTIFACTS / "dashboard-status.png"))
            then = client.run_on_scheduler(_embed_progress)
            assert then.get("embed[more]", (0, 0))[1] < 720, (
                "ended before the screenshot"
            )
            assert then["embed[more]"][0] == 720, then  # the bar's total stays

            browser.get(
                client.dashboard_link.replace(
                    "/status", "/individual-fine-performance-metrics"
                )
            )

            def type_span(b) -> bool:
                # The first of the page's two pickers filters by span tag. Found
                # and typed into in one go: the page may redraw it in between
                # ("element not interactable", seen once in CI).
                fields = b.execute_script(DEEP, "input.choices__input--cloned")
                if not fields:
                    return False
                fields[0].click()
                fields[0].clear()
                fields[0].send_keys("imgindex build")
                return True

            redrawn = (StaleElementReferenceException, ElementNotInteractableException)
            WebDriverWait(browser, 30, ignored_exceptions=redrawn).until(type_span)

            def pick(b) -> bool:
                # Found and clicked in one go: the list is redrawn every 500 ms.
                for c in b.execute_script(DEEP, ".choices__item--choice"):
                    if c.text.startswith("imgindex build"):
                        c.click()
                        return True
                return False

            WebDriverWait(
                browser, 30, ignored_exceptions=(StaleElementReferenceException,)
            ).until(pick)
            ActionChains(browser).send_keys(Keys.ESCAPE).perform()  # close the list
            time.sleep(3)  # the page updates every 500 ms
            browser.save_screenshot(str(ARTIFACTS / "dashboard-fine-metrics.png"))
            spans = client.run_on_scheduler(_span_names)
            queued = sum(
                t - f for t, f in client.run_on_scheduler(_embed_progress).values()
            )
    except BaseException:
        # Reaped here, else its pipes are left to the collector: a
        # ResourceWarning that fails a later test instead of this one.
        build.kill()
        build.communicate()
        raise
    # The rest of the build proves nothing more about the dashboard, and on a
    # slow CI machine it outlasts the test's time: stop it as scancel would.
    # (Whole builds on this cluster are tested above.)
    build.send_signal(signal.SIGTERM)
    _, err = build.communicate(timeout=120)
    assert build.returncode == 143, err
    assert "finished partitions were saved" in err, err
    # Its hundreds of queued tasks were cancelled in batches (one cancel of n
    # keys takes the scheduler time in n squared), without a log line each.
    assert queued > CANCEL_BATCH, queued  # else batching goes untested here
    log = (dask_processes.folder / "scheduler.log").read_text()
    batches = [int(n) for n in re.findall(r"requests to cancel (\d+) keys", log)]
    assert CANCEL_BATCH in batches and max(batches) <= CANCEL_BATCH, batches
    assert "Scheduler cancels key" not in log
    (build_tag,) = {s[0] for s in spans if s[0].startswith("imgindex build ")}
    assert [build_tag, "small", "embed"] in spans, spans
