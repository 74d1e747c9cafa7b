"""One satellite's downlink on the mission clock: the one SimPy process every satellite runs.

It is fed by a window source and a rate function:

- a **window source** yields the satellite's contact windows: `Passes` (the placeholder pass
  model, `sparsat.sim.space.links.PeriodicPasses`, the window found from the clock at each
  call) or `Contacts` (the SGP4 contact windows of `sparsat.sim.space.orbits`, in order, each
  over a ground station whose antennas the satellites share). Both are glue between the
  physics of `sim/space/` and the process, so they live here;
- a **rate function** gives the radio's rate (bit/s) and latency (s) at a time within a
  window: the satellite's link's constant ones on passes (`fixed_rate`), from the slant range
  and the link budget in contact windows (`RangeRate`).

In each window, `Downlink.fly` repeats transmit (a byte budget of what fits in the rest of
the window) -> count -> on-board encoding on the clock -> charge each batch and its ack ->
failure handling, until its queue is empty. Link time is booked in one place,
`Downlink.charge`. Passes and contact windows differ only where the mission always treated
them differently (kept so that every figure stays the same): on a pass the budget is whole
link bytes before the loss allowance, each message is its own transfer on the satellite's
link, a sample that does not fit waits out the pass (an error if it fits no pass), and an
unreachable sensor host is waited for at the next passes; in a contact window the satellite
first takes one of the station's antennas (queued), the rate is the one at the call's start,
a call's messages hold the antenna together, and a satellite whose host is unreachable lets
its windows go by until the host answers at the start of one.
"""

from __future__ import annotations

import heapq
import logging
import random
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import simpy
from simpy.resources.resource import Request
from tqdm import tqdm

from sparsat.sim.mission.ground_client import Deadlines, GroundStationClient, MissionError
from sparsat.sim.mission.hosts import HostDown, SensorHosts
from sparsat.sim.mission.tally import Tally
from sparsat.sim.mission.uplink import Uplink
from sparsat.sim.scenario.configs import capture_spec
from sparsat.sim.scenario.schema import WINDOW_SEARCH_H, Scenario
from sparsat.sim.space import orbits
from sparsat.sim.space.links import (
    C_KM_S,
    Framing,
    Link,
    LinkBudget,
    PeriodicPasses,
    retransmitted,
)

if TYPE_CHECKING:
    from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb

MAX_DOWNLINK_FAILURES = 5  # consecutive failed streams before a satellite gives up

log = logging.getLogger("sparsat.mission")


@dataclass(frozen=True)
class Window:
    """[start_s, end_s) of mission time; `station`: the ground station it is over (contact
    windows), None for a pass on the satellite's own link."""

    start_s: float
    end_s: float
    station: str | None = None


# (rate bit/s, latency s, MODCOD or None) at a time
RateFn = Callable[[Window, float], tuple[float, float, str | None]]


class Passes:
    """Periodic passes: the window at `now` (the one open then, or else the next) is found
    from the clock at every call; with a horizon, cut at it and None from there on."""

    def __init__(self, passes: PeriodicPasses, horizon_s: float | None = None) -> None:
        self.passes = passes
        self.horizon_s = horizon_s

    @property
    def duration_s(self) -> float:
        return self.passes.duration_s

    def at(self, now: float) -> Window | None:
        start, end = self.passes.window_at(now)
        if self.horizon_s is None:
            return Window(start, end)
        if start >= self.horizon_s or now >= self.horizon_s:
            return None
        return Window(start, min(end, self.horizon_s))

    def leave(self) -> None:
        """Nothing to do: the next pass follows from the clock."""

    def next_start(self, now: float) -> float:
        """The start of the pass after the one at `now`."""
        return self.passes.window_at(self.passes.window_at(now)[1])[0]


class Contacts:
    """A satellite's contact windows, in order of start: the window at hand until it ends or
    the satellite leaves it, windows that ended meanwhile skipped; None after the last."""

    def __init__(self, contacts: Sequence[orbits.Contact]) -> None:
        self.windows = [Window(c.start_s, c.end_s, c.station) for c in contacts]
        self._i = 0

    def at(self, now: float) -> Window | None:
        while self._i < len(self.windows) and now >= self.windows[self._i].end_s:
            self._i += 1
        return self.windows[self._i] if self._i < len(self.windows) else None

    def leave(self) -> None:
        self._i += 1


def fixed_rate(link: Link) -> RateFn:
    """A pass's rate: the link's, all along."""
    return lambda w, t: (link.rate_bps, link.latency_s, None)


class RangeRate:
    """The rate the slant range from the window's station allows at `t` (the budget's
    Shannon capacity, capped at the modem's rate; the modem's rate without a budget), and
    the latency: range / c plus the radio's own; the MODCOD, with adaptive modulation."""

    def __init__(self, sat: orbits.Satellite, epoch: datetime, sites: dict[str, orbits.Station],
                 budget: LinkBudget | None, rate_bps: float, latency_s: float) -> None:
        self.sat, self.epoch, self.sites = sat, epoch, sites
        self.budget, self.rate_bps, self.latency_s = budget, rate_bps, latency_s

    def __call__(self, w: Window, t: float) -> tuple[float, float, str | None]:
        assert w.station is not None
        pos = orbits.ecef_positions_km([self.sat], self.epoch, np.array([t]))[0]
        rng_km = float(orbits.slant_range_km(pos, self.sites[w.station])[0])
        rate, mode = (self.budget.rate_and_mode(rng_km) if self.budget is not None
                      else (self.rate_bps, None))
        return rate, rng_km / C_KM_S + self.latency_s, mode


class Downlink:
    """What the satellites' processes share: the clock, the sensor hosts, the ground
    station's antennas, the tally. `transmit` makes every Transmit of the mission (mission
    control's, which tests hook to inject faults)."""

    def __init__(self, env: simpy.Environment, scenario: Scenario, tally: Tally,
                 hosts: SensorHosts, gs: GroundStationClient, deadlines: Deadlines,
                 transmit: Callable[[str, int], pb.TransmitReport]) -> None:
        self.env, self.s, self.tally = env, scenario, tally
        self.hosts, self.gs, self.d = hosts, gs, deadlines
        self.transmit = transmit
        self.antennas: dict[str, simpy.Resource] = {}  # station -> its antennas (orbits)
        self._onboard_ready: dict[str, float] = {}  # satellite -> its encoder's backlog end
        # streaming missions: the end times of the batches stamped and not yet used by an
        # update (a heap), and what is told when a satellite leaves a window it sent in
        self.arrivals: list[float] = []
        f = scenario.links.downlink.framing
        self.framing = Framing(*f.layout()) if f is not None else None
        self.on_pass_end: Callable[[], None] = lambda: None
        b = scenario.links.downlink.budget  # adaptive modulation: a MODCOD per slice
        self.replan_s = (b.modcod.replan_s if b is not None and b.modcod is not None
                         and scenario.orbits is not None else None)
        self._brought: set[str] = set()  # satellites that sent in the window they are in
        self.uplink: Uplink | None = None  # projected payloads: the bases (mission control's)

    def fly(self, sat_id: str, windows: Passes | Contacts, rate: RateFn, link: Link, bar: tqdm
            ) -> Generator[simpy.Event, Any, None]:
        """Transmit inside the satellite's windows until its queue is empty."""
        env, down = self.env, self.s.links.downlink
        passes = windows if isinstance(windows, Passes) else None
        rng = random.Random(f"{self.s.seed}-loss-{sat_id}")
        failures = 0
        stretch_s = 0.0  # replan_s: the next slice's length when a sample did not fit one
        inside: Window | None = None  # the window entered (its antenna held)
        held: Request | None = None
        self.hosts.active.add(sat_id)
        capture = capture_spec(self.s)
        try:
            while (w := windows.at(env.now)) is not None:
                if w != inside:  # a new window (passes make equal ones at every call)
                    self._release(inside, held)
                    self._left_window(sat_id)
                    inside, held, stretch_s = None, None, 0.0
                    if env.now < w.start_s:
                        yield env.timeout(w.start_s - env.now)
                    if w.station is not None:
                        if not self.hosts.host_back(sat_id):
                            if self.hosts.active - self.hosts.waiting - {sat_id}:
                                windows.leave()  # the others go on: try again next window
                                continue
                            if not self.hosts.wait_alone(sat_id):
                                return
                        self.hosts.waiting.discard(sat_id)
                        held = yield from self._antenna(w)
                        if held is None:  # every antenna stayed busy until the window closed
                            windows.leave()
                            continue
                    inside = w
                    if w.station is not None and env.now >= w.end_s:
                        continue  # an antenna came free as the window closed
                r, latency, mode = rate(w, env.now)
                # the budget leaves room for the expected resends of lost frames
                until = w.end_s if self.replan_s is None else min(
                    w.end_s, env.now + max(self.replan_s, stretch_s))
                room = (until - env.now - latency) * r / 8
                if self.framing is not None:  # the radio's framing and FEC ride on top
                    room *= self.framing.efficiency
                if passes is not None:  # whole bytes of the link, then the allowance
                    budget = int(max(0, int(room)) * (1 - down.loss))
                else:
                    budget = int(room * (1 - down.loss))
                    if budget <= 0 and self.replan_s is not None and until < w.end_s:
                        if r > 0:  # a slice shorter than the latency: a longer one
                            stretch_s = max(2 * stretch_s, latency + self.replan_s)
                        else:  # no MODCOD closes yet: the geometry may improve
                            yield env.timeout(until - env.now)
                        continue
                    if budget <= 0:
                        windows.leave()
                        continue
                if self.uplink is not None and self.uplink.needs(sat_id):
                    step = yield from self._basis(sat_id, w, latency, passes)
                    if step == "again":
                        continue
                    if step == "leave":
                        windows.leave()
                        continue
                asked = env.now  # the host makes the captures due by then
                try:
                    report = self.transmit(sat_id, budget)
                except HostDown as e:
                    log.warning("%s: %s; the other satellites go on", sat_id, e)
                    if self.uplink is not None:  # a host that comes back may have restarted
                        self.uplink.held.pop(sat_id, None)
                    if passes is not None:
                        back = yield from self.hosts.await_host(
                            sat_id, lambda: passes.next_start(env.now))
                        if not back:
                            return
                    else:
                        self.hosts.waiting.add(sat_id)
                        windows.leave()
                    continue
                sent = self._count(sat_id, report, bar)
                if sent:
                    stretch_s = 0.0
                up = self.uplink
                if up is not None and not report.error_code:
                    if up.basis is None and report.acked:  # plain tokens for a supervised fit
                        up.spent(sat_id, report.acked - report.duplicates - report.rejected)
                        up.fetch()  # fitted once the ground station holds enough
                    elif up.basis is not None and sat_id in up.held:
                        up.lost(sat_id, report.basis_version)  # a restarted host: again
                    if report.waiting_basis and up.needs(sat_id):
                        continue  # uplinked now, in what is left of the window
                yield from self._onboard(sat_id, report)
                transfers = [(self._on_air(size, rng), mine) for size, mine in _on_link(report)]
                sizes = [size for size, _ in transfers]
                # the satellite's transmitter is on for its batches' bits (energy), not for
                # the acks it receives
                self.tally.radio_tx_s += 8.0 * sum(size for size, mine in transfers if mine) / r
                if self.s.training.streaming and report.batch_bytes:
                    self._stamp(sat_id, report, sizes, r, latency)
                yield from self.charge(link, w.station, sizes, r, latency, mode)
                if report.error_code:
                    failures = self._check_failure(sat_id, report, failures + 1)
                    continue  # unacked samples stay queued: try again in what is left
                failures = 0
                if report.remaining == 0:
                    # the next capture, from the schedule (a host's word can only end it):
                    # the first one the host had not made when asked (maybe due already)
                    made = capture.captured_by(asked) if capture is not None else 0
                    if (capture is None or report.next_capture_s < 0
                            or made >= capture.max_captures):
                        # nothing on board, nothing more to capture: done
                        self._release(inside, held)
                        inside, held = None, None
                        self._left_window(sat_id)
                        if self.s.mission.horizon_h is not None:
                            self.tally.left_on_board[sat_id] = 0
                        return
                    nxt = capture.time_of(made)  # after `asked`: each call makes progress
                    if nxt < w.end_s:  # wait in the window for it
                        yield env.timeout(max(0.0, nxt - env.now))
                    elif passes is not None:
                        yield env.timeout(max(0.0, w.end_s - env.now))
                    else:
                        windows.leave()
                    continue
                if not sent and until < w.end_s:  # the next sample needs a longer slice
                    eff = self.framing.efficiency if self.framing is not None else 1.0
                    need = latency + 8.0 * report.next_bytes / (r * eff * (1 - down.loss))
                    stretch_s = max(2 * stretch_s, need, latency + (self.replan_s or 0.0))
                    continue
                if not sent:  # the next sample does not fit in what is left of this window
                    if passes is not None:
                        if report.next_bytes > link.capacity(passes.duration_s):
                            raise MissionError(
                                f"{sat_id}: a {report.next_bytes}-byte sample never fits a "
                                f"pass ({link.capacity(passes.duration_s)} bytes)")
                        yield env.timeout(w.end_s - env.now)
                    else:
                        windows.leave()
            self._release(inside, held)
            self._left_window(sat_id)
            inside, held = None, None
            if not self.hosts.host_back(sat_id):
                self.hosts.give_up(sat_id)
                return
            if capture is not None:  # what it captures until the horizon stays on board
                yield from self._at_horizon(sat_id, bar)
            remaining = self.hosts.remaining.get(sat_id, -1)
            if self.s.mission.horizon_h is not None:  # the mission ends: what is left stays
                left = remaining if remaining >= 0 else self.hosts.queued_at_start(sat_id)
                self.tally.left_on_board[sat_id] = left
                if left:
                    log.info("%s: %d samples left on board at the horizon (%g h)", sat_id,
                             left, self.s.mission.horizon_h)
                return
            raise MissionError(
                f"{sat_id}: {remaining if remaining >= 0 else 'all'} samples still queued "
                f"after its last contact window ({WINDOW_SEARCH_H:g} h searched): set "
                "mission.horizon_h to end the mission there with them on board, or raise the "
                "link rate or the number of stations")
        finally:
            self._release(inside, held)
            self.hosts.active.discard(sat_id)
            self.hosts.waiting.discard(sat_id)

    def _basis(self, sat_id: str, w: Window, latency: float, passes: Passes | None
               ) -> Generator[simpy.Event, Any, str]:
        """A satellite without the ground's current basis, in a window: uplink it when the
        ground has one ("again": the window's room is planned anew after it); without one,
        a supervised projection lets the satellite send its share of plain tokens ("send",
        at most that many), then it waits for the fit. "leave": the window cannot serve (the
        uplink does not fit in it, or the wait outlasted it)."""
        env, up = self.env, self.uplink
        assert up is not None
        if up.basis is None and not up.fetch():  # supervised, not fitted yet
            if up.share[sat_id] > 0 or up.more_share(sat_id, self.hosts.active):
                self.hosts.max_samples[sat_id] = up.share[sat_id]
                return "send"
            up.waited(sat_id, "fit")
            if passes is None:  # a contact window: its antenna goes to a satellite with share
                return "leave"
            if w.end_s > env.now:
                yield up.ready | env.timeout(w.end_s - env.now)
            return "again"  # fitted meanwhile, or the pass is over (Passes gives the next)
        propagation = max(0.0, latency - self.s.links.downlink.latency_s)
        seconds = up.seconds(propagation)
        if passes is not None and seconds > passes.duration_s:
            raise MissionError(f"{sat_id}: the uplink ({sum(up.sizes.values())} bytes, "
                               f"{seconds:.1f} s) never fits a {passes.duration_s:g}-s pass: "
                               "raise links.uplink.rate_bps or lower the projection's dim")
        if env.now + seconds > w.end_s:  # the uplink does not fit what is left of the window
            up.waited(sat_id, "window")
            if passes is not None:
                yield env.timeout(max(0.0, w.end_s - env.now))
                return "again"
            return "leave"
        yield env.timeout(seconds)
        self.hosts.uplink_next[sat_id] = up.charge(sat_id, seconds, w.station)
        self.hosts.max_samples.pop(sat_id, None)
        return "again"

    def _left_window(self, sat_id: str) -> None:
        """The satellite left a window: a pass that brought data down ends (per_pass)."""
        if sat_id in self._brought:
            self._brought.discard(sat_id)
            self.on_pass_end()

    def _at_horizon(self, sat_id: str, bar: tqdm) -> Generator[simpy.Event, Any, None]:
        """Captures over time: after its last window the satellite captures on until the
        horizon; a Transmit of no bytes then makes those captures and reports what is on
        board."""
        horizon = self.s.mission.horizon_s
        assert horizon is not None  # the schema asks for one with captures
        if self.env.now < horizon:
            yield self.env.timeout(horizon - self.env.now)
        try:
            self._count(sat_id, self.transmit(sat_id, 0), bar)
        except HostDown as e:
            log.warning("%s: %s at the horizon; its last report stands", sat_id, e)

    def _stamp(self, sat_id: str, report: pb.TransmitReport, sizes: list[int], rate: float,
               latency: float) -> None:
        """Streaming missions: tell the ground station when each batch of this Transmit
        finishes on the air (charge's timing: each size on the air takes one latency and its
        bits at `rate`, back to back from now), before the charge runs; an update at T uses
        only what arrived by T."""
        ends, at, k = [], self.env.now, 0
        for i, size in enumerate(sizes):
            at += latency + 8.0 * size / rate
            if i == k:  # a batch (each followed by its ack, while there are acks)
                ends.append(at)
                k += 2 if len(ends) <= len(report.ack_bytes) else 1
        ends = ends[: len(report.batch_bytes)]
        self.tally.arrived += self.gs.arrived(sat_id, self.hosts.transmit_ids[sat_id], ends)
        for end in ends:
            heapq.heappush(self.arrivals, end)
        self._brought.add(sat_id)

    def new_arrivals(self, now: float) -> int:
        """Batches that finished on the air by `now` since the last call (taken)."""
        n = 0
        while self.arrivals and self.arrivals[0] <= now:
            heapq.heappop(self.arrivals)
            n += 1
        return n

    def charge(self, link: Link, station: str | None, sizes: list[int], rate: float,
               latency: float, mode: str | None = None) -> Generator[simpy.Event, Any, None]:
        """The one place a satellite's transfers take link time: `sizes` on the air, each
        batch then its ack (the radio is half duplex). On a pass each is a transfer on the
        satellite's link (Link.transfer books it); in a contact window, where the rate is the
        one at the call's start, they hold the station's antenna together for one latency
        each plus their bits at that rate, booked on the link and the station (and on the
        MODCOD `mode` that rate came from, with adaptive modulation)."""
        if station is None:
            for size in sizes:
                yield self.env.process(link.transfer(size))
            return
        on_air = sum(sizes)
        if on_air:
            seconds = latency * len(sizes) + 8.0 * on_air / rate
            link.book(on_air, seconds)
            booked = self.tally.stations[station]
            booked["bytes"] += on_air
            booked["busy_s"] += seconds
            if mode is not None:
                m = self.tally.modcods.setdefault(
                    mode, {"seconds": 0.0, "bytes": 0, "transfers": 0})
                m["seconds"] += seconds
                m["bytes"] += on_air
                m["transfers"] += 1
            yield self.env.timeout(seconds)

    def _antenna(self, w: Window) -> Generator[simpy.Event, Any, Request | None]:
        """One of the window's station's antennas, queued for until the window closes (the
        wait tallied), or None."""
        assert w.station is not None
        env = self.env
        asked = env.now
        req = self.antennas[w.station].request()
        got = yield req | env.timeout(w.end_s - env.now)
        self.tally.stations[w.station]["queued_s"] += env.now - asked
        if req not in got:
            req.cancel()
            return None
        return req

    def _release(self, w: Window | None, held: Request | None) -> None:
        if w is not None and held is not None:
            assert w.station is not None
            self.antennas[w.station].release(held)

    def _on_air(self, delivered: int, rng: random.Random) -> int:
        """Bytes on the air to deliver `delivered` over the lossy downlink; resends tallied."""
        down = self.s.links.downlink
        if self.framing is not None:  # resent frames, then every frame's own overhead
            sent, on_air = self.framing.send(delivered, down.loss, rng)
            self.tally.retransmitted_bytes += sent - delivered
            self.tally.framing_bytes += on_air - sent
            return on_air
        on_air = retransmitted(delivered, down.loss, down.frame_bytes, rng)
        self.tally.retransmitted_bytes += on_air - delivered
        return on_air

    def _onboard(self, sat_id: str, report: pb.TransmitReport
                 ) -> Generator[simpy.Event, Any, None]:
        """On-board encoding (CLS payloads) runs back to back from the start of the mission:
        what this call sent cannot leave before the satellite has encoded it."""
        if not report.encode_flops:
            return
        c = self.tally.compute["onboard_encoder"]
        seconds = report.encode_flops / self.s.sensors.onboard_flops
        c["flops"] += report.encode_flops
        c["sim_s"] += seconds
        c["wall_s"] += report.encode_s
        ready = self._onboard_ready.get(sat_id, 0.0)
        if self.s.sensors.capture is not None:  # scenes captured over time: encoded no
            ready = max(ready, self.env.now)     # sooner than they are asked for
        ready += seconds
        self._onboard_ready[sat_id] = ready
        if ready > self.env.now:
            yield self.env.timeout(ready - self.env.now)

    def _count(self, sat_id: str, report: pb.TransmitReport, bar: tqdm) -> int:
        t = self.tally
        # image coding, tile choice and cloud detection: counted for their energy only
        t.coding_wall_s += report.code_s
        t.coded_pixels += report.coded_pixels
        t.onboard_other_flops += report.onboard_flops
        if not report.error_code:
            self.hosts.remaining[sat_id] = report.remaining
        t.cloudy_skipped += report.skipped
        bar.update(report.skipped)
        sent = sum(report.batch_bytes) + report.credential_bytes
        t.downlink_bytes += sent
        t.credential_bytes += report.credential_bytes
        t.uplink_bytes += sum(report.ack_bytes)
        t.downlink_messages += report.sent
        t.downlink_batches += len(report.batch_bytes)
        t.duplicates += report.duplicates
        t.rejected += report.rejected
        t.stored += report.acked - report.duplicates - report.rejected
        if report.encoder_precision and report.encoder_precision not in t.onboard_precision:
            t.onboard_precision.append(report.encoder_precision[:16])
        t.rejections += list(report.rejections)[: max(0, 16 - len(t.rejections))]
        bar.update(report.acked - report.duplicates)
        if self.s.sensors.capture is not None:
            c = t.captures.setdefault(sat_id, {"captured": 0, "dropped": 0, "sent": 0,
                                               "stored": 0, "onboard_bytes": 0})
            c["captured"] += report.captured
            c["dropped"] += report.dropped
            c["sent"] += report.sent
            c["stored"] += report.acked - report.duplicates - report.rejected
            c["onboard_bytes"] = int(report.onboard_bytes)
        return sent

    def _check_failure(self, sat_id: str, report: pb.TransmitReport, failures: int) -> int:
        """A Transmit whose stream to the ground station failed: the consecutive failures
        so far. A ground station that is not there (UNAVAILABLE: restarting) is waited for,
        gs_retry_s at most, and does not count toward MAX_DOWNLINK_FAILURES."""
        self.tally.downlink_failures += 1
        if report.error_code == grpc.StatusCode.UNAVAILABLE.value[0]:
            log.warning("%s: the sensor host could not reach the ground station (%s); waiting "
                        "for %s", sat_id, report.error, self.gs.address)
            self.gs.describe()  # retried while UNAVAILABLE, a MissionError after gs_retry_s
            time.sleep(self.d.host_poll_s)  # its channel to the ground station reconnects
            return 0
        if report.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0] \
                or failures > MAX_DOWNLINK_FAILURES:
            raise MissionError(f"{sat_id}: downlink failed: {report.error}")
        return failures


def _on_link(report: pb.TransmitReport) -> list[tuple[int, bool]]:
    """The sizes a Transmit put on the radio, in order: each batch, then its ack; the
    stream's call credentials go with its first batch. With each, whether the satellite
    sent it (a batch) or received it (an ack)."""
    sizes: list[tuple[int, bool]] = []
    for k, batch in enumerate(report.batch_bytes):
        sizes.append((batch + (report.credential_bytes if k == 0 else 0), True))
        if k < len(report.ack_bytes):
            sizes.append((report.ack_bytes[k], False))
    return sizes
