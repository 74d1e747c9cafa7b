"""Run inside a test's network namespace (tests/test_deploy_netns.py): what a machine on that
network sees. Prints one JSON line.

    netns_probe.py nodes OPERATOR_DIR GS_ADDRESS       the registry, as the operator sees it
    netns_probe.py stranger CA_FILE GS SENSORS TRAINER  status codes a stranger gets
"""

from __future__ import annotations

import faulthandler
import json
import sys
from pathlib import Path

import grpc

from sparsat.node.wire import rpc
from sparsat.node.wire.security import Credentials
from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb
from sparsat.proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc


def _code(call: object) -> str:
    try:
        result = call()  # type: ignore[operator]
        if hasattr(result, "__iter__") and not isinstance(result, bytes | str):
            list(result)
    except grpc.RpcError as e:
        return str(e.code().name)
    return "OK"


def nodes(operator: str, gs: str) -> dict[str, object]:
    ch = rpc.channel(gs, peer="ground-station", creds=Credentials.from_dir(Path(operator)))
    try:
        reply = pb_grpc.RegistryStub(ch).ListNodes(pb.ListNodesRequest(), timeout=10,
                                                   wait_for_ready=True)
        return {"nodes": {n.node_id: {"address": n.address, "role": pb.Role.Name(n.role),
                                      "device": n.device} for n in reply.nodes}}
    finally:
        ch.close()


def stranger(ca_file: str, gs: str, sensors: str, trainer: str) -> dict[str, object]:
    """Trusting the CA (it is public) but holding no credentials; and in plaintext."""
    ca = Path(ca_file).read_bytes()

    def tls(address: str, name: str) -> grpc.Channel:
        return grpc.secure_channel(address, grpc.ssl_channel_credentials(ca),
                                   options=[("grpc.ssl_target_name_override", name)])

    out: dict[str, str] = {}
    g = tls(gs, "ground-station")
    out["ListNodes"] = _code(lambda: pb_grpc.RegistryStub(g).ListNodes(
        pb.ListNodesRequest(), timeout=10))
    out["Register"] = _code(lambda: pb_grpc.RegistryStub(g).Register(pb.RegisterRequest(
        node_id="trainer-x", role=pb.TRAINER, address="10.0.0.1:1"), timeout=10))
    out["Send"] = _code(lambda: pb_grpc.DownlinkStub(g).Send(iter([pb.DownlinkBatch(
        satellite_id="sat-0", ids=[0], labels=[1], patches=[b"\x01"])]), timeout=10))
    out["Stats"] = _code(lambda: pb_grpc.MissionStub(g).Stats(pb.StatsRequest(), timeout=10))
    s = tls(sensors, "sensors-0")
    out["Transmit"] = _code(lambda: pb_grpc.SensorStub(s).Transmit(pb.TransmitRequest(
        satellite_id="sat-0", max_bytes=1 << 20), timeout=10))
    t = tls(trainer, "trainer-0")
    out["Train"] = _code(lambda: pb_grpc.TrainerStub(t).Train(iter([pb.TrainRequest()]),
                                                               timeout=10))
    plain = grpc.insecure_channel(gs)
    out["plaintext ListNodes"] = _code(lambda: pb_grpc.RegistryStub(plain).ListNodes(
        pb.ListNodesRequest(), timeout=5))
    return out


# A probe bounds itself: if it is still running after this long (every call in it has a 10 s
# deadline), it prints every thread's stack to stderr and exits 1, so that a hang names
# where it hung (the test keeps probe stderr in logs/probe.log) instead of being killed mute.
PROBE_BOUND_S = 45

if __name__ == "__main__":
    faulthandler.dump_traceback_later(PROBE_BOUND_S, exit=True)
    kind, *args = sys.argv[1:]
    result = nodes(*args) if kind == "nodes" else stranger(*args)
    print(json.dumps(result))
