"""Find ids in a sorted array: the one lookup copies, duplicates, assemble, the
diff and the touched files share."""

from __future__ import annotations

import numpy as np


def rows_in_sorted(keys: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Row of each ``wanted`` value in the ascending ``keys``; -1 where absent."""
    wanted = np.asarray(wanted)
    if not len(keys):
        return np.full(len(wanted), -1, np.int64)
    at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
    return np.where(keys[at] == wanted, at, -1)


def repeated(ordered: np.ndarray) -> list[int]:
    """The values found more than once in the sorted array ``ordered``."""
    return np.unique(ordered[1:][ordered[1:] == ordered[:-1]]).tolist()
