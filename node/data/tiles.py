"""The token grid on the image: where each of a g x g grid's tiles starts and ends, in pixels.

Token i of a g x g grid maps to one native tile with edges floor(k * H / g + 0.5), so tiles
partition the image exactly even when g does not divide H. The payload codec
(sparsat.node.wire.codec), the cloud cover of a token (sparsat.node.data.clouds) and the
ground station's setup checks all cut images along these edges.
"""

from __future__ import annotations

import numpy as np


def tile_edges(size: int, grid: int) -> np.ndarray:
    # Round half up, floor(x + 0.5): np.round and Python's round() round half to even, which
    # is harder to reproduce exactly in other languages.
    return np.floor(np.arange(grid + 1) * size / grid + 0.5).astype(np.int64)


def tile_totals(values: np.ndarray, grid: int) -> np.ndarray:
    """(g*g,) row-major: the sum of `values` (H, W, C) over each token's tile and its
    channels (exact in integers). Tile choice and the cloud detector score tiles with it."""
    height, width = values.shape[:2]
    ys, xs = tile_edges(height, grid), tile_edges(width, grid)
    rows = np.add.reduceat(values.sum(axis=2), ys[:-1], axis=0)  # (g, W)
    return np.add.reduceat(rows, xs[:-1], axis=1).reshape(-1)


def tile_value_counts(height: int, width: int, channels: int, grid: int) -> np.ndarray:
    """(g*g,) int64: the values (pixels x channels) in each token's tile."""
    return (np.outer(np.diff(tile_edges(height, grid)), np.diff(tile_edges(width, grid)))
            * channels).reshape(-1)
