"""Another user of the same machine, trying what imgindex started.

Run by the tests as root: ``intruder.py tcp://HOST:PORT`` (an open scheduler,
the control) probes the control once to load every module a probe uses (the
interpreter may live where ``nobody`` cannot read), becomes ``nobody`` (uid
65534) for good, reads the probes as one JSON line on stdin and prints what
each got as one JSON line. Starting before the target is known keeps the
imports out of the window where a build's cluster lives.

Probes: ``{"dask": ["HOST:PORT", ...], "http": [{"url", "headers"}],
"unix": [{"socket", "path", "headers"}]}``. A Dask probe tries a plain
``tcp://`` connection and a ``tls://`` one with credentials of its own (as
``Security.temporary()`` makes them), and reports "answered" only where the
listener answered a Dask identity request: the step before running code.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import sys

from distributed.comm import connect
from distributed.security import Security

NOBODY = 65534


def become_nobody() -> None:
    if os.getuid() == 0:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    assert os.getuid() == NOBODY, "the intruder must run as another user"


async def _identity(address: str, security: Security | None) -> str:
    kwargs = security.get_connection_args("client") if security else {}
    try:
        comm = await asyncio.wait_for(connect(address, timeout=3, **kwargs), 4)
    except Exception as e:
        return f"refused: {type(e).__name__}"
    try:
        await asyncio.wait_for(comm.write({"op": "identity", "reply": True}), 3)
        reply = await asyncio.wait_for(comm.read(), 3)
    except Exception as e:
        return f"refused: {type(e).__name__}"
    finally:
        comm.abort()
    if isinstance(reply, dict) and reply.get("type"):
        return f"answered: {reply['type']}"
    return "refused: not a Dask reply"


async def probe_dask(places: list[str]) -> dict[str, list[str]]:
    mine = Security.temporary()
    jobs = [
        asyncio.gather(_identity(f"tcp://{p}", None), _identity(f"tls://{p}", mine))
        for p in places
    ]
    results = await asyncio.gather(*jobs)
    return {p: list(r) for p, r in zip(places, results, strict=True)}


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str):
        super().__init__("localhost", timeout=10)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(self.socket_path)


def http_status(conn: http.client.HTTPConnection, path: str, headers: dict) -> str:
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        body = response.read(2000).decode("utf-8", "replace")
        return f"{response.status} {body}"
    except OSError as e:
        return f"refused: {type(e).__name__}"
    finally:
        conn.close()


def main() -> None:
    control = sys.argv[1].removeprefix("tcp://")
    assert asyncio.run(probe_dask([control]))[control][0].startswith("answered")
    become_nobody()
    probes = json.loads(sys.stdin.readline())
    out: dict = {"uid": os.getuid()}
    if probes.get("dask"):
        out["dask"] = asyncio.run(probe_dask(probes["dask"]))
    out["http"] = []
    for p in probes.get("http", []):
        host, _, rest = p["url"].removeprefix("http://").partition("/")
        name, _, port = host.rpartition(":")
        conn = http.client.HTTPConnection(name, int(port), timeout=10)
        out["http"].append(http_status(conn, "/" + rest, p.get("headers", {})))
    out["unix"] = [
        http_status(UnixConnection(p["socket"]), p["path"], p.get("headers", {}))
        for p in probes.get("unix", [])
    ]
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
