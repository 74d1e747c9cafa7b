"""Issue 20, item 4: every count from the wire is bounded before it is used. Each decoder of
wire data gets a hostile input whose count (a run, a repeat count, a shape, a length) would
size memory, and must refuse it with a clear error before allocating."""

from __future__ import annotations

import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from tqdm import tqdm

from sparsat.ground_station.server import MAX_SEND_STREAMS_PER_CALLER, SendStreams
from sparsat.node.processes.trainer import MAX_DATASET_BYTES, TrainerServicer
from sparsat.node.wire import downlink, jobs, rpc, tensors
from sparsat.node.wire.codec import CodecError, varint
from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb
from sparsat.proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc
from sparsat.sim.mission.control import MissionControl
from sparsat.sim.mission.ground_client import MissionError
from sparsat.sim.mission.hosts import MAX_REPORT_BYTES, _SensorCalls
from sparsat.sim.mission.satellite import Passes, fixed_rate
from sparsat.sim.scenario.schema import Scenario
from sparsat.sim.space.links import Link, PeriodicPasses


def _peak_bytes(run: Any) -> int:
    """Peak bytes Python allocated while `run()` ran (it may raise CodecError)."""
    tracemalloc.start()
    try:
        run()
    except CodecError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


# ---- the sensor host reading a BatchAck ------------------------------------------------------


@pytest.mark.parametrize("ack", [
    pb.BatchAck(duplicate_runs=[0, 2_000_000]),  # one duplicate run of 2e6 for a batch of 4
    pb.BatchAck(duplicate_runs=[1] * 200_000),  # 200,000 runs for 4 positions
    pb.BatchAck(rejected=[pb.Rejected(position=0, code=3)] * 200_000),
], ids=["huge duplicate run", "many runs", "many refusals"])
def test_an_ack_is_refused_on_its_counts_before_lists_are_built(ack: pb.BatchAck) -> None:
    with pytest.raises(CodecError):
        downlink.pb_to_ack(ack, 4)
    # Python's own allocations while decoding: the old decoder built a list of every
    # position a run named (16 MB for the first) before it checked them
    assert _peak_bytes(lambda: downlink.pb_to_ack(ack, 4)) < 100_000


# ---- the ground station reading a DownlinkBatch ---------------------------------------------


def test_a_batch_with_more_samples_than_a_batch_may_hold_is_refused_before_decoding() -> None:
    n = downlink.MAX_BATCH_SAMPLES + 1
    msg = pb.DownlinkBatch(satellite_id="sat-0", ids=[1] * n)  # no labels, no patches
    with pytest.raises(CodecError, match=f"batch has {n} ids, more than the 65536"):
        downlink.pb_to_batch(msg, 10**6)
    shapes = pb.DownlinkBatch(ids=[1], shapes=[1] * (3 * downlink.MAX_BATCH_SAMPLES + 1))
    with pytest.raises(CodecError, match="shapes"):
        downlink.pb_to_batch(shapes, 10**6)


def test_the_wire_scan_refuses_a_big_message_of_tiny_elements_and_passes_real_batches() -> None:
    # Prepare: 2 MiB of 1-byte ids, packed; the same unpacked; 2 MiB of empty patches; and a
    # real 3 MiB batch (4 samples of 768 KiB) that must pass
    many = 2 * downlink.SCAN_ABOVE_BYTES
    packed = b"\x12" + varint(many) + b"\x01" * many
    unpacked = b"\x10\x01" * (many // 2)
    patches = b"\x22\x00" * (many // 2)
    real = pb.DownlinkBatch(satellite_id="sat-0", ids=[1, 1, 1, 1], labels=[0, 1, 2, 3],
                            patches=[b"\x07" * (768 << 10)] * 4).SerializeToString()

    # Execute / Assert
    for raw, name in ((packed, "ids"), (unpacked, "ids"), (patches, "patches")):
        with pytest.raises(CodecError, match=f"more than 65536 {name}"):
            downlink.check_batch_wire(raw)
    downlink.check_batch_wire(real)
    downlink.check_batch_wire(b"\x12" + varint(1000) + b"\x01" * 1000)  # small: not scanned
    with pytest.raises(CodecError, match="says"):
        downlink.check_batch_wire(b"\x22" + varint(many + 10) + b"\x00" * many)


def test_a_batch_rle_is_bounded_and_only_its_payloads_bits_are_unpacked() -> None:
    # an rle of a batch's most samples' bits decodes to the payloads' flags; one byte more is
    # refused before anything is unpacked (a 60 MiB rle unpacked into 480 MB of flags)
    two = pb.DownlinkBatch(satellite_id="sat-0", ids=[1, 1], labels=[0, 0],
                           patches=[b"a", b"b"], rle=b"\x03" + b"\xff" * 8191)
    batch = downlink.pb_to_batch(two, 100)
    assert batch.runs.tolist() == [True, True]
    assert _peak_bytes(lambda: downlink.pb_to_batch(two, 100)) < 20_000
    two.rle = b"\x03" * (downlink.MAX_RLE_BYTES + 1)
    with pytest.raises(CodecError, match="rle is 8193 bytes, more than the 8192"):
        downlink.pb_to_batch(two, 100)


@pytest.mark.parametrize("dims", [9, 100_000])
def test_a_tensor_of_too_many_dimensions_is_refused_before_its_size_is_taken(dims: int) -> None:
    # the product of 100,000 dimensions took seconds, and past 4,300 digits its error message
    # raised a ValueError that was not a CodecError (the trainer's LoadDataset: UNKNOWN)
    tensor = pb.Tensor(shape=[3] * dims, dtype=pb.FLOAT32)
    with pytest.raises(CodecError, match=f"{dims} dimensions, more than the 8"):
        tensors.pb_to_ndarray(tensor)
    with pytest.raises(CodecError, match=f"{dims} dimensions, more than the 8"):
        jobs.merge_message([pb.TrainRequest(params=[pb.NamedTensor(
            name="w1", more=True, tensor=tensor), pb.NamedTensor(name="w1")])],
            pb.TrainRequest())


def test_pack_closes_a_batch_at_the_most_samples_a_batch_may_hold(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(downlink, "MAX_BATCH_SAMPLES", 3)
    payloads = [downlink.Payload(i + 1, 0, b"\x01" * 8) for i in range(7)]
    batches = downlink.pack(iter(payloads), lambda first, _basis: downlink.BatchBuilder(
        "sat-0" if first else ""), 1 << 20, 1 << 20)
    assert [len(b.items) for b in batches] == [3, 3, 1]


class _Stream:
    """What SendStreams needs of a stream's context (its idle watchdog may cancel it)."""

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def cancel(self) -> None:
        pass


def test_one_caller_holds_at_most_its_share_of_the_send_streams() -> None:
    streams = SendStreams(limit=16, idle_s=60)
    keys = [streams.open(_Stream(), "sensor host a")  # type: ignore[arg-type]
            for _ in range(MAX_SEND_STREAMS_PER_CALLER)]
    assert all(isinstance(k, int) for k in keys)
    refused = streams.open(_Stream(), "sensor host a")  # type: ignore[arg-type]
    assert isinstance(refused, str) and "sensor host a has 4 downlink streams open" in refused
    other = streams.open(_Stream(), "sensor host b")  # type: ignore[arg-type]
    assert isinstance(other, int)  # another caller: yes
    streams.close(keys[0])  # type: ignore[arg-type]
    again = streams.open(_Stream(), "sensor host a")  # type: ignore[arg-type]
    assert isinstance(again, int)
    for k in [*keys[1:], other, again]:
        streams.close(k)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def station_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from sparsat.ground_station.config import GroundStationConfig
    from sparsat.ground_station.server import GroundStation, build_server
    from sparsat.node.data.config import SensorConfig
    from sparsat.node.data.datasets import DatasetSpec
    from sparsat.node.data.masking import MaskSpec

    sensor = SensorConfig(dataset=DatasetSpec("fashion_mnist", download=False),
                          mask=MaskSpec(kind="fixed", ratio=0.5, seed=0),
                          satellites=["sat-0"], train_subset=40)
    gs = GroundStation(GroundStationConfig(sensor=sensor, device="cpu",
                                           store_dir=tmp_path_factory.mktemp("store")))
    server, address = build_server(gs, "127.0.0.1:0")
    server.start()
    ch = rpc.channel(address)
    pb_grpc.RegistryStub(ch).Register(pb.RegisterRequest(
        node_id="sensors-0", role=pb.SENSOR, address="127.0.0.1:1", satellite_ids=["sat-0"]),
        timeout=10)
    ch.close()
    yield address
    server.stop(None)
    gs.store.close()


def _send_raw(address: str, raws: list[bytes]) -> tuple[grpc.StatusCode, str, int]:
    ident = lambda b: b  # noqa: E731
    ch = rpc.channel(address)
    acks = 0
    try:
        for _ in ch.stream_stream("/sparsat.v1.Downlink/Send", ident, ident)(
                iter(raws), timeout=30):
            acks += 1
    except grpc.RpcError as e:
        return e.code(), e.details() or "", acks
    finally:
        ch.close()
    return grpc.StatusCode.OK, "", acks


@pytest.mark.parametrize(("raw", "match"), [
    (pb.DownlinkBatch(satellite_id="sat-0", ids=[1] * 70_000, labels=[0] * 70_000)
     .SerializeToString(), "batch has 70000 ids, more than the 65536"),
    (b"\x0a\x05sat-0\x12" + varint(4 << 20) + b"\x01" * (4 << 20),
     "refused before parsing (4194316 bytes): batch has more than 65536 ids"),
], ids=["70,000 ids", "4 MiB of 1-byte ids"])
def test_a_batch_too_many_samples_ends_its_stream_with_invalid_argument(
        station_address: str, raw: bytes, match: str) -> None:
    # a batch of 70,000 ids was answered with an ack of 70,000 refusals (a 4 MiB message of
    # ids: 4 million refusals, 1 GB parsed); now the stream ends, naming the limit
    code, details, acks = _send_raw(station_address, [raw])
    assert (code, acks) == (grpc.StatusCode.INVALID_ARGUMENT, 0)
    assert match in details and len(details) < 1024


def _unary_raw(address: str, method: str, raw: bytes) -> tuple[grpc.StatusCode, str]:
    ident = lambda b: b  # noqa: E731
    ch = rpc.channel(address)
    try:
        ch.unary_unary(method, ident, ident)(raw, timeout=30)
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    finally:
        ch.close()
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize(("method", "raw", "match"), [
    # 2 MiB of empty satellite names: 2 million list entries once parsed
    ("/sparsat.v1.Registry/Register", b"\x22\x00" * (1 << 20),
     "(2097152 bytes): more than the 1048576 bytes"),
    ("/sparsat.v1.Mission/Stats", b"\x0a\x00" * 40_000, "(80000 bytes): more than the 65536"),
    ("/grpc.health.v1.Health/Check", b"\x0a\x00" * 40_000, "more than the 65536 bytes"),
], ids=["Register", "Stats", "health Check"])
def test_a_control_call_is_sized_before_it_is_parsed(
        station_address: str, method: str, raw: bytes, match: str) -> None:
    code, details = _unary_raw(station_address, method, raw)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "refused before parsing" in details and match in details


def test_a_trainer_dataset_chunk_of_too_many_dimensions_is_invalid_argument(
        trainer: pb_grpc.TrainerStub) -> None:
    chunk = _chunk(2, 2)
    chunk.features.shape[:] = [1] * 100_000
    with pytest.raises(grpc.RpcError) as e:
        trainer.LoadDataset(iter([chunk]), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "100000 dimensions, more than the 8" in (e.value.details() or "")


# ---- the trainer reading DatasetChunk and TrainRequest parts -----------------------------------


@pytest.fixture
def trainer() -> Iterator[pb_grpc.TrainerStub]:
    servicer = TrainerServicer("trainer-b", torch.device("cpu"))
    server = rpc.make_server()
    pb_grpc.add_TrainerServicer_to_server(servicer, server)
    address = rpc.bind(server, "127.0.0.1:0")
    server.start()
    ch = rpc.channel(address)
    yield pb_grpc.TrainerStub(ch)
    ch.close()
    server.stop(None)


def _chunk(rows: int, total: int, dim: int = 4) -> pb.DatasetChunk:
    return pb.DatasetChunk(
        dataset_id="ds", total_rows=total,
        features=tensors.ndarray_to_pb(np.zeros((rows, dim), np.float32)),
        labels=tensors.ndarray_to_pb(np.zeros(rows, np.int64)))


@pytest.mark.parametrize(("chunks", "match"), [
    ([_chunk(2, 2**32 - 1, dim=4)], f"more than the {MAX_DATASET_BYTES} bytes"),
    ([_chunk(2, 3), _chunk(2, 3)], "4 rows so far, more than the 3 announced"),
    ([_chunk(2, 4), _chunk(2, 6)], "total_rows changed from 4 to 6"),
], ids=["announced past the limit", "more rows than announced", "total changes"])
def test_a_dataset_stream_is_refused_on_its_counts_at_the_chunk_that_breaks_them(
        trainer: pb_grpc.TrainerStub, chunks: list[pb.DatasetChunk], match: str) -> None:
    sent: list[int] = []

    def stream() -> Iterator[pb.DatasetChunk]:
        for c in chunks:
            sent.append(1)
            yield c
        threading.Event().wait(5)  # had the refusal waited for the stream's end, 5 s here

    with pytest.raises(grpc.RpcError) as e:
        trainer.LoadDataset(stream(), timeout=4)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert match in (e.value.details() or "")


def test_train_parts_past_the_limit_are_refused_as_they_arrive(
        trainer: pb_grpc.TrainerStub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "MAX_TRAIN_BYTES", 100_000)
    part = pb.TrainRequest(params=[pb.NamedTensor(name="w1", tensor=tensors.ndarray_to_pb(
        np.zeros(10_000, np.float32)))])  # 40 KB a part: the third passes the limit
    with pytest.raises(grpc.RpcError) as e:
        list(trainer.Train(iter([part] * 5), timeout=10))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "parts past 100000 bytes" in (e.value.details() or "")


def test_pieces_of_a_tensor_may_not_hold_more_than_its_shape_and_dtype() -> None:
    head = pb.NamedTensor(name="w1", more=True, tensor=pb.Tensor(
        shape=[4], dtype=pb.FLOAT32, data=b"\x00" * 8))
    tail = pb.NamedTensor(name="w1", tensor=pb.Tensor(data=b"\x00" * 4096))
    with pytest.raises(CodecError, match="its pieces hold more than the 16 bytes"):
        jobs.merge_message([pb.TrainRequest(params=[head, tail])], pb.TrainRequest())


# ---- mission control reading a sensor host's TransmitReport ---------------------------------


class Hostile:
    def __init__(self, **fields: Any) -> None:
        self.fields = fields

    def Transmit(self, request: pb.TransmitRequest, **_: Any
                 ) -> pb.TransmitReport | tuple[pb.TransmitReport | None, int]:
        if "oversized" in self.fields:  # as mission control's own calls see one: unparsed
            return None, self.fields["oversized"]
        base = {"satellite_id": request.satellite_id, "batch_bytes": [1000], "sent": 10,
                "acked": 10, "ack_bytes": [60]}
        return pb.TransmitReport(**{**base, **self.fields})


def test_mission_controls_transmit_call_does_not_parse_an_oversized_report() -> None:
    # Prepare: a "sensor host" answering Transmit with 2 MB of packed batch sizes (250,000
    # values: parsed, a list a hundred times the most a real report holds)
    raw = pb.TransmitReport(satellite_id="sat-0", batch_bytes=[2**62] * 250_000
                            ).SerializeToString()
    server = rpc.make_server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "sparsat.v1.Sensor", {"Transmit": grpc.unary_unary_rpc_method_handler(
            lambda request, context: raw)})])
    address = rpc.bind(server, "127.0.0.1:0")
    server.start()
    ch = rpc.channel(address)

    # Execute
    try:
        report, size = _SensorCalls(ch).Transmit(pb.TransmitRequest(satellite_id="sat-0"),
                                                 timeout=10)
    finally:
        ch.close()
        server.stop(None)

    # Assert: sized, not parsed
    assert report is None and size == len(raw) + 5 > MAX_REPORT_BYTES


@pytest.mark.parametrize(("fields", "match"), [
    ({"batch_bytes": [1] * 100_000, "sent": 10}, "100000 batches for 10 samples"),
    ({"batch_bytes": [2**62]}, "batch bytes, "),
    ({"sent": 10**6, "acked": 10**6}, "1000000 samples sent, 4096 asked at most"),
    ({"acked": 11}, "11 samples acked, 10 sent"),
    ({"duplicates": 2**31, "rejected": 2**31}, "refused of 10 acked"),
    ({"ack_bytes": [60] * 5}, "5 acks for 1 batches"),
    ({"satellite_id": "sat-9"}, "it is for 'sat-9', not 'sat-0'"),
    ({"encode_flops": 2**63}, "FLOPs of on-board encoding for 10 samples"),
    ({"rejections": ["x"] * 1000}, "1000 refusal lines"),
    ({"rejections": ["x" * 100_000]}, "a refusal line of more than 512 characters"),
    ({"oversized": 2_000_000}, "TransmitReport of 2000000 bytes, more than the 1048576"),
    ({"credential_bytes": 2**40}, "of call credentials, 50000 granted"),
    ({"credential_bytes": 20_000}, "20000 bytes of call credentials for 1 batches"),
    ({"credential_bytes": 400, "batch_bytes": [], "sent": 0, "acked": 0, "ack_bytes": []},
     "400 bytes of call credentials for 0 batches"),
    ({"encoder_precision": "x" * 1000}, "an on-board encoder precision 'xxx"),
], ids=["batches", "bytes", "samples", "acked", "duplicates", "acks", "satellite", "flops",
        "rejections", "long refusal line", "oversized report", "credentials past the grant",
        "credentials too big", "credentials without a stream", "precision"])
def test_mission_control_refuses_a_transmit_report_that_cannot_be_true(
        fields: dict[str, Any], match: str) -> None:
    scenario = Scenario.model_validate({"name": "hostile", "links": {"downlink": {
        "rate_bps": 8000}}, "passes": {"period_s": 100, "duration_s": 50},
        "sensors": {"count": 1}})
    mc = MissionControl(scenario, "127.0.0.1:1", show_progress=False)  # never dialled here
    link = Link(mc.env, "downlink:sat-0", 8000, 0.0)
    mc.use_sensors({"sat-0": pb.NodeInfo(node_id="host-0", address="10.0.0.7:5")},
                   {"host-0": Hostile(**fields)})
    try:
        with pytest.raises(MissionError) as e:
            mc.env.run(until=mc.env.process(mc.downlink.fly(
                "sat-0", Passes(PeriodicPasses(100, 50, 0)), fixed_rate(link), link,
                tqdm(disable=True))))
    finally:
        mc.gs_channel.close()
    assert "sensor host host-0 at 10.0.0.7:5" in str(e.value) and match in str(e.value)
    assert mc.tally.downlink_bytes == 0  # nothing of it was counted


def test_the_bench_runs_in_its_smoke_mode(tmp_path: Path) -> None:
    from sparsat.bench import malformed

    res = malformed.main(["--smoke"])
    assert res["refused_all"] and res["answering_after"]
