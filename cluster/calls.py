"""Requests to the cluster under a deadline: a frozen worker is named, never waited on.

``Client.run`` and ``Client.register_plugin`` wait for every worker's answer,
and a worker that is frozen (SIGSTOP, SLURM ``scontrol suspend``, a GIL-holding
C call, a dead NFS mount) never answers, so both hung forever. These wrappers
use the client's coroutine methods (``_run``, ``_register_worker_plugin``;
distributed is pinned below 2027 in setup.cfg) under ``asyncio.wait_for``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from imgindex.pipeline.config import seconds_value

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


def run_on_each(
    client: Client,
    function,
    workers: list[str],
    timeout: float | None = None,
    args: tuple = (),
) -> dict[str, Any]:
    """``function(*args)`` on each worker: its result, its exception or Unresponsive."""
    limit = call_timeout(timeout)

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

    async def each() -> dict[str, Any]:
        results = await asyncio.gather(*(one(a) for a in workers))
        return dict(zip(workers, results, strict=True))

    return client.sync(each)


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
