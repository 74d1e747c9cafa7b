"""Mission control: drives a deployed constellation through one scenario on a SimPy clock.

Every transfer is a real gRPC call; its measured size (ByteSize + 5 per message) is charged
on a SimPy link, which gives the mission time. Compute is on the clock too, from FLOP counts
and the scenario's throughputs (deterministic; the measured wall time is recorded beside it):
a satellite's on-board encoding (CLS payloads) runs from the start and a sample cannot leave
before it is encoded; the ground station's encoder stage runs after the downlink; each
training job's local steps run between its request and its reply. Phases: downlink (each
satellite sends inside its contact windows until its shard is delivered: one process per
satellite, `sparsat.sim.mission.satellite`, fed by its periodic passes or its SGP4 contact
windows), encoding at the ground station, then training epochs whose dataset uploads and
rounds are charged on the ground-trainer links.

After the downlink and after every epoch, the mission's state (clock, tallies, history) is
written to `state_file`; `resume=True` continues from it: the downlink is not repeated, and
training continues from the ground station's checkpoint (the ground station must have been
started with it).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Generator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import simpy
from tqdm import tqdm

from sparsat.ground_station.serde import pb_to_epoch
from sparsat.node.wire.control import SENSOR
from sparsat.node.wire.rpc import wait_ready
from sparsat.sim.mission import detector, pixels, report
from sparsat.sim.mission.ground_client import (
    Deadlines,
    GroundStationClient,
    MissionError,
    health,
    wait_serving,
)
from sparsat.sim.mission.hosts import SensorHosts
from sparsat.sim.mission.satellite import Contacts, Downlink, Passes, RangeRate, fixed_rate
from sparsat.sim.mission.tally import Tally
from sparsat.sim.mission.uplink import Uplink
from sparsat.sim.scenario.configs import capture_spec, capturing_satellites, mask_spec
from sparsat.sim.scenario.schema import Scenario
from sparsat.sim.space import orbits
from sparsat.sim.space.links import AdaptiveModcod, Link, LinkBudget, PeriodicPasses

if TYPE_CHECKING:
    from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb

__all__ = ["Deadlines", "MissionControl", "MissionError", "Tally"]

DEADLINES = Deadlines()

log = logging.getLogger("sparsat.mission")


class MissionControl:
    """The mission on its SimPy clock: the satellites' downlink, the ground station's encoder
    stage and the training epochs, tallied. The ground station is called through `gs`
    (sparsat.sim.mission.ground_client: deadlines, retries, restarts), the sensor hosts through
    `hosts` (sparsat.sim.mission.hosts: Transmit, hosts that go away and come back); each
    satellite's process runs in `downlink` (sparsat.sim.mission.satellite)."""

    def __init__(self, scenario: Scenario, ground_station: str, show_progress: bool = True,
                 alive: Callable[[], None] = lambda: None, state_file: Path | None = None,
                 resume: bool = False,
                 on_epoch: Callable[[dict[str, Any]], None] = lambda h: None,
                 deadlines: Deadlines = DEADLINES):
        self.s = scenario
        self.d = deadlines
        self.on_epoch = on_epoch  # called with each epoch's history entry, once it is saved
        self.alive = alive  # raises when a locally launched node has died
        self.ground_station = ground_station
        self.show_progress = show_progress
        self.state_file = state_file
        self.tally = Tally()
        self.epochs_done = 0
        self.saved_links: dict[str, int] = {}
        now = 0.0
        if resume:
            now = self._load_state()
        self.resume = resume
        self.env = simpy.Environment(initial_time=now)
        # after _load_state: both record into the mission's tally (faults, retries, shortfall)
        self.gs = GroundStationClient(ground_station, scenario, self.tally, deadlines, alive,
                                      show_progress)
        self.hosts = SensorHosts(self.env, scenario, self.tally, self.gs, deadlines)
        # the satellites' processes (sparsat.sim.mission.satellite); Transmit through here
        self.downlink = Downlink(self.env, scenario, self.tally, self.hosts, self.gs, deadlines,
                                 self._transmit)

    @property
    def gs_channel(self) -> grpc.Channel:
        """The channel to the ground station (tests and benches close it themselves)."""
        return self.gs.channel

    # ---- sensor hosts: calls with deadlines, outages ------------------------------------------

    def use_sensors(self, host_of: dict[str, pb.NodeInfo], stubs: dict[str, Any]) -> None:
        """Which host holds each satellite, and a Sensor stub per host (by node id); the
        run sets them from the registry, in-process tests and benches with stand-ins."""
        self.hosts.use(host_of, stubs)

    def _transmit(self, sat_id: str, budget: int) -> pb.TransmitReport:
        """Every Transmit of the mission goes through here (tests hook it to inject faults)."""
        return self.hosts.transmit(sat_id, budget)

    def _link(self, node_id: str) -> Link:
        """The link to a trainer the coordinator used (made when first used)."""
        links, tl = self._tlinks, self.s.links.trainer
        if node_id not in links:
            links[node_id] = Link(self.env, f"trainer:{node_id}", tl.rate_bps, tl.latency_s)
            links[node_id].bytes = self.saved_links.get(links[node_id].name, 0)
        return links[node_id]

    def training(self, downlink_done: simpy.Event, links: dict[str, Link], bar: tqdm
                 ) -> Generator[simpy.Event, Any, None]:
        self._tlinks = links
        if self.s.training.streaming:
            yield from self._streaming(downlink_done, links, bar)
            return
        yield downlink_done
        bar.close()
        stage = self.tally.stage_wall_s
        if not self.resume:
            self.tally.downlink_done_s = self.env.now
            stage["downlink"] += time.monotonic() - self._downlink_wall0
            self.save_state(links)
            self._check_delivered()
        t0 = time.monotonic()
        flops, wall_s = self.gs.ensure_prepared(self.epochs_done) or (0, 0.0)
        stage["prepare"] += time.monotonic() - t0
        if not self.resume or not self.tally.compute["ground_encoder"]["flops"]:
            c = self.tally.compute["ground_encoder"]
            c.update(flops=flops, sim_s=flops / self.s.training.ground_flops, wall_s=wall_s)
            yield self.env.timeout(c["sim_s"])  # the encoder stage, before training starts
        epochs = range(self.epochs_done + 1, self.s.training.epochs + 1)
        for epoch in tqdm(epochs, desc="training", unit="epoch", disable=not self.show_progress):
            yield from self._epoch(epoch, self._link)

    def _epoch(self, epoch: int, link: Callable[[str], Link], replay_share: float | None = None,
               extra: dict[str, Any] | None = None) -> Generator[simpy.Event, Any, None]:
        """One TrainEpoch, its dataset uploads and rounds charged on the trainer links, its
        history entry (with `extra`: a streaming update's fields)."""
        stage = self.tally.stage_wall_s
        t0 = time.monotonic()
        report = pb_to_epoch(self.gs.train_epoch(epoch, self.epochs_done, replay_share))
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
            **(extra or {}),
            "accuracy": report.accuracy,
            **({"validation_accuracy": report.validation_accuracy}
               if report.validation_accuracy is not None else {}),
            **{f"accuracy_{g}": a for g, a in sorted(report.group_accuracy.items())},
            "test_loss": report.test_loss,
            "train_loss": report.train_loss,
            "bytes_total": self.tally.total_bytes,
            "sim_time_s": self.env.now,
            # the timeline's axes (report.timeline): radio and ground links apart
            "downlink_bytes": self.tally.downlink_bytes,
            "trainer_bytes": self.tally.trainer_bytes,
            "images_on_ground": self.tally.stored,
        })
        self.epochs_done = epoch
        stage["training"] += time.monotonic() - t0
        if not self.s.training.streaming:  # streaming missions are not resumed
            self.save_state(self._tlinks)
        self.on_epoch(self.tally.history[-1])

    def _streaming(self, downlink_done: simpy.Event, links: dict[str, Link], bar: tqdm
                   ) -> Generator[simpy.Event, Any, None]:
        """Training while data arrives: an update when a trigger came (a pass that brought
        data down ended: per_pass; every_s of mission time), new data has arrived, and the
        trainers are idle (triggers during an update make one update after it). No update
        starts at or after the horizon; the last one covers what arrived by its start."""
        env, s = self.env, self.s
        if self.resume:
            raise MissionError("a streaming mission (training.schedule "
                               f"{s.training.schedule!r}) cannot be resumed: run it again")
        horizon = s.mission.horizon_s
        self._due, self._over = False, False
        self._wake = env.event()
        if s.training.schedule == "per_pass":
            self.downlink.on_pass_end = self._poke
        every = s.training.every_s
        if every is not None:
            env.process(self._ticks(every))
        env.process(self._downlink_over(downlink_done, bar))
        while True:
            while not self._due:
                self._wake = env.event()
                yield self._wake
            self._due = False
            if horizon is not None and env.now >= horizon:
                break
            if self.downlink.new_arrivals(env.now):
                yield from self._update(env.now, links)
            if self._over and not self._due:
                break
        if not self.tally.history:
            self._check_delivered()
            raise MissionError("no update trained a model: nothing new had arrived at any "
                               "trigger before the horizon (or every sample that arrived was "
                               "a duplicate or refused); see training.schedule")

    def _poke(self) -> None:
        """A trigger: an update is due (now, or once the one running ends)."""
        self._due = True
        if not self._wake.triggered:
            self._wake.succeed()

    def _ticks(self, every_s: float) -> Generator[simpy.Event, Any, None]:
        horizon = self.s.mission.horizon_s
        while not self._over and (horizon is None or self.env.now + every_s < horizon):
            yield self.env.timeout(every_s)
            self._poke()

    def _downlink_over(self, downlink_done: simpy.Event, bar: tqdm
                       ) -> Generator[simpy.Event, Any, None]:
        """Every satellite is done: before a horizon (queues empty, nothing left to
        capture) a last update for what arrived since the one before; at the horizon
        (where captures over time always end) none: no update starts there."""
        yield downlink_done
        bar.close()
        self.tally.downlink_done_s = self.env.now
        self.tally.stage_wall_s["downlink"] += time.monotonic() - self._downlink_wall0
        self._over = True
        self._poke()

    def _update(self, upto_s: float, links: dict[str, Link]) -> Generator[simpy.Event, Any, None]:
        """One streaming update at `upto_s`: the ground station encodes what arrived by then
        (its FLOPs on the mission clock), then the update's work (training.update) runs, its
        uploads and rounds charged on the trainer links."""
        s, stage = self.s, self.tally.stage_wall_s
        t0 = time.monotonic()
        flops, wall_s, added = self.gs.prepare_stream(upto_s)
        stage["prepare"] += time.monotonic() - t0
        c = self.tally.compute["ground_encoder"]
        seconds = flops / s.training.ground_flops
        c["flops"] += flops
        c["sim_s"] += seconds
        c["wall_s"] += wall_s
        yield self.env.timeout(seconds)
        if not added:  # only duplicates or refused samples arrived
            return
        self.tally.updates += 1
        u = s.training.update
        extra = {"update": self.tally.updates, "upto_s": upto_s,
                 "captured": self._captured_by(upto_s)}
        for _ in range(u.epochs if u.kind == "epochs" else 1):
            yield from self._epoch(self.epochs_done + 1, self._link,
                                   u.replay_share if u.kind == "replay" else None, extra)

    def _captured_by(self, t: float) -> int | None:
        """Scenes captured by mission time t, all satellites (captures over time)."""
        spec = capture_spec(self.s)
        if spec is None:
            return None
        return spec.captured_by(t) * capturing_satellites(self.s)

    def _check_delivered(self) -> None:
        """A downlink that sent nothing: every queue was empty before this mission control
        started (a deployment driven twice), which is an error, not a run of 0 bytes."""
        if self.tally.downlink_messages or self.tally.cloudy_skipped or self.tally.shortfall:
            return
        if any(self.tally.left_on_board.values()):
            raise MissionError(
                f"nothing reached the ground by the horizon (mission.horizon_h = "
                f"{self.s.mission.horizon_h:g} h): {sum(self.tally.left_on_board.values())} "
                "samples left on board; no satellite had a window before it")
        stored = self.gs.stats().samples_stored
        raise MissionError(
            f"every satellite's queue was already empty: the sensor hosts had sent their "
            f"samples before ({stored} stored at the ground station {self.ground_station}); "
            "continue that mission with `sparsat run --resume DIR`, or restart the sensor "
            "hosts and the ground station with an empty store for a new one")

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
        for n in self.gs.list_nodes():
            try:
                h = health(n.address, min(5.0, self.d.call_s), n.node_id)
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
        return {**self.saved_links, **{link.name: link.bytes for link in links},
                **self.tally.uplink_links}

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
        """A satellite process per satellite of the constellation, in its contact windows."""
        s, o = self.s, self.s.orbits
        assert o is not None
        sats = orbits.constellation(s)
        stations = orbits.stations(s)
        sites = {st.name: st for st in stations}
        down = s.links.downlink
        b = down.budget
        modcod = (AdaptiveModcod(b.modcod.margin_db, b.modcod.rolloff)
                  if b is not None and b.modcod is not None else None)
        budget = (LinkBudget(b.frequency_hz, b.eirp_dbw, b.gt_dbk, b.bandwidth_hz,
                             down.rate_bps, b.losses_db, modcod) if b else None)
        t0 = time.monotonic()
        windows = orbits.contact_windows(sats, stations, o.epoch, s.mission.window_span_s(),
                                         o.step_s, o.tolerance_s)
        self.tally.stage_wall_s["contacts"] += time.monotonic() - t0
        self.downlink.antennas = {st.name: simpy.Resource(self.env, capacity=st.antennas)
                                  for st in o.stations}
        for st in o.stations:
            self.tally.stations[st.name] = {
                "antennas": st.antennas, "bytes": 0, "busy_s": 0.0, "queued_s": 0.0,
                "contact_s": sum(c.duration_s for c in windows if c.station == st.name)}
        per_sat: dict[str, list[orbits.Contact]] = {sat.name: [] for sat in sats}
        for c in windows:
            per_sat[c.satellite].append(c)
        return [self.env.process(self.downlink.fly(
            sat.name, Contacts(per_sat[sat.name]),
            RangeRate(sat, o.epoch, sites, budget, down.rate_bps, down.latency_s),
            dlinks[sat.name], bar)) for sat in sats]

    def _passes_processes(self, dlinks: dict[str, Link], bar: tqdm) -> list[simpy.Process]:
        """A satellite process per satellite on periodic passes, staggered unless the
        scenario gives their offset."""
        p, satellites = self.s.passes, self.s.sensors.ids()
        procs = []
        for i, sat in enumerate(satellites):
            offset = p.offset_s if p.offset_s is not None else i * p.period_s / len(satellites)
            passes = Passes(PeriodicPasses(p.period_s, p.duration_s, offset),
                            self.s.mission.horizon_s)
            procs.append(self.env.process(self.downlink.fly(
                sat, passes, fixed_rate(dlinks[sat]), dlinks[sat], bar)))
        return procs

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
            self.gs.close()

    def _run(self) -> dict[str, Any]:
        s = self.s
        self._wall0 = wall0 = time.monotonic()
        wait_ready(self.gs_channel, 60)
        self.gs.check_scenario()
        satellites = s.sensors.ids()
        # resuming, the downlink is done: only the trainers are needed
        nodes = self.gs.wait_for_nodes([] if self.resume else satellites,
                                       s.training.num_workers)
        for n in nodes:  # registered is not yet serving: sensors register, then load data
            wait_serving(n, self.d, self.alive)
        host_of = {sat: n for n in nodes if n.role == SENSOR for sat in n.satellite_ids}
        self.hosts.connect(host_of)
        down = s.links.downlink
        dlinks = {sat: Link(self.env, f"downlink:{sat}", down.rate_bps, down.latency_s)
                  for sat in satellites}
        self._downlinks = dlinks
        for link in dlinks.values():
            link.bytes = self.saved_links.get(link.name, 0)
        tlinks: dict[str, Link] = {}
        copies = mask_spec(s).copies
        bar = tqdm(total=s.dataset.train_subset and s.dataset.train_subset * copies,
                   desc="downlink", unit="sample", disable=not self.show_progress)
        sats = []  # resuming, the downlink is done
        if s.sensors.payload.projection is not None and not self.resume:
            self.downlink.uplink = Uplink(self.env, s, self.tally, self.gs)
            if s.sensors.payload.projection.method == "pca":
                self.downlink.uplink.fetch()  # fitted on the ground before the mission
        if not self.resume:
            detector.charge(s, self.tally)  # uplinked before the mission, with the config
            pixels.charge(s, self.tally)  # a shared JPEG / JPEG 2000 header, with the setup
            sats = (self._orbital_processes(dlinks, bar) if s.orbits is not None
                    else self._passes_processes(dlinks, bar))
        self._downlink_wall0 = time.monotonic()
        try:
            trainer = self.env.process(self.training(self.env.all_of(sats), tlinks, bar))
            self.env.run(until=trainer)
            # each node's own count of what it sent and received: a second measurement
            # (nodes as registered now: a trainer may have restarted elsewhere)
            counted, unreachable = self._node_bytes()
            listed = self.gs.list_nodes()
        finally:
            bar.close()
            self.hosts.close()
        stats = self.gs.stats()
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
