"""A real ground station and a real trainer-1 registered with it, over TLS or --mtls, and more
real nodes registered with it (registered_node), for the security tests that attack them
(tests/test_security_names.py, tests/test_revocation.py, tests/test_security_replay.py)."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from sparsat.node.wire import rpc
from sparsat.node.wire.security import Credentials
from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb
from sparsat.proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc


def spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """`sparsat ARGS` in a process of its own, output to `log`."""
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-m", "sparsat.sim.cli", *args], stdout=f,
                                stderr=subprocess.STDOUT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def ground_station_and_trainer(tmp: Path, scenario: dict[str, Any], deployment: Path,
                               mutual: bool, ground_station: Path | None = None
                               ) -> Iterator[tuple[str, str]]:
    """(ground station address, trainer-1's address) once trainer-1 registered, as the
    operator of `deployment` sees it; the ground station runs with `ground_station`'s folder
    (default deployment/ground-station). Both stopped on exit."""
    scenario_file = tmp / "scenario.json"  # YAML is a superset of JSON
    scenario_file.write_text(json.dumps(scenario))
    mtls = ["--mtls"] if mutual else []
    port_file = tmp / "gs.addr"
    procs = [spawn(["ground-station", "--listen", "127.0.0.1:0", "--scenario",
                    str(scenario_file), "--store", str(tmp / "store"), "--port-file",
                    str(port_file), "--certs",
                    str(ground_station or deployment / "ground-station"), *mtls],
                   tmp / "gs.log")]
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists():
            assert procs[0].poll() is None, (tmp / "gs.log").read_text()
            assert time.monotonic() < deadline, "the ground station did not start"
            time.sleep(0.1)
        gs = port_file.read_text()
        trainer = f"127.0.0.1:{free_port()}"
        procs.append(spawn(["node", "trainer", "--listen", trainer, "--ground-station", gs,
                            "--device", "cpu", "--certs", str(deployment / "trainer-1"),
                            *mtls], tmp / "trainer.log"))
        op = Credentials.from_dir(deployment / "operator", mutual)
        ch = rpc.channel(gs, peer="ground-station", creds=op)
        try:
            while True:  # the legitimate path works: trainer-1 registered, over --mtls too
                nodes = pb_grpc.RegistryStub(ch).ListNodes(pb.ListNodesRequest(),
                                                           timeout=10).nodes
                if any(n.node_id == "trainer-1" for n in nodes):
                    break
                assert procs[1].poll() is None, (tmp / "trainer.log").read_text()
                assert time.monotonic() < deadline, "trainer-1 did not register"
                time.sleep(0.2)
        finally:
            ch.close()
        yield gs, trainer
    finally:
        # the trainer first: one still registering (a blocking gRPC call, which holds off its
        # SIGTERM handler until it returns) is not left waiting on a ground station gone
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:  # a loaded machine: the test's point is not this
                p.kill()
                p.wait(timeout=30)


def listed(gs: str, operator: Credentials) -> dict[str, str]:
    """node id -> address, as the ground station's registry lists them to `operator`."""
    ch = rpc.channel(gs, peer="ground-station", creds=operator)
    try:
        nodes = pb_grpc.RegistryStub(ch).ListNodes(pb.ListNodesRequest(), timeout=10).nodes
    finally:
        ch.close()
    return {n.node_id: n.address for n in nodes}


@contextlib.contextmanager
def registered_node(tmp: Path, gs: str, deployment: Path, kind: str, name: str,
                    mutual: bool) -> Iterator[str]:
    """A real `sparsat node KIND` (trainer or sensor) with deployment/NAME's credentials, its
    address once the ground station at `gs` lists it; stopped on exit."""
    address = f"127.0.0.1:{free_port()}"
    extra = ["--device", "cpu"] if kind == "trainer" else []
    log = tmp / f"{name}.log"
    proc = spawn(["node", kind, "--listen", address, "--ground-station", gs, *extra,
                  "--certs", str(deployment / name), *(["--mtls"] if mutual else [])], log)
    try:
        op = Credentials.from_dir(deployment / "operator", mutual)
        deadline = time.monotonic() + 120
        while name not in listed(gs, op):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"{name} did not register"
            time.sleep(0.2)
        yield address
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def load_dataset(address: str, creds: Credentials, peer: str = "trainer-1") -> grpc.RpcError:
    """trainer `peer`'s LoadDataset called with `creds` (an empty chunk): the error it gets —
    the Guard's refusal, or, past it, the servicer's INVALID_ARGUMENT."""
    ch = rpc.channel(address, peer=peer, creds=creds)
    try:
        with pytest.raises(grpc.RpcError) as e:
            pb_grpc.TrainerStub(ch).LoadDataset(iter([pb.DatasetChunk()]), timeout=10)
    finally:
        ch.close()
    return e.value
