"""The ground station's and the trainer's gRPC servicers on good and bad input, over a real
localhost port, and the sample store under them.

Every server here runs in-process on 127.0.0.1:0 and is called through the generated stubs, so
requests go through real serialization, real status codes and real message-size limits. Samples
are built the way node/processes/sensor.py builds them: ids copy * N + index into the N-image
training
split, each satellite's shard from sparsat.node.data.sharding.train_subset/shard, masks from
sparsat.node.data.masking.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from sparsat.ground_station import server as gs_server
from sparsat.ground_station.config import GroundStationConfig, TrainingConfig
from sparsat.ground_station.encoding import TokenCache, TokenSet, eval_key, requantize
from sparsat.ground_station.ingest import STATUS_OF, IngestRules, check_batch
from sparsat.ground_station.server import GroundStation, build_server
from sparsat.ground_station.store import Row, SampleStore, StoreMismatchError
from sparsat.node.data.config import SensorConfig
from sparsat.node.data.datasets import DatasetSpec, ImageDataset, load_dataset
from sparsat.node.data.masking import MaskSpec, capture, copy_id
from sparsat.node.data.sharding import sample_id, shard, train_subset
from sparsat.node.models import encoders
from sparsat.node.models.training import AdamState
from sparsat.node.processes.trainer import TrainerServicer
from sparsat.node.wire import downlink, jobs, tensors
from sparsat.node.wire.codec import encode_patches, masked_canvas, quantize_token, varint
from sparsat.node.wire.downlink import BatchBuilder, ClsData, Payload
from sparsat.node.wire.rpc import bind, channel, make_server, wait_ready, wire_size
from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb
from sparsat.proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc

SATELLITES = ["sat-0", "sat-1", "sat-2"]
SENSOR = "sat-0"  # registered in every station below
GRID = 7  # vit_tiny_d8_patch4_28: a 7x7 grid of 4x4 patches on 28x28x1 images
DIM = 192  # its CLS width
SUBSET = 600  # the scenario's training images: the first 600 of a seeded permutation
MASK = MaskSpec(kind="fixed", ratio=0.5, seed=0)
VISIBLE = 24  # int(49 * 0.5) tokens of 4x4x1 pixels under MASK

C = downlink.RejectCause
INVALID = grpc.StatusCode.INVALID_ARGUMENT.value[0]
DENIED = grpc.StatusCode.PERMISSION_DENIED.value[0]
CONFLICT = grpc.StatusCode.ALREADY_EXISTS.value[0]


# ---- ground-station fixtures ----------------------------------------------------------------


@dataclass(frozen=True)
class FMnist:
    train: ImageDataset
    test: ImageDataset


@pytest.fixture(scope="module")
def fm() -> FMnist:
    spec = DatasetSpec("fashion_mnist", download=False)
    return FMnist(load_dataset(spec, "train"), load_dataset(spec, "test"))


@pytest.fixture(scope="module", autouse=True)
def _load_fashion_mnist_once(fm: FMnist) -> Iterator[None]:
    """Every station in this module shares one load of the real Fashion-MNIST splits."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gs_server, "load_dataset",
                   lambda spec, split: fm.train if split == "train" else fm.test)
        yield


@dataclass
class Station:
    station: GroundStation
    downlink: pb_grpc.DownlinkStub
    registry: pb_grpc.RegistryStub
    mission: pb_grpc.MissionStub
    health: pb_grpc.HealthStub
    channel: grpc.Channel

    @property
    def store(self) -> SampleStore:
        return self.station.store

    def stats(self) -> pb.StatsReply:
        return self.mission.Stats(pb.StatsRequest(), timeout=10)

    def stored(self) -> dict[int, Row]:
        return {r.id: r for chunk in self.store.rows() for r in chunk}


def _config(store_dir: Path, payload: str = "patches", mask: MaskSpec = MASK,
            cls_dtype: str = "float16", sensor_fields: dict[str, Any] | None = None,
            **gs: Any) -> GroundStationConfig:
    fields: dict[str, Any] = {"satellites": list(SATELLITES), "train_subset": SUBSET,
                              **(sensor_fields or {})}
    sensor = SensorConfig(
        dataset=DatasetSpec("fashion_mnist", download=False), mask=mask,
        payload=payload,  # type: ignore[arg-type]
        cls_dtype=cls_dtype, **fields)
    return GroundStationConfig(sensor=sensor, store_dir=store_dir, device="cpu", **gs)


def _run_station(cfg: GroundStationConfig) -> Iterator[Station]:
    station = GroundStation(cfg)
    server, address = build_server(station, "127.0.0.1:0")
    server.start()
    ch = channel(address)
    try:
        wait_ready(ch, 10)
        st = Station(station, pb_grpc.DownlinkStub(ch), pb_grpc.RegistryStub(ch),
                     pb_grpc.MissionStub(ch), pb_grpc.HealthStub(ch), ch)
        st.registry.Register(pb.RegisterRequest(
            node_id="sensor-proc-0", role=pb.SENSOR, address="127.0.0.1:1",
            satellite_ids=[SENSOR]), timeout=10)
        yield st
    finally:
        ch.close()
        server.stop(None)
        if station.coordinator is not None:
            station.coordinator.close()
        station.store.close()


StartStation = Callable[..., Station]


@pytest.fixture
def start(tmp_path: Path) -> Iterator[StartStation]:
    """start(payload=..., mask=..., cls_dtype=..., store=NAME, **GroundStationConfig fields):
    a fresh station on its own store folder (the same NAME again: the same store)."""
    with ExitStack() as stack:
        def make(store: str = "store", **kw: Any) -> Station:
            cfg = _config(tmp_path / store, **kw)
            return stack.enter_context(contextmanager(_run_station)(cfg))
        yield make


@pytest.fixture
def station(start: StartStation) -> Station:
    return start()


@pytest.fixture(scope="module")
def patch_gs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Station]:
    """A patches station for the Registry and Mission tests, never sent a sample."""
    yield from _run_station(_config(tmp_path_factory.mktemp("patch-gs")))


# ---- sample builders (as node/processes/sensor.py builds them)
# -----------------------------------------


def _shard(sat: str) -> list[int]:
    """The training images `sat` holds in this scenario."""
    subset = train_subset(60_000, SUBSET, 0)
    return [int(i) for i in shard(subset, SATELLITES.index(sat), len(SATELLITES))]


def _outside() -> int:
    """A training image in no satellite's shard."""
    return next(i for i in range(60_000) if i not in set(train_subset(60_000, SUBSET, 0)))


def _patch(fm: FMnist, index: int, copy: int | None = None, mask: MaskSpec = MASK) -> Payload:
    sid = copy_id(sample_id("fashion_mnist", "train", index), copy)
    cap = capture(mask, fm.train.image(index), GRID, sid)
    return downlink.patch_payload(index + (copy or 0) * len(fm.train), fm.train.label(index),
                               encode_patches(cap.image, GRID, cap.visible), with_shape=False)


def _token(index: int) -> np.ndarray:
    return np.random.default_rng(index).standard_normal(DIM).astype(np.float32)


def _cls(fm: FMnist, index: int, dtype: str) -> Payload:
    data, scale = quantize_token(_token(index), dtype)
    return downlink.cls_payload(index, fm.train.label(index), ClsData(data, dtype, DIM, scale))


def _batch(payloads: list[Payload], satellite: str = SENSOR, cls: bool = False,
           int8: bool = False) -> pb.DownlinkBatch:
    builder = BatchBuilder(satellite, cls, int8)
    for p in payloads:
        builder.add(p)
    msg = builder.to_pb()
    assert wire_size(msg) == builder.wire_size()
    return msg


def _send(st: Station, batches: list[pb.DownlinkBatch]
          ) -> tuple[list[pb.BatchAck], grpc.RpcError | None]:
    """Stream `batches`; the acks that came back, and the error that ended the stream (if any)."""
    acks: list[pb.BatchAck] = []
    try:
        for ack in st.downlink.Send(iter(batches), timeout=20):
            acks.append(ack)
    except grpc.RpcError as e:
        return acks, e
    return acks, None


def _rejected(ack: pb.BatchAck) -> list[tuple[int, int, str]]:
    return [(r.position, r.code, r.reason) for r in ack.rejected]


def _causes(ack: pb.BatchAck) -> list[int]:
    return [r.cause for r in ack.rejected]


def _names(reason: str, match: str) -> bool:
    """`reason` (an ack's: its first MAX_REASON_BYTES bytes) holds `match`, or ends with at
    least 8 characters of it where the cap cut it."""
    if match in reason:
        return True
    return len(reason.encode()) > downlink.MAX_REASON_BYTES - 4 and any(
        reason.endswith(match[:k]) for k in range(len(match), min(8, len(match)) - 1, -1))


def _counts(st: Station) -> tuple[int, int, int, int, int]:
    s = st.stats()
    return (s.samples_stored, s.samples_received, s.duplicates, s.rejected,
            s.downlink_bytes_received)


def _bytes(batches: list[pb.DownlinkBatch]) -> int:
    return sum(m.ByteSize() + 5 for m in batches)


# ---- one bad sample among good ones ---------------------------------------------------------

Bad = Callable[[FMnist, list[Payload]], tuple[list[Payload], int]]


def _swap(good: list[Payload], bad: Payload) -> tuple[list[Payload], int]:
    """The batch: four of the good samples and `bad`, in id order; the bad one's position."""
    others = [p for p in good if p.id != bad.id][:4]
    batch = sorted([*others, bad], key=lambda p: p.id)
    return batch, batch.index(bad)


def _changed(**change: Any) -> Bad:
    """The third good sample with some fields replaced."""
    return lambda fm, good: _swap(good, replace(good[2], **change))


def _data(edit: Callable[[bytes], bytes], runs: bool | None = None) -> Bad:
    def build(fm: FMnist, good: list[Payload]) -> tuple[list[Payload], int]:
        p = good[2]
        return _swap(good, replace(p, data=edit(p.data), runs=p.runs if runs is None else runs))
    return build


def _set_bit(data: bytes, token: int) -> bytes:
    out = bytearray(data)
    out[token // 8] |= 1 << (token % 8)
    return bytes(out)


def _unmasked(edit: Callable[[bytes], bytes]) -> Bad:
    """Every token visible (a run code, [0, 49]), then `edit` its record."""
    def build(fm: FMnist, good: list[Payload]) -> tuple[list[Payload], int]:
        p = _patch(fm, good[2].id, mask=MaskSpec(kind="none"))
        assert p.runs and p.data[:2] == b"\x00\x31"
        return _swap(good, replace(p, data=edit(p.data)))
    return build


def _image_of(sat: str | None) -> Bad:
    def build(fm: FMnist, good: list[Payload]) -> tuple[list[Payload], int]:
        index = _shard(sat)[1] if sat else _outside()
        return _swap(good, _patch(fm, index))
    return build


BAD_PATCHES: list[tuple[str, Bad, C, str]] = [
    ("label 10", _changed(label=10), C.BAD_LABEL, "label out of range [0, 10)"),
    ("label 2**31", _changed(label=2**31), C.BAD_LABEL, "label out of range [0, 10)"),
    ("bitmap with no visible token", _data(lambda d: b"\x00" * 7), C.BAD_CODE,
     "no visible tokens"),
    ("pixels one byte short", _data(lambda d: d[:-1]), C.BAD_PIXELS,
     f"pixels: {VISIBLE * 16 - 1} bytes, the visible tiles need {VISIBLE * 16}"),
    ("pixels 16 bytes long", _data(lambda d: d + b"\x01" * 16), C.BAD_PIXELS,
     f"pixels: {VISIBLE * 16 + 16} bytes, the visible tiles need {VISIBLE * 16}"),
    ("bitmap bit 49 set", _data(lambda d: _set_bit(d, 49)), C.BAD_CODE,
     "visible-token bitmap sets bits past the 49 tokens"),
    ("bitmap bit 55 set", _data(lambda d: _set_bit(d, 55)), C.BAD_CODE,
     "visible-token bitmap sets bits past the 49 tokens"),
    ("bitmap cut short", _data(lambda d: d[:5]), C.BAD_CODE, "visible-token bitmap needs 7 bytes"),
    ("runs with an empty middle run", _data(lambda d: b"\x0a\x00\x27" + d[7:], runs=True),
     C.BAD_CODE, "only the first run may be empty"),
    ("runs that overrun", _data(lambda d: b"\x0a\x28" + d[7:], runs=True), C.BAD_CODE,
     "visible-token runs sum to 50, the grid has 49 tokens"),
    ("runs that end early", _data(lambda d: b"\x0a", runs=True), C.BAD_CODE,
     "visible-token runs end early"),
    # issue 20: a run's varint says 2**35 - 1 tokens; it was allocated (np.arange) before it
    # was checked against the grid: a MemoryError, the stream UNKNOWN, the batch lost
    ("a run of 2**35 - 1 tokens", _data(lambda d: b"\x00\xff\xff\xff\xff\x7f" + d[7:],
                                         runs=True), C.BAD_CODE,
     "visible-token runs are malformed: a varint longer than 1 bytes"),
    ("a run past the grid in its varint's one byte", _data(lambda d: b"\x00\x7f" + d[7:],
                                                          runs=True), C.BAD_CODE,
     "visible-token runs sum to 127, the grid has 49 tokens"),
    ("runs with a pixel short", _unmasked(lambda d: d[:-1]), C.BAD_PIXELS,
     "pixels: 783 bytes, the visible tiles need 784"),
    ("bitmap read as runs", _data(lambda d: d, runs=True), C.BAD_CODE, "visible-token runs"),
    ("image of another satellite", _image_of("sat-1"), C.NOT_YOURS, "image not held by sat-0"),
    ("image of no satellite", _image_of(None), C.NOT_YOURS, "image not held by sat-0"),
    ("id past the training split", lambda fm, good: _swap(good, replace(good[2], id=60_000)),
     C.BAD_ID, "id out of range: ids are below 60000"),
]


def _good(fm: FMnist, first: int, count: int, sat: str = SENSOR) -> list[Payload]:
    return [_patch(fm, i) for i in _shard(sat)[first : first + count]]


def _check_one_refused(st: Station, batch: list[Payload], pos: int, msg: pb.DownlinkBatch,
                       cause: downlink.RejectCause, match: str, follow: list[Payload],
                       cls: bool = False, int8: bool = False) -> None:
    """Send `msg` (the batch with its bad sample at `pos`) then a batch of `follow` on the
    same stream: the bad sample alone refused, the stream on, every count exact."""
    second = _batch(follow, satellite="", cls=cls, int8=int8)

    # Execute
    acks, err = _send(st, [msg, second])

    # Assert: the bad sample alone, with its code and a reason naming the problem
    assert err is None
    assert len(acks) == 2
    assert acks[0].stored == 4 and list(acks[0].duplicate_runs) == []
    [(position, got_code, reason)] = _rejected(acks[0])
    assert (position, got_code, _causes(acks[0])) == (pos, STATUS_OF[cause], [cause]), reason
    assert _names(reason, match), reason
    # the stream went on: the next batch was stored whole
    assert acks[1] == pb.BatchAck(stored=len(follow))
    kept = [p for k, p in enumerate(batch) if k != pos] + follow
    rows = st.stored()
    assert sorted(rows) == sorted(p.id for p in kept)
    for p in kept:
        r = rows[p.id]
        assert (r.satellite, r.label, r.runs, r.data) == (SENSOR, p.label, p.runs, p.data)
        assert r.scale == pytest.approx(p.scale, rel=1e-7)
    assert _counts(st) == (len(kept), 5 + len(follow), 0, 1, _bytes([msg, second]))


@pytest.mark.parametrize(("bad", "cause", "match"), [c[1:] for c in BAD_PATCHES],
                         ids=[c[0] for c in BAD_PATCHES])
def test_patch_batch_refuses_its_bad_sample_alone(
    station: Station, fm: FMnist, bad: Bad, cause: downlink.RejectCause, match: str
) -> None:
    # Prepare
    batch, pos = bad(fm, _good(fm, 0, 5))

    # Execute / Assert
    _check_one_refused(station, batch, pos, _batch(batch), cause, match, _good(fm, 5, 2))


def test_patch_batch_refuses_a_repeated_id_alone(station: Station, fm: FMnist) -> None:
    # Prepare: the third sample repeats the second's id (delta 0); the ids after it unchanged
    good = _good(fm, 0, 5)
    msg = _batch(good)
    msg.ids[3] += msg.ids[2]
    msg.ids[2] = 0

    # Execute / Assert
    _check_one_refused(station, good, 2, msg, C.REPEATED_ID, "id repeats the one before it",
                       _good(fm, 5, 2))


def test_random_masks_refuse_a_copy_past_the_epochs(start: StartStation, fm: FMnist) -> None:
    # Prepare: 2 copies of every image; copy 2 is one too many
    mask = MaskSpec(kind="random", ratio=0.5, seed=3, copies=2)
    st = start(mask=mask)
    a, b, c = _shard(SENSOR)[:3]
    batch = [_patch(fm, a, 0, mask), _patch(fm, b, 0, mask), _patch(fm, a, 1, mask),
             _patch(fm, b, 1, mask), _patch(fm, a, 2, mask)]
    follow = [_patch(fm, c, 0, mask), _patch(fm, c, 1, mask)]

    # Execute / Assert
    assert [p.id for p in batch] == [a, b, 60_000 + a, 60_000 + b, 120_000 + a]
    assert batch[0].data != batch[2].data  # each copy its own mask
    _check_one_refused(st, batch, 4, _batch(batch), C.BAD_ID,
                       "id out of range: ids are below 120000", follow)


def _cls_bad_values(dtype: str, value: float) -> Callable[[Payload], Payload]:
    def edit(p: Payload) -> Payload:
        tok = np.frombuffer(p.data, "<f4" if dtype == "float32" else "<f2").copy()
        tok[17] = value
        return replace(p, data=tok.tobytes())
    return edit


BAD_CLS: list[tuple[str, str, Callable[[Payload], Payload], C, str]] = [
    ("float16 NaN", "float16", _cls_bad_values("float16", float("nan")), C.BAD_TOKEN,
     "CLS token contains NaN or Inf"),
    ("float16 Inf", "float16", _cls_bad_values("float16", float("inf")), C.BAD_TOKEN,
     "CLS token contains NaN or Inf"),
    ("float32 -Inf", "float32", _cls_bad_values("float32", float("-inf")), C.BAD_TOKEN,
     "CLS token contains NaN or Inf"),
    ("float32 NaN", "float32", _cls_bad_values("float32", float("nan")), C.BAD_TOKEN,
     "CLS token contains NaN or Inf"),
    ("int8 zero scale", "int8", lambda p: replace(p, scale=0.0), C.BAD_SCALE,
     "int8 CLS token needs a finite positive scale"),
    ("int8 negative scale", "int8", lambda p: replace(p, scale=-0.5), C.BAD_SCALE,
     "int8 CLS token needs a finite positive scale"),
    ("int8 NaN scale", "int8", lambda p: replace(p, scale=float("nan")), C.BAD_SCALE,
     "int8 CLS token needs a finite positive scale"),
    ("int8 Inf scale", "int8", lambda p: replace(p, scale=float("inf")), C.BAD_SCALE,
     "int8 CLS token needs a finite positive scale"),
    ("label 11", "float16", lambda p: replace(p, label=11), C.BAD_LABEL,
     "label out of range [0, 10)"),
]


@pytest.mark.parametrize(("dtype", "edit", "cause", "match"), [c[1:] for c in BAD_CLS],
                         ids=[c[0] for c in BAD_CLS])
def test_cls_batch_refuses_its_bad_sample_alone(
    start: StartStation, fm: FMnist, dtype: str, edit: Callable[[Payload], Payload],
    cause: downlink.RejectCause, match: str
) -> None:
    # Prepare
    st = start(payload="cls", cls_dtype=dtype)
    ids = _shard(SENSOR)
    batch = [_cls(fm, i, dtype) for i in ids[:5]]
    batch[1] = edit(batch[1])
    follow = [_cls(fm, i, dtype) for i in ids[5:7]]

    # Execute / Assert
    _check_one_refused(st, batch, 1, _batch(batch, cls=True, int8=dtype == "int8"), cause,
                       match, follow, cls=True, int8=dtype == "int8")


def test_cls_batch_refuses_another_satellites_image(start: StartStation, fm: FMnist) -> None:
    # Prepare
    st = start(payload="cls", cls_dtype="float16")
    batch = sorted([_cls(fm, i, "float16") for i in _shard(SENSOR)[:4]]
                   + [_cls(fm, _shard("sat-2")[0], "float16")], key=lambda p: p.id)
    pos = [p.id for p in batch].index(_shard("sat-2")[0])

    # Execute / Assert
    _check_one_refused(st, batch, pos, _batch(batch, cls=True), C.NOT_YOURS,
                       "image not held by sat-0", [_cls(fm, _shard(SENSOR)[9], "float16")],
                       cls=True)


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_cls_station_stores_good_tokens_as_sent(start: StartStation, fm: FMnist,
                                                dtype: str) -> None:
    # Prepare
    st = start(payload="cls", cls_dtype=dtype)
    batch = [_cls(fm, i, dtype) for i in _shard(SENSOR)[:3]]
    msg = _batch(batch, cls=True, int8=dtype == "int8")

    # Execute
    acks, err = _send(st, [msg])

    # Assert
    assert err is None and acks == [pb.BatchAck(stored=3)]
    rows = st.stored()
    assert sorted(rows) == [p.id for p in batch]
    for p in batch:
        r = rows[p.id]
        assert (r.label, r.data, r.runs, r.height, r.width, r.channels) == (
            p.label, p.data, False, 0, 0, 0)
        assert r.scale == float(np.float32(p.scale))  # float32 on the wire
    assert _counts(st) == (3, 3, 0, 0, wire_size(msg))


# ---- structural errors: the whole batch refused, the stream goes on -------------------------


STRUCTURAL_PATCHES: list[tuple[str, Callable[[pb.DownlinkBatch], None], str]] = [
    ("a label too many", lambda m: m.labels.append(1), "batch: 6 labels for 5 ids"),
    ("a label too few", lambda m: m.labels.pop(), "batch: 4 labels for 5 ids"),
    ("CLS tokens", lambda m: setattr(m, "tokens", b"\x00" * 384),
     "batch: CLS tokens, but this scenario's sensors send patches"),
    ("int8 scales", lambda m: setattr(m, "scales", b"\x00" * 20),
     "batch: CLS tokens, but this scenario's sensors send patches"),
    ("a patch record short", lambda m: m.patches.pop(), "batch: 4 patch payloads for 5 ids"),
    ("shapes for a dataset of one shape", lambda m: m.shapes.extend([28, 28, 1] * 5),
     "batch: 15 shape values, expected 0 (3 per sample only for datasets whose images differ "
     "in size)"),
]


@pytest.mark.parametrize(("edit", "match"), [c[1:] for c in STRUCTURAL_PATCHES],
                         ids=[c[0] for c in STRUCTURAL_PATCHES])
def test_structural_error_refuses_the_batch_and_the_stream_goes_on(
    station: Station, fm: FMnist, edit: Callable[[pb.DownlinkBatch], None], match: str
) -> None:
    # Prepare
    msg = _batch(_good(fm, 0, 5))
    edit(msg)
    follow = _good(fm, 5, 2)
    second = _batch(follow, satellite="")

    # Execute
    acks, err = _send(station, [msg, second])

    # Assert
    assert err is None and len(acks) == 2
    assert acks[0].stored == 0 and list(acks[0].duplicate_runs) == []
    assert [(p, c) for p, c, _ in _rejected(acks[0])] == [(k, INVALID) for k in range(5)]
    assert all(r == downlink.cap_reason(match) for _, _, r in _rejected(acks[0])), \
        _rejected(acks[0])
    assert _causes(acks[0]) == [C.BAD_STRUCTURE] * 5
    assert acks[1] == pb.BatchAck(stored=2)
    assert sorted(station.stored()) == [p.id for p in follow]
    assert _counts(station) == (2, 7, 0, 5, _bytes([msg, second]))


STRUCTURAL_CLS: list[tuple[str, str, Callable[[pb.DownlinkBatch], None], str]] = [
    ("patches to a CLS station", "float16", lambda m: m.patches.append(b"\x00" * 7),
     "batch: patch payloads, but this scenario's sensors send CLS tokens"),
    ("tokens a byte short", "float16", lambda m: setattr(m, "tokens", m.tokens[:-1]),
     "batch: tokens are 1919 bytes, 5 float16 tokens of dim 192 need 1920"),
    ("float32 tokens to a float16 station", "float16",
     lambda m: setattr(m, "tokens", m.tokens * 2),
     "batch: tokens are 3840 bytes, 5 float16 tokens of dim 192 need 1920"),
    ("int8 without scales", "int8", lambda m: m.ClearField("scales"),
     "batch: scales are 0 bytes, expected 20; no shapes"),
    ("scales for float16", "float16", lambda m: setattr(m, "scales", b"\x00" * 20),
     "batch: scales are 20 bytes, expected 0; no shapes"),
    ("labels short", "int8", lambda m: m.labels.pop(), "batch: 4 labels for 5 ids"),
]


@pytest.mark.parametrize(("dtype", "edit", "match"), [c[1:] for c in STRUCTURAL_CLS],
                         ids=[c[0] for c in STRUCTURAL_CLS])
def test_cls_structural_error_refuses_the_batch_and_the_stream_goes_on(
    start: StartStation, fm: FMnist, dtype: str, edit: Callable[[pb.DownlinkBatch], None],
    match: str
) -> None:
    # Prepare
    st = start(payload="cls", cls_dtype=dtype)
    ids = _shard(SENSOR)
    int8 = dtype == "int8"
    msg = _batch([_cls(fm, i, dtype) for i in ids[:5]], cls=True, int8=int8)
    edit(msg)
    second = _batch([_cls(fm, ids[5], dtype)], satellite="", cls=True, int8=int8)

    # Execute
    acks, err = _send(st, [msg, second])

    # Assert
    assert err is None and len(acks) == 2
    assert _rejected(acks[0]) == [(k, INVALID, downlink.cap_reason(match)) for k in range(5)]
    assert _causes(acks[0]) == [C.BAD_STRUCTURE] * 5
    assert acks[0].stored == 0
    assert acks[1] == pb.BatchAck(stored=1)
    assert sorted(st.stored()) == [ids[5]]
    assert _counts(st) == (1, 6, 0, 5, _bytes([msg, second]))


# ---- satellites -------------------------------------------------------------------------------


def test_first_batch_without_satellite_aborts_the_stream(station: Station, fm: FMnist) -> None:
    # Prepare
    msg = _batch(_good(fm, 0, 3), satellite="")
    later = _batch(_good(fm, 3, 2))

    # Execute
    acks, err = _send(station, [msg, later])
    acks2, err2 = _send(station, [later])  # a new stream that names its satellite

    # Assert
    assert acks == []
    assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must name its satellite" in (err.details() or "")
    assert err2 is None and acks2 == [pb.BatchAck(stored=2)]
    assert sorted(station.stored()) == _shard(SENSOR)[3:5]
    # the aborted batch was received and charged, its samples counted as rejected
    assert _counts(station) == (2, 5, 0, 3, _bytes([msg, later]))


def test_satellite_named_once_per_stream(station: Station, fm: FMnist) -> None:
    # Prepare: the same satellite named again later in the stream is fine
    batches = [_batch(_good(fm, 0, 2)), _batch(_good(fm, 2, 2), satellite=""),
               _batch(_good(fm, 4, 2), satellite=SENSOR)]

    # Execute
    acks, err = _send(station, batches)

    # Assert
    assert err is None and acks == [pb.BatchAck(stored=2)] * 3
    assert len(station.store) == 6
    assert all(r.satellite == SENSOR for r in station.stored().values())


def test_another_satellite_named_within_a_stream_is_refused(station: Station,
                                                            fm: FMnist) -> None:
    # Prepare: sat-1 registered too, so only the change of name is wrong
    station.registry.Register(pb.RegisterRequest(
        node_id="sensor-proc-1", role=pb.SENSOR, address="127.0.0.1:3",
        satellite_ids=["sat-1"]), timeout=10)
    batches = [_batch(_good(fm, 0, 2)), _batch(_good(fm, 0, 3, "sat-1"), satellite="sat-1"),
               _batch(_good(fm, 2, 1), satellite="")]

    # Execute
    acks, err = _send(station, batches)

    # Assert
    assert err is None and len(acks) == 3
    assert acks[0] == pb.BatchAck(stored=2)
    assert _rejected(acks[1]) == [(k, INVALID, "the satellite changed within a stream")
                                  for k in range(3)]
    assert acks[2] == pb.BatchAck(stored=1)
    assert sorted(station.stored()) == _shard(SENSOR)[:3]


@pytest.mark.parametrize("sat", ["sat-1", "rogue"], ids=["in scenario", "not in scenario"])
def test_unregistered_satellite_is_permission_denied(station: Station, fm: FMnist,
                                                     sat: str) -> None:
    # Prepare: its own images (sat-1's shard), and a trainer that names it (does not count)
    station.registry.Register(pb.RegisterRequest(
        node_id="trainer-x", role=pb.TRAINER, address="127.0.0.1:2", satellite_ids=[sat]),
        timeout=10)
    msg = _batch(_good(fm, 0, 3, "sat-1"), satellite=sat)

    # Execute
    acks, err = _send(station, [msg])

    # Assert
    assert err is None and len(acks) == 1
    assert _rejected(acks[0]) == [(k, DENIED, f"satellite {sat!r} is not registered")
                                  for k in range(3)]
    assert acks[0].stored == 0
    assert len(station.store) == 0
    assert _counts(station) == (0, 3, 0, 3, _bytes([msg]))


def test_a_satellite_registered_later_is_accepted(station: Station, fm: FMnist) -> None:
    # Prepare
    msg = _batch(_good(fm, 0, 3, "sat-1"), satellite="sat-1")
    before, _ = _send(station, [msg])

    # Execute
    station.registry.Register(pb.RegisterRequest(
        node_id="sensor-proc-1", role=pb.SENSOR, address="127.0.0.1:3",
        satellite_ids=["sat-1"]), timeout=10)
    after, err = _send(station, [msg])

    # Assert
    assert [r.code for r in before[0].rejected] == [DENIED] * 3
    assert err is None and after == [pb.BatchAck(stored=3)]
    assert {r.satellite for r in station.stored().values()} == {"sat-1"}


# ---- duplicates and conflicts ---------------------------------------------------------------


def test_resent_batch_is_acked_as_duplicates_and_stored_once(station: Station,
                                                              fm: FMnist) -> None:
    # Prepare
    good = _good(fm, 0, 5)
    msg = _batch(good)
    again = _batch(good, satellite="")
    acks0, _ = _send(station, [msg])
    first = station.stored()

    # Execute: a retry in a new stream, and twice within one stream
    acks1, err1 = _send(station, [msg])
    acks2, err2 = _send(station, [msg, again])

    # Assert
    assert acks0 == [pb.BatchAck(stored=5)]
    assert err1 is None and err2 is None
    all_dup = pb.BatchAck(stored=0, duplicate_runs=[0, 5])
    assert acks1 == [all_dup] and acks2 == [all_dup, all_dup]
    assert downlink.pb_to_ack(acks1[0], 5).duplicates == [0, 1, 2, 3, 4]
    assert station.stored() == first
    assert _counts(station) == (5, 20, 15, 0, _bytes([msg, msg, msg, again]))


def test_partly_resent_batch_acks_duplicates_as_runs(station: Station, fm: FMnist) -> None:
    # Prepare: samples 1, 2 and 4 of the batch were stored before
    good = _good(fm, 0, 6)
    _send(station, [_batch([good[1], good[2], good[4]])])

    # Execute
    acks, err = _send(station, [_batch(good)])

    # Assert
    assert err is None
    assert acks == [pb.BatchAck(stored=3, duplicate_runs=[1, 2, 1, 1])]
    assert downlink.pb_to_ack(acks[0], 6) == downlink.AckData(3, [1, 2, 4], [])
    assert sorted(station.stored()) == [p.id for p in good]
    assert _counts(station)[:4] == (6, 9, 3, 0)


def test_same_id_with_other_content_is_already_exists(station: Station, fm: FMnist) -> None:
    # Prepare: an image stored under MASK; then its id with another mask, another label, and
    # a good new sample beside them
    good = _good(fm, 0, 3)
    _send(station, [_batch(good)])
    before = station.stored()
    other_mask = _patch(fm, good[0].id, mask=MaskSpec(kind="fixed", ratio=0.5, seed=99))
    other_label = replace(good[1], label=(good[1].label + 1) % 10)
    new = _patch(fm, _shard(SENSOR)[3])
    assert other_mask.data != good[0].data
    msg = _batch([other_mask, other_label, good[2], new])

    # Execute
    acks, err = _send(station, [msg])

    # Assert
    assert err is None
    assert acks[0].stored == 1 and list(acks[0].duplicate_runs) == [2, 1]
    assert _rejected(acks[0]) == [(0, CONFLICT, "id stored before with other content"),
                                  (1, CONFLICT, "id stored before with other content")]
    after = station.stored()
    assert {k: after[k] for k in before} == before  # unchanged
    assert sorted(after) == sorted([*before, new.id])
    assert _counts(station)[:4] == (4, 7, 1, 2)


def test_ids_sent_absolute_are_refused_whole_never_stored_as_others(
        station: Station, fm: FMnist) -> None:
    """A client that reads `ids` as absolute: its sums are other images, under these labels.
    last_id tells them apart: the whole batch refused, with or without a last_id."""
    # Prepare: 5 images of this satellite, ids written absolute, last_id the last of them
    # (what such a client believes), then again with no last_id at all
    good = _good(fm, 0, 5)
    absolute = _batch(good)
    absolute.ClearField("ids")
    absolute.ids.extend(p.id for p in good)
    absolute.last_id = good[-1].id
    unset = _batch(good, satellite="")
    del unset.ids[:]
    unset.ids.extend(p.id for p in good)
    unset.ClearField("last_id")

    # Execute
    acks, err = _send(station, [absolute, unset, _batch(good[:2], satellite="")])

    # Assert
    assert err is None and len(acks) == 3
    for ack in acks[:2]:
        assert ack.stored == 0 and _causes(ack) == [C.BAD_LAST_ID] * 5
        assert {code for _, code, _ in _rejected(ack)} == {INVALID}
        assert _rejected(ack)[0][2].startswith("last_id ")
    assert acks[2] == pb.BatchAck(stored=2)  # the same samples, delta-coded: stored
    assert sorted(station.stored()) == sorted(p.id for p in good[:2])


def _ld(field: int, payload: bytes) -> bytes:
    """A length-delimited field: tag, length, bytes (written even when empty)."""
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def _packed(values: list[int]) -> bytes:
    return b"".join(varint(v) for v in values)


def _hand_encoded(msg: pb.DownlinkBatch) -> list[bytes]:
    """`msg` encoded three ways Python's encoder never writes, each decoding to `msg`."""
    ids, labels = list(msg.ids), list(msg.labels)
    patches = b"".join(_ld(4, p) for p in msg.patches)
    head = _ld(1, msg.satellite_id.encode()) if msg.satellite_id else b""
    last = varint(9 << 3) + varint(msg.last_id)
    reversed_order = last + patches + _ld(3, _packed(labels)) + _ld(2, _packed(ids)) + head
    explicit_empty = (head + _ld(2, _packed(ids)) + _ld(3, _packed(labels)) + patches
                      + _ld(5, b"") + _ld(7, b"") + _ld(8, b"") + _ld(6, b"") + last)
    split_runs = (head + _ld(2, _packed(ids[:2])) + _ld(3, _packed(labels[:3]))
                  + _ld(2, _packed(ids[2:])) + patches + _ld(3, _packed(labels[3:])) + last)
    return [reversed_order, explicit_empty, split_runs]


def test_bytes_are_charged_as_received_whatever_the_encoding(station: Station,
                                                             fm: FMnist) -> None:
    """Another language's encoder may order fields its own way, write empty fields, or split
    a packed field: the ground station charges the bytes that arrived, not its re-encoding."""
    # Prepare: 3 batches of one stream, each written by hand another way
    good = _good(fm, 0, 15)
    msgs = [_batch(good[k : k + 5], satellite="" if k else SENSOR) for k in (0, 5, 10)]
    raws = [_hand_encoded(m)[k] for k, m in enumerate(msgs)]
    for raw, msg in zip(raws, msgs, strict=True):
        assert pb.DownlinkBatch.FromString(raw) == msg and raw != msg.SerializeToString()
    # reordering keeps the length; empty fields and split runs add to it
    assert [len(r) - m.ByteSize() for r, m in zip(raws, msgs, strict=True)] == [0, 8, 4]
    before = station.health.Check(pb.HealthRequest(), timeout=10).bytes_received
    send = station.channel.stream_stream("/sparsat.v1.Downlink/Send",
                                         request_serializer=lambda b: b,
                                         response_deserializer=pb.BatchAck.FromString)

    # Execute
    acks = list(send(iter(raws), timeout=20))

    # Assert: stored as sent, and charged exactly what was sent
    assert [a.stored for a in acks] == [5, 5, 5]
    assert sorted(station.stored()) == sorted(p.id for p in good)
    sent = sum(len(r) + 5 for r in raws)
    after = station.health.Check(pb.HealthRequest(), timeout=10).bytes_received
    assert after - before == sent
    assert _counts(station)[4] == sent


def test_int8_token_with_another_scale_is_already_exists(start: StartStation,
                                                         fm: FMnist) -> None:
    # Prepare: the same int8 values under another scale are another token
    st = start(payload="cls", cls_dtype="int8")
    p = _cls(fm, _shard(SENSOR)[0], "int8")
    _send(st, [_batch([p], cls=True, int8=True)])
    before = st.stored()

    # Execute
    acks, err = _send(st, [_batch([replace(p, scale=p.scale * 2)], cls=True, int8=True)])

    # Assert
    assert err is None
    assert _rejected(acks[0]) == [(0, CONFLICT, "id stored before with other content")]
    assert st.stored() == before


def test_store_counters_survive_a_restart(start: StartStation, fm: FMnist) -> None:
    # Prepare: a first station stores 4, refuses 1
    st = start(store="shared")
    good = _good(fm, 0, 5)
    msg = _batch([*good[:4], replace(good[4], label=12)])
    _send(st, [msg])
    counts = _counts(st)
    st.store.close()  # the first station's store; its server is stopped at teardown

    # Execute: another ground station on the same store folder
    st2 = start(store="shared")
    acks, err = _send(st2, [_batch(good[:4])])

    # Assert
    assert counts == (4, 5, 0, 1, _bytes([msg]))
    assert err is None and acks == [pb.BatchAck(stored=0, duplicate_runs=[0, 4])]
    assert _counts(st2) == (4, 9, 4, 1, _bytes([msg, _batch(good[:4])]))


def test_health_counts_downlink_bytes(station: Station, fm: FMnist) -> None:
    # Prepare
    batches = [_batch(_good(fm, 0, 3)), _batch(_good(fm, 3, 2), satellite=""),
               _batch(_good(fm, 0, 2), satellite="")]

    # Execute
    acks, _ = _send(station, batches)
    reply = station.health.Check(pb.HealthRequest(), timeout=10)

    # Assert
    assert reply.role == pb.GROUND_STATION and reply.ready
    assert reply.bytes_received == sum(wire_size(m) for m in batches) == _bytes(batches)
    assert reply.bytes_sent == sum(wire_size(a) for a in acks)
    assert [a.stored for a in acks] == [3, 2, 0]


# ---- check_batch on its own: datasets whose images differ in size ---------------------------


def test_check_batch_with_per_sample_shapes() -> None:
    # Prepare: no fixed image shape, so every sample carries (height, width, channels)
    rules = IngestRules(payload="patches", grid=GRID, dim=DIM, num_classes=10, image_shape=None,
                        n_train=100)
    rng = np.random.default_rng(0)
    shapes = [(28, 28, 1), (40, 30, 3), (7, 9, 1), (100, 64, 3)]
    payloads = []
    for k, shape in enumerate(shapes):
        image = rng.integers(0, 256, size=shape, dtype=np.uint8)
        visible = np.flatnonzero(rng.random(GRID * GRID) < 0.4).astype(np.uint16)
        payloads.append(downlink.patch_payload(k * 10, k, encode_patches(image, GRID, visible),
                                            with_shape=True))
    msg = _batch(payloads)
    msg.shapes[3 * 2 + 1] = 10  # sample 2 claims a 7x10 image: its pixels do not match

    # Execute
    checked = check_batch(downlink.pb_to_batch(msg, rules.max_id), SENSOR, rules, {SENSOR})
    no_shapes = _batch(payloads)
    no_shapes.ClearField("shapes")
    structural = check_batch(downlink.pb_to_batch(no_shapes, rules.max_id), SENSOR, rules,
                             {SENSOR})

    # Assert
    assert checked.positions == [0, 1, 3]
    assert [(r.id, r.height, r.width, r.channels) for r in checked.rows] == [
        (0, 28, 28, 1), (10, 40, 30, 3), (30, 100, 64, 3)]
    assert [r.data for r in checked.rows] == [payloads[k].data for k in (0, 1, 3)]
    [(pos, code, cause, reason)] = checked.rejected
    assert (pos, code, cause) == (2, INVALID, C.BAD_PIXELS) and reason.startswith("pixels: ")
    assert structural.rows == [] and [p for p, _, _, _ in structural.rejected] == [0, 1, 2, 3]
    assert structural.rejected[0][3] == ("batch: 0 shape values, expected 12 (3 per sample only "
                                         "for datasets whose images differ in size)")


# ---- the store ------------------------------------------------------------------------------


def _row(i: int, label: int = 1, data: bytes = b"", sat: str = SENSOR, scale: float = 0.0
         ) -> Row:
    return Row(i, sat, label, i % 2 == 1, 28, 28, 1, scale, data or bytes([i % 256]) * 9)


def _ids(*ids: int) -> bytes:
    return np.array(ids, "<i8").tobytes()


def test_store_put_batch_rows_and_version(tmp_path: Path) -> None:
    # Prepare
    store = SampleStore(tmp_path / "s.sqlite")
    empty = store.version()

    # Execute
    r1 = store.put_batch([_row(7), _row(3), _row(12)], 100, _ids(3, 7, 12, 20), SENSOR, True, 1)
    r2 = store.put_batch([_row(3), _row(5), _row(7, label=2), _row(12, scale=0.5)], 80,
                         _ids(3, 5, 7, 12), SENSOR, False, 0)
    chunks = list(store.rows(chunk=2))
    upto = [r.id for c in store.rows(chunk=10, upto=6) for r in c]

    # Assert
    assert empty == (0, 0, -1)
    # 3: a duplicate; 7 with another label and 12 with another scale: refused
    assert r1 == ([], []) and r2 == ([0], [2, 3])
    assert [[r.id for r in c] for c in chunks] == [[3, 5], [7, 12]]
    assert chunks[1][0] == _row(7)  # the first content stays
    assert upto == [3, 5]
    assert store.version() == (4, 3 + 5 + 7 + 12, 12)
    assert len(store) == 4
    assert store.counters() == {"received": 8, "received_bytes": 180, "duplicates": 1,
                                "rejected": 3}
    store.close()


def test_store_keeps_everything_across_a_reopen(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "s.sqlite"
    store = SampleStore(path)
    store.bind("config-a")
    rows = [_row(i, label=i % 10, scale=0.25 * i) for i in (2, 9, 4000)]
    store.put_batch(rows, 321, _ids(2, 9, 4000), SENSOR, True, 0)
    store.count(rejected=2, received=2, received_bytes=10)
    version = store.version()
    store.close()

    # Execute
    again = SampleStore(path)
    again.bind("config-a")
    back = [r for c in again.rows() for r in c]

    # Assert
    assert back == sorted(rows)
    assert again.version() == version == (3, 4011, 4000)
    assert again.counters() == {"received": 5, "received_bytes": 331, "duplicates": 0,
                                "rejected": 2}
    assert again.put_batch(rows[:1], 5, _ids(2), SENSOR, True, 0) == ([0], [])
    with pytest.raises(StoreMismatchError, match="another scenario configuration"):
        again.bind("config-b")
    again.close()


def test_store_of_the_old_format_is_refused(tmp_path: Path) -> None:
    # Prepare: sparsat before the batched downlink kept a `samples` table of text ids
    path = tmp_path / "samples.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE samples (sample_id TEXT PRIMARY KEY, message BLOB)")
        db.execute("INSERT INTO samples VALUES ('fashion_mnist/train/0', x'00')")
    db.close()

    # Execute / Assert
    with pytest.raises(StoreMismatchError, match="older sparsat"):
        SampleStore(path)


def test_ground_station_refuses_an_old_format_store(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "store").mkdir()
    with sqlite3.connect(tmp_path / "store" / "samples.sqlite") as db:
        db.execute("CREATE TABLE samples (sample_id TEXT PRIMARY KEY, message BLOB)")
    db.close()

    # Execute / Assert
    with pytest.raises(StoreMismatchError):
        GroundStation(_config(tmp_path / "store"))


# ---- Prepare: the store encoded in chunks, and the token cache -------------------------------


def _prepare(st: Station) -> dict[str, pb.Progress]:
    """Run Prepare; the last Progress of each stage."""
    last: dict[str, pb.Progress] = {}
    for p in st.mission.Prepare(pb.PrepareRequest(), timeout=120):
        last[p.stage] = p
    return last


def test_prepare_encodes_the_store_in_chunks_like_the_images_and_caches_it(
    start: StartStation, fm: FMnist
) -> None:
    # Prepare: a station with one trainer registered, fed 10 real samples in 2 batches
    st = start(test_subset=6, encode_batch=4,
               training=TrainingConfig(strategy="centralized", hidden=(8, 8)))
    st.registry.Register(pb.RegisterRequest(node_id="trainer-0", role=pb.TRAINER,
                                            address="127.0.0.1:9", device="cpu"), timeout=10)
    indices = _shard(SENSOR)[:10]
    payloads = [_patch(fm, i) for i in indices]
    _send(st, [_batch(payloads[:6]), _batch(payloads[6:], satellite="")])
    rows = st.store.rows
    chunks: list[int] = []

    def small_chunks(chunk: int = 4096, upto: int | None = None) -> Iterator[list[Row]]:
        for c in rows(chunk=3, upto=upto):
            chunks.append(len(c))
            yield c

    st.store.rows = small_chunks  # type: ignore[method-assign]
    encoder = encoders.create("vit_tiny_d8_patch4_28")
    caps = [capture(MASK, fm.train.image(i), GRID, sample_id("fashion_mnist", "train", i))
            for i in indices]
    direct = encoder.encode_canvases([masked_canvas(c.image, GRID, c.visible) for c in caps],
                                     [c.visible for c in caps], batch_size=4)

    # Execute
    first = _prepare(st)
    tokens1 = st.station.train_tokens
    second = _prepare(st)
    tokens2 = st.station.train_tokens
    new = _patch(fm, _shard(SENSOR)[10])
    _send(st, [_batch([new])])
    third = _prepare(st)
    tokens3 = st.station.train_tokens
    stats = st.stats()

    # Assert: streamed in chunks of 3, the features those of the images encoded directly
    assert chunks == [3, 3, 3, 1, 3, 3, 3, 2]  # the first and the third Prepare read the store
    assert tokens1 is not None and tokens2 is not None and tokens3 is not None
    assert tokens1.ids.tolist() == indices
    assert tokens1.labels.tolist() == [fm.train.label(i) for i in indices]
    np.testing.assert_allclose(tokens1.features, direct, rtol=1e-5, atol=1e-5)
    flops = 10 * encoders.encode_flops(encoder.cfg, VISIBLE)
    assert (first["encode train"].done, first["encode train"].total) == (10, 10)
    assert first["encode train"].flops == flops
    assert (first["encode train"].cached, first["encode test"].cached) == (False, False)
    assert first["encode test"].total == 6
    # a second Prepare on the same store reads both stages back, identical
    assert (second["encode train"].cached, second["encode test"].cached) == (True, True)
    assert second["encode train"].flops == flops
    np.testing.assert_array_equal(tokens2.features, tokens1.features)
    np.testing.assert_array_equal(tokens2.ids, tokens1.ids)
    assert st.station.test_tokens is not None
    # a new sample: the train stage misses, the test stage still hits
    assert (third["encode train"].cached, third["encode test"].cached) == (False, True)
    assert tokens3.ids.tolist() == sorted([*indices, new.id])
    at = tokens3.ids.tolist().index(new.id)
    np.testing.assert_allclose(np.delete(tokens3.features, at, axis=0), tokens1.features,
                               rtol=1e-5, atol=1e-5)
    assert (stats.train_tokens, stats.test_tokens) == (11, 6)


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_prepare_dequantizes_stored_cls_tokens(start: StartStation, fm: FMnist,
                                               dtype: str) -> None:
    # Prepare
    st = start(payload="cls", cls_dtype=dtype, test_subset=4,
               training=TrainingConfig(strategy="centralized", hidden=(8, 8)))
    st.registry.Register(pb.RegisterRequest(node_id="trainer-0", role=pb.TRAINER,
                                            address="127.0.0.1:9", device="cpu"), timeout=10)
    indices = _shard(SENSOR)[:5]
    payloads = [_cls(fm, i, dtype) for i in indices]
    _send(st, [_batch(payloads, cls=True, int8=dtype == "int8")])

    # Execute
    progress = _prepare(st)
    tokens = st.station.train_tokens

    # Assert: the tokens as the satellites quantized them, no encoder run on them
    assert tokens is not None
    assert tokens.ids.tolist() == indices
    if dtype == "int8":
        want = [np.frombuffer(p.data, np.int8).astype(np.float32) * np.float32(p.scale)
                for p in payloads]
    else:
        want = [np.frombuffer(p.data, "<f2").astype(np.float32) for p in payloads]
    np.testing.assert_array_equal(tokens.features, np.stack(want))
    assert progress["encode train"].flops == 0
    assert (progress["encode train"].total, progress["encode test"].total) == (5, 4)


# ---- the token cache shared by runs (content-addressed) ---------------------------------------

CENTRAL = TrainingConfig(strategy="centralized", hidden=(8, 8))


def _cached_station(start: StartStation, tmp_path: Path, store: str,
                    payloads: list[Payload], cls: str | None = None, **kw: Any) -> Station:
    """A station on store `store` using the token cache tmp_path/tc, one trainer registered,
    fed `payloads` (CLS tokens of dtype `cls` when given)."""
    if cls is not None:
        kw.update(payload="cls", cls_dtype=cls)
    st = start(store=store, token_cache=tmp_path / "tc", test_subset=6, encode_batch=4,
               training=CENTRAL, **kw)
    st.registry.Register(pb.RegisterRequest(node_id="trainer-0", role=pb.TRAINER,
                                            address="127.0.0.1:9", device="cpu"), timeout=10)
    _, error = _send(st, [_batch(payloads, cls=cls is not None, int8=cls == "int8")])
    assert error is None
    return st


def _hits(progress: dict[str, pb.Progress]) -> tuple[bool, bool]:
    return progress["encode train"].cached, progress["encode test"].cached


def test_a_station_on_another_store_hits_the_shared_token_cache(
    start: StartStation, fm: FMnist, tmp_path: Path
) -> None:
    # Prepare: two stations, two stores, one token cache, the same samples sent to each
    payloads = [_patch(fm, i) for i in _shard(SENSOR)[:8]]
    first = _cached_station(start, tmp_path, "a", payloads)
    p1 = _prepare(first)
    second = _cached_station(start, tmp_path, "b", payloads)

    # Execute
    p2 = _prepare(second)

    # Assert: the second reads both splits back, identical, and charges the same FLOPs
    assert _hits(p1) == (False, False) and _hits(p2) == (True, True)
    assert not (tmp_path / "a" / "tokens").exists() and not (tmp_path / "b" / "tokens").exists()
    assert sorted(f.name.split("-")[0] for f in (tmp_path / "tc").iterdir()) == ["test", "train"]
    for a, b in [(first.station.train_tokens, second.station.train_tokens),
                 (first.station.test_tokens, second.station.test_tokens)]:
        assert a is not None and b is not None
        np.testing.assert_array_equal(a.features, b.features)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.labels, b.labels)
    assert p2["encode train"].flops == p1["encode train"].flops > 0
    assert p2["encode test"].flops == p1["encode test"].flops > 0


OTHER_MASK = MaskSpec(kind="fixed", ratio=0.25, seed=0)
RANDOM = MaskSpec(kind="random", ratio=0.5, seed=0)
SHARD = _shard(SENSOR)
WHOLE = {"train_subset": None}  # every training image: sat-0 holds 0, 3, 6... whatever the seed
CACHE_CHANGES = [
    # (name, the first station's settings and samples (8 images of sat-0's shard), the
    #  second's settings, its samples' images and mask, (train cached, test cached) on it)
    ("another mask ratio", {}, SHARD[:8], {"mask": OTHER_MASK}, SHARD[:8], OTHER_MASK,
     (False, False)),
    ("another random-weights seed",
     {"sensor_fields": {"encoder_weights": "random", "encoder_seed": 0}}, SHARD[:8],
     {"sensor_fields": {"encoder_weights": "random", "encoder_seed": 1}}, SHARD[:8], MASK,
     (False, False)),
    ("one stored sample more", {}, SHARD[:8], {}, SHARD[:9], MASK, (False, True)),
    ("one stored sample less", {}, SHARD[:8], {}, SHARD[:7], MASK, (False, True)),
    ("another stored sample", {}, SHARD[:8], {}, SHARD[1:9], MASK, (False, True)),
    ("random masks: the test split evaluated as fixed", {}, SHARD[:8], {"mask": RANDOM},
     SHARD[:8], RANDOM, (False, True)),
    # the seed that picks the training images also picks the test images (test_subset)
    ("the same samples, other satellite names and subset seed",
     {"sensor_fields": WHOLE}, [3 * k for k in range(8)],
     {"sensor_fields": {**WHOLE, "train_indices_seed": 7,
                        "satellites": ["sat-0", "other-1", "other-2"]}},
     [3 * k for k in range(8)], MASK, (True, False)),
]


@pytest.mark.parametrize(("first_kw", "first", "second_kw", "picked", "mask", "hits"),
                         [c[1:] for c in CACHE_CHANGES], ids=[c[0] for c in CACHE_CHANGES])
def test_token_cache_misses_after_a_change_of_what_it_depends_on(
    start: StartStation, fm: FMnist, tmp_path: Path, first_kw: dict[str, Any],
    first: list[int], second_kw: dict[str, Any], picked: list[int], mask: MaskSpec,
    hits: tuple[bool, bool]
) -> None:
    # Prepare: a first station fills the cache
    one = _cached_station(start, tmp_path, "a", [_patch(fm, i) for i in first], **first_kw)
    assert _hits(_prepare(one)) == (False, False)
    copy = 0 if mask.kind == "random" else None
    second = _cached_station(start, tmp_path, "b",
                             [_patch(fm, i, copy, mask) for i in picked], **second_kw)

    # Execute
    progress = _prepare(second)

    # Assert
    assert _hits(progress) == hits
    tokens = second.station.train_tokens
    assert tokens is not None and tokens.ids.tolist() == picked
    if hits[0]:
        assert one.station.train_tokens is not None
        np.testing.assert_array_equal(tokens.features, one.station.train_tokens.features)


def test_cls_dtypes_share_one_test_split_requantized_after_the_cache(
    start: StartStation, fm: FMnist, tmp_path: Path
) -> None:
    # Prepare: float16 and int8 CLS payloads of the same tokens, one token cache
    indices = _shard(SENSOR)[:5]
    half = _cached_station(start, tmp_path, "a", [_cls(fm, i, "float16") for i in indices],
                           cls="float16")
    p1 = _prepare(half)
    int8 = _cached_station(start, tmp_path, "b", [_cls(fm, i, "int8") for i in indices],
                           cls="int8")

    # Execute
    p2 = _prepare(int8)

    # Assert: another training split, the same test split, quantized like each payload
    assert _hits(p1) == (False, False) and _hits(p2) == (False, True)
    [test_file] = (tmp_path / "tc").glob("test-*.npz")
    with np.load(test_file) as z:
        raw = z["features"]
    for st, dtype in [(half, "float16"), (int8, "int8")]:
        assert st.station.test_tokens is not None
        np.testing.assert_array_equal(st.station.test_tokens.features, requantize(raw, dtype))
    assert half.station.test_tokens is not None and int8.station.test_tokens is not None
    assert not np.array_equal(half.station.test_tokens.features, int8.station.test_tokens.features)


@pytest.mark.parametrize("damage", ["truncated", "empty", "another key"])
def test_an_unreadable_token_cache_entry_is_a_miss_and_replaced(
    start: StartStation, fm: FMnist, tmp_path: Path, damage: str
) -> None:
    # Prepare: the cache filled, then its files damaged
    st = _cached_station(start, tmp_path, "a", [_patch(fm, i) for i in _shard(SENSOR)[:6]])
    _prepare(st)
    assert st.station.train_tokens is not None and st.station.test_tokens is not None
    train, test = st.station.train_tokens.features, st.station.test_tokens.features
    files = sorted((tmp_path / "tc").glob("*.npz"))
    contents = [f.read_bytes() for f in files]
    if damage == "another key":  # whole files, swapped: each holds the other stage's key
        contents.reverse()
    for f, data in zip(files, contents, strict=True):
        f.write_bytes(data[: len(data) // 2] if damage == "truncated" else
                      b"" if damage == "empty" else data)

    # Execute
    again = _prepare(st)
    third = _prepare(st)

    # Assert: encoded again, the same features, the entries replaced (then hit)
    assert _hits(again) == (False, False) and _hits(third) == (True, True)
    np.testing.assert_array_equal(st.station.train_tokens.features, train)
    np.testing.assert_array_equal(st.station.test_tokens.features, test)
    assert sorted((tmp_path / "tc").iterdir()) == files  # no temporary file left behind


def test_token_cache_writers_of_one_entry_at_once(tmp_path: Path) -> None:
    # Prepare: 6 threads write the same entry 5 times each while another reads it
    cache = TokenCache(tmp_path / "tc")
    key: dict[str, object] = {"stage": "train", "k": 1}
    tokens = TokenSet(np.arange(4000, dtype=np.float32).reshape(500, 8),
                      np.arange(500), np.arange(500), flops=7, wall_s=1.5)
    errors: list[BaseException] = []
    read: list[TokenSet | None] = []

    def write() -> None:
        try:
            for _ in range(5):
                cache.put(key, tokens)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    # Execute
    writers = [threading.Thread(target=write) for _ in range(6)]
    for w in writers:
        w.start()
    while any(w.is_alive() for w in writers):
        read.append(cache.get(key))
    for w in writers:
        w.join()

    # Assert: no error, every read whole (or absent before the first rename), no temp file
    assert not errors
    for got in [*read, cache.get(key)]:
        if got is not None:
            np.testing.assert_array_equal(got.features, tokens.features)
            assert (got.flops, got.wall_s) == (7, 1.5)
    assert [f.name for f in (tmp_path / "tc").iterdir()] == [cache.path(key).name]
    assert cache.get({"stage": "train", "k": 2}) is None


def test_eval_key_names_the_test_split_as_encode_split_makes_it() -> None:
    spec = DatasetSpec("fashion_mnist", download=False)

    def key(mask: MaskSpec, subset: int | None = None, seed: int = 0,
            dataset: DatasetSpec = spec) -> dict[str, object]:
        return eval_key("enc", dataset, "files:0", mask, 10_000, subset, seed)

    # random masks are evaluated as fixed ones; no mask is any kind at ratio 0
    assert key(MaskSpec("random", 0.5, 3, copies=4)) == key(MaskSpec("fixed", 0.5, 3))
    assert key(MaskSpec("none", 0.0)) == key(MaskSpec("fixed", 0.0, 9))
    assert key(MaskSpec("fixed", 0.5, 0)) != key(MaskSpec("fixed", 0.5, 1))
    assert key(MaskSpec("clouds", 0.0)) != key(MaskSpec("clouds", 0.0, max_cloud=0.5))
    # the test images: the seed only matters for a subset
    assert key(MASK, None, 0) == key(MASK, None, 5) == key(MASK, 10_000, 5)
    assert key(MASK, 100, 0) != key(MASK, 100, 1)
    # the dataset, not whether it may be downloaded
    assert key(MASK, dataset=replace(spec, download=True)) == key(MASK)
    assert key(MASK, dataset=replace(spec, name="cifar10")) != key(MASK)


def test_store_content_digest_names_the_samples_not_their_senders(tmp_path: Path) -> None:
    # Prepare
    a, b = SampleStore(tmp_path / "a.sqlite"), SampleStore(tmp_path / "b.sqlite")
    a.put_batch([_row(3), _row(7)], 10, _ids(3, 7), SENSOR, True, 0)
    b.put_batch([_row(7, sat="sat-1")], 10, _ids(7), "sat-1", True, 0)
    before = b.content_digest()
    b.put_batch([_row(3, sat="sat-2")], 10, _ids(3), "sat-2", True, 0)

    # Execute / Assert: the same samples in another order from other senders: the same digest
    assert a.content_digest() == b.content_digest()
    assert a.content_digest()[:2] == (2, 7) and before[:2] == (1, 7)
    assert before != b.content_digest()
    c = SampleStore(tmp_path / "c.sqlite")
    c.put_batch([_row(3), _row(7, label=2)], 10, _ids(3, 7), SENSOR, True, 0)
    assert c.content_digest()[2] != a.content_digest()[2]  # one label differs
    assert SampleStore(tmp_path / "d.sqlite").content_digest()[:2] == (0, -1)
    for s in (a, b, c):
        s.close()


# ---- Registry and Mission -------------------------------------------------------------------


def test_register_sensor_returns_the_scenario_config(patch_gs: Station) -> None:
    # Execute
    reply = patch_gs.registry.Register(pb.RegisterRequest(
        node_id="sensor-proc-9", role=pb.SENSOR, address="127.0.0.1:9",
        satellite_ids=["sat-1"]), timeout=10)  # sat-0 is sensor-proc-0's (enrolled)
    nodes = patch_gs.registry.ListNodes(pb.ListNodesRequest(), timeout=10).nodes

    # Assert
    cfg = SensorConfig.from_json(reply.config_json)
    assert cfg.satellites == SATELLITES and cfg.payload == "patches"
    assert "sensor-proc-9" in [n.node_id for n in nodes]


def test_register_trainer_returns_the_strategy_and_threads(patch_gs: Station) -> None:
    # Execute
    reply = patch_gs.registry.Register(pb.RegisterRequest(
        node_id="trainer-9", role=pb.TRAINER, address="127.0.0.1:8", device="cpu"), timeout=10)

    # Assert
    assert json.loads(reply.config_json) == {"training": "ist", "threads": 1}


@pytest.mark.parametrize(
    ("request_", "match"),
    [
        (pb.RegisterRequest(node_id="s", role=pb.SENSOR, address="h:1",
                            satellite_ids=["sat-0", "sat-99"]), "sat-99"),
        (pb.RegisterRequest(node_id="s", role=pb.SENSOR, address="h:1"),
         "must name the satellites it hosts"),
        (pb.RegisterRequest(role=pb.SENSOR, address="h:1", satellite_ids=["sat-0"]),
         "node_id and address"),
        (pb.RegisterRequest(node_id="s", role=pb.SENSOR, satellite_ids=["sat-0"]),
         "node_id and address"),
        (pb.RegisterRequest(node_id="s", role=pb.ROLE_UNSPECIFIED, address="h:1"), "role"),
        (pb.RegisterRequest(node_id="s", role=pb.GROUND_STATION, address="h:1"), "role"),
    ],
    ids=["unknown satellite", "no satellites", "no node_id", "no address", "role unspecified",
         "role ground station"],
)
def test_register_rejects_bad_request(
    patch_gs: Station, request_: pb.RegisterRequest, match: str
) -> None:
    # Prepare
    before = {n.node_id for n in patch_gs.registry.ListNodes(pb.ListNodesRequest()).nodes}

    # Execute
    with pytest.raises(grpc.RpcError) as info:
        patch_gs.registry.Register(request_, timeout=10)
    after = {n.node_id for n in patch_gs.registry.ListNodes(pb.ListNodesRequest()).nodes}

    # Assert
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert match in (info.value.details() or "")
    assert after == before
    assert "sat-99" not in patch_gs.station.known_sensors


def test_train_epoch_before_prepare_fails_precondition(patch_gs: Station) -> None:
    # Execute
    with pytest.raises(grpc.RpcError) as info:
        patch_gs.mission.TrainEpoch(pb.TrainEpochRequest(epoch=0), timeout=10)

    # Assert
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "Prepare" in (info.value.details() or "")


def test_prepare_with_empty_store_fails_precondition(station: Station) -> None:
    # Execute
    with pytest.raises(grpc.RpcError) as info:
        list(station.mission.Prepare(pb.PrepareRequest(), timeout=10))

    # Assert
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no samples" in (info.value.details() or "")


# ---- trainer --------------------------------------------------------------------------------

ROWS, FEAT, HID1, HID2, CLASSES = 40, 8, 6, 5, 3


@dataclass
class Trainer:
    servicer: TrainerServicer
    stub: pb_grpc.TrainerStub
    health: pb_grpc.HealthStub


def _run_trainer() -> Iterator[Trainer]:
    servicer = TrainerServicer("trainer-test", torch.device("cpu"))
    server = make_server(max_workers=4)
    pb_grpc.add_TrainerServicer_to_server(servicer, server)
    pb_grpc.add_HealthServicer_to_server(servicer, server)
    address = bind(server, "127.0.0.1:0")
    server.start()
    ch = channel(address)
    try:
        wait_ready(ch, 10)
        yield Trainer(servicer, pb_grpc.TrainerStub(ch), pb_grpc.HealthStub(ch))
    finally:
        ch.close()
        server.stop(None)


def _token_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((ROWS, FEAT)).astype(np.float32),
            rng.integers(0, CLASSES, size=ROWS).astype(np.int64))


def _mlp_params(d_in: int = FEAT) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = {"w1": (HID1, d_in), "b1": (HID1,), "w2": (HID2, HID1), "b2": (HID2,),
              "w3": (CLASSES, HID2), "b3": (CLASSES,)}
    return {k: torch.randn(s, generator=g) * 0.3 for k, s in shapes.items()}


def _train(stub: pb_grpc.TrainerStub, request: pb.TrainRequest, timeout: float
           ) -> pb.TrainReply:
    """One Train call (the reply streams back in parts): the merged reply."""
    return jobs.merge_reply(stub.Train(iter([request]), timeout=timeout))[0]


def _train_request(params: dict[str, torch.Tensor] | None = None, dataset_id: str = "ds",
                   steps: int = 3) -> pb.TrainRequest:
    return jobs.train_job_to_pb(jobs.TrainJob(
        dataset_id=dataset_id, round=0, worker=0, steps=steps, batch_size=8, lr=1e-2, seed=1,
        params=params if params is not None else _mlp_params(), rows=steps * 8))


@pytest.fixture(scope="module")
def trainer() -> Iterator[Trainer]:
    """A trainer with dataset "ds" loaded."""
    for t in _run_trainer():
        x, y = _token_data()
        t.stub.LoadDataset(jobs.dataset_chunks("ds", x, y, chunk_bytes=FEAT * 4 * 16),
                           timeout=10)
        yield t


@pytest.fixture
def fresh_trainer() -> Iterator[Trainer]:
    yield from _run_trainer()


def _load_error(t: Trainer, chunks: list[pb.DatasetChunk]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        t.stub.LoadDataset(iter(chunks), timeout=10)
    return info.value


def test_train_before_load_dataset_fails_precondition(fresh_trainer: Trainer) -> None:
    # Execute
    with pytest.raises(grpc.RpcError) as info:
        _train(fresh_trainer.stub, _train_request(), 10)

    # Assert
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not loaded" in (info.value.details() or "")


def test_load_dataset_rejects_row_mismatch(fresh_trainer: Trainer) -> None:
    # Prepare
    x, y = _token_data()
    chunk = pb.DatasetChunk(dataset_id="bad", total_rows=ROWS,
                            features=tensors.ndarray_to_pb(x),
                            labels=tensors.ndarray_to_pb(y[:-1]))

    # Execute
    err = _load_error(fresh_trainer, [chunk])

    # Assert
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "features must be" in (err.details() or "")
    assert "bad" not in fresh_trainer.servicer.datasets


@pytest.mark.parametrize("announced", [ROWS - 1, ROWS + 1, 0])
def test_load_dataset_rejects_wrong_total_rows(fresh_trainer: Trainer, announced: int) -> None:
    # Prepare
    x, y = _token_data()
    chunks = list(jobs.dataset_chunks("bad", x, y, chunk_bytes=FEAT * 4 * 16))
    for c in chunks:
        c.total_rows = announced

    # Execute
    err = _load_error(fresh_trainer, chunks)

    # Assert
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    # more rows than announced are refused at the chunk that passes the count, before it is
    # decoded; fewer at the stream's end
    want = (f"rows so far, more than the {announced} announced" if announced < ROWS
            else f"got {ROWS} rows, announced {announced}")
    assert want in (err.details() or "")
    assert "bad" not in fresh_trainer.servicer.datasets


def test_load_dataset_rejects_bad_tensor(fresh_trainer: Trainer) -> None:
    # Prepare
    x, y = _token_data()
    chunk = pb.DatasetChunk(dataset_id="bad", total_rows=ROWS, features=tensors.ndarray_to_pb(x),
                            labels=tensors.ndarray_to_pb(y))
    chunk.features.data = chunk.features.data[:-1]

    # Execute
    err = _load_error(fresh_trainer, [chunk])

    # Assert
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "dataset chunk" in (err.details() or "")


def test_load_dataset_rejects_overflowing_shape(fresh_trainer: Trainer) -> None:
    # Prepare
    _, y = _token_data()
    chunk = pb.DatasetChunk(dataset_id="bad", total_rows=ROWS,
                            features=pb.Tensor(shape=[2**32, 2**32], dtype=pb.FLOAT32),
                            labels=tensors.ndarray_to_pb(y))

    # Execute
    err = _load_error(fresh_trainer, [chunk])

    # Assert
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def _params_not_chaining() -> dict[str, torch.Tensor]:
    p = _mlp_params()
    p["w2"] = torch.zeros(HID2, HID1 + 1)
    return p


def _params_nan() -> dict[str, torch.Tensor]:
    p = _mlp_params()
    p["w1"][0, 0] = float("nan")
    return p


def _params_missing() -> dict[str, torch.Tensor]:
    p = _mlp_params()
    del p["b3"]
    return p


def _params_b3_wrong() -> dict[str, torch.Tensor]:
    p = _mlp_params()
    p["b3"] = torch.zeros(CLASSES + 1)
    return p


def _params_too_few_classes() -> dict[str, torch.Tensor]:
    p = _mlp_params()
    p["w3"], p["b3"] = torch.zeros(1, HID2), torch.zeros(1)
    return p


BAD_PARAMS: list[tuple[str, Callable[[], dict[str, torch.Tensor]], str]] = [
    ("shapes do not chain", _params_not_chaining, "do not chain"),
    ("NaN", _params_nan, "NaN"),
    ("missing b3", _params_missing, "missing"),
    ("b3 wrong size", _params_b3_wrong, "b3"),
    ("w1 width != dataset dim", lambda: _mlp_params(d_in=FEAT + 2), "features"),
    ("fewer classes than labels", _params_too_few_classes, "labels reach"),
]


@pytest.mark.parametrize(("make", "match"), [c[1:] for c in BAD_PARAMS],
                         ids=[c[0] for c in BAD_PARAMS])
def test_train_rejects_bad_parameters(
    trainer: Trainer, make: Callable[[], dict[str, torch.Tensor]], match: str
) -> None:
    # Execute
    with pytest.raises(grpc.RpcError) as info:
        _train(trainer.stub, _train_request(make()), 10)

    # Assert
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert match in (info.value.details() or "")


@pytest.mark.parametrize("field", ["rows", "batch_size", "lr", "steps"])
def test_train_rejects_zero_hyperparameters(trainer: Trainer, field: str) -> None:
    # Prepare
    request = _train_request()
    setattr(request, field, 0)

    # Execute
    with pytest.raises(grpc.RpcError) as info:
        _train(trainer.stub, request, 10)

    # Assert
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_train_returns_trained_params_of_the_same_shapes(trainer: Trainer) -> None:
    # Prepare
    sent = _mlp_params()

    # Execute
    reply = _train(trainer.stub, _train_request(sent, steps=4), 20)
    got = tensors.pb_to_params(reply.params)

    # Assert
    assert reply.steps_done == 4
    assert np.isfinite(reply.mean_loss) and reply.mean_loss > 0
    assert set(got) == set(sent)
    for k in sent:
        assert got[k].shape == sent[k].shape
        assert not torch.equal(got[k], sent[k]), f"{k} did not change"


def test_train_is_deterministic_for_the_same_request(trainer: Trainer) -> None:
    # Execute
    a = tensors.pb_to_params(_train(trainer.stub, _train_request(), 20).params)
    b = tensors.pb_to_params(_train(trainer.stub, _train_request(), 20).params)

    # Assert
    for k in a:
        assert torch.equal(a[k], b[k])


def test_negative_labels_are_invalid_argument(fresh_trainer: Trainer) -> None:
    # Prepare
    x, y = _token_data()
    y[:] = -1

    # Execute
    with pytest.raises(grpc.RpcError) as info:
        fresh_trainer.stub.LoadDataset(jobs.dataset_chunks("neg", x, y, 1 << 20), timeout=10)
        _train(fresh_trainer.stub, _train_request(dataset_id="neg"), 10)

    # Assert
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_float_labels_are_invalid_argument(fresh_trainer: Trainer) -> None:
    # Prepare
    x, y = _token_data()
    chunk = pb.DatasetChunk(dataset_id="flt", total_rows=ROWS, features=tensors.ndarray_to_pb(x),
                            labels=tensors.ndarray_to_pb(y.astype(np.float32)))

    # Execute
    with pytest.raises(grpc.RpcError) as info:
        fresh_trainer.stub.LoadDataset(iter([chunk]), timeout=10)
        _train(fresh_trainer.stub, _train_request(dataset_id="flt"), 10)

    # Assert
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_trainer_byte_counters_equal_wire_sizes(fresh_trainer: Trainer) -> None:
    # Prepare
    x, y = _token_data()
    chunks = list(jobs.dataset_chunks("ds", x, y, chunk_bytes=FEAT * 4 * 16))
    request = _train_request()
    assert len(chunks) > 1

    # Execute
    load_reply = fresh_trainer.stub.LoadDataset(iter(chunks), timeout=10)
    train_reply = _train(fresh_trainer.stub, request, 20)
    health = fresh_trainer.health.Check(pb.HealthRequest(), timeout=10)

    # Assert
    assert load_reply.rows == ROWS and load_reply.dataset_id == "ds"
    assert health.role == pb.TRAINER and health.node_id == "trainer-test"
    assert health.bytes_received == sum(wire_size(c) for c in chunks) + wire_size(request)
    assert health.bytes_sent == wire_size(load_reply) + wire_size(train_reply)


def _moments(params: dict[str, torch.Tensor]) -> AdamState:
    return AdamState({k: torch.zeros_like(v) for k, v in params.items()},
                     {k: torch.zeros_like(v) for k, v in params.items()},
                     {k: torch.zeros(()) for k in params})


def _with_moments(change: Callable[[AdamState], None]) -> pb.TrainRequest:
    params = _mlp_params()
    state = _moments(params)
    change(state)
    request = _train_request(params)
    request.moments.CopyFrom(jobs.adam_to_pb(state))
    return request


BAD_MOMENTS: list[tuple[str, Callable[[AdamState], None], str]] = [
    ("exp_avg missing", lambda s: s.exp_avg.pop("w2"), "exp_avg.w2"),
    ("exp_avg_sq wrong shape", lambda s: s.exp_avg_sq.update(b1=torch.zeros(3)),
     "exp_avg_sq.b1"),
    ("step wrong shape", lambda s: s.step.update(w1=torch.zeros(2, 2)), "step.w1"),
    ("negative second moment", lambda s: s.exp_avg_sq["b2"].fill_(-1.0), "negative"),
    ("NaN first moment", lambda s: s.exp_avg["w3"].fill_(float("nan")), "NaN"),
]


@pytest.mark.parametrize(("change", "match"), [c[1:] for c in BAD_MOMENTS],
                         ids=[c[0] for c in BAD_MOMENTS])
def test_train_rejects_bad_moments(
    trainer: Trainer, change: Callable[[AdamState], None], match: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _train(trainer.stub, _with_moments(change), 10)

    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert match in (info.value.details() or "")


def test_train_rejects_a_negative_hidden_scale(trainer: Trainer) -> None:
    request = _train_request()
    request.hidden_scale = -2.0

    with pytest.raises(grpc.RpcError) as info:
        _train(trainer.stub, request, 10)

    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_moments_sent_come_back_advanced_by_the_steps_done(trainer: Trainer) -> None:
    reply = _train(trainer.stub, _with_moments(lambda s: None), 20)

    back = jobs.pb_to_adam(reply.moments, tensors.pb_to_params(reply.params))
    assert all(float(t) == reply.steps_done for t in back.step.values())
    assert all(bool((m != 0).any()) for m in back.exp_avg.values())
    plain = _train(trainer.stub, _train_request(), 20)
    assert not plain.HasField("moments")  # moments: reset sends none back
