"""The ground station's and the trainer's gRPC servicers on bad input, over a real localhost port.

Every server here runs in-process on 127.0.0.1:0 and is called through the generated stubs, so
requests go through real serialization, real status codes and real message-size limits.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from ground_station import server as gs_server
from ground_station.config import GroundStationConfig
from ground_station.server import GroundStation, build_server
from node import serde
from node.codec import PatchData, encode_patches, quantize_token
from node.config import SensorConfig
from node.datasets import DatasetSpec, ImageDataset, load_dataset
from node.masking import MaskSpec, fixed_mask
from node.rpc import bind, channel, make_server, wait_ready, wire_size
from node.serde import ClsData, SampleData
from node.trainer import TrainerServicer
from node.training import AdamState
from proto.sparsat.v1 import sparsat_pb2 as pb
from proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc

SATELLITES = ["sat-0", "sat-1", "sat-2"]
SENSOR = "sat-0"  # registered in every station below
GRID = 7  # vit_tiny_patch4_28: a 7x7 grid of 4x4 patches on 28x28x1 images
DIM = 192  # its CLS width


# ---- ground-station fixtures ----------------------------------------------------------------


@pytest.fixture(scope="module")
def fmnist_test() -> ImageDataset:
    return load_dataset(DatasetSpec("fashion_mnist", download=False), "test")


@pytest.fixture(scope="module", autouse=True)
def _load_fashion_mnist_once(fmnist_test: ImageDataset) -> Iterator[None]:
    """Every station in this module shares one load of the real Fashion-MNIST test split."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gs_server, "load_dataset", lambda spec, split: fmnist_test)
        yield


@dataclass
class Station:
    station: GroundStation
    downlink: pb_grpc.DownlinkStub
    registry: pb_grpc.RegistryStub
    mission: pb_grpc.MissionStub
    health: pb_grpc.HealthStub


def _config(store_dir: Path, payload: str) -> GroundStationConfig:
    sensor = SensorConfig(
        dataset=DatasetSpec("fashion_mnist", download=False),
        mask=MaskSpec(kind="fixed", ratio=0.5, seed=0),
        payload=payload,  # type: ignore[arg-type]
        satellites=list(SATELLITES),
    )
    return GroundStationConfig(sensor=sensor, store_dir=store_dir, device="cpu")


def _run_station(store_dir: Path, payload: str) -> Iterator[Station]:
    station = GroundStation(_config(store_dir, payload))
    server, address = build_server(station, "127.0.0.1:0")
    server.start()
    ch = channel(address)
    try:
        wait_ready(ch, 10)
        st = Station(station, pb_grpc.DownlinkStub(ch), pb_grpc.RegistryStub(ch),
                     pb_grpc.MissionStub(ch), pb_grpc.HealthStub(ch))
        st.registry.Register(pb.RegisterRequest(
            node_id="sensor-proc-0", role=pb.SENSOR, address="127.0.0.1:1",
            satellite_ids=[SENSOR]), timeout=10)
        yield st
    finally:
        ch.close()
        server.stop(None)
        station.store.close()


@pytest.fixture(scope="module")
def patch_gs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Station]:
    """A patches station that is only ever sent bad samples: its store must stay empty."""
    yield from _run_station(tmp_path_factory.mktemp("patch-gs"), "patches")


@pytest.fixture(scope="module")
def cls_gs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Station]:
    """A CLS station that is only ever sent bad samples."""
    yield from _run_station(tmp_path_factory.mktemp("cls-gs"), "cls")


@pytest.fixture
def fresh_gs(tmp_path: Path) -> Iterator[Station]:
    yield from _run_station(tmp_path, "patches")


@pytest.fixture
def fresh_cls_gs(tmp_path: Path) -> Iterator[Station]:
    yield from _run_station(tmp_path, "cls")


# ---- sample builders ------------------------------------------------------------------------


def _image(fmnist: ImageDataset, i: int = 0) -> np.ndarray:
    return fmnist.image(i)


def _patch_sample(
    fmnist: ImageDataset, i: int = 0, sample_id: str | None = None, sensor: str = SENSOR
) -> pb.Sample:
    sid = sample_id if sample_id is not None else f"fashion_mnist/train/{i}"
    visible = fixed_mask(GRID * GRID, 0.5, 0, sid)
    payload = encode_patches(_image(fmnist, i), GRID, visible)
    return serde.sample_to_pb(SampleData(sid, sensor, fmnist.label(i), payload))


def _cls_sample(dtype: str = "float16", dim: int = DIM, sample_id: str = "cls/0") -> pb.Sample:
    token = np.random.default_rng(0).standard_normal(dim).astype(np.float32)
    data, scale = quantize_token(token, dtype)
    return serde.sample_to_pb(SampleData(sample_id, SENSOR, 3, ClsData(data, dtype, dim, scale)))


def _send(st: Station, msgs: list[pb.Sample]) -> tuple[list[pb.SampleAck], grpc.RpcError | None]:
    """Stream `msgs`; the acks that came back, and the error that ended the stream (if any)."""
    acks: list[pb.SampleAck] = []
    try:
        for ack in st.downlink.Send(iter(msgs), timeout=20):
            acks.append(ack)
    except grpc.RpcError as e:
        return acks, e
    return acks, None


# ---- bad patch samples ----------------------------------------------------------------------

Build = Callable[[ImageDataset], pb.Sample]


def _with_patches(fm: ImageDataset, **change: object) -> pb.Sample:
    """A good sample with some PatchData fields replaced before it is serialized."""
    good = _patch_sample(fm)
    p = serde.pb_to_sample(good).payload
    assert isinstance(p, PatchData)
    return serde.sample_to_pb(SampleData(good.sample_id, SENSOR, good.label,
                                         replace(p, **change)))  # type: ignore[arg-type]


def _odd_idx(fm: ImageDataset) -> pb.Sample:
    msg = _patch_sample(fm)
    msg.patches.visible_idx += b"\x00"
    return msg


def _field(fm: ImageDataset, **fields: object) -> pb.Sample:
    msg = _patch_sample(fm)
    for k, v in fields.items():
        setattr(msg, k, v)
    return msg


def _no_payload(fm: ImageDataset) -> pb.Sample:
    msg = _patch_sample(fm)
    msg.ClearField("patches")
    return msg


def _image_of(shape: tuple[int, int, int]) -> Build:
    def build(fm: ImageDataset) -> pb.Sample:
        img = np.full(shape, 7, dtype=np.uint8)
        payload = encode_patches(img, GRID, np.arange(10, dtype=np.uint16))
        return serde.sample_to_pb(SampleData("odd-shape", SENSOR, 1, payload))
    return build


def _grid(grid: int) -> Build:
    def build(fm: ImageDataset) -> pb.Sample:
        payload = encode_patches(_image(fm), grid, np.arange(3, dtype=np.uint16))
        return serde.sample_to_pb(SampleData("wrong-grid", SENSOR, 1, payload))
    return build


def _pixels(fm: ImageDataset, delta: int) -> pb.Sample:
    msg = _patch_sample(fm)
    px = msg.patches.pixels
    msg.patches.pixels = px[:delta] if delta < 0 else px + b"\x01" * delta
    return msg


def _idx(values: list[int]) -> Build:
    def build(fm: ImageDataset) -> pb.Sample:
        # encode_patches cuts whatever tiles it is given; the payload is then checked on arrival
        return _with_patches(fm, visible_idx=np.array(values, dtype=np.uint16))
    return build


BAD_PATCH_SAMPLES: list[tuple[str, Build, str]] = [
    ("wrong grid", _grid(4), "grid 4 does not match"),
    ("grid larger than the image", _grid(28), "grid 28 does not match"),
    ("image 32x32x1", _image_of((32, 32, 1)), "image shape"),
    ("image 28x28x3", _image_of((28, 28, 3)), "image shape"),
    ("image 28x14x1", _image_of((28, 14, 1)), "image shape"),
    ("index out of range", lambda fm: _with_patches(
        fm, visible_idx=np.array([0, 49], dtype=np.uint16), pixels=b"\0" * 32),
     "out of range"),
    ("unsorted indices", _idx([5, 0, 9]), "sorted and unique"),
    ("duplicate indices", _idx([0, 5, 5, 9]), "sorted and unique"),
    ("odd-length visible_idx", _odd_idx, "even number of bytes"),
    ("pixels too short", lambda fm: _pixels(fm, -1), "pixels"),
    ("pixels too long", lambda fm: _pixels(fm, 16), "pixels"),
    ("zero visible tokens", lambda fm: _with_patches(
        fm, visible_idx=np.zeros(0, dtype=np.uint16), pixels=b""), "no visible tokens"),
    ("label out of range", lambda fm: _field(fm, label=10), "label 10 out of range"),
    ("negative label", lambda fm: _field(fm, label=-1), "label -1 out of range"),
    ("unregistered sensor", lambda fm: _field(fm, sensor_id="sat-1"), "unknown sensor"),
    ("sensor not in scenario", lambda fm: _field(fm, sensor_id="rogue"), "unknown sensor"),
    ("empty sample_id", lambda fm: _field(fm, sample_id=""), "sample_id"),
    ("sample_id too long", lambda fm: _field(fm, sample_id="x" * 257), "sample_id"),
    ("no payload", _no_payload, "no payload"),
    ("CLS to a patches station", lambda fm: _cls_sample("float16"), "CLS payload"),
    ("oversize", lambda fm: _with_patches(fm, pixels=b"\x01" * 200_000), "oversize"),
]


@pytest.mark.parametrize(
    ("build", "match"), [c[1:] for c in BAD_PATCH_SAMPLES], ids=[c[0] for c in BAD_PATCH_SAMPLES]
)
def test_patch_station_rejects_bad_sample(
    patch_gs: Station, fmnist_test: ImageDataset, build: Build, match: str
) -> None:
    # Prepare
    msg = build(fmnist_test)

    # Execute
    acks, err = _send(patch_gs, [msg])

    # Assert
    assert acks == []
    assert err is not None
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert match in (err.details() or "")
    assert len(patch_gs.station.store) == 0


def test_oversize_sample_is_below_grpc_limit_and_above_station_limit(
    patch_gs: Station, fmnist_test: ImageDataset
) -> None:
    # Prepare: the rejection above must come from the station's own check, not gRPC's limit
    msg = _with_patches(fmnist_test, pixels=b"\x01" * 200_000)

    # Assert
    assert patch_gs.station.rules.max_sample_bytes < wire_size(msg) < 64 * 1024 * 1024


def test_sample_id_of_256_characters_is_accepted(
    fresh_gs: Station, fmnist_test: ImageDataset
) -> None:
    # Prepare
    msg = _patch_sample(fmnist_test, sample_id="y" * 256)

    # Execute
    acks, err = _send(fresh_gs, [msg])

    # Assert
    assert err is None and len(acks) == 1
    assert len(fresh_gs.station.store) == 1


# ---- bad CLS samples ------------------------------------------------------------------------


def _cls_nonfinite(dtype: str, value: float) -> pb.Sample:
    tok = np.ones(DIM, dtype="<f4" if dtype == "float32" else "<f2")
    tok[5] = value
    msg = _cls_sample(dtype)
    msg.cls.token.data = tok.tobytes()
    return msg


def _cls_scale(scale: float) -> pb.Sample:
    msg = _cls_sample("int8")
    msg.cls.token.scale = scale
    return msg


def _cls_shape(shape: list[int]) -> pb.Sample:
    msg = _cls_sample("float32")
    del msg.cls.token.shape[:]
    msg.cls.token.shape.extend(shape)
    return msg


def _cls_short() -> pb.Sample:
    msg = _cls_sample("float32")
    msg.cls.token.data = msg.cls.token.data[:-4]
    return msg


BAD_CLS_SAMPLES: list[tuple[str, Callable[[ImageDataset], pb.Sample], str]] = [
    ("patches to a CLS station", lambda fm: _patch_sample(fm), "patch payload"),
    ("CLS dim wrong", lambda fm: _cls_sample("float32", dim=DIM - 1), "CLS dim 191"),
    ("NaN in float32", lambda fm: _cls_nonfinite("float32", float("nan")), "NaN or Inf"),
    ("Inf in float32", lambda fm: _cls_nonfinite("float32", float("-inf")), "NaN or Inf"),
    ("Inf in float16", lambda fm: _cls_nonfinite("float16", float("inf")), "NaN or Inf"),
    ("int8 scale 0", lambda fm: _cls_scale(0.0), "scale"),
    ("int8 scale negative", lambda fm: _cls_scale(-0.1), "scale"),
    ("int8 scale NaN", lambda fm: _cls_scale(float("nan")), "scale"),
    ("token bytes short", lambda fm: _cls_short(), "bytes"),
    ("token 2-D", lambda fm: _cls_shape([2, 96]), "shape"),
    ("token dtype UINT8", lambda fm: _field_cls_dtype(pb.UINT8), "dtype"),
]


def _field_cls_dtype(dtype: int) -> pb.Sample:
    msg = _cls_sample("int8")
    msg.cls.token.dtype = dtype  # type: ignore[assignment]
    return msg


@pytest.mark.parametrize(
    ("build", "match"), [c[1:] for c in BAD_CLS_SAMPLES], ids=[c[0] for c in BAD_CLS_SAMPLES]
)
def test_cls_station_rejects_bad_sample(
    cls_gs: Station, fmnist_test: ImageDataset, build: Build, match: str
) -> None:
    # Prepare
    msg = build(fmnist_test)

    # Execute
    acks, err = _send(cls_gs, [msg])

    # Assert
    assert acks == []
    assert err is not None
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert match in (err.details() or "")
    assert len(cls_gs.station.store) == 0


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_cls_station_stores_good_tokens(fresh_cls_gs: Station, dtype: str) -> None:
    # Prepare
    msg = _cls_sample(dtype, sample_id=f"cls/{dtype}")

    # Execute
    acks, err = _send(fresh_cls_gs, [msg])

    # Assert
    assert err is None
    assert [(a.sample_id, a.duplicate) for a in acks] == [(f"cls/{dtype}", False)]
    assert len(fresh_cls_gs.station.store) == 1
    stored = pb.Sample.FromString(next(fresh_cls_gs.station.store.messages()))
    assert stored == msg


# ---- good samples, duplicates, partial streams ----------------------------------------------


def test_good_sample_is_stored_and_acked(fresh_gs: Station, fmnist_test: ImageDataset) -> None:
    # Prepare
    msg = _patch_sample(fmnist_test, 4)

    # Execute
    acks, err = _send(fresh_gs, [msg])

    # Assert
    assert err is None
    assert [(a.sample_id, a.duplicate) for a in acks] == [("fashion_mnist/train/4", False)]
    assert len(fresh_gs.station.store) == 1
    assert pb.Sample.FromString(next(fresh_gs.station.store.messages())) == msg


def test_resent_sample_is_acked_as_duplicate_and_stored_once(
    fresh_gs: Station, fmnist_test: ImageDataset
) -> None:
    # Prepare
    msg = _patch_sample(fmnist_test, 2)
    _send(fresh_gs, [msg])

    # Execute: a retry in a new stream, and twice within one stream
    acks1, err1 = _send(fresh_gs, [msg])
    acks2, err2 = _send(fresh_gs, [msg, msg])
    stats = fresh_gs.mission.Stats(pb.StatsRequest(), timeout=10)

    # Assert
    assert err1 is None and err2 is None
    assert [a.duplicate for a in acks1 + acks2] == [True, True, True]
    assert len(fresh_gs.station.store) == 1
    assert (stats.samples_stored, stats.samples_received, stats.duplicates) == (1, 4, 3)


def test_stream_keeps_good_samples_before_a_bad_one(
    fresh_gs: Station, fmnist_test: ImageDataset
) -> None:
    # Prepare
    good = [_patch_sample(fmnist_test, i) for i in range(3)]
    bad = _field(fmnist_test, label=99)
    bad.sample_id = "bad-one"
    msgs = [*good, bad]

    # Execute
    acks, err = _send(fresh_gs, msgs)
    stats = fresh_gs.mission.Stats(pb.StatsRequest(), timeout=10)

    # Assert
    assert [a.sample_id for a in acks] == [m.sample_id for m in good]
    assert not any(a.duplicate for a in acks)
    assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "bad-one" in (err.details() or "")
    assert len(fresh_gs.station.store) == 3
    assert stats.samples_stored == 3
    assert stats.samples_received == 3
    assert stats.rejected == 1
    assert stats.duplicates == 0
    # every received message is charged, the rejected one too
    assert stats.downlink_bytes_received == sum(wire_size(m) for m in msgs)


def test_health_counts_downlink_bytes(fresh_gs: Station, fmnist_test: ImageDataset) -> None:
    # Prepare
    msgs = [_patch_sample(fmnist_test, i) for i in range(2)]

    # Execute
    acks, _ = _send(fresh_gs, msgs)
    reply = fresh_gs.health.Check(pb.HealthRequest(), timeout=10)

    # Assert
    assert reply.role == pb.GROUND_STATION and reply.ready
    assert reply.bytes_received == sum(wire_size(m) for m in msgs)
    assert reply.bytes_sent == sum(wire_size(a) for a in acks)


def test_trainer_registration_does_not_make_its_satellite_ids_known_sensors(
    fresh_gs: Station, fmnist_test: ImageDataset
) -> None:
    # Prepare
    fresh_gs.registry.Register(pb.RegisterRequest(
        node_id="trainer-x", role=pb.TRAINER, address="127.0.0.1:2", satellite_ids=["rogue"]),
        timeout=10)

    # Execute
    _, err = _send(fresh_gs, [_field(fmnist_test, sensor_id="rogue")])

    # Assert
    assert err is not None and err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(fresh_gs.station.store) == 0


# ---- Registry and Mission -------------------------------------------------------------------


def test_register_sensor_returns_the_scenario_config(patch_gs: Station) -> None:
    # Execute
    reply = patch_gs.registry.Register(pb.RegisterRequest(
        node_id="sensor-proc-9", role=pb.SENSOR, address="127.0.0.1:9",
        satellite_ids=["sat-0"]), timeout=10)
    nodes = patch_gs.registry.ListNodes(pb.ListNodesRequest(), timeout=10).nodes

    # Assert
    cfg = SensorConfig.from_json(reply.config_json)
    assert cfg.satellites == SATELLITES and cfg.payload == "patches"
    assert "sensor-proc-9" in [n.node_id for n in nodes]


def test_register_trainer_returns_the_strategy(patch_gs: Station) -> None:
    # Execute
    reply = patch_gs.registry.Register(pb.RegisterRequest(
        node_id="trainer-9", role=pb.TRAINER, address="127.0.0.1:8", device="cpu"), timeout=10)

    # Assert
    assert json.loads(reply.config_json) == {"training": "ist"}


@pytest.mark.parametrize(
    ("request_", "match"),
    [
        (pb.RegisterRequest(node_id="s", role=pb.SENSOR, address="h:1",
                            satellite_ids=["sat-0", "sat-99"]), "sat-99"),
        (pb.RegisterRequest(node_id="s", role=pb.SENSOR, address="h:1"), "not in this scenario"),
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


def test_prepare_with_empty_store_fails_precondition(fresh_gs: Station) -> None:
    # Execute
    with pytest.raises(grpc.RpcError) as info:
        list(fresh_gs.mission.Prepare(pb.PrepareRequest(), timeout=10))

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


def _train_request(params: dict[str, torch.Tensor] | None = None, dataset_id: str = "ds",
                   steps: int = 3) -> pb.TrainRequest:
    return serde.train_job_to_pb(serde.TrainJob(
        dataset_id=dataset_id, round=0, worker=0, steps=steps, batch_size=8, lr=1e-2, seed=1,
        params=params if params is not None else _mlp_params(), rows=steps * 8))


@pytest.fixture(scope="module")
def trainer() -> Iterator[Trainer]:
    """A trainer with dataset "ds" loaded."""
    for t in _run_trainer():
        x, y = _token_data()
        t.stub.LoadDataset(serde.dataset_chunks("ds", x, y, chunk_bytes=FEAT * 4 * 16),
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
        fresh_trainer.stub.Train(iter([_train_request()]), timeout=10)

    # Assert
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not loaded" in (info.value.details() or "")


def test_load_dataset_rejects_row_mismatch(fresh_trainer: Trainer) -> None:
    # Prepare
    x, y = _token_data()
    chunk = pb.DatasetChunk(dataset_id="bad", total_rows=ROWS,
                            features=serde.ndarray_to_pb(x),
                            labels=serde.ndarray_to_pb(y[:-1]))

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
    chunks = list(serde.dataset_chunks("bad", x, y, chunk_bytes=FEAT * 4 * 16))
    for c in chunks:
        c.total_rows = announced

    # Execute
    err = _load_error(fresh_trainer, chunks)

    # Assert
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"got {ROWS} rows, announced {announced}" in (err.details() or "")
    assert "bad" not in fresh_trainer.servicer.datasets


def test_load_dataset_rejects_bad_tensor(fresh_trainer: Trainer) -> None:
    # Prepare
    x, y = _token_data()
    chunk = pb.DatasetChunk(dataset_id="bad", total_rows=ROWS, features=serde.ndarray_to_pb(x),
                            labels=serde.ndarray_to_pb(y))
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
                            labels=serde.ndarray_to_pb(y))

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
        trainer.stub.Train(iter([_train_request(make())]), timeout=10)

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
        trainer.stub.Train(iter([request]), timeout=10)

    # Assert
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_train_returns_trained_params_of_the_same_shapes(trainer: Trainer) -> None:
    # Prepare
    sent = _mlp_params()

    # Execute
    reply = trainer.stub.Train(iter([_train_request(sent, steps=4)]), timeout=20)
    got = serde.pb_to_params(reply.params)

    # Assert
    assert reply.steps_done == 4
    assert np.isfinite(reply.mean_loss) and reply.mean_loss > 0
    assert set(got) == set(sent)
    for k in sent:
        assert got[k].shape == sent[k].shape
        assert not torch.equal(got[k], sent[k]), f"{k} did not change"


def test_train_is_deterministic_for_the_same_request(trainer: Trainer) -> None:
    # Execute
    a = serde.pb_to_params(trainer.stub.Train(iter([_train_request()]), timeout=20).params)
    b = serde.pb_to_params(trainer.stub.Train(iter([_train_request()]), timeout=20).params)

    # Assert
    for k in a:
        assert torch.equal(a[k], b[k])


def test_negative_labels_are_invalid_argument(fresh_trainer: Trainer) -> None:
    # Prepare
    x, y = _token_data()
    y[:] = -1

    # Execute
    with pytest.raises(grpc.RpcError) as info:
        fresh_trainer.stub.LoadDataset(serde.dataset_chunks("neg", x, y, 1 << 20), timeout=10)
        fresh_trainer.stub.Train(iter([_train_request(dataset_id="neg")]), timeout=10)

    # Assert
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_float_labels_are_invalid_argument(fresh_trainer: Trainer) -> None:
    # Prepare
    x, y = _token_data()
    chunk = pb.DatasetChunk(dataset_id="flt", total_rows=ROWS, features=serde.ndarray_to_pb(x),
                            labels=serde.ndarray_to_pb(y.astype(np.float32)))

    # Execute
    with pytest.raises(grpc.RpcError) as info:
        fresh_trainer.stub.LoadDataset(iter([chunk]), timeout=10)
        fresh_trainer.stub.Train(iter([_train_request(dataset_id="flt")]), timeout=10)

    # Assert
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_trainer_byte_counters_equal_wire_sizes(fresh_trainer: Trainer) -> None:
    # Prepare
    x, y = _token_data()
    chunks = list(serde.dataset_chunks("ds", x, y, chunk_bytes=FEAT * 4 * 16))
    request = _train_request()
    assert len(chunks) > 1

    # Execute
    load_reply = fresh_trainer.stub.LoadDataset(iter(chunks), timeout=10)
    train_reply = fresh_trainer.stub.Train(iter([request]), timeout=20)
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
    request.moments.CopyFrom(serde.adam_to_pb(state))
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
        trainer.stub.Train(iter([_with_moments(change)]), timeout=10)

    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert match in (info.value.details() or "")


def test_train_rejects_a_negative_hidden_scale(trainer: Trainer) -> None:
    request = _train_request()
    request.hidden_scale = -2.0

    with pytest.raises(grpc.RpcError) as info:
        trainer.stub.Train(iter([request]), timeout=10)

    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_moments_sent_come_back_advanced_by_the_steps_done(trainer: Trainer) -> None:
    reply = trainer.stub.Train(iter([_with_moments(lambda s: None)]), timeout=20)

    back = serde.pb_to_adam(reply.moments, serde.pb_to_params(reply.params))
    assert all(float(t) == reply.steps_done for t in back.step.values())
    assert all(bool((m != 0).any()) for m in back.exp_avg.values())
    plain = trainer.stub.Train(iter([_train_request()]), timeout=20)
    assert not plain.HasField("moments")  # moments: reset sends none back
