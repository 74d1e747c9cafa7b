"""An on-board cloud detector that can be wrong: a per-tile threshold rule.

A token is called cloudy when its tile is bright and flat the way cloud tops are:

    cloudy  <=>  share of pixel values >= `level`  >  share16 / 16
                 and  tile mean >= min_mean  and  tile std <= max_std

Its four numbers are fitted on the ground (sparsat.ground_station.detector) against the true
cloud field and travel to the satellites as DETECTOR_BYTES bytes (to_bytes / from_bytes: the
parser takes exactly that many and checks every field). A sensor with a threshold detector
drops the tokens the rule calls cloudy, where the oracle drops those whose true cloud cover
is above max_cloud (sparsat.node.data.masking). sparsat's clouds record as 255: the rule errs
where garments are bright and flat too (false positives), and where a tile's bright share
sits near the threshold on the wrong side (both kinds).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparsat.node.data.tiles import tile_totals, tile_value_counts

DETECTOR_VERSION = 1
DETECTOR_BYTES = 5  # version, level, share16, min_mean, max_std
# on-board work, per value: its add into the tile's sum, its square's multiply and add into
# the sum of squares, its compare with `level` and that count's add (5); per tile: mean,
# variance (mean square - mean^2: 2 divides, a multiply, a subtract), its square root
# (counted 1), the bright share's compare and the two others (3): 8
DETECTOR_FLOPS_PER_VALUE = 5
DETECTOR_FLOPS_PER_TILE = 8


@dataclass(frozen=True)
class TileFeatures:
    """Per-token statistics of an image's tiles (row-major on the codec's tiling)."""

    values: np.ndarray  # (L,) int64: pixel values in the tile (pixels x channels)
    bright: np.ndarray  # (L,) int64: values >= level
    mean: np.ndarray  # (L,) float64
    std: np.ndarray  # (L,) float64


def tile_features(image: np.ndarray, grid: int, level: int) -> TileFeatures:
    height, width = image.shape[:2]
    if not 1 <= grid <= min(height, width):
        raise ValueError(f"grid {grid} does not fit a {height}x{width} image")
    x = image.reshape(height, width, -1).astype(np.int64)  # (H, W, C)
    n = tile_value_counts(height, width, x.shape[2], grid)  # (L,)
    mean = tile_totals(x, grid) / n
    var = np.maximum(tile_totals(x * x, grid) / n - mean * mean, 0.0)
    return TileFeatures(n, tile_totals((x >= level).astype(np.int64), grid), mean,
                        np.sqrt(var))


def decide_on(f: TileFeatures, share16: int, min_mean: int, max_std: int) -> np.ndarray:
    """(L,) bool of the rule on features computed at its level (exact integer share test)."""
    return ((f.bright * 16 > share16 * f.values) & (f.mean >= min_mean)
            & (f.std <= max_std))



@dataclass(frozen=True)
class ThresholdDetector:
    level: int = 255  # a value at or above it counts as bright, 0..255
    share16: int = 4  # cloudy above this many 16ths of the tile's values bright, 0..16
    min_mean: int = 0  # and a tile mean at least this, 0..255 (0: no condition)
    max_std: int = 255  # and a tile standard deviation at most this, 0..255 (255: none)

    def __post_init__(self) -> None:
        for name, top in (("level", 255), ("share16", 16), ("min_mean", 255),
                          ("max_std", 255)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= top:
                raise ValueError(f"detector {name} must be an integer in 0..{top}, "
                                 f"got {value!r}")

    def to_bytes(self) -> bytes:
        return bytes([DETECTOR_VERSION, self.level, self.share16, self.min_mean, self.max_std])

    @classmethod
    def from_bytes(cls, data: bytes) -> ThresholdDetector:
        """Parse exactly DETECTOR_BYTES bytes; ValueError naming what is wrong."""
        if len(data) != DETECTOR_BYTES:
            raise ValueError(f"detector parameters are {DETECTOR_BYTES} bytes, got {len(data)}")
        if data[0] != DETECTOR_VERSION:
            raise ValueError(f"detector parameters version {data[0]}, this host reads "
                             f"{DETECTOR_VERSION}")
        return cls(*data[1:])

    def to_hex(self) -> str:
        return self.to_bytes().hex()

    @classmethod
    def from_hex(cls, text: str) -> ThresholdDetector:
        """From the sensor config's JSON: the length is checked before anything is decoded."""
        if not isinstance(text, str) or len(text) != 2 * DETECTOR_BYTES:
            raise ValueError(f"detector parameters are {2 * DETECTOR_BYTES} hex digits")
        try:
            data = bytes.fromhex(text)
        except ValueError as e:
            raise ValueError(f"detector parameters are not hex: {e}") from None
        return cls.from_bytes(data)

    def cloudy(self, image: np.ndarray, grid: int) -> np.ndarray:
        """(grid*grid,) bool: the tokens this detector calls cloudy, on (H, W, C) uint8."""
        return self.decide(tile_features(image, grid, self.level))

    def decide(self, features: TileFeatures) -> np.ndarray:
        """(L,) bool: the rule on features computed at this detector's level."""
        return decide_on(features, self.share16, self.min_mean, self.max_std)



def detector_flops(image: np.ndarray, grid: int) -> int:
    """On-board FLOPs of running the detector on one image (every tile)."""
    return DETECTOR_FLOPS_PER_VALUE * int(image.size) + DETECTOR_FLOPS_PER_TILE * grid * grid
