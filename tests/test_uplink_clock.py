"""The uplink of projected payloads on the mission clock, in-process with stand-in sensors and
a stand-in ground station: the basis charged on links.uplink inside a satellite's window before
its downlink (periodic passes and contact windows), handed to the host with the next
Transmit, an uplink that does not fit a window waited out, and satellites waiting for a
supervised basis to be fitted."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import simpy
from tqdm import tqdm

from sparsat.node.data.config import ProjectionSpec
from sparsat.node.wire import basis as B
from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb
from sparsat.sim.mission.control import MissionControl
from sparsat.sim.mission.ground_client import MissionError
from sparsat.sim.mission.satellite import Contacts, Passes, fixed_rate
from sparsat.sim.mission.uplink import Uplink
from sparsat.sim.scenario.schema import Scenario
from sparsat.sim.space.links import Link, PeriodicPasses
from sparsat.sim.space.orbits import Contact

SAMPLE, ACK = 20, 5  # bytes of a projected sample's batch and of its ack
RATE = 8000  # downlink bit/s: 1,000 bytes a second
UP_RATE = 2000  # uplink bit/s: 250 bytes a second
BASIS = B.fit(ProjectionSpec(dim=8, quantizer="int4"),
              np.random.default_rng(0).standard_normal((200, 32)).astype(np.float32))


class Sensor:
    """Sends what the budget (and max_samples) allows of `left` samples; records each call as
    (satellite, mission time, max_samples, basis version carried)."""

    def __init__(self, env: simpy.Environment, left: int, calls: list[tuple[str, float, int, int]],
                 wait: bool = True) -> None:
        self.env, self.left, self.calls, self.wait = env, left, calls, wait
        self.basis = 0

    def Transmit(self, request: pb.TransmitRequest, **_: Any) -> pb.TransmitReport:
        carried = request.basis.version if request.HasField("basis") else 0
        self.calls.append((request.satellite_id, self.env.now, request.max_samples, carried))
        self.basis = carried or self.basis
        if self.wait and not self.basis:
            return pb.TransmitReport(satellite_id=request.satellite_id, remaining=self.left,
                                     waiting_basis=True)
        n = min(self.left, request.max_bytes // (SAMPLE + ACK), request.max_samples)
        self.left -= n
        return pb.TransmitReport(
            satellite_id=request.satellite_id, batch_bytes=[SAMPLE] * n, ack_bytes=[ACK] * n,
            sent=n, acked=n, remaining=self.left, next_bytes=SAMPLE + ACK if self.left else 0,
            basis_version=self.basis)


class Ground:
    """Mission.Uplink's stand-in: the basis, once `fit_after` samples are stored (supervised:
    None before), counting the calls."""

    def __init__(self, mc: MissionControl, fit_after: int = 0) -> None:
        self.mc, self.fit_after, self.calls = mc, fit_after, 0

    def uplink(self) -> pb.UplinkReply | None:
        self.calls += 1
        if self.mc.tally.stored < self.fit_after:
            return None
        return pb.UplinkReply(basis=BASIS.to_pb(), fit_tokens=200, fit_s=0.1)


def _mission(sats: int = 1, method: str = "pca", fit_samples: int = 1000,
             horizon_h: float | None = None) -> MissionControl:
    projection: dict[str, Any] = {"dim": 8, "method": method}
    if method == "supervised":
        projection["fit_samples"] = fit_samples
    scenario = Scenario.model_validate({
        "name": "uplink", "mission": {"horizon_h": horizon_h},
        "dataset": {"train_subset": 1000},
        "sensors": {"count": sats, "payload": {"kind": "cls", "cls_dtype": "int8",
                                                "projection": projection}},
        "links": {"downlink": {"rate_bps": RATE}, "uplink": {"rate_bps": UP_RATE,
                                                            "latency_s": 0.5}}})
    mc = MissionControl(scenario, "127.0.0.1:1", show_progress=False)  # never dialled here
    mc.downlink.antennas = {"gs": simpy.Resource(mc.env, capacity=sats)}
    mc.tally.stations["gs"] = {"antennas": sats, "bytes": 0, "busy_s": 0.0, "queued_s": 0.0,
                               "contact_s": 0.0}
    return mc


def _fly(mc: MissionControl, windows: dict[str, Passes | Contacts], left: int,
         ground: Ground, wait: bool = True) -> list[tuple[str, float, int, int]]:
    calls: list[tuple[str, float, int, int]] = []
    up = mc.downlink.uplink = Uplink(mc.env, mc.s, mc.tally, ground)  # type: ignore[arg-type]
    if mc.s.sensors.payload.projection.method == "pca":  # type: ignore[union-attr]
        up.fetch()
    mc.use_sensors({sat: pb.NodeInfo(node_id=sat) for sat in windows},
                   {sat: Sensor(mc.env, left, calls, wait) for sat in windows})
    bar = tqdm(disable=True)
    links = {sat: Link(mc.env, f"downlink:{sat}", RATE, 0.0) for sat in windows}
    procs = [mc.env.process(mc.downlink.fly(sat, w, fixed_rate(links[sat]), links[sat], bar))
             for sat, w in windows.items()]
    try:
        mc.env.run(until=mc.env.all_of(procs))
    finally:
        mc.gs_channel.close()
    return calls


def _uplink_s() -> float:
    msg_bytes = BASIS.to_pb().ByteSize()
    field = 1 + (msg_bytes.bit_length() + 6) // 7 + msg_bytes  # TransmitRequest.basis
    assert sum(B.uplink_sizes(BASIS.to_pb()).values()) == field + 5  # and a gRPC frame
    return 0.5 + 8 * (field + 5) / UP_RATE


def test_the_basis_goes_up_in_the_first_pass_before_the_downlink_and_once() -> None:
    mc = _mission()
    passes = Passes(PeriodicPasses(100, 60, 0))
    calls = _fly(mc, {"sat-0": passes}, 50, Ground(mc))
    first = calls[0]
    assert first[3] == BASIS.version  # the first Transmit carries it
    assert first[1] == pytest.approx(_uplink_s())  # after its air time on links.uplink
    assert all(c[3] == 0 for c in calls[1:])  # and never again
    t = mc.tally
    assert t.uplinks == 1 and t.uplink_s == pytest.approx(_uplink_s())
    assert t.uplink_content["bases"] + t.uplink_content["codebooks"] == (
        BASIS.to_pb().ByteSize() + 1 + 2 + 5)  # tag, 2-byte length, gRPC frame
    assert t.uplink_content["dictionaries"] == 0
    assert t.total_bytes == t.downlink_bytes + t.uplink_bytes + sum(t.uplink_content.values())
    # 50 samples of 25 bytes at 1,000 bytes a second follow the uplink in the same pass
    assert mc.env.now == pytest.approx(_uplink_s() + 50 * (SAMPLE + ACK) / 1000)


def test_every_satellite_is_uplinked_inside_its_own_contact_window() -> None:
    mc = _mission(sats=2)
    windows = {"sat-0": Contacts([Contact("sat-0", "gs", 10.0, 90.0, 45.0)]),
               "sat-1": Contacts([Contact("sat-1", "gs", 200.0, 280.0, 45.0)])}
    calls = _fly(mc, windows, 20, Ground(mc))
    carried = {c[0]: c for c in calls if c[3]}
    assert carried["sat-0"][1] == pytest.approx(10.0 + _uplink_s())
    assert carried["sat-1"][1] == pytest.approx(200.0 + _uplink_s())
    assert mc.tally.uplinks == 2


def test_a_window_too_short_for_the_uplink_is_waited_out() -> None:
    mc = _mission(horizon_h=1.0)
    short = _uplink_s() / 2
    windows = {"sat-0": Contacts([Contact("sat-0", "gs", 0.0, short, 45.0),
                                  Contact("sat-0", "gs", 100.0, 200.0, 45.0)])}
    calls = _fly(mc, windows, 10, Ground(mc))
    assert calls[0][1] == pytest.approx(100.0 + _uplink_s()) and calls[0][3] == BASIS.version
    assert mc.tally.basis_waits == {"window": 1}
    assert mc.tally.stored == 10


def test_an_uplink_longer_than_any_pass_is_an_error_naming_it() -> None:
    mc = _mission()
    with pytest.raises(MissionError, match="never fits"):
        _fly(mc, {"sat-0": Passes(PeriodicPasses(100, _uplink_s() / 2, 0))}, 10, Ground(mc))


def test_satellites_send_their_share_of_plain_tokens_then_wait_for_the_fit() -> None:
    mc = _mission(sats=2, method="supervised", fit_samples=20)
    ground = Ground(mc, fit_after=20)
    windows = {"sat-0": Contacts([Contact("sat-0", "gs", 0.0, 50.0, 45.0),
                                  Contact("sat-0", "gs", 300.0, 350.0, 45.0)]),
               "sat-1": Contacts([Contact("sat-1", "gs", 100.0, 150.0, 45.0)])}
    calls = _fly(mc, windows, 30, ground, wait=False)
    by = {sat: [c for c in calls if c[0] == sat] for sat in windows}
    # sat-0 sends its share (10 of the 20 labelled samples) without a basis, then waits
    assert by["sat-0"][0][2:] == (10, 0)
    # sat-1's share completes the 20: the basis is fitted then and goes up to sat-1 at once
    assert by["sat-1"][0][2:] == (10, 0)
    assert by["sat-1"][1][3] == BASIS.version
    sent_s = 10 * (SAMPLE + ACK) / 1000  # its share on the air, then the uplink
    assert by["sat-1"][1][1] == pytest.approx(by["sat-1"][0][1] + sent_s + _uplink_s())
    # sat-0 waited out the rest of its first window and gets the basis in its next one
    assert mc.tally.basis_waits.get("fit", 0) >= 1
    later = [c for c in by["sat-0"] if c[3]]
    assert later and later[0][1] == pytest.approx(300.0 + _uplink_s())
    assert mc.tally.stored == 60 and mc.tally.uplinks == 2
    assert mc.tally.basis["fit_tokens"] == 200 and mc.tally.basis["fitted_at_s"] >= 100.0


def test_a_host_that_lost_its_basis_is_uplinked_again() -> None:
    mc = _mission(horizon_h=1.0)
    windows = {"sat-0": Contacts([Contact("sat-0", "gs", 0.0, 10.0, 45.0),
                                  Contact("sat-0", "gs", 100.0, 200.0, 45.0)])}
    calls: list[tuple[str, float, int, int]] = []
    up = mc.downlink.uplink = Uplink(mc.env, mc.s, mc.tally, Ground(mc))  # type: ignore
    up.fetch()
    host = Sensor(mc.env, 400, calls)  # more than the first window takes
    real = host.Transmit

    def restarting(request: pb.TransmitRequest, **kw: Any) -> pb.TransmitReport:
        report = real(request, **kw)
        if len(calls) == 1:
            host.basis = 0  # restarted after its first call: the basis is gone
            report.basis_version = 0
        return report

    host.Transmit = restarting  # type: ignore[method-assign]
    mc.use_sensors({"sat-0": pb.NodeInfo(node_id="sat-0")}, {"sat-0": host})
    link = Link(mc.env, "downlink:sat-0", RATE, 0.0)
    mc.env.run(until=mc.env.process(mc.downlink.fly("sat-0", windows["sat-0"],
                                                    fixed_rate(link), link, tqdm(disable=True))))
    mc.gs_channel.close()
    assert [c[3] for c in calls if c[3]] == [BASIS.version, BASIS.version]
    assert calls[-1][1] >= 100.0  # again in the next window, charged again
    assert mc.tally.uplinks == 2 and mc.tally.stored == 400


def test_a_fit_the_others_cannot_complete_takes_more_from_who_can() -> None:
    mc = _mission(sats=2, method="supervised", fit_samples=20)
    windows = {"sat-0": Passes(PeriodicPasses(200, 50, 0)),
               "sat-1": Passes(PeriodicPasses(200, 50, 100))}
    calls: list[tuple[str, float, int, int]] = []
    up = mc.downlink.uplink = Uplink(mc.env, mc.s, mc.tally, Ground(mc, fit_after=20))  # type: ignore
    sensors = {"sat-0": Sensor(mc.env, 30, calls, wait=False),
               "sat-1": Sensor(mc.env, 4, calls, wait=False)}  # fewer images than its share
    mc.use_sensors({s: pb.NodeInfo(node_id=s) for s in windows}, sensors)
    links = {s: Link(mc.env, f"downlink:{s}", RATE, 0.0) for s in windows}
    procs = [mc.env.process(mc.downlink.fly(s, w, fixed_rate(links[s]), links[s],
                                            tqdm(disable=True))) for s, w in windows.items()]
    mc.env.run(until=mc.env.any_of([mc.env.all_of(procs), mc.env.timeout(10_000)]))
    mc.gs_channel.close()
    assert up.basis is not None and mc.tally.stored == 34  # fitted, everything delivered
    assert mc.env.now < 10_000
