"""Requests to the cluster under a deadline: a frozen worker is named, never waited on.

``Client.run`` and ``Client.register_plugin`` wait for every worker's answer,
and a worker that is frozen (SIGSTOP, SLURM ``scontrol suspend``, a GIL-holding
C call, a dead NFS mount) never answers, so both hung forever. These wrappers
use the client's coroutine methods (``_run``, ``_register_worker_plugin``;
distributed is pinned below 2027 in setup.cfg) under ``asyncio.wait_for``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pipeline.config import seconds_value

if TYPE_CHECKING:
    from distributed import Client
    from distributed.diagnostics.plugin import WorkerPlugin


class Unresponsive(TimeoutError):
    """A worker that did not answer within the deadline."""

    def __init__(self, address: str, seconds: float):
        super().__init__(
            f"worker {address} did not answer within {seconds:g} s "
            "(frozen, suspended or overloaded?)"
        )
        self.address = address


def call_timeout(value: float | str | None = None) -> float:
    return seconds_value(value, "imgindex.call-timeout")


def _ask(client: Client, function, args: tuple, limit: float):
    """A coroutine function: ``function(*args)`` on one worker, under ``limit``."""

    async def one(address: str) -> Any:
        try:
            answers = await asyncio.wait_for(
                client._run(function, *args, workers=[address], on_error="return"),
                limit,
            )
        except (asyncio.TimeoutError, TimeoutError):
            return Unresponsive(address, limit)
        except Exception as e:  # the worker left meanwhile, a comm error
            return e
        return answers.get(address, Unresponsive(address, limit))

    return one


def run_on_each(
    client: Client,
    function,
    workers: list[str],
    timeout: float | None = None,
    args: tuple = (),
) -> dict[str, Any]:
    """``function(*args)`` on each worker: its result, its exception or Unresponsive."""
    one = _ask(client, function, args, call_timeout(timeout))

    async def each() -> dict[str, Any]:
        results = await asyncio.gather(*(one(a) for a in workers))
        return dict(zip(workers, results, strict=True))

    return client.sync(each)


def first_answer(
    client: Client,
    function,
    workers: list[str],
    accept: Callable[[Any], bool],
    timeout: float | None = None,
    args: tuple = (),
) -> dict[str, Any]:
    """``function(*args)`` on every worker at once, until one answer passes
    ``accept``: the answers so far, by worker (every answer where none
    passes; a worker that did not answer in time is Unresponsive)."""
    one = _ask(client, function, args, call_timeout(timeout))

    async def first() -> dict[str, Any]:
        asked = {asyncio.ensure_future(one(a)): a for a in workers}
        answers: dict[str, Any] = {}
        pending = set(asked)
        try:
            while pending:
                done, pending = await asyncio.wait(
                    pending, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    answers[asked[task]] = task.result()
                if any(accept(answers[asked[task]]) for task in done):
                    break
        finally:
            for task in pending:
                task.cancel()
        return answers

    return client.sync(first)


def register_worker_plugin(
    client: Client, plugin: WorkerPlugin, name: str, timeout: float | None = None
) -> bool:
    """Register ``plugin``; False if some worker did not confirm within the deadline.

    The scheduler keeps the plugin before it asks the workers, so workers that
    join (or wake up) later still run it.
    """
    try:
        client.sync(
            client._register_worker_plugin,
            plugin,
            name,
            getattr(plugin, "idempotent", False),
            callback_timeout=call_timeout(timeout),
        )
    except (asyncio.TimeoutError, TimeoutError):
        return False
    return True
