"""The sensor hosts a mission downlinks from, and what happens when one goes away.

Each Transmit has a deadline sized from its byte budget; a host that does not answer
(UNAVAILABLE, DEADLINE_EXCEEDED) is HostDown, and its satellites wait for it: at their passes
on the mission clock while other satellites still downlink, then polling the registry in wall
time. A host that comes back (maybe at another port) gets a new channel and the recovery is
recorded; one gone for longer than host_return_s leaves its satellites' shortfall.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
import time
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

import grpc
import simpy

from sparsat.node.wire import control
from sparsat.node.wire.rpc import MAX_MESSAGE_BYTES, channel, sized
from sparsat.proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc
from sparsat.sim.mission.ground_client import Deadlines, GroundStationClient, MissionError
from sparsat.sim.scenario.configs import mask_spec
from sparsat.sim.scenario.schema import Scenario

if TYPE_CHECKING:
    from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb
    from sparsat.sim.mission.tally import Tally

TRANSMIT_MAX_SAMPLES = 4096  # samples per Transmit call: bounds one call's stream

log = logging.getLogger("sparsat.mission")


MAX_REPORT_REJECTIONS = 64  # "id: reason" lines a report may carry (sensor hosts send 16)
MAX_REJECTION_CHARS = 512  # one such line (the Python host's are under 200)
# A TransmitReport of at most TRANSMIT_MAX_SAMPLES batches and acks (10 B each at most) and its
# refusal lines is under 200 kB; a bigger message is not parsed
MAX_REPORT_BYTES = 1 << 20
MAX_CREDENTIAL_BYTES = 16384  # one stream's call credentials (a token is 8,192 chars at most)
MAX_SAMPLE_FLOPS = 10**12  # on-board encoding of one sample, at most (ViT-B/16: ~1.8e10)
MAX_CAPTURES_PER_REPORT = 10**7  # captures (or drops) one report may count
# energy-only counts of one report (image coding, tile choice, cloud detection): a host
# builds at most its shard's scenes between two reports, each at most 8192 x 8192 x 3
MAX_CODED_PIXELS_PER_REPORT = MAX_CAPTURES_PER_REPORT * 8192 * 8192 * 3
MAX_ONBOARD_FLOPS_PER_REPORT = MAX_CODED_PIXELS_PER_REPORT * 16
MAX_CODE_S_PER_REPORT = 86_400.0 * 365


def report_error(report: pb.TransmitReport, request: pb.TransmitRequest) -> str:
    """What makes `report` impossible as the answer to `request`, or '': mission control
    counts bytes, samples and on-board time from it, so a hostile or broken sensor host
    must not make it count more than was asked for."""
    batches, acks = len(report.batch_bytes), len(report.ack_bytes)
    sent = sum(report.batch_bytes)
    checks = [
        (report.satellite_id != request.satellite_id,
         f"it is for {report.satellite_id[:64]!r}, not {request.satellite_id!r}"),
        (report.sent > request.max_samples,
         f"{report.sent} samples sent, {request.max_samples} asked at most"),
        (batches > report.sent, f"{batches} batches for {report.sent} samples"),
        # more acks than batches: the ground station's fault, reported as an error
        ((acks > batches and not report.error_code) or acks > request.max_samples + 1,
         f"{acks} acks for {batches} batches"),
        (sent + report.credential_bytes > request.max_bytes,
         f"{sent} batch bytes, {report.credential_bytes} of call credentials, "
         f"{request.max_bytes} granted"),
        (report.credential_bytes > MAX_CREDENTIAL_BYTES or (report.credential_bytes
                                                            and not batches),
         f"{report.credential_bytes} bytes of call credentials for {batches} batches"),
        (any(a > MAX_MESSAGE_BYTES for a in report.ack_bytes),
         f"an ack of more than {MAX_MESSAGE_BYTES} bytes"),
        (report.acked > report.sent, f"{report.acked} samples acked, {report.sent} sent"),
        (report.duplicates + report.rejected > report.acked,
         f"{report.duplicates} duplicates and {report.rejected} refused of "
         f"{report.acked} acked"),
        (report.captured > MAX_CAPTURES_PER_REPORT or report.dropped > report.captured
         + MAX_CAPTURES_PER_REPORT, f"{report.captured} captures and {report.dropped} drops "
         "in one report"),
        (not (math.isfinite(report.next_capture_s) and report.next_capture_s >= -1),
         f"a next capture at {report.next_capture_s}"),
        (report.encoder_precision not in ("", "float32", "bfloat16"),
         f"an on-board encoder precision {report.encoder_precision[:32]!r}"),
        (len(report.rejections) > MAX_REPORT_REJECTIONS,
         f"{len(report.rejections)} refusal lines, {MAX_REPORT_REJECTIONS} at most"),
        (any(len(r) > MAX_REJECTION_CHARS for r in report.rejections),
         f"a refusal line of more than {MAX_REJECTION_CHARS} characters"),
        (report.encode_flops > report.sent * MAX_SAMPLE_FLOPS,
         f"{report.encode_flops} FLOPs of on-board encoding for {report.sent} samples"),
        (not (math.isfinite(report.encode_s) and report.encode_s >= 0),
         f"on-board encoding took {report.encode_s} s"),
        (not (math.isfinite(report.code_s) and 0 <= report.code_s <= MAX_CODE_S_PER_REPORT),
         f"image coding took {report.code_s} s"),
        (report.coded_pixels > MAX_CODED_PIXELS_PER_REPORT,
         f"{report.coded_pixels} pixel values coded in one report"),
        (report.onboard_flops > MAX_ONBOARD_FLOPS_PER_REPORT,
         f"{report.onboard_flops} on-board FLOPs besides the encoder in one report"),
    ]
    return next((why for bad, why in checks if bad), "")


def transmit_id_of(key: bytes, n: int) -> int:
    """The n-th Transmit's id: keyed (a sensor host cannot open a stream under the id of a
    Transmit to come) and always in [2^61, 2^62), so its varint is 9 bytes whatever the key:
    the bytes on the radio are the same in every run."""
    digest = hmac.new(key, str(n).encode(), hashlib.sha256).digest()
    return (1 << 61) | (int.from_bytes(digest[:8], "little") & ((1 << 61) - 1))


class _SensorCalls:
    """A sensor host's Transmit, its report sized before it is parsed: (report, wire size),
    (None, size) for one bigger than MAX_REPORT_BYTES."""

    def __init__(self, ch: grpc.Channel) -> None:
        self.Transmit = ch.unary_unary(
            "/sparsat.v1.Sensor/Transmit", request_serializer=control.serialize_transmit_request,
            response_deserializer=sized(control.parse_transmit_report, MAX_REPORT_BYTES))


class HostDown(Exception):
    """A sensor host did not answer a call (UNAVAILABLE, DEADLINE_EXCEEDED)."""


class SensorHosts:
    """Which host holds each satellite, a channel and stub per host (replaced when a host
    comes back at another address), the satellites still downlinking (`active`), those
    waiting for their host (`waiting`), when each unreachable host was first missed (wall
    clock) and each satellite's queue as last reported (`remaining`)."""

    def __init__(self, env: simpy.Environment, scenario: Scenario, tally: Tally,
                 gs: GroundStationClient, deadlines: Deadlines):
        self.env = env
        self.s = scenario
        self.tally = tally
        self.gs = gs
        self.d = deadlines
        self.host_of: dict[str, pb.NodeInfo] = {}
        self.channels: dict[str, grpc.Channel] = {}
        self.stubs: dict[str, Any] = {}  # node id -> _SensorCalls (tests: a SensorStub)
        self.active: set[str] = set()
        self.waiting: set[str] = set()
        self.down_since: dict[str, float] = {}
        self.remaining: dict[str, int] = {}
        # streaming missions: each Transmit's id (copied into its stream's first batch, then
        # named when its batches are stamped), the satellite's last
        self.transmit_ids: dict[str, int] = {}
        # projected payloads: what the next Transmit of a satellite carries up (basis,
        # dictionary; kept until a Transmit is answered), and a cap on the samples it sends
        # (a supervised basis's share of plain tokens)
        self.uplink_next: dict[str, tuple[Any, bytes]] = {}
        self.max_samples: dict[str, int] = {}
        self._next_transmit = 0
        self._transmit_key = secrets.token_bytes(16)  # ids no host can guess ahead

    def use(self, host_of: dict[str, pb.NodeInfo], stubs: dict[str, Any]) -> None:
        """Which host holds each satellite, and a Sensor stub per host (by node id)."""
        self.host_of, self.stubs = dict(host_of), dict(stubs)

    def connect(self, host_of: dict[str, pb.NodeInfo]) -> None:
        """A channel to each registered host of `host_of` (closed by close())."""
        self.channels = {n.node_id: channel(n.address, peer=n.node_id)
                         for n in host_of.values()}
        self.use(host_of, {node_id: _SensorCalls(ch) for node_id, ch in self.channels.items()})

    def close(self) -> None:
        for ch in self.channels.values():
            ch.close()

    def transmit(self, sat_id: str, budget: int) -> pb.TransmitReport:
        """One Transmit, with a deadline sized from the budget; HostDown when the host does
        not answer (its first miss is remembered), MissionError on any other failure."""
        host = self.host_of[sat_id]
        timeout = self.d.transmit_s(budget)
        transmit_id = 0
        if self.s.training.streaming:
            self._next_transmit += 1
            transmit_id = self.transmit_ids[sat_id] = transmit_id_of(self._transmit_key,
                                                                     self._next_transmit)
        basis, dictionary = self.uplink_next.get(sat_id, (None, b""))
        request = control.transmit_request(
            sat_id, max_bytes=budget,
            max_samples=min(TRANSMIT_MAX_SAMPLES,
                            self.max_samples.get(sat_id, TRANSMIT_MAX_SAMPLES)),
            batch_bytes=self.s.links.downlink.batch_size(),
            mission_time_s=self.env.now if self.s.sensors.capture is not None else 0.0,
            transmit_id=transmit_id, basis=basis, dictionary=dictionary)
        try:
            answer = self.stubs[host.node_id].Transmit(request, timeout=timeout)
        except grpc.RpcError as e:
            where = f"sensor host {host.node_id} at {host.address}"
            if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise MissionError(f"{sat_id}: Transmit to {where} failed: {e.code().name}: "
                                   f"{e.details()}") from e
            self.down_since.setdefault(host.node_id, time.monotonic())
            raise HostDown(f"{where} did not answer Transmit ({e.code().name} after at most "
                           f"{timeout:.0f} s: {e.details()})") from e
        report, size = answer if isinstance(answer, tuple) else (answer, 0)
        if report is None:
            raise MissionError(f"{sat_id}: sensor host {host.node_id} at {host.address} sent a "
                               f"TransmitReport of {size} bytes, more than the "
                               f"{MAX_REPORT_BYTES} one may be")
        wrong = report_error(report, request)
        if wrong:
            raise MissionError(f"{sat_id}: sensor host {host.node_id} at {host.address} sent a "
                               f"TransmitReport that cannot be true: {wrong}")
        self.uplink_next.pop(sat_id, None)  # the host has it
        return report

    def await_host(self, sat_id: str, next_chance: Callable[[], float]
                   ) -> Generator[simpy.Event, Any, bool]:
        """Wait for `sat_id`'s sensor host to answer again: at each of the satellite's passes
        (mission clock) while other satellites still downlink; once nothing else runs, every
        host_poll_s wall seconds. True when it is back; False when it stayed gone (the
        satellite's shortfall is recorded)."""
        self.waiting.add(sat_id)
        try:
            while True:
                if self.active - self.waiting:
                    yield self.env.timeout(max(0.0, next_chance() - self.env.now))
                    if self.host_back(sat_id):
                        return True
                elif self.wait_alone(sat_id):
                    return True
                else:
                    return False
        finally:
            self.waiting.discard(sat_id)

    def wait_alone(self, sat_id: str) -> bool:
        """Nothing else to do on the mission clock: poll the host in wall time until it is
        back, or until it has been gone host_return_s (then the shortfall is recorded)."""
        host = self.host_of[sat_id].node_id
        while not self.host_back(sat_id):
            if time.monotonic() - self.down_since[host] > self.d.host_return_s:
                self.give_up(sat_id)
                return False
            time.sleep(self.d.host_poll_s)
        return True

    def host_back(self, sat_id: str) -> bool:
        """Whether `sat_id`'s host answers: its registered address (a restarted host registers
        again, maybe at another port) is probed with Health; a new address gets a new channel."""
        old = self.host_of[sat_id]
        if old.node_id not in self.down_since:
            return True
        try:
            nodes = self.gs.list_nodes()
        except MissionError:
            return False
        new = next((n for n in nodes if n.node_id == old.node_id), old)
        ch = channel(new.address, peer=new.node_id)
        try:
            pb_grpc.HealthStub(ch).Check(control.health_request(), timeout=min(2.0, self.d.call_s))
        except grpc.RpcError:
            ch.close()
            return False
        self.channels.pop(old.node_id).close()
        self.channels[new.node_id] = ch
        self.stubs[new.node_id] = _SensorCalls(ch)
        for sat, n in self.host_of.items():
            if n.node_id == new.node_id:
                self.host_of[sat] = new
        took = time.monotonic() - self.down_since.pop(old.node_id)
        log.warning("sensor host %s is back at %s after %.1f s (was %s)", new.node_id,
                    new.address, took, old.address)
        self.tally.faults.append({
            "fault": "sensor host unreachable", "node": new.node_id, "address": old.address,
            "new_address": new.address, "recovered": True, "recovery_wall_s": round(took, 2)})
        return True

    def give_up(self, sat_id: str) -> None:
        """Record `sat_id`'s shortfall: its host has not come back."""
        host = self.host_of[sat_id]
        gone = time.monotonic() - self.down_since[host.node_id]
        undelivered = self.remaining.get(sat_id)
        if undelivered is None:
            undelivered = self.queued_at_start(sat_id)
        self.tally.shortfall[sat_id] = {"host": host.node_id, "address": host.address,
                                        "undelivered": undelivered,
                                        "gone_wall_s": round(gone, 2)}
        log.warning("%s: sensor host %s at %s has not come back in %.0f s: %d samples of %s "
                    "not delivered; training goes on with what arrived", sat_id, host.node_id,
                    host.address, gone, undelivered, sat_id)

    def queued_at_start(self, sat_id: str) -> int:
        """A satellite's queue before it sent anything: its shard, once per masked copy
        (with captures over time it starts empty)."""
        if self.s.sensors.capture is not None:
            return 0
        from sparsat.sim.scenario.configs import satellite_images

        return len(satellite_images(self.s)[sat_id]) * mask_spec(self.s).copies
