"""The build routes: the dataset folders, starting, following and cancelling builds."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from imgindex.service.errors import ApiError
from imgindex.service.handlers import ApiHandler, flag_argument

if TYPE_CHECKING:
    from imgindex.service.builds import Build


class Datasets(ApiHandler):
    route = "datasets"

    async def get(self) -> None:
        builds = self.service.builds
        found = await self.in_thread(builds.datasets)
        self.send_json(
            {"roots": [str(r) for r in builds.dataset_roots], "datasets": found}
        )


class BuildList(ApiHandler):
    route = "builds"

    def get(self) -> None:
        self.send_json({"builds": [b.to_json() for b in self.service.builds.list()]})

    async def post(self) -> None:
        body = self.json_request("the build request")
        datasets = body.get("datasets")
        if not isinstance(datasets, list) or not all(
            isinstance(d, str) for d in datasets
        ):
            raise ApiError(400, "'datasets' must be a list of folder names or paths")
        build = await self.start(datasets, body)
        self.send_json(build.to_json(), status=202)

    def json_request(self, what: str) -> dict[str, Any]:
        # JSON only: a form on another site can post text/plain to this
        # address without asking the browser first; JSON needs a preflight.
        if not self.request.headers.get("Content-Type", "").startswith(
            "application/json"
        ):
            raise ApiError(415, f"send {what} as application/json")
        return self.json_body()

    async def start(self, datasets: list[str], body: dict[str, Any]) -> Build:
        """Start a build of ``datasets`` with the flags the request ``body``
        gives (``rebuild``, ``moved``: as ``imgindex build`` takes them)."""
        rebuild, moved = (
            flag_argument(body.get(flag), flag) or False
            for flag in ("rebuild", "moved")
        )
        build = await self.in_thread(self.service.start_build, datasets, rebuild, moved)
        self.set_header("Location", f"/api/builds/{build.id}")
        return build


class LegacyBuild(BuildList):
    """``POST /api/build_index``: the Flask service's build request, kept for
    its clients: ``{"dataset_names": [...], "distributed": true}``."""

    route = "build_index"

    def get(self) -> None:
        raise ApiError(405, "POST the build request here")

    async def post(self) -> None:
        body = self.json_request("the build request")
        names = body.get("dataset_names")
        if not isinstance(names, list) or not all(isinstance(d, str) for d in names):
            raise ApiError(400, "'dataset_names' must be a list of dataset names")
        # Every build runs on the Dask cluster: the old service's choice of a
        # distributed build or one in its own process has no meaning here.
        flag_argument(body.get("distributed"), "distributed")
        build = await self.start(names, body)
        # Its clients read "build_id"; the rest is what /api/builds/ID answers.
        self.send_json(build.to_json() | {"build_id": build.id}, status=202)


class BuildOne(ApiHandler):
    route = "build"

    def get(self, build_id: str) -> None:
        self.send_json(self.service.builds.get(build_id).to_json())

    async def delete(self, build_id: str) -> None:
        build = self.service.builds.get(build_id)
        if build.running:
            await self.in_thread(self.service.builds.cancel, build_id)
        self.send_json(build.to_json(), status=202)
