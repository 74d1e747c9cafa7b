"""TLS and node identity (node/wire/security.py, node/wire/rpc.py's Guard, sim/deploy/certs.py)
against a
real ground station serving over TLS on 127.0.0.1: strangers are UNAUTHENTICATED, nodes
outside their role PERMISSION_DENIED, bytes that are not a message INVALID_ARGUMENT."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from sparsat.ground_station.config import GroundStationConfig
from sparsat.ground_station.server import GroundStation, build_server
from sparsat.node.data.config import SensorConfig
from sparsat.node.data.datasets import DatasetSpec
from sparsat.node.data.masking import MaskSpec
from sparsat.node.wire import rpc, security
from sparsat.node.wire.security import (
    AuthError,
    Credentials,
    CredentialsError,
    Identity,
    TokenVerifier,
)
from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb
from sparsat.proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc
from sparsat.sim.deploy import certs
from sparsat.sim.deploy.certs import NodeSpec, make_deployment

NODES = [NodeSpec("ground-station", "ground_station"), NodeSpec("sensors-0", "sensor", ("sat-0",)),
         NodeSpec("sensors-1", "sensor", ("sat-1",)), NodeSpec("trainer-0", "trainer"),
         NodeSpec("operator", "operator")]
GS_METHODS = ["/sparsat.v1.Downlink/Send", "/sparsat.v1.Registry/Register",
              "/sparsat.v1.Registry/ListNodes", "/sparsat.v1.Health/Check",
              "/sparsat.v1.Mission/Prepare", "/sparsat.v1.Mission/TrainEpoch",
              "/sparsat.v1.Mission/Stats"]
STREAMING_IN = {"/sparsat.v1.Downlink/Send"}
STREAMING_OUT = {"/sparsat.v1.Downlink/Send", "/sparsat.v1.Mission/Prepare"}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deployment")
    make_deployment(out, NODES, {})
    return out


def creds(deployment: Path, name: str, mutual: bool = False) -> Credentials:
    return Credentials.from_dir(deployment / name, mutual)


@dataclass
class Server:
    address: str
    station: GroundStation


def _serve(deployment: Path, tmp: Path, mutual: bool) -> Iterator[Server]:
    sensor = SensorConfig(dataset=DatasetSpec("fashion_mnist", download=False),
                          mask=MaskSpec(kind="fixed", ratio=0.5, seed=0),
                          satellites=["sat-0", "sat-1"], train_subset=40)
    station = GroundStation(GroundStationConfig(sensor=sensor, store_dir=tmp, device="cpu"))
    security.configure(creds(deployment, "ground-station", mutual))
    try:
        server, address = build_server(station, "127.0.0.1:0")
    finally:
        security.configure(None)  # the server keeps its credentials; clients pass theirs
    server.start()
    try:
        yield Server(address, station)
    finally:
        server.stop(None)
        station.store.close()


@pytest.fixture(scope="module")
def gs(deployment: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _serve(deployment, tmp_path_factory.mktemp("store"), mutual=False)


@pytest.fixture(scope="module")
def gs_mtls(deployment: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from _serve(deployment, tmp_path_factory.mktemp("store-mtls"), mutual=True)


def _raw_call(ch: grpc.Channel, method: str, payload: bytes = b"") -> None:
    """Call `method` with raw bytes as its (only) request, reading the whole answer."""
    ident = (lambda b: b)  # noqa: E731
    if method in STREAMING_IN:
        list(ch.stream_stream(method, ident, ident)(iter([payload]), timeout=10))
    elif method in STREAMING_OUT:
        list(ch.unary_stream(method, ident, ident)(payload, timeout=10))
    else:
        ch.unary_unary(method, ident, ident)(payload, timeout=10)


def _code(ch: grpc.Channel, method: str, payload: bytes = b"") -> grpc.StatusCode:
    try:
        _raw_call(ch, method, payload)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def _tls_only(deployment: Path, address: str) -> grpc.Channel:
    """A stranger who trusts the deployment's CA (it is public) but has no credentials."""
    ca = (deployment / "ca" / "ca.crt").read_bytes()
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(ca),
                               options=[("grpc.ssl_target_name_override", "ground-station")])


# ---- credentials ------------------------------------------------------------------------------


def test_certs_folders_and_private_files(deployment: Path) -> None:
    for n in NODES:
        folder = deployment / n.name
        assert sorted(p.name for p in folder.iterdir()) == ["ca.crt", "node.crt", "node.key",
                                                              "revoked", "token"]
        for private in ("node.key", "token"):
            assert stat.S_IMODE((folder / private).stat().st_mode) == 0o600
        c = creds(deployment, n.name)
        assert (c.identity.name, c.identity.role, c.identity.satellites) == (
            n.name, n.role, n.satellites)
    assert not (deployment / "ground-station" / "ca.key").exists()
    assert stat.S_IMODE((deployment / "ca" / "ca.key").stat().st_mode) == 0o600


def test_rerun_reuses_the_ca(deployment: Path, tmp_path: Path) -> None:
    make_deployment(tmp_path, NODES[:1], {})
    ca = (tmp_path / "ca" / "ca.crt").read_bytes()
    make_deployment(tmp_path, [NodeSpec("trainer-9", "trainer")], {})
    assert (tmp_path / "ca" / "ca.crt").read_bytes() == ca
    assert creds(tmp_path, "trainer-9").identity.deployment == \
        creds(tmp_path, "ground-station").identity.deployment


def test_forged_and_foreign_tokens(deployment: Path, tmp_path: Path) -> None:
    from cryptography import x509

    ca = x509.load_pem_x509_certificate((deployment / "ca" / "ca.crt").read_bytes())
    verifier = TokenVerifier(ca)
    token = (deployment / "sensors-0" / "token").read_text().strip()
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(
        (deployment / "sensors-0" / "node.key").read_bytes(), password=None)
    assert verifier.verify(token) == Identity("sensors-0", "sensor", ("sat-0",),
                                              verifier.deployment,
                                              security.public_key_text(key))  # type: ignore
    with pytest.raises(AuthError, match="older `sparsat certs`"):  # a token without a key
        verifier.verify("sparsat1." + token.split(".", 1)[1])
    head, payload, sig = token.split(".")
    forged_payload = security._b64(security._unb64(payload).replace(b"sat-0", b"sat-1"))
    for bad in (f"{head}.{forged_payload}.{sig}", f"{head}.{payload}.{sig[:-4]}AAAA",
                "sparsat1.e30.AAAA", "Bearer x", "", "x" * 10_000):
        with pytest.raises(AuthError):
            verifier.verify(bad)
    make_deployment(tmp_path, NODES[:2], {})  # another deployment, same node names
    with pytest.raises(AuthError, match="not signed by this deployment"):
        verifier.verify((tmp_path / "sensors-0" / "token").read_text().strip())
    with pytest.raises(CredentialsError, match="does not belong to the CA"):
        theirs = tmp_path / "sensors-0"
        Credentials.from_files(deployment / "ca" / "ca.crt", theirs / "node.crt",
                               theirs / "node.key", theirs / "token")
    with pytest.raises(CredentialsError, match="is for"):  # a certificate of another node
        Credentials.from_files(deployment / "ca" / "ca.crt", deployment / "trainer-0" / "node.crt",
                               deployment / "trainer-0" / "node.key",
                               deployment / "sensors-0" / "token")
    with pytest.raises(CredentialsError, match="names another key"):  # its own cert, not key
        Credentials.from_files(deployment / "ca" / "ca.crt", deployment / "sensors-0" / "node.crt",
                               deployment / "trainer-0" / "node.key",
                               deployment / "sensors-0" / "token")


def test_bad_names_and_node_specs(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="DNS label"):
        make_deployment(tmp_path, [NodeSpec("Bad_Name", "trainer")], {})
    with pytest.raises(ValueError, match="satellites"):
        certs.parse_node("sensor:s0")
    with pytest.raises(ValueError, match="only sensor"):
        certs.parse_node("trainer:t0:sat-0")
    assert certs.parse_node("sensor:s0:a,b") == NodeSpec("s0", "sensor", ("a", "b"))
    with pytest.raises(ValueError, match="twice"):
        make_deployment(tmp_path, [NodeSpec("t", "trainer"), NodeSpec("t", "trainer")], {})
    with pytest.raises(CredentialsError, match="lacks"):
        (tmp_path / "empty").mkdir()
        Credentials.from_dir(tmp_path / "empty")


# ---- the ground station over TLS ------------------------------------------------------------


@pytest.mark.parametrize("method", GS_METHODS)
def test_stranger_is_unauthenticated(deployment: Path, gs: Server, method: str) -> None:
    ch = _tls_only(deployment, gs.address)
    try:
        assert _code(ch, method) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        ch.close()


def test_other_deployment_is_unauthenticated(deployment: Path, gs: Server,
                                             tmp_path: Path) -> None:
    make_deployment(tmp_path, NODES, {})
    theirs = creds(tmp_path, "operator")
    # their own CA: our server's certificate fails their check (no connection at all)
    ch = rpc.channel(gs.address, peer="ground-station", creds=theirs)
    assert _code(ch, "/sparsat.v1.Mission/Stats") == grpc.StatusCode.UNAVAILABLE
    ch.close()
    # trusting our CA but carrying their token: refused by the server
    ours = creds(deployment, "operator")
    mixed = Credentials(ours.ca_pem, ours.cert_pem, ours.key_pem, theirs.token)
    ch = rpc.channel(gs.address, peer="ground-station", creds=mixed)
    try:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.MissionStub(ch).Stats(pb.StatsRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "not signed by this deployment" in (e.value.details() or "")
    finally:
        ch.close()


@pytest.mark.parametrize(("who", "method"), [
    ("sensors-0", "/sparsat.v1.Mission/Prepare"), ("sensors-0", "/sparsat.v1.Registry/ListNodes"),
    ("sensors-0", "/sparsat.v1.Mission/Stats"), ("trainer-0", "/sparsat.v1.Downlink/Send"),
    ("trainer-0", "/sparsat.v1.Mission/TrainEpoch"), ("operator", "/sparsat.v1.Downlink/Send"),
    ("operator", "/sparsat.v1.Registry/Register"),
    ("ground-station", "/sparsat.v1.Registry/Register")])
def test_outside_role_is_permission_denied(deployment: Path, gs: Server, who: str,
                                           method: str) -> None:
    ch = rpc.channel(gs.address, peer="ground-station", creds=creds(deployment, who))
    try:
        assert _code(ch, method) == grpc.StatusCode.PERMISSION_DENIED
    finally:
        ch.close()


@pytest.mark.parametrize(("who", "method"), [
    ("operator", "/sparsat.v1.Mission/Stats"), ("operator", "/sparsat.v1.Registry/ListNodes"),
    ("operator", "/sparsat.v1.Mission/TrainEpoch"), ("sensors-0", "/sparsat.v1.Downlink/Send"),
    ("sensors-0", "/sparsat.v1.Registry/Register"), ("trainer-0", "/sparsat.v1.Health/Check")])
def test_undecodable_bytes_are_invalid_argument(deployment: Path, gs: Server, who: str,
                                                method: str) -> None:
    ch = rpc.channel(gs.address, peer="ground-station", creds=creds(deployment, who))
    try:
        for junk in (b"\xff\xff\xff\xff", b"\x0a\x80", b"\x08" * 3):
            assert _code(ch, method, junk) == grpc.StatusCode.INVALID_ARGUMENT, junk
    finally:
        ch.close()


def test_roles_admitted_and_standard_health(deployment: Path, gs: Server) -> None:
    ch = rpc.channel(gs.address, peer="ground-station", creds=creds(deployment, "operator"))
    try:
        assert pb_grpc.MissionStub(ch).Stats(pb.StatsRequest(), timeout=10).samples_stored == 0
        assert pb_grpc.HealthStub(ch).Check(pb.HealthRequest(), timeout=10).ready
    finally:
        ch.close()
    stranger = _tls_only(deployment, gs.address)  # grpc.health.v1 is open, like for probes
    try:
        reply = health_pb2_grpc.HealthStub(stranger).Check(
            health_pb2.HealthCheckRequest(service="sparsat.v1.Downlink"), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        stranger.close()


def test_plaintext_client_and_wrong_server_name(deployment: Path, gs: Server) -> None:
    plain = grpc.insecure_channel(gs.address)
    assert _code(plain, "/sparsat.v1.Health/Check") == grpc.StatusCode.UNAVAILABLE
    plain.close()
    # a client that means to reach trainer-0 does not accept the ground station's certificate
    ch = rpc.channel(gs.address, peer="trainer-0", creds=creds(deployment, "operator"))
    assert _code(ch, "/sparsat.v1.Health/Check") == grpc.StatusCode.UNAVAILABLE
    ch.close()


def test_mutual_tls(deployment: Path, gs_mtls: Server) -> None:
    ok = rpc.channel(gs_mtls.address, peer="ground-station", creds=creds(deployment, "operator"))
    assert _code(ok, "/sparsat.v1.Mission/Stats", b"") == grpc.StatusCode.OK
    ok.close()
    stranger = _tls_only(deployment, gs_mtls.address)  # no client certificate: no handshake
    assert _code(stranger, "/sparsat.v1.Health/Check") == grpc.StatusCode.UNAVAILABLE
    stranger.close()
    # the sensor's certificate with the operator's token: the names differ
    sensor, op = creds(deployment, "sensors-0"), creds(deployment, "operator")
    mixed = Credentials(op.ca_pem, sensor.cert_pem, sensor.key_pem, op.token)
    ch = rpc.channel(gs_mtls.address, peer="ground-station", creds=mixed)
    assert _code(ch, "/sparsat.v1.Mission/Stats") == grpc.StatusCode.UNAUTHENTICATED
    ch.close()


# ---- the command line ------------------------------------------------------------------------


def test_cli_requires_credentials_or_insecure(deployment: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from sparsat.sim.cli import main

    base = ["node", "trainer", "--listen", "127.0.0.1:0"]
    assert main(base) == 2
    assert "pass --certs DIR" in capsys.readouterr().err
    assert main([*base, "--certs", str(deployment / "sensors-0")]) == 2
    assert "needs a trainer's" in capsys.readouterr().err
    assert main([*base, "--certs", str(deployment / "trainer-0"), "--id", "trainer-7"]) == 2
    assert "differs from the credentials' node name" in capsys.readouterr().err
    assert main([*base, "--insecure", "--certs", str(deployment / "trainer-0")]) == 2
    assert "--insecure takes no credentials" in capsys.readouterr().err
    sensor = ["node", "sensor", "--ground-station", "127.0.0.1:1", "--id", "sat-1",
              "--certs", str(deployment / "sensors-0")]
    assert main(sensor) == 2
    assert "do not cover satellites ['sat-1']" in capsys.readouterr().err
    security.configure(None)


def test_cli_certs_from_scenario(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sparsat.sim.cli import main

    assert main(["certs", str(tmp_path), "--scenario", "scenarios/quickstart.yaml",
                 "--node", "trainer:trainer-spare", "--san", "*=127.0.0.1"]) == 0
    out = capsys.readouterr().out
    for name in ("ground-station", "trainer-0", "trainer-1", "sensors-0", "operator",
                 "trainer-spare"):
        assert (tmp_path / name / "token").exists(), name
        assert name in out
    assert creds(tmp_path, "sensors-0").identity.satellites == ("sat-0", "sat-1", "sat-2",
                                                               "sat-3")
    assert main(["certs", str(tmp_path), "--san", "nobody=1.2.3.4", "--node",
                 "operator:op2"]) == 2
    assert "--san names nodes" in capsys.readouterr().err


# ---- what a known node may do -----------------------------------------------------------------


def _register(deployment: Path, gs: Server, who: str, **fields: object) -> grpc.StatusCode:
    ch = rpc.channel(gs.address, peer="ground-station", creds=creds(deployment, who))
    try:
        pb_grpc.RegistryStub(ch).Register(pb.RegisterRequest(**fields), timeout=10)  # type: ignore[arg-type]
    except grpc.RpcError as e:
        return e.code()
    finally:
        ch.close()
    return grpc.StatusCode.OK


def test_nodes_register_only_as_themselves(deployment: Path, gs: Server) -> None:
    sensor = {"role": pb.SENSOR, "address": "127.0.0.1:1"}
    denied = grpc.StatusCode.PERMISSION_DENIED
    assert _register(deployment, gs, "sensors-0", node_id="sensors-1", satellite_ids=["sat-0"],
                     **sensor) == denied
    assert _register(deployment, gs, "sensors-0", node_id="sensors-0", satellite_ids=["sat-1"],
                     **sensor) == denied
    assert _register(deployment, gs, "trainer-0", node_id="trainer-0", satellite_ids=["sat-0"],
                     **sensor) == denied
    assert _register(deployment, gs, "sensors-0", node_id="sensors-0", role=pb.TRAINER,
                     address="127.0.0.1:1") == denied
    assert _register(deployment, gs, "sensors-0", node_id="sensors-0", satellite_ids=["sat-0"],
                     **sensor) == grpc.StatusCode.OK
    assert _register(deployment, gs, "trainer-0", node_id="trainer-0", role=pb.TRAINER,
                     address="127.0.0.1:2") == grpc.StatusCode.OK
    assert "sensors-1" not in gs.station.nodes


def test_a_sensor_host_sends_only_as_its_satellites(deployment: Path, gs: Server) -> None:
    assert _register(deployment, gs, "sensors-1", node_id="sensors-1", role=pb.SENSOR,
                     address="127.0.0.1:3", satellite_ids=["sat-1"]) == grpc.StatusCode.OK
    before = gs.station.store.counters().get("rejected", 0)
    ch = rpc.channel(gs.address, peer="ground-station", creds=creds(deployment, "sensors-1"))
    try:
        with pytest.raises(grpc.RpcError) as e:
            list(pb_grpc.DownlinkStub(ch).Send(iter([pb.DownlinkBatch(
                satellite_id="sat-0", ids=[1], labels=[3], patches=[b"\x01"])]), timeout=10))
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "sensors-1 may not send as 'sat-0'" in (e.value.details() or "")
    finally:
        ch.close()
    assert gs.station.store.counters().get("rejected", 0) == before + 1
    assert len(gs.station.store) == 0


# ---- what a malformed call is told --------------------------------------------------------


def _with_authorization(deployment: Path, gs: Server, values: list[str]) -> grpc.RpcError | None:
    """Call Mission.Stats over TLS carrying exactly these `authorization` values, and the
    operator's per-call credential for it."""
    from cryptography.hazmat.primitives import serialization

    op = creds(deployment, "operator")
    key = serialization.load_pem_private_key(op.key_pem, password=None)
    assert op.verifier is not None
    call = security.sign_call(key, op.token, op.verifier.deployment,  # type: ignore[arg-type]
                              "ground-station", "/sparsat.v1.Mission/Stats")
    ch = _tls_only(deployment, gs.address)
    try:
        pb_grpc.MissionStub(ch).Stats(pb.StatsRequest(), timeout=10,
                                      metadata=[("authorization", v) for v in values]
                                      + [(security.CALL_HEADER, call)])
    except grpc.RpcError as e:
        return e
    finally:
        ch.close()
    return None


@pytest.mark.parametrize(("values", "match"), [
    ([], "no credentials"),
    (["{token}"], "token without its scheme"),
    (["Bearer "], "empty token"),
    (["Bearer"], "empty token"),
    (["Basic dXNlcjpwdw=="], "scheme 'Basic' is not Bearer"),
    (["garbage"], "scheme 'garbage' is not Bearer"),
    (["Bearer garbage"], "not a sparsat token"),
    (["Bearer {token}", "Bearer {token}"], "2 authorization headers"),
], ids=["none", "no scheme", "empty", "scheme alone", "basic", "garbage", "bearer garbage",
        "twice"])
def test_malformed_authorization_is_told_what_is_wrong(deployment: Path, gs: Server,
                                                       values: list[str], match: str) -> None:
    token = creds(deployment, "operator").token
    err = _with_authorization(deployment, gs, [v.format(token=token) for v in values])
    assert err is not None and err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert match in (err.details() or ""), err.details()


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "Bearer", "bEaReR"])
def test_the_bearer_scheme_is_case_insensitive(deployment: Path, gs: Server,
                                               scheme: str) -> None:
    token = creds(deployment, "operator").token
    assert _with_authorization(deployment, gs, [f"{scheme} {token}"]) is None


@pytest.mark.parametrize("role", [99, 4, pb.ROLE_UNSPECIFIED, pb.GROUND_STATION])
def test_an_unknown_role_is_invalid_argument_naming_the_roles(deployment: Path, gs: Server,
                                                             role: int) -> None:
    # a sensor host's own credentials: the role is what is wrong, not who is asking
    ch = rpc.channel(gs.address, peer="ground-station", creds=creds(deployment, "sensors-0"))
    try:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.RegistryStub(ch).Register(pb.RegisterRequest(
                node_id="sensors-0", role=role, address="127.0.0.1:1",  # type: ignore[arg-type]
                satellite_ids=["sat-0"]), timeout=10)
    finally:
        ch.close()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = e.value.details() or ""
    assert f"role {pb.Role.Name(role) if role in pb.Role.values() else role} " in details
    assert "SENSOR (1) and TRAINER (2)" in details


# ---- standard services: open to anyone, like probes --------------------------------------


def test_health_list_answers_every_service(deployment: Path, gs: Server,
                                           caplog: pytest.LogCaptureFixture) -> None:
    stranger = _tls_only(deployment, gs.address)
    try:
        reply = health_pb2_grpc.HealthStub(stranger).List(health_pb2.HealthListRequest(),
                                                          timeout=10)
    finally:
        stranger.close()
    assert {k: v.status for k, v in reply.statuses.items()} == {
        name: health_pb2.HealthCheckResponse.SERVING
        for name in ["", "sparsat.v1.Downlink", "sparsat.v1.Registry", "sparsat.v1.Health",
                     "sparsat.v1.Mission"]}
    assert "Traceback" not in caplog.text and "failed" not in caplog.text


def _reflect(ch: grpc.Channel, version: str,
             requests: list[reflection_pb2.ServerReflectionRequest]
             ) -> list[reflection_pb2.ServerReflectionResponse]:
    """Server reflection under grpc.reflection.{version} (v1's messages are v1alpha's)."""
    call = ch.stream_stream(f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
                            request_serializer=reflection_pb2.ServerReflectionRequest
                            .SerializeToString,
                            response_deserializer=reflection_pb2.ServerReflectionResponse
                            .FromString)
    return list(call(iter(requests), timeout=10))


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_finds_the_file_by_its_package_path_and_by_symbol(
        deployment: Path, gs: Server, version: str) -> None:
    R = reflection_pb2.ServerReflectionRequest  # noqa: N806
    stranger = _tls_only(deployment, gs.address)
    try:
        listed, by_name, by_symbol, itself = _reflect(stranger, version, [
            R(list_services=""), R(file_by_filename="sparsat/v1/sparsat.proto"),
            R(file_containing_symbol="sparsat.v1.Downlink"),
            R(file_containing_symbol=f"grpc.reflection.{version}.ServerReflection")])
    finally:
        stranger.close()
    services = {s.name for s in listed.list_services_response.service}
    assert {"sparsat.v1.Downlink", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection", "grpc.health.v1.Health"} <= services
    for reply in (by_name, by_symbol):
        assert reply.WhichOneof("message_response") == "file_descriptor_response", reply
        files = [descriptor_pb2.FileDescriptorProto.FromString(f)
                 for f in reply.file_descriptor_response.file_descriptor_proto]
        assert files[0].name == "sparsat/v1/sparsat.proto"
        assert files[0].package == "sparsat.v1"
    [own] = [descriptor_pb2.FileDescriptorProto.FromString(f)
             for f in itself.file_descriptor_response.file_descriptor_proto]
    assert own.package == f"grpc.reflection.{version}"
    assert security.roles_for(f"/grpc.reflection.{version}.ServerReflection/"
                              "ServerReflectionInfo") is None  # open, and served
