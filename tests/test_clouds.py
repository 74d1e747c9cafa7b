"""Tests for sparsat.node.data.clouds: exact cover, reproducibility, climatology, edge roughness,
tiling."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from sparsat.node.data.clouds import (
    DEFAULT_ROUGHNESS,
    PRESETS,
    CloudSpec,
    cloud_field,
    cloud_mask,
    component_sizes,
    draw_cover,
    edge_dimension,
    example_figure,
    label_components,
    preset_statistics,
    scene_clouds,
    token_cover,
)
from sparsat.node.data.tiles import tile_edges

# ---- exact cover ----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(28, 28), (32, 48), (7, 5), (256, 256)])
@pytest.mark.parametrize("cover", [0.001, 0.1, 0.37, 0.5, 0.9, 0.999])
def test_mask_has_exactly_the_rounded_number_of_cloudy_pixels(
    size: tuple[int, int], cover: float
) -> None:
    height, width = size
    mask = cloud_mask(height, width, cover, DEFAULT_ROUGHNESS, np.random.default_rng(3))
    assert mask.shape == (height, width) and mask.dtype == bool
    assert int(mask.sum()) == math.floor(cover * height * width + 0.5)


def test_half_pixel_cover_rounds_up_like_the_codec() -> None:
    mask = cloud_mask(5, 5, 0.5, DEFAULT_ROUGHNESS, np.random.default_rng(0))  # 12.5 px
    assert int(mask.sum()) == 13  # Python's round() would give 12 (half to even)


@pytest.mark.parametrize(("cover", "expected"), [(0.0, False), (1.0, True)])
def test_clear_and_overcast_masks_are_uniform(cover: float, expected: bool) -> None:
    mask = cloud_mask(28, 28, cover, DEFAULT_ROUGHNESS, np.random.default_rng(0))
    assert mask.shape == (28, 28)
    assert bool(np.all(mask == expected))


def test_cover_outside_unit_interval_is_rejected() -> None:
    with pytest.raises(ValueError, match="cover"):
        cloud_mask(8, 8, 1.5, DEFAULT_ROUGHNESS, np.random.default_rng(0))


# ---- reproducibility ------------------------------------------------------------------------


def test_same_seed_same_scene_different_seed_different_scene() -> None:
    spec = CloudSpec(clear_share=0.0, overcast_share=0.0)  # every scene broken: masks vary
    mask_a, cover_a = scene_clouds(spec, 28, 28, seed=11)
    mask_b, cover_b = scene_clouds(spec, 28, 28, seed=11)
    mask_c, cover_c = scene_clouds(spec, 28, 28, seed=12)
    assert cover_a == cover_b and np.array_equal(mask_a, mask_b)
    assert cover_a != cover_c and not np.array_equal(mask_a, mask_c)


def test_field_is_standardised_noise() -> None:
    field = cloud_field(64, 96, DEFAULT_ROUGHNESS, np.random.default_rng(0))
    assert field.shape == (64, 96)
    assert abs(float(field.mean())) < 1e-9 and abs(float(field.std()) - 1.0) < 1e-9


# ---- scene cover climatology ----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_drawn_covers_match_the_spec(name: str) -> None:
    spec = PRESETS[name]
    mean, clear, overcast = preset_statistics(spec, 20_000, seed=1)
    assert abs(mean - spec.cover_mean) < 0.01
    assert abs(clear - spec.clear_share) < 0.01
    assert abs(overcast - spec.overcast_share) < 0.01


def test_broken_scenes_are_strictly_between_clear_and_overcast() -> None:
    spec = CloudSpec(clear_share=0.0, overcast_share=0.0)
    rng = np.random.default_rng(0)
    covers = np.array([draw_cover(spec, rng) for _ in range(2_000)])
    assert bool(np.all((covers > 0.0) & (covers < 1.0)))


def test_presets_follow_the_modis_climatology() -> None:
    # King et al. 2013: ~67 % cloud globally, 72 % over ocean, 55 % over land; ~30 % of land
    # scenes clear, under 10 % of ocean scenes.
    assert PRESETS["global"].cover_mean == pytest.approx(0.67, abs=0.01)
    assert PRESETS["ocean"].cover_mean == pytest.approx(0.72, abs=0.01)
    assert PRESETS["land"].cover_mean == pytest.approx(0.55, abs=0.01)
    assert PRESETS["land"].clear_share == pytest.approx(0.30, abs=0.02)
    assert PRESETS["ocean"].clear_share < 0.10
    assert PRESETS["ocean"].clear_share < PRESETS["global"].clear_share
    assert PRESETS["global"].clear_share < PRESETS["land"].clear_share
    assert CloudSpec() == PRESETS["global"]


# ---- edge roughness -------------------------------------------------------------------------


def _dimension(roughness: float, seed: int) -> float:
    rng = np.random.default_rng(seed)
    return edge_dimension([cloud_mask(256, 256, 0.5, roughness, rng) for _ in range(16)])


def test_default_edges_have_lovejoys_dimension() -> None:
    # Lovejoy 1982: D = 1.33. Over 12 seeds this estimate (16 masks of 256x256) measured
    # 1.320 +- 0.020, so 0.07 is over three standard deviations.
    assert _dimension(DEFAULT_ROUGHNESS, seed=0) == pytest.approx(1.33, abs=0.07)


def test_smooth_setting_gives_clearly_smoother_edges() -> None:
    # Roughness 0 measured 1.154 +- 0.048, 0.166 +- 0.050 below the default on the same seeds.
    smooth = _dimension(0.0, seed=0)
    assert smooth < 1.25
    assert smooth < _dimension(DEFAULT_ROUGHNESS, seed=0) - 0.05


def test_labelling_counts_4_connected_components() -> None:
    mask = np.array(
        [
            [1, 1, 0, 0, 1],
            [0, 1, 0, 1, 0],  # (1, 3) touches (0, 4) only diagonally: separate
            [0, 1, 1, 1, 0],  # joins the left shape and (1, 3) into one U
            [0, 0, 0, 0, 0],
            [1, 0, 1, 0, 1],
        ],
        dtype=bool,
    )
    labels, count = label_components(mask)
    assert count == 5
    assert labels[0, 0] == labels[1, 3] != labels[0, 4]
    assert len({int(labels[4, 0]), int(labels[4, 2]), int(labels[4, 4])}) == 3
    assert bool(np.all((labels > 0) == mask))


@pytest.mark.parametrize("shape", [(8, 8), (1, 1), (3, 5)])
def test_an_all_clear_mask_has_no_components(shape: tuple[int, int]) -> None:
    labels, count = label_components(np.zeros(shape, dtype=bool))
    areas, perims = component_sizes(np.zeros(shape, dtype=bool))

    assert count == 0 and labels.shape == shape and labels.dtype == np.int64
    assert not labels.any() and areas.size == 0 and perims.size == 0


def test_component_sizes_skip_border_components_and_count_edges() -> None:
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:4, 2:5] = True  # 2x3 block inside: area 6, perimeter 10
    mask[0, 6] = True  # touches the border: excluded
    areas, perims = component_sizes(mask)
    assert areas.tolist() == [6] and perims.tolist() == [10]


# ---- token cover ----------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "grid"), [((28, 28), 7), ((30, 45), 4), ((224, 224), 14)])
def test_token_cover_is_a_fraction_whose_weighted_mean_is_the_cover(
    size: tuple[int, int], grid: int
) -> None:
    height, width = size
    mask = cloud_mask(height, width, 0.4, DEFAULT_ROUGHNESS, np.random.default_rng(5))
    cover = token_cover(mask, grid)
    assert cover.shape == (grid * grid,)
    assert bool(np.all((cover >= 0.0) & (cover <= 1.0)))
    weights = np.outer(np.diff(tile_edges(height, grid)), np.diff(tile_edges(width, grid)))
    assert float((cover * weights.reshape(-1)).sum()) == pytest.approx(float(mask.sum()))


def test_one_cloudy_tile_covers_its_token_only() -> None:
    height, width, grid = 30, 45, 4  # uneven tiles: edges from tiles.tile_edges
    ys, xs = tile_edges(height, grid), tile_edges(width, grid)
    mask = np.zeros((height, width), dtype=bool)
    mask[ys[2] : ys[3], xs[1] : xs[2]] = True
    expected = np.zeros(grid * grid)
    expected[2 * grid + 1] = 1.0
    assert np.array_equal(token_cover(mask, grid), expected)


def test_token_cover_rejects_a_grid_finer_than_the_mask() -> None:
    with pytest.raises(ValueError, match="grid"):
        token_cover(np.zeros((4, 4), dtype=bool), 5)


# ---- spec validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"cover_mean": 1.2}, "cover_mean"),
        ({"cover_mean": math.nan}, "cover_mean"),
        ({"clear_share": -0.1}, "clear_share"),
        ({"overcast_share": 1.0}, "overcast_share"),
        ({"roughness": 1.5}, "roughness"),
        ({"concentration": 0.0}, "concentration"),
        # broken-scene mean (0.2 - 0.3) / 0.6 < 0: overcast alone covers more than the mean
        ({"cover_mean": 0.2, "clear_share": 0.1, "overcast_share": 0.3}, "overcast_share"),
        # (0.9 - 0.1) / 0.4 > 1: too many clear scenes for the mean
        ({"cover_mean": 0.9, "clear_share": 0.5, "overcast_share": 0.1}, "clear_share"),
        ({"clear_share": 0.6, "overcast_share": 0.5}, "clear_share"),
    ],
)
def test_invalid_specs_raise_naming_the_key(kwargs: dict[str, float], key: str) -> None:
    with pytest.raises(ValueError, match=key):
        CloudSpec(**kwargs)


# ---- figure ---------------------------------------------------------------------------------


def test_example_figure_writes_a_png(tmp_path: Path) -> None:
    path = tmp_path / "clouds.png"
    example_figure(path, PRESETS["land"], n=3, sizes=(28, 64), seed=0)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sparsat_clouds_writes_a_picture_and_refuses_bad_input(tmp_path: Path) -> None:
    from sparsat.sim.cli import main

    out = tmp_path / "m.png"
    assert main(["clouds", "--out", str(out), "--preset", "ocean", "--n", "2",
                 "--size", "16"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["clouds", "--out", str(out), "--roughness", "2"]) == 2  # one-line error
