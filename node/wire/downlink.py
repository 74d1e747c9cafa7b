"""protobuf <-> plain Python for the downlink: a sample's payload, the DownlinkBatch built
sample by sample at its exact wire size and packed into a byte budget, the checks a batch
passes before and after it is parsed, and the BatchAck with its worst-case size. One of the
node's serde modules (tensors, downlink, setup, jobs, control)."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from sparsat.node.wire.codec import CodecError, PatchData, patch_record
from sparsat.node.wire.rpc import GRPC_FRAME_BYTES
from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb


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
    scale: float = 0.0  # int8 CLS tokens; int8 / int4 codes of a projected token
    shape: tuple[int, int, int] | None = None  # only datasets whose images differ in size
    basis: int = 0  # projected CLS tokens: the Basis.version they were made with


def patch_payload(sample_id: int, label: int, data: PatchData, with_shape: bool) -> Payload:
    record, runs = patch_record(data)
    shape = (data.height, data.width, data.channels) if with_shape else None
    return Payload(sample_id, label, record, runs, shape=shape)


def cls_payload(sample_id: int, label: int, token: ClsData) -> Payload:
    return Payload(sample_id, label, token.data, scale=token.scale)


# a CLS token's scale in DownlinkBatch.scales, by its bytes: float32 (int8 tokens, projected
# ones with a float32 scale) or float16
SCALE_WIRE = {4: "<f4", 2: "<f2"}


def projected_payload(sample_id: int, label: int, codes: bytes, scale: float,
                      version: int) -> Payload:
    return Payload(sample_id, label, codes, scale=scale, basis=version)


def zstd_bound(n: int) -> int:
    """The most bytes a zstd frame of n bytes of content takes: ZSTD_COMPRESSBOUND, and its
    header (magic, descriptor, a 4-byte dictionary id, an 8-byte content size)."""
    small = (128 << 10) - n >> 11 if n < (128 << 10) else 0
    return n + (n >> 8) + small + 18


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def field_bytes(n: int) -> int:
    """Bytes of a length-delimited field (tag < 16) holding n bytes; 0 when empty."""
    return 1 + _varint_len(n) + n if n else 0


def _varint_field(v: int) -> int:
    """Bytes of a varint field (tag < 16) holding v; 0 when v is 0 (proto3 leaves it off)."""
    return 1 + _varint_len(v) if v else 0


class BatchBuilder:
    """A DownlinkBatch filled sample by sample, with its exact wire size at every step (the
    protobuf encoding is arithmetic; tests check it against ByteSize()). Ids must increase."""

    def __init__(self, satellite_id: str, cls: bool = False, int8: bool = False,
                 transmit_id: int = 0, basis: int = 0, scale_bytes: int | None = None,
                 zstd: tuple[Any, int] | None = None) -> None:
        self.satellite_id, self.cls, self.int8 = satellite_id, cls, int8
        self.transmit_id = transmit_id  # streaming missions: the first batch of a stream
        # projected CLS tokens: every sample's Basis.version, and its scale's bytes (float32
        # 4, float16 2, none 0); unprojected: 4 for int8 tokens, else 0
        self.basis = basis
        self.scale_bytes = scale_bytes if scale_bytes is not None else 4 if int8 else 0
        # entropy-coded batches: (zstandard.ZstdCompressor with the uplinked dictionary, its
        # id); the size is planned at the frame's bound (zstd_bound), sent as compressed
        self.zstd = zstd
        self.items: list[Payload] = []
        # bytes inside: packed ids, labels, shapes; patch fields; tokens; scales; rle bitmap
        self._sizes = (0, 0, 0, 0, 0, 0, 0)

    def _grown(self, p: Payload) -> tuple[int, int, int, int, int, int, int]:
        if self.items and p.id <= self.items[-1].id:
            raise ValueError(f"batch ids must increase: {p.id} after {self.items[-1].id}")
        if p.basis != self.basis:
            raise ValueError(f"a batch of basis {self.basis} cannot hold a token of {p.basis}")
        ids, labels, shapes, patches, tokens, scales, rle = self._sizes
        return (ids + _varint_len(p.id - (self.items[-1].id if self.items else 0)),
                labels + _varint_len(p.label),
                shapes + (sum(_varint_len(v) for v in p.shape) if p.shape else 0),
                patches + (0 if self.cls else 1 + _varint_len(len(p.data)) + len(p.data)),
                tokens + (len(p.data) if self.cls else 0),
                scales + self.scale_bytes,
                len(self.items) // 8 + 1 if p.runs else rle)

    def wire_size(self, adding: Payload | None = None) -> int:
        """Wire size of the batch (ByteSize + gRPC's frame), with `adding` when given."""
        ids, labels, shapes, patches, tokens, scales, rle = (
            self._grown(adding) if adding is not None else self._sizes)
        last = adding.id if adding is not None else self.items[-1].id if self.items else 0
        if self.zstd is not None and tokens + scales:
            tokens, scales = zstd_bound(tokens + scales), 0
        return (field_bytes(len(self.satellite_id.encode())) + field_bytes(ids)
                + field_bytes(labels) + field_bytes(shapes) + patches + field_bytes(rle)
                + field_bytes(tokens) + field_bytes(scales)
                + (_varint_field(self.zstd[1]) if self.zstd is not None and tokens else 0)
                + _varint_field(last) + _varint_field(self.transmit_id)
                + _varint_field(self.basis) + GRPC_FRAME_BYTES)

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
            last_id=items[-1].id if items else 0, transmit_id=self.transmit_id,
            basis=self.basis)
        if self.cls:
            msg.tokens = b"".join(p.data for p in items)
            if self.scale_bytes:
                msg.scales = np.array([p.scale for p in items],
                                      SCALE_WIRE[self.scale_bytes]).tobytes()
            if self.zstd is not None and items:
                msg.tokens = self.zstd[0].compress(msg.tokens + msg.scales)
                msg.scales, msg.dictionary = b"", self.zstd[1]
        else:
            msg.patches.extend(p.data for p in items)
            flags = np.array([p.runs for p in items], dtype=np.uint8)
            msg.rle = np.packbits(flags, bitorder="little").tobytes().rstrip(b"\0")
        return msg


class Packer:
    """Cuts a stream of payloads into batches, one at a time, each filled to at most
    `batch_bytes` (its wire size and its ack's worst case, max_ack_bytes) and to the room the
    caller gives it (a sample too big for a batch goes alone when the room allows);
    `new_batch(first, basis)` starts one (the first of a stream names the satellite; a batch
    holds the tokens of one basis version, a change of version closes it). Payloads are
    taken from the iterator as needed; one a batch left out stays for the next."""

    def __init__(self, payloads: Iterator[Payload],
                 new_batch: Callable[[bool, int], BatchBuilder],
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
                cur = self._new(self.batches == 0, p.basis)
                size = cur.wire_size(p) + max_ack_bytes(1)
                if size > room:
                    return None, True
            elif len(cur.items) >= MAX_BATCH_SAMPLES:  # the most a ground station takes
                return cur, False
            elif p.basis != cur.basis:  # a batch holds tokens of one basis
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


def pack(payloads: Iterator[Payload], new_batch: Callable[[bool, int], BatchBuilder],
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
    basis: int = 0  # DownlinkBatch.basis: projected tokens' basis version
    dictionary: int = 0  # DownlinkBatch.dictionary: tokens are one zstd frame


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
        last_id=int(msg.last_id), id_sum=id_sum, basis=int(msg.basis),
        dictionary=int(msg.dictionary))


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
    BAD_BASIS = 14


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


# a Downlink.Send stream's request serializer and response parser, for a client that sizes
# what arrives (sparsat.node.wire.rpc.sized)
serialize_batch = pb.DownlinkBatch.SerializeToString
parse_ack = pb.BatchAck.FromString
