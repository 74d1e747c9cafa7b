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
  A scene with no usable token is not sent at all.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np

from sparsat.node.data.clouds import PRESETS, CloudSpec, scene_clouds, token_cover

MaskKind = Literal["none", "fixed", "random", "clouds"]
KINDS: tuple[str, ...] = get_args(MaskKind)
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


@dataclass(frozen=True)
class Capture:
    """What a sensor makes of one image: the image as recorded (clouds drawn in), the tokens
    it sends, and the scene's cloud fraction."""

    image: np.ndarray  # (H, W, C) uint8
    visible: np.ndarray  # (L,) uint16, sorted; empty: nothing usable, the scene is not sent
    cover: float = 0.0


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


def visible_indices(spec: MaskSpec, num_tokens: int, sample_id: str) -> np.ndarray:
    """The visible token indices of one image under an intentional mask (sorted, uint16).
    A random mask is drawn from the sample id, which names the copy: each copy its own."""
    if num_tokens > np.iinfo(np.uint16).max + 1:
        raise ValueError(f"{num_tokens} tokens do not fit uint16 indices")
    if spec.kind == "clouds":
        raise ValueError("cloud masks depend on the image: use capture()")
    if spec.kind == "none" or spec.ratio == 0.0:
        return np.arange(num_tokens, dtype=np.uint16)
    if spec.kind == "fixed":
        return fixed_mask(num_tokens, spec.ratio, spec.seed, sample_id)
    return fixed_mask(num_tokens, spec.ratio, stable_seed(spec.seed, "random"), sample_id)


def capture(spec: MaskSpec, image: np.ndarray, grid: int, sample_id: str) -> Capture:
    """One image as the sensor sends it under `spec`: (H, W, C) uint8 in, Capture out."""
    if spec.kind != "clouds":
        return Capture(image, visible_indices(spec, grid * grid, sample_id))
    height, width = image.shape[:2]
    # the scene's clouds and kept tokens follow the image; a revisit (a copy, which only
    # captures over time make for cloud masks) is another scene with its own clouds
    base = sample_id
    clouds, cover = scene_clouds(spec.clouds, height, width, stable_seed(spec.seed, "clouds", base))
    if cover > 0:
        image = image.copy()
        image[clouds] = CLOUD_VALUE
    usable = np.flatnonzero(token_cover(clouds, grid) <= spec.max_cloud)
    if len(usable) == 0:
        return Capture(image, np.empty(0, dtype=np.uint16), cover)
    if spec.ratio == 0.0:
        return Capture(image, usable.astype(np.uint16), cover)
    rng = np.random.default_rng(stable_seed(spec.seed, base))
    return Capture(image, _keep(usable, spec.ratio, rng), cover)
