"""Round trips of every serde pair through real protobuf serialization, and decoding errors."""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import pytest
import torch

from ground_station.coordinator import EpochResult, WorkerBytes
from ground_station.serde import epoch_to_pb, pb_to_epoch
from node import serde
from node.codec import CodecError, PatchData, encode_patches, quantize_token
from node.rpc import GRPC_FRAME_BYTES, wire_size
from node.serde import ClsData, SampleData, TrainJob
from node.training import AdamState
from proto.sparsat.v1 import sparsat_pb2 as pb

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
    msg = _wire(serde.ndarray_to_pb(arr))
    back = serde.pb_to_ndarray(msg)

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
    back_big = serde.pb_to_ndarray(_wire(serde.ndarray_to_pb(big)))
    back_strided = serde.pb_to_ndarray(_wire(serde.ndarray_to_pb(strided)))

    # Assert
    np.testing.assert_array_equal(back_big, big)
    np.testing.assert_array_equal(back_strided, strided)


def test_ndarray_round_trip_zero_dimensional() -> None:
    # Prepare
    arr = np.array(2.5, dtype=np.float32)

    # Execute
    back = serde.pb_to_ndarray(_wire(serde.ndarray_to_pb(arr)))

    # Assert
    assert back.shape == ()
    assert float(back) == 2.5


def test_pb_to_ndarray_decodes_empty_shape_as_scalar() -> None:
    # Prepare
    msg = pb.Tensor(shape=[], dtype=pb.INT64, data=np.array([-3], dtype="<i8").tobytes())

    # Execute
    back = serde.pb_to_ndarray(_wire(msg))

    # Assert
    assert back.shape == () and int(back) == -3


def test_ndarray_scale_survives_the_wire() -> None:
    # Execute
    msg = _wire(serde.ndarray_to_pb(np.zeros(3, dtype=np.int8), scale=0.25))

    # Assert
    assert msg.scale == 0.25


@pytest.mark.parametrize("dtype", [np.float64, np.int32, np.bool_, np.complex64])
def test_ndarray_without_wire_dtype_raises(dtype: type) -> None:
    with pytest.raises(TypeError, match="wire dtype"):
        serde.ndarray_to_pb(np.zeros(3, dtype=dtype))


@pytest.mark.parametrize("delta", [-1, 1, -12])
def test_pb_to_ndarray_rejects_data_length_mismatch(delta: int) -> None:
    # Prepare
    msg = serde.ndarray_to_pb(np.zeros((3, 4), dtype=np.float32))
    msg.data = msg.data[:delta] if delta < 0 else msg.data + b"\0" * delta

    # Execute / Assert
    with pytest.raises(CodecError, match="bytes"):
        serde.pb_to_ndarray(_wire(msg))


def test_pb_to_ndarray_rejects_negative_dimension() -> None:
    # Prepare
    msg = pb.Tensor(shape=[-1, 4], dtype=pb.FLOAT32, data=b"")

    # Execute / Assert
    with pytest.raises(CodecError, match="negative"):
        serde.pb_to_ndarray(_wire(msg))


@pytest.mark.parametrize("dtype", [pb.DTYPE_UNSPECIFIED, 99])
def test_pb_to_ndarray_rejects_unknown_dtype(dtype: int) -> None:
    # Prepare
    msg = pb.Tensor(shape=[1], dtype=dtype, data=b"\0" * 4)  # type: ignore[arg-type]

    # Execute / Assert
    with pytest.raises(CodecError, match="dtype"):
        serde.pb_to_ndarray(_wire(msg))


@pytest.mark.parametrize("shape", [[2**32, 2**32], [2**62, 4]])
def test_pb_to_ndarray_rejects_overflowing_shape_with_codec_error(shape: list[int]) -> None:
    # Prepare
    msg = pb.Tensor(shape=shape, dtype=pb.FLOAT32, data=b"")

    # Execute / Assert
    with pytest.raises(CodecError):
        serde.pb_to_ndarray(_wire(msg))


# ---- parameters -----------------------------------------------------------------------------


def test_params_round_trip() -> None:
    # Prepare
    params = _params()

    # Execute
    named = [_wire(nt) for nt in serde.params_to_pb(params)]
    back = serde.pb_to_params(named)

    # Assert
    assert list(back) == list(params)
    for k, v in params.items():
        assert back[k].dtype == torch.float32
        assert torch.equal(back[k], v)


def test_params_decoded_are_writable_and_independent_of_the_message() -> None:
    # Prepare
    named = [_wire(nt) for nt in serde.params_to_pb(_params())]

    # Execute
    back = serde.pb_to_params(named)
    back["w1"].add_(1.0)  # would fail on a read-only buffer

    # Assert
    assert not torch.equal(back["w1"], serde.pb_to_params(named)["w1"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_pb_to_params_rejects_non_finite(bad: float) -> None:
    # Prepare
    params = _params()
    params["w2"][1, 2] = bad

    # Execute / Assert
    with pytest.raises(CodecError, match="w2"):
        serde.pb_to_params([_wire(nt) for nt in serde.params_to_pb(params)])


def test_pb_to_params_rejects_non_float32() -> None:
    # Prepare
    named = [pb.NamedTensor(name="w1", tensor=serde.ndarray_to_pb(np.zeros(3, np.float16)))]

    # Execute / Assert
    with pytest.raises(CodecError, match="FLOAT32"):
        serde.pb_to_params(named)


# ---- samples --------------------------------------------------------------------------------


def _patch_sample(grid: int = 7, shape: tuple[int, int, int] = (28, 28, 1)) -> SampleData:
    image = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    visible = np.array([0, 3, 10, 11, grid * grid - 1], dtype=np.uint16)
    return SampleData("fashion_mnist/train/3", "sat-0", 7, encode_patches(image, grid, visible))


@pytest.mark.parametrize(("grid", "shape"), [(7, (28, 28, 1)), (5, (32, 20, 3))])
def test_patch_sample_round_trip(grid: int, shape: tuple[int, int, int]) -> None:
    # Prepare
    sample = _patch_sample(grid, shape)

    # Execute
    msg = _wire(serde.sample_to_pb(sample))
    back = serde.pb_to_sample(msg)

    # Assert
    assert msg.WhichOneof("payload") == "patches"
    assert len(msg.patches.visible_idx) == 2 * len(sample.payload.visible_idx)  # type: ignore[union-attr]
    assert (back.sample_id, back.sensor_id, back.label) == ("fashion_mnist/train/3", "sat-0", 7)
    p, q = back.payload, sample.payload
    assert isinstance(p, PatchData) and isinstance(q, PatchData)
    assert (p.height, p.width, p.channels, p.grid) == (q.height, q.width, q.channels, q.grid)
    assert p.visible_idx.dtype == np.uint16
    np.testing.assert_array_equal(p.visible_idx, q.visible_idx)
    assert p.pixels == q.pixels


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_cls_sample_round_trip(dtype: str) -> None:
    # Prepare
    token = np.random.default_rng(0).standard_normal(192).astype(np.float32)
    data, scale = quantize_token(token, dtype)
    sample = SampleData("id-9", "sat-1", 2, ClsData(data, dtype, 192, scale))

    # Execute
    msg = _wire(serde.sample_to_pb(sample))
    back = serde.pb_to_sample(msg)

    # Assert
    assert msg.WhichOneof("payload") == "cls"
    assert (back.sample_id, back.sensor_id, back.label) == ("id-9", "sat-1", 2)
    assert isinstance(back.payload, ClsData)
    assert back.payload.dtype == dtype and back.payload.dim == 192
    assert back.payload.data == data
    # the wire scale is float32: the int8 scale survives at float32 precision
    assert back.payload.scale == float(np.float32(scale))


def test_pb_to_sample_rejects_odd_visible_idx_bytes() -> None:
    # Prepare
    msg = serde.sample_to_pb(_patch_sample())
    msg.patches.visible_idx = msg.patches.visible_idx + b"\0"

    # Execute / Assert
    with pytest.raises(CodecError, match="even number of bytes"):
        serde.pb_to_sample(_wire(msg))


def test_pb_to_sample_rejects_sample_without_payload() -> None:
    # Prepare
    msg = pb.Sample(sample_id="x", sensor_id="sat-0", label=1)

    # Execute / Assert
    with pytest.raises(CodecError, match="no payload"):
        serde.pb_to_sample(_wire(msg))


@pytest.mark.parametrize("shape", [[], [2, 96], [1, 1, 192]])
def test_pb_to_sample_rejects_cls_not_one_dimensional(shape: list[int]) -> None:
    # Prepare
    msg = pb.Sample(sample_id="x", sensor_id="sat-0", label=1)
    msg.cls.token.CopyFrom(pb.Tensor(shape=shape, dtype=pb.FLOAT32, data=b"\0" * 768))

    # Execute / Assert
    with pytest.raises(CodecError, match="shape"):
        serde.pb_to_sample(_wire(msg))


@pytest.mark.parametrize("dtype", [pb.DTYPE_UNSPECIFIED, pb.UINT8, pb.INT64])
def test_pb_to_sample_rejects_cls_wrong_dtype(dtype: int) -> None:
    # Prepare
    msg = pb.Sample(sample_id="x", sensor_id="sat-0", label=1)
    msg.cls.token.CopyFrom(pb.Tensor(shape=[8], dtype=dtype, data=b"\0" * 8))  # type: ignore[arg-type]

    # Execute / Assert
    with pytest.raises(CodecError, match="dtype"):
        serde.pb_to_sample(_wire(msg))


# ---- dataset chunks -------------------------------------------------------------------------


@pytest.mark.parametrize("n_rows", [1, 37, 40])
def test_dataset_chunks_reassemble_exactly(n_rows: int) -> None:
    # Prepare: 10 float32 features per row, ~4 rows per chunk
    rng = np.random.default_rng(0)
    features = rng.standard_normal((n_rows, 10)).astype(np.float32)
    labels = rng.integers(0, 10, size=n_rows)

    # Execute
    chunks = [_wire(c) for c in serde.dataset_chunks("ds-1", features, labels, chunk_bytes=160)]
    xs = [serde.pb_to_ndarray(c.features) for c in chunks]
    ys = [serde.pb_to_ndarray(c.labels) for c in chunks]

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
    chunks = list(serde.dataset_chunks("d", features, np.arange(3), chunk_bytes=1))

    # Assert
    assert [c.features.shape[0] for c in chunks] == [1, 1, 1]


# ---- training jobs and epoch reports ---------------------------------------------------------


def test_train_job_round_trip() -> None:
    # Prepare
    job = TrainJob(dataset_id="train-100-abc", round=12, worker=3, steps=10, batch_size=64,
                   lr=1e-3, seed=2**40 + 7, params=_params(1))

    # Execute
    back = serde.pb_to_train_job(_wire(serde.train_job_to_pb(job)))

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
    request = serde.train_job_to_pb(job)

    # Execute
    parts = serde.split_request(request, part_bytes)
    merged, size = serde.merge_request(iter(parts))

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


@pytest.mark.parametrize(
    "msg",
    [
        pb.SampleAck(),
        pb.SampleAck(sample_id="a" * 300, duplicate=True),
        serde.sample_to_pb(_patch_sample()),
        serde.train_job_to_pb(TrainJob("d", 1, 0, 5, 64, 1e-3, 0, _params())),
        pb.HealthRequest(),
    ],
)
def test_wire_size_is_serialized_length_plus_grpc_frame(msg: Any) -> None:
    # Execute
    size = wire_size(msg)

    # Assert
    assert GRPC_FRAME_BYTES == 5
    assert size == len(msg.SerializeToString()) + 5
