"""An order of candidate pairs in which consecutive pairs share their images.

The geometric check of `imgindex duplicates` reads each image of a pair and
finds its features (8-12 ms on this project's VM, most of an unrelated
pair's cost); a task of consecutive pairs keeps the features of the last
images it read. Pairs sorted by path put an image's pairs together where it
comes first, but its neighbours' other pairs anywhere: the 36,496 candidate
pairs of 2,900 generated photos read 34,417 images in tasks of 500 pairs
keeping 256 images. Breadth first over the graph of pairs, each pair placed
when its later image is reached, keeps a neighbourhood's pairs together:
22,783 reads in the same tasks, 0.84 x the time (bench/pair_order.py).
"""

from __future__ import annotations

import numpy as np


def local_order(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The indices of the pairs ``(a[i], b[i])`` (image ids) in that order.

    Deterministic for the same pairs in the same order; each connected part
    of the graph is taken whole, the part holding the smallest id first.
    """
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    if not len(a):
        return np.zeros(0, np.int64)
    ids, dense = np.unique(np.concatenate([a, b]), return_inverse=True)
    dense = dense.astype(np.int32)  # half the memory of a million images' pairs
    x, y = dense[: len(a)], dense[len(a) :]
    rank = _breadth_first(x, y, len(ids))
    later, earlier = np.maximum(rank[x], rank[y]), np.minimum(rank[x], rank[y])
    return np.lexsort((earlier, later))


def _breadth_first(x: np.ndarray, y: np.ndarray, n: int) -> np.ndarray:
    """Each of ``n`` nodes' place in a breadth-first walk of the edges
    ``(x, y)``: level by level, each level's nodes in the order they were
    first reached (as a queue would visit them)."""
    ends = np.concatenate([x, y])
    others = np.concatenate([y, x])
    neighbours = others[np.argsort(ends, kind="stable")]
    starts = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(ends, minlength=n), out=starts[1:])
    del ends, others
    rank = np.full(n, -1, np.int64)
    placed = 0
    for root in range(n):  # every node has an edge: no node is left alone
        if rank[root] >= 0:
            continue
        rank[root] = placed
        placed += 1
        level = np.array([root])
        while len(level):
            first, count = starts[level], starts[level + 1] - starts[level]
            at = np.repeat(first - np.cumsum(count) + count, count) + np.arange(
                count.sum()
            )
            reached = neighbours[at]
            reached = reached[rank[reached] < 0]
            _, where = np.unique(reached, return_index=True)
            level = reached[np.sort(where)]
            rank[level] = np.arange(placed, placed + len(level))
            placed += len(level)
    return rank
