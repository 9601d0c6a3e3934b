"""Imported by the forkserver alone, the last of its preloads: the server
leaves without tearing its modules down.

It exits when the client that started it does, and until it has, the
client's stdout and stderr (which it and every worker inherit) stay open: a
caller reading them (``$(imgindex build --json)``, ``subprocess.run``) waited
0.13 s more for the teardown of the server's ONNX Runtime, FAISS, NumPy and
distributed. The server writes nothing of its own, so there is nothing to
flush. Its workers never run this: they leave through ``os._exit`` in the
server's fork path, and the pid is checked all the same.
"""

import atexit
import os

_SERVER = os.getpid()


@atexit.register
def _leave_at_once() -> None:
    if os.getpid() == _SERVER:
        os._exit(0)
