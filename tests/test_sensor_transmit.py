"""A sensor host against a real ground station over localhost: budgets, failures, retries.

Nothing the ground station accepted is lost or stored twice when a stream breaks and the
satellite tries again; the bytes the sensor reports are the batches' and acks' wire sizes.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import grpc
import pytest

from sparsat.ground_station.config import GroundStationConfig
from sparsat.ground_station.server import GroundStation, build_server
from sparsat.node.data.config import SensorConfig
from sparsat.node.data.datasets import DatasetSpec
from sparsat.node.data.masking import MaskSpec
from sparsat.node.processes import sensor as sensor_module
from sparsat.node.processes.sensor import SensorServicer
from sparsat.node.wire.rpc import channel
from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb
from sparsat.proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc

SATS = ["sat-0", "sat-1"]


class Ctx:
    """Only reached for bad requests (unknown satellite)."""

    def abort(self, code: grpc.StatusCode, message: str) -> None:
        raise RuntimeError(f"{code}: {message}")


def _config(tmp_path: Path) -> GroundStationConfig:
    sensor = SensorConfig(dataset=DatasetSpec("fashion_mnist", download=False),
                          mask=MaskSpec("fixed", 0.5), payload="patches", satellites=SATS,
                          train_subset=40)
    return GroundStationConfig(sensor=sensor, store_dir=tmp_path / "store")


def _start(cfg: GroundStationConfig, port: int = 0) -> tuple[grpc.Server, str]:
    station = GroundStation(cfg)
    server, address = build_server(station, f"127.0.0.1:{port}")
    server.start()
    ch = channel(address)
    pb_grpc.RegistryStub(ch).Register(pb.RegisterRequest(
        node_id="host", role=pb.SENSOR, address="127.0.0.1:1", satellite_ids=SATS),
        wait_for_ready=True, timeout=30)
    ch.close()
    return server, address


def _host(address: str, sats: list[str] = SATS) -> SensorServicer:
    """A sensor host built from the ground station's answer to its registration."""
    with channel(address) as ch:
        reply = pb_grpc.RegistryStub(ch).Register(pb.RegisterRequest(
            node_id="host", role=pb.SENSOR, address="127.0.0.1:1", satellite_ids=sats),
            wait_for_ready=True, timeout=30)
    return SensorServicer.from_reply("host", sats, reply, address)


def _stored(cfg: GroundStationConfig) -> list[tuple[int, str]]:
    with sqlite3.connect(cfg.store_dir / "samples.sqlite") as db:
        return db.execute("SELECT id, satellite FROM payloads").fetchall()


def _gs_bytes(address: str) -> tuple[int, int]:
    ch = channel(address)
    try:
        h = pb_grpc.HealthStub(ch).Check(pb.HealthRequest(), timeout=10)
        return int(h.bytes_received), int(h.bytes_sent)
    finally:
        ch.close()


def test_budget_batch_and_sample_limits(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    server, address = _start(cfg)
    try:
        sensor = _host(address)
        one = sensor.Transmit(pb.TransmitRequest(satellite_id="sat-0", max_bytes=10**6,
                                                 max_samples=3), Ctx())
        alone = one.next_bytes  # a stream of one sample and its ack
        # room for two samples in one batch, not three
        two = sensor.Transmit(pb.TransmitRequest(satellite_id="sat-0",
                                                 max_bytes=2 * alone - 20), Ctx())
        none = sensor.Transmit(pb.TransmitRequest(satellite_id="sat-0", max_bytes=10), Ctx())
        # batches of at most ~3 samples: the rest of sat-0's 20 in several batches
        split = sensor.Transmit(pb.TransmitRequest(satellite_id="sat-0", max_bytes=10**6,
                                                   batch_bytes=3 * alone - 30), Ctx())
        received, sent = _gs_bytes(address)
    finally:
        server.stop(None)

    assert (one.acked, one.sent, len(one.batch_bytes), one.remaining) == (3, 3, 1, 20 - 3)
    assert (two.acked, two.sent, len(two.batch_bytes), two.remaining) == (2, 2, 1, 20 - 5)
    assert sum(two.batch_bytes) + sum(two.ack_bytes) <= 2 * alone - 20
    assert (none.acked, len(none.batch_bytes), none.next_bytes > 10) == (0, 0, True)
    assert (split.acked, split.remaining, split.error) == (15, 0, "")
    assert len(split.batch_bytes) == len(split.ack_bytes) == 5  # 15 samples, 3 a batch
    assert len(_stored(cfg)) == 20
    # the sensor's count of what it sent and received is the ground station's, exactly
    reports = [one, two, split]
    assert received == sum(sum(r.batch_bytes) for r in reports)
    assert sent == sum(sum(r.ack_bytes) for r in reports)
    # one small ack a batch: a few bytes, not one per sample
    assert all(a <= 10 for r in reports for a in r.ack_bytes)


def test_a_broken_stream_is_reported_and_retried_without_loss(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(tmp_path)
    server, address = _start(cfg)
    sensor = _host(address)
    first = sensor.Transmit(pb.TransmitRequest(satellite_id="sat-1", max_bytes=10**6,
                                               max_samples=4), Ctx())
    port = int(address.rsplit(":", 1)[1])
    server.stop(None)  # the ground station goes away (a crash)
    monkeypatch.setattr(sensor_module, "SEND_TIMEOUT_S", 1.0)

    failed = sensor.Transmit(pb.TransmitRequest(satellite_id="sat-1", max_bytes=10**6), Ctx())

    assert failed.error_code in (grpc.StatusCode.UNAVAILABLE.value[0],
                                 grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
    assert failed.acked == 0 and failed.remaining == 20 - 4  # nothing dropped
    server, _ = _start(cfg, port)  # back, same store
    try:
        retry = sensor.Transmit(pb.TransmitRequest(satellite_id="sat-1", max_bytes=10**6), Ctx())
    finally:
        server.stop(None)
    assert (retry.error_code, retry.acked, retry.remaining) == (0, 16, 0)
    stored = _stored(cfg)
    ids = [i for i, _ in stored]
    assert len(ids) == len(set(ids)) == 20  # every sample once
    assert {s for _, s in stored} == {"sat-1"}
    assert first.acked == 4


def test_unknown_satellite(tmp_path: Path) -> None:
    station = GroundStation(_config(tmp_path))  # in-process: Register answers, no server
    request = pb.RegisterRequest(node_id="host", role=pb.SENSOR, address="127.0.0.1:1",
                                 satellite_ids=["sat-0"])
    sensor = SensorServicer.from_reply("host", ["sat-0"], station.Register(request, Ctx()),
                                       "127.0.0.1:1")
    with pytest.raises(RuntimeError, match="NOT_FOUND"):
        sensor.Transmit(pb.TransmitRequest(satellite_id="sat-9", max_bytes=100), Ctx())
    request.satellite_ids[:] = ["sat-7"]
    with pytest.raises(RuntimeError, match=r"INVALID_ARGUMENT.*'sat-7'.*not in this scenario"):
        station.Register(request, Ctx())
