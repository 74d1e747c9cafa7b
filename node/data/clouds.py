"""Seeded procedural clouds: the natural masks a sensor sees.

A scene first draws its cloud cover from a climatology (a share of fully clear scenes, a share
of overcast ones, a Beta for the broken rest), then a fractal field by spectral synthesis, and
thresholds it so exactly round(cover * H * W) pixels are cloud (half up). Edges follow the
perimeter-area relation of real clouds, P ~ A^(D/2) with D ~ 1.33 (Lovejoy 1982, Science
216:185).
Everything is drawn from one np.random.Generator, so a seed fixes the mask on every machine
(numpy does not promise the same streams across its own versions).

Run `python -m sparsat.node.data.clouds` to print the measured statistics beside their targets.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparsat.node.data.tiles import tile_edges

# Calibrated by measurement: edge_dimension of 512x512 masks at cover 0.5, seeds 0-3 with 48
# masks each, gives D = 1.330 (1.321 to 1.336 per seed), Lovejoy's value; 0.47 gives 1.344.
DEFAULT_ROUGHNESS = 0.45
MIN_COMPONENT_AREA = 10  # px; smaller components are all staircase, no edge to measure


@dataclass(frozen=True)
class CloudSpec:
    """Scene climatology and edge roughness of the procedural clouds.

    cover_mean: expected cloud fraction of a scene, in (0, 1).
    clear_share / overcast_share: probability that a scene is fully clear (cover 0) or fully
        overcast (cover 1); the rest are broken scenes.
    roughness: edge roughness in [0, 1]; the field's power spectrum is |k|^-(4 - 2 * roughness),
        a fractional Brownian surface with Hurst exponent 1 - roughness whose level sets have
        continuum dimension 1 + roughness. Measured on pixels D is lower (0.45 gives 1.33, not
        1.45), hence the calibrated default.
    concentration: c = a + b of the Beta(a, b) that draws a broken scene's cover, a = m_b * c,
        b = (1 - m_b) * c (our choice, not from the climatology: 4.0 keeps a, b > 1 for every
        preset, so broken scenes spread over (0, 1) without piling up next to 0 or 1, where the
        clear and overcast scenes are already counted apart).
    """

    cover_mean: float = 0.67
    clear_share: float = 0.15
    overcast_share: float = 0.27
    roughness: float = DEFAULT_ROUGHNESS
    concentration: float = 4.0

    def __post_init__(self) -> None:
        if not 0.0 < self.cover_mean < 1.0:
            raise ValueError(f"cover_mean must be in (0, 1), got {self.cover_mean}")
        if not 0.0 <= self.clear_share < 1.0:
            raise ValueError(f"clear_share must be in [0, 1), got {self.clear_share}")
        if not 0.0 <= self.overcast_share < 1.0:
            raise ValueError(f"overcast_share must be in [0, 1), got {self.overcast_share}")
        if not 0.0 <= self.roughness <= 1.0:
            raise ValueError(f"roughness must be in [0, 1], got {self.roughness}")
        if not (math.isfinite(self.concentration) and self.concentration > 0.0):
            raise ValueError(f"concentration must be finite and > 0, got {self.concentration}")
        broken = 1.0 - self.clear_share - self.overcast_share
        mean = (self.cover_mean - self.overcast_share) / broken if broken > 0 else math.nan
        if not 0.0 < mean < 1.0:
            raise ValueError(
                f"infeasible cover distribution: broken-scene mean (cover_mean - overcast_share)"
                f" / (1 - clear_share - overcast_share) = ({self.cover_mean} -"
                f" {self.overcast_share}) / (1 - {self.clear_share} - {self.overcast_share})"
                f" = {mean:.4g}, must be in (0, 1)"
            )

    @property
    def broken_mean(self) -> float:
        """Mean cover of broken scenes, so that E[cover] = cover_mean exactly."""
        broken = 1.0 - self.clear_share - self.overcast_share
        return (self.cover_mean - self.overcast_share) / broken


# Cover means and clear shares: King et al. 2013 (IEEE TGRS 51:3826, MODIS): ~67 % cloud
# globally, 72 % over ocean, 55 % over land; ~30 % of land scenes clear, under 10 % of ocean
# scenes; global clear is the area-weighted 0.29 * 0.30 + 0.71 * 0.08 ~ 0.15. The overcast
# shares are our own choice, not from that paper.
PRESETS: dict[str, CloudSpec] = {
    "global": CloudSpec(cover_mean=0.67, clear_share=0.15, overcast_share=0.27),
    "land": CloudSpec(cover_mean=0.55, clear_share=0.30, overcast_share=0.20),
    "ocean": CloudSpec(cover_mean=0.72, clear_share=0.08, overcast_share=0.30),
}


def draw_cover(spec: CloudSpec, rng: np.random.Generator) -> float:
    """One scene's cloud fraction: 0.0, 1.0, or a Beta draw for a broken scene."""
    u = rng.random()
    if u < spec.clear_share:
        return 0.0
    if u < spec.clear_share + spec.overcast_share:
        return 1.0
    m, c = spec.broken_mean, spec.concentration
    return float(rng.beta(m * c, (1.0 - m) * c))


def cloud_field(height: int, width: int, roughness: float, rng: np.random.Generator) -> np.ndarray:
    """Fractal noise (H, W) float64 with power spectrum |k|^-(4 - 2 * roughness)."""
    # Synthesised on a grid twice the size and cropped: the FFT field is periodic, and a crop
    # keeps opposite edges of the scene from being the same cloud.
    ph, pw = 2 * height, 2 * width
    beta = 4.0 - 2.0 * roughness
    ky = np.fft.fftfreq(ph)[:, None]  # (2H, 1) cycles/px
    kx = np.fft.fftfreq(pw)[None, :]  # (1, 2W)
    k = np.hypot(ky, kx)  # (2H, 2W)
    k[0, 0] = 1.0  # placeholder; the mean carries no shape and is zeroed below
    amp = k ** (-beta / 2.0)
    amp[0, 0] = 0.0
    noise = rng.standard_normal((ph, pw)) + 1j * rng.standard_normal((ph, pw))
    field = np.fft.ifft2(noise * amp).real[:height, :width]  # (H, W)
    return (field - field.mean()) / (field.std() + 1e-12)


def cover_pixels(cover: float, height: int, width: int) -> int:
    # Round half up like tiles.tile_edges, so other implementations reproduce the count.
    return int(math.floor(cover * height * width + 0.5))


def cloud_mask(
    height: int, width: int, cover: float, roughness: float, rng: np.random.Generator
) -> np.ndarray:
    """(H, W) bool, True = cloud, with exactly cover_pixels(cover, H, W) cloudy pixels."""
    if not 0.0 <= cover <= 1.0:
        raise ValueError(f"cover must be in [0, 1], got {cover}")
    n = cover_pixels(cover, height, width)
    if n == 0:
        return np.zeros((height, width), dtype=bool)
    if n == height * width:
        return np.ones((height, width), dtype=bool)
    field = cloud_field(height, width, roughness, rng)
    # The n highest values by rank, not a value threshold: ties cannot change the count.
    order = np.argsort(field, axis=None, kind="stable")  # (H*W,) ascending
    flat = np.zeros(height * width, dtype=bool)
    flat[order[-n:]] = True
    return flat.reshape(height, width)


def scene_clouds(spec: CloudSpec, height: int, width: int, seed: int) -> tuple[np.ndarray, float]:
    """(mask (H, W) bool, drawn cover) of one scene; the seed alone fixes both."""
    rng = np.random.default_rng(seed)
    cover = draw_cover(spec, rng)
    return cloud_mask(height, width, cover, spec.roughness, rng), cover


def token_cover(mask: np.ndarray, grid: int) -> np.ndarray:
    """(grid*grid,) cloudy fraction of each token's native tile, row-major (codec's tiling)."""
    height, width = mask.shape
    if not 1 <= grid <= min(height, width):
        raise ValueError(f"grid {grid} does not fit a {height}x{width} mask")
    ys, xs = tile_edges(height, grid), tile_edges(width, grid)
    rows = np.add.reduceat(mask.astype(np.int64), ys[:-1], axis=0)  # (g, W)
    counts = np.add.reduceat(rows, xs[:-1], axis=1)  # (g, g); no tile is empty as g <= H, W
    sizes = np.outer(np.diff(ys), np.diff(xs))  # (g, g)
    return (counts / sizes).reshape(-1)


# ---- statistics -----------------------------------------------------------------------------


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """(labels (H, W) int64, count) of the 4-connected True regions; 0 is background."""
    # Union-find over horizontal runs, not pixels: far fewer Python steps (no scipy here).
    height, width = mask.shape
    padded = np.zeros((height, width + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    step = np.diff(padded, axis=1)  # (H, W+1)
    run_rows, starts = np.nonzero(step == 1)
    _, ends = np.nonzero(step == -1)  # row-major order, so ends pair with starts
    n_runs = len(starts)
    if n_runs == 0:  # all clear: no component (comp below would be empty to index)
        return np.zeros((height, width), dtype=np.int64), 0
    lengths = ends - starts  # (n_runs,)
    first = np.repeat(run_rows * width + starts, lengths)  # (n_cloud,) flat start of own run
    within = np.arange(first.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    run_id = np.full(height * width, -1, dtype=np.int64)
    run_id[first + within] = np.repeat(np.arange(n_runs), lengths)
    run_id = run_id.reshape(height, width)  # (H, W) run of each cloud pixel, -1 if clear
    above, below = run_id[:-1], run_id[1:]  # (H-1, W) each
    touching = (above >= 0) & (below >= 0)
    pairs = np.unique(np.stack([above[touching], below[touching]], axis=1), axis=0)
    parent = list(range(n_runs))
    for a, b in pairs.tolist():
        ra, rb = _find(parent, a), _find(parent, b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([_find(parent, i) for i in range(n_runs)], dtype=np.int64)
    _, comp = np.unique(roots, return_inverse=True)  # (n_runs,) 0..count-1
    labels = np.where(run_id >= 0, comp[np.maximum(run_id, 0)] + 1, 0)
    return labels, int(comp.max()) + 1


def component_sizes(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(areas, perimeters) of the 4-connected cloud components that do not touch the border.

    The perimeter is the number of pixel edges between the component and clear pixels.
    """
    labels, count = label_components(mask)
    clear = ~np.pad(mask, 1)  # (H+2, W+2); outside the image counts as clear
    clear_sides = (
        clear[:-2, 1:-1].astype(np.int64) + clear[2:, 1:-1] + clear[1:-1, :-2] + clear[1:-1, 2:]
    )  # (H, W) clear 4-neighbours of each pixel
    areas = np.bincount(labels.reshape(-1), minlength=count + 1)[1:]
    perims = np.bincount(labels.reshape(-1), clear_sides.reshape(-1), minlength=count + 1)[1:]
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    inside = np.ones(count, dtype=bool)
    inside[border[border > 0] - 1] = False
    return areas[inside], perims[inside].astype(np.int64)


def edge_dimension(masks: list[np.ndarray], min_area: int = MIN_COMPONENT_AREA) -> float:
    """Lovejoy's perimeter-area dimension: D = 2 * slope of log P against log A.

    Pools the components of all masks that do not touch the border and have >= min_area px.
    """
    sizes = [component_sizes(m) for m in masks]
    areas = np.concatenate([a for a, _ in sizes])
    perims = np.concatenate([p for _, p in sizes])
    keep = areas >= min_area
    if int(keep.sum()) < 2 or np.unique(areas[keep]).size < 2:
        raise ValueError("too few cloud components to fit a perimeter-area slope")
    slope = np.polyfit(np.log(areas[keep]), np.log(perims[keep]), 1)[0]
    return float(2.0 * slope)


def preset_statistics(spec: CloudSpec, n: int, seed: int) -> tuple[float, float, float]:
    """(mean cover, clear share, overcast share) of n scenes drawn from one generator."""
    rng = np.random.default_rng(seed)
    covers = np.array([draw_cover(spec, rng) for _ in range(n)])  # (n,)
    return float(covers.mean()), float(np.mean(covers == 0.0)), float(np.mean(covers == 1.0))


def measured_dimension(roughness: float, size: int, n: int, seed: int) -> float:
    """edge_dimension of n size x size masks at cover 0.5."""
    rng = np.random.default_rng(seed)
    return edge_dimension([cloud_mask(size, size, 0.5, roughness, rng) for _ in range(n)])


# ---- figure and report ----------------------------------------------------------------------


def example_figure(
    path: Path, spec: CloudSpec, n: int = 8, sizes: tuple[int, ...] = (28, 256), seed: int = 0
) -> None:
    """A PNG grid of n example scenes (columns) at each resolution in sizes (rows)."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    sky = ListedColormap(["#2b5d8a", "white"])  # clear, cloud
    fig = Figure(figsize=(1.6 * n, 1.8 * len(sizes) + 0.3), layout="constrained")
    fig.suptitle(f"{n} scenes, seeds {seed}..{seed + n - 1}; cloud white, clear blue", fontsize=10)
    axes = fig.subplots(len(sizes), n, squeeze=False)
    for row, size in enumerate(sizes):
        for col in range(n):
            # The same seed per column: the cover is drawn first, so it is shared across rows.
            mask, _ = scene_clouds(spec, size, size, seed + col)
            ax = axes[row][col]
            ax.imshow(mask, cmap=sky, vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"cover {mask.mean():.3f}", fontsize=9)  # as rounded to pixels
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row][0].set_ylabel(f"{size}x{size}", fontsize=9)
    fig.savefig(path, dpi=100)


def report(n_scenes: int = 20_000, size: int = 512, n_masks: int = 48, seed: int = 0) -> str:
    lines = ["preset  cover_mean (target)  clear (target)  overcast (target)"]
    for name, spec in PRESETS.items():
        mean, clear, overcast = preset_statistics(spec, n_scenes, seed)
        lines.append(
            f"{name:<7} {mean:.3f} ({spec.cover_mean:.2f})        {clear:.3f} "
            f"({spec.clear_share:.2f})    {overcast:.3f} ({spec.overcast_share:.2f})"
        )
    lines.append(f"edge dimension D, {n_masks} masks {size}x{size} at cover 0.5 (target 1.33):")
    for roughness in (0.0, 0.25, DEFAULT_ROUGHNESS, 0.7):
        d = measured_dimension(roughness, size, n_masks, seed)
        lines.append(f"  roughness {roughness:.2f}: D = {d:.3f} (continuum {1 + roughness:.2f})")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
    if len(sys.argv) > 1:
        example_figure(Path(sys.argv[1]), PRESETS["global"])
