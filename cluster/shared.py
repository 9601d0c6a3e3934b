"""Can the workers write where the index goes? A probe file, written and read back.

Workers write each partition's shard beside the index, so they must see
``--out`` at the same path as the client (a shared file system). A laptop
client driving a remote cluster does not; then the vectors travel back to the
client instead, which is slower but correct.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from imgindex.cluster.calls import run_on_each

if TYPE_CHECKING:
    from distributed import Client

logger = logging.getLogger(__name__)


def _probe_fn():
    """Runs on each worker; a closure, so cloudpickle sends it by value."""

    def write_probe(folder: str, token: str, dask_worker=None) -> str:
        import hashlib
        import os

        tag = hashlib.blake2b(dask_worker.address.encode(), digest_size=6).hexdigest()
        path = os.path.join(folder, f".probe-{token}-{tag}")
        with open(path, "w") as f:
            f.write(dask_worker.address)
        return path

    return write_probe


def workers_without(client: Client, folder: str | os.PathLike) -> list[str]:
    """The workers that cannot write into ``folder`` where the client reads it.

    Each worker writes ``.probe-<token>-<tag>`` holding its address; the client
    reads them back and removes them. A worker that fails to write, writes
    somewhere the client cannot see (another mount), or does not answer within
    ``imgindex.call-timeout``, is listed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    workers = list(client.scheduler_info(n_workers=-1)["workers"])
    token = uuid.uuid4().hex[:12]
    answers = run_on_each(client, _probe_fn(), workers, None, (str(folder), token))
    missing = []
    for address, answer in answers.items():
        seen = False
        if isinstance(answer, str):
            path = Path(answer)
            try:
                seen = path.parent == folder and path.read_text() == address
                path.unlink()
            except OSError:
                seen = False
        if not seen:
            missing.append(address)
    return missing
