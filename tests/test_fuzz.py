"""A fuzzer against real servers over gRPC (ground station, trainer): valid requests with
bytes flipped, cut, or replaced, and absurd fields. Every answer must be a status a client can
act on (never INTERNAL or UNKNOWN, which would mean a traceback in the server), the details
short (an echoed 100 KB id would overflow gRPC's metadata limit), and the server must keep
answering. The codes seen are printed (pytest -s) for the record."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
import torch

from sparsat.ground_station.config import GroundStationConfig
from sparsat.ground_station.server import GroundStation, build_server
from sparsat.node.data.config import SensorConfig
from sparsat.node.data.datasets import DatasetSpec
from sparsat.node.data.masking import MaskSpec
from sparsat.node.models.mlp import MLP
from sparsat.node.processes.trainer import TrainerServicer
from sparsat.node.wire import downlink, jobs, rpc
from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb
from sparsat.proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc

MUTATIONS = 60  # per seed message
BAD = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


def _mutants(seed: bytes, rng: random.Random) -> Iterator[bytes]:
    for _ in range(MUTATIONS):
        data = bytearray(seed)
        kind = rng.randrange(4)
        if kind == 0 and data:  # flip bytes
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif kind == 1 and data:  # cut
            del data[rng.randrange(len(data)):]
        elif kind == 2:  # random bytes
            data = bytearray(rng.randbytes(rng.randint(1, 64)))
        else:  # a splice of garbage in the middle
            at = rng.randrange(len(data) + 1)
            data[at:at] = rng.randbytes(rng.randint(1, 16))
        yield bytes(data)


def _call(ch: grpc.Channel, method: str, payload: bytes, stream_in: bool,
          stream_out: bool) -> tuple[grpc.StatusCode, str]:
    ident: Callable[[bytes], bytes] = lambda b: b  # noqa: E731
    try:
        if stream_in and stream_out:
            list(ch.stream_stream(method, ident, ident)(iter([payload]), timeout=20))
        elif stream_in:
            ch.stream_unary(method, ident, ident)(iter([payload]), timeout=20)
        elif stream_out:
            list(ch.unary_stream(method, ident, ident)(payload, timeout=20))
        else:
            ch.unary_unary(method, ident, ident)(payload, timeout=20)
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.fixture(scope="module")
def station(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GroundStation, str]]:
    sensor = SensorConfig(dataset=DatasetSpec("fashion_mnist", download=False),
                          mask=MaskSpec(kind="fixed", ratio=0.5, seed=0),
                          satellites=["sat-0", "sat-1"], train_subset=40)
    gs = GroundStation(GroundStationConfig(sensor=sensor, device="cpu",
                                           store_dir=tmp_path_factory.mktemp("store")))
    server, address = build_server(gs, "127.0.0.1:0")
    server.start()
    yield gs, address
    server.stop(None)
    gs.store.close()


def _valid_batch(gs: GroundStation) -> pb.DownlinkBatch:
    from sparsat.node.data.datasets import load_dataset
    from sparsat.node.data.masking import capture, copy_id
    from sparsat.node.data.sharding import sample_id, shard, train_subset
    from sparsat.node.wire.codec import encode_patches

    data = load_dataset(gs.cfg.sensor.dataset, "train")
    idx = shard(train_subset(len(data), 40, 0), 0, 2)[:3]
    b = downlink.BatchBuilder("sat-0")
    for i in idx:
        sid = copy_id(sample_id("fashion_mnist", "train", int(i)), None)
        cap = capture(gs.cfg.sensor.mask, data.image(int(i)), 7, sid)
        b.add(downlink.patch_payload(int(i), data.label(int(i)),
                                  encode_patches(cap.image, 7, cap.visible), False))
    return b.to_pb()


def test_fuzz_the_ground_station(station: tuple[GroundStation, str]) -> None:
    gs, address = station
    ch = rpc.channel(address)
    pb_grpc.RegistryStub(ch).Register(pb.RegisterRequest(
        node_id="sensors-0", role=pb.SENSOR, address="127.0.0.1:1",
        satellite_ids=["sat-0"]), timeout=10)
    seeds = {
        "/sparsat.v1.Downlink/Send": (_valid_batch(gs), True, True),
        "/sparsat.v1.Registry/Register": (pb.RegisterRequest(
            node_id="sensors-0", role=pb.SENSOR, address="127.0.0.1:1",
            satellite_ids=["sat-0"]), False, False),
        "/sparsat.v1.Mission/TrainEpoch": (pb.TrainEpochRequest(epoch=1), False, False),
        "/sparsat.v1.Health/Check": (pb.HealthRequest(), False, False),
    }
    rng = random.Random(0)
    codes: Counter[str] = Counter()
    for method, (msg, s_in, s_out) in seeds.items():
        for payload in _mutants(msg.SerializeToString(), rng):
            code, details = _call(ch, method, payload, s_in, s_out)
            codes[code.name] += 1
            assert code not in BAD, (method, payload, details)
            assert len(details) < 1024
    print(f"ground station, {sum(codes.values())} fuzzed calls: {dict(codes)}")
    assert codes["INVALID_ARGUMENT"] > 0
    # absurd sizes: a 100 KB node id or satellite name is refused with a short message
    big = "x" * 100_000
    for req in (pb.RegisterRequest(node_id=big, role=pb.TRAINER, address="127.0.0.1:1"),
                pb.RegisterRequest(node_id="s", role=pb.SENSOR, address="127.0.0.1:1",
                                   satellite_ids=[big])):
        code, details = _call(ch, "/sparsat.v1.Registry/Register", req.SerializeToString(),
                              False, False)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and len(details) < 1024
    code, details = _call(ch, "/sparsat.v1.Downlink/Send", pb.DownlinkBatch(
        satellite_id=big, ids=[1], labels=[1], patches=[b"\x01"]).SerializeToString(),
        True, True)
    assert code not in BAD | {grpc.StatusCode.RESOURCE_EXHAUSTED} and len(details) < 1024
    # still serving, and nothing invalid stored
    assert pb_grpc.HealthStub(ch).Check(pb.HealthRequest(), timeout=10).ready
    for chunk in gs.store.rows():
        for r in chunk:
            assert r.label < 10
    ch.close()


def test_fuzz_the_trainer() -> None:
    servicer = TrainerServicer("trainer-f", torch.device("cpu"))
    server = rpc.make_server()
    pb_grpc.add_TrainerServicer_to_server(servicer, server)
    address = rpc.bind(server, "127.0.0.1:0")
    server.start()
    ch = rpc.channel(address)
    try:
        x = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
        y = np.arange(20, dtype=np.int64) % 3
        chunks = list(jobs.dataset_chunks("d", x, y, 1 << 20))
        pb_grpc.TrainerStub(ch).LoadDataset(iter(chunks), timeout=10)
        with torch.random.fork_rng():
            torch.manual_seed(0)
            params = MLP(8, 6, 5, 3).params()
        job = jobs.TrainJob("d", 0, 0, 1, 20, 0.01, 0, params, None, 1.0, 0, 20)
        seeds = {"/sparsat.v1.Trainer/Train": jobs.train_job_to_pb(job),
                 "/sparsat.v1.Trainer/LoadDataset": chunks[0]}
        rng = random.Random(1)
        codes: Counter[str] = Counter()
        for method, msg in seeds.items():
            for payload in _mutants(msg.SerializeToString(), rng):
                code, details = _call(ch, method, payload, True,
                                      method.endswith("Train") and _train_streams())
                codes[code.name] += 1
                assert code not in BAD, (method, payload, details)
        print(f"trainer, {sum(codes.values())} fuzzed calls: {dict(codes)}")
        assert codes["INVALID_ARGUMENT"] > 0
    finally:
        ch.close()
        server.stop(None)


def _train_streams() -> bool:
    """Whether Trainer.Train streams its reply (the proto may say either)."""
    method = pb.DESCRIPTOR.services_by_name["Trainer"].methods_by_name["Train"]
    return bool(method.server_streaming)

