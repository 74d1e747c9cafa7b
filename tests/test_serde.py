"""Round trips of every serde pair through real protobuf serialization, and decoding errors:
tensors, parameters, downlink batches (visible-token codes, exact wire sizes), acks, datasets,
training jobs and epoch reports."""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsat.ground_station.coordinator import EpochResult, WorkerBytes
from sparsat.ground_station.serde import epoch_to_pb, pb_to_epoch
from sparsat.node.models.training import AdamState
from sparsat.node.wire import downlink, jobs, tensors
from sparsat.node.wire.codec import (
    CodecError,
    PatchData,
    decode_patches,
    decode_visible,
    dequantize_token,
    encode_patches,
    encode_visible,
    parse_patch_record,
    patch_record,
    quantize_token,
)
from sparsat.node.wire.downlink import AckData, BatchBuilder, ClsData, Payload
from sparsat.node.wire.jobs import TrainJob
from sparsat.node.wire.rpc import GRPC_FRAME_BYTES, wire_size
from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb

M = TypeVar("M")


def _wire(msg: M) -> M:
    """What the peer sees: serialize, then parse into a fresh message of the same type."""
    return type(msg).FromString(msg.SerializeToString())  # type: ignore[attr-defined, no-any-return]


def _params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"w1": (6, 5), "b1": (6,), "w2": (4, 6), "b2": (4,), "w3": (3, 4), "b3": (3,)}
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


# ---- tensors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "wire"),
    [
        (np.float32, pb.FLOAT32),
        (np.float16, pb.FLOAT16),
        (np.int8, pb.INT8),
        (np.uint8, pb.UINT8),
        (np.uint16, pb.UINT16),
        (np.int64, pb.INT64),
    ],
)
@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (3, 4), (2, 0, 5), (2, 3, 4)])
def test_ndarray_round_trip_every_dtype(dtype: type, wire: int, shape: tuple[int, ...]) -> None:
    # Prepare
    rng = np.random.default_rng(0)
    info = np.finfo(dtype) if np.issubdtype(dtype, np.floating) else np.iinfo(dtype)
    if np.issubdtype(dtype, np.floating):
        arr = (rng.standard_normal(shape) * 100).astype(dtype)
    else:
        arr = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)

    # Execute
    msg = _wire(tensors.ndarray_to_pb(arr))
    back = tensors.pb_to_ndarray(msg)

    # Assert
    assert msg.dtype == wire
    assert list(msg.shape) == list(shape)
    assert back.dtype == np.dtype(dtype) and back.shape == shape
    np.testing.assert_array_equal(back, arr)


def test_ndarray_round_trip_big_endian_and_non_contiguous() -> None:
    # Prepare
    big = np.arange(12, dtype=">f4").reshape(3, 4)
    strided = np.arange(24, dtype=np.int64).reshape(4, 6)[:, ::2]

    # Execute
    back_big = tensors.pb_to_ndarray(_wire(tensors.ndarray_to_pb(big)))
    back_strided = tensors.pb_to_ndarray(_wire(tensors.ndarray_to_pb(strided)))

    # Assert
    np.testing.assert_array_equal(back_big, big)
    np.testing.assert_array_equal(back_strided, strided)


def test_ndarray_round_trip_zero_dimensional() -> None:
    # Prepare
    arr = np.array(2.5, dtype=np.float32)

    # Execute
    back = tensors.pb_to_ndarray(_wire(tensors.ndarray_to_pb(arr)))

    # Assert
    assert back.shape == ()
    assert float(back) == 2.5


def test_pb_to_ndarray_decodes_empty_shape_as_scalar() -> None:
    # Prepare
    msg = pb.Tensor(shape=[], dtype=pb.INT64, data=np.array([-3], dtype="<i8").tobytes())

    # Execute
    back = tensors.pb_to_ndarray(_wire(msg))

    # Assert
    assert back.shape == () and int(back) == -3


def test_ndarray_scale_survives_the_wire() -> None:
    # Execute
    msg = _wire(tensors.ndarray_to_pb(np.zeros(3, dtype=np.int8), scale=0.25))

    # Assert
    assert msg.scale == 0.25


@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.bool_, np.complex64])
def test_ndarray_without_wire_dtype_raises(dtype: type) -> None:
    with pytest.raises(TypeError, match="wire dtype"):
        tensors.ndarray_to_pb(np.zeros(3, dtype=dtype))


@pytest.mark.parametrize("delta", [-1, 1, -12])
def test_pb_to_ndarray_rejects_data_length_mismatch(delta: int) -> None:
    # Prepare
    msg = tensors.ndarray_to_pb(np.zeros((3, 4), dtype=np.float32))
    msg.data = msg.data[:delta] if delta < 0 else msg.data + b"\0" * delta

    # Execute / Assert
    with pytest.raises(CodecError, match="bytes"):
        tensors.pb_to_ndarray(_wire(msg))


def test_pb_to_ndarray_rejects_negative_dimension() -> None:
    # Prepare
    msg = pb.Tensor(shape=[-1, 4], dtype=pb.FLOAT32, data=b"")

    # Execute / Assert
    with pytest.raises(CodecError, match="negative"):
        tensors.pb_to_ndarray(_wire(msg))


@pytest.mark.parametrize("dtype", [pb.DTYPE_UNSPECIFIED, 99])
def test_pb_to_ndarray_rejects_unknown_dtype(dtype: int) -> None:
    # Prepare
    msg = pb.Tensor(shape=[1], dtype=dtype, data=b"\0" * 4)  # type: ignore[arg-type]

    # Execute / Assert
    with pytest.raises(CodecError, match="dtype"):
        tensors.pb_to_ndarray(_wire(msg))


@pytest.mark.parametrize("shape", [[2**32, 2**32], [2**62, 4]])
def test_pb_to_ndarray_rejects_overflowing_shape_with_codec_error(shape: list[int]) -> None:
    # Prepare
    msg = pb.Tensor(shape=shape, dtype=pb.FLOAT32, data=b"")

    # Execute / Assert
    with pytest.raises(CodecError):
        tensors.pb_to_ndarray(_wire(msg))


# ---- parameters -----------------------------------------------------------------------------


def test_params_round_trip() -> None:
    # Prepare
    params = _params()

    # Execute
    named = [_wire(nt) for nt in tensors.params_to_pb(params)]
    back = tensors.pb_to_params(named)

    # Assert
    assert list(back) == list(params)
    for k, v in params.items():
        assert back[k].dtype == torch.float32
        assert torch.equal(back[k], v)


def test_params_decoded_are_writable_and_independent_of_the_message() -> None:
    # Prepare
    named = [_wire(nt) for nt in tensors.params_to_pb(_params())]

    # Execute
    back = tensors.pb_to_params(named)
    back["w1"].add_(1.0)  # would fail on a read-only buffer

    # Assert
    assert not torch.equal(back["w1"], tensors.pb_to_params(named)["w1"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_pb_to_params_rejects_non_finite(bad: float) -> None:
    # Prepare
    params = _params()
    params["w2"][1, 2] = bad

    # Execute / Assert
    with pytest.raises(CodecError, match="w2"):
        tensors.pb_to_params([_wire(nt) for nt in tensors.params_to_pb(params)])


def test_pb_to_params_rejects_non_float32() -> None:
    # Prepare
    named = [pb.NamedTensor(name="w1", tensor=tensors.ndarray_to_pb(np.zeros(3, np.float16)))]

    # Execute / Assert
    with pytest.raises(CodecError, match="FLOAT32"):
        tensors.pb_to_params(named)


# ---- visible-token codes --------------------------------------------------------------------


def _ref_bitmap(visible: np.ndarray, grid: int) -> bytes:
    """The bitmap as the proto describes it, written independently: token t is bit t % 8 of
    byte t // 8, ceil(g*g / 8) bytes."""
    out = bytearray((grid * grid + 7) // 8)
    for t in visible.tolist():
        out[t // 8] |= 1 << (t % 8)
    return bytes(out)


def _ref_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n >= 0x80 else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _ref_runs(visible: np.ndarray, grid: int) -> bytes:
    """Runs as the proto describes them: hidden, visible, hidden... (the first may be 0)."""
    on = set(visible.tolist())
    runs, state, length = [], False, 0
    for t in range(grid * grid):
        if (t in on) != state:
            runs.append(length)
            state, length = not state, 0
        length += 1
    runs.append(length)
    return b"".join(_ref_varint(r) for r in runs)


def _structured_masks(grid: int) -> dict[str, np.ndarray]:
    n = grid * grid
    return {
        "all": np.arange(n),
        "none": np.arange(0),
        "one token": np.array([n // 2 + 1]),
        "first": np.array([0]),
        "last": np.array([n - 1]),
        "first and last": np.array([0, n - 1]),
        "leading block": np.arange(0, n // 3),
        "trailing block": np.arange(n - n // 4, n),
        "middle block": np.arange(n // 4, n // 2),
        "two blocks": np.r_[np.arange(3, 9), np.arange(n - 12, n - 2)],
        "alternating even": np.arange(0, n, 2),
        "alternating odd": np.arange(1, n, 2),
        "all but first": np.arange(1, n),
        "all but last": np.arange(0, n - 1),
        "one row": np.arange(grid, 2 * grid),
        "one column": np.arange(3, n, grid),
    }


def _random_masks(grid: int, count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    n = grid * grid
    masks = []
    for k in range(count):
        if k % 2:  # scattered: any density
            masks.append(np.flatnonzero(rng.random(n) < rng.random()))
        else:  # a few contiguous regions, like a cloud field's holes
            m = np.zeros(n, dtype=bool)
            for _ in range(int(rng.integers(1, 4))):
                a = int(rng.integers(0, n))
                m[a : a + int(rng.integers(1, n // 2))] = True
            masks.append(np.flatnonzero(m))
    return masks


def _check_code(visible: np.ndarray, grid: int) -> None:
    code, runs = encode_visible(visible.astype(np.uint16), grid)
    bitmap, run_code = _ref_bitmap(visible, grid), _ref_runs(visible, grid)
    # runs only when strictly smaller, the bitmap on a tie; the bytes exactly the reference's
    assert runs == (len(run_code) < len(bitmap))
    assert code == (run_code if runs else bitmap)
    # the code is self-delimiting: pixels may follow it in the same bytes
    back, used = decode_visible(code + b"\x07\xff\x80" * 5, runs, grid)
    assert used == len(code)
    assert back.dtype == np.uint16
    np.testing.assert_array_equal(back, visible)
    # the other code decodes to the same tokens too
    other = bitmap if runs else run_code
    back2, used2 = decode_visible(other, not runs, grid)
    assert used2 == len(other)
    np.testing.assert_array_equal(back2, visible)


@pytest.mark.parametrize("grid", [7, 14])
@pytest.mark.parametrize("name", list(_structured_masks(7)))
def test_visible_code_round_trip_structured_masks(grid: int, name: str) -> None:
    _check_code(_structured_masks(grid)[name], grid)


@pytest.mark.parametrize("grid", [7, 14])
def test_visible_code_round_trip_random_masks(grid: int) -> None:
    masks = _random_masks(grid, 400, seed=grid)
    chosen = []
    for visible in masks:
        _check_code(visible, grid)
        chosen.append(encode_visible(visible.astype(np.uint16), grid)[1])
    assert 0 < sum(chosen) < len(chosen)  # both codes were exercised


@pytest.mark.parametrize(
    ("grid", "visible", "code", "runs"),
    [
        (7, np.arange(49), b"\x00\x31", True),  # [0, 49]: 2 B instead of a 7 B bitmap
        (7, np.arange(0), b"\x31", True),  # [49]
        (7, np.array([0, 2, 4]), b"\x15\x00\x00\x00\x00\x00\x00", False),
        (7, np.array([48]), b"\x30\x01", True),  # [48, 1]
        (14, np.arange(196), b"\x00\xc4\x01", True),  # 196 takes a 2-byte varint
        (14, np.array([9]), b"\x09\x01\xba\x01", True),  # [9, 1, 186]
    ],
)
def test_visible_code_exact_bytes(grid: int, visible: np.ndarray, code: bytes,
                                  runs: bool) -> None:
    assert encode_visible(visible.astype(np.uint16), grid) == (code, runs)


def test_visible_code_tie_goes_to_the_bitmap() -> None:
    # Prepare: grid 2 has a 1-byte bitmap, smaller than [1, 1, 2] and [0, 4]; on grid 3 every
    # token is [0, 9], 2 B, the size of its 2-byte bitmap: a tie
    cases = [(2, np.array([1])), (2, np.arange(4)), (3, np.arange(9))]

    # Execute / Assert
    for grid, visible in cases:
        code, runs = encode_visible(visible.astype(np.uint16), grid)
        assert not runs and code == _ref_bitmap(visible, grid)


@pytest.mark.parametrize(
    ("grid", "record", "runs", "match"),
    [
        (7, b"\x00" * 6 + b"\x02", False, "bits past the 49 tokens"),  # token 49
        (7, b"\x00" * 6 + b"\x80", False, "bits past the 49 tokens"),  # token 55
        (14, b"\x00" * 24 + b"\x10", False, "bits past the 196 tokens"),  # token 196
        (7, b"\xff" * 6, False, "needs 7 bytes"),
        (14, b"", False, "needs 25 bytes"),
        (7, _ref_varint(10) + _ref_varint(40), True, "sum to 50"),  # overrun
        (7, _ref_varint(48) + _ref_varint(2), True, "sum to 50"),
        (14, _ref_varint(100) + _ref_varint(97), True, "sum to 197"),
        (7, _ref_varint(10) + _ref_varint(20), True, "end early"),  # short of 49
        (7, b"", True, "end early"),
        (7, b"\x80", True, "end early"),  # a varint cut short
        (7, b"\xff" * 6, True, "malformed"),  # a varint past 32 bits
        (7, b"\x0a\x00\x27", True, "only the first run may be empty"),  # [10, 0, 39]
        (7, b"\x00\x00\x31", True, "only the first run may be empty"),  # [0, 0, 49]
        (7, b"\x31\x00", False, "needs 7 bytes"),  # a run code read as a bitmap
    ],
    ids=["bit 49", "bit 55", "grid 14 bit 196", "bitmap short", "bitmap empty", "runs overrun",
         "last run overruns", "grid 14 overrun", "runs end early", "runs empty",
         "varint cut", "varint too long", "empty middle run", "empty second run",
         "runs as bitmap"],
)
def test_decode_visible_rejects_malformed_codes(grid: int, record: bytes, runs: bool,
                                                match: str) -> None:
    with pytest.raises(CodecError, match=match):
        decode_visible(record, runs, grid)


def test_decode_visible_accepts_a_first_run_of_zero_only_at_the_start() -> None:
    # Execute
    visible, used = decode_visible(b"\x00\x05\x2c", True, 7)  # [0, 5, 44]

    # Assert
    np.testing.assert_array_equal(visible, np.arange(5))
    assert used == 3


# ---- patch records and payloads --------------------------------------------------------------


def _patch_data(grid: int = 7, shape: tuple[int, int, int] = (28, 28, 1),
                visible: np.ndarray | None = None) -> PatchData:
    image = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    vis = visible if visible is not None else np.array([0, 3, 10, 11, grid * grid - 1])
    return encode_patches(image, grid, vis.astype(np.uint16))


def _wire_batch(b: BatchBuilder, max_id: int = 1 << 40) -> downlink.BatchData:
    return downlink.pb_to_batch(_wire(b.to_pb()), max_id)


@pytest.mark.parametrize(("grid", "shape"), [(7, (28, 28, 1)), (5, (32, 20, 3)), (14, (28, 28, 1))])
@pytest.mark.parametrize("mask", ["scattered", "all"])
def test_patch_payload_round_trip_through_a_batch(grid: int, shape: tuple[int, int, int],
                                                  mask: str) -> None:
    # Prepare
    visible = None if mask == "scattered" else np.arange(grid * grid)
    data = _patch_data(grid, shape, visible)
    builder = BatchBuilder("sat-0")
    builder.add(downlink.patch_payload(3, 7, data, with_shape=True))

    # Execute
    batch = _wire_batch(builder)
    back = parse_patch_record(batch.patches[0], bool(batch.runs[0]),
                              tuple(batch.shapes.tolist()), grid)  # type: ignore[arg-type]

    # Assert
    assert batch.satellite_id == "sat-0"
    assert batch.ids.tolist() == [3] and batch.labels.tolist() == [7]
    assert batch.shapes.tolist() == list(shape)
    ref = visible if visible is not None else np.array([0, 3, 10, 11, grid * grid - 1])
    assert bool(batch.runs[0]) == (len(_ref_runs(ref, grid)) < len(_ref_bitmap(ref, grid)))
    if mask == "all":  # every token: [0, g*g] beats any bitmap
        assert batch.runs[0] and len(batch.patches[0]) - len(data.pixels) <= 3
    assert (back.height, back.width, back.channels, back.grid) == (*shape, grid)
    np.testing.assert_array_equal(back.visible_idx, data.visible_idx)
    assert back.visible_idx.dtype == np.uint16
    assert back.pixels == data.pixels
    np.testing.assert_array_equal(decode_patches(back), decode_patches(data))


def test_patch_record_is_code_then_pixels() -> None:
    # Prepare
    data = _patch_data()

    # Execute
    record, runs = patch_record(data)

    # Assert: a 7-byte bitmap (5 scattered tokens: runs would be 8 B), then the pixels
    assert not runs
    assert record == _ref_bitmap(np.array([0, 3, 10, 11, 48]), 7) + data.pixels
    assert len(data.pixels) == 5 * 16


def test_patch_payload_without_shape_and_cls_payload() -> None:
    # Prepare
    data = _patch_data()
    token = ClsData(b"\x01\x02", "int8", 2, 0.5)

    # Execute
    p = downlink.patch_payload(12, 4, data, with_shape=False)
    c = downlink.cls_payload(13, 5, token)

    # Assert
    assert (p.id, p.label, p.runs, p.scale, p.shape) == (12, 4, False, 0.0, None)
    assert p.data == patch_record(data)[0]
    assert (c.id, c.label, c.data, c.runs, c.scale, c.shape) == (13, 5, b"\x01\x02", False,
                                                                  0.5, None)


@pytest.mark.parametrize(
    ("record_change", "match"),
    [
        (lambda r: r[:-1], "pixels: 79 bytes, the visible tiles need 80"),
        (lambda r: r + b"\x00", "pixels: 81 bytes, the visible tiles need 80"),
        (lambda r: b"\x00" * 7, "no visible tokens"),
        (lambda r: r[:3], "needs 7 bytes"),
    ],
    ids=["pixels short", "pixels long", "no token", "code cut"],
)
def test_parse_patch_record_rejects_bad_records(record_change: Any, match: str) -> None:
    # Prepare
    record, runs = patch_record(_patch_data())

    # Execute / Assert
    with pytest.raises(CodecError, match=match):
        parse_patch_record(record_change(record), runs, (28, 28, 1), 7)


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_cls_payload_round_trip_through_a_batch(dtype: str) -> None:
    # Prepare
    rng = np.random.default_rng(0)
    tokens = [rng.standard_normal(192).astype(np.float32) for _ in range(3)]
    builder = BatchBuilder("sat-1", cls=True, int8=dtype == "int8")
    quantized = [quantize_token(t, dtype) for t in tokens]
    for k, (data, scale) in enumerate(quantized):
        builder.add(downlink.cls_payload(10 + 5 * k, k, ClsData(data, dtype, 192, scale)))

    # Execute
    batch = _wire_batch(builder)

    # Assert
    size = {"float32": 4, "float16": 2, "int8": 1}[dtype] * 192
    assert batch.ids.tolist() == [10, 15, 20] and batch.labels.tolist() == [0, 1, 2]
    assert batch.patches == [] and batch.shapes.size == 0
    assert batch.tokens == b"".join(d for d, _ in quantized) and len(batch.tokens) == 3 * size
    if dtype == "int8":
        scales = np.frombuffer(batch.scales, "<f4")
        # the wire scale is float32: the int8 scale survives at float32 precision
        assert scales.tolist() == [float(np.float32(s)) for _, s in quantized]
    else:
        assert batch.scales == b""
    wire_scales = (np.frombuffer(batch.scales, "<f4").tolist() if dtype == "int8"
                   else [0.0] * 3)
    for k, (data, scale) in enumerate(quantized):
        back = dequantize_token(batch.tokens[k * size : (k + 1) * size], dtype, 192,
                                wire_scales[k])
        np.testing.assert_array_equal(
            back, dequantize_token(data, dtype, 192, float(np.float32(scale))))
        tol = {"float32": 0.0, "float16": 1e-3, "int8": 0.01}[dtype]
        assert float(np.abs(back - tokens[k]).max()) <= tol * float(np.abs(tokens[k]).max())


# ---- batches --------------------------------------------------------------------------------


def _random_payload(rng: np.random.Generator, cls: bool, int8: bool, with_shape: bool,
                    sample_id: int) -> Payload:
    label = int(rng.choice([0, 9, 127, 128, 1000, 2**20]))
    if cls:
        n = int(rng.choice([0, 1, 64, 127, 128, 200, 16384]))
        scale = float(rng.random()) + 0.01 if int8 else 0.0
        return Payload(sample_id, label, rng.bytes(n), scale=scale)
    grid = int(rng.choice([7, 14]))
    shape = (int(rng.integers(grid, 300)), int(rng.integers(grid, 300)), int(rng.choice([1, 3])))
    masks = _random_masks(grid, 1, int(rng.integers(1 << 30)))
    choice = int(rng.integers(4))
    visible = (masks[0] if choice == 0 else np.arange(grid * grid) if choice == 1
               else np.array([int(rng.integers(grid * grid))]) if choice == 2
               else np.flatnonzero(rng.random(grid * grid) < 0.5))
    code, runs = encode_visible(visible.astype(np.uint16), grid)
    pixels = rng.bytes(int(rng.choice([0, 10, 100, 126, 127, 200, 16380, 20000])))
    return Payload(sample_id, label, code + pixels, runs, shape=shape if with_shape else None)


@pytest.mark.parametrize("kind", ["patches", "float32", "float16", "int8"])
def test_batch_wire_size_is_byte_size_plus_frame_at_every_step(kind: str) -> None:
    # Prepare
    rng = np.random.default_rng({"patches": 1, "float32": 2, "float16": 3, "int8": 4}[kind])
    cls, int8 = kind != "patches", kind == "int8"
    checked = 0
    shapes_seen: set[bool] = set()
    runs_seen: set[bool] = set()
    rle_lengths: set[int] = set()

    for trial in range(60):
        satellite = "" if trial % 3 == 0 else "s" * int(rng.choice([1, 5, 127, 128, 300]))
        with_shape = not cls and trial % 2 == 1
        builder = BatchBuilder(satellite, cls=cls, int8=int8)
        next_id = int(rng.choice([0, 1, 127, 128, 59_999, 2**40]))
        for _ in range(int(rng.integers(0, 25))):
            p = _random_payload(rng, cls, int8, with_shape, next_id)
            next_id += int(rng.choice([1, 2, 127, 128, 16384, 60_000, 2**35]))

            # Execute
            predicted = builder.wire_size(p)
            builder.add(p)
            msg = builder.to_pb()

            # Assert
            assert predicted == builder.wire_size() == msg.ByteSize() + GRPC_FRAME_BYTES
            assert wire_size(_wire(msg)) == predicted
            checked += 1
            shapes_seen.add(len(msg.shapes) > 0)
            runs_seen.update(q.runs for q in builder.items)
            rle_lengths.add(len(msg.rle))
        empty_or_full = builder.to_pb()
        assert builder.wire_size() == empty_or_full.ByteSize() + GRPC_FRAME_BYTES

    assert checked > 500
    if not cls:  # the rng reached the cases that matter
        assert shapes_seen == {True, False} and runs_seen == {True, False}
        assert {0, 1, 2, 3} <= rle_lengths


def test_batch_to_pb_packs_deltas_labels_and_rle_flags() -> None:
    # Prepare: runs at positions 1 and 9, a bitmap last (trailing zero bytes are left off)
    builder = BatchBuilder("sat-2")
    ids = [5, 6, 200, 60_005, 60_006, 60_010, 70_000, 70_001, 70_002, 120_000, 120_001]
    for k, i in enumerate(ids):
        builder.add(Payload(i, k % 10, bytes([k]) * 3, runs=k in (1, 9)))

    # Execute
    msg = _wire(builder.to_pb())
    batch = downlink.pb_to_batch(msg, 180_000)

    # Assert
    assert msg.satellite_id == "sat-2"
    assert list(msg.ids) == [5, 1, 194, 59_805, 1, 4, 9990, 1, 1, 49_998, 1]
    assert list(msg.labels) == [k % 10 for k in range(11)]
    assert msg.rle == b"\x02\x02"
    assert list(msg.patches) == [bytes([k]) * 3 for k in range(11)]
    assert not msg.tokens and not msg.scales and not msg.shapes
    assert batch.ids.tolist() == ids
    assert batch.runs.tolist() == [k in (1, 9) for k in range(11)]
    assert not batch.repeats.any()


def test_batch_without_runs_sends_no_rle_field() -> None:
    # Prepare
    builder = BatchBuilder("")
    for i in range(9):
        builder.add(Payload(i, 1, b"\x01" * 7))

    # Execute
    msg = builder.to_pb()

    # Assert
    assert msg.rle == b"" and not msg.satellite_id
    assert builder.wire_size() == msg.ByteSize() + 5


@pytest.mark.parametrize("second", [4, 3])
def test_batch_ids_must_increase(second: int) -> None:
    # Prepare
    builder = BatchBuilder("sat-0")
    builder.add(Payload(4, 1, b"x"))

    # Execute / Assert
    with pytest.raises(ValueError, match="ids must increase"):
        builder.wire_size(Payload(second, 1, b"x"))
    with pytest.raises(ValueError, match="ids must increase"):
        builder.add(Payload(second, 1, b"x"))
    assert [p.id for p in builder.items] == [4]
    assert builder.wire_size() == builder.to_pb().ByteSize() + 5


def test_pb_to_batch_marks_ids_past_max_and_repeats() -> None:
    # Prepare: ids 3, 3 (repeat), 10, 99 (past max 50), then 100 (after one past max)
    msg = pb.DownlinkBatch(satellite_id="s", ids=[3, 0, 7, 89, 1], labels=[1, 2, 3, 4, 5],
                           patches=[b"a", b"b", b"c", b"d", b"e"], rle=b"\x05\x00\x00")

    # Execute
    batch = downlink.pb_to_batch(_wire(msg), max_id=50)

    # Assert
    assert batch.ids.tolist() == [3, 3, 10, -1, -1]
    assert batch.repeats.tolist() == [False, True, False, False, False]
    assert batch.labels.tolist() == [1, 2, 3, 4, 5]
    assert batch.runs.tolist() == [True, False, True, False, False]  # rle longer: cut
    assert batch.patches == [b"a", b"b", b"c", b"d", b"e"]


def test_pb_to_batch_huge_delta_does_not_wrap() -> None:
    # Prepare: a delta of 2**64 - 1 would wrap an int64 sum back into range
    msg = pb.DownlinkBatch(ids=[5, 2**64 - 1, 2], labels=[0, 0, 0])

    # Execute
    batch = downlink.pb_to_batch(msg, max_id=60_000)

    # Assert
    assert batch.ids.tolist() == [5, -1, -1]


def test_pb_to_batch_short_rle_means_bitmaps() -> None:
    # Execute
    batch = downlink.pb_to_batch(pb.DownlinkBatch(ids=[1] * 10, patches=[b"x"] * 10,
                                               rle=b"\x80"), 100)

    # Assert
    assert batch.runs.tolist() == [False] * 7 + [True, False, False]


def test_pack_fills_batches_within_batch_bytes_and_budget() -> None:
    # Prepare: 40 patch payloads of 150-350 bytes
    rng = np.random.default_rng(5)
    payloads = [Payload(3 * k, k % 10, rng.bytes(int(rng.integers(150, 350))))
                for k in range(40)]
    made: list[bool] = []

    def new_batch(first: bool, _basis: int) -> BatchBuilder:
        made.append(first)
        return BatchBuilder("sat-0" if first else "")

    # Execute
    batches = downlink.pack(iter(payloads), new_batch, budget=6000, batch_bytes=1500)

    # Assert
    assert made[0] and not any(made[1:])
    sent = [p for b in batches for p in b.items]
    assert sent == payloads[: len(sent)] and len(sent) < len(payloads)
    room = downlink.max_ack_bytes
    total = sum(b.wire_size() + room(len(b.items)) for b in batches)
    assert total <= 6000
    assert all(b.wire_size() + room(len(b.items)) <= 1500 for b in batches)
    # the next payload would not have fit: neither in the last batch nor in a new one
    nxt = payloads[len(sent)]
    last = batches[-1]
    assert (total - last.wire_size() - room(len(last.items))
            + last.wire_size(nxt) + room(len(last.items) + 1) > 6000
            or last.wire_size(nxt) + room(len(last.items) + 1) > 1500)
    assert total + BatchBuilder("").wire_size(nxt) + room(1) > 6000


def test_pack_sends_a_payload_too_big_for_a_batch_alone() -> None:
    # Prepare
    payloads = [Payload(1, 0, b"a" * 100), Payload(2, 0, b"b" * 5000), Payload(3, 0, b"c" * 100)]

    # Execute
    batches = downlink.pack(iter(payloads), lambda first, _basis: BatchBuilder("s"), 1 << 20, 1000)

    # Assert
    assert [[p.id for p in b.items] for b in batches] == [[1], [2], [3]]


# ---- acks -----------------------------------------------------------------------------------


def _random_ack(rng: np.random.Generator, n: int) -> AckData:
    kind = rng.integers(0, 3, size=n)  # 0 stored, 1 duplicate, 2 rejected
    codes = [3, 7, 6]  # INVALID_ARGUMENT, PERMISSION_DENIED, ALREADY_EXISTS
    return AckData(
        stored=int((kind == 0).sum()),
        duplicates=np.flatnonzero(kind == 1).tolist(),
        rejected=[(p, codes[p % 3], p % 14, f"reason {p} \u00e9")
                  for p in np.flatnonzero(kind == 2).tolist()])


def test_ack_round_trip_random() -> None:
    rng = np.random.default_rng(11)
    for n in [0, 1, 2, 3, 8, 50, 300, 1000]:
        for _ in range(10):
            # Prepare
            ack = _random_ack(rng, n)

            # Execute
            back = downlink.pb_to_ack(_wire(downlink.ack_to_pb(ack)), n)

            # Assert
            assert back == ack


@pytest.mark.parametrize(
    ("ack", "n", "runs"),
    [
        (AckData(5, [], []), 5, []),
        (AckData(0, [0, 1, 2, 3, 4], []), 5, [0, 5]),
        (AckData(3, [1, 2], []), 5, [1, 2]),
        (AckData(2, [0, 4], [(2, 3, 8, "x")]), 5, [0, 1, 3, 1]),
        (AckData(0, [], [(0, 3, 5, "a"), (1, 7, 7, "b")]), 2, []),
    ],
)
def test_ack_duplicate_runs_exact(ack: AckData, n: int, runs: list[int]) -> None:
    # Execute
    msg = downlink.ack_to_pb(ack)

    # Assert
    assert list(msg.duplicate_runs) == runs
    assert msg.stored == ack.stored
    assert [(r.position, r.code, r.cause, r.reason) for r in msg.rejected] == ack.rejected
    assert downlink.pb_to_ack(_wire(msg), n) == ack


@pytest.mark.parametrize(
    ("msg", "n"),
    [
        (pb.BatchAck(stored=4), 5),  # a sample unanswered
        (pb.BatchAck(stored=6), 5),  # more than the batch
        (pb.BatchAck(stored=3, duplicate_runs=[3, 3]), 5),  # runs past the batch
        (pb.BatchAck(duplicate_runs=[0, 6]), 5),
        (pb.BatchAck(stored=4, rejected=[pb.Rejected(position=5, code=3)]), 5),
        (pb.BatchAck(stored=3, duplicate_runs=[0, 1],
                     rejected=[pb.Rejected(position=0, code=3)]), 5),  # sums to 5, one twice
        (pb.BatchAck(stored=3, rejected=[pb.Rejected(position=2, code=3),
                                         pb.Rejected(position=2, code=6)]), 5),
        (pb.BatchAck(stored=1), 0),
        (pb.BatchAck(stored=3, duplicate_runs=[1, 1, 0, 1]), 5),
        (pb.BatchAck(stored=4, rejected=[pb.Rejected(position=1, code=17)]), 5),
        (pb.BatchAck(stored=4, rejected=[pb.Rejected(position=1, code=0)]), 5),
        (pb.BatchAck(stored=4, rejected=[pb.Rejected(position=1, code=3, cause=128)]), 5),
        (pb.BatchAck(stored=4, rejected=[pb.Rejected(position=1, code=3, reason="\u00e9" * 25)]),
         5),
    ],
    ids=["unanswered", "too many stored", "runs past", "duplicates past", "position past",
         "rejected duplicate", "rejected twice", "empty batch", "empty run inside",
         "code past the status codes", "code 0", "cause of two bytes", "reason of 50 bytes"],
)
def test_pb_to_ack_refuses_acks_that_do_not_cover_the_batch(msg: pb.BatchAck, n: int) -> None:
    with pytest.raises(CodecError, match="ack"):
        downlink.pb_to_ack(_wire(msg), n)


def test_cap_reason_cuts_on_a_character_boundary() -> None:
    assert downlink.cap_reason("x" * 100) == "x" * downlink.MAX_REASON_BYTES
    capped = downlink.cap_reason("a" + "\u00e9" * 40)  # 1 + 2 x 23 = 47: the 24th would be 49
    assert capped == "a" + "\u00e9" * 23 and len(capped.encode()) == 47
    assert downlink.cap_reason("short") == "short"
    assert downlink.ack_to_pb(AckData(0, [], [(0, 3, 8, "y" * 300)])).rejected[0].reason == "y" * 48


def test_reject_cause_mirrors_the_proto_enum() -> None:
    assert {c.name: c.value for c in downlink.RejectCause} == dict(pb.RejectCause.items())
    assert max(downlink.RejectCause) < 128  # one varint byte: max_ack_bytes counts on it


def _worst_acks(n: int, rng: np.random.Generator) -> list[pb.BatchAck]:
    """Acks of an n-sample batch built to be big: all refused with the longest reasons and
    codes, alternating duplicates, and random mixes of the three answers."""
    long_reason = "\u00e9" * (downlink.MAX_REASON_BYTES // 2)
    every = list(range(n))
    acks = [downlink.ack_to_pb(AckData(0, [], [(p, 16, 127, long_reason) for p in every])),
            downlink.ack_to_pb(AckData(n - n // 2, every[1::2], [])),
            downlink.ack_to_pb(AckData(n // 2, every[0::2], []))]
    for _ in range(3):
        kind = rng.integers(0, 3, size=n)
        acks.append(downlink.ack_to_pb(AckData(
            int((kind == 0).sum()), np.flatnonzero(kind == 1).tolist(),
            [(p, int(rng.integers(1, 17)), int(rng.integers(0, 128)), "r" * 48)
             for p in np.flatnonzero(kind == 2).tolist()])))
    return acks


@pytest.mark.parametrize("n", [1, 2, 3, 127, 128, 129, 4096, 16384, 16385])
def test_max_ack_bytes_bounds_the_worst_acks(n: int) -> None:
    # Prepare
    acks = _worst_acks(n, np.random.default_rng(n))

    # Execute
    bound = downlink.max_ack_bytes(n)

    # Assert: every ack is one the sender accepts, and the bound holds for it
    for ack in acks:
        downlink.pb_to_ack(_wire(ack), n)
        assert ack.ByteSize() + GRPC_FRAME_BYTES <= bound
    # and it is tight: all refused with full reasons comes within n + 10 bytes (of ~59n)
    assert bound - wire_size(acks[0]) <= n + 10
    if n == 4096:  # the case: alternating duplicates, ~4 KB, where 10 B were kept
        assert wire_size(acks[1]) > 4000


def test_max_ack_bytes_is_the_frame_for_an_empty_batch() -> None:
    assert downlink.max_ack_bytes(0) == wire_size(pb.BatchAck()) == GRPC_FRAME_BYTES


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_max_ack_bytes_bounds_any_ack_the_sender_accepts(data: st.DataObject) -> None:
    """Adversarial acks, valid by pb_to_ack's rules, built field by field (runs of any
    length, reasons of any characters, codes and causes anywhere in their ranges)."""
    # Prepare
    n = data.draw(st.integers(1, 300))
    answer = data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))  # stored/dup/refused
    runs: list[int] = []
    dup, length = False, 0  # the run being counted; the first is not-duplicate (maybe 0)
    for a in answer:
        if (a == 1) == dup:
            length += 1
        else:
            runs.append(length)
            dup, length = a == 1, 1
    runs.append(length)
    if not dup and data.draw(st.booleans()):
        runs.pop()  # a trailing not-duplicate run may be left off
    reason = st.text(max_size=48).map(downlink.cap_reason)
    where = [p for p, a in enumerate(answer) if a == 2]
    k = len(where)
    codes = data.draw(st.lists(st.integers(1, 16), min_size=k, max_size=k))
    causes = data.draw(st.lists(st.integers(0, 127), min_size=k, max_size=k))
    reasons = data.draw(st.lists(reason, min_size=k, max_size=k))
    refused = [pb.Rejected(position=p, code=c, cause=cause,  # type: ignore[arg-type]
                           reason=r) for p, c, cause, r in zip(where, codes, causes, reasons,
                                                               strict=True)]
    ack = pb.BatchAck(stored=answer.count(0), duplicate_runs=runs, rejected=refused)

    # Execute
    back = downlink.pb_to_ack(_wire(ack), n)

    # Assert
    assert len(back.duplicates) == answer.count(1)
    assert ack.ByteSize() + GRPC_FRAME_BYTES <= downlink.max_ack_bytes(n)


# ---- dataset chunks -------------------------------------------------------------------------


@pytest.mark.parametrize("n_rows", [1, 37, 40])
def test_dataset_chunks_reassemble_exactly(n_rows: int) -> None:
    # Prepare: 10 float32 features per row, ~4 rows per chunk
    rng = np.random.default_rng(0)
    features = rng.standard_normal((n_rows, 10)).astype(np.float32)
    labels = rng.integers(0, 10, size=n_rows)

    # Execute
    chunks = [_wire(c) for c in jobs.dataset_chunks("ds-1", features, labels, chunk_bytes=160)]
    xs = [tensors.pb_to_ndarray(c.features) for c in chunks]
    ys = [tensors.pb_to_ndarray(c.labels) for c in chunks]

    # Assert
    assert len(chunks) == -(-n_rows // 4)
    assert all(c.dataset_id == "ds-1" and c.total_rows == n_rows for c in chunks)
    assert all(x.dtype == np.float32 and y.dtype == np.int64 for x, y in zip(xs, ys, strict=True))
    np.testing.assert_array_equal(np.concatenate(xs), features)
    np.testing.assert_array_equal(np.concatenate(ys), labels)


def test_dataset_chunks_with_chunk_smaller_than_a_row_send_one_row_each() -> None:
    # Prepare
    features = np.ones((3, 100), dtype=np.float32)

    # Execute
    chunks = list(jobs.dataset_chunks("d", features, np.arange(3), chunk_bytes=1))

    # Assert
    assert [c.features.shape[0] for c in chunks] == [1, 1, 1]


# ---- training jobs and epoch reports ---------------------------------------------------------


def test_train_job_round_trip() -> None:
    # Prepare
    job = TrainJob(dataset_id="train-100-abc", round=12, worker=3, steps=10, batch_size=64,
                   lr=1e-3, seed=2**40 + 7, params=_params(1))

    # Execute
    back = jobs.pb_to_train_job(_wire(jobs.train_job_to_pb(job)))

    # Assert
    assert (back.dataset_id, back.round, back.worker, back.steps, back.batch_size, back.lr,
            back.seed) == ("train-100-abc", 12, 3, 10, 64, 1e-3, 2**40 + 7)
    assert list(back.params) == list(job.params)
    for k in job.params:
        assert torch.equal(back.params[k], job.params[k])


@pytest.mark.parametrize("part_bytes", [1, 100, 10_000, 1 << 30])
def test_a_train_request_split_into_parts_merges_back_whole(part_bytes: int) -> None:
    # Prepare
    params = _params(2)
    job = TrainJob("d", 3, 1, 2, 64, 1e-3, 99, params,
                   AdamState.zeros(params, full_steps=True), 2.0, offset=640, rows=100)
    request = jobs.train_job_to_pb(job)

    # Execute
    parts = jobs.split_request(request, part_bytes)
    merged, size = jobs.merge_request(iter(parts))

    # Assert
    assert merged == request
    assert size == sum(wire_size(p) for p in parts)
    assert len(parts) == (1 if part_bytes >= request.ByteSize() else len(parts))
    if part_bytes == 1:  # one tensor a part, the scalars with the first
        assert len(parts) == len(params) * 4 and len(parts[0].params) == 1
    assert sum(p.ByteSize() for p in parts) - request.ByteSize() < 8 * len(parts)


def test_epoch_round_trip() -> None:
    # Prepare: float fields are float32 on the wire; use values float32 holds exactly
    result = EpochResult(
        epoch=4, accuracy=0.8125, test_loss=0.5, train_loss=0.375,
        dataset_bytes=[WorkerBytes("t0", 1000, 20), WorkerBytes("t1", 999, 21)],
        rounds=[[WorkerBytes("t0", 5, 6), WorkerBytes("t1", 7, 8)], [WorkerBytes("t0", 9, 10)]],
        samples_trained=1280,
    )

    # Execute
    msg = _wire(epoch_to_pb(result))
    back = pb_to_epoch(msg)

    # Assert
    assert back == result
    assert [r.round for r in msg.rounds] == [0, 1]


def test_epoch_round_trip_keeps_float32_precision() -> None:
    # Prepare
    result = EpochResult(epoch=1, accuracy=0.8123, test_loss=0.41234567, train_loss=1 / 3)

    # Execute
    back = pb_to_epoch(_wire(epoch_to_pb(result)))

    # Assert
    assert back.accuracy == pytest.approx(result.accuracy, rel=1e-7)
    assert back.test_loss == pytest.approx(result.test_loss, rel=1e-7)
    assert back.train_loss == pytest.approx(result.train_loss, rel=1e-7)
    assert back.rounds == [] and back.dataset_bytes == []


# ---- wire size ------------------------------------------------------------------------------


def _a_batch() -> pb.DownlinkBatch:
    builder = BatchBuilder("sat-0")
    builder.add(downlink.patch_payload(3, 7, _patch_data(), with_shape=False))
    builder.add(downlink.patch_payload(9, 2, _patch_data(visible=np.arange(49)), with_shape=False))
    return builder.to_pb()


@pytest.mark.parametrize(
    "msg",
    [
        pb.BatchAck(),
        pb.BatchAck(stored=3, duplicate_runs=[1, 2],
                    rejected=[pb.Rejected(position=0, code=3, reason="a" * 300)]),
        pb.DownlinkBatch(),
        _a_batch(),
        jobs.train_job_to_pb(TrainJob("d", 1, 0, 5, 64, 1e-3, 0, _params())),
        pb.HealthRequest(),
    ],
)
def test_wire_size_is_serialized_length_plus_grpc_frame(msg: Any) -> None:
    # Execute
    size = wire_size(msg)

    # Assert
    assert GRPC_FRAME_BYTES == 5
    assert size == len(msg.SerializeToString()) + 5
