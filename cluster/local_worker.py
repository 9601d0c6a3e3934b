"""Preloaded into the worker processes of a LocalCluster that imgindex starts.

Ctrl-C in a terminal (and ``kill -TERM -PGID``) signals the whole foreground
process group, so every worker process printed its own KeyboardInterrupt
traceback (~35 lines each), or died and was restarted by its nanny, while the
client was already shutting the cluster down. Our workers move to a process
group of their own and leave signals to the client, which closes them.
"""

from __future__ import annotations

import logging
import os
from typing import Any


class _HeartbeatWithoutTraceback(logging.Filter):
    """Keeps a failed heartbeat's line and drops its 30-line traceback.

    While the cluster closes, a worker's heartbeat can meet the scheduler's
    closed comm (seen as `imgindex serve` stopped): Dask logs that at ERROR
    with the traceback of a closed stream, which says nothing the line does
    not.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Failed to communicate with scheduler"):
            record.exc_info = None
            record.exc_text = None
        return True


def dask_setup(worker: Any) -> None:
    if logging.getLogger("distributed").getEffectiveLevel() >= logging.WARNING:
        # Cancelling an interrupted build's tasks makes each worker warn about
        # each one ("Async instruction ... cancelled"): expected, not news.
        logging.getLogger("distributed.worker.state_machine").setLevel(logging.ERROR)
    logging.getLogger("distributed.worker").addFilter(_HeartbeatWithoutTraceback())
    try:
        os.setpgid(0, 0)
    except OSError:  # a session leader, or not permitted: keep the default
        pass
