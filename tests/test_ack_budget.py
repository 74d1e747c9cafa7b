"""A Transmit never spends more than its grant, batches and acks together, whatever the
ground station answers: alternating duplicates (an ack of about one byte a sample), every
sample refused with the longest reasons, or a real ground station refusing all of them.

A sensor host (SensorServicer, in process) streams to a ground station over loopback: a
scripted Downlink servicer for the adversarial acks, the real one for the refusals.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from sparsat.ground_station.config import GroundStationConfig
from sparsat.ground_station.server import GroundStation, build_server, sensor_setup
from sparsat.node.data.config import SensorConfig
from sparsat.node.data.datasets import DatasetSpec
from sparsat.node.data.masking import MaskSpec
from sparsat.node.processes.sensor import SensorServicer
from sparsat.node.wire import downlink
from sparsat.node.wire.codec import varint
from sparsat.node.wire.rpc import bind, make_server
from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb
from sparsat.proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc

SATS = ["sat-0", "sat-1"]
Answer = Callable[[int], downlink.AckData]  # the ack of an n-sample batch


class Ctx:
    def abort(self, code: grpc.StatusCode, message: str) -> None:
        raise RuntimeError(f"{code}: {message}")


class ScriptedStation(pb_grpc.DownlinkServicer):
    """Answers every batch with `answer(n)`, stores nothing; records the batches' sizes."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.samples: list[int] = []  # samples in each batch received

    def Send(self, request_iterator: Iterator[pb.DownlinkBatch],
             context: grpc.ServicerContext) -> Iterator[pb.BatchAck]:
        for msg in request_iterator:
            self.samples.append(len(msg.ids))
            yield self.ack(len(msg.ids))

    def ack(self, n: int) -> pb.BatchAck:
        return downlink.ack_to_pb(self.answer(n))


Start = Callable[[Answer], tuple[str, ScriptedStation]]


def alternating(n: int) -> downlink.AckData:
    """Every other sample a duplicate: n // 2 + 1 runs of 1, about a byte a sample."""
    return downlink.AckData(n - n // 2, list(range(1, n, 2)), [])


def all_refused(n: int) -> downlink.AckData:
    """Every sample refused, each with the longest code, cause and reason there are."""
    return downlink.AckData(0, [], [(p, 16, 127, "\u00e9" * 24) for p in range(n)])


def _sensor_config(subset: int) -> SensorConfig:
    return SensorConfig(dataset=DatasetSpec("fashion_mnist", download=False),
                        mask=MaskSpec("fixed", 0.5), payload="patches", satellites=SATS,
                        train_subset=subset)


def _host(station: GroundStation, address: str) -> SensorServicer:
    """A host of both satellites, set up as `station` would set it up, sending to `address`
    (without registering: the scripted stations have no Registry)."""
    setup = sensor_setup(station.rules, {s: station.images[s] for s in SATS})
    return SensorServicer("host", station.cfg.sensor, setup, address)


@pytest.fixture(scope="module")
def planner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GroundStation]:
    """A ground station (not served) whose setup the hosts below take: 3,000 images."""
    station = GroundStation(GroundStationConfig(
        sensor=_sensor_config(3000), store_dir=tmp_path_factory.mktemp("planner")))
    yield station
    station.store.close()


@pytest.fixture(scope="module")
def scripted() -> Iterator[Start]:
    """Start a scripted ground station answering with `answer`; its address, and it."""
    servers: list[grpc.Server] = []

    def start(answer: Answer) -> tuple[str, ScriptedStation]:
        server = make_server()
        station = ScriptedStation(answer)
        pb_grpc.add_DownlinkServicer_to_server(station, server)
        address = bind(server, "127.0.0.1:0")
        server.start()
        servers.append(server)
        return address, station

    yield start
    for s in servers:
        s.stop(None)


def _spent(report: pb.TransmitReport) -> int:
    return sum(report.batch_bytes) + sum(report.ack_bytes)


# budgets from a few samples to several batches, batches of ~2 to ~30 samples
CASES = [(max_bytes, batch_bytes) for max_bytes in (700, 1_500, 3_000, 5_000, 9_000)
         for batch_bytes in (1_200, 12_000)]


@pytest.mark.parametrize("answer", [alternating, all_refused], ids=["alternating", "refused"])
def test_batches_and_acks_stay_within_the_grant(
        scripted: Start, planner: GroundStation, answer: Answer) -> None:
    # Prepare
    address, station = scripted(answer)
    sensor = _host(planner, address)

    for max_bytes, batch_bytes in CASES:
        # Execute
        report = sensor.Transmit(pb.TransmitRequest(
            satellite_id="sat-0", max_bytes=max_bytes, batch_bytes=batch_bytes), Ctx())

        # Assert: inside the grant, and the grant used: not even the next sample alone,
        # with its worst-case ack, would have fit what was left
        assert report.error == "" and report.sent > 0, report
        assert _spent(report) <= max_bytes, (max_bytes, batch_bytes, report)
        assert max_bytes - _spent(report) < report.next_bytes
        assert all(b + a <= batch_bytes for b, a in zip(report.batch_bytes, report.ack_bytes,
                                                        strict=True))
        if answer is alternating:
            this = station.samples[-len(report.ack_bytes):]  # this Transmit's batches
            assert report.duplicates == sum(n // 2 for n in this)
        else:
            assert report.rejected == report.sent
            assert report.rejections[0].endswith("cause 127: " + "\u00e9" * 24)


def test_tight_grants_hold_with_alternating_duplicates(scripted: Start,
                                                      planner: GroundStation) -> None:
    """Grants 7 bytes apart over one sample's size: one of them ends within a few bytes of a
    sample boundary, where an ack of ~25 runs does not fit a room kept for 2."""
    # Prepare
    address, station = scripted(alternating)
    sensor = _host(planner, address)

    for k in range(60):
        # Execute
        max_bytes = 9_000 + 7 * k
        report = sensor.Transmit(pb.TransmitRequest(satellite_id=SATS[k % 2],
                                                    max_bytes=max_bytes), Ctx())

        # Assert
        assert report.error == "" and report.duplicates >= 10, report
        assert _spent(report) <= max_bytes, (max_bytes, report)
        assert max_bytes - _spent(report) < report.next_bytes


def test_a_stream_of_many_batches_waits_for_acks_only_at_the_end(
        scripted: Start, planner: GroundStation) -> None:
    """Small batches, a grant of many: they stream while the grant is far from spent, and
    the acks' real sizes, not their worst case, decide how much the last batches carry."""
    # Prepare
    address, station = scripted(alternating)
    sensor = _host(planner, address)
    max_bytes = 20_000

    # Execute
    report = sensor.Transmit(pb.TransmitRequest(satellite_id="sat-1", max_bytes=max_bytes,
                                                batch_bytes=1_000), Ctx())

    # Assert
    assert report.error == "" and len(report.batch_bytes) >= 10
    assert _spent(report) <= max_bytes
    # reserving every batch's worst case to the end would have left it unused
    assert sum(station.samples) == report.sent
    worst = sum(downlink.max_ack_bytes(n) - a for n, a in zip(
        station.samples, report.ack_bytes, strict=True))
    assert max_bytes - _spent(report) < report.next_bytes < worst


def test_a_real_ground_station_refusing_every_sample_stays_within_the_grant(
        tmp_path: Path) -> None:
    # Prepare: the host never registered with this ground station (it was set up as if it
    # had), so every sample is refused (NOT_REGISTERED)
    station = GroundStation(GroundStationConfig(sensor=_sensor_config(200),
                                                store_dir=tmp_path / "store"))
    server, address = build_server(station, "127.0.0.1:0")
    server.start()
    try:
        sensor = _host(station, address)
        reports = [sensor.Transmit(pb.TransmitRequest(
            satellite_id="sat-0", max_bytes=max_bytes, batch_bytes=batch_bytes), Ctx())
            for max_bytes, batch_bytes in CASES[:6]]
    finally:
        server.stop(None)

    # Assert
    for (max_bytes, _), report in zip(CASES, reports, strict=False):
        assert report.rejected == report.sent > 0
        assert "NOT_REGISTERED" in report.rejections[0]
        assert _spent(report) <= max_bytes
        assert max_bytes - _spent(report) < report.next_bytes
    assert len(station.store) == 0


def test_an_ack_bigger_than_its_batch_allows_is_not_read_and_the_batch_stays_queued(
        scripted: Start, planner: GroundStation) -> None:
    """A ground station whose ack passes max_ack_bytes (here a valid ack with 1,000 bytes of
    a field sparsat.v1 does not have: protobuf keeps and re-sends unknown fields) breaks the
    bound the budget was planned on: the host stops reading, reports it, and answers
    nothing of the batch (sent again next time, deduplicated)."""
    # Prepare
    padded = pb.BatchAck.FromString(pb.BatchAck(stored=1).SerializeToString()
                                    + b"\x7a" + varint(1000) + b"x" * 1000)
    address, station = scripted(lambda n: downlink.AckData(n, [], []))
    station.ack = lambda n: padded  # type: ignore[attr-defined]
    sensor = _host(planner, address)
    before = len(sensor.satellites["sat-1"].pending)

    # Execute
    report = sensor.Transmit(pb.TransmitRequest(satellite_id="sat-1", max_bytes=5_000), Ctx())

    # Assert
    assert "ground station sent an ack of" in report.error and "may be" in report.error
    assert report.error_code == grpc.StatusCode.INTERNAL.value[0]
    assert report.acked == 0 and report.rejected == 0 and report.sent > 0
    assert len(sensor.satellites["sat-1"].pending) == before == report.remaining
