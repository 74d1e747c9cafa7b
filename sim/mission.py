"""Mission control: drives a deployed constellation through one scenario on a SimPy clock.

Every transfer is a real gRPC call; its measured size (ByteSize + 5 per message) is charged
on a SimPy link, which gives the mission time. Compute is on the clock too, from FLOP counts
and the scenario's throughputs (deterministic; the measured wall time is recorded beside it):
a satellite's on-board encoding (CLS payloads) runs from the start and a sample cannot leave
before it is encoded; the ground station's encoder stage runs after the downlink; each
training job's local steps run between its request and its reply. Phases: downlink (each
satellite sends inside its contact windows until its shard is delivered), encoding at the
ground station, then training epochs whose dataset uploads and rounds are charged on the
ground-trainer links.

After the downlink and after every epoch, the mission's state (clock, tallies, history) is
written to `state_file`; `resume=True` continues from it: the downlink is not repeated, and
training continues from the ground station's checkpoint (the ground station must have been
started with it).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import simpy
from tqdm import tqdm

from ground_station.serde import pb_to_epoch
from node.rpc import channel, wait_ready
from node.security import GROUND_STATION
from proto.sparsat.v1 import sparsat_pb2 as pb
from proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc
from sim import orbits, report
from sim.links import C_KM_S, Link, LinkBudget, PeriodicPasses, retransmitted
from sim.scenario import Scenario, ground_station_config

TRANSMIT_MAX_SAMPLES = 4096  # samples per Transmit call: bounds one call's stream
MAX_DOWNLINK_FAILURES = 5  # consecutive failed streams before a satellite gives up
REGISTER_TIMEOUT_S = 180.0

log = logging.getLogger("sparsat.mission")
T = TypeVar("T")


class MissionError(RuntimeError):
    pass


@dataclass(frozen=True)
class Deadlines:
    """How long mission control waits, in wall seconds. Every gRPC call it makes has a
    deadline, so a hung node cannot hang it; a node that does not answer is named."""

    call_s: float = 30.0  # control calls: ListNodes, Health, Describe, Stats
    register_s: float = REGISTER_TIMEOUT_S  # nodes must have registered within this
    node_ready_s: float = 60.0  # a registered node must answer Health within this
    # Transmit: the budget at no less than floor_bytes_s (on-board encoding included), + slack
    transmit_floor_bytes_s: float = 20_000.0
    transmit_slack_s: float = 60.0
    prepare_s: float = 7200.0  # the ground station's encoder stage, the whole store
    # TrainEpoch: each round may take the coordinator's round timeout, + evaluation
    epoch_slack_s: float = 600.0
    gs_retry_s: float = 120.0  # a ground station answering UNAVAILABLE is retried this long
    # a satellite whose sensor host is unreachable waits for it; once nothing else is left to
    # do and the host has been gone this long, the run ends with the satellite's shortfall
    host_return_s: float = 60.0
    host_poll_s: float = 1.0  # polling the registry for it meanwhile (while nothing else runs)

    def transmit_s(self, budget: int) -> float:
        return self.transmit_slack_s + budget / self.transmit_floor_bytes_s


class HostDown(Exception):
    """A sensor host did not answer a call (UNAVAILABLE, DEADLINE_EXCEEDED)."""


@dataclass
class Tally:
    downlink_bytes: int = 0
    downlink_messages: int = 0  # samples sent, retries included
    downlink_batches: int = 0
    rejected: int = 0  # samples the ground station refused
    rejections: list[str] = field(default_factory=list)  # the first few, "id: reason"
    duplicates: int = 0
    trainer_bytes: int = 0
    per_round_bytes: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    per_link: dict[str, int] = field(default_factory=dict)
    downlink_done_s: float = 0.0
    uplink_bytes: int = 0  # SampleAcks, ground station -> satellites
    downlink_failures: int = 0
    trainer_failures: list[dict[str, Any]] = field(default_factory=list)
    local_sgd_round_bytes: int = 0  # what a local-SGD round of the same model would move
    wall_time_s: float = 0.0  # of earlier, interrupted runs of this mission
    resumed: int = 0
    retransmitted_bytes: int = 0  # radio frames sent again after a loss
    stations: dict[str, dict[str, float]] = field(default_factory=dict)
    cloudy_skipped: int = 0  # scenes the satellites dropped: no usable token
    rows_trained: int = 0  # rows trained on, all epochs (each row once an epoch)
    distinct_trained: int = 0  # distinct stored rows trained on
    # compute: FLOPs, seconds on the mission clock, measured wall seconds
    compute: dict[str, dict[str, float]] = field(default_factory=lambda: {
        k: {"flops": 0, "sim_s": 0.0, "wall_s": 0.0}
        for k in ("onboard_encoder", "ground_encoder", "trainers")})
    node_bytes: dict[str, dict[str, Any]] = field(default_factory=dict)  # at the last save
    # measured wall seconds of each stage (contacts: finding the contact windows)
    stage_wall_s: dict[str, float] = field(default_factory=lambda: {
        k: 0.0 for k in ("contacts", "downlink", "prepare", "training")})
    # faults survived, each with the node, its address and the wall seconds recovery took
    faults: list[dict[str, Any]] = field(default_factory=list)
    # satellites whose sensor host never came back: satellite -> host, address, undelivered
    shortfall: dict[str, dict[str, Any]] = field(default_factory=dict)
    gs_retries: int = 0  # ground-station calls retried after UNAVAILABLE
    fingerprint: str = ""  # of the scenario, as the ground station runs it

    @property
    def total_bytes(self) -> int:
        return (self.downlink_bytes + self.uplink_bytes + self.retransmitted_bytes
                + self.trainer_bytes)


def wait_for_nodes(registry: pb_grpc.RegistryStub, satellites: list[str], trainers: int,
                   timeout_s: float = REGISTER_TIMEOUT_S,
                   alive: Callable[[], None] = lambda: None) -> list[pb.NodeInfo]:
    """Block until every satellite and `trainers` trainers have registered."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive()
        try:
            nodes = list(registry.ListNodes(pb.ListNodesRequest(), timeout=10).nodes)
        except grpc.RpcError as e:  # a ground station restarting: not yet
            if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            nodes = []
        hosted = {s for n in nodes if n.role == pb.SENSOR for s in n.satellite_ids}
        n_trainers = sum(n.role == pb.TRAINER for n in nodes)
        missing = [s for s in satellites if s not in hosted]
        if not missing and n_trainers >= trainers:
            return nodes
        if time.monotonic() > deadline:
            raise MissionError(f"nodes missing after {timeout_s:.0f} s: satellites {missing}, "
                               f"trainers {n_trainers}/{trainers}")
        time.sleep(0.2)


def _health(address: str, timeout_s: float, peer: str) -> pb.HealthReply:
    ch = channel(address, peer=peer)
    try:
        return pb_grpc.HealthStub(ch).Check(pb.HealthRequest(), timeout=timeout_s,
                                            wait_for_ready=True)
    finally:
        ch.close()


class MissionControl:
    def __init__(self, scenario: Scenario, ground_station: str, show_progress: bool = True,
                 alive: Callable[[], None] = lambda: None, state_file: Path | None = None,
                 resume: bool = False,
                 on_epoch: Callable[[dict[str, Any]], None] = lambda h: None,
                 deadlines: Deadlines = Deadlines()):
        self.s = scenario
        self.d = deadlines
        # sensor hosts: which hosts which satellite, a channel and stub per host (replaced
        # when a host comes back at another address), satellites still downlinking, those
        # waiting for their host, when each unreachable host was first missed (wall clock)
        self._host_of: dict[str, pb.NodeInfo] = {}
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[str, pb_grpc.SensorStub] = {}
        self._active: set[str] = set()
        self._waiting: set[str] = set()
        self._down_since: dict[str, float] = {}
        self._remaining: dict[str, int] = {}  # each satellite's queue, as last reported
        self._gs_instance = ""  # the ground-station process Prepare ran in
        self._rows_per_epoch = 0
        self._epoch = scenario.orbits.epoch if scenario.orbits else None
        self._sites: dict[str, orbits.Station] = {}
        self._budget: LinkBudget | None = None
        self.on_epoch = on_epoch  # called with each epoch's history entry, once it is saved
        self.alive = alive  # raises when a locally launched node has died
        self.ground_station = ground_station
        self.show_progress = show_progress
        self.state_file = state_file
        self.tally = Tally()
        self.epochs_done = 0
        self.saved_links: dict[str, int] = {}
        self._onboard_ready: dict[str, float] = {}  # satellite -> its encoder's backlog end
        now = 0.0
        if resume:
            now = self._load_state()
        self.resume = resume
        self.env = simpy.Environment(initial_time=now)
        self.gs_channel = channel(ground_station, peer=GROUND_STATION)
        self.mission = pb_grpc.MissionStub(self.gs_channel)
        self.registry = pb_grpc.RegistryStub(self.gs_channel)

    # ---- actors -----------------------------------------------------------------------------

    def satellite(self, sat_id: str, link: Link, passes: PeriodicPasses, bar: tqdm
                  ) -> Generator[simpy.Event, Any, None]:
        env, down = self.env, self.s.links.downlink
        rng = random.Random(f"{self.s.seed}-loss-{sat_id}")
        failures = 0
        self._active.add(sat_id)
        try:
            while True:
                start, end = passes.window_at(env.now)
                if env.now < start:
                    yield env.timeout(start - env.now)
                # the budget leaves room for the expected resends of lost frames
                budget = int(link.capacity(end - env.now) * (1 - down.loss))
                try:
                    report = self._transmit(sat_id, budget)
                except HostDown as e:
                    log.warning("%s: %s; the other satellites go on", sat_id, e)
                    back = yield from self._await_host(
                        sat_id, lambda: passes.window_at(passes.window_at(env.now)[1])[0])
                    if not back:
                        return
                    continue
                sent = self._count(sat_id, report, bar)
                yield from self._onboard(sat_id, report)
                # each batch, then its ack: the satellite's radio is half duplex
                for size in _on_link(report):
                    yield env.process(link.transfer(self._on_air(size, rng)))
                if report.error_code:
                    failures = self._check_failure(sat_id, report, failures + 1)
                    continue  # unacked samples stay queued: try again in what is left of the pass
                failures = 0
                if report.remaining == 0:
                    return
                if not sent:
                    if report.next_bytes > link.capacity(passes.duration_s):
                        raise MissionError(
                            f"{sat_id}: a {report.next_bytes}-byte sample never fits a pass "
                            f"({link.capacity(passes.duration_s)} bytes)")
                    yield env.timeout(end - env.now)  # the rest of this pass is too short
        finally:
            self._active.discard(sat_id)

    def satellite_in_orbit(self, sat: orbits.Satellite, radio: Link,
                           windows: list[orbits.Contact],
                           antennas: dict[str, simpy.Resource], bar: tqdm
                           ) -> Generator[simpy.Event, Any, None]:
        """Transmit only inside contact windows, on one of the station's antennas (queued
        when other satellites hold them), at the rate the range allows at each call. While
        its sensor host is unreachable, its windows go by unused."""
        env, t, down = self.env, self.tally, self.s.links.downlink
        rng = random.Random(f"{self.s.seed}-loss-{sat.name}")
        failures = 0
        self._active.add(sat.name)
        try:
            for c in windows:
                if env.now >= c.end_s:
                    continue
                if env.now < c.start_s:
                    yield env.timeout(c.start_s - env.now)
                if not self._host_back(sat.name):
                    if self._active - self._waiting - {sat.name}:
                        continue  # the others go on: try again at the next window
                    if not self._wait_alone(sat.name):
                        return
                self._waiting.discard(sat.name)
                station = t.stations[c.station]
                asked = env.now
                req = antennas[c.station].request()
                got = yield req | env.timeout(c.end_s - env.now)
                station["queued_s"] += env.now - asked
                if req not in got:  # every antenna stayed busy until the window closed
                    req.cancel()
                    continue
                try:
                    while env.now < c.end_s:
                        rate, latency = self._radio(sat, c.station, env.now)
                        # the budget leaves room for the expected resends of lost frames
                        budget = int((c.end_s - env.now - latency) * rate / 8 * (1 - down.loss))
                        if budget <= 0:
                            break
                        try:
                            report = self._transmit(sat.name, budget)
                        except HostDown as e:
                            log.warning("%s: %s; the other satellites go on", sat.name, e)
                            self._waiting.add(sat.name)
                            break
                        sent = self._count(sat.name, report, bar)
                        yield from self._onboard(sat.name, report)
                        # each batch, then its ack, each with the link's latency (half duplex)
                        sizes = [self._on_air(size, rng) for size in _on_link(report)]
                        on_air = sum(sizes)
                        if on_air:
                            seconds = latency * len(sizes) + 8.0 * on_air / rate
                            radio.bytes += on_air
                            radio.busy_s += seconds
                            station["bytes"] += on_air
                            station["busy_s"] += seconds
                            yield env.timeout(seconds)
                        if report.error_code:
                            failures = self._check_failure(sat.name, report, failures + 1)
                            continue
                        failures = 0
                        if report.remaining == 0:
                            return
                        if not sent:
                            break  # the next sample does not fit in what is left of this window
                finally:
                    antennas[c.station].release(req)
            if not self._host_back(sat.name):
                self._give_up(sat.name)
                return
            remaining = self._remaining.get(sat.name, -1)
            horizon = self.s.orbits.horizon_h if self.s.orbits else 0
            raise MissionError(
                f"{sat.name}: {remaining if remaining >= 0 else 'all'} samples still queued "
                f"after its last contact window ({horizon:g} h computed): raise "
                "orbits.horizon_h, the link rate or the number of stations")
        finally:
            self._active.discard(sat.name)
            self._waiting.discard(sat.name)

    # ---- sensor hosts: calls with deadlines, outages ------------------------------------------

    def use_sensors(self, host_of: dict[str, pb.NodeInfo], stubs: dict[str, Any]) -> None:
        """Which host holds each satellite, and a Sensor stub per host (by node id); the
        run sets them from the registry, in-process tests and benches with stand-ins."""
        self._host_of, self._stubs = dict(host_of), dict(stubs)

    def _transmit(self, sat_id: str, budget: int) -> pb.TransmitReport:
        """One Transmit, with a deadline sized from the budget; HostDown when the host does
        not answer (its first miss is remembered), MissionError on any other failure."""
        host = self._host_of[sat_id]
        timeout = self.d.transmit_s(budget)
        try:
            return self._stubs[host.node_id].Transmit(pb.TransmitRequest(
                satellite_id=sat_id, max_bytes=budget, max_samples=TRANSMIT_MAX_SAMPLES,
                batch_bytes=self.s.links.downlink.batch_size()), timeout=timeout)
        except grpc.RpcError as e:
            where = f"sensor host {host.node_id} at {host.address}"
            if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise MissionError(f"{sat_id}: Transmit to {where} failed: {e.code().name}: "
                                   f"{e.details()}") from e
            self._down_since.setdefault(host.node_id, time.monotonic())
            raise HostDown(f"{where} did not answer Transmit ({e.code().name} after at most "
                           f"{timeout:.0f} s: {e.details()})") from e

    def _await_host(self, sat_id: str, next_chance: Callable[[], float]
                    ) -> Generator[simpy.Event, Any, bool]:
        """Wait for `sat_id`'s sensor host to answer again: at each of the satellite's passes
        (mission clock) while other satellites still downlink; once nothing else runs, every
        host_poll_s wall seconds. True when it is back; False when it stayed gone (the
        satellite's shortfall is recorded)."""
        self._waiting.add(sat_id)
        try:
            while True:
                if self._active - self._waiting:
                    yield self.env.timeout(max(0.0, next_chance() - self.env.now))
                    if self._host_back(sat_id):
                        return True
                elif self._wait_alone(sat_id):
                    return True
                else:
                    return False
        finally:
            self._waiting.discard(sat_id)

    def _wait_alone(self, sat_id: str) -> bool:
        """Nothing else to do on the mission clock: poll the host in wall time until it is
        back, or until it has been gone host_return_s (then the shortfall is recorded)."""
        host = self._host_of[sat_id].node_id
        while not self._host_back(sat_id):
            if time.monotonic() - self._down_since[host] > self.d.host_return_s:
                self._give_up(sat_id)
                return False
            time.sleep(self.d.host_poll_s)
        return True

    def _host_back(self, sat_id: str) -> bool:
        """Whether `sat_id`'s host answers: its registered address (a restarted host registers
        again, maybe at another port) is probed with Health; a new address gets a new channel."""
        old = self._host_of[sat_id]
        if old.node_id not in self._down_since:
            return True
        try:
            nodes = self._list_nodes()
        except MissionError:
            return False
        new = next((n for n in nodes if n.node_id == old.node_id), old)
        ch = channel(new.address, peer=new.node_id)
        try:
            pb_grpc.HealthStub(ch).Check(pb.HealthRequest(), timeout=min(2.0, self.d.call_s))
        except grpc.RpcError:
            ch.close()
            return False
        self._channels.pop(old.node_id).close()
        self._channels[new.node_id] = ch
        self._stubs[new.node_id] = pb_grpc.SensorStub(ch)
        for sat, n in self._host_of.items():
            if n.node_id == new.node_id:
                self._host_of[sat] = new
        took = time.monotonic() - self._down_since.pop(old.node_id)
        log.warning("sensor host %s is back at %s after %.1f s (was %s)", new.node_id,
                    new.address, took, old.address)
        self.tally.faults.append({
            "fault": "sensor host unreachable", "node": new.node_id, "address": old.address,
            "new_address": new.address, "recovered": True, "recovery_wall_s": round(took, 2)})
        return True

    def _give_up(self, sat_id: str) -> None:
        host = self._host_of[sat_id]
        gone = time.monotonic() - self._down_since[host.node_id]
        undelivered = self._remaining.get(sat_id)
        if undelivered is None:
            undelivered = self._queued_at_start(sat_id)
        self.tally.shortfall[sat_id] = {"host": host.node_id, "address": host.address,
                                        "undelivered": undelivered,
                                        "gone_wall_s": round(gone, 2)}
        log.warning("%s: sensor host %s at %s has not come back in %.0f s: %d samples of %s "
                    "not delivered; training goes on with what arrived", sat_id, host.node_id,
                    host.address, gone, undelivered, sat_id)

    def _queued_at_start(self, sat_id: str) -> int:
        """A satellite's queue before it sent anything: its shard, once per masked copy."""
        from node.datasets import split_size
        from node.sharding import shard, train_subset
        from sim.scenario import sensor_config

        sats = self.s.sensors.ids()
        n_train = split_size(sensor_config(self.s).dataset, "train")
        subset = train_subset(n_train, self.s.dataset.train_subset, self.s.seed)
        copies = self.s.training.epochs if self.s.sensors.mask.kind == "random" else 1
        return len(shard(subset, sats.index(sat_id), len(sats))) * copies

    def _radio(self, sat: orbits.Satellite, station: str, now: float) -> tuple[float, float]:
        """(rate bit/s, latency s) from the slant range at `now`."""
        down = self.s.links.downlink
        assert self._epoch is not None
        pos = orbits.ecef_positions_km([sat], self._epoch, np.array([now]))[0]
        rng_km = float(orbits.slant_range_km(pos, self._sites[station])[0])
        rate = self._budget.rate_bps(rng_km) if self._budget is not None else down.rate_bps
        return rate, rng_km / C_KM_S + down.latency_s

    def _on_air(self, delivered: int, rng: random.Random) -> int:
        """Bytes on the air to deliver `delivered` over the lossy downlink; resends tallied."""
        down = self.s.links.downlink
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
        ready = self._onboard_ready.get(sat_id, 0.0) + seconds
        self._onboard_ready[sat_id] = ready
        if ready > self.env.now:
            yield self.env.timeout(ready - self.env.now)

    def _count(self, sat_id: str, report: pb.TransmitReport, bar: tqdm) -> int:
        t = self.tally
        if not report.error_code:
            self._remaining[sat_id] = report.remaining
        t.cloudy_skipped += report.skipped
        bar.update(report.skipped)
        sent = sum(report.batch_bytes)
        t.downlink_bytes += sent
        t.uplink_bytes += sum(report.ack_bytes)
        t.downlink_messages += report.sent
        t.downlink_batches += len(report.batch_bytes)
        t.duplicates += report.duplicates
        t.rejected += report.rejected
        t.rejections += list(report.rejections)[: max(0, 16 - len(t.rejections))]
        bar.update(report.acked - report.duplicates)
        return sent

    def _check_failure(self, sat_id: str, report: pb.TransmitReport, failures: int) -> int:
        """A Transmit whose stream to the ground station failed: the consecutive failures
        so far. A ground station that is not there (UNAVAILABLE: restarting) is waited for,
        gs_retry_s at most, and does not count toward MAX_DOWNLINK_FAILURES."""
        self.tally.downlink_failures += 1
        if report.error_code == grpc.StatusCode.UNAVAILABLE.value[0]:
            log.warning("%s: the sensor host could not reach the ground station (%s); waiting "
                        "for %s", sat_id, report.error, self.ground_station)
            self._describe()  # retried while UNAVAILABLE, a MissionError after gs_retry_s
            time.sleep(self.d.host_poll_s)  # its channel to the ground station reconnects
            return 0
        if report.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0] \
                or failures > MAX_DOWNLINK_FAILURES:
            raise MissionError(f"{sat_id}: downlink failed: {report.error}")
        return failures

    def training(self, downlink_done: simpy.Event, links: dict[str, Link], bar: tqdm
                 ) -> Generator[simpy.Event, Any, None]:
        tl = self.s.links.trainer

        def link(node_id: str) -> Link:  # trainers the coordinator actually used
            if node_id not in links:
                links[node_id] = Link(self.env, f"trainer:{node_id}", tl.rate_bps, tl.latency_s)
                links[node_id].bytes = self.saved_links.get(links[node_id].name, 0)
            return links[node_id]

        yield downlink_done
        bar.close()
        stage = self.tally.stage_wall_s
        if not self.resume:
            self.tally.downlink_done_s = self.env.now
            stage["downlink"] += time.monotonic() - self._downlink_wall0
            self.save_state(links)
            self._check_delivered()
        t0 = time.monotonic()
        flops, wall_s = self._ensure_prepared() or (0, 0.0)
        stage["prepare"] += time.monotonic() - t0
        if not self.resume or not self.tally.compute["ground_encoder"]["flops"]:
            c = self.tally.compute["ground_encoder"]
            c.update(flops=flops, sim_s=flops / self.s.training.ground_flops, wall_s=wall_s)
            yield self.env.timeout(c["sim_s"])  # the encoder stage, before training starts
        epochs = range(self.epochs_done + 1, self.s.training.epochs + 1)
        for epoch in tqdm(epochs, desc="training", unit="epoch", disable=not self.show_progress):
            t0 = time.monotonic()
            report = pb_to_epoch(self._train_epoch(epoch))
            self.tally.local_sgd_round_bytes = report.local_sgd_round_bytes
            # dataset uploads, then rounds: workers in parallel, each on its own link
            stages = [report.dataset_bytes] if report.dataset_bytes else []
            stages += report.rounds
            for i, workers in enumerate(stages):
                transfers = []
                began = self.env.now
                for w in workers:
                    self.tally.trainer_bytes += w.sent + w.received
                    # down, compute, then up on the same link: the reply waits for the request
                    transfers.append(self.env.process(self._round_trip(link(w.node_id), w)))
                yield self.env.all_of(transfers)
                if i >= len(stages) - len(report.rounds):
                    r = i - (len(stages) - len(report.rounds))
                    self.tally.per_round_bytes.append({
                        "epoch": epoch, "round": r,
                        "workers": {w.node_id: {"sent": w.sent, "received": w.received,
                                                "rows": w.rows, "flops": w.flops,
                                                **({"error": w.error} if w.error else {})}
                                    for w in workers},
                        "sim_s": self.env.now - began,  # transfers and compute, mission clock
                        "wall_s": max((w.wall_s for w in workers), default=0.0),  # measured
                    })
                    self.tally.trainer_failures += [
                        {"epoch": epoch, "round": r, "node_id": w.node_id, "error": w.error}
                        for w in workers if w.error]
            self.tally.rows_trained += report.samples_trained
            self.tally.distinct_trained = report.distinct_trained
            self.tally.history.append({
                "epoch": epoch,
                "accuracy": report.accuracy,
                **{f"accuracy_{g}": a for g, a in sorted(report.group_accuracy.items())},
                "test_loss": report.test_loss,
                "train_loss": report.train_loss,
                "bytes_total": self.tally.total_bytes,
                "sim_time_s": self.env.now,
            })
            self.epochs_done = epoch
            stage["training"] += time.monotonic() - t0
            self.save_state(links)
            self.on_epoch(self.tally.history[-1])

    def _check_delivered(self) -> None:
        """A downlink that sent nothing: every queue was empty before this mission control
        started (a deployment driven twice), which is an error, not a run of 0 bytes."""
        if self.tally.downlink_messages or self.tally.cloudy_skipped or self.tally.shortfall:
            return
        stored = self._gs("Stats", lambda: self.mission.Stats(
            pb.StatsRequest(), timeout=self.d.call_s)).samples_stored
        raise MissionError(
            f"every satellite's queue was already empty: the sensor hosts had sent their "
            f"samples before ({stored} stored at the ground station {self.ground_station}); "
            "continue that mission with `sparsat run --resume DIR`, or restart the sensor "
            "hosts and the ground station with an empty store for a new one")

    # ---- the ground station: deadlines, retries, restarts ----------------------------------

    def _gs(self, what: str, call: Callable[[], T]) -> T:
        """A call to the ground station, retried with backoff while the ground station does
        not answer (UNAVAILABLE: restarting), for gs_retry_s at most; each retry is logged.
        An UNAVAILABLE the ground station answers itself (no trainer left) is not retried."""
        t0 = time.monotonic()
        delay, retries = 0.5, 0
        while True:
            try:
                out = call()
                break
            except grpc.RpcError as e:
                code = e.code()
                waited = time.monotonic() - t0
                if (code != grpc.StatusCode.UNAVAILABLE or waited + delay > self.d.gs_retry_s
                        or self._gs_answers()):
                    raise MissionError(
                        f"ground station {self.ground_station}: {what} failed: {code.name}: "
                        f"{e.details()}" + (f" (retried for {waited:.0f} s)" if retries else "")
                    ) from e
                retries += 1
                self.tally.gs_retries += 1
                log.warning("ground station %s: %s UNAVAILABLE (%s); retry %d in %.1f s",
                            self.ground_station, what, e.details(), retries, delay)
                time.sleep(delay)
                delay = min(2 * delay, 5.0)
        if retries:
            took = time.monotonic() - t0
            log.warning("ground station %s answers %s again after %.1f s", self.ground_station,
                        what, took)
            self.tally.faults.append({
                "fault": "ground station unavailable", "node": GROUND_STATION,
                "address": self.ground_station, "call": what, "retries": retries,
                "recovered": True, "recovery_wall_s": round(took, 2)})
        return out

    def _gs_answers(self) -> bool:
        """Whether the ground station process answers at all (a quick Health call)."""
        try:
            pb_grpc.HealthStub(self.gs_channel).Check(pb.HealthRequest(), timeout=2.0)
            return True
        except grpc.RpcError:
            return False

    def _describe(self) -> pb.MissionInfo:
        return self._gs("Describe", lambda: self.mission.Describe(
            pb.DescribeRequest(), timeout=self.d.call_s))

    def _list_nodes(self) -> list[pb.NodeInfo]:
        return list(self._gs("ListNodes", lambda: self.registry.ListNodes(
            pb.ListNodesRequest(), timeout=self.d.call_s)).nodes)

    def _check_scenario(self) -> None:
        """The ground station must run this scenario: the keys it uses are compared with
        this scenario's, and a difference is an error naming each key (keys that are a
        deployment's own, such as paths and devices, are left out by the ground station)."""
        info = self._describe()
        theirs = json.loads(info.config_json)
        mine = flatten(json.loads(json.dumps(
            asdict(ground_station_config(self.s, Path("."))), default=str)))
        diffs = [f"{k}: {json.dumps(mine[k]) if k in mine else 'absent'} here, "
                 f"{json.dumps(v)} at the ground station"
                 for k, v in sorted(theirs.items()) if mine.get(k, _ABSENT) != v]
        if diffs:
            raise MissionError(
                f"this scenario is not the one the ground station {self.ground_station} runs "
                f"(fingerprint {info.fingerprint}): " + "; ".join(diffs))
        self.tally.fingerprint = info.fingerprint

    def _ensure_prepared(self) -> tuple[int, float] | None:
        """Run Prepare unless this ground-station process has: the first time, and again
        after a restart lost it (then the trainers must have registered again first).
        (FLOPs, wall s) of the encoder stage when it ran. Training that had begun must
        continue from the ground station's checkpoint, not start again."""
        info = self._describe()
        if info.prepared and info.instance == self._gs_instance:
            return None
        t0, restarted = time.monotonic(), bool(self._gs_instance)
        if restarted and info.instance != self._gs_instance:
            log.warning("ground station %s restarted (Prepare state lost): waiting for %d "
                        "trainers to register again, then preparing again",
                        self.ground_station, self.s.training.num_workers)
            wait_for_nodes(self.registry, [], self.s.training.num_workers, self.d.register_s,
                           alive=self.alive)
        if not info.prepared:
            out: tuple[int, float] | None = self._prepare()
        else:
            out = None
        info = self._describe()
        self._gs_instance = info.instance
        if restarted:
            self.tally.faults.append({
                "fault": "ground station restarted", "node": GROUND_STATION,
                "address": self.ground_station, "epochs_done": self.epochs_done,
                "recovered": True, "recovery_wall_s": round(time.monotonic() - t0, 2)})
        copies = self.s.training.epochs if self.s.sensors.mask.kind == "random" else 1
        self._rows_per_epoch = int(self._gs("Stats", lambda: self.mission.Stats(
            pb.StatsRequest(), timeout=self.d.call_s)).train_tokens) // copies
        if self.epochs_done and not info.rounds_done:
            raise MissionError(
                f"the ground station {self.ground_station} has no training state: "
                f"{self.epochs_done} epochs were done, but it did not resume from a checkpoint "
                "(start it with --resume and the run's --checkpoint-dir); training would "
                "start again from scratch")
        return out

    def _train_epoch(self, epoch: int) -> pb.EpochReport:
        """TrainEpoch with a deadline (each round within the coordinator's round timeout);
        a ground station that restarted meanwhile is prepared again and asked again."""
        t = self.s.training
        rows = max(1, self._rows_per_epoch)
        rounds = -(-rows // (t.num_workers * t.local_steps * t.batch_size)) + 1
        timeout = rounds * t.round_timeout_s + self.d.epoch_slack_s
        failed: dict[str, Any] | None = None  # the fault being recovered from
        while True:
            self._ensure_prepared()
            if failed is not None:  # prepared again: the epoch goes on
                failed["recovery_wall_s"] = round(time.monotonic() - failed.pop("at"), 2)
                failed = None
            try:
                report: pb.EpochReport = self.mission.TrainEpoch(
                    pb.TrainEpochRequest(epoch=epoch), timeout=timeout)
            except grpc.RpcError as e:
                if self._describe().instance == self._gs_instance:
                    raise MissionError(
                        f"ground station {self.ground_station}: TrainEpoch {epoch} failed: "
                        f"{e.code().name}: {e.details()}") from e
                log.warning("ground station %s restarted during epoch %d (%s): preparing "
                            "again and continuing from its checkpoint", self.ground_station,
                            epoch, e.code().name)
                failed = {"fault": "ground station restarted", "node": GROUND_STATION,
                          "address": self.ground_station, "epoch": epoch, "recovered": True,
                          "at": time.monotonic()}
                self.tally.faults.append(failed)
                continue
            return report

    # ---- state for --resume -------------------------------------------------------------------

    def save_state(self, links: dict[str, Link]) -> None:
        if self.state_file is None:
            return
        self.tally.node_bytes = self._node_bytes()[0]
        state = {"sim_time_s": self.env.now, "epochs_done": self.epochs_done,
                 "tally": asdict(self.tally),
                 "per_link": self._per_link([*self._downlinks.values(), *links.values()]),
                 "wall_time_s": self.tally.wall_time_s + time.monotonic() - self._wall0}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.state_file)

    def _node_bytes(self) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """Each node's own count of what it sent and received, over the whole mission: a node
        that restarted since the last save (another process instance) counts from zero again,
        so its earlier count is added; one that did not already includes it."""
        out: dict[str, dict[str, Any]] = {}
        unreachable = []
        for n in self._list_nodes():
            try:
                h = _health(n.address, min(5.0, self.d.call_s), n.node_id)
            except grpc.RpcError:
                unreachable.append(n.node_id)
                continue
            entry = {"sent": int(h.bytes_sent), "received": int(h.bytes_received),
                     "base_sent": 0, "base_received": 0, "instance": h.instance}
            old = self.tally.node_bytes.get(n.node_id)
            if old is not None:
                restarted = old["instance"] != h.instance
                for k in ("sent", "received"):
                    entry[f"base_{k}"] = old[f"base_{k}"] + (old[k] if restarted else 0)
            out[n.node_id] = entry
        for node_id, old in self.tally.node_bytes.items():  # gone since: keep what it had
            out.setdefault(node_id, old)
        return out, unreachable

    def _per_link(self, links: list[Link]) -> dict[str, int]:
        """Bytes per link: links of earlier, interrupted runs, updated by this run's."""
        return {**self.saved_links, **{link.name: link.bytes for link in links}}

    def _load_state(self) -> float:
        if self.state_file is None or not self.state_file.exists():
            raise MissionError("nothing to resume: the mission had not finished its downlink "
                               "(no mission_state.json); run it again from the start")
        state = json.loads(self.state_file.read_text())
        self.tally = Tally(**state["tally"])
        self.tally.wall_time_s = state["wall_time_s"]
        self.tally.resumed += 1
        self.epochs_done = int(state["epochs_done"])
        self.saved_links = dict(state["per_link"])
        return float(state["sim_time_s"])

    def _orbital_processes(self, dlinks: dict[str, Link], bar: tqdm) -> list[simpy.Process]:
        s, o = self.s, self.s.orbits
        assert o is not None
        sats = orbits.constellation(s)
        sites = orbits.stations(s)
        self._sites = {st.name: st for st in sites}
        b = s.links.downlink.budget
        self._budget = (LinkBudget(b.frequency_hz, b.eirp_dbw, b.gt_dbk, b.bandwidth_hz,
                                   s.links.downlink.rate_bps, b.losses_db) if b else None)
        t0 = time.monotonic()
        windows = orbits.contact_windows(sats, sites, o.epoch, o.horizon_h * 3600.0, o.step_s,
                                         o.tolerance_s)
        self.tally.stage_wall_s["contacts"] += time.monotonic() - t0
        antennas = {st.name: simpy.Resource(self.env, capacity=st.antennas)
                    for st in o.stations}
        for st in o.stations:
            self.tally.stations[st.name] = {
                "antennas": st.antennas, "bytes": 0, "busy_s": 0.0, "queued_s": 0.0,
                "contact_s": sum(c.duration_s for c in windows if c.station == st.name)}
        per_sat: dict[str, list[orbits.Contact]] = {sat.name: [] for sat in sats}
        for c in windows:
            per_sat[c.satellite].append(c)
        return [self.env.process(self.satellite_in_orbit(
            sat, dlinks[sat.name], per_sat[sat.name], antennas, bar)) for sat in sats]

    def _round_trip(self, link: Link, w: Any) -> Generator[simpy.Event, Any, None]:
        yield self.env.process(link.transfer(w.sent))
        c = self.tally.compute["trainers"]
        c["wall_s"] += w.wall_s
        if w.flops:
            seconds = w.flops / self.s.training.trainer_flops
            c["flops"] += w.flops
            c["sim_s"] += seconds
            yield self.env.timeout(seconds)
        yield self.env.process(link.transfer(w.received))

    def _prepare(self) -> tuple[int, float]:
        """Run the ground station's encoder stage; (FLOPs, wall s) of encoding the samples.
        Retried from the start while the ground station does not answer."""
        return self._gs("Prepare", self._prepare_once)

    def _prepare_once(self) -> tuple[int, float]:
        bars: dict[str, tqdm] = {}
        flops, wall_s = 0, 0.0
        for update in self.mission.Prepare(pb.PrepareRequest(), timeout=self.d.prepare_s):
            if update.stage == "encode train" and update.flops:
                flops, wall_s = int(update.flops), float(update.wall_s)
            bar = bars.get(update.stage)
            if bar is None:
                bar = bars[update.stage] = tqdm(total=update.total, desc=update.stage,
                                                unit="img", disable=not self.show_progress)
            bar.update(update.done - bar.n)
        for bar in bars.values():
            bar.close()
        return flops, wall_s

    # ---- the run ------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        try:
            return self._run()
        except grpc.RpcError as e:
            raise MissionError(f"{e.code().name}: {e.details()}") from e
        except grpc.FutureTimeoutError as e:
            raise MissionError(f"ground station {self.ground_station} not reachable in 60 s"
                               ) from e
        finally:
            self.gs_channel.close()

    def _run(self) -> dict[str, Any]:
        s = self.s
        self._wall0 = wall0 = time.monotonic()
        wait_ready(self.gs_channel, 60)
        self._check_scenario()
        satellites = s.sensors.ids()
        # resuming, the downlink is done: only the trainers are needed
        nodes = wait_for_nodes(self.registry, [] if self.resume else satellites,
                               s.training.num_workers, self.d.register_s, alive=self.alive)
        for n in nodes:  # registered is not yet serving: sensors register, then load data
            self._wait_serving(n)
        host_of = {sat: n for n in nodes if n.role == pb.SENSOR for sat in n.satellite_ids}
        self._channels = {n.node_id: channel(n.address, peer=n.node_id)
                          for n in host_of.values()}
        self.use_sensors(host_of, {node_id: pb_grpc.SensorStub(ch)
                                   for node_id, ch in self._channels.items()})
        down = s.links.downlink
        dlinks = {sat: Link(self.env, f"downlink:{sat}", down.rate_bps, down.latency_s)
                  for sat in satellites}
        self._downlinks = dlinks
        for link in dlinks.values():
            link.bytes = self.saved_links.get(link.name, 0)
        tlinks: dict[str, Link] = {}
        copies = s.training.epochs if s.sensors.mask.kind == "random" else 1
        bar = tqdm(total=s.dataset.train_subset and s.dataset.train_subset * copies,
                   desc="downlink", unit="sample", disable=not self.show_progress)
        p = s.passes
        sats = []
        if s.orbits is not None and not self.resume:
            sats = self._orbital_processes(dlinks, bar)
        for i, sat in enumerate(satellites if not (self.resume or s.orbits) else []):
            offset = p.offset_s if p.offset_s is not None else i * p.period_s / len(satellites)
            passes = PeriodicPasses(p.period_s, p.duration_s, offset)
            sats.append(self.env.process(self.satellite(sat, dlinks[sat], passes, bar)))
        self._downlink_wall0 = time.monotonic()
        try:
            trainer = self.env.process(self.training(self.env.all_of(sats), tlinks, bar))
            self.env.run(until=trainer)
            # each node's own count of what it sent and received: a second measurement
            # (nodes as registered now: a trainer may have restarted elsewhere)
            counted, unreachable = self._node_bytes()
            listed = self._list_nodes()
        finally:
            bar.close()
            for ch in self._channels.values():
                ch.close()
        stats = self._gs("Stats", lambda: self.mission.Stats(pb.StatsRequest(),
                                                             timeout=self.d.call_s))
        links = [*dlinks.values(), *tlinks.values()]
        self.tally.per_link = self._per_link(links)
        if self.tally.shortfall:
            lost = sum(v["undelivered"] for v in self.tally.shortfall.values())
            log.warning("%d samples of %s were not delivered (their sensor hosts did not come "
                        "back): trained on what arrived", lost, sorted(self.tally.shortfall))
        return report.assemble(report.Outcome(
            scenario=s, tally=self.tally, sim_time_s=self.env.now,
            wall_time_s=self.tally.wall_time_s + time.monotonic() - wall0,
            links=links, stats=stats, node_bytes=counted,
            unreachable=unreachable, nodes=listed))

    def _wait_serving(self, n: pb.NodeInfo) -> None:
        """A registered node must answer Health within node_ready_s: one that does not (a
        dead process, an address that does not route) is named with its address."""
        deadline = time.monotonic() + self.d.node_ready_s
        while True:
            self.alive()
            try:
                _health(n.address, 2, n.node_id)
                return
            except grpc.RpcError as e:
                if time.monotonic() > deadline:
                    raise MissionError(
                        f"{n.node_id} at {n.address} (as it registered) did not answer in "
                        f"{self.d.node_ready_s:.0f} s: {e.code().name}: {e.details()}; is the "
                        "address reachable from here (a node behind NAT or bound to 0.0.0.0 "
                        "must advertise a routable one: --advertise)?") from e


_ABSENT = object()


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: keys as the ground station's Describe names them."""
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        flat.update(flatten(v, key) if isinstance(v, dict) else {key: v})
    return flat


def _on_link(report: pb.TransmitReport) -> list[int]:
    """The sizes a Transmit put on the radio, in order: each batch, then its ack."""
    sizes: list[int] = []
    for k, batch in enumerate(report.batch_bytes):
        sizes.append(batch)
        if k < len(report.ack_bytes):
            sizes.append(report.ack_bytes[k])
    return sizes
