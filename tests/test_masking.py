"""Tests for sparsat.node.data.masking: the MAE keep-count convention and the fixed/random/none
masks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsat.node.data.clouds import CloudSpec
from sparsat.node.data.masking import (
    MaskSpec,
    capture,
    copy_id,
    fixed_mask,
    num_visible,
    split_copy,
    stable_seed,
    visible_indices,
)


def _assert_valid_mask(idx: np.ndarray, num_tokens: int, expected_count: int) -> None:
    assert idx.dtype == np.uint16
    assert idx.ndim == 1
    assert len(idx) == expected_count
    assert int(idx.min()) >= 0 and int(idx.max()) < num_tokens
    assert np.all(np.diff(idx.astype(np.int64)) > 0)  # sorted and unique


# ---- num_visible ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_tokens", "ratio", "expected"),
    [
        (49, 0.0, 49),
        (49, 0.5, 24),  # int(24.5): MAE truncates, never rounds up
        (49, 0.75, 12),  # int(12.25)
        (196, 0.75, 49),  # the paper's ViT-B/16 grid
        (196, 0.9, 19),  # int(19.6)
        (10, 0.99, 1),  # int(0.1) == 0, clamped to one visible token
        (1, 0.5, 1),
        (4, 0.9, 1),
    ],
)
def test_num_visible_follows_mae_and_keeps_at_least_one(
    num_tokens: int, ratio: float, expected: int
) -> None:
    # Execute
    got = num_visible(num_tokens, ratio)

    # Assert
    assert got == expected


# ---- MaskSpec -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["", "Fixed", "natural", "all"])
def test_maskspec_rejects_unknown_kind(kind: str) -> None:
    with pytest.raises(ValueError, match="mask kind"):
        MaskSpec(kind=kind, ratio=0.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.01, float("nan"), float("inf")])
def test_maskspec_rejects_ratio_outside_unit_interval(ratio: float) -> None:
    with pytest.raises(ValueError, match="mask ratio"):
        MaskSpec(kind="fixed", ratio=ratio)


@pytest.mark.parametrize("kind", ["none", "fixed", "random"])
def test_maskspec_accepts_valid_kinds(kind: str) -> None:
    # Execute
    spec = MaskSpec(kind=kind, ratio=0.0)  # type: ignore[arg-type]

    # Assert
    assert spec.kind == kind


# ---- fixed masks ----------------------------------------------------------------------------


def test_fixed_mask_is_deterministic_for_same_seed_and_sample_id() -> None:
    # Prepare
    spec = MaskSpec(kind="fixed", ratio=0.75, seed=3)

    # Execute
    a = visible_indices(spec, 196, "fashion_mnist/train/17")
    b = visible_indices(spec, 196, "fashion_mnist/train/17")
    c = fixed_mask(196, 0.75, 3, "fashion_mnist/train/17")

    # Assert
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_fixed_masks_differ_across_sample_ids() -> None:
    # Prepare
    spec = MaskSpec(kind="fixed", ratio=0.5, seed=0)

    # Execute
    masks = {visible_indices(spec, 196, f"s{i}").tobytes() for i in range(20)}

    # Assert: 20 draws of 98 out of 196 tokens; collisions are astronomically unlikely
    assert len(masks) == 20


def test_fixed_masks_differ_across_seeds() -> None:
    # Execute
    masks = {fixed_mask(196, 0.5, seed, "same-id").tobytes() for seed in range(20)}

    # Assert
    assert len(masks) == 20


def test_stable_seed_is_a_pure_function_of_its_parts() -> None:
    # Execute / Assert
    assert stable_seed(0, "a") == stable_seed(0, "a")
    assert stable_seed(0, "a") != stable_seed(1, "a")
    assert stable_seed(0, "a") != stable_seed(0, "b")
    assert 0 <= stable_seed(7, "x") < 2**64


@pytest.mark.parametrize("grid", [2, 7, 14])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.9])
def test_fixed_mask_has_right_count_and_format(grid: int, ratio: float) -> None:
    # Prepare
    n = grid * grid
    spec = MaskSpec(kind="fixed", ratio=ratio, seed=5)

    # Execute
    idx = visible_indices(spec, n, "img-0")

    # Assert
    _assert_valid_mask(idx, n, max(1, int(n * (1 - ratio))))


# ---- random masks ---------------------------------------------------------------------------


def test_random_masks_differ_across_copies_and_are_reproducible() -> None:
    # Prepare
    spec = MaskSpec(kind="random", ratio=0.5, seed=0, copies=10)

    # Execute: the same image, ten epochs: ten copies
    masks = [visible_indices(spec, 196, copy_id("same-id", c)) for c in range(10)]
    again = [visible_indices(spec, 196, copy_id("same-id", c)) for c in range(10)]

    # Assert
    assert len({m.tobytes() for m in masks}) == 10
    for m, a in zip(masks, again, strict=True):
        _assert_valid_mask(m, 196, 98)
        np.testing.assert_array_equal(m, a)
    # and not the fixed mask of the same seed under another name
    fixed = visible_indices(MaskSpec(kind="fixed", ratio=0.5, seed=0), 196, "same-id#0")
    assert fixed.tobytes() != masks[0].tobytes()


def test_copy_ids_round_trip_and_bad_copies_are_refused() -> None:
    assert split_copy(copy_id("fashion_mnist/train/7", 3)) == ("fashion_mnist/train/7", 3)
    assert split_copy("fashion_mnist/train/7") == ("fashion_mnist/train/7", None)
    with pytest.raises(ValueError, match="not a number"):
        split_copy("x#-1")
    with pytest.raises(ValueError, match="copies"):
        MaskSpec(kind="fixed", copies=2)


# ---- clouds ---------------------------------------------------------------------------------


def _scene(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 200, (28, 28, 1), dtype=np.uint8)


def test_clouds_whiten_the_image_and_drop_cloudy_tokens() -> None:
    # Prepare: many scenes of the default climatology
    spec = MaskSpec(kind="clouds", ratio=0.0, seed=1, max_cloud=0.25)
    image = _scene()

    # Execute
    caps = [capture(spec, image, 7, f"fashion_mnist/train/{i}") for i in range(200)]

    # Assert
    covers = np.array([c.cover for c in caps])
    assert (covers == 0).any() and (covers == 1).any() and ((covers > 0) & (covers < 1)).any()
    for c in caps:
        white = (c.image == 255) & (image != 255)  # pixels under a cloud
        assert abs(white.mean() - c.cover) < 1.5 / 784  # exact cover, to the pixel
        if c.cover == 0:
            np.testing.assert_array_equal(c.visible, np.arange(49))  # clear: every token
        if c.cover == 1:
            assert len(c.visible) == 0  # overcast: nothing usable, not sent
        for t in c.visible.tolist():  # every kept tile at most 25 % cloud
            r, col = divmod(t, 7)
            assert white[4 * r : 4 * r + 4, 4 * col : 4 * col + 4].mean() <= 0.25
    again = capture(spec, image, 7, "fashion_mnist/train/5")
    np.testing.assert_array_equal(again.visible, caps[5].visible)


def test_the_ratio_applies_to_the_clear_tokens() -> None:
    clear = CloudSpec(cover_mean=0.005, clear_share=0.99, overcast_share=0.0)  # nearly all clear
    image = _scene()
    for i in range(20):
        full = capture(MaskSpec("clouds", 0.0, 3, clouds=clear), image, 7, f"s{i}")
        half = capture(MaskSpec("clouds", 0.5, 3, clouds=clear), image, 7, f"s{i}")
        assert len(half.visible) == num_visible(len(full.visible), 0.5)
        assert set(half.visible.tolist()) <= set(full.visible.tolist())


# ---- no masking -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        MaskSpec(kind="none", ratio=0.0),
        MaskSpec(kind="none", ratio=0.75),  # kind none ignores the ratio
        MaskSpec(kind="fixed", ratio=0.0),
        MaskSpec(kind="random", ratio=0.0),
    ],
)
def test_no_masking_returns_every_token(spec: MaskSpec) -> None:
    # Execute
    idx = visible_indices(spec, 49, "img")

    # Assert
    assert idx.dtype == np.uint16
    np.testing.assert_array_equal(idx, np.arange(49))


def test_too_many_tokens_for_uint16_raises() -> None:
    with pytest.raises(ValueError, match="uint16"):
        visible_indices(MaskSpec(kind="fixed", ratio=0.5), 65537, "img")


def test_largest_uint16_grid_is_accepted() -> None:
    # Execute: 256 x 256 tokens, indices up to 65535
    idx = visible_indices(MaskSpec(kind="none", ratio=0.0), 65536, "img")

    # Assert
    assert int(idx[-1]) == 65535 and len(idx) == 65536


# ---- property test --------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    num_tokens=st.integers(1, 400),
    ratio=st.floats(0.0, 1.0, exclude_max=True, allow_nan=False),
    kind=st.sampled_from(["none", "fixed", "random"]),
    seed=st.integers(0, 2**32 - 1),
    sample_id=st.text(min_size=1, max_size=20),
)
def test_masks_are_sorted_unique_in_range_with_mae_count(
    num_tokens: int, ratio: float, kind: str, seed: int, sample_id: str
) -> None:
    # Prepare
    spec = MaskSpec(kind=kind, ratio=ratio, seed=seed)  # type: ignore[arg-type]
    expected = num_tokens if kind == "none" else max(1, int(num_tokens * (1.0 - ratio)))

    # Execute
    idx = visible_indices(spec, num_tokens, sample_id)

    # Assert
    assert num_visible(num_tokens, ratio) == max(1, int(num_tokens * (1.0 - ratio)))
    _assert_valid_mask(idx, num_tokens, expected)
