"""The LocalCluster's dashboard, loaded when someone first opens it.

Importing distributed's Bokeh dashboard and setting up its pages costs about
0.35 s of the client's CPU, on the way to a build's first task (measured
here: a LocalCluster starts in 0.34 s without it, 0.68 s with it), and most
small builds end before anyone opens the link. So the scheduler starts with
its HTTP server listening (the link printed works, as do /health and
/metrics) but without the dashboard, and the first request that none of the
server's routes answers loads it and is sent back to the same address, now
answered by the dashboard.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from typing import Any

from tornado import web

logger = logging.getLogger(__name__)

DASHBOARD_MODULE = "distributed.dashboard.scheduler"


class LazyDashboard:
    """Loads the dashboard of ``scheduler`` (an in-process Scheduler whose
    HTTP server runs without one) on the first request it cannot answer."""

    def __init__(self, scheduler: Any, prefix: str = "/"):
        self.scheduler = scheduler
        self.prefix = prefix
        self.loaded = False
        self.problem = ""  # why it cannot be loaded (bokeh missing, ...)
        self._lock: asyncio.Lock | None = None
        self.app = web.Application([(r"/.*", _LoadAndRedirect, {"lazy": self})])

    def install(self) -> None:
        """Answer before any other part of the server's fallbacks (the
        dashboard's own pages are added after it, and it steps aside once
        they are)."""
        self.scheduler.http_application.applications.insert(0, self.app)

    async def load(self) -> None:
        """Import and connect the dashboard once (later calls wait for the first)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self.loaded or self.problem:
                return
            try:
                # In a thread: the scheduler's event loop keeps serving meanwhile.
                module = await asyncio.to_thread(
                    importlib.import_module, DASHBOARD_MODULE
                )
            except ImportError as e:
                self.problem = f"the dashboard cannot be loaded: {e}"
                logger.warning("%s", self.problem)
                return
            application = self.scheduler.http_application
            module.connect(
                application, self.scheduler.http_server, self.scheduler, self.prefix
            )
            application.applications.remove(self.app)
            self.loaded = True
            logger.info("dashboard loaded on its first request")


class _LoadAndRedirect(web.RequestHandler):
    def initialize(self, lazy: LazyDashboard) -> None:
        self.lazy = lazy

    async def get(self) -> None:
        await self.lazy.load()
        if self.lazy.problem:
            self.set_status(503)
            self.finish(self.lazy.problem + "\n")
            return
        # The same address again: the dashboard answers it now (or, for a
        # page it does not have either, a 404 as before).
        self.redirect(self.request.uri)
