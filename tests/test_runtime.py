"""The model runtimes: torch and ONNX Runtime give the same vectors; auto falls back."""

from __future__ import annotations

import json
import os
import sys

import dask.config
import numpy as np
import pytest
import torch

from imgindex.pipeline.embed import Embedder, ModelSpec
from imgindex.pipeline.errors import ModelUnavailable
from imgindex.pipeline.runtime import choose_runtime, onnx_cache_path
from tests.conftest import crop_query
from tests.helpers import imgindex_cmd, import_or_skip, invoke, one_error_line

import_or_skip("onnxruntime")
skdata = import_or_skip("skimage.data")

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from PIL import Image

    folder = tmp_path_factory.mktemp("runtime-photos")
    for name in PHOTOS:
        Image.fromarray(getattr(skdata, name)()).convert("RGB").save(
            folder / f"{name}.jpg", quality=92
        )
    return folder


@pytest.fixture
def no_onnxruntime(tmp_path):
    """An environment where `import onnxruntime` fails, as where it is not
    installed: a module of that name that raises, first on PYTHONPATH."""
    fake = tmp_path / "hide" / "onnxruntime"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "raise ImportError(\"No module named 'onnxruntime'\")\n"
    )
    return {"PYTHONPATH": str(fake.parent)}


def test_both_runtimes_give_the_same_vectors_on_real_photos(photos):
    torch_run = Embedder(ModelSpec.from_config(runtime="torch"))
    onnx_run = Embedder(ModelSpec.from_config(runtime="onnxruntime"))
    assert (torch_run.runtime.name, onnx_run.runtime.name) == ("torch", "onnxruntime")
    pixels = [torch_run.decode(str(p)) for p in sorted(photos.iterdir())]
    a = torch_run.embed_pixels(pixels)
    for batch in (1, 4):  # the graph takes any batch size
        b = np.concatenate(
            [
                onnx_run.embed_pixels(pixels[i : i + batch])
                for i in range(0, len(pixels), batch)
            ]
        )
        assert np.min(np.sum(a * b, axis=1)) >= 0.9999
    # The graph was exported once, into the (session's) cache.
    assert onnx_cache_path(onnx_run.model).is_file()


def _agrees(name: str, reason: str) -> bool:
    """Whether an auto choice's reason names the runtime that was kept."""
    return reason.startswith("auto: onnxruntime ") and (
        (name == "torch") == reason.endswith(", kept torch")
    )


def test_auto_keeps_the_faster_runtime_and_says_which_won():
    model = Embedder(ModelSpec.from_config(runtime="torch")).model
    x = torch.zeros(1, 3, model.preprocess.crop, model.preprocess.crop)
    torch_out = model.forward(x)

    def timed(onnx_ms: float, torch_ms: float):
        # The forward pass timed is told by what it is: torch's own, or not.
        return lambda forward, _: torch_ms if forward is model.forward else onnx_ms

    onnx_won = choose_runtime("auto", model, "fp32", 1, timer=timed(4.0, 9.0))
    assert onnx_won.name == "onnxruntime"
    assert onnx_won.reason == "auto: onnxruntime 4.0 ms an image vs torch 9.0 ms"
    assert np.allclose(onnx_won.forward(x.numpy()), torch_out.numpy(), atol=1e-4)
    torch_won = choose_runtime("auto", model, "fp32", 1, timer=timed(9.0, 4.0))
    assert (torch_won.name, torch_won.forward) == ("torch", model.forward)
    assert torch_won.reason == (
        "auto: onnxruntime 9.0 ms an image vs torch 4.0 ms, kept torch"
    )
    # Timed for real here: whichever won, the reason says which.
    chosen = choose_runtime("auto", model, "fp32", threads=1)
    assert _agrees(chosen.name, chosen.reason), (chosen.name, chosen.reason)
    # fp16 or a GPU: torch, with the reason.
    kept = choose_runtime("auto", model, "fp16", threads=1)
    assert (kept.name, kept.reason) == (
        "torch",
        "auto: ONNX Runtime runs fp32 only, not fp16",
    )
    with pytest.raises(ModelUnavailable, match="--runtime onnxruntime: ONNX"):
        choose_runtime("onnxruntime", model, "bf16", threads=1)


def test_without_onnx_to_export_the_model_auto_keeps_torch(tmp_path, monkeypatch):
    """ONNX Runtime installed without onnx (a GPU node's stock image): the
    graph cannot be exported, so auto keeps torch instead of failing every
    task; a graph exported before still runs."""
    model = Embedder(ModelSpec.from_config(runtime="torch")).model
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` fails
    with dask.config.set({"imgindex.runtime-cache": str(tmp_path)}):
        kept = choose_runtime("auto", model, "fp32", threads=1, timer=lambda *_: 1.0)
        assert (kept.name, kept.reason) == (
            "torch",
            "auto: onnx, which exports the model, is not installed "
            "(pip install 'imgindex[fast]')",
        )
        with pytest.raises(ModelUnavailable, match="--runtime onnxruntime: onnx, w"):
            choose_runtime("onnxruntime", model, "fp32", threads=1)
        monkeypatch.delitem(sys.modules, "onnx")
        choose_runtime("onnxruntime", model, "fp32", threads=1)  # exports it
        assert onnx_cache_path(model).is_file()
        monkeypatch.setitem(sys.modules, "onnx", None)
        cached = choose_runtime("onnxruntime", model, "fp32", threads=1)
        assert cached.name == "onnxruntime"


def test_a_runtime_cache_under_home_is_the_users_home(tmp_path, monkeypatch):
    """`runtime-cache: ~/onnx` in a YAML file: the home folder, not a folder
    named ~ wherever the worker was started."""
    model = Embedder(ModelSpec.from_config(runtime="torch")).model
    monkeypatch.setenv("HOME", str(tmp_path))
    with dask.config.set({"imgindex.runtime-cache": "~/onnx"}):
        assert onnx_cache_path(model).parent == tmp_path / "onnx"


def test_auto_remembers_its_timing_for_this_cpu_threads_and_packages(tmp_path):
    model = Embedder(ModelSpec.from_config(runtime="torch")).model
    with dask.config.set({"imgindex.runtime-cache": str(tmp_path)}):
        first = choose_runtime("auto", model, "fp32", threads=1)
        assert _agrees(first.name, first.reason) and "timed on" not in first.reason
        (saved,) = tmp_path.glob("*.auto-*.json")
        # What the next worker reads is that file, not a timing of its own.
        saved.write_text('{"onnxruntime_ms": 50.0, "torch_ms": 2.0, "date": "D"}')
        kept = choose_runtime("auto", model, "fp32", threads=1)
        assert (kept.name, kept.reason) == (
            "torch",
            "auto: onnxruntime 50.0 ms an image vs torch 2.0 ms "
            "(timed on this CPU on D), kept torch",
        )
        saved.write_text('{"onnxruntime_ms": 2.0, "torch_ms": 50.0, "date": "D"}')
        assert choose_runtime("auto", model, "fp32", threads=1).name == "onnxruntime"
        # Another thread count is timed afresh, and remembered apart.
        other = choose_runtime("auto", model, "fp32", threads=2)
        assert "timed on" not in other.reason
        assert len(list(tmp_path.glob("*.auto-*.json"))) == 2
        saved.write_text("{not json")  # damaged: timed again, and rewritten
        assert "timed on" not in choose_runtime("auto", model, "fp32", 1).reason
        assert json.loads(saved.read_text())["date"] != "D"


@pytest.mark.slow  # starts a cluster or a process
def test_an_index_built_with_torch_is_searched_and_extended_with_onnx(photos, tmp_path):
    from imgindex.pipeline.search import Searcher

    data = tmp_path / "photos"
    data.mkdir()
    for p in sorted(photos.iterdir())[:4]:
        (data / p.name).write_bytes(p.read_bytes())
    built = invoke(
        "build", data, "--out", tmp_path / "idx", "--runtime", "torch", "--json"
    )
    assert built.exit_code == 0, built.stderr
    (summary,) = json.loads(built.stdout)["datasets"]
    assert summary["runtimes"] == {"torch": 4}
    assert summary["runtime_reasons"] == {"torch": "--runtime torch"}

    import dask.config

    query = crop_query(data / "chelsea.jpg", tmp_path / "q.jpg")
    scores = {}
    for runtime in ("torch", "onnxruntime"):
        with dask.config.set({"imgindex.runtime": runtime}):
            searcher = Searcher(tmp_path / "idx" / "photos", turns=False)
            assert searcher.embedder.runtime.name == runtime
            hits = searcher.search_images([query], k=2)[0]
        assert hits[0].path == str(data / "chelsea.jpg")
        scores[runtime] = hits[0].score
    assert scores["torch"] == pytest.approx(scores["onnxruntime"], abs=1e-4)

    for p in sorted(photos.iterdir())[4:]:
        (data / p.name).write_bytes(p.read_bytes())
    more = invoke(
        "build", data, "--out", tmp_path / "idx", "--runtime", "onnxruntime", "--json"
    )
    assert more.exit_code == 0, more.stderr
    (summary,) = json.loads(more.stdout)["datasets"]
    assert summary["runtimes"] == {"onnxruntime": 2}
    assert summary["indexed"] == len(PHOTOS)
    meta = json.loads((tmp_path / "idx" / "photos" / "meta.json").read_text())
    assert meta["runtimes"] == {"torch": 4, "onnxruntime": 2}


@pytest.mark.slow
def test_without_onnxruntime_auto_falls_back_and_asking_for_it_is_an_error(
    photos, tmp_path, no_onnxruntime
):
    import subprocess

    env = {**os.environ, **no_onnxruntime, "DASK_IMGINDEX__LOCAL__N_WORKERS": "1"}
    refused = subprocess.run(
        imgindex_cmd(
            "build", photos, "--out", tmp_path / "a", "--runtime", "onnxruntime"
        ),
        capture_output=True,
        text=True,
        env=env,
    )
    assert refused.returncode == 2
    assert "onnxruntime is not installed here" in one_error_line(refused.stderr)
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())

    fell_back = subprocess.run(
        imgindex_cmd("build", photos, "--out", tmp_path / "b"),
        capture_output=True,
        text=True,
        env=env,
    )
    assert fell_back.returncode == 0, fell_back.stderr
    assert (
        f"model run by torch for {len(PHOTOS)} images (auto: onnxruntime is not "
        "installed here (pip install 'imgindex[fast]'))"
    ) in fell_back.stdout

    doctor = subprocess.run(
        imgindex_cmd("doctor", "--json"), capture_output=True, text=True, env=env
    )
    assert doctor.returncode == 0, doctor.stderr
    (worker,) = json.loads(doctor.stdout)["workers"]
    assert worker["runtime"] == "torch"
    assert "onnxruntime is not installed" in worker["runtime_reason"]


@pytest.mark.slow
def test_a_short_cli_search_runs_torch_and_a_long_one_onnxruntime(photos, tmp_path):
    """Exporting the graph and timing both runtimes cost about a second: worth
    it only when a search runs many forward passes (FEW_FORWARD_PASSES in
    imgindex/cli/search.py), unless ONNX Runtime runs from its cache, torch not
    even imported."""
    import subprocess

    built = invoke("build", photos, "--out", tmp_path / "idx")
    assert built.exit_code == 0, built.stderr
    index = tmp_path / "idx" / photos.name
    query = crop_query(photos / "coffee.jpg", tmp_path / "q.jpg")
    cache = tmp_path / "cache"  # empty: nothing exported or timed yet
    env = {**os.environ, "DASK_IMGINDEX__RUNTIME_CACHE": str(cache)}

    def runtime_of(*queries) -> str:
        run = subprocess.run(
            imgindex_cmd("-v", "search", index, *queries, "-k", "1"),
            capture_output=True,
            text=True,
            env=env,
        )
        assert run.returncode == 0, run.stderr
        (line,) = [x for x in run.stderr.splitlines() if " runs with " in x]
        return line.split(" runs with ")[1]

    assert runtime_of(query) == "torch (--runtime torch)"  # 4 passes with turns
    # 64 passes: auto times both, keeps the faster and says which it kept.
    name, _, reason = runtime_of(*[query] * 16).partition(" (")
    assert _agrees(name, reason.removesuffix(")")), (name, reason)
    # Now a short search runs from the cache where ONNX Runtime won.
    (timing,) = cache.glob("*.auto-*.json")
    timing.write_text('{"onnxruntime_ms": 2.0, "torch_ms": 50.0, "date": "D"}')
    assert runtime_of(query) == (
        "onnxruntime, torch not loaded (auto: onnxruntime 2.0 ms an image vs "
        "torch 50.0 ms (timed on this CPU on D))"
    )
    timing.write_text('{"onnxruntime_ms": 50.0, "torch_ms": 2.0, "date": "D"}')
    assert runtime_of(query) == "torch (--runtime torch)"


_UNLOADED_PROBE = """
import json, sys
import numpy as np
from imgindex.pipeline.embed import Embedder, ModelSpec
e = Embedder(ModelSpec.from_config(device=sys.argv[1]))
v = e.embed_pixels([e.decode(p) for p in sys.argv[2:]])
print(json.dumps({"torch": "torch" in sys.modules, "runtime": e.runtime.name,
                  "reason": e.runtime.reason, "vectors": v.tolist()}))
"""


def test_a_cached_graph_runs_without_torch_where_onnxruntime_won(photos, tmp_path):
    """torch is most of a CPU worker's start-up: where the graph, its card and
    a timing that ONNX Runtime won are cached, torch is never imported."""
    import subprocess
    import sys

    paths = [str(p) for p in sorted(photos.iterdir())[:3]]

    def probe(device: str = "cpu") -> dict:
        env = {**os.environ, "DASK_IMGINDEX__RUNTIME_CACHE": str(tmp_path)}
        run = subprocess.run(
            [sys.executable, "-c", _UNLOADED_PROBE, device, *paths],
            capture_output=True,
            text=True,
            env=env,
        )
        assert run.returncode == 0, run.stderr
        return json.loads(run.stdout)

    first = probe()  # nothing cached: torch loads the model, exports, times
    assert first["torch"] and _agrees(first["runtime"], first["reason"])
    (graph,) = tmp_path.glob("*.onnx")
    (card,) = tmp_path.glob("*.card.json")
    assert json.loads(card.read_text())["graph"] == graph.name
    (timing,) = tmp_path.glob("*.auto-*.json")
    # ONNX Runtime's optimised form of the graph, loaded as it is from now on.
    (optimized,) = tmp_path.glob("*.optimized-*")

    timing.write_text('{"onnxruntime_ms": 2.0, "torch_ms": 50.0, "date": "D"}')
    unloaded = probe()
    assert not unloaded["torch"]
    assert unloaded["runtime"] == "onnxruntime"
    assert unloaded["reason"] == (
        "auto: onnxruntime 2.0 ms an image vs torch 50.0 ms (timed on this CPU on D)"
    )
    reference = Embedder(ModelSpec.from_config(runtime="torch"))
    expected = reference.embed_pixels([reference.decode(p) for p in paths])
    cosines = np.sum(np.array(unloaded["vectors"]) * expected, axis=1)
    assert cosines.min() >= 0.9999, cosines
    # A damaged optimised graph is made again from the graph.
    optimized.write_bytes(b"not a graph")
    again = probe()
    assert not again["torch"] and again["vectors"] == unloaded["vectors"]
    assert optimized.stat().st_size > 1_000_000
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]

    # Where torch won, or card or graph are unusable, torch loads the model.
    timing.write_text('{"onnxruntime_ms": 50.0, "torch_ms": 2.0, "date": "D"}')
    assert probe()["torch"]
    timing.write_text('{"onnxruntime_ms": 2.0, "torch_ms": 50.0, "date": "D"}')
    card.write_text("{damaged")
    repaired = probe()
    assert repaired["torch"] and repaired["runtime"] == "onnxruntime"
    assert not probe()["torch"]  # the card was written again
    graph.write_bytes(b"not a graph")
    assert probe()["torch"]
    # fp16 or a GPU asked for: torch, always.
    assert probe("cuda" if torch.cuda.is_available() else "cpu")["torch"] == (
        torch.cuda.is_available()
    )
