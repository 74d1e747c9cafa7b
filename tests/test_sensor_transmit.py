"""A sensor host against a real ground station over localhost: budgets, failures, retries.

Nothing the ground station accepted is lost or stored twice when a stream breaks and the
satellite tries again; the bytes the sensor reports are the messages' wire sizes.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import grpc
import pytest

from ground_station.config import GroundStationConfig
from ground_station.server import GroundStation, build_server
from node import sensor as sensor_module
from node.config import SensorConfig
from node.datasets import DatasetSpec
from node.masking import MaskSpec
from node.rpc import GRPC_FRAME_BYTES, channel, wire_size
from node.sensor import SensorServicer
from proto.sparsat.v1 import sparsat_pb2 as pb
from proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc

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


def _stored(cfg: GroundStationConfig) -> list[tuple[str, int]]:
    with sqlite3.connect(cfg.store_dir / "samples.sqlite") as db:
        return db.execute("SELECT sample_id, length(message) FROM samples").fetchall()


def test_budget_and_sample_limits(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    server, address = _start(cfg)
    try:
        sensor = SensorServicer("host", SATS, cfg.sensor, address)
        one = sensor.Transmit(pb.TransmitRequest(satellite_id="sat-0", max_bytes=10**6,
                                                 max_samples=3), Ctx())
        budget = 2 * one.next_bytes + 10  # two samples and acks (ids differ by a digit or two)
        two = sensor.Transmit(pb.TransmitRequest(satellite_id="sat-0", max_bytes=budget), Ctx())
        none = sensor.Transmit(pb.TransmitRequest(satellite_id="sat-0", max_bytes=10), Ctx())
    finally:
        server.stop(None)

    assert (one.acked, len(one.message_bytes), one.remaining) == (3, 3, 20 - 3)
    assert (two.acked, two.remaining) == (2, 20 - 5)
    assert sum(two.message_bytes) + two.ack_bytes <= budget
    assert (none.acked, len(none.message_bytes), none.next_bytes > 10) == (0, 0, True)
    stored = _stored(cfg)
    assert len(stored) == 5
    # what the sensor reports is exactly what the ground station stored, framed
    assert sorted(n + GRPC_FRAME_BYTES for _, n in stored) == sorted(
        [*one.message_bytes, *two.message_bytes])
    # the acks are measured too: one SampleAck per stored sample, none a duplicate
    acks = sum(wire_size(pb.SampleAck(sample_id=sid)) for sid, _ in stored)
    assert one.ack_bytes + two.ack_bytes == acks > 0


def test_a_broken_stream_is_reported_and_retried_without_loss(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(tmp_path)
    server, address = _start(cfg)
    sensor = SensorServicer("host", SATS, cfg.sensor, address)
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
    ids = [sid for sid, _ in _stored(cfg)]
    assert len(ids) == len(set(ids)) == 20  # every sample once
    assert first.acked == 4


def test_unknown_satellite(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    sensor = SensorServicer("host", ["sat-0"], cfg.sensor, "127.0.0.1:1")
    with pytest.raises(RuntimeError, match="NOT_FOUND"):
        sensor.Transmit(pb.TransmitRequest(satellite_id="sat-9", max_bytes=100), Ctx())
    with pytest.raises(ValueError, match="not in the scenario"):
        SensorServicer("host", ["sat-7"], cfg.sensor, "127.0.0.1:1")
