"""Captures over time: the schedule, on-board storage and its policy, revisits, arrival stamps.

The sensor host runs against a real ground station over localhost (and, for a stream that
breaks after its batches went out, against a ground station that reads them and dies before
it acks).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from concurrent import futures
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest

from sparsat.ground_station.config import GroundStationConfig
from sparsat.ground_station.server import GroundStation, build_server
from sparsat.ground_station.store import SampleStore
from sparsat.node.data.capture import CaptureSpec
from sparsat.node.data.config import SensorConfig
from sparsat.node.data.datasets import DatasetSpec
from sparsat.node.data.masking import MaskSpec
from sparsat.node.processes import sensor as sensor_module
from sparsat.node.processes.sensor import SensorServicer
from sparsat.node.wire.rpc import channel
from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb
from sparsat.proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc

SATS = ["sat-0", "sat-1"]
N_SHARD = 20  # train_subset 40 over two satellites


class Ctx:
    def abort(self, code: grpc.StatusCode, message: str) -> None:
        raise RuntimeError(f"{code.name}: {message}")


# ---- the schedule ------------------------------------------------------------------------


def test_captures_follow_the_rate_the_duty_cycle_and_stop_at_the_horizon() -> None:
    every_minute = CaptureSpec(rate_per_h=60, storage_bytes=1, horizon_s=3600)
    assert [every_minute.time_of(k) for k in range(3)] == [0.0, 60.0, 120.0]
    assert every_minute.captured_by(0) == 1 and every_minute.captured_by(59.9) == 1
    assert every_minute.captured_by(60) == 2
    assert every_minute.max_captures == 60  # 0, 60, ..., 3540: none at the horizon
    assert every_minute.captured_by(10**6) == 60
    assert every_minute.next_capture_s(59) == 3540 and every_minute.next_capture_s(60) == -1
    # on 600 s of every 1800 s: 10 captures a period, then nothing until the next one
    duty = CaptureSpec(rate_per_h=60, storage_bytes=1, horizon_s=3 * 1800, duty_on_s=600,
                       duty_period_s=1800)
    assert [duty.time_of(k) for k in (9, 10, 11)] == [540.0, 1800.0, 1860.0]
    assert duty.captured_by(1799) == 10 and duty.captured_by(1800) == 11
    assert duty.max_captures == 30
    for k in range(30):  # every capture is counted at its own time, not before
        assert duty.captured_by(duty.time_of(k)) == k + 1
        assert duty.captured_by(duty.time_of(k) - 1e-6) == k
    assert duty.revisits(N_SHARD) == 2 and duty.revisits(30) == 1 and duty.revisits(7) == 5


@pytest.mark.parametrize("bad", [
    {"rate_per_h": 0}, {"storage_bytes": 0}, {"horizon_s": float("inf")},
    {"when_full": "drop_random"}, {"duty_on_s": 10.0}, {"duty_on_s": 20.0, "duty_period_s": 10.0},
])
def test_a_capture_schedule_that_cannot_be_is_refused(bad: dict[str, object]) -> None:
    good: dict[str, object] = {"rate_per_h": 60, "storage_bytes": 1000, "horizon_s": 3600.0}
    with pytest.raises(ValueError):
        CaptureSpec(**{**good, **bad})  # type: ignore[arg-type]


# ---- the sensor host -------------------------------------------------------------------


def _config(tmp_path: Path, capture: CaptureSpec, payload: str = "patches",
            mask: MaskSpec | None = None) -> GroundStationConfig:
    sensor = SensorConfig(dataset=DatasetSpec("fashion_mnist", download=False),
                          mask=mask or MaskSpec("fixed", 0.5), payload=payload,  # type: ignore[arg-type]
                          satellites=SATS, train_subset=2 * N_SHARD, capture=capture,
                          cls_dtype="int8")
    return GroundStationConfig(sensor=sensor, store_dir=tmp_path / "store")


def _start(cfg: GroundStationConfig) -> tuple[grpc.Server, str, SensorServicer]:
    station = GroundStation(cfg)
    server, address = build_server(station, "127.0.0.1:0")
    server.start()
    with channel(address) as ch:
        reply = pb_grpc.RegistryStub(ch).Register(pb.RegisterRequest(
            node_id="host", role=pb.SENSOR, address="127.0.0.1:1", satellite_ids=SATS),
            wait_for_ready=True, timeout=30)
    return server, address, SensorServicer.from_reply("host", SATS, reply, address)


def _transmit(sensor: SensorServicer, t: float, max_bytes: int = 10**6, sat: str = "sat-0",
              transmit_id: int = 0) -> pb.TransmitReport:
    return sensor.Transmit(pb.TransmitRequest(satellite_id=sat, max_bytes=max_bytes,
                                              mission_time_s=t, transmit_id=transmit_id), Ctx())


def _stored_ids(cfg: GroundStationConfig) -> list[int]:
    with sqlite3.connect(cfg.store_dir / "samples.sqlite") as db:
        return [i for (i,) in db.execute("SELECT id FROM payloads ORDER BY id")]


def _queue(sensor: SensorServicer, sat: str = "sat-0") -> list[tuple[int, int | None]]:
    return list(sensor.satellites[sat].pending)


def test_a_satellite_captures_what_is_due_and_revisits_its_shard(tmp_path: Path) -> None:
    spec = CaptureSpec(rate_per_h=3600, storage_bytes=10**7, horizon_s=45.0)  # 1 a second
    cfg = _config(tmp_path, spec)
    server, _, sensor = _start(cfg)
    try:
        assert _transmit(sensor, 0.0, max_bytes=0).captured == 1  # capture 0 is at t = 0
        early = _transmit(sensor, 9.5, max_bytes=0)
        held = sum(sensor.satellites["sat-0"].sizes.values())
        with pytest.raises(RuntimeError, match="INVALID_ARGUMENT.*mission_time_s"):
            _transmit(sensor, 5.0, max_bytes=0)  # the clock never goes back
        sent = _transmit(sensor, 30.0)
        last = _transmit(sensor, 10**6)  # the horizon caps the captures
    finally:
        server.stop(None)
    assert (early.captured, early.remaining, early.sent) == (9, 10, 0)
    assert early.next_capture_s == 10.0
    assert early.onboard_bytes == held > 10 * 300  # ten half-masked patch payloads
    assert (sent.captured, sent.acked, sent.remaining) == (21, 31, 0)
    assert (last.captured, last.acked, last.next_capture_s, last.onboard_bytes) == (
        45 - 31, 14, -1.0, 0)
    # capture k is image k mod 20 of the shard, revisit k // 20: ids r * N + index, every
    # revisit a sample of its own (with its own mask: other pixels sent)
    shard = [int(i) for i in sensor.satellites["sat-0"].shard]
    n = sensor.setup.n_train
    assert _stored_ids(cfg) == sorted(r * n + shard[k] for k, r in
                                      ((k % N_SHARD, k // N_SHARD) for k in range(45)))
    with sqlite3.connect(cfg.store_dir / "samples.sqlite") as db:
        first, again = (db.execute("SELECT data FROM payloads WHERE id = ?", (i,)).fetchone()[0]
                        for i in (shard[0], n + shard[0]))
    assert first != again


PROBE = CaptureSpec(rate_per_h=3600, storage_bytes=10**7, horizon_s=100.0)  # 1 a second


def _sizes(tmp_path: Path, t: float) -> list[int]:
    """What the captures due by `t` take on board (storage large enough for all)."""
    server, _, sensor = _start(_config(tmp_path / "probe", PROBE))
    try:
        _transmit(sensor, t, max_bytes=0)
        return list(sensor.satellites["sat-0"].sizes.values())
    finally:
        server.stop(None)


@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest"])
def test_full_storage_drops_by_its_policy(tmp_path: Path, policy: str) -> None:
    sizes = _sizes(tmp_path, 9.0)
    room = sum(sorted(sizes)[:3]) + min(sizes) // 2  # three payloads, never four
    assert sum(sorted(sizes)[:4]) > room
    spec = replace(PROBE, storage_bytes=room, when_full=policy)  # type: ignore[arg-type]
    cfg = _config(tmp_path, spec)
    server, _, sensor = _start(cfg)
    try:
        report = _transmit(sensor, 9.0, max_bytes=0)  # 10 captures, room for 3 (or fewer)
        queue = _queue(sensor)
        sent = _transmit(sensor, 9.0)
    finally:
        server.stop(None)
    assert report.captured == 10 and report.dropped == 10 - len(queue) >= 7
    assert report.onboard_bytes <= room
    shard = [int(i) for i in sensor.satellites["sat-0"].shard]
    kept = [i for i, _ in queue]
    assert kept == (shard[10 - len(queue):10] if policy == "drop_oldest"
                    else shard[: len(queue)])
    assert sent.acked == len(queue) and sorted(_stored_ids(cfg)) == sorted(kept)
    assert sensor.satellites["sat-0"].onboard_bytes == 0


class _DiesBeforeAcking(pb_grpc.DownlinkServicer):
    """A ground station that reads a stream's batches and fails before it acks any."""

    def Send(self, request_iterator: Iterator[pb.DownlinkBatch],
             context: grpc.ServicerContext) -> Iterator[pb.BatchAck]:
        for _ in request_iterator:
            pass
        context.abort(grpc.StatusCode.UNAVAILABLE, "gone before the ack")
        yield pb.BatchAck()  # never reached


def test_a_sample_sent_and_not_acked_is_never_dropped(tmp_path: Path) -> None:
    sizes = _sizes(tmp_path, 3.0)
    cfg = _config(tmp_path, replace(PROBE, storage_bytes=sum(sorted(sizes)[:3]) + 10))
    server, address, sensor = _start(cfg)
    dying = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_DownlinkServicer_to_server(_DiesBeforeAcking(), dying)
    port = dying.add_insecure_port("127.0.0.1:0")
    dying.start()
    real = sensor.channel
    try:
        first = _transmit(sensor, 2.0, max_bytes=0)  # 3 captures: storage full
        sensor.channel = channel(f"127.0.0.1:{port}")
        broken = _transmit(sensor, 2.0)  # all three go out, no ack comes back
        sensor.channel.close()
        sensor.channel = real
        after = _transmit(sensor, 7.0, max_bytes=0)  # 5 more: only they can be dropped
        queue = _queue(sensor)
        retry = _transmit(sensor, 7.0)
    finally:
        dying.stop(None)
        server.stop(None)
    shard = [int(i) for i in sensor.satellites["sat-0"].shard]
    assert (first.captured, first.dropped) == (3, 0)
    assert broken.error_code and broken.sent == 3 and broken.acked == 0
    assert (after.captured, after.dropped) == (5, 5)
    assert [i for i, _ in queue] == shard[:3]  # the unacked three, kept
    assert retry.acked == 3 and sorted(_stored_ids(cfg)) == sorted(shard[:3])
    assert not sensor.satellites["sat-0"].unacked


def test_cls_scenes_wait_raw_until_encoded(tmp_path: Path) -> None:
    spec = CaptureSpec(rate_per_h=3600, storage_bytes=10**7, horizon_s=100.0)
    cfg = _config(tmp_path, spec, payload="cls")
    server, _, sensor = _start(cfg)
    try:
        raw = _transmit(sensor, 4.0, max_bytes=0)  # 5 scenes of 28 x 28 x 1 bytes
        sat = sensor.satellites["sat-0"]
        encoded = sum(sensor_module.stored_bytes(p) for p in sat.built.values())
        waiting = sum(sat.sizes[k] for k in sat.pending if k not in sat.built)
        n_built = len(sat.built)
        sent = _transmit(sensor, 4.0)
    finally:
        server.stop(None)
    # the report builds the head's payload (next_bytes): those are stored as tokens now
    assert raw.onboard_bytes == encoded + waiting and waiting % 784 == 0
    assert sensor.encoder is not None and n_built
    assert encoded == n_built * (sensor.encoder.dim + 4)  # int8 values and a scale
    assert sent.acked == 5 and sent.onboard_bytes == 0


def test_revisits_of_cloudy_scenes_get_their_own_clouds(tmp_path: Path) -> None:
    spec = CaptureSpec(rate_per_h=3600, storage_bytes=10**7, horizon_s=100.0)
    cfg = _config(tmp_path, spec, mask=MaskSpec("clouds", 0.0))
    server, _, sensor = _start(cfg)
    try:
        report = _transmit(sensor, 2 * N_SHARD - 1.0)  # every image twice
    finally:
        server.stop(None)
    n = sensor.setup.n_train
    with sqlite3.connect(cfg.store_dir / "samples.sqlite") as db:
        rows = dict(db.execute("SELECT id, data FROM payloads").fetchall())
    pairs = [(i, i + n) for i in rows if i < n and i + n in rows]
    assert report.captured == 2 * N_SHARD and pairs
    assert sum(rows[a] != rows[b] for a, b in pairs) >= len(pairs) // 2


# ---- arrival stamps ------------------------------------------------------------------------


def test_stamps_apply_to_their_transmits_batches_only(tmp_path: Path) -> None:
    spec = CaptureSpec(rate_per_h=3600, storage_bytes=10**7, horizon_s=100.0)
    cfg = _config(tmp_path, spec)
    server, address, sensor = _start(cfg)
    try:
        alone = _transmit(sensor, 0.0, max_bytes=0)
        a = _transmit(sensor, 5.0, transmit_id=7)  # 6 samples
        b = sensor.Transmit(pb.TransmitRequest(satellite_id="sat-0", max_bytes=10**6,
                                               mission_time_s=11.0, transmit_id=8,
                                               batch_bytes=2 * alone.next_bytes), Ctx())
        stub = pb_grpc.MissionStub(channel(address))
        one = stub.Arrived(pb.ArrivedRequest(satellite_id="sat-0", transmit_id=7,
                                             batch_end_s=[40.0]), timeout=10)
        again = stub.Arrived(pb.ArrivedRequest(satellite_id="sat-0", transmit_id=7,
                                               batch_end_s=[99.0]), timeout=10)
        # b's stream has several batches: only the first two are stamped
        two = stub.Arrived(pb.ArrivedRequest(satellite_id="sat-0", transmit_id=8,
                                             batch_end_s=[50.0, 60.0]), timeout=10)
        with pytest.raises(grpc.RpcError) as bad:
            stub.Arrived(pb.ArrivedRequest(satellite_id="sat-0", transmit_id=8,
                                           batch_end_s=[float("nan")]), timeout=10)
        with pytest.raises(grpc.RpcError) as unknown:
            stub.Arrived(pb.ArrivedRequest(satellite_id="sat-9", transmit_id=8,
                                           batch_end_s=[1.0]), timeout=10)
    finally:
        server.stop(None)
    assert a.acked == 6 and len(a.batch_bytes) == 1 and len(b.batch_bytes) >= 3
    assert (one.stamped, again.stamped) == (6, 0)  # a stamp stands
    with sqlite3.connect(cfg.store_dir / "samples.sqlite") as db:
        per_batch = [len(ids) // 8 for (ids,) in db.execute(
            "SELECT ids FROM batches WHERE transmit_id = 8 ORDER BY seq")]
    assert len(per_batch) == len(b.batch_bytes) >= 3
    assert two.stamped == per_batch[0] + per_batch[1]
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    store = SampleStore(cfg.store_dir / "samples.sqlite")
    try:
        arrived = store.arrived(10**6)
        assert [t for t, _ in arrived] == ([40.0] * 6 + [50.0] * per_batch[0]
                                           + [60.0] * per_batch[1])
        assert len(arrived) < a.acked + b.acked  # the unstamped third batch is not usable
        assert store.arrived(45.0) == [(40.0, i) for _, i in arrived[:6]]
    finally:
        store.close()


def test_a_capture_that_cannot_fit_drops_only_itself() -> None:
    """drop_oldest frees room for a new capture only when that makes it fit: with the store
    held by an unacked sample, older waiting samples are not thrown away for nothing."""
    spec = CaptureSpec(rate_per_h=60, storage_bytes=1000, horizon_s=3600)
    sat = sensor_module.Satellite("sat-0", np.arange(3), capture=spec)  # starts empty
    unacked, older, new = (0, None), (1, None), (2, None)
    for key, size in ((unacked, 700), (older, 200), (new, 400)):
        sat.pending.append(key)
        sat.sizes[key] = size
        sat.onboard_bytes += size
    sat.unacked = {unacked}
    SensorServicer._make_room(None, sat, spec, new)  # type: ignore[arg-type]
    assert list(sat.pending) == [unacked, older] and sat.dropped == 1
    assert sat.onboard_bytes == 900
    # room made by dropping the oldest droppable one
    sat.sizes[new] = 250
    sat.pending.append(new)
    sat.onboard_bytes += 250
    SensorServicer._make_room(None, sat, spec, new)  # type: ignore[arg-type]
    assert list(sat.pending) == [unacked, new] and sat.dropped == 2


def test_a_transmit_id_past_the_stores_integers_is_refused(tmp_path: Path) -> None:
    spec = CaptureSpec(rate_per_h=3600, storage_bytes=10**7, horizon_s=100.0)
    cfg = _config(tmp_path, spec)
    server, address, sensor = _start(cfg)
    try:
        bad = _transmit(sensor, 3.0, transmit_id=2**64 - 1)
        good = _transmit(sensor, 3.0, transmit_id=5)
    finally:
        server.stop(None)
    assert bad.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "transmit_id" in bad.error and bad.acked == 0
    assert good.acked == 4 and len(_stored_ids(cfg)) == 4  # nothing half-stored before


def test_transmit_ids_are_unguessable_and_always_nine_varint_bytes() -> None:
    from sparsat.sim.mission.hosts import transmit_id_of

    ids = [transmit_id_of(b"k" * 16, n) for n in range(1, 200)]
    assert len(set(ids)) == len(ids)
    assert all(2**61 <= i < 2**62 for i in ids)
    assert transmit_id_of(b"j" * 16, 1) != ids[0]
