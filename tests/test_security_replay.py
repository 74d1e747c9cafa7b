"""Replayed credentials (issue 22: operator-token replay, ground-station-token replay, registry
hijack), against real `sparsat ground-station`, `sparsat node trainer` (trainer-1, trainer-2)
and `sparsat node sensor` (sensors-0) processes on 127.0.0.1, in plain TLS and with --mtls.

A compromised node is the test holding that node's own credentials folder and what it
captured. Two forms: (1) the victim's token, read from its file, with the attacker's own key
signing the per-call credential; (2) the whole of what a real call carried (the victim's token
and its `sparsat-call` header), recorded by a server with the compromised node's own
certificate and key that the victim's real client code (rpc.channel) called, then replayed
verbatim elsewhere or again. Every replay is UNAUTHENTICATED and never reaches the servicer:
in plain TLS because the per-call credential is signed with the key the token names, for one
callee and one method, once (sparsat.node.wire.security.CallChecker); with --mtls also because
a token is accepted only with the client certificate of its node."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from sparsat.node.wire import rpc, security
from sparsat.node.wire.security import Credentials
from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb
from sparsat.proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc
from sparsat.sim.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from security_cluster import (  # noqa: E402
    free_port,
    ground_station_and_trainer,
    listed,
    load_dataset,
    registered_node,
)

pytestmark = pytest.mark.slow

NODES = ["--node", "ground_station:ground-station", "--node", "trainer:trainer-1",
         "--node", "trainer:trainer-2", "--node", "sensor:sensors-0:sat-0,sat-1",
         "--node", "sensor:sensors-1:sat-2,sat-3", "--node", "operator:operator"]
SCENARIO = {"name": "replay", "seed": 0,
            "dataset": {"name": "fashion_mnist", "train_subset": 40, "test_subset": 40},
            "sensors": {"count": 4, "per_process": 2, "mask": {"kind": "fixed", "ratio": 0.5}},
            "training": {"strategy": "ist", "workers": 2, "hidden": [16, 16]}}

MODES = [pytest.param(False, id="tls"), pytest.param(True, id="mtls")]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("deployment")
    assert main(["certs", str(out), *NODES]) == 0
    return out


@dataclass
class Cluster:
    gs: str  # the ground station's address
    trainer1: str
    trainer2: str
    sensors: str  # sensors-0's, hosting sat-0 and sat-1
    sensors1: str  # sensors-1's, hosting sat-2 and sat-3
    mutual: bool
    deployment: Path
    t0_ms: int  # the time before the ground station started

    def creds(self, folder: str, token_of: str | None = None) -> Credentials:
        """deployment/FOLDER's key and certificate, with deployment/TOKEN_OF's token: what a
        compromised FOLDER node holds once it captured TOKEN_OF's token."""
        mine = Credentials.from_dir(self.deployment / folder, self.mutual)
        token = (self.deployment / (token_of or folder) / "token").read_text().strip()
        return Credentials(mine.ca_pem, mine.cert_pem, mine.key_pem, token, self.mutual)

    def stats(self) -> pb.StatsReply:
        ch = rpc.channel(self.gs, peer="ground-station", creds=self.creds("operator"))
        try:
            return pb_grpc.MissionStub(ch).Stats(pb.StatsRequest(), timeout=10)
        finally:
            ch.close()


@pytest.fixture(scope="module", params=MODES)
def cluster(request: pytest.FixtureRequest, deployment: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A real ground station with trainer-1, trainer-2 and sensors-0 registered (--mtls or
    not); the tls variant of each test is a strict xfail (MODES)."""
    mutual = bool(request.param)
    tmp = tmp_path_factory.mktemp("mtls" if mutual else "tls")
    t0_ms = int(time.time() * 1000)
    with contextlib.ExitStack() as stack:
        gs, t1 = stack.enter_context(ground_station_and_trainer(tmp, SCENARIO, deployment,
                                                                mutual))
        t2 = stack.enter_context(registered_node(tmp, gs, deployment, "trainer", "trainer-2",
                                                 mutual))
        sensors = stack.enter_context(registered_node(tmp, gs, deployment, "sensor",
                                                      "sensors-0", mutual))
        sensors1 = stack.enter_context(registered_node(tmp, gs, deployment, "sensor",
                                                       "sensors-1", mutual))
        yield Cluster(gs, t1, t2, sensors, sensors1, mutual, deployment, t0_ms)


def _code(call: Callable[[], Any]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as e:
        print(f"  -> {e.code().name}: {e.details()}")
        return e.code()  # type: ignore[no-any-return]
    print("  -> OK")
    return grpc.StatusCode.OK


def _refused(code: grpc.StatusCode) -> None:
    assert code == grpc.StatusCode.UNAUTHENTICATED, f"the replay got {code.name}"


# ---- 0. the per-call credential's time and nonce ------------------------------------------


def _operator_stats_headers(cluster: Cluster, t_ms: int | None = None) -> list[tuple[str, str]]:
    from cryptography.hazmat.primitives import serialization

    op = Credentials.from_dir(cluster.deployment / "operator", cluster.mutual)
    assert op.verifier is not None
    key = serialization.load_pem_private_key(op.key_pem, password=None)
    value = security.sign_call(key, op.token, op.verifier.deployment,  # type: ignore[arg-type]
                               "ground-station", "/sparsat.v1.Mission/Stats", t_ms)
    return [("authorization", f"Bearer {op.token}"), (security.CALL_HEADER, value)]


def _stats(ch: grpc.Channel, md: list[tuple[str, str]]) -> Any:
    return pb_grpc.MissionStub(ch).Stats(pb.StatsRequest(), timeout=10, metadata=md)


def test_an_old_or_early_call_credential_is_refused(cluster: Cluster) -> None:
    """Made before the ground station started (a capture from before a restart):
    UNAVAILABLE, so an honest client with a slow clock retries; past the skew and age
    allowed, or ahead of the clock past the skew: UNAUTHENTICATED."""
    now = int(time.time() * 1000)
    before_start = cluster.t0_ms - 500  # the ground station started after the fixture did
    age_s = (now - before_start) / 1000
    code = _replayed(cluster, "operator", cluster.gs, "ground-station", _stats,
                     _operator_stats_headers(cluster, before_start))
    window = security.CLOCK_BEHIND_S + security.MAX_AGE_S
    # (first in this module, so that the fixture's start is recent; a slower machine's
    # credential from before the start may already be too old, which is refused too)
    if age_s < window - 5:
        assert code == grpc.StatusCode.UNAVAILABLE, code
    else:
        assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED), code
    for t in (now - int((security.CLOCK_BEHIND_S + security.MAX_AGE_S + 5) * 1000),
              now + int((security.CLOCK_AHEAD_S + 5) * 1000)):
        _refused(_replayed(cluster, "operator", cluster.gs, "ground-station", _stats,
                           _operator_stats_headers(cluster, t)))


def test_a_call_credential_is_accepted_once(cluster: Cluster) -> None:
    """The operator's own Stats credential: accepted, then the same again is a replay."""
    headers = _operator_stats_headers(cluster)
    assert _replayed(cluster, "operator", cluster.gs, "ground-station", _stats,
                     headers) == grpc.StatusCode.OK
    _refused(_replayed(cluster, "operator", cluster.gs, "ground-station", _stats, headers))


# ---- 1. the operator's token, replayed by a compromised sensor host --------------------------


def test_a_sensor_host_replaying_the_operators_token_cannot_list_nodes(
        cluster: Cluster) -> None:
    replay = cluster.creds("sensors-0", token_of="operator")
    ch = rpc.channel(cluster.gs, peer="ground-station", creds=replay)
    try:
        _refused(_code(lambda: pb_grpc.RegistryStub(ch).ListNodes(pb.ListNodesRequest(),
                                                                  timeout=10)))
    finally:
        ch.close()


@pytest.mark.parametrize("method", ["Stats", "Describe"])
def test_a_sensor_host_replaying_the_operators_token_cannot_ask_the_mission(
        cluster: Cluster, method: str) -> None:
    request = {"Stats": pb.StatsRequest(), "Describe": pb.DescribeRequest()}[method]
    replay = cluster.creds("sensors-0", token_of="operator")
    ch = rpc.channel(cluster.gs, peer="ground-station", creds=replay)
    try:
        _refused(_code(lambda: getattr(pb_grpc.MissionStub(ch), method)(request, timeout=10)))
    finally:
        ch.close()


def test_a_sensor_host_replaying_the_operators_token_cannot_transmit(cluster: Cluster) -> None:
    """At a sensor host's Transmit (sensors-0's own: what it may not call either); a budget
    that fits a batch, so a Transmit that got through would drain sat-0's queue."""
    before = cluster.stats().samples_received
    replay = cluster.creds("sensors-0", token_of="operator")
    ch = rpc.channel(cluster.sensors, peer="sensors-0", creds=replay)
    try:
        code = _code(lambda: pb_grpc.SensorStub(ch).Transmit(
            pb.TransmitRequest(satellite_id="sat-0", max_bytes=1 << 20, max_samples=1),
            timeout=60))
    finally:
        ch.close()
    after = cluster.stats().samples_received
    print(f"  samples received {before} -> {after}")
    _refused(code)
    assert after == before  # nothing went down


# ---- 2. the ground station's token, replayed by a compromised trainer ------------------------


@pytest.mark.parametrize("victim", ["trainer-2", "trainer-1"])
def test_a_trainer_replaying_the_ground_stations_token_cannot_load_a_dataset(
        cluster: Cluster, victim: str) -> None:
    """trainer-1 replays the token the ground station sent it to trainer-2's LoadDataset (and
    its own). Past the Guard the empty upload is the servicer's INVALID_ARGUMENT, so a refusal
    by UNAUTHENTICATED means the call never reached it."""
    replay = cluster.creds("trainer-1", token_of="ground-station")
    address = {"trainer-1": cluster.trainer1, "trainer-2": cluster.trainer2}[victim]
    err = load_dataset(address, replay, peer=victim)
    print(f"  -> {err.code().name}: {err.details()}")
    _refused(err.code())


# ---- 3. registry hijack: a trainer's token, replayed by an impostor --------------------------
# (last: in plain TLS it succeeds and moves trainer-1 in the registry)


def test_an_impostor_with_a_trainers_token_cannot_re_register_it(cluster: Cluster) -> None:
    """trainer-2's certificate and key with trainer-1's token, registering trainer-1 at the
    impostor's address; the registry still lists the real one."""
    op = cluster.creds("operator")
    assert listed(cluster.gs, op)["trainer-1"] == cluster.trainer1
    replay = cluster.creds("trainer-2", token_of="trainer-1")
    ch = rpc.channel(cluster.gs, peer="ground-station", creds=replay)
    try:
        code = _code(lambda: pb_grpc.RegistryStub(ch).Register(pb.RegisterRequest(
            node_id="trainer-1", role=pb.TRAINER, address="127.0.0.1:1"), timeout=10))
    finally:
        ch.close()
    where = listed(cluster.gs, op)["trainer-1"]
    print(f"  trainer-1 listed at {where} (real: {cluster.trainer1})")
    _refused(code)
    assert where == cluster.trainer1


# ---- 4. the whole of a real call's credentials, recorded by its callee and replayed ---------


def _captured(cluster: Cluster, callee: str, caller: str, method: str) -> list[tuple[str, str]]:
    """The credential headers a real call of `method` by `caller` (its own folder, through
    rpc.channel as the real nodes call) carries to the node `callee`, as recorded by a
    server with `callee`'s certificate and key: a compromised `callee`."""
    mine = Credentials.from_dir(cluster.deployment / callee, cluster.mutual)
    recorded: list[tuple[str, str]] = []
    got = threading.Event()

    def record(request: bytes, context: grpc.ServicerContext) -> bytes:
        recorded.extend((k, v) for k, v in context.invocation_metadata()
                        if k in ("authorization", security.CALL_HEADER))
        got.set()
        return b""

    class Recorder(grpc.GenericRpcHandler):  # type: ignore[misc]
        def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
            return grpc.unary_unary_rpc_method_handler(record)

    server = grpc.server(futures.ThreadPoolExecutor(2), handlers=[Recorder()])
    port = free_port()
    server.add_secure_port(f"127.0.0.1:{port}", grpc.ssl_server_credentials(
        [(mine.key_pem, mine.cert_pem)], root_certificates=mine.ca_pem,
        require_client_auth=cluster.mutual))
    server.start()
    ch = rpc.channel(f"127.0.0.1:{port}", peer=callee,
                     creds=Credentials.from_dir(cluster.deployment / caller, cluster.mutual))
    try:
        ch.unary_unary(method)(b"", timeout=10)
    finally:
        ch.close()
        server.stop(None)
    assert got.is_set() and len(recorded) == 2, recorded
    return recorded


def _replayed(cluster: Cluster, attacker: str, address: str, peer: str,
              call: Callable[[grpc.Channel, list[tuple[str, str]]], Any],
              headers: list[tuple[str, str]]) -> grpc.StatusCode:
    """`call` on a TLS channel (with `attacker`'s client certificate under --mtls) to `peer`
    at `address`, carrying exactly `headers` and no credentials of its own."""
    mine = Credentials.from_dir(cluster.deployment / attacker, cluster.mutual)
    tls = grpc.ssl_channel_credentials(mine.ca_pem, mine.key_pem, mine.cert_pem)
    ch = grpc.secure_channel(address, tls, options=[("grpc.ssl_target_name_override", peer)])
    try:
        return _code(lambda: call(ch, headers))
    finally:
        ch.close()


TRANSMIT = "/sparsat.v1.Sensor/Transmit"
LOAD = "/sparsat.v1.Trainer/LoadDataset"


@pytest.mark.parametrize("method", ["ListNodes", "Stats", "Describe"])
def test_a_sensor_host_replaying_a_recorded_transmit_cannot_ask_the_ground_station(
        cluster: Cluster, method: str) -> None:
    headers = _captured(cluster, "sensors-0", "operator", TRANSMIT)
    calls = {
        "ListNodes": lambda ch, md: pb_grpc.RegistryStub(ch).ListNodes(
            pb.ListNodesRequest(), timeout=10, metadata=md),
        "Stats": lambda ch, md: pb_grpc.MissionStub(ch).Stats(
            pb.StatsRequest(), timeout=10, metadata=md),
        "Describe": lambda ch, md: pb_grpc.MissionStub(ch).Describe(
            pb.DescribeRequest(), timeout=10, metadata=md)}
    _refused(_replayed(cluster, "sensors-0", cluster.gs, "ground-station", calls[method],
                       headers))


def test_a_sensor_host_replaying_a_recorded_transmit_cannot_drain_another_host(
        cluster: Cluster) -> None:
    before = cluster.stats().samples_received
    headers = _captured(cluster, "sensors-0", "operator", TRANSMIT)
    code = _replayed(cluster, "sensors-0", cluster.sensors1, "sensors-1",
                     lambda ch, md: pb_grpc.SensorStub(ch).Transmit(pb.TransmitRequest(
                         satellite_id="sat-2", max_bytes=1 << 20, max_samples=1),
                         timeout=60, metadata=md), headers)
    _refused(code)
    assert cluster.stats().samples_received == before


@pytest.mark.parametrize("victim", ["trainer-2", "trainer-1"])
def test_a_trainer_replaying_a_recorded_load_dataset_cannot_load_one(
        cluster: Cluster, victim: str) -> None:
    """What the ground station's LoadDataset carried to trainer-1, replayed at trainer-2 (its
    audience is trainer-1) and at trainer-1's Train (another method)."""
    headers = _captured(cluster, "trainer-1", "ground-station", LOAD)
    address = {"trainer-1": cluster.trainer1, "trainer-2": cluster.trainer2}[victim]
    def load(ch: grpc.Channel, md: list[tuple[str, str]]) -> Any:
        return pb_grpc.TrainerStub(ch).LoadDataset(iter([pb.DatasetChunk()]), timeout=10,
                                                   metadata=md)

    def train(ch: grpc.Channel, md: list[tuple[str, str]]) -> Any:
        return list(pb_grpc.TrainerStub(ch).Train(iter([pb.TrainRequest()]), timeout=10,
                                                  metadata=md))

    call = load if victim == "trainer-2" else train
    _refused(_replayed(cluster, "trainer-1", address, victim, call, headers))
