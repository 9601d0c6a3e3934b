"""What a hostile tester found (issue 8), tried through the command line.

Each test names its item. Builds run on the session's worker processes
(``--scheduler``), so tasks and results really pickle.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dask.config
import pytest

from imgindex.pipeline.store import (
    INDEX_FILE,
    MANIFEST_FILE,
    META_FILE,
    read_meta,
)
from tests.conftest import copy_tree
from tests.helpers import (
    can_mount_privately,
    imgindex_cmd,
    invoke,
    one_error_line,
    read_index,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def build(process_cluster):
    """``imgindex build ARGS --scheduler <session cluster>``."""

    def run(*args):
        return invoke("build", *args, "--scheduler", process_cluster.scheduler_address)

    return run


@pytest.fixture
def few(tmp_path, photo_sets) -> Path:
    """Eight photos in a folder named ``good``."""
    return copy_tree(photo_sets["forest"][:8], tmp_path / "a" / "good")


def test_item1_rebuild_never_deletes_a_foreign_folder(build, few, tmp_path):
    out = tmp_path / "out"
    (out / "good" / "thesis").mkdir(parents=True)
    (out / "good" / "meta.json").write_text('{"experiment": 1}')
    (out / "good" / "thesis" / "ch1.tex").write_text("work")
    for extra in ([], ["--rebuild"]):
        result = build(few, "--out", out, *extra)
        assert result.exit_code == 1
        assert "is not an imgindex index (it holds 'thesis')" in one_error_line(
            result.stderr
        )
    assert (out / "good" / "thesis" / "ch1.tex").read_text() == "work"
    assert (out / "good" / "meta.json").read_text() == '{"experiment": 1}'


def test_item4_same_folder_name_from_another_place_is_refused(build, few, tmp_path):
    other = copy_tree(sorted(few.iterdir())[:4], tmp_path / "b" / "good")
    out = tmp_path / "out"
    assert build(few, "--out", out).exit_code == 0
    result = build(other, "--out", out)
    assert result.exit_code == 1
    line = one_error_line(result.stderr)
    assert "holds another dataset" in line and "--name" in line
    assert "--moved" in line and "now gone" not in line  # it is still there
    assert read_meta(out / "good").count == 8  # untouched
    result = build(other, "--out", out, "--name", "good-b", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["datasets"][0]["index"] == str(out / "good-b")
    assert read_meta(out / "good-b").count == 4
    assert read_meta(out / "good").count == 8


def test_a_dataset_whose_folder_gives_no_index_name_needs_one(few, tmp_path):
    """`imgindex build /` would write its index into --out itself, and a
    dot-folder's would be hidden: both are refused before any work, asking
    for --name."""
    hidden = copy_tree(sorted(few.iterdir())[:1], tmp_path / ".camera")
    out = tmp_path / "out"
    for dataset, name in (("/", ""), (hidden, ".camera")):
        result = invoke("build", dataset, "--out", out)
        assert result.exit_code == 2
        assert one_error_line(result.stderr) == (
            f"Error: Invalid value for DATASETS: dataset {str(dataset)!r} gives no "
            f"folder name for its index ({name!r}); give it one with --name"
        )
        assert "cluster:" not in result.stderr
    assert not out.exists() or not any(out.iterdir())


def test_item7_folders_whose_names_are_not_utf8(build, few, tmp_path):
    odd = os.fsdecode(b"caf\xe9")  # Latin-1 names, as old archives have
    data = tmp_path / odd
    shutil.copytree(few, data)
    out = tmp_path / os.fsdecode(b"out-\xff")
    result = build(data, "--out", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert read_index(out / odd).index.ntotal == 8
    result = invoke("search", out / odd, data / "img00000.jpg", "-k", "1", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)[0][0]["path"] == str(data / "img00000.jpg")
    assert "\\xe9" in invoke("info", out / odd).stdout


def test_item13_output_path_that_is_a_file(build, few, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "good").write_text("not a folder")
    result = build(few, "--out", tmp_path / "out")
    assert result.exit_code == 1
    assert "is a file, not an index directory" in one_error_line(result.stderr)
    assert (tmp_path / "out" / "good").read_text() == "not a folder"


def test_item13_one_failing_dataset_still_prints_the_others_summary(
    build, few, photo_sets, tmp_path
):
    other = copy_tree(photo_sets["beach"][:4], tmp_path / "beach")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "beach").write_text("in the way")
    result = build(few, other, "--out", tmp_path / "out", "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    by_name = {d["name"]: d for d in report["datasets"]}
    assert by_name["good"]["indexed"] == 8
    assert "is a file" in by_name["beach"]["error"]
    assert "is a file" in one_error_line(result.stderr)


def test_item13_bad_values_fail_before_any_cluster_starts(few, tmp_path):
    result = invoke("build", few, "--out", tmp_path / "o", "--task-timeout", "10x")
    assert result.exit_code == 2
    assert "--task-timeout" in result.stderr and "'10x' is not a duration" in (
        result.stderr
    )
    assert "cluster:" not in result.stderr
    # The same value from the configuration: named by its key, as it was set.
    with dask.config.set({"imgindex.task-timeout": "soon"}):
        result = invoke("build", few, "--out", tmp_path / "o")
    assert one_error_line(result.stderr) == (
        "Error: imgindex.task-timeout 'soon' is not a duration; give seconds or "
        "a unit, e.g. 300s or 5m"
    )
    assert "cluster:" not in result.stderr
    (tmp_path / "plain").write_text("x")
    result = invoke(
        "build", few, "--out", tmp_path / "o", "--progress-file",
        tmp_path / "plain" / "progress.json",
    )  # fmt: skip
    assert result.exit_code == 1
    line = one_error_line(result.stderr)
    assert "cannot write the progress file" in line
    assert line.endswith("choose another --progress-file")
    assert "cluster:" not in result.stderr


@pytest.mark.parametrize(
    "content", ["{broken", "[]", '{"state": "running", "datasets": [1]}']
)
def test_item13_malformed_progress_file(tmp_path, content):
    (tmp_path / "p.json").write_text(content)
    result = invoke("status", tmp_path / "p.json")
    assert result.exit_code == 1
    assert "is not an imgindex progress file" in one_error_line(result.stderr)


@pytest.fixture(scope="module")
def built_good(process_cluster, photo_sets, tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("built-good")
    data = copy_tree(photo_sets["forest"][:8], tmp / "good")
    result = invoke(
        "build", data, "--out", tmp / "out", "--scheduler",
        process_cluster.scheduler_address,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return data, tmp / "out" / "good"


@pytest.fixture
def damaged(built_good, tmp_path) -> tuple[Path, Path]:
    """A private copy of a built index, to damage."""
    data, index = built_good
    copy = tmp_path / "out" / "good"
    shutil.copytree(index, copy)
    return data, copy


def test_item13_truncated_index_is_not_called_healthy(damaged):
    data, index = damaged
    blob = (index / INDEX_FILE).read_bytes()
    (index / INDEX_FILE).write_bytes(blob[:1000])
    for args in (["info", index], ["search", index, data / "img00000.jpg"]):
        result = invoke(*args)
        assert result.exit_code == 1
        line = one_error_line(result.stderr)
        assert "is damaged" in line and "--rebuild" in line


@pytest.mark.parametrize("content", ["{", '{"format": 1}', '{"format": 1, "name": 3}'])
def test_item13_malformed_meta_is_one_line(damaged, content):
    data, index = damaged
    (index / META_FILE).write_text(content)
    for args in (["info", index], ["search", index, data / "img00000.jpg"]):
        result = invoke(*args)
        assert result.exit_code == 1
        assert "meta.json" in one_error_line(result.stderr)


def test_item14_manifest_out_of_step_is_refused_never_duplicated(damaged, build):
    data, index = damaged
    lines = (index / MANIFEST_FILE).read_text().splitlines()
    (index / MANIFEST_FILE).write_text("\n".join(lines[1:]) + "\n")
    result = invoke("search", index, data / "img00000.jpg")
    assert result.exit_code == 1
    assert "is damaged" in one_error_line(result.stderr)
    result = build(data, "--out", index.parent)  # incremental
    assert result.exit_code == 1
    assert "--rebuild" in one_error_line(result.stderr)
    result = build(data, "--out", index.parent, "--rebuild", "--json")
    assert result.exit_code == 0, result.stderr
    stored = read_index(index)
    assert stored.index.ntotal == len({r.id for r in stored.manifest}) == 8


def test_item16_file_names_cannot_drive_the_terminal(build, few, tmp_path):
    evil = "\x1b[2J\x1b[H  1  1.0000  fake-rank-one.jpg\nx.jpg"
    shutil.copy(few / "img00000.jpg", few / evil)
    (few / "\x1b]0;title\x07.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"
    result = invoke("build", few, "--out", out, "--scheduler", "tcp://127.0.0.1:1")
    for text in (
        result.stdout,
        invoke("info", out / "good").stdout,
        invoke("search", out / "good", few / evil, "-k", "9").stdout,
    ):
        assert "\x1b" not in text and "\x07" not in text
        assert "\\x1b" in text  # shown, escaped
        assert not any(
            line.startswith("  1  1.0000  /fake") for line in text.splitlines()
        )
    hits = json.loads(invoke("search", out / "good", few / evil, "--json").stdout)
    # --json keeps the real name (the copy and its original tie for rank 1)
    assert str(few / evil) in {h["path"] for h in hits[0][:2]}


def test_item10_local_dashboard_listens_on_loopback_only():
    from imgindex.cluster.connect import start_local

    with start_local("test") as conn:
        port = int(conn.dashboard.split(":")[2].split("/")[0])
        listening = _listening_addresses(port)
    assert conn.dashboard.startswith("http://127.0.0.1:")
    assert listening == {"127.0.0.1"}


def _listening_addresses(port: int) -> set[str]:
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            addr, hexport = local.rsplit(":", 1)
            if state == "0A" and int(hexport, 16) == port:  # LISTEN
                if len(addr) == 8:
                    raw = bytes.fromhex(addr)[::-1]
                    found.add(".".join(str(b) for b in raw))
                else:
                    found.add("::" if set(addr) == {"0"} else addr)
    return found


@pytest.mark.skipif(not can_mount_privately(), reason="needs root for a private tmpfs")
@pytest.mark.parametrize("size_kib, stage", [(60, "checkpoint"), (140, "index")])
def test_item13_disk_full_is_one_line(
    process_cluster, photo_sets, tmp_path, size_kib, stage
):
    # A real full file system: a tmpfs of SIZE in a private mount namespace,
    # mounted over --out. 16 images are 16 x 5 KiB of vectors: the checkpoints
    # (~90 KiB) do not fit in 60 KiB; in 140 KiB they fit, the index beside
    # them (~84 KiB) does not.
    data = copy_tree(photo_sets["beach"][:16], tmp_path / "beach")
    out = tmp_path / "out"
    out.mkdir()
    cmd = " ".join(
        f"'{a}'"
        for a in imgindex_cmd(
            "build", data, "--out", out, "--partition-size", "4",
            "--scheduler", process_cluster.scheduler_address,
        )
    )  # fmt: skip
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c",
         f"mount -t tmpfs -o size={size_kib}k tmpfs '{out}' && exec {cmd}"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    line = one_error_line(proc.stderr)
    assert "No space left on device" in line
    assert (
        "keep finished work" if stage == "checkpoint" else "write the index"
    ) in line


# Runs inside a private mount namespace (see the test below): a tmpfs over
# --out, a first build that fits, then the disk filled but for a few KiB while
# a second build adds images, then the space freed and the build run again.
_DISK_FULL_SCRIPT = r"""
import hashlib, json, os, subprocess, sys
out, results, first, more, scheduler = sys.argv[1:6]
cmd = json.loads(sys.argv[6])
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", out], check=True)

def build(*extra):
    run = subprocess.run(cmd + ["--out", out, "--partition-size", "4",
                                "--scheduler", scheduler, "--json", *extra],
                         capture_output=True, text=True, timeout=240)
    return {"code": run.returncode, "stdout": run.stdout, "stderr": run.stderr}

def digests():
    found = {}
    for folder, _, files in os.walk(out):
        for name in files:
            path = os.path.join(folder, name)
            if name != "filler":
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                found[os.path.relpath(path, out)] = digest
    return found

report = {"first": build(first)}
report["before"] = digests()
for name in os.listdir(more):
    os.link(os.path.join(more, name), os.path.join(first, name))
st = os.statvfs(out)
free = st.f_bavail * st.f_frsize
with open(os.path.join(out, "filler"), "wb") as f:
    f.write(b"\0" * (free - 24 * 1024))
report["full"] = build(first)
report["after"] = digests()
os.unlink(os.path.join(out, "filler"))
report["again"] = build(first)
with open(results, "w") as f:
    json.dump(report, f)
"""


@pytest.mark.slow
@pytest.mark.skipif(not can_mount_privately(), reason="needs root for a private tmpfs")
def test_disk_full_keeps_the_previous_index_and_a_rerun_resumes(
    process_cluster, photo_sets, tmp_path
):
    data = copy_tree(photo_sets["beach"][:8], tmp_path / "beach")
    more = copy_tree(photo_sets["beach"][8:16], tmp_path / "more")
    out = tmp_path / "out"
    out.mkdir()
    results = tmp_path / "results.json"
    cmd = imgindex_cmd("build")
    proc = subprocess.run(
        ["unshare", "-m", sys.executable, "-c", _DISK_FULL_SCRIPT, out, results,
         data, more, process_cluster.scheduler_address, json.dumps(cmd)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(results.read_text())
    first, full, again = report["first"], report["full"], report["again"]
    assert first["code"] == 0, first["stderr"]
    assert json.loads(first["stdout"])["datasets"][0]["indexed"] == 8
    # The second build ran out of space: one line, and the index of the first
    # is there as it was, byte for byte.
    assert full["code"] == 1, full["stderr"]
    assert "No space left on device" in one_error_line(full["stderr"])
    index_files = {k: v for k, v in report["before"].items() if k.startswith("beach/")}
    assert (
        index_files
        and {k: v for k, v in report["after"].items() if k in index_files}
        == index_files
    )
    # With the space back, the same command finishes: the first 8 images are
    # not embedded again.
    assert again["code"] == 0, again["stderr"]
    (summary,) = json.loads(again["stdout"])["datasets"]
    assert summary["indexed"] == 16 and summary["embedded"] <= 8
