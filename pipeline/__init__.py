"""The data path: discover, decode, embed, index, store, search."""

from imgindex.pipeline import config as _config  # noqa: F401  (registers imgindex defaults)
