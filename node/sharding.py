"""Which training images a scenario uses, which satellite holds each, and what they are called.

The sensor hosts, the ground station (ingest checks, the encoder stage) and the simulator
must agree on these exactly, so they live here, apart from any one of them.
"""

from __future__ import annotations

import numpy as np


def train_subset(n_train: int, subset: int | None, seed: int) -> np.ndarray:
    """The training indices a scenario uses: the first `subset` of a seeded permutation."""
    order = np.random.default_rng(seed).permutation(n_train)
    return np.sort(order[: subset if subset is not None else n_train])


def shard(indices: np.ndarray, sat_index: int, n_sats: int) -> np.ndarray:
    """Satellite `sat_index`'s images of `indices`: every n_sats-th, so shards differ by at
    most one image."""
    return indices[sat_index::n_sats]


def owners(n_train: int, subset: int | None, seed: int, n_sats: int) -> np.ndarray:
    """owner[index]: the position of the satellite holding training image `index`, or -1
    for an image no satellite holds."""
    owner = np.full(n_train, -1, dtype=np.int32)
    indices = train_subset(n_train, subset, seed)
    for k in range(n_sats):
        owner[shard(indices, k, n_sats)] = k
    return owner


def sample_id(dataset: str, split: str, index: int) -> str:
    """A sample's name, the same on the satellite and at the ground station."""
    return f"{dataset}/{split}/{index}"
