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
