"""Shared fixtures: real Dask clusters and real image files written with Pillow."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgindex.pipeline.synthetic import write_photos
from tests.helpers import REQUIRE_ALL


@pytest.fixture(scope="session", autouse=True)
def onnx_cache(tmp_path_factory):
    """The exported ONNX graph goes to a session folder, not ~/.cache: for this
    process (dask config) and for the workers and servers it starts (env)."""
    import dask.config

    folder = tmp_path_factory.mktemp("onnx-cache")
    os.environ["DASK_IMGINDEX__RUNTIME_CACHE"] = str(folder)
    with dask.config.set({"imgindex.runtime-cache": str(folder)}):
        yield folder


@pytest.fixture(autouse=True)
def imgindex_logger_put_back():
    """A command run in this process (``invoke``) sets the imgindex logger up
    for a terminal: a handler of its own, its records kept from the root
    logger, which is where caplog listens. Put back after each test, so that
    what a test's caplog sees does not depend on the tests run before it."""
    import logging

    log = logging.getLogger("imgindex")
    level, handlers, propagate = log.level, list(log.handlers), log.propagate
    yield
    log.setLevel(level)
    log.handlers, log.propagate = handlers, propagate


@pytest.fixture(scope="session")
def client():
    """In-process cluster: fast, shares the test's model cache."""
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster, set_as_default=False) as c,
    ):
        yield c


@pytest.fixture(scope="session")
def process_cluster():
    """Worker processes: only they prove that tasks and results pickle."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster:
        yield cluster


@pytest.fixture
def refused_address():
    """tcp://127.0.0.1:PORT where nothing listens, for the whole test: the
    port stays bound (not listening) so no other process can take it, and a
    connection to it is refused at once."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield f"tcp://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="session")
def photo_sets(tmp_path_factory) -> dict[str, list[Path]]:
    """Two datasets of structured JPEGs (36 + 28 images), written once per session."""
    root = tmp_path_factory.mktemp("photos")
    return {
        "beach": write_photos(root / "beach", 36, seed=1, max_side=640),
        "forest": write_photos(root / "forest", 28, seed=2, max_side=640),
    }


def copy_tree(paths: list[Path], dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for p in paths:
        (dest / p.name).write_bytes(p.read_bytes())
    return dest


@pytest.fixture
def dataset(tmp_path, photo_sets) -> Path:
    """A private, writable copy of the 'beach' photos."""
    return copy_tree(photo_sets["beach"], tmp_path / "beach")


def crop_query(src: Path, dest: Path) -> Path:
    """A near-duplicate: cropped, resized and re-encoded."""
    with Image.open(src) as im:
        w, h = im.size
        box = (int(w * 0.08), int(h * 0.05), int(w * 0.94), int(h * 0.92))
        q = im.crop(box).resize((int(w * 0.6), int(h * 0.6)))
        q.save(dest, quality=70)
    return dest


def write_bad_files(folder: Path) -> dict[str, str]:
    """The bad-input corpus; returns name -> the substring its reason must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    good = folder / "good_ref.jpg"
    Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(good)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(
        good.read_bytes()[: good.stat().st_size // 3]
    )
    (folder / "random.jpg").write_bytes(rng.bytes(5000))
    (folder / "text.png").write_text("this is not a png\n")
    os.symlink(folder / "nowhere.jpg", folder / "broken_link.jpg")
    return {
        "empty.jpg": "empty file",
        "truncated.jpg": "truncated",
        "random.jpg": "not an image",
        "text.png": "not an image",
        "broken_link.jpg": "broken symbolic link",
    }


_RUNNING: list[DaskProcesses] = []


# Fixtures that start a cluster, processes, a server or a browser: a test
# that uses one (directly or through another fixture) is `slow`.
SLOW_FIXTURES = {
    "client",
    "process_cluster",
    "dask_processes",
    "real_cluster",
    "service",
    "browser",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test that ran real dask processes shows their log tails; and
    where IMGINDEX_REQUIRE_ALL is set (CI), a skipped test fails: a missing
    browser, a broken extra or a lost root would otherwise pass quietly."""
    outcome = yield
    report = outcome.get_result()
    # An expected failure reports as skipped too: a known limit, not a gap.
    expected = hasattr(report, "wasxfail")
    if report.skipped and not expected and os.environ.get(REQUIRE_ALL):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else ""
        report.outcome = "failed"
        report.longrepr = f"skipped, but {REQUIRE_ALL} is set: {reason}"
    if report.when == "call" and report.failed:
        for procs in _RUNNING:
            for title, text in procs.log_tails():
                report.sections.append((title, text))


class DaskProcesses:
    """Real `dask scheduler` / `dask worker` processes on 127.0.0.1, free ports."""

    HIDE_IMGINDEX = (
        "import sys\n"
        "class Hide:\n"
        "    @classmethod\n"
        "    def find_spec(cls, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'imgindex':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, Hide)\n"
    )
    OTHER_VERSION = "import imgindex\nimgindex.__version__ = '0.0.0.other'\n"

    def __init__(self, folder: Path):
        self.folder = folder
        self.scheduler_file = folder / "scheduler.json"
        self.procs: list = []
        self.dask = str(Path(sys.executable).parent / "dask")
        _RUNNING.append(self)

    def log_tails(self, lines: int = 25) -> list[tuple[str, str]]:
        """The last lines of each process's log, for a failed test's report."""
        tails = []
        for log in sorted(self.folder.glob("*.log")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            tails.append((f"{log.name} (last {lines} lines)", "\n".join(text)))
        return tails

    def _spawn(self, args: list[str], name: str):
        env = {**os.environ, "DASK_LOGGING__DISTRIBUTED": "info"}
        # The child writes to its own copy of the descriptor: ours is closed.
        with open(self.folder / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.folder
            )
        self.procs.append(proc)
        return proc

    def start_cluster(self, *workers: str) -> str:
        """A scheduler and the named workers, once they are all up: its address."""
        address = self.start_scheduler()
        for name in workers:
            self.start_worker(name)
        self.wait_for_workers(len(workers))
        return address

    def start_scheduler(self, *extra: str) -> str:
        """Start `dask scheduler` (``extra``: more of its flags, e.g. TLS) and
        return its address once the scheduler file is whole."""
        import json

        self._spawn(
            [
                self.dask,
                "scheduler",
                "--scheduler-file",
                str(self.scheduler_file),
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--dashboard-address",
                "127.0.0.1:0",
                *extra,
            ],
            "scheduler",
        )
        # The file may exist before it is written whole: read until it parses.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.scheduler_file.exists():
                try:
                    return json.loads(self.scheduler_file.read_text())["address"]
                except (ValueError, KeyError):
                    pass
            time.sleep(0.1)
        raise RuntimeError("dask scheduler did not start")

    def start_worker(
        self,
        name: str,
        resources: str | None = None,
        prelude: str = "",
        extra: tuple[str, ...] = (),
    ):
        """Start a worker; ``prelude`` is Python run first (then no nanny is
        used); ``extra``: more of its flags."""
        args = [
            "--scheduler-file",
            str(self.scheduler_file),
            "--nthreads",
            "1",
            "--host",
            "127.0.0.1",
            "--dashboard-address",
            "127.0.0.1:0",
            "--name",
            name,
            *extra,
        ]
        if resources:
            args += ["--resources", resources]
        if prelude:
            code = prelude + (
                "from distributed.cli.dask_worker import main\n"
                f"main({[*args, '--no-nanny']!r})\n"
            )
            return self._spawn([sys.executable, "-c", code], name)
        return self._spawn([self.dask, "worker", *args], name)

    def client(self):
        """A client of this scheduler (close it, or use it in a with block)."""
        from distributed import Client

        return Client(scheduler_file=str(self.scheduler_file), timeout=30)

    def wait_for_workers(self, n: int, timeout: float = 60) -> dict:
        with self.client() as c:
            c.wait_for_workers(n, timeout=timeout)
            return _addresses(c)

    def wait_for_results_on(self, name: str, proc, timeout: float = 120) -> None:
        """Wait until worker ``name`` holds a finished task's result."""
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise AssertionError(f"exited {proc.returncode} early")
                if c.has_what().get(_addresses(c).get(name)):
                    return
                time.sleep(0.2)
        raise AssertionError(f"worker {name!r} finished no task in {timeout} s")

    def worker_pids(self) -> dict[str, int]:
        """Worker name -> pid of the worker process (not its nanny)."""
        with self.client() as c:
            pids = c.run(os.getpid)
            return {name: pids[a] for name, a in _addresses(c).items() if a in pids}

    def stop(self) -> None:
        if self in _RUNNING:
            _RUNNING.remove(self)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        # One deadline for all: they close in about a second, but a worker
        # that was frozen and dropped ignores SIGTERM (each once cost 15 s).
        deadline = time.monotonic() + 5
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def dask_processes(tmp_path):
    procs = DaskProcesses(tmp_path)
    yield procs
    procs.stop()


@pytest.fixture(scope="module")
def real_cluster(tmp_path_factory):
    """`dask scheduler` + two `dask worker`s; worker "gpu" offers the resource GPU=1."""
    procs = DaskProcesses(tmp_path_factory.mktemp("real-cluster"))
    try:
        address = procs.start_scheduler()
        procs.start_worker("gpu", resources="GPU=1")
        procs.start_worker("plain")
        workers = procs.wait_for_workers(2)
        yield address, procs, workers
    finally:
        procs.stop()


# tests/hpc needs a real SLURM: `make test-hpc` starts one and sets this.
if not os.environ.get("IMGINDEX_HPC_TESTS"):
    collect_ignore_glob = ["hpc/*"]


ARTIFACTS = Path(
    os.environ.get(
        "IMGINDEX_TEST_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts"
    )
)


@pytest.fixture(scope="session")
def service(tmp_path_factory, photo_sets):
    """A real `imgindex serve` (with a token) and its dataset root; builds run
    on the LocalCluster it starts. Tests add the dataset folders they build."""
    from tests.helpers import RunningService

    base = tmp_path_factory.mktemp("service")
    datasets = base / "datasets"
    copy_tree(photo_sets["beach"], datasets / "beach")
    running = RunningService(base / "indexes", datasets, token="s3cret-token")
    try:
        yield running
    finally:
        code = running.stop()
        log = "".join(running.log)
        assert code == 0, log
        assert "imgindex serve: stopped" in log, log
        assert "Traceback" not in log, log


@pytest.fixture(scope="session")
def beach(service):
    """The service with its 'beach' index built, whichever module builds it."""
    names = {
        i["name"] for i in service.request("GET", "/api/indexes").json()["indexes"]
    }
    if "beach" not in names:
        assert service.wait(service.build("beach")["id"])["state"] == "finished"
    return service


@pytest.fixture(scope="session")
def album(service):
    """Index 'album' built through the service: two photos and copies of each
    (pipeline.synthetic.COPY_MAKERS), with its duplicates report saved."""
    from skimage import data

    from imgindex.pipeline.synthetic import write_copy_set
    from tests.helpers import invoke

    originals = {n: Image.fromarray(getattr(data, n)()) for n in ("chelsea", "coffee")}
    families = write_copy_set(service.dataset_root / "album", originals)
    build = service.wait(service.build("album")["id"])
    assert build["state"] == "finished", build
    run = invoke("duplicates", service.index_root / "album", "--save")
    assert run.exit_code == 0, run.stderr
    return families


@pytest.fixture(scope="session")
def scenes(service):
    """Index 'scenes' built through the service: scikit-image's stereo pair
    (two exposures of one scene), a photo, a copy of it and an edit of it (a
    sticker pasted), and an unrelated photo, with its duplicates report
    saved."""
    from skimage import data

    from imgindex.pipeline.synthetic import EDIT_MAKERS, write_copy_set
    from tests.helpers import invoke

    left, right, _ = data.stereo_motorcycle()
    folder = service.dataset_root / "scenes"
    write_copy_set(
        folder,
        {},
        singles={
            "stereo-left": Image.fromarray(left),
            "stereo-right": Image.fromarray(right),
            "rocket": Image.fromarray(data.rocket()),
            "astronaut": Image.fromarray(data.astronaut()),
        },
    )
    rocket = Image.fromarray(data.rocket())
    rocket.resize((320, 213)).save(folder / "rocket-small.jpg")
    EDIT_MAKERS["stickered"](rocket).save(folder / "rocket-stickered.jpg")
    build = service.wait(service.build("scenes")["id"])
    assert build["state"] == "finished", build
    run = invoke("duplicates", service.index_root / "scenes", "--save")
    assert run.exit_code == 0, run.stderr
    return folder


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    """Debian's chromium, headless, driven by chromedriver (nothing downloaded).

    Skipped where it is not installed (a failure where IMGINDEX_REQUIRE_ALL
    is set, as in CI).
    """
    import shutil

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    webdriver = None
    try:
        from selenium import webdriver
    except ImportError:
        pass
    if not (chromium and driver and webdriver):
        pytest.skip(
            "needs chromium, chromium-driver and selenium (apt-get install "
            "chromium chromium-driver; pip install -e .[test])"
        )
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not fetch a driver
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--window-size=1280,1400",
        "--disable-dev-shm-usage",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # Chromium leaves a folder for its singleton socket in TMPDIR at each
    # start; here it is pytest's to clear.
    scratch = tmp_path_factory.mktemp("chromium")
    service = Service(driver, env={**os.environ, "TMPDIR": str(scratch)})
    chrome = webdriver.Chrome(service=service, options=options)
    try:
        yield chrome
    finally:
        chrome.quit()


def _addresses(client) -> dict[str, str]:
    """Worker name -> address, as the scheduler knows them now."""
    workers = client.scheduler_info(n_workers=-1)["workers"]
    return {w["name"]: a for a, w in workers.items()}


@pytest.fixture(scope="session")
def copies_archive(client, tmp_path_factory):
    """An index of two photos with their copies, two views of a scene, one
    view of a stereo pair and a flat grey image; (index dir, folder, family
    of each file, queries folder); what each hit is to each query:
    :func:`tests.helpers.copies_truth`."""
    import shutil

    import skimage.data as skdata

    import imgindex
    from imgindex.pipeline.synthetic import write_copy_set

    tmp = tmp_path_factory.mktemp("search-copies")
    folder = tmp / "archive"
    left, right, _ = skdata.stereo_motorcycle()
    families = write_copy_set(
        folder,
        {"chelsea": Image.fromarray(skdata.chelsea())},
        {"tissue": Image.fromarray(skdata.immunohistochemistry())},
        {
            "stereo-left": Image.fromarray(left),
            "flat": Image.new("RGB", (300, 200), (120, 120, 120)),
        },
    )
    imgindex.build(folder, tmp / "out", client=client, progress=False)
    queries = tmp / "queries"
    queries.mkdir()
    # Not in the index: a crop of the photo, turned and re-encoded harder.
    crop = Image.fromarray(skdata.chelsea()).crop((20, 10, 400, 280))
    crop.rotate(90, expand=True).save(queries / "chelsea-crop.jpg", quality=70)
    Image.fromarray(right).save(queries / "stereo-right.jpg", quality=90)
    shutil.copyfile(folder / "tissue.view-a.jpg", queries / "tissue-a.jpg")
    return tmp / "out" / "archive", folder, families, queries
