"""Tests for sparsat.node.wire.codec: tile edges, the patch payload round trip and checks, CLS
quantization."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsat.node.wire.codec import (
    CLS_DTYPES,
    CodecError,
    PatchData,
    check_patches,
    decode_patches,
    dequantize_token,
    encode_patches,
    masked_canvas,
    quantize_token,
    tile_edges,
    tile_sizes,
)


def _image(h: int, w: int, c: int, seed: int = 0) -> np.ndarray:
    # 1..255 so that a visible tile can never be mistaken for the zero fill of a masked one
    return np.random.default_rng(seed).integers(1, 256, size=(h, w, c), dtype=np.uint8)


def _exact_edges(size: int, grid: int) -> list[int]:
    # floor(i * size / grid + 1/2) in exact integer arithmetic
    return [(2 * i * size + grid) // (2 * grid) for i in range(grid + 1)]


def _assert_round_trip(image: np.ndarray, grid: int, visible: np.ndarray) -> None:
    h, w, _ = image.shape
    data = encode_patches(image, grid, visible)
    check_patches(data)
    canvas = decode_patches(data)
    assert canvas.shape == image.shape and canvas.dtype == np.uint8
    ys, xs = tile_edges(h, grid), tile_edges(w, grid)
    seen = set(visible.tolist())
    for t in range(grid * grid):
        r, c = divmod(t, grid)
        got = canvas[ys[r] : ys[r + 1], xs[c] : xs[c + 1]]
        if t in seen:
            np.testing.assert_array_equal(got, image[ys[r] : ys[r + 1], xs[c] : xs[c + 1]])
        else:
            assert not got.any(), f"masked tile {t} is not zero"


# ---- tile edges -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "grid"),
    [(28, 7), (28, 5), (32, 7), (600, 14), (224, 14), (64, 64), (5, 1), (100, 3), (28, 8)],
)
def test_tile_edges_partition_the_side(size: int, grid: int) -> None:
    # Execute
    edges = tile_edges(size, grid)

    # Assert
    assert len(edges) == grid + 1
    assert edges[0] == 0 and edges[-1] == size
    assert np.all(np.diff(edges) >= 1)  # strictly increasing: no empty tile
    assert edges.tolist() == _exact_edges(size, grid)


def test_tile_edges_of_non_dividing_grid_have_expected_values() -> None:
    # Execute / Assert: 28/5 = 5.6 per tile
    assert tile_edges(28, 5).tolist() == [0, 6, 11, 17, 22, 28]
    assert tile_edges(32, 7).tolist() == [0, 5, 9, 14, 18, 23, 27, 32]


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 10_000), data=st.data())
def test_tile_edges_property(size: int, data: st.DataObject) -> None:
    # Prepare
    grid = data.draw(st.integers(1, min(size, 300)))

    # Execute
    edges = tile_edges(size, grid)

    # Assert
    assert edges[0] == 0 and edges[-1] == size
    assert np.all(np.diff(edges) >= 1)
    assert edges.tolist() == _exact_edges(size, grid)


def test_tile_sizes_cover_the_image() -> None:
    # Execute
    sizes = tile_sizes(28, 30, 5)

    # Assert
    assert sizes.shape == (25,)
    assert int(sizes.sum()) == 28 * 30


# ---- patch round trip -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "grid"),
    [
        ((28, 28, 1), 7),
        ((28, 28, 1), 5),
        ((32, 32, 3), 7),
        ((64, 48, 3), 6),  # non-square
        ((30, 17, 1), 4),  # non-square, non-dividing on both sides
        ((600, 600, 3), 14),
    ],
)
def test_patch_round_trip_keeps_visible_tiles_and_zeroes_the_rest(
    shape: tuple[int, int, int], grid: int
) -> None:
    # Prepare
    image = _image(*shape)
    rng = np.random.default_rng(1)
    n = grid * grid
    visible = np.sort(rng.permutation(n)[: max(1, n // 3)]).astype(np.uint16)

    # Execute / Assert
    _assert_round_trip(image, grid, visible)


def test_patch_round_trip_with_every_token_is_the_image() -> None:
    # Prepare
    image = _image(28, 28, 1)

    # Execute
    canvas = masked_canvas(image, 7, np.arange(49, dtype=np.uint16))

    # Assert
    np.testing.assert_array_equal(canvas, image)


def test_patch_pixels_are_the_visible_tiles_in_index_order() -> None:
    # Prepare
    image = np.arange(4 * 4, dtype=np.uint8).reshape(4, 4, 1)

    # Execute: grid 2, tiles 1 and 2 (top-right, bottom-left)
    data = encode_patches(image, 2, np.array([1, 2], dtype=np.uint16))

    # Assert
    assert data.pixels == bytes([2, 3, 6, 7, 8, 9, 12, 13])
    assert (data.height, data.width, data.channels, data.grid) == (4, 4, 1, 2)


@settings(max_examples=100, deadline=None)
@given(
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    c=st.sampled_from([1, 3]),
    data=st.data(),
)
def test_patch_round_trip_property(h: int, w: int, c: int, data: st.DataObject) -> None:
    # Prepare
    grid = data.draw(st.integers(1, min(h, w)), label="grid")
    n = grid * grid
    visible = data.draw(
        st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True), label="visible"
    )
    image = _image(h, w, c, seed=data.draw(st.integers(0, 2**16), label="seed"))

    # Execute / Assert
    _assert_round_trip(image, grid, np.array(sorted(visible), dtype=np.uint16))


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((28, 28, 1), dtype=np.float32),
        np.zeros((28, 28), dtype=np.uint8),
        np.zeros((2, 28, 28, 1), dtype=np.uint8),
    ],
)
def test_encode_rejects_non_uint8_hwc(image: np.ndarray) -> None:
    with pytest.raises(CodecError, match="uint8"):
        encode_patches(image, 7, np.arange(3, dtype=np.uint16))


@pytest.mark.parametrize("grid", [0, 29])
def test_encode_rejects_grid_that_does_not_fit(grid: int) -> None:
    with pytest.raises(CodecError, match="grid"):
        encode_patches(_image(28, 28, 1), grid, np.arange(1, dtype=np.uint16))


# ---- check_patches --------------------------------------------------------------------------


def _good_patches() -> PatchData:
    return encode_patches(_image(28, 28, 1), 7, np.array([0, 5, 17, 48], dtype=np.uint16))


def test_check_patches_accepts_a_good_payload() -> None:
    check_patches(_good_patches())  # Assert: does not raise


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"visible_idx": np.array([5, 0, 17, 48], dtype=np.uint16)}, "sorted and unique"),
        ({"visible_idx": np.array([0, 5, 5, 48], dtype=np.uint16)}, "sorted and unique"),
        ({"visible_idx": np.array([0, 5, 17, 49], dtype=np.uint16)}, "out of range"),
        ({"visible_idx": np.array([0, 5, 17, 65535], dtype=np.uint16)}, "out of range"),
        ({"visible_idx": np.zeros(0, dtype=np.uint16)}, "no visible tokens"),
        ({"visible_idx": np.zeros(50, dtype=np.uint16)}, "visible tokens on a grid"),
        ({"channels": 2}, "channels"),
        ({"channels": 0}, "channels"),
        ({"channels": 4}, "channels"),
        ({"grid": 29}, "grid"),
        ({"grid": 0}, "grid"),
        ({"height": 0}, "image size"),
        ({"width": 10_000}, "image size"),
    ],
)
def test_check_patches_rejects_bad_fields(change: dict[str, object], match: str) -> None:
    # Prepare
    data = replace(_good_patches(), **change)  # type: ignore[arg-type]

    # Execute / Assert
    with pytest.raises(CodecError, match=match):
        check_patches(data)


@pytest.mark.parametrize("delta", [-1, 1, -16])
def test_check_patches_rejects_wrong_pixel_length(delta: int) -> None:
    # Prepare
    good = _good_patches()
    pixels = good.pixels[:delta] if delta < 0 else good.pixels + b"\0" * delta
    data = replace(good, pixels=pixels)

    # Execute / Assert
    with pytest.raises(CodecError, match="pixels"):
        check_patches(data)
    with pytest.raises(CodecError, match="pixels"):
        decode_patches(data)


def test_check_patches_rejects_grid_larger_than_non_square_side() -> None:
    # Prepare: 28 rows fit a grid of 20, 10 columns do not
    data = PatchData(28, 10, 1, 20, np.array([0], dtype=np.uint16), b"")

    # Execute / Assert
    with pytest.raises(CodecError, match="grid"):
        check_patches(data)


# ---- CLS tokens -----------------------------------------------------------------------------


def _token(dim: int = 192, seed: int = 0, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(dim) * scale).astype(np.float32)


def test_cls_float32_round_trip_is_exact() -> None:
    # Prepare
    tok = _token()

    # Execute
    data, scale = quantize_token(tok, "float32")
    back = dequantize_token(data, "float32", tok.size, scale)

    # Assert
    assert len(data) == 4 * tok.size and scale == 0.0
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, tok)


def test_cls_float16_round_trip_within_half_precision() -> None:
    # Prepare
    tok = _token()

    # Execute
    data, scale = quantize_token(tok, "float16")
    back = dequantize_token(data, "float16", tok.size, scale)

    # Assert: fp16 has a 10-bit mantissa: relative error <= 2**-11
    assert len(data) == 2 * tok.size and scale == 0.0
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, tok, rtol=2**-11, atol=0)
    np.testing.assert_array_equal(back, tok.astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cls_int8_round_trip_within_half_a_step(seed: int) -> None:
    # Prepare
    tok = _token(seed=seed)

    # Execute
    data, scale = quantize_token(tok, "int8")
    back = dequantize_token(data, "int8", tok.size, scale)

    # Assert
    assert len(data) == tok.size
    assert scale == pytest.approx(float(np.abs(tok).max()) / 127.0)
    assert np.all(np.abs(back - tok) <= scale / 2 * (1 + 1e-5))
    assert int(np.abs(np.frombuffer(data, dtype=np.int8)).max()) == 127  # the peak uses the range


def test_cls_int8_of_zero_token_is_zero() -> None:
    # Execute
    data, scale = quantize_token(np.zeros(8, dtype=np.float32), "int8")
    back = dequantize_token(data, "int8", 8, scale)

    # Assert
    assert scale > 0
    np.testing.assert_array_equal(back, np.zeros(8))


def test_quantize_rejects_unknown_dtype() -> None:
    with pytest.raises(CodecError, match="dtype"):
        quantize_token(_token(), "bfloat16")


@pytest.mark.parametrize("dtype", CLS_DTYPES)
@pytest.mark.parametrize("delta", [-1, 1])
def test_dequantize_rejects_wrong_byte_length(dtype: str, delta: int) -> None:
    # Prepare
    data, scale = quantize_token(_token(dim=16), dtype)
    bad = data[:delta] if delta < 0 else data + b"\0"

    # Execute / Assert
    with pytest.raises(CodecError, match="bytes"):
        dequantize_token(bad, dtype, 16, scale)


def test_dequantize_rejects_dim_mismatch() -> None:
    # Prepare
    data, _ = quantize_token(_token(dim=16), "float32")

    # Execute / Assert
    with pytest.raises(CodecError, match="bytes"):
        dequantize_token(data, "float32", 15)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_dequantize_rejects_non_finite_values(dtype: str, bad: float) -> None:
    # Prepare
    tok = _token(dim=8).astype("<f4" if dtype == "float32" else "<f2")
    tok[3] = bad

    # Execute / Assert
    with pytest.raises(CodecError, match="NaN or Inf"):
        dequantize_token(tok.tobytes(), dtype, 8)


@pytest.mark.parametrize("scale", [0.0, -0.5, float("nan"), float("inf")])
def test_dequantize_rejects_bad_int8_scale(scale: float) -> None:
    # Prepare
    data, _ = quantize_token(_token(dim=8), "int8")

    # Execute / Assert
    with pytest.raises(CodecError, match="scale"):
        dequantize_token(data, "int8", 8, scale)


@pytest.mark.parametrize("dtype", ["float64", "uint8", "", "INT8"])
def test_dequantize_rejects_unknown_dtype(dtype: str) -> None:
    with pytest.raises(CodecError, match="dtype"):
        dequantize_token(b"\0" * 8, dtype, 8)
