"""Mission control: drives a deployed constellation through one scenario on a SimPy clock.

Every transfer is a real gRPC call; its measured size (ByteSize + 5 per message) is charged
on a SimPy link, which gives the mission time. Phases: downlink (each satellite sends inside
its contact windows until its shard is delivered), encoding at the ground station, then
training epochs whose dataset uploads and rounds are charged on the ground-trainer links.

After the downlink and after every epoch, the mission's state (clock, tallies, history) is
written to `state_file`; `resume=True` continues from it: the downlink is not repeated, and
training continues from the ground station's checkpoint (the ground station must have been
started with it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import simpy
from tqdm import tqdm

from ground_station.serde import pb_to_epoch
from node.rpc import channel, wait_ready
from proto.sparsat.v1 import sparsat_pb2 as pb
from proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc
from sim.links import Link, PeriodicPasses
from sim.scenario import Scenario

TRANSMIT_MAX_SAMPLES = 256  # samples per Transmit call: keeps satellites interleaved in time
MAX_DOWNLINK_FAILURES = 5  # consecutive failed streams before a satellite gives up
REGISTER_TIMEOUT_S = 180.0


class MissionError(RuntimeError):
    pass


@dataclass
class Tally:
    downlink_bytes: int = 0
    downlink_messages: int = 0
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

    @property
    def total_bytes(self) -> int:
        return self.downlink_bytes + self.uplink_bytes + self.trainer_bytes


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


def _health(address: str, timeout_s: float) -> pb.HealthReply:
    ch = channel(address)
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
        self.gs_channel = channel(ground_station)
        self.mission = pb_grpc.MissionStub(self.gs_channel)
        self.registry = pb_grpc.RegistryStub(self.gs_channel)

    # ---- actors -----------------------------------------------------------------------------

    def satellite(self, sat_id: str, sensor: pb_grpc.SensorStub, link: Link,
                  passes: PeriodicPasses, bar: tqdm) -> Generator[simpy.Event, Any, None]:
        env, t = self.env, self.tally
        failures = 0
        while True:
            start, end = passes.window_at(env.now)
            if env.now < start:
                yield env.timeout(start - env.now)
            budget = link.capacity(end - env.now)
            report = sensor.Transmit(pb.TransmitRequest(
                satellite_id=sat_id, max_bytes=budget, max_samples=TRANSMIT_MAX_SAMPLES))
            sent = sum(report.message_bytes)
            t.downlink_bytes += sent
            t.uplink_bytes += report.ack_bytes
            t.downlink_messages += len(report.message_bytes)
            t.duplicates += report.duplicates
            bar.update(report.acked - report.duplicates)
            if sent or report.ack_bytes:
                # acks share the satellite's radio link: half duplex, charged after the data
                yield env.process(link.transfer(sent + report.ack_bytes))
            if report.error_code:
                failures += 1
                code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
                if report.error_code == code or failures > MAX_DOWNLINK_FAILURES:
                    raise MissionError(f"{sat_id}: downlink failed: {report.error}")
                t.downlink_failures += 1
                continue  # unacked samples stay queued: try again in what is left of the pass
            failures = 0
            if report.remaining == 0:
                return
            if not sent:
                if report.next_bytes > link.capacity(passes.duration_s):
                    raise MissionError(f"{sat_id}: a {report.next_bytes}-byte sample never fits "
                                       f"a pass ({link.capacity(passes.duration_s)} bytes)")
                yield env.timeout(end - env.now)  # the rest of this pass is too short

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
        if not self.resume:
            self.tally.downlink_done_s = self.env.now
            self.save_state(links)
        self._prepare()
        epochs = range(self.epochs_done + 1, self.s.training.epochs + 1)
        for epoch in tqdm(epochs, desc="training", unit="epoch", disable=not self.show_progress):
            report = pb_to_epoch(self.mission.TrainEpoch(pb.TrainEpochRequest(epoch=epoch)))
            self.tally.local_sgd_round_bytes = report.local_sgd_round_bytes
            # dataset uploads, then rounds: workers in parallel, each on its own link
            stages = [report.dataset_bytes] if report.dataset_bytes else []
            stages += report.rounds
            for i, workers in enumerate(stages):
                transfers = []
                for w in workers:
                    self.tally.trainer_bytes += w.sent + w.received
                    # down then up on the same link: the reply waits for the request
                    transfers.append(self.env.process(self._round_trip(link(w.node_id), w)))
                yield self.env.all_of(transfers)
                if i >= len(stages) - len(report.rounds):
                    r = i - (len(stages) - len(report.rounds))
                    self.tally.per_round_bytes.append({
                        "epoch": epoch, "round": r,
                        "workers": {w.node_id: {"sent": w.sent, "received": w.received,
                                                **({"error": w.error} if w.error else {})}
                                    for w in workers},
                    })
                    self.tally.trainer_failures += [
                        {"epoch": epoch, "round": r, "node_id": w.node_id, "error": w.error}
                        for w in workers if w.error]
            self.tally.history.append({
                "epoch": epoch,
                "accuracy": report.accuracy,
                "test_loss": report.test_loss,
                "train_loss": report.train_loss,
                "bytes_total": self.tally.total_bytes,
                "sim_time_s": self.env.now,
            })
            self.epochs_done = epoch
            self.save_state(links)
            self.on_epoch(self.tally.history[-1])

    # ---- state for --resume -------------------------------------------------------------------

    def save_state(self, links: dict[str, Link]) -> None:
        if self.state_file is None:
            return
        per_link = {**self.saved_links, **{link.name: link.bytes for link in links.values()}}
        per_link.update({link.name: link.bytes for link in self._downlinks.values()})
        state = {"sim_time_s": self.env.now, "epochs_done": self.epochs_done,
                 "tally": asdict(self.tally), "per_link": per_link,
                 "wall_time_s": self.tally.wall_time_s + time.monotonic() - self._wall0}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.state_file)

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

    def _round_trip(self, link: Link, w: Any) -> Generator[simpy.Event, Any, None]:
        yield self.env.process(link.transfer(w.sent))
        yield self.env.process(link.transfer(w.received))

    def _prepare(self) -> None:
        bars: dict[str, tqdm] = {}
        for update in self.mission.Prepare(pb.PrepareRequest()):
            bar = bars.get(update.stage)
            if bar is None:
                bar = bars[update.stage] = tqdm(total=update.total, desc=update.stage,
                                                unit="img", disable=not self.show_progress)
            bar.update(update.done - bar.n)
        for bar in bars.values():
            bar.close()

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
                    _health(n.address, 2)
                    break
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise

        host_of = {sat: n for n in nodes if n.role == pb.SENSOR for sat in n.satellite_ids}
        channels = {n.node_id: channel(n.address) for n in host_of.values()}
        stubs = {node_id: pb_grpc.SensorStub(ch) for node_id, ch in channels.items()}
        down = s.links.downlink
        dlinks = {sat: Link(self.env, f"downlink:{sat}", down.rate_bps, down.latency_s)
                  for sat in satellites}
        self._downlinks = dlinks
        for link in dlinks.values():
            link.bytes = self.saved_links.get(link.name, 0)
        tlinks: dict[str, Link] = {}
        bar = tqdm(total=s.dataset.train_subset, desc="downlink", unit="sample",
                   disable=not self.show_progress)
        p = s.passes
        sats = []
        for i, sat in enumerate(satellites if not self.resume else []):
            offset = p.offset_s if p.offset_s is not None else i * p.period_s / len(satellites)
            passes = PeriodicPasses(p.period_s, p.duration_s, offset)
            sats.append(self.env.process(self.satellite(
                sat, stubs[host_of[sat].node_id], dlinks[sat], passes, bar)))
        try:
            trainer = self.env.process(self.training(self.env.all_of(sats), tlinks, bar))
            self.env.run(until=trainer)
            # each node's own count of what it sent and received: a second measurement
            # (nodes as registered now: a trainer may have restarted elsewhere)
            counted, unreachable = {}, []
            for n in self.registry.ListNodes(pb.ListNodesRequest(), timeout=10).nodes:
                try:
                    counted[n.node_id] = _health(n.address, 10)
                except grpc.RpcError:
                    unreachable.append(n.node_id)
        finally:
            bar.close()
            for ch in channels.values():
                ch.close()
        stats = self.mission.Stats(pb.StatsRequest())
        t = self.tally
        t.per_link = dict(self.saved_links)
        for link in [*dlinks.values(), *tlinks.values()]:
            t.per_link[link.name] = link.bytes
        accs = [h["accuracy"] for h in t.history]
        return {
            "scenario": s.name,
            "final_accuracy": accs[-1],
            "best_accuracy": max(accs),
            "bytes": {"downlink": t.downlink_bytes, "uplink": t.uplink_bytes,
                      "trainer": t.trainer_bytes, "total": t.total_bytes},
            "sim_time_s": self.env.now,
            "downlink_done_s": t.downlink_done_s,
            "wall_time_s": t.wall_time_s + time.monotonic() - wall0,
            "resumed": t.resumed,
            "samples": {"sent": t.downlink_messages, "stored": int(stats.samples_stored),
                        "trained_on": int(stats.train_tokens),
                        "duplicates": int(stats.duplicates), "test": int(stats.test_tokens)},
            "downlink_failures": t.downlink_failures,
            "ground_station": {"downlink_bytes_received": int(stats.downlink_bytes_received),
                               "rejected": int(stats.rejected)},
            "per_link_bytes": t.per_link,
            "node_bytes": {k: {"sent": int(v.bytes_sent), "received": int(v.bytes_received)}
                           for k, v in counted.items()},
            "unreachable_nodes": unreachable,
            "per_round_bytes": t.per_round_bytes,
            "round_bytes": _round_bytes(t),
            "trainer_failures": t.trainer_failures,
            "history": t.history,
        }


def _round_bytes(t: Tally) -> dict[str, Any]:
    """Mean bytes per training round (all workers, both directions) beside what one
    local-SGD round of the same model and K moves."""
    totals = [sum(w["sent"] + w["received"] for w in r["workers"].values())
              for r in t.per_round_bytes]
    mean = sum(totals) / len(totals) if totals else 0.0
    return {"rounds": len(totals), "mean": mean, "local_sgd": t.local_sgd_round_bytes,
            "ratio_to_local_sgd": mean / t.local_sgd_round_bytes if t.local_sgd_round_bytes
            else None}
