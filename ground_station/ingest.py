"""Ingest: check every sample of a downlinked batch, so a bad one is refused alone.

Validation is a plain function on a decoded batch (sparsat.node.wire.downlink.BatchData); the
servicer in server.py stores what passes and acks the batch with each refusal's status code,
cause (sparsat.v1.RejectCause, what a program acts on) and reason (for people; the ack carries
its first sparsat.node.wire.downlink.MAX_REASON_BYTES bytes, the log all of it).
The common case (bitmaps on a dataset of one image shape) is checked with numpy, a batch at a
time; run codes and per-sample shapes go through sparsat.node.wire.codec one by one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import grpc
import numpy as np

from sparsat.ground_station.store import Row
from sparsat.node.data.config import ImageCodecSpec
from sparsat.node.wire.basis import Basis
from sparsat.node.wire.codec import (
    BIT_TABLE,
    CLS_ITEMSIZE,
    CodecError,
    PatchData,
    bitmap_bytes,
    check_patches,
    check_tiles,
    decode_visible,
    tile_sizes,
)
from sparsat.node.wire.downlink import SCALE_WIRE, BatchData, RejectCause
from sparsat.node.wire.images import decode_sent

INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
DENIED = grpc.StatusCode.PERMISSION_DENIED.value[0]
CONFLICT = grpc.StatusCode.ALREADY_EXISTS.value[0]
# each cause has one status code: a sample that is wrong, one the sender may not send, or one
# whose id holds other content
STATUS_OF = {c: INVALID for c in RejectCause} | {
    RejectCause.NOT_REGISTERED: DENIED, RejectCause.NOT_YOURS: DENIED,
    RejectCause.CONFLICT: CONFLICT}
Refusal = tuple[int, int, int, str]  # (position, status code value, RejectCause, reason)
_Refuse = Callable[[np.ndarray, RejectCause, "str | list[str]"], None]


def refusal(position: int, cause: RejectCause, reason: str) -> Refusal:
    return (position, STATUS_OF[cause], int(cause), reason)


@dataclass(frozen=True)
class IngestRules:
    payload: str  # "patches" | "cls": what the scenario's sensors send
    grid: int  # encoder token grid
    dim: int  # encoder width (CLS payloads)
    num_classes: int
    image_shape: tuple[int, int, int] | None  # native (H, W, C) when the dataset fixes it
    n_train: int  # N: an id is copy * N + index into the training split
    copies: int = 1  # random masks: copies in [0, copies)
    cls_dtype: str = "float16"
    # which satellite holds each training image: owner[index] is its position in
    # `satellites`, -1 for images outside the scenario's subset
    owner: np.ndarray | None = None
    satellites: dict[str, int] | None = None
    # projected CLS payloads: tokens come as codes of an uplinked basis (DownlinkBatch.basis),
    # or, with `unprojected`, as cls_dtype tokens (basis 0); `bases` and `dictionaries` (zstd,
    # by dictionary id) are what the ground station uplinked, the live mappings it keeps
    projected: bool = False
    unprojected: bool = False
    bases: Mapping[int, Basis] = field(default_factory=dict)
    dictionaries: Mapping[int, object] = field(default_factory=dict)  # id -> ZstdCompressionDict
    codec: ImageCodecSpec = field(default_factory=ImageCodecSpec)  # patches: the pixels' coding

    @property
    def max_id(self) -> int:
        return self.copies * self.n_train


@dataclass
class Checked:
    rows: list[Row]  # samples that passed, to store
    positions: list[int]  # their positions in the batch
    rejected: list[Refusal]


def check_batch(batch: BatchData, satellite: str, rules: IngestRules,
                known: set[str]) -> Checked:
    """Split a batch from `satellite` into rows to store and refusals with their causes."""
    n = len(batch.ids)
    reasons: dict[int, tuple[RejectCause, str]] = {}

    def refuse(where: np.ndarray, cause: RejectCause, why: str | list[str]) -> None:
        for k, pos in enumerate(np.flatnonzero(where).tolist()):
            reasons.setdefault(pos, (cause, why if isinstance(why, str) else why[k]))

    everything = np.ones(n, dtype=bool)
    batch, unknown, frame = _inflate(batch, n, rules)
    if unknown:
        refuse(everything, RejectCause.BAD_BASIS, unknown)
    structure = frame or (_structure(batch, n, rules) if not unknown else "unknown basis")

    if structure:
        refuse(everything, RejectCause.BAD_STRUCTURE, f"batch: {structure}")
    if batch.last_id != batch.id_sum:
        refuse(everything, RejectCause.BAD_LAST_ID,
               f"last_id {batch.last_id} is not the sum of the id deltas ({batch.id_sum}): "
               "ids are delta-coded")
    if satellite not in known:
        refuse(everything, RejectCause.NOT_REGISTERED,
               f"satellite {satellite[:64]!r} is not registered")
    ids = batch.ids
    refuse(ids < 0, RejectCause.BAD_ID, f"id out of range: ids are below {rules.max_id} "
                                        "(copies x N training images) and strictly increase")
    refuse(batch.repeats, RejectCause.REPEATED_ID, "id repeats the one before it")
    if rules.owner is not None and rules.satellites and satellite in rules.satellites:
        mine = rules.owner[np.where(ids < 0, 0, ids) % rules.n_train] == rules.satellites[
            satellite]
        refuse(~mine & (ids >= 0), RejectCause.NOT_YOURS, f"image not held by {satellite}")
    labels = batch.labels if not structure else np.zeros(n, np.int64)
    refuse((labels < 0) | (labels >= rules.num_classes), RejectCause.BAD_LABEL,
           f"label out of range [0, {rules.num_classes})")
    rows: list[Row] = []
    if not structure:
        if rules.payload == "patches":
            rows = _patch_rows(batch, satellite, rules, refuse)
        else:
            rows = _cls_rows(batch, satellite, rules, refuse)
    keep = [k for k in range(len(rows)) if k not in reasons]
    return Checked([rows[k] for k in keep], keep,
                   sorted(refusal(p, c, r) for p, (c, r) in reasons.items()))


def _structure(batch: BatchData, n: int, rules: IngestRules) -> str:
    """What is wrong with the batch as a whole (fields that disagree on its size), or ''."""
    if len(batch.labels) != n:
        return f"{len(batch.labels)} labels for {n} ids"
    if rules.payload == "patches":
        if batch.tokens or batch.scales:
            return "CLS tokens, but this scenario's sensors send patches"
        if len(batch.patches) != n:
            return f"{len(batch.patches)} patch payloads for {n} ids"
        want = 0 if rules.image_shape else 3 * n
        if len(batch.shapes) != want:
            return (f"{len(batch.shapes)} shape values, expected {want} (3 per sample only for "
                    "datasets whose images differ in size)")
    else:
        if batch.patches:
            return "patch payloads, but this scenario's sensors send CLS tokens"
        size, scale = _sample_bytes(batch, rules)
        if batch.basis:
            if len(batch.tokens) != n * size:
                return (f"tokens are {len(batch.tokens)} bytes, {n} codes of basis "
                        f"{batch.basis} need {n * size}")
            if len(batch.scales) != n * scale or batch.shapes.size:
                return (f"scales are {len(batch.scales)} bytes, basis {batch.basis} needs "
                        f"{n * scale}; no shapes")
            return ""
        if len(batch.tokens) != n * size:
            return (f"tokens are {len(batch.tokens)} bytes, {n} {rules.cls_dtype} tokens of "
                    f"dim {rules.dim} need {n * size}")
        if len(batch.scales) != n * scale or batch.shapes.size:
            return f"scales are {len(batch.scales)} bytes, expected {n * scale}; no shapes"
    return ""


def _sample_bytes(batch: BatchData, rules: IngestRules) -> tuple[int, int]:
    """(token, scale) bytes of each sample of a CLS batch: codes of its basis (known), or a
    plain cls_dtype token and, for int8, a float32 scale."""
    if batch.basis:
        b = rules.bases[batch.basis]
        return b.code_bytes, b.scale_bytes
    return rules.dim * CLS_ITEMSIZE[rules.cls_dtype], 4 if rules.cls_dtype == "int8" else 0


def _patch_rows(batch: BatchData, satellite: str, rules: IngestRules, refuse: _Refuse
                ) -> list[Row]:
    g, n = rules.grid, len(batch.ids)
    records = batch.patches
    shapes = (np.tile(rules.image_shape, (n, 1)) if rules.image_shape
              else batch.shapes.reshape(n, 3))
    ids, labels, sh = batch.ids.tolist(), batch.labels.tolist(), shapes.tolist()
    rows = [Row(ids[k], satellite, labels[k], bool(batch.runs[k]), sh[k][0], sh[k][1],
                sh[k][2], 0.0, records[k]) for k in range(n)]
    if rules.codec.coded:  # every coded image is decoded once here: what is stored decodes
        if rules.image_shape is None:  # the station refuses such a scenario: never here
            raise ValueError("image codecs need a dataset of one image shape")
        for k in range(n):
            shape = (sh[k][0], sh[k][1], sh[k][2])
            try:
                visible, used = decode_visible(records[k], bool(batch.runs[k]), g)
                check_tiles(*shape, g, visible)
            except CodecError as e:
                refuse(_at(n, np.array([k])), RejectCause.BAD_CODE, str(e))
                continue
            try:
                decode_sent(records[k][used:], rules.codec, shape)
            except CodecError as e:
                refuse(_at(n, np.array([k])), RejectCause.BAD_PIXELS, str(e))
        return rows
    fast = ~batch.runs if rules.image_shape else np.zeros(n, dtype=bool)
    if fast.any():  # bitmaps on one image shape: numpy, the whole batch at once
        h, w, c = rules.image_shape  # type: ignore[misc]
        nb = bitmap_bytes(g)
        at = np.flatnonzero(fast)
        lens = np.array([len(records[k]) for k in at.tolist()])
        short = lens < nb
        refuse(_at(n, at[short]), RejectCause.BAD_CODE, f"visible-token bitmap needs {nb} bytes")
        at, lens = at[~short], lens[~short]
        codes = np.frombuffer(b"".join(records[k][:nb] for k in at.tolist()), np.uint8)
        bits = BIT_TABLE[codes.reshape(len(at), nb)].reshape(len(at), nb * 8)
        refuse(_at(n, at[bits[:, g * g :].any(axis=1)]), RejectCause.BAD_CODE,
               f"visible-token bitmap sets bits past the {g * g} tokens")
        visible = bits[:, : g * g]
        refuse(_at(n, at[~visible.any(axis=1)]), RejectCause.BAD_CODE, "no visible tokens")
        need = visible.astype(np.int64) @ tile_sizes(h, w, g) * c
        wrong = lens - nb != need
        refuse(_at(n, at[wrong]), RejectCause.BAD_PIXELS,
               [f"pixels: {got} bytes, the visible tiles need {exp}"
                for got, exp in zip((lens - nb)[wrong].tolist(), need[wrong].tolist(),
                                    strict=True)])
    for k in np.flatnonzero(~fast).tolist():
        try:
            visible, used = decode_visible(records[k], bool(batch.runs[k]), g)
        except CodecError as e:
            refuse(_at(n, np.array([k])), RejectCause.BAD_CODE, str(e))
            continue
        if not len(visible):
            refuse(_at(n, np.array([k])), RejectCause.BAD_CODE, "no visible tokens")
            continue
        try:  # the pixels against the visible tiles of the sample's shape
            check_patches(PatchData(rows[k].height, rows[k].width, rows[k].channels, g,
                                    visible, records[k][used:]))
        except CodecError as e:
            refuse(_at(n, np.array([k])), RejectCause.BAD_PIXELS, str(e))
    return rows


def _inflate(batch: BatchData, n: int, rules: IngestRules) -> tuple[BatchData, str, str]:
    """The batch with a zstd frame's tokens and scales in place; why every sample is refused
    as of an unknown basis ('' when none is: a basis or dictionary the ground station never
    uplinked, or a projection the scenario does not have); and what is wrong with its frame
    ('' when nothing: every sample is then refused as BAD_STRUCTURE). A frame that does not
    declare exactly what its samples need is never inflated."""
    if batch.basis and not rules.projected:
        return batch, f"basis {batch.basis}: this scenario's tokens are not projected", ""
    if batch.basis and batch.basis not in rules.bases:
        return batch, f"basis {batch.basis} was never uplinked", ""
    if not batch.basis and rules.projected and not rules.unprojected and rules.payload == "cls":
        return batch, "tokens without a basis: this scenario's satellites wait for theirs", ""
    if not batch.dictionary:
        return batch, "", ""
    zdict = rules.dictionaries.get(batch.dictionary)
    if zdict is None:
        return batch, f"zstd dictionary {batch.dictionary} was never uplinked", ""
    code, scale = _sample_bytes(batch, rules)
    want = n * (code + scale)
    import zstandard

    try:
        declared = zstandard.get_frame_parameters(batch.tokens).content_size
    except zstandard.ZstdError:
        declared = -1
    if batch.scales:
        return batch, "", "a zstd batch carries its scales inside the frame, not in scales"
    if declared != want:  # unknown (-1), or not what n samples need: never inflated
        return batch, "", (f"zstd frame declares {declared} bytes, its {n} samples need "
                           f"{want}")
    try:
        raw = zstandard.ZstdDecompressor(dict_data=zdict).decompress(  # type: ignore[arg-type]
            batch.tokens, max_output_size=want)
    except zstandard.ZstdError as e:
        return batch, "", f"zstd frame does not inflate: {str(e)[:80]}"
    if len(raw) != want:
        return batch, "", f"zstd frame inflates to {len(raw)} bytes, not the {want} declared"
    return replace(batch, tokens=raw[: n * code], scales=raw[n * code :]), "", ""


def _projected_rows(batch: BatchData, satellite: str, rules: IngestRules, refuse: _Refuse
                    ) -> list[Row]:
    """Codes of an uplinked basis, checked by decoding them (bad codes and scales refused)."""
    b = rules.bases[batch.basis]
    n, size = len(batch.ids), b.code_bytes
    codes = np.frombuffer(batch.tokens, np.uint8).reshape(n, size)
    if b.scale_bytes:
        scales = np.frombuffer(batch.scales, SCALE_WIRE[b.scale_bytes]).astype(np.float32)
    else:
        scales = np.zeros(n, np.float32)
    u, bad = b.decode(codes, scales)
    with np.errstate(over="ignore", invalid="ignore"):  # a huge finite scale: Inf, refused
        bad |= ~np.isfinite(b.reconstruct(u)).all(axis=1)
    refuse(bad, RejectCause.BAD_TOKEN, f"codes or scale that basis {batch.basis} never writes")
    ids, labels, s = batch.ids.tolist(), batch.labels.tolist(), scales.tolist()
    return [Row(ids[k], satellite, labels[k], False, 0, 0, 0, s[k],
                batch.tokens[k * size : (k + 1) * size], batch.basis) for k in range(n)]


def _cls_rows(batch: BatchData, satellite: str, rules: IngestRules, refuse: _Refuse
              ) -> list[Row]:
    if batch.basis:
        return _projected_rows(batch, satellite, rules, refuse)
    n, dim, dtype = len(batch.ids), rules.dim, rules.cls_dtype
    size = dim * CLS_ITEMSIZE[dtype]
    if dtype == "int8":
        scales = np.frombuffer(batch.scales, "<f4").astype(np.float64)
        refuse(~(np.isfinite(scales) & (scales > 0)), RejectCause.BAD_SCALE,
               "int8 CLS token needs a finite positive scale")
    else:
        scales = np.zeros(n)
        values = np.frombuffer(batch.tokens, "<f4" if dtype == "float32" else "<f2")
        refuse(~np.isfinite(values.reshape(n, dim)).all(axis=1), RejectCause.BAD_TOKEN,
               "CLS token contains NaN or Inf")
    ids, labels, s = batch.ids.tolist(), batch.labels.tolist(), scales.tolist()
    return [Row(ids[k], satellite, labels[k], False, 0, 0, 0, s[k],
                batch.tokens[k * size : (k + 1) * size]) for k in range(n)]


def _at(n: int, positions: np.ndarray) -> np.ndarray:
    where = np.zeros(n, dtype=bool)
    where[positions] = True
    return where
