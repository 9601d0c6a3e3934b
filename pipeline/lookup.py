"""Find ids in a sorted array: the one lookup copies, duplicates and assemble share."""

from __future__ import annotations

import numpy as np


def rows_in_sorted(keys: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Row of each ``wanted`` value in the ascending ``keys``; -1 where absent."""
    wanted = np.asarray(wanted)
    if not len(keys):
        return np.full(len(wanted), -1, np.int64)
    at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
    return np.where(keys[at] == wanted, at, -1)
