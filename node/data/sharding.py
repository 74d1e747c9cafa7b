"""Which training images a scenario uses, which satellite holds each, and what they are called.

The ground station decides (ingest checks, the encoder stage, the lists it tells each sensor
host at registration) and the simulator counts queues from the same functions, so they live
here, apart from any one of them. Sensor hosts do not pick their images here: they send what the
ground station told them (sample_id, a mask's seed material, is shared).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sparsat.node.data.config import SensorConfig


def train_subset(n_train: int, subset: int | None, seed: int) -> np.ndarray:
    """The training indices a scenario uses: the first `subset` of a seeded permutation."""
    order = np.random.default_rng(seed).permutation(n_train)
    return np.sort(order[: subset if subset is not None else n_train])


def validation_indices(n_train: int, subset: int, validation: int, seed: int) -> np.ndarray:
    """The validation split's training indices: the `validation` images of the seeded
    permutation right after the `subset` train_subset takes (no satellite holds them);
    ValueError when the split has not that many left."""
    if subset + validation > n_train:
        raise ValueError(f"dataset.validation_subset {validation} with train_subset {subset}: "
                         f"the split has {n_train} images, {n_train - subset} left for it")
    order = np.random.default_rng(seed).permutation(n_train)
    return np.sort(order[subset : subset + validation])


def shard(indices: np.ndarray, sat_index: int, n_sats: int) -> np.ndarray:
    """Satellite `sat_index`'s images of `indices`: every n_sats-th, so shards differ by at
    most one image."""
    return indices[sat_index::n_sats]


def assign(n_train: int, subset: int | None, seed: int, satellites: Sequence[str],
           labels: np.ndarray | None = None, alpha: float | None = None
           ) -> dict[str, np.ndarray]:
    """Each satellite's training indices, in the order it captures and sends them (strictly
    increasing). Only the ground station calls this: it tells every sensor host its
    satellites' lists when the host registers (RegisterReply.sensor), since numpy's
    permutation cannot be reproduced in another language. IID (every n-th image of the
    subset) unless `alpha` is given: then `dirichlet` placement with the training split's
    `labels`."""
    indices = train_subset(n_train, subset, seed)
    if alpha is None:
        return {s: shard(indices, k, len(satellites)) for k, s in enumerate(satellites)}
    if labels is None or len(labels) != n_train:
        raise ValueError("dirichlet placement needs the training split's labels")
    return dirichlet(indices, labels[indices], alpha, seed, satellites)


def dirichlet(indices: np.ndarray, labels: np.ndarray, alpha: float, seed: int,
              satellites: Sequence[str]) -> dict[str, np.ndarray]:
    """Label skew, as satellites over different regions see different classes: for each
    class, its images of `indices` (in a seeded order) are split among the satellites in
    proportions drawn from Dirichlet(alpha, ..., alpha) (seeded per class); small alpha:
    each satellite sees few classes, large alpha: close to IID. Every image goes to exactly
    one satellite; a satellite may get none."""
    rng = np.random.default_rng([seed, 0x5D1C])
    held: list[list[np.ndarray]] = [[] for _ in satellites]
    for c in np.unique(labels):
        members = rng.permutation(indices[labels == c])
        share = rng.dirichlet(np.full(len(satellites), alpha))
        cuts = np.round(np.cumsum(share)[:-1] * len(members)).astype(np.int64)
        for k, part in enumerate(np.split(members, cuts)):
            held[k].append(part)
    return {s: np.sort(np.concatenate(parts)).astype(np.int64) if parts else
            np.empty(0, np.int64) for s, parts in zip(satellites, held, strict=True)}


def owners(n_train: int, images: Sequence[np.ndarray]) -> np.ndarray:
    """owner[index]: the position in `images` of the satellite holding training image
    `index`, or -1 for an image no satellite holds."""
    owner = np.full(n_train, -1, dtype=np.int32)
    for k, held in enumerate(images):
        owner[held] = k
    return owner


def sample_id(dataset: str, split: str, index: int) -> str:
    """A sample's name, the same on the satellite and at the ground station."""
    return f"{dataset}/{split}/{index}"


def satellite_images(cfg: SensorConfig) -> dict[str, np.ndarray]:
    """Each satellite's training indices under `cfg` (its placement included): what the
    ground station tells the sensor hosts, and what mission control counts from (it needs
    the training split: its size, and its labels for a Dirichlet placement)."""
    from sparsat.node.data.datasets import split_labels, split_size

    alpha = cfg.placement_alpha
    labels = split_labels(cfg.dataset, "train") if alpha is not None else None
    return assign(split_size(cfg.dataset, "train"), cfg.train_subset, cfg.train_indices_seed,
                  cfg.satellites, labels, alpha)
