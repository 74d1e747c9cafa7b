"""protobuf for the control calls every node makes or answers: registration (Registry), the
registry's listing, Health, and a sensor host's Transmit (mission control's request, the
host's report). One of the node's serde
modules (tensors, downlink, setup, jobs, control): servicers and clients build these
messages here and read them by their fields."""

from __future__ import annotations

from collections.abc import Iterable

from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb

# sparsat.v1.Role: what a node is (RegisterRequest.role, NodeInfo.role, HealthReply.role)
SENSOR = pb.SENSOR
TRAINER = pb.TRAINER
GROUND_STATION = pb.GROUND_STATION


def role_name(role: int) -> str:
    """A Role's name (ValueError for a number sparsat.v1.Role does not have)."""
    return pb.Role.Name(role)  # type: ignore[arg-type]  # enum int


def known_role(role: int) -> bool:
    """Whether `role` is a number sparsat.v1.Role has."""
    return role in pb.Role.values()


def register_request(node_id: str, role: int, address: str,
                     satellite_ids: list[str] | None = None,
                     device: str | None = None) -> pb.RegisterRequest:
    """A node's registration: who it is, what it is, where it listens; a sensor host names
    the satellites it hosts, a trainer its device."""
    return pb.RegisterRequest(node_id=node_id, role=role,  # type: ignore[arg-type]  # enum int
                              address=address, satellite_ids=satellite_ids, device=device)


def register_answer(config_json: str, instance: str,
                    sensor: pb.SensorSetup | None = None,
                    revoked: bytes = b"") -> pb.RegisterReply:
    """The ground station's RegisterReply: the node's configuration, the ground-station
    process that took the registration, a sensor host's setup (setup.setup_to_pb), and the
    deployment's revocation list the ground station holds (security.Revocations.signed)."""
    return pb.RegisterReply(config_json=config_json, instance=instance, sensor=sensor,
                            revoked=revoked)


def reply_revoked(reply: pb.RegisterReply) -> bytes:
    """The signed revocation list a RegisterReply carries (b"" when none)."""
    return bytes(reply.revoked)


def node_info(node_id: str, role: int | str, address: str, satellite_ids: Iterable[str],
              device: str) -> pb.NodeInfo:
    """A registered node as the registry lists it (role: its number or its name)."""
    return pb.NodeInfo(node_id=node_id, role=role,  # type: ignore[arg-type]  # enum int or name
                       address=address, satellite_ids=satellite_ids, device=device)


def list_nodes_request() -> pb.ListNodesRequest:
    return pb.ListNodesRequest()


def list_nodes_reply(nodes: Iterable[pb.NodeInfo]) -> pb.ListNodesReply:
    return pb.ListNodesReply(nodes=nodes)


def health_request() -> pb.HealthRequest:
    return pb.HealthRequest()


def health_reply(node_id: str, role: int, bytes_received: int, bytes_sent: int,
                 instance: str) -> pb.HealthReply:
    """A node's Health answer: ready, its byte counts, and its process (rpc.INSTANCE)."""
    return pb.HealthReply(node_id=node_id, role=role,  # type: ignore[arg-type]  # enum int
                          ready=True, bytes_received=bytes_received, bytes_sent=bytes_sent,
                          instance=instance)


def transmit_report(satellite_id: str) -> pb.TransmitReport:
    """An empty TransmitReport for `satellite_id`, which the sensor host fills as it sends."""
    return pb.TransmitReport(satellite_id=satellite_id)


def transmit_request(satellite_id: str, max_bytes: int, max_samples: int,
                     batch_bytes: int, mission_time_s: float = 0.0,
                     transmit_id: int = 0, basis: pb.Basis | None = None,
                     dictionary: bytes = b"") -> pb.TransmitRequest:
    """Mission control's Transmit: send from `satellite_id`'s queue at most `max_bytes` of
    wire bytes and `max_samples` samples, in batches of about `batch_bytes` (captures over
    time: first capture what is due by `mission_time_s`; streaming missions: `transmit_id`
    goes into the stream's first batch; projected payloads: the `basis` and zstd
    `dictionary` this contact uplinked)."""
    return pb.TransmitRequest(satellite_id=satellite_id, max_bytes=max_bytes,
                              max_samples=max_samples, batch_bytes=batch_bytes,
                              mission_time_s=mission_time_s, transmit_id=transmit_id,
                              basis=basis, dictionary=dictionary)


# the Sensor service's Transmit as a client calls it without the generated stub (its reply
# sized before it is parsed: sparsat.node.wire.rpc.sized)
serialize_transmit_request = pb.TransmitRequest.SerializeToString
parse_transmit_report = pb.TransmitReport.FromString
