"""The one satellite process (sparsat.sim.mission.satellite) in-process, with stand-in
sensors: periodic passes and a list of contact windows drive the same process, link time is
booked once per transfer, short windows, antennas shared by satellites."""

from __future__ import annotations

from typing import Any

import pytest
import simpy
from tqdm import tqdm

from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb
from sparsat.sim.mission.control import MissionControl
from sparsat.sim.mission.ground_client import MissionError
from sparsat.sim.mission.satellite import Contacts, Passes, Window, fixed_rate
from sparsat.sim.scenario.schema import Scenario
from sparsat.sim.space.links import Link, PeriodicPasses
from sparsat.sim.space.orbits import Contact

SAMPLE, ACK = 100, 10  # bytes of a one-sample batch and of its ack
RATE = 8000  # bit/s: 1,000 bytes a second


class Sensor:
    """Sends what the budget allows of `left` samples, one batch per sample, and records
    each call as (satellite, mission time, budget)."""

    def __init__(self, env: simpy.Environment, left: int, calls: list[tuple[str, float, int]]
                 ) -> None:
        self.env, self.left, self.calls = env, left, calls

    def Transmit(self, request: pb.TransmitRequest, **_: Any) -> pb.TransmitReport:
        self.calls.append((request.satellite_id, self.env.now, request.max_bytes))
        n = min(self.left, request.max_bytes // (SAMPLE + ACK))
        self.left -= n
        return pb.TransmitReport(
            satellite_id=request.satellite_id, batch_bytes=[SAMPLE] * n, ack_bytes=[ACK] * n,
            sent=n, acked=n, remaining=self.left, next_bytes=SAMPLE + ACK if self.left else 0)


def _mission(sats: int = 1, antennas: int = 1, latency_s: float = 0.0,
             horizon_h: float | None = None) -> tuple[MissionControl, dict[str, Link]]:
    scenario = Scenario.model_validate({
        "name": "satellite", "sensors": {"count": sats}, "mission": {"horizon_h": horizon_h},
        "links": {"downlink": {"rate_bps": RATE, "latency_s": latency_s}}})
    mc = MissionControl(scenario, "127.0.0.1:1", show_progress=False)  # never dialled here
    mc.downlink.antennas = {"gs": simpy.Resource(mc.env, capacity=antennas)}
    mc.tally.stations["gs"] = {"antennas": antennas, "bytes": 0, "busy_s": 0.0,
                               "queued_s": 0.0, "contact_s": 0.0}
    links = {sat: Link(mc.env, f"downlink:{sat}", RATE, latency_s)
             for sat in scenario.sensors.ids()}
    return mc, links


def _fly(mc: MissionControl, links: dict[str, Link], windows: dict[str, Passes | Contacts],
         left: int) -> list[tuple[str, float, int]]:
    calls: list[tuple[str, float, int]] = []
    mc.use_sensors({sat: pb.NodeInfo(node_id=sat) for sat in windows},
                   {sat: Sensor(mc.env, left, calls) for sat in windows})
    bar = tqdm(disable=True)
    procs = [mc.env.process(mc.downlink.fly(sat, w, fixed_rate(links[sat]), links[sat], bar))
             for sat, w in windows.items()]
    try:
        mc.env.run(until=mc.env.all_of(procs))
    finally:
        mc.gs_channel.close()
    return calls


def _contacts(sat: str, *spans: tuple[float, float]) -> Contacts:
    return Contacts([Contact(sat, "gs", a, b, 45.0) for a, b in spans])


def test_periodic_passes_and_a_list_of_contact_windows_drive_the_same_process() -> None:
    # 1,000 samples of 110 bytes on the air, 50 s windows of 50 kB (454 samples): three windows
    mc, links = _mission()
    passes = _fly(mc, links, {"sat-0": Passes(PeriodicPasses(100, 50, 0))}, 1000)
    mc2, links2 = _mission()
    spans = [(0, 50), (100, 150), (200, 250), (300, 350)]
    contacts = _fly(mc2, links2, {"sat-0": _contacts("sat-0", *spans)}, 1000)

    # the same calls at the same times: each window's first call, then the one that finds the
    # rest of the window too short for a sample and moves on to the next window
    for calls in (passes, contacts):
        assert [t for _, t, _ in calls] == pytest.approx([0, 49.94, 100, 149.94, 200])
        assert [b for _, _, b in calls] == pytest.approx([50_000, 60, 50_000, 60, 50_000], abs=1)
    for m, link in ((mc, links["sat-0"]), (mc2, links2["sat-0"])):
        assert m.tally.downlink_messages == 1000
        assert link.bytes == 1000 * (SAMPLE + ACK)
        assert m.env.now == pytest.approx(200 + 92 * (SAMPLE + ACK) / 1000)
    assert mc2.tally.stations["gs"]["bytes"] == links2["sat-0"].bytes
    assert mc.tally.stations["gs"]["bytes"] == 0  # passes need no station


@pytest.mark.parametrize("kind", ["passes", "contacts"])
def test_link_time_is_booked_once_per_transfer(kind: str, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    booked: list[tuple[str, int, float]] = []
    book = Link.book

    def spy(self: Link, nbytes: int, seconds: float) -> None:
        booked.append((self.name, nbytes, seconds))
        book(self, nbytes, seconds)

    monkeypatch.setattr(Link, "book", spy)
    mc, links = _mission(latency_s=0.5)
    windows: Passes | Contacts = (Passes(PeriodicPasses(100, 50, 0)) if kind == "passes"
                                  else _contacts("sat-0", (0, 50)))
    calls = _fly(mc, links, {"sat-0": windows}, 3)

    link = links["sat-0"]
    assert len(calls) == 1
    if kind == "passes":  # every batch and every ack its own transfer, a latency each
        assert booked == [("downlink:sat-0", n, pytest.approx(0.5 + n / 1000))
                          for n in [SAMPLE, ACK] * 3]
    else:  # the call's six messages together at the rate of its start
        assert booked == [("downlink:sat-0", 330, pytest.approx(6 * 0.5 + 0.33))]
        assert mc.tally.stations["gs"]["busy_s"] == link.busy_s
    assert link.bytes == 330 and link.busy_s == pytest.approx(3.33)
    assert mc.env.now == pytest.approx(3.33)


def test_a_contact_window_too_short_for_a_sample_is_let_go_by() -> None:
    # a window shorter than the latency gets no call, one too short for a sample gets a call
    # that sends nothing; the next long window carries the samples
    mc, links = _mission(latency_s=0.5)
    calls = _fly(mc, links, {"sat-0": _contacts("sat-0", (0, 0.4), (10, 10.5625), (20, 70))}, 5)
    assert [(t, b) for _, t, b in calls] == [(10, 62), (20, 49_500)]
    assert mc.tally.downlink_messages == 5 and mc.env.now == pytest.approx(20 + 5 + 0.55)


def test_a_pass_too_short_for_a_sample_waits_out_the_pass_or_is_an_error() -> None:
    mc, links = _mission(latency_s=0.5)
    passes = Passes(PeriodicPasses(100, 0.4, 0))  # shorter than the latency: budget 0
    with pytest.raises(MissionError, match="a 110-byte sample never fits a pass"):
        _fly(mc, links, {"sat-0": passes}, 5)

    mc, links = _mission()
    calls = _fly(mc, links, {"sat-0": Passes(PeriodicPasses(100, 0.25, 0))}, 3)
    # 250 bytes a pass: two samples in the first, the third after waiting for the next
    assert [t for _, t, _ in calls] == pytest.approx([0, 0.22, 100])
    assert [b for _, _, b in calls] == pytest.approx([250, 30, 250], abs=1)
    assert mc.env.now == pytest.approx(100.11)


def test_satellites_in_view_together_queue_for_the_stations_antenna() -> None:
    mc, links = _mission(sats=2, antennas=1)
    calls = _fly(mc, links, {"sat-0": _contacts("sat-0", (0, 50)),
                             "sat-1": _contacts("sat-1", (10, 100))}, 100)
    # sat-1 waits for sat-0 to finish (11 s on the air), then has what is left of its window
    assert calls == [("sat-0", 0, 50_000), ("sat-1", pytest.approx(11), 89_000)]
    station = mc.tally.stations["gs"]
    assert station["queued_s"] == pytest.approx(1)
    assert station["bytes"] == 2 * 100 * (SAMPLE + ACK) == sum(k.bytes for k in links.values())
    assert station["busy_s"] == pytest.approx(22)


def test_a_satellite_left_with_samples_after_its_last_window_is_an_error() -> None:
    mc, links = _mission()
    with pytest.raises(MissionError, match="sat-0: 546 samples still queued after its last.*"
                                           "set mission.horizon_h"):
        _fly(mc, links, {"sat-0": _contacts("sat-0", (0, 50))}, 1000)


@pytest.mark.parametrize("kind", ["passes", "contacts"])
def test_at_the_horizon_what_is_on_board_stays_there(kind: str) -> None:
    """mission.horizon_h = 126 s: passes of 50 s every 100 s are cut at it (the one from
    100 s has 26 s), contact windows end with their list; what is left is counted."""
    mc, links = _mission(horizon_h=126 / 3600)
    windows: Passes | Contacts = (
        Passes(PeriodicPasses(100, 50, 0), mc.s.mission.horizon_s) if kind == "passes"
        else _contacts("sat-0", (0, 50), (100, 150)))
    calls = _fly(mc, links, {"sat-0": windows}, 1000)
    starts = [(t, b) for _, t, b in calls if b > SAMPLE + ACK]  # each window's first call
    assert starts == ([(0, 50_000), (100, pytest.approx(26_000, abs=1))] if kind == "passes"
                      else [(0, 50_000), (100, 50_000)])
    assert all(t < (126 if kind == "passes" else 150) for _, t, _ in calls)
    sent = sum(b // (SAMPLE + ACK) for _, _, b in calls)
    assert mc.tally.left_on_board == {"sat-0": 1000 - sent} and 0 < sent < 1000
    assert mc.env.now <= (126 if kind == "passes" else 150) + 1e-9


def test_contact_windows_skip_what_ended_and_leave_on_request() -> None:
    w = _contacts("sat-0", (0, 10), (5, 20), (30, 40))
    first = w.at(0)
    assert first == Window(0, 10, "gs") and w.at(9) is first
    assert w.at(12) == Window(5, 20, "gs")  # the first one ended: an overlapping one is open
    w.leave()
    assert w.at(12) == Window(30, 40, "gs")
    assert w.at(40) is None


def test_accuracy_at_the_horizon_is_the_last_model_finished_by_then() -> None:
    from sparsat.sim.mission.report import _finished_by

    def _at_horizon(history: list[dict[str, float]], horizon_s: float | None) -> float | None:
        done = _finished_by(history, horizon_s)  # type: ignore[arg-type]
        return done["accuracy"] if done else None

    history = [{"accuracy": 0.5, "sim_time_s": 100.0}, {"accuracy": 0.6, "sim_time_s": 200.0}]
    assert _at_horizon(history, 150.0) == 0.5
    assert _at_horizon(history, 200.0) == 0.6
    assert _at_horizon(history, 50.0) is None  # nothing finished by then
    assert _at_horizon(history, None) == 0.6  # no horizon: the last model


class CapturingSensor:
    """A host with a capture schedule (sparsat.node.data.capture): at each Transmit it first
    makes the captures due by the request's mission time, then sends what the budget allows,
    one 1,000-byte batch per sample."""

    SIZE = 1000

    def __init__(self, spec: Any) -> None:
        self.spec, self.made, self.queue, self.sent = spec, 0, 0, 0

    def Transmit(self, request: pb.TransmitRequest, **_: Any) -> pb.TransmitReport:
        due = self.spec.captured_by(request.mission_time_s)
        self.queue += due - self.made
        self.made = due
        n = min(self.queue, request.max_bytes // (self.SIZE + ACK))
        self.queue -= n
        self.sent += n
        return pb.TransmitReport(
            satellite_id=request.satellite_id, batch_bytes=[self.SIZE] * n,
            ack_bytes=[ACK] * n, sent=n, acked=n, remaining=self.queue,
            next_bytes=self.SIZE + ACK if self.queue else 0,
            next_capture_s=self.spec.next_capture_s(self.made))


@pytest.mark.parametrize("kind", ["passes", "contacts"])
def test_a_capture_made_while_a_transmit_was_on_the_air_is_sent_too(kind: str) -> None:
    """A capture every 30 s until the horizon (900 s); one window from 855 s. Its first
    Transmit finds 29 captures (0 ... 840 s) and is on the air until 884.3 s; capture 29 (at
    870 s) was due meanwhile: the satellite asks again at once and sends it, instead of
    taking the schedule at 884.3 s for done."""
    from sparsat.sim.scenario.configs import capture_spec

    scenario = Scenario.model_validate({
        "name": "capture", "sensors": {"count": 1, "capture": {"rate_per_h": 120,
                                                                "storage_bytes": 10**7}},
        "mission": {"horizon_h": 0.25}, "links": {"downlink": {"rate_bps": RATE}}})
    mc = MissionControl(scenario, "127.0.0.1:1", show_progress=False)
    link = Link(mc.env, "downlink:sat-0", RATE)
    spec = capture_spec(scenario)
    assert spec is not None and spec.max_captures == 30
    host = CapturingSensor(spec)
    mc.use_sensors({"sat-0": pb.NodeInfo(node_id="sat-0")}, {"sat-0": host})
    mc.downlink.antennas = {"gs": simpy.Resource(mc.env, capacity=1)}
    mc.tally.stations["gs"] = {"antennas": 1, "bytes": 0, "busy_s": 0.0, "queued_s": 0.0,
                               "contact_s": 0.0}
    windows: Passes | Contacts = (
        Passes(PeriodicPasses(900, 45, 855), mc.s.mission.horizon_s) if kind == "passes"
        else _contacts("sat-0", (855, 900)))
    try:
        mc.env.run(until=mc.env.process(mc.downlink.fly(
            "sat-0", windows, fixed_rate(link), link, tqdm(disable=True))))
    finally:
        mc.gs_channel.close()
    assert (host.made, host.sent, host.queue) == (30, 30, 0)
    assert mc.tally.left_on_board == {"sat-0": 0}
    assert mc.env.now < 900
