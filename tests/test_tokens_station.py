"""Projected CLS payloads at a real ground station on a localhost port: the basis it fits and
uplinks (Mission.Uplink), batches made with it stored as sent, a version it never uplinked
refused, codes it never writes refused alone, zstd frames inflated only to what their samples
need, and the encoder stage reading stored codes (and plain tokens) through the final basis."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import zstandard

from sparsat.ground_station.config import GroundStationConfig
from sparsat.ground_station.encoding import encode_rows
from sparsat.ground_station.server import GroundStation, build_server
from sparsat.node.data.config import ProjectionSpec, SensorConfig
from sparsat.node.data.datasets import DatasetSpec
from sparsat.node.data.masking import MaskSpec
from sparsat.node.data.sharding import shard, train_subset
from sparsat.node.models import encoders
from sparsat.node.wire import basis as B
from sparsat.node.wire import downlink
from sparsat.node.wire.codec import quantize_token
from sparsat.node.wire.rpc import channel, wait_ready
from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb
from sparsat.proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc

SATELLITES = ["sat-0", "sat-1"]
SUBSET = 400
DIM = 192  # vit_tiny_d8_patch4_28's width
C = downlink.RejectCause


def _config(store: Path, **projection: object) -> GroundStationConfig:
    spec = ProjectionSpec(**{"dim": 16, "quantizer": "int4", "fit_images": 64,  # type: ignore
                             **projection})
    sensor = SensorConfig(dataset=DatasetSpec("fashion_mnist", download=False),
                          mask=MaskSpec(kind="none", ratio=0.0), payload="cls",
                          cls_dtype="int8", satellites=SATELLITES, train_subset=SUBSET,
                          projection=spec)
    return GroundStationConfig(sensor=sensor, store_dir=store, device="cpu",
                               token_cache=store.parent / "tokens")


class Station:
    def __init__(self, cfg: GroundStationConfig) -> None:
        self.gs = GroundStation(cfg)
        self.server, address = build_server(self.gs, "127.0.0.1:0")
        self.server.start()
        self.ch = channel(address)
        wait_ready(self.ch, 10)
        self.mission = pb_grpc.MissionStub(self.ch)
        self.downlink = pb_grpc.DownlinkStub(self.ch)
        pb_grpc.RegistryStub(self.ch).Register(pb.RegisterRequest(
            node_id="sensors-0", role=pb.SENSOR, address="127.0.0.1:1",
            satellite_ids=SATELLITES), timeout=10)

    def close(self) -> None:
        self.ch.close()
        self.server.stop(None)
        self.gs.store.close()

    def send(self, msg: pb.DownlinkBatch) -> pb.BatchAck:
        return next(iter(self.downlink.Send(iter([msg]), timeout=30)))


@pytest.fixture(scope="module")
def station(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Station]:
    st = Station(_config(tmp_path_factory.mktemp("tokens") / "store", zstd_level=19,
                         zstd_dict_bytes=1024))
    yield st
    st.close()


@pytest.fixture(scope="module")
def uplinked(station: Station) -> pb.UplinkReply:
    return station.mission.Uplink(pb.UplinkRequest(), timeout=300)


def _ids(sat: str) -> list[int]:
    subset = train_subset(60_000, SUBSET, 0)
    return [int(i) for i in shard(subset, SATELLITES.index(sat), len(SATELLITES))]


def _tokens(n: int) -> np.ndarray:
    return np.random.default_rng(n).standard_normal((n, DIM)).astype(np.float32)


def _batch(basis: B.Basis, ids: list[int], zstd: tuple[object, int] | None = None,
           satellite: str = "sat-0") -> tuple[pb.DownlinkBatch, np.ndarray, np.ndarray]:
    codes, scales = basis.encode(_tokens(len(ids)))
    b = downlink.BatchBuilder(satellite, cls=True, basis=basis.version,
                              scale_bytes=basis.scale_bytes, zstd=zstd)  # type: ignore[arg-type]
    for i, c, s in zip(ids, codes, scales.tolist(), strict=True):
        b.add(downlink.projected_payload(i, 1, c.tobytes(), s, basis.version))
    return b.to_pb(), codes, scales


def _causes(ack: pb.BatchAck) -> list[int]:
    return [r.cause for r in ack.rejected]


def test_uplink_fits_the_basis_once_and_returns_it_again(station: Station,
                                                         uplinked: pb.UplinkReply) -> None:
    basis = B.from_pb(uplinked.basis, DIM)  # what a satellite accepts
    assert (basis.dim, basis.quantizer, basis.method) == (16, "int4", "pca")
    assert uplinked.fit_tokens == 64
    again = station.mission.Uplink(pb.UplinkRequest(), timeout=60)
    assert again.basis.version == basis.version and again.dictionary == uplinked.dictionary
    assert zstandard.ZstdCompressionDict(uplinked.dictionary).dict_id() != 0


def test_codes_of_the_uplinked_basis_are_stored_as_sent(station: Station,
                                                        uplinked: pb.UplinkReply) -> None:
    basis = B.from_pb(uplinked.basis, DIM)
    ids = _ids("sat-0")[:5]
    msg, codes, scales = _batch(basis, ids)
    ack = station.send(msg)
    assert ack.stored == 5 and not ack.rejected
    rows = {r.id: r for chunk in station.gs.store.rows() for r in chunk}
    for i, c, s in zip(ids, codes, scales, strict=True):
        assert rows[i].basis == basis.version and rows[i].data == c.tobytes()
        assert rows[i].scale == pytest.approx(float(s))


def test_a_version_never_uplinked_is_refused_whole(station: Station,
                                                   uplinked: pb.UplinkReply) -> None:
    basis = B.from_pb(uplinked.basis, DIM)
    msg, _, _ = _batch(basis, _ids("sat-0")[10:13])
    msg.basis = basis.version ^ 1  # a satellite holding another basis
    ack = station.send(msg)
    assert ack.stored == 0 and _causes(ack) == [C.BAD_BASIS] * 3
    assert all(r.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] for r in ack.rejected)


def test_plain_tokens_are_refused_where_satellites_wait_for_their_basis(
        station: Station, uplinked: pb.UplinkReply) -> None:
    b = downlink.BatchBuilder("sat-0", cls=True, int8=True)
    for i in _ids("sat-0")[20:22]:
        data, scale = quantize_token(_tokens(1)[0], "int8")
        b.add(downlink.cls_payload(i, 2, downlink.ClsData(data, "int8", DIM, scale)))
    ack = station.send(b.to_pb())
    assert _causes(ack) == [C.BAD_BASIS] * 2


def test_a_bad_code_is_refused_alone(station: Station, uplinked: pb.UplinkReply) -> None:
    basis = B.from_pb(uplinked.basis, DIM)
    msg, _, _ = _batch(basis, _ids("sat-0")[30:34])
    tokens = bytearray(msg.tokens)
    tokens[basis.code_bytes * 2] = 0x88  # sample 2's first two nibbles: -8, never written
    msg.tokens = bytes(tokens)
    ack = station.send(msg)
    assert ack.stored == 3 and [(r.position, r.cause) for r in ack.rejected] == [(2, C.BAD_TOKEN)]


def test_a_zstd_batch_is_inflated_and_stored(station: Station, uplinked: pb.UplinkReply) -> None:
    basis = B.from_pb(uplinked.basis, DIM)
    zdict = zstandard.ZstdCompressionDict(uplinked.dictionary)
    comp = zstandard.ZstdCompressor(level=19, dict_data=zdict, write_content_size=True)
    ids = _ids("sat-0")[40:90]
    msg, codes, _ = _batch(basis, ids, zstd=(comp, zdict.dict_id()))
    assert msg.dictionary == zdict.dict_id()
    ack = station.send(msg)
    assert ack.stored == 50 and not ack.rejected
    rows = {r.id: r for chunk in station.gs.store.rows() for r in chunk}
    assert [rows[i].data for i in ids] == [c.tobytes() for c in codes]


@pytest.mark.parametrize("frame", ["bomb", "no_size", "short", "garbage"])
def test_a_zstd_frame_that_is_not_what_its_samples_need_is_never_inflated(
        station: Station, uplinked: pb.UplinkReply, frame: str) -> None:
    basis = B.from_pb(uplinked.basis, DIM)
    zdict = zstandard.ZstdCompressionDict(uplinked.dictionary)
    ids = _ids("sat-1")[:4]
    msg, _, _ = _batch(basis, ids, satellite="sat-1")
    want = len(msg.tokens) + len(msg.scales)
    comp = zstandard.ZstdCompressor(level=3, dict_data=zdict, write_content_size=frame != "no_size")
    content = {"bomb": bytes(64 << 20),  # 64 MiB of zeros in a few kB: declared, not inflated
               "no_size": msg.tokens + msg.scales, "short": (msg.tokens + msg.scales)[:-1],
               "garbage": b""}[frame]
    msg.tokens = comp.compress(content) if frame != "garbage" else b"\x28\xb5\x2f\xfd" + bytes(9)
    msg.scales, msg.dictionary = b"", zdict.dict_id()
    assert len(msg.tokens) < 1 << 16 and want < 1 << 10
    ack = station.send(msg)
    assert ack.stored == 0 and _causes(ack) == [C.BAD_STRUCTURE] * 4


def test_an_unknown_zstd_dictionary_is_refused_whole(station: Station,
                                                     uplinked: pb.UplinkReply) -> None:
    basis = B.from_pb(uplinked.basis, DIM)
    zdict = zstandard.ZstdCompressionDict(uplinked.dictionary)
    comp = zstandard.ZstdCompressor(dict_data=zdict, write_content_size=True)
    msg, _, _ = _batch(basis, _ids("sat-1")[10:12], zstd=(comp, zdict.dict_id() + 1),
                       satellite="sat-1")
    assert _causes(station.send(msg)) == [C.BAD_BASIS] * 2


def test_a_scenario_without_a_projection_has_nothing_to_uplink(tmp_path: Path) -> None:
    cfg = _config(tmp_path / "store")
    sensor = SensorConfig(dataset=cfg.sensor.dataset, mask=cfg.sensor.mask, payload="cls",
                          cls_dtype="int8", satellites=SATELLITES, train_subset=SUBSET)
    st = Station(GroundStationConfig(sensor=sensor, store_dir=tmp_path / "store", device="cpu"))
    try:
        with pytest.raises(grpc.RpcError) as e:
            st.mission.Uplink(pb.UplinkRequest(), timeout=30)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        basis = B.fit(ProjectionSpec(dim=8, quantizer="int8"), _tokens(50))
        msg, _, _ = _batch(basis, _ids("sat-0")[:2])
        assert _causes(st.send(msg)) == [C.BAD_BASIS] * 2
    finally:
        st.close()


def test_a_supervised_basis_waits_for_its_labelled_samples(tmp_path: Path) -> None:
    st = Station(_config(tmp_path / "store", method="supervised", fit_samples=6,
                         fit_images=5000))
    try:
        with pytest.raises(grpc.RpcError) as e:
            st.mission.Uplink(pb.UplinkRequest(), timeout=30)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "6 labelled samples" in str(e.value.details())
        b = downlink.BatchBuilder("sat-0", cls=True, int8=True)
        for k, i in enumerate(_ids("sat-0")[:6]):  # plain tokens first: allowed
            data, scale = quantize_token(_tokens(6)[k] + (k % 3), "int8")
            b.add(downlink.cls_payload(i, k % 3, downlink.ClsData(data, "int8", DIM, scale)))
        assert st.send(b.to_pb()).stored == 6
        reply = st.mission.Uplink(pb.UplinkRequest(), timeout=60)
        assert reply.basis.method == "supervised" and reply.fit_tokens == 6
    finally:
        st.close()


def test_the_encoder_stage_reads_codes_and_plain_tokens_through_the_final_basis(
        station: Station, uplinked: pb.UplinkReply) -> None:
    basis = station.gs.fitted.basis  # type: ignore[union-attr]
    rows = [r for chunk in station.gs.store.rows() for r in chunk]
    plain = rows[0]._replace(id=10**6, basis=0, scale=0.02,
                             data=quantize_token(_tokens(1)[0], "int8")[0])
    rows.append(plain)
    encoder = encoders.create("vit_tiny_d8_patch4_28")
    got = encode_rows(iter(rows), len(rows), encoder, 64, "int8",
                      projection=(station.gs.bases, basis))
    for k, r in enumerate(rows[:-1]):
        u, bad = basis.decode(np.frombuffer(r.data, np.uint8)[None], np.array([r.scale],
                                                                             np.float32))
        assert not bad.any()
        assert np.allclose(got.features[k], basis.reconstruct(u)[0], atol=1e-5)
    token = np.frombuffer(plain.data, np.int8).astype(np.float32) * np.float32(0.02)
    assert np.allclose(got.features[-1], basis.recode(token[None])[0], atol=1e-5)


class Ctx:
    """A Transmit's context: only reached for bad requests."""

    def abort(self, code: grpc.StatusCode, message: str) -> None:
        raise RuntimeError(f"{code.name}: {message}")


def test_a_sensor_host_waits_for_its_basis_then_sends_codes_compressed(tmp_path: Path) -> None:
    from sparsat.node.processes.sensor import SensorServicer

    cfg = _config(tmp_path / "store", zstd_level=19, zstd_dict_bytes=1024)
    st = Station(cfg)
    try:
        reply = pb_grpc.RegistryStub(st.ch).Register(pb.RegisterRequest(
            node_id="sensors-0", role=pb.SENSOR, address="127.0.0.1:1",
            satellite_ids=SATELLITES), timeout=30)
        host = SensorServicer.from_reply("sensors-0", SATELLITES, reply,
                                         st.ch._channel.target().decode())  # type: ignore
        assert host.setup.projected and not host.setup.send_unprojected
        waiting = host.Transmit(pb.TransmitRequest(satellite_id="sat-0", max_bytes=10**6,
                                                   max_samples=4096), Ctx())
        assert waiting.waiting_basis and not waiting.sent and not waiting.batch_bytes
        assert waiting.remaining == SUBSET // 2 and waiting.basis_version == 0
        bad = pb.Basis()
        bad.CopyFrom(st.mission.Uplink(pb.UplinkRequest(), timeout=300).basis)
        bad.version ^= 1
        with pytest.raises(RuntimeError, match="INVALID_ARGUMENT.*version"):
            host.Transmit(pb.TransmitRequest(satellite_id="sat-0", max_bytes=10**6,
                                             max_samples=4096, basis=bad), Ctx())
        up = st.mission.Uplink(pb.UplinkRequest(), timeout=60)
        sent = host.Transmit(pb.TransmitRequest(
            satellite_id="sat-0", max_bytes=10**6, max_samples=4096, basis=up.basis,
            dictionary=up.dictionary), Ctx())
        assert (sent.error, sent.acked, sent.remaining) == ("", SUBSET // 2, 0)
        assert sent.basis_version == up.basis.version and not sent.waiting_basis
        rows = [r for chunk in st.gs.store.rows() for r in chunk]
        assert len(rows) == SUBSET // 2 and {r.basis for r in rows} == {up.basis.version}
        basis = B.from_pb(up.basis, DIM)
        # compressed on the air: fewer bytes than the same batch plain (the satellite named,
        # the ids and labels as they went)
        plain = downlink.BatchBuilder("sat-0", cls=True, basis=basis.version,
                                      scale_bytes=basis.scale_bytes)
        for r in rows:
            plain.add(downlink.projected_payload(r.id, r.label, r.data, r.scale, r.basis))
        assert len(sent.batch_bytes) == 1 and sent.batch_bytes[0] < plain.wire_size()
        assert st.gs.store.counters()["received_bytes"] == sum(sent.batch_bytes)
        assert sent.encode_flops > 0
    finally:
        st.close()


def test_pca_fit_images_are_on_no_satellite_and_not_validated_on() -> None:
    from sparsat.ground_station import uplink
    from sparsat.node.data.sharding import validation_indices

    calls: list[np.ndarray] = []

    class Stop(Exception):
        pass

    def encode_split(*args: object, indices: np.ndarray, **kw: object) -> None:
        calls.append(indices)
        raise Stop

    cfg = _config(Path("/nonexistent/store"), fit_images=5000)
    cfg = GroundStationConfig(sensor=cfg.sensor, store_dir=Path("/nonexistent/store"),
                              device="cpu", validation_subset=700, token_cache=None)
    mp = pytest.MonkeyPatch()
    mp.setattr(uplink, "encode_split", encode_split)
    mp.setattr(uplink.TokenCache, "get", lambda self, key: None)
    try:
        with pytest.raises(Stop):
            uplink.fit_tokens(cfg, encoders.create("vit_tiny_d8_patch4_28"))
    finally:
        mp.undo()
    fit = set(calls[0].tolist())
    held = set(train_subset(60_000, SUBSET, 0).tolist())
    validated = set(validation_indices(60_000, SUBSET, 700, 0).tolist())
    assert len(fit) == 5000 and not fit & held and not fit & validated


def test_a_restarted_station_still_reads_the_codes_of_its_bases(tmp_path: Path) -> None:
    cfg = _config(tmp_path / "store")
    st = Station(cfg)
    try:
        up = st.mission.Uplink(pb.UplinkRequest(), timeout=300)
        basis = B.from_pb(up.basis, DIM)
        assert st.send(_batch(basis, _ids("sat-0")[:3])[0]).stored == 3
    finally:
        st.close()
    again = Station(cfg)  # the same store: the bases it uplinked are in it
    try:
        assert again.send(_batch(basis, _ids("sat-0")[3:6])[0]).stored == 3
        assert again.mission.Uplink(pb.UplinkRequest(), timeout=60).basis.version == \
            basis.version  # not fitted again
    finally:
        again.close()


def test_a_bad_frame_of_one_one_byte_sample_is_refused(tmp_path: Path) -> None:
    st = Station(_config(tmp_path / "store", dim=8, quantizer="sign", zstd_level=3,
                         zstd_dict_bytes=256))
    try:
        up = st.mission.Uplink(pb.UplinkRequest(), timeout=300)
        basis = B.from_pb(up.basis, DIM)
        assert basis.sample_bytes == 1
        msg, _, _ = _batch(basis, _ids("sat-0")[:1])
        zdict = zstandard.ZstdCompressionDict(up.dictionary)
        msg.dictionary = zdict.dict_id()
        for frame in (b"", b"\x00", zstandard.ZstdCompressor(dict_data=zdict).compress(b"ab")):
            msg.tokens = frame
            ack = st.send(msg)
            assert ack.stored == 0 and _causes(ack) == [C.BAD_STRUCTURE]
    finally:
        st.close()


def test_a_finite_scale_that_overflows_is_refused(station: Station,
                                                  uplinked: pb.UplinkReply) -> None:
    basis = B.from_pb(uplinked.basis, DIM)
    msg, _, _ = _batch(basis, _ids("sat-1")[20:23], satellite="sat-1")
    scales = np.frombuffer(msg.scales, "<f2").copy()
    scales[1] = 60000.0  # finite float16, and 7 x 60000 x the basis's back-projection: Inf?
    msg.scales = scales.astype("<f2").tobytes()
    ack = station.send(msg)
    u, bad = basis.decode(np.frombuffer(msg.tokens, np.uint8).reshape(3, -1), scales)
    finite = np.isfinite(basis.reconstruct(u)).all(axis=1)
    assert ack.stored == int((~bad & finite).sum())
