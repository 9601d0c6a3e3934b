"""The ``imgindex`` command line: thin Click commands over the same functions
a notebook calls (:func:`imgindex.build`, ``imgindex.building``) and over
``pipeline/`` and ``cluster/``; one module per command, as distributed keeps
``distributed/cli/dask_scheduler.py`` and the others.

Nothing heavy is imported at module level: this package is also a
``dask_cli`` entry point, loaded by every ``dask scheduler`` / ``dask worker``
start.
"""

from imgindex.cli import (  # noqa: F401  (each registers its command)
    build,
    doctor,
    duplicates,
    reindex,
    search,
    serve,
    status,
)
from imgindex.cli.group import cli, main

__all__ = ["cli", "main"]
