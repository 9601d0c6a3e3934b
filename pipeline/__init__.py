"""imgindex: FAISS similarity indexes over image collections, embedded on Dask."""

__version__ = "0.4.0"

from pipeline import config as _config  # noqa: E402,F401  (registers imgindex defaults)
