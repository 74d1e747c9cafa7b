"""protobuf <-> plain Python for the node-side messages. The only node module that uses pb2."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from node.codec import CodecError, PatchData
from node.rpc import wire_size
from node.training import AdamState
from proto.sparsat.v1 import sparsat_pb2 as pb

_NP_OF_DTYPE: dict[int, np.dtype[Any]] = {
    pb.FLOAT32: np.dtype("<f4"),
    pb.FLOAT16: np.dtype("<f2"),
    pb.INT8: np.dtype("i1"),
    pb.UINT8: np.dtype("u1"),
    pb.UINT16: np.dtype("<u2"),
    pb.INT64: np.dtype("<i8"),
}
_DTYPE_OF_NP = {v: k for k, v in _NP_OF_DTYPE.items()}
CLS_DTYPE_NAMES = {"float32": pb.FLOAT32, "float16": pb.FLOAT16, "int8": pb.INT8}
_CLS_NAME_OF = {v: k for k, v in CLS_DTYPE_NAMES.items()}


# ---- tensors --------------------------------------------------------------------------------


def ndarray_to_pb(array: np.ndarray, scale: float = 0.0) -> pb.Tensor:
    shape = np.shape(array)  # before ascontiguousarray, which turns 0-d into 1-d
    arr = np.ascontiguousarray(array)
    dtype = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
    if dtype not in _DTYPE_OF_NP:
        raise TypeError(f"no wire dtype for {arr.dtype}")
    return pb.Tensor(
        shape=list(shape), dtype=_DTYPE_OF_NP[dtype],  # type: ignore[arg-type]  # enum int
        data=arr.astype(dtype).tobytes(), scale=scale,
    )


def pb_to_ndarray(tensor: pb.Tensor) -> np.ndarray:
    """Decode a Tensor, checking that its bytes match its dtype and shape."""
    if tensor.dtype not in _NP_OF_DTYPE:
        raise CodecError(f"tensor dtype {tensor.dtype} is not a known sparsat.v1.DType")
    if any(d < 0 for d in tensor.shape):
        raise CodecError(f"tensor shape {list(tensor.shape)} has a negative dimension")
    dtype = _NP_OF_DTYPE[tensor.dtype]
    count = math.prod(tensor.shape)  # Python ints: np.prod wraps around on huge shapes
    if len(tensor.data) != count * dtype.itemsize:
        raise CodecError(
            f"tensor data is {len(tensor.data)} bytes, shape {list(tensor.shape)} of "
            f"{dtype.name} needs {count * dtype.itemsize}"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(tuple(tensor.shape))


def params_to_pb(params: dict[str, torch.Tensor]) -> list[pb.NamedTensor]:
    return [
        pb.NamedTensor(name=k, tensor=ndarray_to_pb(v.detach().cpu().float().numpy()))
        for k, v in params.items()
    ]


def pb_to_params(named: Iterable[pb.NamedTensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for nt in named:
        arr = pb_to_ndarray(nt.tensor)
        if arr.dtype != np.float32:
            raise CodecError(f"parameter {nt.name} must be FLOAT32")
        if not bool(np.all(np.isfinite(arr))):
            raise CodecError(f"parameter {nt.name} contains NaN or Inf")
        out[nt.name] = torch.from_numpy(arr.copy())
    return out


# ---- samples --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClsData:
    data: bytes
    dtype: str  # float32 | float16 | int8
    dim: int
    scale: float = 0.0


@dataclass(frozen=True)
class SampleData:
    sample_id: str
    sensor_id: str
    label: int
    payload: PatchData | ClsData


def sample_to_pb(sample: SampleData) -> pb.Sample:
    msg = pb.Sample(sample_id=sample.sample_id, sensor_id=sample.sensor_id, label=sample.label)
    p = sample.payload
    if isinstance(p, PatchData):
        msg.patches.CopyFrom(
            pb.PatchPayload(
                height=p.height, width=p.width, channels=p.channels, grid=p.grid,
                visible_idx=np.asarray(p.visible_idx, dtype="<u2").tobytes(), pixels=p.pixels,
            )
        )
    else:
        msg.cls.token.CopyFrom(
            pb.Tensor(shape=[p.dim], dtype=CLS_DTYPE_NAMES[p.dtype], data=p.data, scale=p.scale)
        )
    return msg


def pb_to_sample(msg: pb.Sample) -> SampleData:
    """Structural decode; raises CodecError naming the bad field (semantics are checked later)."""
    kind = msg.WhichOneof("payload")
    payload: PatchData | ClsData
    if kind == "patches":
        p = msg.patches
        if len(p.visible_idx) % 2:
            raise CodecError("visible_idx must be packed uint16 (an even number of bytes)")
        payload = PatchData(
            height=p.height, width=p.width, channels=p.channels, grid=p.grid,
            visible_idx=np.frombuffer(p.visible_idx, dtype="<u2").astype(np.uint16),
            pixels=p.pixels,
        )
    elif kind == "cls":
        t = msg.cls.token
        if t.dtype not in _CLS_NAME_OF:
            raise CodecError("CLS token dtype must be FLOAT32, FLOAT16 or INT8")
        if len(t.shape) != 1:
            raise CodecError(f"CLS token shape must be (dim,), got {list(t.shape)}")
        payload = ClsData(data=t.data, dtype=_CLS_NAME_OF[t.dtype], dim=int(t.shape[0]),
                          scale=float(t.scale))
    else:
        raise CodecError("sample has no payload (neither patches nor cls)")
    return SampleData(msg.sample_id, msg.sensor_id, int(msg.label), payload)


# ---- datasets and training -----------------------------------------------------------------


def dataset_chunks(
    dataset_id: str, features: np.ndarray, labels: np.ndarray, chunk_bytes: int
) -> Iterator[pb.DatasetChunk]:
    """Stream a token dataset in chunks of about `chunk_bytes`."""
    rows = max(1, chunk_bytes // max(1, features.shape[1] * 4))
    for start in range(0, len(features), rows):
        yield pb.DatasetChunk(
            dataset_id=dataset_id, total_rows=len(features),
            features=ndarray_to_pb(features[start : start + rows].astype(np.float32)),
            labels=ndarray_to_pb(labels[start : start + rows].astype(np.int64)),
        )


@dataclass
class TrainJob:
    dataset_id: str
    round: int
    worker: int
    steps: int
    batch_size: int
    lr: float
    seed: int  # the epoch's row order (node.training.epoch_order)
    params: dict[str, torch.Tensor]
    moments: AdamState | None = None  # None: the trainer starts from fresh moments
    hidden_scale: float = 1.0
    offset: int = 0  # rows order[offset : offset + rows] of the epoch's order
    rows: int = 0


def adam_to_pb(state: AdamState) -> pb.AdamState:
    return pb.AdamState(exp_avg=params_to_pb(state.exp_avg),
                        exp_avg_sq=params_to_pb(state.exp_avg_sq),
                        step=params_to_pb(state.step))


def pb_to_adam(msg: pb.AdamState, params: dict[str, torch.Tensor]) -> AdamState:
    """Decode moments for `params`, checking that they cover them with matching shapes."""
    state = AdamState(pb_to_params(msg.exp_avg), pb_to_params(msg.exp_avg_sq),
                      pb_to_params(msg.step))
    try:
        state.check(params)
    except ValueError as e:
        raise CodecError(f"moments {e}") from e
    for name in params:
        if bool((state.step[name] < 0).any()) or bool((state.exp_avg_sq[name] < 0).any()):
            raise CodecError(f"moments for {name}: negative step count or second moment")
    return state


def train_job_to_pb(job: TrainJob) -> pb.TrainRequest:
    return pb.TrainRequest(
        dataset_id=job.dataset_id, round=job.round, worker=job.worker, steps=job.steps,
        batch_size=job.batch_size, lr=job.lr, seed=job.seed, params=params_to_pb(job.params),
        moments=adam_to_pb(job.moments) if job.moments is not None else None,
        hidden_scale=job.hidden_scale if job.hidden_scale != 1.0 else 0.0,  # 0: 1, unsent
        offset=job.offset, rows=job.rows,
    )


def split_request(request: pb.TrainRequest, part_bytes: int) -> list[pb.TrainRequest]:
    """Cut a TrainRequest into parts of about `part_bytes` (whole tensors; the first carries
    the scalar fields). Merged in order with MergeFrom, they give the request back: repeated
    fields append, the moments submessage merges field by field."""
    head = pb.TrainRequest()
    head.CopyFrom(request)
    del head.params[:]
    head.ClearField("moments")
    parts = [head]
    room = part_bytes - head.ByteSize()

    def add(build: Any, size: int) -> None:
        nonlocal room
        if size > room and (parts[-1].params or parts[-1].HasField("moments")):
            parts.append(pb.TrainRequest())
            room = part_bytes
        build(parts[-1])
        room -= size

    for nt in request.params:
        add(lambda m, nt=nt: m.params.append(nt), nt.ByteSize())
    if request.HasField("moments"):
        mo = request.moments
        for field in ("exp_avg", "exp_avg_sq", "step"):
            for nt in getattr(mo, field):
                add(lambda m, f=field, nt=nt: getattr(m.moments, f).append(nt), nt.ByteSize())
    return parts


def merge_request(parts: Iterable[pb.TrainRequest]) -> tuple[pb.TrainRequest, int]:
    """The TrainRequest from its parts, and their wire size."""
    request, size = pb.TrainRequest(), 0
    for part in parts:
        size += wire_size(part)
        request.MergeFrom(part)
    return request, size


def pb_to_train_job(msg: pb.TrainRequest) -> TrainJob:
    params = pb_to_params(msg.params)
    if not (msg.hidden_scale >= 0 and math.isfinite(msg.hidden_scale)):
        raise CodecError(f"hidden_scale must be >= 0, got {msg.hidden_scale}")
    return TrainJob(
        dataset_id=msg.dataset_id, round=msg.round, worker=msg.worker, steps=msg.steps,
        batch_size=msg.batch_size, lr=msg.lr, seed=msg.seed, params=params,
        moments=pb_to_adam(msg.moments, params) if msg.HasField("moments") else None,
        hidden_scale=msg.hidden_scale or 1.0, offset=msg.offset, rows=msg.rows,
    )
