"""protobuf <-> plain Python for the sensor setup a ground station tells a sensor host when it
registers (RegisterReply.sensor), every count checked before it is used. One of the node's
serde modules (tensors, downlink, setup, jobs, control)."""

from __future__ import annotations

import numpy as np

from sparsat.node.data.config import ImageCodecSpec, PayloadKind, SensorSetup
from sparsat.node.wire.codec import CodecError
from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb

CLS_DTYPE_NAMES = {"float32": pb.FLOAT32, "float16": pb.FLOAT16, "int8": pb.INT8}
_CLS_NAME_OF = {v: k for k, v in CLS_DTYPE_NAMES.items()}

MAX_GRID = 1024  # a token grid past this is no encoder's: refused before anything is sized
MAX_N_TRAIN = 2**31 - 1  # and copies * N at most this: every id fits 31 bits
MAX_CLS_DIM = 65_536
_PAYLOAD_KINDS: dict[PayloadKind, pb.PayloadKind] = {
    "patches": pb.PAYLOAD_PATCHES, "cls": pb.PAYLOAD_CLS}
_PAYLOAD_NAME_OF = {v: k for k, v in _PAYLOAD_KINDS.items()}
IMAGE_CODECS = {"raw": pb.IMAGE_CODEC_RAW, "png": pb.IMAGE_CODEC_PNG, "webp": pb.IMAGE_CODEC_WEBP,
                "jpeg": pb.IMAGE_CODEC_JPEG, "jpeg2k": pb.IMAGE_CODEC_JPEG2K,
                "jpegxl": pb.IMAGE_CODEC_JPEGXL}
_CODEC_NAME_OF = {v: k for k, v in IMAGE_CODECS.items()}
MAX_CODEC_HEADER = 4096


def setup_to_pb(setup: SensorSetup) -> pb.SensorSetup:
    msg = pb.SensorSetup(
        n_train=setup.n_train, grid=setup.grid, copies=setup.copies,
        payload=_PAYLOAD_KINDS[setup.payload], cls_dim=setup.cls_dim,
        tile_rows=list(setup.tile_rows), tile_cols=list(setup.tile_cols),
        projected=setup.projected, send_unprojected=setup.send_unprojected,
        codec=IMAGE_CODECS[setup.codec.name], codec_quality=setup.codec.quality,
        codec_header_shared=setup.codec.header == "shared", codec_header=setup.codec_header)
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
        if msg.projected or msg.send_unprojected:
            raise CodecError("sensor setup: patch payloads are never projected")
    name = _CODEC_NAME_OF.get(msg.codec)
    if name is None or (payload == "cls" and (msg.codec or msg.codec_quality)):
        raise CodecError(f"sensor setup: codec {msg.codec} is not a known ImageCodec, or is "
                         "set for CLS payloads")
    try:
        codec = ImageCodecSpec(name, msg.codec_quality,
                               "shared" if msg.codec_header_shared else "inline")
    except ValueError as err:
        raise CodecError(f"sensor setup: {err}") from err
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
    head = bytes(msg.codec_header)
    if bool(head) != codec.header_in_setup or len(head) > MAX_CODEC_HEADER:
        raise CodecError(f"sensor setup: codec_header of {len(head)} bytes; a shared JPEG or "
                         f"JPEG 2000 header needs one (at most {MAX_CODEC_HEADER}), nothing "
                         "else takes one")
    if codec.coded and not edges[0]:
        raise CodecError("sensor setup: image codecs need a dataset of one image shape (its "
                         "tile edges): a coded image's size would come from the wire alone")
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
                       images=images, projected=msg.projected,
                       send_unprojected=msg.projected and msg.send_unprojected, codec=codec,
                       codec_header=head)
