"""The ground station tells each sensor host its satellites' images (RegisterReply.sensor).

Which images a satellite holds is the ground station's decision, told to the host at
registration with N, the token grid, the copies, the payload and the tile edges, so a host in
any language can send valid batches; the Python host builds its queues from that reply alone.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import grpc
import numpy as np
import pytest

from sparsat.ground_station.config import GroundStationConfig
from sparsat.ground_station.server import GroundStation, build_server
from sparsat.node.data.config import SensorConfig
from sparsat.node.data.datasets import DatasetSpec
from sparsat.node.data.masking import MaskSpec
from sparsat.node.data.sharding import shard, train_subset
from sparsat.node.processes.sensor import SensorServicer
from sparsat.node.wire.codec import CodecError
from sparsat.node.wire.rpc import Refused, register_reply
from sparsat.node.wire.setup import pb_to_setup, setup_to_pb
from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb

SATS = ["sat-0", "sat-1", "sat-2"]
N_TRAIN = 60_000  # Fashion-MNIST's training split


class Ctx:
    def abort(self, code: grpc.StatusCode, message: str) -> None:
        raise RuntimeError(f"{code}: {message}")


def _config(tmp_path: Path, sats: list[str] = SATS, subset: int | None = 40,
            **sensor: object) -> GroundStationConfig:
    fields: dict[str, object] = {"mask": MaskSpec("fixed", 0.5), "payload": "patches", **sensor}
    cfg = SensorConfig(dataset=DatasetSpec("fashion_mnist", download=False), satellites=sats,
                       train_subset=subset, **fields)  # type: ignore[arg-type]
    return GroundStationConfig(sensor=cfg, store_dir=tmp_path / "store")


def _request(sats: list[str]) -> pb.RegisterRequest:
    return pb.RegisterRequest(node_id="host", role=pb.SENSOR, address="127.0.0.1:1",
                              satellite_ids=sats)


def test_the_reply_names_each_satellites_images_as_the_owner_table_the_station_checks(
        tmp_path: Path) -> None:
    # Prepare
    station = GroundStation(_config(tmp_path))

    # Execute
    reply = station.Register(_request(SATS), Ctx())
    one = station.Register(_request(["sat-2"]), Ctx())

    # Assert: each satellite's list is the owner table's, in increasing (sending) order...
    setup = pb_to_setup(reply.sensor)
    assert list(setup.images) == SATS
    owner = station.rules.owner
    assert owner is not None
    for k, sat in enumerate(SATS):
        assert setup.images[sat].tolist() == np.flatnonzero(owner == k).tolist()
        # ... and today's queue, image for image: runs keep their results bit for bit
        assert setup.images[sat].tolist() == shard(train_subset(N_TRAIN, 40, 0), k, 3).tolist()
    assert sum(len(v) for v in setup.images.values()) == 40
    assert (setup.n_train, setup.grid, setup.copies, setup.payload) == (N_TRAIN, 7, 1, "patches")
    assert (setup.cls_dim, setup.cls_dtype) == (0, None)
    assert setup.tile_rows == setup.tile_cols == (0, 4, 8, 12, 16, 20, 24, 28)
    # on the wire: typed fields, indices delta-coded
    sat0 = reply.sensor.satellites[0]
    assert sat0.satellite_id == "sat-0"
    assert list(sat0.index_deltas) == np.diff(setup.images["sat-0"], prepend=0).tolist()
    # a host of one satellite is told about that one only
    assert [s.satellite_id for s in one.sensor.satellites] == ["sat-2"]
    assert list(one.sensor.satellites[0].index_deltas) == list(reply.sensor.satellites[2]
                                                               .index_deltas)


def test_cls_random_masks_the_setup_carries_copies_dim_and_dtype(tmp_path: Path) -> None:
    station = GroundStation(_config(tmp_path, payload="cls", cls_dtype="int8",
                                    mask=MaskSpec("random", 0.5, copies=3)))

    reply = station.Register(_request(["sat-1"]), Ctx())

    assert (reply.sensor.payload, reply.sensor.cls_dtype) == (pb.PAYLOAD_CLS, pb.INT8)
    setup = pb_to_setup(reply.sensor)
    assert (setup.copies, setup.cls_dim, setup.cls_dtype) == (3, 192, "int8")


def test_the_reply_for_all_60000_images_is_small(tmp_path: Path) -> None:
    # every Fashion-MNIST training image, four satellites: each delta is 4, one byte
    sats = [f"sat-{k}" for k in range(4)]
    station = GroundStation(_config(tmp_path, sats, subset=None))

    reply = station.Register(_request(sats), Ctx())

    setup = pb_to_setup(reply.sensor)
    assert sorted(np.concatenate(list(setup.images.values())).tolist()) == list(range(N_TRAIN))
    # 60,000 one-byte deltas, a few bytes a satellite and the scalars (docs/protocol.md)
    assert N_TRAIN < reply.sensor.ByteSize() <= N_TRAIN + 100  # 60,082 B measured
    absolute = sum(len(pb.SatelliteImages(satellite_id=s, index_deltas=v.tolist())
                       .SerializeToString()) for s, v in setup.images.items())
    assert absolute > 2.5 * N_TRAIN  # what plain indices would cost: 3 bytes each past 16,383


def _stored(cfg: GroundStationConfig) -> dict[str, list[int]]:
    with sqlite3.connect(cfg.store_dir / "samples.sqlite") as db:
        rows = db.execute("SELECT satellite, id FROM payloads ORDER BY rowid").fetchall()
    out: dict[str, list[int]] = {}
    for sat, i in rows:
        out.setdefault(sat, []).append(i)
    return out


def test_a_host_built_from_the_reply_sends_exactly_the_images_it_names(tmp_path: Path) -> None:
    # Prepare: a real ground station on 127.0.0.1; the host registers through sparsat.node.wire.rpc
    cfg = _config(tmp_path, SATS[:2], mask=MaskSpec("random", 0.5, copies=2))
    server, address = build_server(GroundStation(cfg), "127.0.0.1:0")
    server.start()
    try:
        reply = register_reply(address, _request(SATS[:2]), timeout_s=30)
        told = pb_to_setup(reply.sensor).images
        host = SensorServicer.from_reply("host", SATS[:2], reply, address)
        queues = {s: list(sat.pending) for s, sat in host.satellites.items()}
        # a reply that swaps the two lists: the host follows it, the station refuses
        swapped = pb.RegisterReply()
        swapped.CopyFrom(reply)
        a, b = (list(s.index_deltas) for s in swapped.sensor.satellites)
        swapped.sensor.satellites[0].index_deltas[:] = b
        swapped.sensor.satellites[1].index_deltas[:] = a
        impostor = SensorServicer.from_reply("host", SATS[:2], swapped, address)
        impostor_queue = list(impostor.satellites["sat-0"].pending)

        # Execute
        reports = [host.Transmit(pb.TransmitRequest(satellite_id=s, max_bytes=10**7), Ctx())
                   for s in SATS[:2]]
        refused = impostor.Transmit(pb.TransmitRequest(satellite_id="sat-0", max_bytes=10**7),
                                    Ctx())
    finally:
        server.stop(None)

    # Assert: the queue is the reply's list, copy 0 of every image, then copy 1
    for s in SATS[:2]:
        assert queues[s] == [(i, c) for c in range(2) for i in told[s].tolist()]
    assert impostor_queue == [
        (i, c) for c in range(2) for i in told["sat-1"].tolist()]
    assert all((r.error, r.remaining, r.rejected) == ("", 0, 0) for r in reports)
    stored = _stored(cfg)
    for s in SATS[:2]:  # id = copy * N + index, in the order sent
        assert stored[s] == [c * N_TRAIN + i for c in range(2) for i in told[s].tolist()]
    assert refused.rejected == refused.sent == 2 * len(told["sat-1"])
    assert "not held by sat-0" in refused.rejections[0]


def test_a_host_refuses_a_reply_that_does_not_fit_what_it_registered(tmp_path: Path) -> None:
    station = GroundStation(_config(tmp_path))
    reply = station.Register(_request(["sat-0"]), Ctx())

    # a satellite the host asked for is missing from the setup
    with pytest.raises(CodecError, match=r"not to the satellites registered \['sat-0', 'sat-1'\]"):
        SensorServicer.from_reply("host", ["sat-0", "sat-1"], reply, "127.0.0.1:1")
    # an older ground station: no setup at all
    with pytest.raises(CodecError, match="no sensor setup"):
        SensorServicer.from_reply("host", ["sat-0"], pb.RegisterReply(
            config_json=reply.config_json), "127.0.0.1:1")
    # a setup that does not fit this host's copy of the dataset
    other = pb.RegisterReply()
    other.CopyFrom(reply)
    other.sensor.n_train = 70_000
    with pytest.raises(ValueError, match="has 60000 images, the ground station's N is 70000"):
        SensorServicer.from_reply("host", ["sat-0"], other, "127.0.0.1:1")
    other.CopyFrom(reply)
    other.sensor.tile_rows[1] = 5
    with pytest.raises(ValueError, match="tile edges are not those of 28x28"):
        SensorServicer.from_reply("host", ["sat-0"], other, "127.0.0.1:1")


def test_a_satellite_not_in_the_scenario_is_refused_at_registration(tmp_path: Path) -> None:
    server, address = build_server(GroundStation(_config(tmp_path)), "127.0.0.1:0")
    server.start()
    try:
        with pytest.raises(Refused) as info:
            register_reply(address, _request(["sat-0", "sat-7"]), timeout_s=30)
        with pytest.raises(Refused, match="must name the satellites it hosts"):
            register_reply(address, _request([]), timeout_s=30)
    finally:
        server.stop(None)
    assert str(info.value).endswith(
        "INVALID_ARGUMENT: satellites ['sat-7'] are not in this scenario, whose 3 satellites "
        "are ['sat-0', 'sat-1', 'sat-2']")


def _setup_pb(**fields: object) -> pb.SensorSetup:
    base: dict[str, object] = {
        "n_train": 100, "grid": 2, "copies": 1, "payload": pb.PAYLOAD_PATCHES,
        "tile_rows": [0, 2, 4], "tile_cols": [0, 3, 5],
        "satellites": [pb.SatelliteImages(satellite_id="a", index_deltas=[3, 1, 10])]}
    return pb.SensorSetup(**{**base, **fields})  # type: ignore[arg-type]


def test_setup_round_trip() -> None:
    setup = pb_to_setup(_setup_pb())
    assert setup.images["a"].tolist() == [3, 4, 14]
    again = pb_to_setup(setup_to_pb(setup))
    assert again.images["a"].tolist() == [3, 4, 14]
    assert (again.n_train, again.grid, again.tile_rows, again.tile_cols) == (
        100, 2, (0, 2, 4), (0, 3, 5))
    with pytest.raises(ValueError, match="strictly increase"):
        setup_to_pb(dataclasses.replace(setup, images={"a": np.array([4, 3])}))


@pytest.mark.parametrize(("fields", "match"), [
    ({"n_train": 0}, "n_train 0"),
    ({"grid": 0}, "grid 0"),
    ({"grid": 5000}, "grid 5000"),
    ({"copies": 0}, "copies 0"),
    ({"copies": 2**30}, "copies"),
    ({"payload": pb.PAYLOAD_UNSPECIFIED}, "payload 0"),
    ({"payload": pb.PAYLOAD_CLS}, "CLS payloads need a cls_dtype"),
    ({"tile_rows": [0, 2]}, "tile_rows has 2 edges"),
    ({"tile_cols": [1, 3, 5]}, "tile_cols must start at 0"),
    ({"tile_cols": []}, "both set or both empty"),
    ({"satellites": [pb.SatelliteImages(satellite_id="a", index_deltas=[3, 0])]},
     "strictly increase"),
    ({"satellites": [pb.SatelliteImages(satellite_id="a", index_deltas=[99, 1])]},
     "below N = 100"),
    ({"satellites": [pb.SatelliteImages(satellite_id="a"), pb.SatelliteImages(
        satellite_id="a")]}, "twice"),
    ({"satellites": [pb.SatelliteImages(satellite_id="a", index_deltas=[1] * 101)]},
     "more indices than N"),
], ids=lambda v: str(v)[:40] if isinstance(v, str) else None)
def test_a_malformed_setup_is_refused_naming_what_is_wrong(fields: dict[str, object],
                                                           match: str) -> None:
    with pytest.raises(CodecError, match=match):
        pb_to_setup(_setup_pb(**fields))
