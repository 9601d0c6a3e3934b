"""Obtaining a Dask cluster for imgindex: remote scheduler or LocalCluster."""

import imgindex.pipeline as _pipeline  # noqa: F401  (registers the imgindex config defaults)
