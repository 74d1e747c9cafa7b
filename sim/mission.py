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
import random
import time
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import simpy
from tqdm import tqdm

from ground_station.serde import pb_to_epoch
from node.rpc import channel, wait_ready
from node.security import GROUND_STATION
from proto.sparsat.v1 import sparsat_pb2 as pb
from proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc
from sim import orbits
from sim.links import C_KM_S, Link, LinkBudget, PeriodicPasses, retransmitted
from sim.scenario import Scenario

TRANSMIT_MAX_SAMPLES = 4096  # samples per Transmit call: bounds one call's stream
MAX_DOWNLINK_FAILURES = 5  # consecutive failed streams before a satellite gives up
REGISTER_TIMEOUT_S = 180.0


class MissionError(RuntimeError):
    pass


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
        nodes = list(registry.ListNodes(pb.ListNodesRequest(), timeout=10).nodes)
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
                 on_epoch: Callable[[dict[str, Any]], None] = lambda h: None):
        self.s = scenario
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

    def satellite(self, sat_id: str, sensor: pb_grpc.SensorStub, link: Link,
                  passes: PeriodicPasses, bar: tqdm) -> Generator[simpy.Event, Any, None]:
        env, down = self.env, self.s.links.downlink
        rng = random.Random(f"{self.s.seed}-loss-{sat_id}")
        failures = 0
        while True:
            start, end = passes.window_at(env.now)
            if env.now < start:
                yield env.timeout(start - env.now)
            # the budget leaves room for the expected resends of lost frames
            budget = int(link.capacity(end - env.now) * (1 - down.loss))
            report = sensor.Transmit(pb.TransmitRequest(
                satellite_id=sat_id, max_bytes=budget, max_samples=TRANSMIT_MAX_SAMPLES,
                batch_bytes=down.batch_size()))
            sent = self._count(report, bar)
            yield from self._onboard(sat_id, report)
            # each batch, then its ack: the satellite's radio is half duplex
            for size in _on_link(report):
                yield env.process(link.transfer(self._on_air(size, rng)))
            if report.error_code:
                failures += 1
                self._check_failure(sat_id, report, failures)
                continue  # unacked samples stay queued: try again in what is left of the pass
            failures = 0
            if report.remaining == 0:
                return
            if not sent:
                if report.next_bytes > link.capacity(passes.duration_s):
                    raise MissionError(f"{sat_id}: a {report.next_bytes}-byte sample never fits "
                                       f"a pass ({link.capacity(passes.duration_s)} bytes)")
                yield env.timeout(end - env.now)  # the rest of this pass is too short

    def satellite_in_orbit(self, sat: orbits.Satellite, sensor: pb_grpc.SensorStub,
                           radio: Link, windows: list[orbits.Contact],
                           antennas: dict[str, simpy.Resource], bar: tqdm
                           ) -> Generator[simpy.Event, Any, None]:
        """Transmit only inside contact windows, on one of the station's antennas (queued
        when other satellites hold them), at the rate the range allows at each call."""
        env, t, down = self.env, self.tally, self.s.links.downlink
        rng = random.Random(f"{self.s.seed}-loss-{sat.name}")
        failures, remaining = 0, -1
        for c in windows:
            if env.now >= c.end_s:
                continue
            if env.now < c.start_s:
                yield env.timeout(c.start_s - env.now)
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
                    report = sensor.Transmit(pb.TransmitRequest(
                        satellite_id=sat.name, max_bytes=budget,
                        max_samples=TRANSMIT_MAX_SAMPLES, batch_bytes=down.batch_size()))
                    sent = self._count(report, bar)
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
                        failures += 1
                        self._check_failure(sat.name, report, failures)
                        continue
                    failures, remaining = 0, report.remaining
                    if remaining == 0:
                        return
                    if not sent:
                        break  # the next sample does not fit in what is left of this window
            finally:
                antennas[c.station].release(req)
        raise MissionError(
            f"{sat.name}: {remaining if remaining >= 0 else 'all'} samples still queued after "
            f"its last contact window ({self.s.orbits.horizon_h if self.s.orbits else 0:g} h "
            "computed): raise orbits.horizon_h, the link rate or the number of stations")

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

    def _count(self, report: pb.TransmitReport, bar: tqdm) -> int:
        t = self.tally
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

    def _check_failure(self, sat_id: str, report: pb.TransmitReport, failures: int) -> None:
        code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
        if report.error_code == code or failures > MAX_DOWNLINK_FAILURES:
            raise MissionError(f"{sat_id}: downlink failed: {report.error}")
        self.tally.downlink_failures += 1

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
        t0 = time.monotonic()
        flops, wall_s = self._prepare()
        stage["prepare"] += time.monotonic() - t0
        if not self.resume or not self.tally.compute["ground_encoder"]["flops"]:
            c = self.tally.compute["ground_encoder"]
            c.update(flops=flops, sim_s=flops / self.s.training.ground_flops, wall_s=wall_s)
            yield self.env.timeout(c["sim_s"])  # the encoder stage, before training starts
        epochs = range(self.epochs_done + 1, self.s.training.epochs + 1)
        for epoch in tqdm(epochs, desc="training", unit="epoch", disable=not self.show_progress):
            t0 = time.monotonic()
            report = pb_to_epoch(self.mission.TrainEpoch(pb.TrainEpochRequest(epoch=epoch)))
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
        for n in self.registry.ListNodes(pb.ListNodesRequest(), timeout=10).nodes:
            try:
                h = _health(n.address, 10, n.node_id)
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

    def _orbital_processes(self, stubs: dict[str, pb_grpc.SensorStub],
                           host_of: dict[str, pb.NodeInfo], dlinks: dict[str, Link],
                           bar: tqdm) -> list[simpy.Process]:
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
            sat, stubs[host_of[sat.name].node_id], dlinks[sat.name], per_sat[sat.name],
            antennas, bar)) for sat in sats]

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
        """Run the ground station's encoder stage; (FLOPs, wall s) of encoding the samples."""
        bars: dict[str, tqdm] = {}
        flops, wall_s = 0, 0.0
        for update in self.mission.Prepare(pb.PrepareRequest()):
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
            raise MissionError(f"ground station {self.ground_station} not reachable") from e
        finally:
            self.gs_channel.close()

    def _run(self) -> dict[str, Any]:
        s = self.s
        self._wall0 = wall0 = time.monotonic()
        wait_ready(self.gs_channel, 60)
        satellites = s.sensors.ids()
        nodes = wait_for_nodes(self.registry, satellites, s.training.num_workers,
                               alive=self.alive)
        for n in nodes:  # registered is not yet serving: sensors register, then load data
            deadline = time.monotonic() + 120
            while True:
                self.alive()
                try:
                    _health(n.address, 2, n.node_id)
                    break
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise

        host_of = {sat: n for n in nodes if n.role == pb.SENSOR for sat in n.satellite_ids}
        channels = {n.node_id: channel(n.address, peer=n.node_id) for n in host_of.values()}
        stubs = {node_id: pb_grpc.SensorStub(ch) for node_id, ch in channels.items()}
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
            sats = self._orbital_processes(stubs, host_of, dlinks, bar)
        for i, sat in enumerate(satellites if not (self.resume or s.orbits) else []):
            offset = p.offset_s if p.offset_s is not None else i * p.period_s / len(satellites)
            passes = PeriodicPasses(p.period_s, p.duration_s, offset)
            sats.append(self.env.process(self.satellite(
                sat, stubs[host_of[sat].node_id], dlinks[sat], passes, bar)))
        self._downlink_wall0 = time.monotonic()
        try:
            trainer = self.env.process(self.training(self.env.all_of(sats), tlinks, bar))
            self.env.run(until=trainer)
            # each node's own count of what it sent and received: a second measurement
            # (nodes as registered now: a trainer may have restarted elsewhere)
            counted, unreachable = self._node_bytes()
        finally:
            bar.close()
            for ch in channels.values():
                ch.close()
        stats = self.mission.Stats(pb.StatsRequest())
        t = self.tally
        links = [*dlinks.values(), *tlinks.values()]
        t.per_link = self._per_link(links)
        accs = [h["accuracy"] for h in t.history]
        target = s.training.target_accuracy
        reached = [h["sim_time_s"] for h in t.history if target and h["accuracy"] >= target]
        return {
            "scenario": s.name,
            "final_accuracy": accs[-1],
            "best_accuracy": max(accs),
            "bytes": {"downlink": t.downlink_bytes, "uplink": t.uplink_bytes,
                      "retransmitted": t.retransmitted_bytes, "trainer": t.trainer_bytes,
                      "total": t.total_bytes},
            "target_accuracy": target,
            "time_to_accuracy_s": reached[0] if reached else None,
            "sim_time_s": self.env.now,
            "downlink_done_s": t.downlink_done_s,
            "wall_time_s": t.wall_time_s + time.monotonic() - wall0,
            "stage_wall_s": t.stage_wall_s,
            "resumed": t.resumed,
            "samples": {"sent": t.downlink_messages, "batches": t.downlink_batches,
                        "rejected": t.rejected, "rejections": t.rejections,
                        "stored": int(stats.samples_stored),
                        # distinct stored rows used, and rows used over all epochs
                        "trained_on": t.distinct_trained, "rows_trained": t.rows_trained,
                        "train_tokens": int(stats.train_tokens),
                        "duplicates": int(stats.duplicates), "test": int(stats.test_tokens),
                        "cloudy_skipped": t.cloudy_skipped,
                        "test_cloudy_skipped": int(stats.test_skipped)},
            "accuracy_by_group": {k[len("accuracy_"):]: v for k, v in t.history[-1].items()
                                  if k.startswith("accuracy_")},
            "compute": {**t.compute, "flops_per_s": {
                "onboard_encoder": s.sensors.onboard_flops,
                "ground_encoder": s.training.ground_flops,
                "trainers": s.training.trainer_flops},
                "test_encoder_flops": int(stats.test_encode_flops)},
            "downlink_failures": t.downlink_failures,
            "ground_station": {"downlink_bytes_received": int(stats.downlink_bytes_received),
                               "rejected": int(stats.rejected),
                               "peak_rss_mb": round(stats.peak_rss_bytes / 2**20, 1)},
            "per_link_bytes": t.per_link,
            # busy time / mission time; stations: busy / (antennas x mission time)
            "link_utilisation": {link.name: link.busy_s / self.env.now if self.env.now else 0.0
                                 for link in links},
            "stations": {name: {**v, "utilisation": v["busy_s"] / (v["antennas"] * self.env.now)
                                if self.env.now else 0.0} for name, v in t.stations.items()},
            "node_bytes": {k: {"sent": v["sent"] + v["base_sent"],
                               "received": v["received"] + v["base_received"]}
                           for k, v in counted.items()},
            "unreachable_nodes": unreachable,
            "per_round_bytes": t.per_round_bytes,
            "round_bytes": _round_bytes(t),
            "trainer_failures": t.trainer_failures,
            "history": t.history,
        }


def _on_link(report: pb.TransmitReport) -> list[int]:
    """The sizes a Transmit put on the radio, in order: each batch, then its ack."""
    sizes: list[int] = []
    for k, batch in enumerate(report.batch_bytes):
        sizes.append(batch)
        if k < len(report.ack_bytes):
            sizes.append(report.ack_bytes[k])
    return sizes


def _round_bytes(t: Tally) -> dict[str, Any]:
    """Mean bytes per training round (all workers, both directions) beside what one
    local-SGD round of the same model and K moves."""
    totals = [sum(w["sent"] + w["received"] for w in r["workers"].values())
              for r in t.per_round_bytes]
    mean = sum(totals) / len(totals) if totals else 0.0
    return {"rounds": len(totals), "mean": mean, "local_sgd": t.local_sgd_round_bytes,
            "ratio_to_local_sgd": mean / t.local_sgd_round_bytes if t.local_sgd_round_bytes
            else None}
