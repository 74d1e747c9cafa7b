"""Masks on the encoder's token grid.

A mask is the sorted array of *visible* token indices (row-major on the g x g grid), uint16,
because that is exactly what a patch payload carries. `fixed` masks are a pure function of
(seed, sample_id), so a sensor in orbit and the ground station evaluating the test set draw
the same mask without talking to each other.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal

import numpy as np

MaskKind = Literal["none", "fixed", "random"]


@dataclass(frozen=True)
class MaskSpec:
    kind: MaskKind = "fixed"
    ratio: float = 0.5  # fraction of tokens dropped, in [0, 1)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("none", "fixed", "random"):
            raise ValueError(f"mask kind must be none, fixed or random, got {self.kind!r}")
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"mask ratio must be in [0, 1), got {self.ratio}")


def num_visible(num_tokens: int, ratio: float) -> int:
    # MAE's convention (len_keep = int(L * (1 - r))), but never zero: an image with no visible
    # token carries no information and the encoder cannot run on it.
    return max(1, int(num_tokens * (1.0 - ratio)))


def stable_seed(*parts: object) -> int:
    """A 64-bit seed from its parts, identical on every machine and Python version."""
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def _draw(num_tokens: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    keep = num_visible(num_tokens, ratio)
    if keep == num_tokens:
        return np.arange(num_tokens, dtype=np.uint16)
    return np.sort(rng.permutation(num_tokens)[:keep]).astype(np.uint16)


def fixed_mask(num_tokens: int, ratio: float, seed: int, sample_id: str) -> np.ndarray:
    return _draw(num_tokens, ratio, np.random.default_rng(stable_seed(seed, sample_id)))


def random_mask(num_tokens: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    return _draw(num_tokens, ratio, rng)


def visible_indices(
    spec: MaskSpec, num_tokens: int, sample_id: str, rng: np.random.Generator | None = None
) -> np.ndarray:
    """The visible token indices of one image under `spec` (sorted, uint16)."""
    if num_tokens > np.iinfo(np.uint16).max + 1:
        raise ValueError(f"{num_tokens} tokens do not fit uint16 indices")
    if spec.kind == "none" or spec.ratio == 0.0:
        return np.arange(num_tokens, dtype=np.uint16)
    if spec.kind == "fixed":
        return fixed_mask(num_tokens, spec.ratio, spec.seed, sample_id)
    return random_mask(num_tokens, spec.ratio, rng if rng is not None else np.random.default_rng())
