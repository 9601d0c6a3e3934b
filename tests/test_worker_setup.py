"""Worker set-up: the model loads on each worker's own thread, and the client
takes the first worker's card rather than waiting for the slowest."""

from __future__ import annotations

import time

import pytest

from imgindex.cluster.worker import card_from_workers
from imgindex.pipeline.embed import ModelSpec
from imgindex.pipeline.errors import ModelUnavailable
from imgindex.pipeline.models import ModelCard, Preprocess

SPEC = ModelSpec(name="efficientnet-lite0", device="cpu")
CARD = ModelCard("efficientnet-lite0", 1280, Preprocess())


def _loading(state: str, spec: ModelSpec, card: ModelCard) -> None:
    """Run on a worker: its set-up's load of ``spec`` is still going ("slow"),
    done ("done") or failed ("failed"), as WorkerSetup leaves it."""
    from concurrent.futures import Future

    from imgindex.cluster import worker
    from imgindex.pipeline.errors import ModelUnavailable

    future: Future = Future()
    if state == "done":
        future.set_result(card)
    elif state == "failed":
        future.set_exception(ModelUnavailable("worker w: no weights here"))
    worker._LOADS[spec] = future


def _set(client, states: dict[str, str]) -> None:
    for address, state in states.items():
        client.run(_loading, state, SPEC, CARD, workers=[address])


@pytest.mark.slow  # starts a cluster or a process
def test_the_client_takes_the_first_card_not_the_slowest_workers(process_cluster):
    from distributed import Client

    with Client(process_cluster, set_as_default=False) as client:
        first, second = sorted(client.scheduler_info()["workers"])
        _set(client, {first: "slow", second: "done"})
        started = time.perf_counter()
        assert card_from_workers(client, SPEC) == CARD
        # The other worker's load never ends: not waited on (call-timeout 30 s).
        assert time.perf_counter() - started < 10

        # Where every worker failed to load the model, its reason is the error.
        _set(client, {first: "failed", second: "failed"})
        with pytest.raises(ModelUnavailable, match="worker w: no weights here"):
            card_from_workers(client, SPEC)
        # One worker failed, the other has it: the build goes on with that one.
        _set(client, {first: "failed", second: "done"})
        assert card_from_workers(client, SPEC) == CARD
        _set(client, {first: "done", second: "done"})  # as the next test expects


@pytest.mark.slow  # starts a cluster or a process
def test_workers_not_loading_the_model_are_asked_once(process_cluster):
    """Workers without a set-up for the model (a build through
    pipeline.build.run_build, or a set-up that timed out) say at once that
    no card is coming: the client loads its own copy instead of asking them
    again and again until imgindex.call-timeout."""
    import dask.config
    from distributed import Client

    asked: list[str] = []
    with (
        Client(process_cluster, set_as_default=False) as client,
        dask.config.set({"imgindex.call-timeout": "60s"}),
    ):
        run = client._run

        def counted(function, *args, **kwargs):
            asked.append(function.__name__)
            return run(function, *args, **kwargs)

        client._run = counted
        assert card_from_workers(client, ModelSpec(name="never-set-up")) is None
    assert asked == ["card_when_loaded"] * 2  # one round, each worker once


def _same_load_still_running(spec: ModelSpec) -> bool:
    from imgindex.cluster import worker

    return not worker._LOADS[spec].done()


@pytest.mark.slow  # starts a cluster or a process
def test_a_second_set_up_during_a_load_returns_at_once(process_cluster):
    """Set-up runs again when a plugin is registered anew: with a load still
    running it returns at once and leaves that load alone (it must not wait
    for it in the worker's event loop)."""
    from distributed import Client

    from imgindex.cluster.calls import register_worker_plugin
    from imgindex.cluster.worker import WorkerSetup

    with Client(process_cluster, set_as_default=False) as client:
        first, second = sorted(client.scheduler_info()["workers"])
        _set(client, {first: "slow", second: "slow"})
        started = time.perf_counter()
        assert register_worker_plugin(
            client, WorkerSetup(SPEC), "imgindex-test-second-set-up", timeout=10
        )
        assert time.perf_counter() - started < 10
        assert all(client.run(_same_load_still_running, SPEC).values())
        _set(client, {first: "done", second: "done"})
