"""protobuf <-> numpy and torch for sparsat.v1.Tensor and NamedTensor: dtypes, shapes and the
checks that a tensor's bytes match them. With downlink, setup, jobs and control, one of the
node's serde modules: the only node modules that build protobuf messages."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from sparsat.node.wire.codec import CodecError
from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb

_NP_OF_DTYPE: dict[int, np.dtype[Any]] = {
    pb.FLOAT32: np.dtype("<f4"),
    pb.FLOAT16: np.dtype("<f2"),
    pb.INT8: np.dtype("i1"),
    pb.UINT8: np.dtype("u1"),
    pb.UINT16: np.dtype("<u2"),
    pb.INT64: np.dtype("<i8"),
}
_DTYPE_OF_NP = {v: k for k, v in _NP_OF_DTYPE.items()}


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


MAX_TENSOR_DIMS = 8  # sparsat's tensors have at most 2; a product of many is slow to take


def _check_shape(tensor: pb.Tensor) -> None:
    if len(tensor.shape) > MAX_TENSOR_DIMS:
        raise CodecError(f"tensor has {len(tensor.shape)} dimensions, more than the "
                         f"{MAX_TENSOR_DIMS} a sparsat.v1 tensor may have")
    if any(d < 0 for d in tensor.shape):
        raise CodecError(f"tensor shape {list(tensor.shape)} has a negative dimension")


def pb_to_ndarray(tensor: pb.Tensor) -> np.ndarray:
    """Decode a Tensor, checking that its bytes match its dtype and shape."""
    if tensor.dtype not in _NP_OF_DTYPE:
        raise CodecError(f"tensor dtype {tensor.dtype} is not a known sparsat.v1.DType")
    _check_shape(tensor)
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
        if nt.more:
            raise CodecError(f"parameter {nt.name[:64]!r} is an unjoined piece")
        arr = pb_to_ndarray(nt.tensor)
        if arr.dtype != np.float32:
            raise CodecError(f"parameter {nt.name} must be FLOAT32")
        if not bool(np.all(np.isfinite(arr))):
            raise CodecError(f"parameter {nt.name} contains NaN or Inf")
        out[nt.name] = torch.from_numpy(arr.copy())
    return out


def tensor_bytes(tensor: pb.Tensor) -> int:
    """Bytes a Tensor's shape and dtype need (CodecError for an unknown dtype or a negative
    dimension); Python ints, so a huge shape is a huge number, never an allocation."""
    dtype = _NP_OF_DTYPE.get(tensor.dtype)
    if dtype is None:
        raise CodecError(f"tensor dtype {tensor.dtype} is not a known sparsat.v1.DType")
    _check_shape(tensor)
    return math.prod(tensor.shape) * dtype.itemsize
