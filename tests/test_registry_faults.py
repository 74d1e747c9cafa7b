"""The ground station and its nodes through faults: a restart on the same store (registry and
enrollment persist, nodes register again by themselves), stalled Send streams (capped, idle
ones cancelled, control calls still answered), a wrong ground-station address, absurd ids.

Servers are real (127.0.0.1, generated stubs); the restart with real processes is marked slow.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import test_ingest
import yaml
from test_ingest import SATELLITES, FMnist, _batch, _config, _good

from sparsat.ground_station import server as server_module
from sparsat.ground_station.config import GroundStationConfig
from sparsat.ground_station.server import GroundStation, build_server
from sparsat.node.processes import rejoin as rejoin_module
from sparsat.node.processes.rejoin import Rejoin
from sparsat.node.wire import rpc
from sparsat.node.wire.downlink import pb_to_ack
from sparsat.node.wire.rpc import Refused, Registered, Unreachable, channel, register, wait_ready
from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb
from sparsat.proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc
from sparsat.sim.cli import main

# test_ingest's fixtures: one load of Fashion-MNIST for the module, shared by its stations
fm = test_ingest.fm
_load_fashion_mnist_once = test_ingest._load_fashion_mnist_once

SENSOR_A = pb.RegisterRequest(node_id="host-a", role=pb.SENSOR, address="127.0.0.1:7001",
                              satellite_ids=["sat-0"])
TRAINER_A = pb.RegisterRequest(node_id="trainer-a", role=pb.TRAINER, address="127.0.0.1:7002",
                               device="cpu")


@contextmanager
def _station(cfg: GroundStationConfig, listen: str = "127.0.0.1:0", **kw: float
             ) -> Iterator[tuple[GroundStation, str]]:
    """An in-process ground station on `listen`; nothing registered by it."""
    station = GroundStation(cfg, **kw)  # type: ignore[arg-type]
    server, address = build_server(station, listen)
    server.start()
    try:
        yield station, address
    finally:
        server.stop(None).wait()
        station.store.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _code(call: grpc.RpcError) -> grpc.StatusCode:
    return call.code()  # type: ignore[no-any-return]


# ---- a restart on the same store -------------------------------------------------------------


def test_registry_and_enrollment_survive_a_restart(tmp_path: Path, fm: FMnist) -> None:
    # Arrange: a station that registered a sensor host and a trainer and stored 5 samples
    cfg = _config(tmp_path / "store")
    first = _good(fm, 0, 5)
    with _station(cfg) as (station, address):
        ch = channel(address)
        registry = pb_grpc.RegistryStub(ch)
        registry.Register(SENSOR_A, timeout=10)
        registry.Register(TRAINER_A, timeout=10)
        acks = list(pb_grpc.DownlinkStub(ch).Send(iter([_batch(first)]), timeout=10))
        before = list(registry.ListNodes(pb.ListNodesRequest(), timeout=10).nodes)
        ch.close()
    assert pb_to_ack(acks[0], 5).stored == 5

    # Execute: the station restarts on the same store; the sensor host has not registered again
    with _station(cfg) as (station, address):
        ch = channel(address)
        registry = pb_grpc.RegistryStub(ch)
        listed = list(registry.ListNodes(pb.ListNodesRequest(), timeout=10).nodes)
        again = list(pb_grpc.DownlinkStub(ch).Send(
            iter([_batch(first), _batch(_good(fm, 5, 5))]), timeout=10))
        with pytest.raises(grpc.RpcError) as taken:  # sat-0 is still host-a's
            registry.Register(pb.RegisterRequest(node_id="host-b", role=pb.SENSOR,
                                                 address="127.0.0.1:7003",
                                                 satellite_ids=["sat-0"]), timeout=10)
        registry.Register(SENSOR_A, timeout=10)  # host-a back (what node/processes/rejoin.py does)
        back = [n.node_id for n in registry.ListNodes(pb.ListNodesRequest(), timeout=10).nodes]
        stored = len(station.store)
        enrolled = sorted(station.enrolled)
        ch.close()

    # Assert: the enrollment held, the enrolled satellite was accepted, nothing stored twice;
    # addresses are listed again only once a node registered with the new process
    assert [n.node_id for n in before] == ["host-a", "trainer-a"]
    assert enrolled == ["host-a", "trainer-a"] and listed == [] and back == ["host-a"]
    answers = [pb_to_ack(a, 5) for a in again]
    assert [(a.stored, len(a.duplicates), len(a.rejected)) for a in answers] == [(0, 5, 0),
                                                                                  (5, 0, 0)]
    assert stored == 10
    assert _code(taken.value) == grpc.StatusCode.PERMISSION_DENIED


def test_a_satellite_belongs_to_the_host_that_enrolled_it(tmp_path: Path) -> None:
    with _station(_config(tmp_path / "store")) as (_, address):
        ch = channel(address)
        registry = pb_grpc.RegistryStub(ch)
        registry.Register(SENSOR_A, timeout=10)
        registry.Register(TRAINER_A, timeout=10)

        # Execute + Assert: another host for sat-0, and a node changing role, are refused
        with pytest.raises(grpc.RpcError) as other:
            registry.Register(pb.RegisterRequest(
                node_id="host-b", role=pb.SENSOR, address="127.0.0.1:7003",
                satellite_ids=["sat-1", "sat-0"]), timeout=10)
        with pytest.raises(grpc.RpcError) as role:
            registry.Register(pb.RegisterRequest(
                node_id="trainer-a", role=pb.SENSOR, address="127.0.0.1:7002",
                satellite_ids=["sat-2"]), timeout=10)
        # host-a registering again with other satellites gives sat-0 up
        registry.Register(pb.RegisterRequest(
            node_id="host-a", role=pb.SENSOR, address="127.0.0.1:7004",
            satellite_ids=["sat-1"]), timeout=10)
        registry.Register(pb.RegisterRequest(
            node_id="host-b", role=pb.SENSOR, address="127.0.0.1:7003",
            satellite_ids=["sat-0"]), timeout=10)
        nodes = {n.node_id: list(n.satellite_ids) for n in registry.ListNodes(
            pb.ListNodesRequest(), timeout=10).nodes}
        ch.close()

    assert _code(other.value) == grpc.StatusCode.PERMISSION_DENIED
    assert "['sat-0'] are enrolled by sensor host 'host-a'" in str(other.value.details())
    assert _code(role.value) == grpc.StatusCode.PERMISSION_DENIED
    assert "registered as TRAINER" in str(role.value.details())
    assert nodes == {"host-a": ["sat-1"], "host-b": ["sat-0"], "trainer-a": []}


@pytest.mark.parametrize(("field", "value", "limit"), [
    ("node_id", "n" * 100_000, "node_id has 100000 characters, more than the limit of 128"),
    ("address", "h" * 100_000 + ":1", "address has 100002 characters, more than the limit of "
     "256"),
    ("satellite_ids", [f"s{k}" for k in range(5000)], "satellite_ids has 5000 satellites, "
     "more than the limit of 1024"),
    ("satellite_ids", ["x" * 100_000, "sat-0"], "satellites ['" + "x" * 64 + "'...] are not"),
])
def test_absurd_registration_is_invalid_argument_with_a_short_message(
        tmp_path: Path, field: str, value: object, limit: str) -> None:
    request = pb.RegisterRequest(node_id="host-a", role=pb.SENSOR, address="127.0.0.1:1",
                                 satellite_ids=["sat-0"])
    if isinstance(value, list):
        del request.satellite_ids[:]
        request.satellite_ids.extend(value)
    else:
        setattr(request, field, value)

    with _station(_config(tmp_path / "store")) as (_, address):
        ch = channel(address)
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.RegistryStub(ch).Register(request, timeout=10)
        ch.close()

    details = str(refused.value.details())
    assert _code(refused.value) == grpc.StatusCode.INVALID_ARGUMENT  # not RESOURCE_EXHAUSTED
    assert limit in details and len(details) < 400


# ---- stalled clients -------------------------------------------------------------------------


def test_stalled_send_streams_cannot_lock_the_server(tmp_path: Path) -> None:
    # Arrange: at most 4 streams, cancelled after 3 s without a message
    release = threading.Event()

    def silent() -> Iterator[pb.DownlinkBatch]:
        release.wait(30)  # opens the stream, never writes
        return
        yield

    with _station(_config(tmp_path / "store"), max_streams=4, idle_s=3.0) as (station, address):
        ch = channel(address)
        wait_ready(ch, 10, address)
        downlink = pb_grpc.DownlinkStub(ch)
        try:
            # Execute: 32 silent streams (the old pool's size), then the control calls
            t0 = time.monotonic()
            calls = [downlink.Send(silent(), timeout=30) for _ in range(32)]
            deadline = time.monotonic() + 5
            while len(station.streams) < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
            open_streams = len(station.streams)
            t1 = time.monotonic()
            # a deadline well past the idle limit: a server that held control calls behind
            # the streams would answer only once they were cancelled (checked below), not
            # time out on a loaded machine
            health = pb_grpc.HealthStub(ch).Check(pb.HealthRequest(), timeout=10)
            pb_grpc.RegistryStub(ch).Register(SENSOR_A, timeout=10)
            control_s = time.monotonic() - t1
            cancelled_meanwhile = station.streams.cancelled
            codes = [c.code() for c in calls]  # each waits for its call's end
            all_ended_s = time.monotonic() - t0
            cancelled = station.streams.cancelled
        finally:
            release.set()
            ch.close()

    # Assert
    assert open_streams == 4 and health.ready and cancelled_meanwhile == 0
    assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 28
    assert codes.count(grpc.StatusCode.CANCELLED) == 4 and cancelled == 4
    assert 3.0 < all_ended_s < 15
    print(f"\n32 silent streams: control calls answered in {control_s * 1000:.0f} ms, idle ones "
          f"cancelled after {all_ended_s:.1f} s")


def test_a_stream_that_keeps_sending_is_not_cancelled(tmp_path: Path, fm: FMnist) -> None:
    payloads = _good(fm, 0, 8)

    def slow() -> Iterator[pb.DownlinkBatch]:
        for p in payloads:  # 8 batches over ~2.4 s: longer than the idle limit, never idle
            time.sleep(0.3)
            yield _batch([p])

    with _station(_config(tmp_path / "store"), idle_s=1.0) as (station, address):
        ch = channel(address)
        pb_grpc.RegistryStub(ch).Register(SENSOR_A, timeout=10)
        acks = list(pb_grpc.DownlinkStub(ch).Send(slow(), timeout=30))
        ch.close()

    assert sum(pb_to_ack(a, 1).stored for a in acks) == 8 and station.streams.cancelled == 0


# ---- nodes register again by themselves ------------------------------------------------------


def test_a_node_registers_again_when_the_ground_station_restarts(tmp_path: Path) -> None:
    # Arrange: a station on a fixed port, a watcher checking every 0.2 s
    cfg = _config(tmp_path / "store")
    listen = f"127.0.0.1:{_free_port()}"
    calls: list[Registered] = []

    def again(wait_s: float) -> Registered:
        calls.append(register(listen, SENSOR_A, wait_s))
        return calls[-1]

    with _station(cfg, listen):
        first = register(listen, SENSOR_A, 5)
        watch = Rejoin("host-a", listen, again, first.instance, every_s=0.2)
        watch.start()
        time.sleep(0.6)
        assert watch.instance and watch.rejoined == 0  # the same ground station: nothing to do

    # Execute: the station is down for 1 s, then another process (instance) on the same port
    time.sleep(1.0)
    t0 = time.monotonic()
    with _station(cfg, listen) as (station, _):
        while "host-a" not in station.nodes and time.monotonic() - t0 < 10:
            time.sleep(0.05)
        rejoined_s = time.monotonic() - t0
        node = station.nodes.get("host-a")
    watch.stop()

    # Assert
    assert node is not None and node.address == SENSOR_A.address
    assert watch.rejoined == 1 and len(calls) == 1 and rejoined_s < 3


def test_a_node_registers_again_without_waiting_out_its_channels_reconnect_backoff(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """gRPC backs a broken channel's reconnects off (1 s, growing 1.6x to 120 s): a watcher
    that kept one channel saw a ground station back after a long outage only at its next
    attempt. Here the backoff is 30 s, so only a fresh channel sees the station back soon."""
    # Arrange: the watcher's channels back off for 30 s
    def slow_channel(address: str, peer: str | None = None) -> grpc.Channel:
        return grpc.insecure_channel(address, options=[
            ("grpc.initial_reconnect_backoff_ms", 30_000),
            ("grpc.min_reconnect_backoff_ms", 30_000)])

    monkeypatch.setattr(rejoin_module, "channel", slow_channel)
    cfg = _config(tmp_path / "store")
    listen = f"127.0.0.1:{_free_port()}"
    with _station(cfg, listen):
        registered = register(listen, SENSOR_A, 5)
        watch = Rejoin("host-a", listen, lambda wait_s: register(listen, SENSOR_A, wait_s),
                       registered.instance, every_s=0.2)
        watch.start()
        time.sleep(0.5)

    # Execute: down for 1 s (the watcher's checks fail), then back on the same port
    time.sleep(1.0)
    try:
        with _station(cfg, listen) as (station, _):
            rejoined_s = _registered_again(station, "host-a", 15)
    finally:
        watch.stop()

    # Assert: well inside the 30 s a kept channel would have waited
    assert "host-a" in station.nodes and rejoined_s < 15


def test_the_register_reply_names_the_ground_stations_instance(tmp_path: Path) -> None:
    with _station(_config(tmp_path / "store")) as (_, address):
        registered = register(address, SENSOR_A, 5)
        ch = channel(address, peer="ground-station")
        health = pb_grpc.HealthStub(ch).Check(pb.HealthRequest(), timeout=5)
        ch.close()

    assert registered.instance and registered.instance == health.instance


@contextmanager
def _another_process(cfg: GroundStationConfig, listen: str, monkeypatch: pytest.MonkeyPatch
                     ) -> Iterator[tuple[GroundStation, str]]:
    """A ground station on `listen` that answers as another process would, and its instance:
    its own INSTANCE (in-process stations share this process's)."""
    instance = f"restarted-{time.monotonic_ns()}"
    with monkeypatch.context() as m:
        m.setattr(server_module, "INSTANCE", instance)
        with _station(cfg, listen) as (station, _):
            yield station, instance


def _registered_again(station: GroundStation, node_id: str, wait_s: float = 10) -> float:
    """Seconds until `node_id` registered with `station` (which lists only nodes that
    registered with it), or `wait_s` when it did not."""
    t0 = time.monotonic()
    while node_id not in station.nodes and time.monotonic() - t0 < wait_s:
        time.sleep(0.02)
    return time.monotonic() - t0


def test_a_restart_within_half_a_second_of_registering_is_noticed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The station is replaced right after it answered Register, and the watcher starts only
    then: no check ever fails, only the instance the Register reply named tells the new
    process from the old (a watcher that learnt it from its first check took the new one for
    the old and never registered again)."""
    # Arrange: registered with a station that another process replaces at once
    cfg = _config(tmp_path / "store")
    listen = f"127.0.0.1:{_free_port()}"
    with _station(cfg, listen):
        registered = register(listen, SENSOR_A, 5)
        t0 = time.monotonic()
    with _another_process(cfg, listen, monkeypatch) as (station, instance):
        restart_s = time.monotonic() - t0
        assert "host-a" not in station.nodes

        # Execute: the node's watcher, seeded with the reply's instance
        watch = Rejoin("host-a", listen, lambda wait_s: register(listen, SENSOR_A, wait_s),
                       registered.instance, every_s=0.2)
        watch.start()
        try:
            rejoined_s = _registered_again(station, "host-a")
            time.sleep(0.1)  # the watcher counts the rejoin after its call returns
        finally:
            watch.stop()

    # Assert
    assert "host-a" in station.nodes, f"not registered again in {rejoined_s:.1f} s"
    assert watch.rejoined == 1 and watch.instance == instance
    print(f"\nrestarted {restart_s:.2f} s after registering; registered again "
          f"{rejoined_s:.2f} s later")


def test_a_restart_inside_the_first_watch_period_is_noticed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
        ) -> None:
    """The watcher runs from registration on, checking every 4 s; the station is replaced
    0.2 s after registering, so the first check (the one a watcher used to learn the instance
    from) already meets the new process, and the node registers again because the instance
    changed (the log says "restarted"), not because a check failed (it would say "back")."""
    # Arrange
    caplog.set_level(logging.INFO, "sparsat.rejoin")
    cfg = _config(tmp_path / "store")
    listen = f"127.0.0.1:{_free_port()}"
    with _station(cfg, listen):
        registered = register(listen, SENSOR_A, 5)
        watch = Rejoin("host-a", listen, lambda wait_s: register(listen, SENSOR_A, wait_s),
                       registered.instance, every_s=4.0)
        watch.start()
        t0 = time.monotonic()
        time.sleep(0.2)

    # Execute: another process on the same port, inside the watcher's first period
    try:
        with _another_process(cfg, listen, monkeypatch) as (station, instance):
            restart_s = time.monotonic() - t0
            rejoined_s = _registered_again(station, "host-a")
            time.sleep(0.1)
    finally:
        watch.stop()

    # Assert: the premise (the new process answered before the first check), then
    # registered again at that check, for the instance it named
    assert restart_s < watch.every_s, f"the restart took {restart_s:.1f} s, past the period"
    assert "host-a" in station.nodes, f"not registered again in {rejoined_s:.1f} s"
    assert watch.rejoined == 1 and watch.instance == instance
    assert any("restarted; registered again" in r.getMessage() for r in caplog.records)
    print(f"\nrestarted {restart_s:.2f} s into the first period; registered again "
          f"{rejoined_s:.2f} s later")


# ---- a wrong ground-station address ----------------------------------------------------------


def test_register_with_nobody_there_names_the_address(caplog: pytest.LogCaptureFixture) -> None:
    address = f"127.0.0.1:{_free_port()}"  # nothing listens there
    caplog.set_level(logging.WARNING, "sparsat.rpc")

    t0 = time.monotonic()
    with pytest.raises(Unreachable) as err:
        register(address, SENSOR_A, timeout_s=2.0, log_every_s=0.5)
    waited = time.monotonic() - t0

    assert f"ground station {address} not reachable in 2 s" in str(err.value)
    assert 1.9 < waited < 6  # not the 60 s default; slack for a loaded machine
    lines = [r.getMessage() for r in caplog.records if "not reachable yet" in r.getMessage()]
    assert len(lines) >= 2 and address in lines[0]


def test_a_refused_registration_fails_at_once(tmp_path: Path) -> None:
    with _station(_config(tmp_path / "store")) as (_, address):
        t0 = time.monotonic()
        with pytest.raises(Refused, match=r"INVALID_ARGUMENT: satellites \['sat-9'\] are not"):
            register(address, pb.RegisterRequest(node_id="h", role=pb.SENSOR,
                                                 address="127.0.0.1:1", satellite_ids=["sat-9"]))
    assert time.monotonic() - t0 < 10  # retried, it would take REGISTER_WAIT_S (60 s)


def test_sensor_with_a_wrong_address_is_a_one_line_error(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rpc, "REGISTER_WAIT_S", rpc.REGISTER_WAIT_S)  # the CLI sets it
    address = f"127.0.0.1:{_free_port()}"

    code = main(["node", "sensor", "--insecure", "--listen", "127.0.0.1:0",
                 "--ground-station", address, "--id", SATELLITES[0], "--register-wait", "1.5"])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith(f"error: ground station {address} not reachable in 1.5 s")
    assert "Traceback" not in "\n".join(err)


# ---- with real processes ---------------------------------------------------------------------


@pytest.mark.slow
def test_nodes_register_again_with_a_restarted_ground_station_process(tmp_path: Path) -> None:
    """A local cluster (TLS, node tokens): the ground-station process is killed and started
    again on its port and store; the sensor host and the trainer register again by themselves."""
    from sparsat.sim.deploy.launcher import LocalCluster
    from sparsat.sim.scenario.schema import load

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({
        "name": "rejoin", "dataset": {"train_subset": 64, "test_subset": 64},
        "sensors": {"count": 1, "per_process": 1},
        "training": {"strategy": "centralized", "workers": 1, "hidden": [8, 8]}}))
    out = tmp_path / "out"
    with LocalCluster(load(path), path, out) as cluster:
        gs = channel(cluster.address, peer="ground-station")
        registry = pb_grpc.RegistryStub(gs)
        deadline = time.monotonic() + 120
        while len(registry.ListNodes(pb.ListNodesRequest(), timeout=10).nodes) < 2:
            assert time.monotonic() < deadline, "nodes did not register"
            time.sleep(0.2)

        # Execute
        cluster.kill("ground-station")
        time.sleep(3)  # the nodes' checks fail meanwhile
        t0 = time.monotonic()
        cluster.restart("ground-station")
        log = out / "logs" / "ground-station.log"
        lines: list[str] = []
        while time.monotonic() - t0 < 120:
            text = log.read_text(errors="replace") if log.exists() else ""
            lines = [ln for ln in text.splitlines() if " registered " in ln]
            if len(lines) >= 2:
                break
            time.sleep(0.2)
        rejoined_s = time.monotonic() - t0
        nodes = registry.ListNodes(pb.ListNodesRequest(), timeout=10).nodes
        gs.close()

    # Assert: both registered again with the new process, the registry as before
    assert len(lines) >= 2, f"nodes did not register again: {lines}"
    assert {n.node_id for n in nodes} == {"sensors-0", "trainer-0"}
    print(f"\nground-station process restarted: nodes registered again {rejoined_s:.1f} s "
          "after its start")
