"""protobuf <-> plain Python for the node-side messages. The only node module that uses pb2."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from sparsat.node.data.config import PayloadKind, SensorSetup
from sparsat.node.models.training import AdamState
from sparsat.node.wire.codec import CodecError, PatchData, patch_record
from sparsat.node.wire.rpc import GRPC_FRAME_BYTES, wire_size
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


# ---- downlink batches -----------------------------------------------------------------------


@dataclass(frozen=True)
class ClsData:
    data: bytes
    dtype: str  # float32 | float16 | int8
    dim: int
    scale: float = 0.0


@dataclass(frozen=True)
class Payload:
    """One sample as it travels in a DownlinkBatch."""

    id: int  # copy * N + index into the training split of N images
    label: int
    # patches: visible-token code + pixels (sparsat.node.wire.codec.patch_record); CLS: token
    data: bytes
    runs: bool = False  # patches: the code is runs, not a bitmap
    scale: float = 0.0  # int8 CLS tokens
    shape: tuple[int, int, int] | None = None  # only datasets whose images differ in size


def patch_payload(sample_id: int, label: int, data: PatchData, with_shape: bool) -> Payload:
    record, runs = patch_record(data)
    shape = (data.height, data.width, data.channels) if with_shape else None
    return Payload(sample_id, label, record, runs, shape=shape)


def cls_payload(sample_id: int, label: int, token: ClsData) -> Payload:
    return Payload(sample_id, label, token.data, scale=token.scale)


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _field(n: int) -> int:
    """Bytes of a length-delimited field (tag < 16) holding n bytes; 0 when empty."""
    return 1 + _varint_len(n) + n if n else 0


def _varint_field(v: int) -> int:
    """Bytes of a varint field (tag < 16) holding v; 0 when v is 0 (proto3 leaves it off)."""
    return 1 + _varint_len(v) if v else 0


class BatchBuilder:
    """A DownlinkBatch filled sample by sample, with its exact wire size at every step (the
    protobuf encoding is arithmetic; tests check it against ByteSize()). Ids must increase."""

    def __init__(self, satellite_id: str, cls: bool = False, int8: bool = False) -> None:
        self.satellite_id, self.cls, self.int8 = satellite_id, cls, int8
        self.items: list[Payload] = []
        # bytes inside: packed ids, labels, shapes; patch fields; tokens; scales; rle bitmap
        self._sizes = (0, 0, 0, 0, 0, 0, 0)

    def _grown(self, p: Payload) -> tuple[int, int, int, int, int, int, int]:
        if self.items and p.id <= self.items[-1].id:
            raise ValueError(f"batch ids must increase: {p.id} after {self.items[-1].id}")
        ids, labels, shapes, patches, tokens, scales, rle = self._sizes
        return (ids + _varint_len(p.id - (self.items[-1].id if self.items else 0)),
                labels + _varint_len(p.label),
                shapes + (sum(_varint_len(v) for v in p.shape) if p.shape else 0),
                patches + (0 if self.cls else 1 + _varint_len(len(p.data)) + len(p.data)),
                tokens + (len(p.data) if self.cls else 0),
                scales + (4 if self.int8 else 0),
                len(self.items) // 8 + 1 if p.runs else rle)

    def wire_size(self, adding: Payload | None = None) -> int:
        """Wire size of the batch (ByteSize + gRPC's frame), with `adding` when given."""
        ids, labels, shapes, patches, tokens, scales, rle = (
            self._grown(adding) if adding is not None else self._sizes)
        last = adding.id if adding is not None else self.items[-1].id if self.items else 0
        return (_field(len(self.satellite_id.encode())) + _field(ids) + _field(labels)
                + _field(shapes) + patches + _field(rle) + _field(tokens) + _field(scales)
                + _varint_field(last) + GRPC_FRAME_BYTES)

    def add(self, p: Payload) -> None:
        self._sizes = self._grown(p)
        self.items.append(p)

    def to_pb(self) -> pb.DownlinkBatch:
        items = self.items
        msg = pb.DownlinkBatch(
            satellite_id=self.satellite_id,
            ids=[p.id - (items[i - 1].id if i else 0) for i, p in enumerate(items)],
            labels=[p.label for p in items],
            shapes=[v for p in items if p.shape for v in p.shape],
            last_id=items[-1].id if items else 0)
        if self.cls:
            msg.tokens = b"".join(p.data for p in items)
            if self.int8:
                msg.scales = np.array([p.scale for p in items], "<f4").tobytes()
        else:
            msg.patches.extend(p.data for p in items)
            flags = np.array([p.runs for p in items], dtype=np.uint8)
            msg.rle = np.packbits(flags, bitorder="little").tobytes().rstrip(b"\0")
        return msg


class Packer:
    """Cuts a stream of payloads into batches, one at a time, each filled to at most
    `batch_bytes` (its wire size and its ack's worst case, max_ack_bytes) and to the room the
    caller gives it (a sample too big for a batch goes alone when the room allows);
    `new_batch(first)` starts one (the first of a stream names the satellite). Payloads are
    taken from the iterator as needed; one a batch left out stays for the next."""

    def __init__(self, payloads: Iterator[Payload], new_batch: Callable[[bool], BatchBuilder],
                 batch_bytes: int, max_samples: int = 0) -> None:
        self._payloads, self._new = payloads, new_batch
        self.batch_bytes, self.max_samples = batch_bytes, max_samples
        self._ahead: list[Payload] = []  # taken from the iterator, not yet in a batch
        self.taken = 0  # samples in batches taken
        self.batches = 0

    def _peek(self, k: int) -> Payload | None:
        while len(self._ahead) <= k:
            p = next(self._payloads, None)
            if p is None:
                return None
            self._ahead.append(p)
        return self._ahead[k]

    def plan(self, room: int) -> tuple[BatchBuilder | None, bool]:
        """The next batch that fits `room` bytes with its worst-case ack (None: none fits or
        nothing is left), and whether `room` cut it short: a sample left out would have fit
        `batch_bytes`. Nothing is taken: `take` does."""
        cur: BatchBuilder | None = None
        k = 0
        while not self.max_samples or self.taken + k < self.max_samples:
            p = self._peek(k)
            if p is None:
                return cur, False
            if cur is None:
                cur = self._new(self.batches == 0)
                size = cur.wire_size(p) + max_ack_bytes(1)
                if size > room:
                    return None, True
            elif len(cur.items) >= MAX_BATCH_SAMPLES:  # the most a ground station takes
                return cur, False
            else:
                size = cur.wire_size(p) + max_ack_bytes(len(cur.items) + 1)
                if size > min(self.batch_bytes, room):
                    return cur, size <= self.batch_bytes
            cur.add(p)
            k += 1
        return cur, False

    def take(self, batch: BatchBuilder) -> None:
        """Take the samples of `batch` (the last plan) off the stream."""
        del self._ahead[: len(batch.items)]
        self.taken += len(batch.items)
        self.batches += 1


def pack(payloads: Iterator[Payload], new_batch: Callable[[bool], BatchBuilder],
         budget: int, batch_bytes: int, max_samples: int = 0) -> list[BatchBuilder]:
    """Batches whose wire sizes and worst-case acks together fit `budget` (see Packer): what a
    sender that waits for no ack may send."""
    packer = Packer(payloads, new_batch, batch_bytes, max_samples)
    batches: list[BatchBuilder] = []
    while True:
        batch, _ = packer.plan(budget)
        if batch is None:
            return batches
        packer.take(batch)
        batches.append(batch)
        budget -= batch.wire_size() + max_ack_bytes(len(batch.items))


@dataclass(frozen=True)
class BatchData:
    """A DownlinkBatch as plain arrays, structure unchecked (ingest validates it)."""

    satellite_id: str
    ids: np.ndarray  # (n,) int64, deltas summed; -1 where a delta is too large to be real
    repeats: np.ndarray  # (n,) bool: the id equals the one before it
    labels: np.ndarray  # (len(labels),) int64
    patches: list[bytes]
    runs: np.ndarray  # (len(patches),) bool
    shapes: np.ndarray  # (len(shapes),) int64
    tokens: bytes
    scales: bytes
    last_id: int = 0  # what the batch says its last id is (DownlinkBatch.last_id)
    id_sum: int = 0  # what its deltas sum to


# What one DownlinkBatch may hold, checked before anything is sized from it: a batch never
# has more than MAX_BATCH_SAMPLES samples (pack closes one there; mission control asks for at
# most 4096 a Transmit), so neither do its per-sample fields (3 shape values a sample).
MAX_BATCH_SAMPLES = 65536
# A message this size or less is parsed as it is (protobuf's worst expansion, 1-byte packed
# varints or empty strings, is about 17x: 17 MiB); a bigger one is scanned first, field by
# field, and refused when its repeated fields hold more elements than a batch can need.
SCAN_ABOVE_BYTES = 1 << 20
_BATCH_LIMITS = {2: ("ids", MAX_BATCH_SAMPLES), 3: ("labels", MAX_BATCH_SAMPLES),
                 4: ("patches", MAX_BATCH_SAMPLES), 6: ("shapes", 3 * MAX_BATCH_SAMPLES)}
MAX_RLE_BYTES = (MAX_BATCH_SAMPLES + 7) // 8
_PACKED = (2, 3, 6)  # repeated integer fields: packed (one length-delimited field) or not


def _read_varint(raw: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    for k in range(pos, min(pos + 10, len(raw))):
        value |= (raw[k] & 0x7F) << shift
        shift += 7
        if raw[k] < 0x80:
            return value, k + 1
    raise CodecError(f"a varint at byte {pos} is cut short or longer than 10 bytes")


def check_batch_wire(raw: bytes) -> None:
    """Refuse a serialized DownlinkBatch whose repeated fields hold more elements than one
    batch may (MAX_BATCH_SAMPLES), before protobuf parses it: a 64 MiB message of 1-byte
    ids parses into about 1 GB. Messages of SCAN_ABOVE_BYTES or less pass unscanned."""
    if len(raw) <= SCAN_ABOVE_BYTES:
        return
    counts = dict.fromkeys(_BATCH_LIMITS, 0)
    buf = np.frombuffer(raw, np.uint8)
    pos, fields = 0, 0
    max_fields = 6 * MAX_BATCH_SAMPLES + 64  # every sample's fields unpacked, and a few more
    while pos < len(raw):
        fields += 1
        if fields > max_fields:
            raise CodecError(f"batch has more than {max_fields} fields")
        key, pos = _read_varint(raw, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _read_varint(raw, pos)
            if number in counts:
                counts[number] += 1
        elif wire == 2:
            size, pos = _read_varint(raw, pos)
            if size > len(raw) - pos:
                raise CodecError(f"field {number} says {size} bytes, {len(raw) - pos} are left")
            if number in _PACKED:  # one element a byte below 0x80 (its last), counted
                for at in range(pos, pos + size, 1 << 20):  # a MiB at a time: no big temp
                    end = min(pos + size, at + (1 << 20))
                    counts[number] += int(np.count_nonzero(buf[at:end] < 0x80))
                    if counts[number] > _BATCH_LIMITS[number][1]:
                        break
            elif number in counts:
                counts[number] += 1
            pos += size
        elif wire == 5:
            pos += 4
        elif wire == 1:
            pos += 8
        else:
            raise CodecError(f"field {number}: wire type {wire} is not used by sparsat.v1")
        for number, (name, limit) in _BATCH_LIMITS.items():
            if counts[number] > limit:
                raise CodecError(f"batch has more than {limit} {name}, the most a batch "
                                 f"may hold")


def check_batch_counts(msg: pb.DownlinkBatch) -> None:
    """CodecError when a parsed batch has more samples (or per-sample values) than one may."""
    for name, limit in _BATCH_LIMITS.values():
        have = len(getattr(msg, name))
        if have > limit:
            raise CodecError(f"batch has {have} {name}, more than the {limit} a batch may "
                             f"hold")
    if len(msg.rle) > MAX_RLE_BYTES:  # one bit a patch payload
        raise CodecError(f"rle is {len(msg.rle)} bytes, more than the {MAX_RLE_BYTES} of a "
                         f"batch's {MAX_BATCH_SAMPLES} samples")


def pb_to_batch(msg: pb.DownlinkBatch, max_id: int) -> BatchData:
    """Decode the packed fields; ids at or past `max_id` (or following one) become -1.
    CodecError (nothing allocated) when the batch has more samples than a batch may."""
    check_batch_counts(msg)
    deltas = np.array(msg.ids, dtype=np.uint64)
    big = deltas >= np.uint64(max_id)
    ids = np.cumsum(np.where(big, 0, deltas).astype(np.int64))
    ids[np.maximum.accumulate(big) if len(big) else big] = -1
    ids[ids >= max_id] = -1
    n_patches = len(msg.patches)
    # only the bytes that name a payload are unpacked (8 bools a byte)
    rle = np.frombuffer(msg.rle[: (n_patches + 7) // 8], np.uint8)
    runs = np.unpackbits(rle, bitorder="little")[:n_patches]
    # exact: the cumulative sum where every id is in range, Python ints past it (a bad batch)
    id_sum = (0 if not len(ids) else int(ids[-1]) if ids[-1] >= 0
              else sum(int(d) for d in msg.ids))
    return BatchData(
        satellite_id=msg.satellite_id, ids=ids, repeats=(deltas == 0) & (np.arange(len(ids)) > 0),
        labels=np.array(msg.labels, dtype=np.int64), patches=list(msg.patches),
        runs=np.pad(runs, (0, n_patches - len(runs))).astype(bool),
        shapes=np.array(msg.shapes, dtype=np.int64), tokens=msg.tokens, scales=msg.scales,
        last_id=int(msg.last_id), id_sum=id_sum)


class RejectCause(enum.IntEnum):
    """sparsat.v1.RejectCause: why a sample was refused (a test checks it against the proto).
    Values stay below 128: one varint byte (max_ack_bytes counts on it)."""

    REJECT_CAUSE_UNSPECIFIED = 0
    BAD_STRUCTURE = 1
    BAD_LAST_ID = 2
    SATELLITE_CHANGED = 3
    NOT_REGISTERED = 4
    BAD_ID = 5
    REPEATED_ID = 6
    NOT_YOURS = 7
    BAD_LABEL = 8
    BAD_CODE = 9
    BAD_PIXELS = 10
    BAD_TOKEN = 11
    BAD_SCALE = 12
    CONFLICT = 13


MAX_REASON_BYTES = 48  # Rejected.reason: UTF-8 bytes at most, cut on a character boundary
MAX_STATUS_CODE = 16  # Rejected.code: a grpc.StatusCode value (UNAUTHENTICATED = 16 is the last)


def cause_name(cause: int) -> str:
    """A RejectCause's name; a value this code does not know (a newer ground station's) by
    its number."""
    try:
        return RejectCause(cause).name
    except ValueError:
        return f"cause {cause}"


def cap_reason(text: str) -> str:
    """`text` cut to at most MAX_REASON_BYTES of UTF-8, never inside a character."""
    return text.encode()[:MAX_REASON_BYTES].decode("utf-8", "ignore")


@dataclass(frozen=True)
class AckData:
    stored: int
    duplicates: list[int]  # positions in the batch
    rejected: list[tuple[int, int, int, str]]  # (position, grpc status code, cause, reason)


def ack_to_pb(ack: AckData) -> pb.BatchAck:
    """The BatchAck of `ack`, its reasons cut to MAX_REASON_BYTES."""
    msg = pb.BatchAck(stored=ack.stored)
    if ack.duplicates:
        edges = np.flatnonzero(np.diff(np.concatenate(
            ([0], np.isin(np.arange(max(ack.duplicates) + 1), ack.duplicates), [0]))))
        msg.duplicate_runs.extend(np.diff(np.concatenate(([0], edges))).tolist())
    msg.rejected.extend(pb.Rejected(position=p, code=c, cause=cause,  # type: ignore[arg-type]
                                    reason=cap_reason(r)) for p, c, cause, r in ack.rejected)
    return msg


def pb_to_ack(msg: pb.BatchAck, n: int) -> AckData:
    """The ack of an n-sample batch; CodecError when it does not describe one, or steps out of
    what max_ack_bytes assumes (a run of 0 after the first, a code past the gRPC status codes,
    a cause of more than one varint byte, a reason past MAX_REASON_BYTES)."""
    # counts are checked against n before any list is sized from them
    if len(msg.duplicate_runs) > n + 1 or len(msg.rejected) > n or msg.stored > n:
        raise CodecError(f"ack has {len(msg.duplicate_runs)} duplicate runs, "
                         f"{len(msg.rejected)} refusals and {msg.stored} stored for a batch "
                         f"of {n}")
    duplicates: list[int] = []
    at = 0
    for i, run in enumerate(msg.duplicate_runs):
        if i and not run:
            raise CodecError(f"ack's duplicate run {i} is empty: only the first may be")
        if run > n - at:
            raise CodecError(f"ack names positions past its batch of {n}")
        if i % 2:
            duplicates += range(at, at + run)
        at += run
    if any(not 0 <= r.position < n for r in msg.rejected):
        raise CodecError(f"ack names positions past its batch of {n}")
    for r in msg.rejected:
        if not (0 < r.code <= MAX_STATUS_CODE and 0 <= r.cause < 128
                and len(r.reason.encode()) <= MAX_REASON_BYTES):
            raise CodecError(f"ack's refusal at {r.position}: code {r.code}, cause {r.cause} or "
                             f"a reason of {len(r.reason.encode())} bytes out of range")
    rejected = [(int(r.position), int(r.code), int(r.cause), str(r.reason))
                for r in msg.rejected]
    refused = {p for p, _, _, _ in rejected}
    if len(refused) < len(rejected) or not refused.isdisjoint(duplicates):
        raise CodecError("ack answers a position twice (rejected twice, or rejected and "
                         "duplicate)")
    if msg.stored + len(duplicates) + len(rejected) != n:
        raise CodecError(f"ack covers {msg.stored} stored, {len(duplicates)} duplicates and "
                         f"{len(rejected)} rejected of a batch of {n}")
    return AckData(int(msg.stored), duplicates, rejected)


def _varint_bytes_below(n: int) -> int:
    """The varint bytes of 1, 2, ..., n - 1 together."""
    total, lo, k = 0, 1, 1
    while lo < n:
        hi = min(n, 128**k)
        total += (hi - lo) * k
        lo, k = hi, k + 1
    return total


def max_ack_bytes(n: int) -> int:
    """The largest wire size (ByteSize + gRPC's 5-byte frame) of an ack of an n-sample batch
    that pb_to_ack accepts. With v(x) the varint length of x (1 byte a 7 bits), n > 0:

        5                                  gRPC frame
      + 1 + v(n)                           stored <= n
      + 1 + v(n + 1) + n + 1               duplicate_runs, packed: the runs sum to <= n, only
                                           the first may be 0, and v(r) <= r for r >= 1
      + n * (2 + 2 + 2 + 2 + MAX_REASON_BYTES)   each Rejected: tag and length (< 128),
                                           code (<= 16), cause (< 128), reason (tag, length)
      + sum(1 + v(p) for p in 1 .. n - 1)  their positions (0 is left off)

    Duplicates and refusals are counted as if each took the whole batch, so it bounds any
    mix; all n refused with full reasons comes within n + 10 bytes of it (of about 59n)."""
    if n <= 0:
        return GRPC_FRAME_BYTES
    v = _varint_len
    return (GRPC_FRAME_BYTES + 1 + v(n) + 1 + v(n + 1) + n + 1
            + n * (8 + MAX_REASON_BYTES) + (n - 1) + _varint_bytes_below(n))


# ---- sensor setup (RegisterReply.sensor) ----------------------------------------------------

MAX_GRID = 1024  # a token grid past this is no encoder's: refused before anything is sized
MAX_N_TRAIN = 2**31 - 1  # and copies * N at most this: every id fits 31 bits
MAX_CLS_DIM = 65_536
_PAYLOAD_KINDS: dict[PayloadKind, pb.PayloadKind] = {
    "patches": pb.PAYLOAD_PATCHES, "cls": pb.PAYLOAD_CLS}
_PAYLOAD_NAME_OF = {v: k for k, v in _PAYLOAD_KINDS.items()}


def setup_to_pb(setup: SensorSetup) -> pb.SensorSetup:
    msg = pb.SensorSetup(
        n_train=setup.n_train, grid=setup.grid, copies=setup.copies,
        payload=_PAYLOAD_KINDS[setup.payload], cls_dim=setup.cls_dim,
        tile_rows=list(setup.tile_rows), tile_cols=list(setup.tile_cols))
    if setup.cls_dtype is not None:
        msg.cls_dtype = CLS_DTYPE_NAMES[setup.cls_dtype]
    for sat, indices in setup.images.items():
        idx = np.asarray(indices, dtype=np.int64)
        deltas = np.diff(idx, prepend=0)
        if len(idx) and (idx[0] < 0 or (deltas[1:] < 1).any()):
            raise ValueError(f"{sat}: indices must be non-negative and strictly increase")
        msg.satellites.add(satellite_id=sat, index_deltas=deltas.tolist())
    return msg


def pb_to_setup(msg: pb.SensorSetup) -> SensorSetup:
    """The setup a ground station sent, every count checked before it is used (CodecError
    names what is wrong)."""
    if not 1 <= msg.n_train <= MAX_N_TRAIN:
        raise CodecError(f"sensor setup: n_train {msg.n_train} is not in [1, {MAX_N_TRAIN}]")
    if not 1 <= msg.grid <= MAX_GRID:
        raise CodecError(f"sensor setup: grid {msg.grid} is not in [1, {MAX_GRID}]")
    if not 1 <= msg.copies <= MAX_N_TRAIN // msg.n_train:
        raise CodecError(f"sensor setup: copies {msg.copies} is not in "
                         f"[1, {MAX_N_TRAIN // msg.n_train}] for N = {msg.n_train}")
    payload = _PAYLOAD_NAME_OF.get(msg.payload)
    if payload is None:
        raise CodecError(f"sensor setup: payload {msg.payload} is not a known PayloadKind")
    cls_dtype = _CLS_NAME_OF.get(msg.cls_dtype)
    if payload == "cls" and (cls_dtype is None or not 1 <= msg.cls_dim <= MAX_CLS_DIM):
        raise CodecError(f"sensor setup: CLS payloads need a cls_dtype (FLOAT32, FLOAT16, "
                         f"INT8) and a cls_dim in [1, {MAX_CLS_DIM}], got {msg.cls_dtype} "
                         f"and {msg.cls_dim}")
    if payload == "patches":
        cls_dtype = None
    edges = []
    for name, values in (("tile_rows", msg.tile_rows), ("tile_cols", msg.tile_cols)):
        if len(values) not in (0, msg.grid + 1):
            raise CodecError(f"sensor setup: {name} has {len(values)} edges, a grid of "
                             f"{msg.grid} needs {msg.grid + 1} (or none)")
        e = np.array(values, dtype=np.int64)
        if len(e) and (e[0] != 0 or (np.diff(e) < 1).any()):
            raise CodecError(f"sensor setup: {name} must start at 0 and strictly increase")
        edges.append(tuple(e.tolist()))
    if bool(edges[0]) != bool(edges[1]):
        raise CodecError("sensor setup: tile_rows and tile_cols are both set or both empty")
    if sum(len(sat.index_deltas) for sat in msg.satellites) > msg.n_train:
        raise CodecError(f"sensor setup: more indices than N = {msg.n_train} (satellites hold "
                         "disjoint images)")
    images: dict[str, np.ndarray] = {}
    for sat in msg.satellites:
        if sat.satellite_id in images:
            raise CodecError(f"sensor setup: satellite {sat.satellite_id[:64]!r} twice")
        deltas = np.array(sat.index_deltas, dtype=np.int64)  # uint32 each: no overflow below
        idx = np.cumsum(deltas)
        if len(idx) and ((deltas[1:] < 1).any() or idx[-1] >= msg.n_train):
            raise CodecError(f"sensor setup: {sat.satellite_id[:64]!r}'s indices must strictly "
                             f"increase (deltas >= 1 after the first) and stay below N = "
                             f"{msg.n_train}")
        images[sat.satellite_id] = idx
    return SensorSetup(n_train=msg.n_train, grid=msg.grid, copies=msg.copies,
                       payload=payload, cls_dim=msg.cls_dim if payload == "cls" else 0,
                       cls_dtype=cls_dtype, tile_rows=edges[0], tile_cols=edges[1],
                       images=images)


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
    seed: int  # the epoch's row order (sparsat.node.models.training.epoch_order)
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


def _tensor_bytes(tensor: pb.Tensor) -> int:
    """Bytes a Tensor's shape and dtype need (CodecError for an unknown dtype or a negative
    dimension); Python ints, so a huge shape is a huge number, never an allocation."""
    dtype = _NP_OF_DTYPE.get(tensor.dtype)
    if dtype is None:
        raise CodecError(f"tensor dtype {tensor.dtype} is not a known sparsat.v1.DType")
    _check_shape(tensor)
    return math.prod(tensor.shape) * dtype.itemsize


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
            need = _tensor_bytes(nt.tensor)
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
    size = 0
    for part in parts:
        size += wire_size(part)
        if size > MAX_TRAIN_BYTES:
            raise CodecError(f"parts past {MAX_TRAIN_BYTES} bytes, the most a training "
                             "message may hold")
        message.MergeFrom(part)
    _join(message.params)
    if message.HasField("moments"):
        for field in _MOMENT_FIELDS:
            _join(getattr(message.moments, field))
    return message, size


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
    )
