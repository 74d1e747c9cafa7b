"""protobuf <-> plain Python for training: token datasets streamed to a trainer, the training
job (TrainJob <-> TrainRequest) with its Adam moments, the trainer's reply, and the cutting of
both into parts and pieces below gRPC's message limit. One of the node's serde modules
(tensors, downlink, setup, jobs, control)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from sparsat.node.models.training import AdamState
from sparsat.node.wire.codec import CodecError
from sparsat.node.wire.rpc import wire_size
from sparsat.node.wire.tensors import ndarray_to_pb, params_to_pb, pb_to_params, tensor_bytes
from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb


def dataset_chunks(
    dataset_id: str, features: np.ndarray, labels: np.ndarray, chunk_bytes: int,
    base_id: str = "", base_rows: int = 0,
) -> Iterator[pb.DatasetChunk]:
    """Stream a token dataset in chunks of about `chunk_bytes`. With `base_id`, an append-only
    upload: the dataset is the first `base_rows` rows of base_id (which the trainer holds)
    followed by `features`, and only `features` travel."""
    rows = max(1, chunk_bytes // max(1, features.shape[1] * 4))
    total = base_rows + len(features)
    for start in range(0, len(features), rows):
        yield pb.DatasetChunk(
            dataset_id=dataset_id, total_rows=total, base_id=base_id, base_rows=base_rows,
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
    seed: int  # the epoch's row order (sparsat.node.models.training.epoch_order)
    params: dict[str, torch.Tensor]
    moments: AdamState | None = None  # None: the trainer starts from fresh moments
    hidden_scale: float = 1.0
    offset: int = 0  # rows order[offset : offset + rows] of the epoch's order
    rows: int = 0
    order_start: int = 0  # the pass's rows (epoch_order's start and replay); 0, 0: all
    order_replay: int = 0


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
        offset=job.offset, rows=job.rows, order_start=job.order_start,
        order_replay=job.order_replay,
    )


# The most a whole TrainRequest or TrainReply (its parts together) may hold: a 768-8000-8000
# MLP with both moments is about 830 MB. A receiver refuses the call past it, part by part.
MAX_TRAIN_BYTES = 1 << 30
MIN_PIECE_BYTES = 64 * 1024  # a tensor is cut into pieces only above this and the part size
_MOMENT_FIELDS = ("exp_avg", "exp_avg_sq", "step")
TrainMessage = TypeVar("TrainMessage", pb.TrainRequest, pb.TrainReply)


def _pieces(nt: pb.NamedTensor, piece_bytes: int) -> list[pb.NamedTensor]:
    """`nt` as pieces of at most `piece_bytes` of data (see NamedTensor.more): one tensor
    of a big model is bigger than a part, and no message may come near the 64 MiB limit."""
    data = nt.tensor.data
    if len(data) <= piece_bytes:
        return [nt]
    pieces = []
    for start in range(0, len(data), piece_bytes):
        piece = pb.NamedTensor(name=nt.name, more=start + piece_bytes < len(data))
        if start == 0:
            piece.tensor.shape.extend(nt.tensor.shape)
            piece.tensor.dtype = nt.tensor.dtype
            piece.tensor.scale = nt.tensor.scale
        piece.tensor.data = data[start : start + piece_bytes]
        pieces.append(piece)
    return pieces


def _join(named: Any) -> None:
    """Join the pieces of a repeated NamedTensor field in place (the inverse of _pieces)."""
    if not any(nt.more for nt in named):
        return
    joined: list[pb.NamedTensor] = []
    datas: list[bytes] = []
    head: pb.NamedTensor | None = None
    need, have = 0, 0  # bytes the head's shape x dtype needs; bytes of its pieces so far
    for nt in named:
        if head is None:
            head = pb.NamedTensor(name=nt.name, tensor=nt.tensor)
            datas = [nt.tensor.data]
            need = tensor_bytes(nt.tensor)
            have = len(nt.tensor.data)
        elif nt.name != head.name or nt.tensor.shape:
            raise CodecError(f"tensor {head.name[:64]!r} is cut into pieces, but the next "
                             f"piece is {nt.name[:64]!r} with a shape of its own")
        else:
            datas.append(nt.tensor.data)
            have += len(nt.tensor.data)
        if have > need:  # before joining: pieces never make more than their tensor
            raise CodecError(f"tensor {head.name[:64]!r}: its pieces hold more than the "
                             f"{need} bytes its shape and dtype need")
        if not nt.more:
            head.tensor.data = b"".join(datas)
            joined.append(head)
            head = None
    if head is not None:
        raise CodecError(f"tensor {head.name[:64]!r}: its last piece is missing")
    del named[:]
    named.extend(joined)


def split_message(message: TrainMessage, part_bytes: int) -> list[TrainMessage]:
    """Cut a TrainRequest or TrainReply into parts of about `part_bytes`: the first carries
    the scalar fields, then the tensors in order, a tensor bigger than
    max(part_bytes, MIN_PIECE_BYTES) in pieces. merge_message gives the message back."""
    head = type(message)()
    head.CopyFrom(message)
    del head.params[:]
    head.ClearField("moments")
    if message.HasField("moments"):
        head.moments.SetInParent()  # moments sent, even with no tensors in them
    parts = [head]
    room = part_bytes - head.ByteSize()
    piece_bytes = max(part_bytes, MIN_PIECE_BYTES)

    def add(field: str, nt: pb.NamedTensor) -> None:
        nonlocal room
        last = parts[-1]
        size = nt.ByteSize() + 8  # its tag and length, and the moments' own, at most
        if size > room and (last.params or any(getattr(last.moments, f)
                                               for f in _MOMENT_FIELDS)):
            parts.append(type(message)())
            room = part_bytes
        target = parts[-1].params if field == "params" else getattr(parts[-1].moments, field)
        target.append(nt)
        room -= size

    for nt in message.params:
        for piece in _pieces(nt, piece_bytes):
            add("params", piece)
    if message.HasField("moments"):
        for field in _MOMENT_FIELDS:
            for nt in getattr(message.moments, field):
                for piece in _pieces(nt, piece_bytes):
                    add(field, piece)
    return parts


def merge_message(parts: Iterable[TrainMessage], message: TrainMessage
                  ) -> tuple[TrainMessage, int]:
    """Merge `parts` in order into `message` (an empty TrainRequest or TrainReply), joining
    cut tensors; returns it with the parts' wire size. Repeated fields append and the
    moments merge field by field. Raises CodecError when a cut tensor does not join."""
    merged = Parts(message)
    for part in parts:
        merged.add(part, wire_size(part))
    return merged.joined(), merged.received


class Parts(Generic[TrainMessage]):
    """A TrainRequest or TrainReply merged part by part as its parts arrive, their wire bytes
    counted (`received`: a call that breaks is charged what came in) and bounded: CodecError
    once they pass MAX_TRAIN_BYTES, before the part is merged (memory bounded)."""

    def __init__(self, message: TrainMessage) -> None:
        self.message: TrainMessage = message
        self.received = 0

    def add(self, part: TrainMessage, size: int) -> None:
        """Merge `part`, which cost `size` bytes on the link (repeated fields append, the
        moments merge field by field)."""
        self.received += size
        if self.received > MAX_TRAIN_BYTES:
            raise CodecError(f"parts past {MAX_TRAIN_BYTES} bytes, the most a training "
                             "message may hold")
        self.message.MergeFrom(part)

    def joined(self) -> TrainMessage:
        """The message with its cut tensors joined; CodecError when one does not join."""
        message = self.message
        _join(message.params)
        if message.HasField("moments"):
            for field in _MOMENT_FIELDS:
                _join(getattr(message.moments, field))
        return message


def request_parts() -> Parts[pb.TrainRequest]:
    """A TrainRequest to merge from its parts (a trainer's Train call)."""
    return Parts(pb.TrainRequest())


def reply_parts() -> Parts[pb.TrainReply]:
    """A TrainReply to merge from its parts (the coordinator's side of a Train call)."""
    return Parts(pb.TrainReply())


def split_request(request: pb.TrainRequest, part_bytes: int) -> list[pb.TrainRequest]:
    return split_message(request, part_bytes)


def merge_request(parts: Iterable[pb.TrainRequest]) -> tuple[pb.TrainRequest, int]:
    """The TrainRequest from its parts, and their wire size."""
    return merge_message(parts, pb.TrainRequest())


def split_reply(reply: pb.TrainReply, part_bytes: int) -> list[pb.TrainReply]:
    return split_message(reply, part_bytes)


def merge_reply(parts: Iterable[pb.TrainReply]) -> tuple[pb.TrainReply, int]:
    """The TrainReply from its parts, and their wire size."""
    return merge_message(parts, pb.TrainReply())


def pb_to_train_job(msg: pb.TrainRequest) -> TrainJob:
    params = pb_to_params(msg.params)
    if not (msg.hidden_scale >= 0 and math.isfinite(msg.hidden_scale)):
        raise CodecError(f"hidden_scale must be >= 0, got {msg.hidden_scale}")
    return TrainJob(
        dataset_id=msg.dataset_id, round=msg.round, worker=msg.worker, steps=msg.steps,
        batch_size=msg.batch_size, lr=msg.lr, seed=msg.seed, params=params,
        moments=pb_to_adam(msg.moments, params) if msg.HasField("moments") else None,
        hidden_scale=msg.hidden_scale or 1.0, offset=msg.offset, rows=msg.rows,
        order_start=msg.order_start, order_replay=msg.order_replay,
    )


def train_reply(params: dict[str, torch.Tensor], steps_done: int, mean_loss: float,
                moments: AdamState | None = None) -> pb.TrainReply:
    """A trainer's answer to a job: the trained `params` and, when they travel, their
    `moments` (the reply a trainer cuts into parts with split_reply)."""
    reply = pb.TrainReply(params=params_to_pb(params), steps_done=steps_done,
                          mean_loss=mean_loss)
    if moments is not None:
        reply.moments.CopyFrom(adam_to_pb(moments))
    return reply


def load_dataset_reply(dataset_id: str, rows: int) -> pb.LoadDatasetReply:
    return pb.LoadDatasetReply(dataset_id=dataset_id, rows=rows)


# the Trainer service's request serializers and response parsers, for a client that sizes
# what arrives (sparsat.node.wire.rpc.sized)
serialize_chunk = pb.DatasetChunk.SerializeToString
parse_load_reply = pb.LoadDatasetReply.FromString
serialize_request = pb.TrainRequest.SerializeToString
parse_reply = pb.TrainReply.FromString
