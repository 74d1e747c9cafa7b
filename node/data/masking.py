"""Masks on the encoder's token grid.

A mask is the sorted array of *visible* token indices (row-major on the g x g grid), uint16,
because that is exactly what a patch payload carries. Every mask is a pure function of
(seed, sample_id), so a sensor in orbit and the ground station evaluating the test set draw
the same mask without talking to each other.

Kinds:
- `none`: every token.
- `fixed`: one mask per image, a `ratio` of its tokens dropped.
- `random`: a new mask every epoch. The satellite downlinks `copies` (the scenario's epochs)
  freshly masked copies of each image; copy c has sample id `<id>#c` and its own mask, and
  epoch c + 1 trains on copy c.
- `clouds`: natural masking. Each capture gets a seeded procedural cloud field at its native
  resolution (sparsat.node.data.clouds); cloudy pixels are white in the image, a token whose tile
  is more
  than `max_cloud` cloudy is dropped, then `ratio` of the clear tokens is dropped on purpose.
  A scene with no usable token is not sent at all. Which tokens are unusable: the truth
  (`detector: oracle`), or what an on-board threshold detector fitted on the ground calls
  cloudy (`detector: threshold`, sparsat.node.data.detector), which can be wrong.

Which tokens survive a ratio (`choice`):
- `random`: a seeded random draw, a pure function of (seed, sample_id).
- `content`: the num_visible(L, r) tokens (fixed: of all; clouds: of the usable ones) whose
  tile has the highest on-board score, the variance of its pixel values over its pixels and
  channels (tile_scores); ties go by a seeded order of the candidates (stable_seed(seed,
  "content", sample_id)), so the mask is a pure function of (image, seed, sample_id), and no
  longer of (seed, sample_id) alone: the image must be at hand (capture()). Scoring costs
  SCORE_FLOPS_PER_VALUE FLOPs per value of the tiles scored and SCORE_FLOPS_PER_TILE per
  tile (Capture.onboard_flops); with kind `random` (a fresh mask each copy) or `none` it has
  no effect and is refused.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np

from sparsat.node.data.clouds import PRESETS, CloudSpec, scene_clouds, token_cover
from sparsat.node.data.detector import ThresholdDetector, detector_flops
from sparsat.node.data.tiles import tile_totals, tile_value_counts

MaskKind = Literal["none", "fixed", "random", "clouds"]
KINDS: tuple[str, ...] = get_args(MaskKind)
MaskChoice = Literal["random", "content"]
CHOICES: tuple[str, ...] = get_args(MaskChoice)
MaskDetector = Literal["oracle", "threshold"]
DETECTORS: tuple[str, ...] = get_args(MaskDetector)
# tile_scores' work: a value's add into its tile's sum, and its square's multiply and add into
# the sum of squares; a tile's mean, mean square and their difference (2 divides, 1 multiply,
# 1 subtract). Sorting the scores is comparisons, not counted.
SCORE_FLOPS_PER_VALUE = 3
SCORE_FLOPS_PER_TILE = 4
CLOUD_VALUE = 255  # cloud tops are bright: what the sensor records under a cloud
COPY_SEP = "#"


@dataclass(frozen=True)
class MaskSpec:
    kind: MaskKind = "fixed"
    ratio: float = 0.5  # fraction of tokens dropped, in [0, 1) (clouds: of the clear ones)
    seed: int = 0
    copies: int = 1  # random: copies of each image downlinked, one per epoch
    clouds: CloudSpec = field(default_factory=lambda: PRESETS["global"])
    max_cloud: float = 0.25  # clouds: a token more cloudy than this is dropped
    choice: MaskChoice = "random"  # which tokens survive the ratio: seeded draw | top score
    # clouds: which tokens are unusable: the true cloud field (oracle), or an on-board
    # threshold detector (sparsat.node.data.detector) fitted on the ground, its parameters
    # as hex (ThresholdDetector.to_hex)
    detector: MaskDetector = "oracle"
    detector_params: str = ""

    def __post_init__(self) -> None:
        # from JSON (sparsat.node.data.config.SensorConfig.from_json)
        if isinstance(self.clouds, dict):
            object.__setattr__(self, "clouds", CloudSpec(**self.clouds))
        if self.kind not in KINDS:
            raise ValueError(f"mask kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"mask ratio must be in [0, 1), got {self.ratio}")
        if self.copies < 1 or (self.copies > 1 and self.kind != "random"):
            raise ValueError(f"copies must be >= 1, and above 1 only for random masks "
                             f"(kind {self.kind!r}, copies {self.copies})")
        if not 0.0 <= self.max_cloud < 1.0:
            raise ValueError(f"max_cloud must be in [0, 1), got {self.max_cloud}")
        if self.choice not in CHOICES:
            raise ValueError(f"mask choice must be one of {', '.join(CHOICES)}, "
                             f"got {self.choice!r}")
        if self.detector not in DETECTORS:
            raise ValueError(f"mask detector must be one of {', '.join(DETECTORS)}, "
                             f"got {self.detector!r}")
        if self.detector != "oracle" and self.kind != "clouds":
            raise ValueError(f"a cloud detector needs kind clouds, got {self.kind!r}")
        if self.detector == "oracle" and self.detector_params:
            raise ValueError("detector parameters need detector threshold")
        if self.detector == "threshold":
            ThresholdDetector.from_hex(self.detector_params)  # bounded; ValueError if bad
        if self.choice == "content" and self.kind in ("none", "random"):
            raise ValueError(f"choice content has no effect with kind {self.kind} (kinds "
                             "fixed and clouds)")


@dataclass(frozen=True)
class Capture:
    """What a sensor makes of one image: the image as recorded (clouds drawn in), the tokens
    it sends, and the scene's cloud fraction."""

    image: np.ndarray  # (H, W, C) uint8
    visible: np.ndarray  # (L,) uint16, sorted; empty: nothing usable, the scene is not sent
    cover: float = 0.0
    # on-board work of choosing the tokens (content choice: scoring tiles), FLOPs; 0 for a
    # seeded random draw and the cloud oracle (the simulation's truth, not on-board work)
    onboard_flops: int = 0  # + the threshold detector's, when it decides (clouds)
    # a threshold detector's token errors against the true cloud field: called cloudy though
    # usable (cover <= max_cloud), called clear though not; the simulation's measurement, not
    # known on board
    false_positives: int = 0
    false_negatives: int = 0
    cloudy_tokens: int = 0  # clouds: tokens unusable in truth (cover > max_cloud)


def num_visible(num_tokens: int, ratio: float) -> int:
    # MAE's convention (len_keep = int(L * (1 - r))), but never zero: an image with no visible
    # token carries no information and the encoder cannot run on it.
    return max(1, int(num_tokens * (1.0 - ratio)))


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from its parts, identical on every machine and Python version."""
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def copy_id(sample_id: str, copy: int | None) -> str:
    """The id of copy `copy` of an image (random masks); None: the image's own id."""
    return sample_id if copy is None else f"{sample_id}{COPY_SEP}{copy}"


def split_copy(sample_id: str) -> tuple[str, int | None]:
    """(image id, copy) from a sample id; ValueError when the copy is not a number."""
    base, sep, copy = sample_id.rpartition(COPY_SEP)
    if not sep:
        return sample_id, None
    if not copy.isdigit() or len(copy) > 6:
        raise ValueError(f"sample id {sample_id!r}: copy {copy!r} is not a number")
    return base, int(copy)


def _keep(candidates: np.ndarray, ratio: float, rng: np.random.Generator) -> np.ndarray:
    keep = num_visible(len(candidates), ratio)
    if keep >= len(candidates):
        return candidates.astype(np.uint16)
    return np.sort(rng.permutation(candidates)[:keep]).astype(np.uint16)


def fixed_mask(num_tokens: int, ratio: float, seed: int, sample_id: str) -> np.ndarray:
    return _keep(np.arange(num_tokens), ratio, np.random.default_rng(stable_seed(seed, sample_id)))


def tile_scores(image: np.ndarray, grid: int) -> np.ndarray:
    """(grid*grid,) float64: each token's tile's variance of its pixel values (over its
    pixels and channels), row-major on the codec's tiling. Sums are exact integers, so the
    scores are the same on every machine."""
    height, width = image.shape[:2]
    if not 1 <= grid <= min(height, width):
        raise ValueError(f"grid {grid} does not fit a {height}x{width} image")
    x = image.reshape(height, width, -1).astype(np.int64)  # (H, W, C)
    n = tile_value_counts(height, width, x.shape[2], grid)
    mean = tile_totals(x, grid) / n
    return tile_totals(x * x, grid) / n - mean * mean  # type: ignore[no-any-return]


def score_flops(image: np.ndarray, grid: int, tokens: np.ndarray) -> int:
    """FLOPs of scoring the tiles of `tokens` on board (SCORE_FLOPS_PER_VALUE a value,
    SCORE_FLOPS_PER_TILE a tile)."""
    height, width = image.shape[:2]
    channels = image.size // (height * width)
    values = int(tile_value_counts(height, width, channels, grid)[tokens].sum())
    return SCORE_FLOPS_PER_VALUE * values + SCORE_FLOPS_PER_TILE * len(tokens)


def content_keep(image: np.ndarray, grid: int, candidates: np.ndarray, ratio: float,
                 seed: int, sample_id: str) -> tuple[np.ndarray, int]:
    """(kept tokens (sorted, uint16), on-board FLOPs): the num_visible(len, ratio) candidates
    of highest tile score, ties by a seeded order of the candidates."""
    keep = num_visible(len(candidates), ratio)
    if keep >= len(candidates):  # every candidate survives: nothing to score
        return candidates.astype(np.uint16), 0
    score = tile_scores(image, grid)[candidates]
    tie = np.random.default_rng(stable_seed(seed, "content", sample_id)).permutation(
        len(candidates))
    order = np.lexsort((tie, -score))  # by score, highest first; then the seeded order
    kept = np.sort(candidates[order[:keep]]).astype(np.uint16)
    return kept, score_flops(image, grid, candidates)


def visible_indices(spec: MaskSpec, num_tokens: int, sample_id: str) -> np.ndarray:
    """The visible token indices of one image under an intentional mask (sorted, uint16).
    A random mask is drawn from the sample id, which names the copy: each copy its own."""
    if num_tokens > np.iinfo(np.uint16).max + 1:
        raise ValueError(f"{num_tokens} tokens do not fit uint16 indices")
    if spec.kind == "clouds":
        raise ValueError("cloud masks depend on the image: use capture()")
    if spec.choice == "content" and spec.ratio > 0.0:
        raise ValueError("content-chosen masks depend on the image: use capture()")
    if spec.kind == "none" or spec.ratio == 0.0:
        return np.arange(num_tokens, dtype=np.uint16)
    if spec.kind == "fixed":
        return fixed_mask(num_tokens, spec.ratio, spec.seed, sample_id)
    return fixed_mask(num_tokens, spec.ratio, stable_seed(spec.seed, "random"), sample_id)


def capture(spec: MaskSpec, image: np.ndarray, grid: int, sample_id: str) -> Capture:
    """One image as the sensor sends it under `spec`: (H, W, C) uint8 in, Capture out."""
    content = spec.choice == "content" and spec.ratio > 0.0
    if spec.kind != "clouds" and not content:
        return Capture(image, visible_indices(spec, grid * grid, sample_id))
    if spec.kind != "clouds":
        kept, flops = content_keep(image, grid, np.arange(grid * grid), spec.ratio, spec.seed,
                                   sample_id)
        return Capture(image, kept, onboard_flops=flops)
    image, clouds, cover = cloudy_scene(spec, image, sample_id)
    truth = token_cover(clouds, grid) > spec.max_cloud  # (L,) unusable in truth
    flops, errors = 0, (0, 0)
    if spec.detector == "threshold":  # the satellite's own decision, which can be wrong
        called = detector_of(spec).cloudy(image, grid)
        flops = detector_flops(image, grid)
        errors = (int((called & ~truth).sum()), int((truth & ~called).sum()))
    else:
        called = truth
    usable = np.flatnonzero(~called)
    n_cloudy = int(np.count_nonzero(truth))
    if len(usable) == 0 or spec.ratio == 0.0:
        return Capture(image, usable.astype(np.uint16), cover, flops, *errors, n_cloudy)
    if content:  # scored on the image as recorded, clouds drawn in
        kept, score = content_keep(image, grid, usable, spec.ratio, spec.seed, sample_id)
        return Capture(image, kept, cover, flops + score, *errors, n_cloudy)
    rng = np.random.default_rng(stable_seed(spec.seed, sample_id))
    return Capture(image, _keep(usable, spec.ratio, rng), cover, flops, *errors, n_cloudy)


def cloudy_scene(spec: MaskSpec, image: np.ndarray, sample_id: str
                 ) -> tuple[np.ndarray, np.ndarray, float]:
    """(image as recorded, clouds drawn in; cloud mask (H, W) bool; cover) of one capture.
    The scene's clouds follow the sample id: a revisit (a copy, which only captures over
    time make for cloud masks) is another scene with its own clouds."""
    height, width = image.shape[:2]
    clouds, cover = scene_clouds(spec.clouds, height, width,
                                 stable_seed(spec.seed, "clouds", sample_id))
    if cover > 0:
        image = image.copy()
        image[clouds] = CLOUD_VALUE
    return image, clouds, cover


@functools.cache
def _detector(params: str) -> ThresholdDetector:
    return ThresholdDetector.from_hex(params)


def detector_of(spec: MaskSpec) -> ThresholdDetector:
    """The threshold detector a mask's parameters describe."""
    return _detector(spec.detector_params)
