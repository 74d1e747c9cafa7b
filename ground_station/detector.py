"""Fitting the on-board cloud detector on the ground (sparsat.node.data.detector).

The threshold rule's four numbers are chosen by an exhaustive search of a small grid
(LEVELS x SHARES x MIN_MEANS x MAX_STDS, 4,896 rules) that minimises its token errors (false
positives + false negatives) against the true cloud field: a token is truly cloudy when its
tile's cloud cover is above max_cloud, as the oracle decides. The fit images are training
images no satellite holds (the seeded permutation's images after the satellites' subset and
the validation split), each imaged through its own procedural clouds (seeded by its sample
id, as a capture is), so the fit is a pure function of the scenario. Ties go to the first
rule in grid order, whose values start with the loosest conditions.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from sparsat.node.data.clouds import token_cover
from sparsat.node.data.datasets import ImageDataset
from sparsat.node.data.detector import (
    ThresholdDetector,
    TileFeatures,
    decide_on,
    detector_flops,
    tile_features,
)
from sparsat.node.data.masking import MaskSpec, cloudy_scene
from sparsat.node.data.sharding import sample_id

LEVELS = (255, 250, 240, 224, 192, 160)
SHARES = tuple(range(17))  # share16: cloudy above k/16 of the values bright
MIN_MEANS = (0, 32, 64, 96, 128, 160, 192, 224)
MAX_STDS = (255, 96, 64, 48, 32, 16)


@dataclass(frozen=True)
class DetectorFit:
    detector: ThresholdDetector
    images: int
    tokens: int
    false_positives: int  # on the fit images
    false_negatives: int
    wall_s: float
    flops_per_image: int  # on board, on the fit images (the mean where sizes differ)


def _concat(parts: list[TileFeatures]) -> TileFeatures:
    return TileFeatures(*(np.concatenate([getattr(p, k) for p in parts])
                          for k in ("values", "bright", "mean", "std")))


def fit_threshold(scenes: Iterable[tuple[np.ndarray, np.ndarray]], grid: int) -> DetectorFit:
    """The rule of fewest token errors on `scenes`: (image as recorded (H, W, C) uint8,
    truth (grid*grid,) bool: the token is cloudy) each."""
    t0 = time.perf_counter()
    scenes = list(scenes)
    if not scenes:
        raise ValueError("a detector needs at least one fit image")
    truth = np.concatenate([t for _, t in scenes])  # (N,) over every fit token
    best: tuple[int, int, ThresholdDetector] | None = None
    for level in LEVELS:
        f = _concat([tile_features(image, grid, level) for image, _ in scenes])
        for share in SHARES:
            for min_mean in MIN_MEANS:
                for max_std in MAX_STDS:
                    called = decide_on(f, share, min_mean, max_std)
                    fp = int(np.count_nonzero(called & ~truth))
                    fn = int(np.count_nonzero(truth & ~called))
                    if best is None or fp + fn < best[0] + best[1]:
                        best = (fp, fn, ThresholdDetector(level, share, min_mean, max_std))
    assert best is not None
    flops = round(np.mean([detector_flops(image, grid) for image, _ in scenes]))
    return DetectorFit(best[2], len(scenes), len(truth), best[0], best[1],
                       time.perf_counter() - t0, int(flops))


def fit_detector(dataset: ImageDataset, indices: np.ndarray, mask: MaskSpec, grid: int,
                 name: str) -> DetectorFit:
    """Fit on the training images `indices` (none a satellite holds), each through its own
    clouds under `mask`'s climatology, against the truth at `mask.max_cloud`."""
    if mask.kind != "clouds":
        raise ValueError("a cloud detector is fitted for kind clouds")
    scenes = []
    for i in indices.tolist():
        image, clouds, _ = cloudy_scene(mask, dataset.image(int(i)),
                                        sample_id(name, "train", int(i)))
        scenes.append((image, token_cover(clouds, grid) > mask.max_cloud))
    return fit_threshold(scenes, grid)
