"""imgindex: FAISS similarity indexes over image collections, embedded on Dask.

The Python API::

    import imgindex

    report = imgindex.build("photos/", "indexes/", client=client)
    idx = imgindex.open("indexes/photos")
    idx.search("query.jpg", k=5)        # a pandas DataFrame
    idx.vectors()                       # a Dask Array, one chunk per shard
    idx.duplicates()                    # groups of copies, with thumbnails

Importing it is light (no torch, FAISS, distributed or pandas): the command
line, a ``dask_cli`` entry point, imports this package on every ``dask``
command.
"""

__version__ = "0.5.0"

from imgindex.api import BuildError, BuildReport, DatasetFailure, build  # noqa: E402
from imgindex.index import Index, open  # noqa: E402
from imgindex.pipeline.errors import ImgindexError  # noqa: E402

__all__ = [
    "BuildError",
    "BuildReport",
    "DatasetFailure",
    "ImgindexError",
    "Index",
    "__version__",
    "build",
    "open",
]
