"""Mission control's side of the ground station: one channel, every call with a deadline,
retried while the ground station does not answer (UNAVAILABLE: restarting), and the faults
it recovered from recorded in the mission's Tally.

Also the registry-facing helpers: waiting for nodes to register, and for a registered node to
answer Health (which names a node that cannot be reached).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from tqdm import tqdm

from sparsat.ground_station import serde as gs_serde
from sparsat.ground_station.config import config_tree, flatten
from sparsat.node.wire import control
from sparsat.node.wire.rpc import channel
from sparsat.node.wire.security import GROUND_STATION
from sparsat.proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc
from sparsat.sim.scenario.configs import ground_station_config, mask_spec
from sparsat.sim.scenario.schema import Scenario

if TYPE_CHECKING:
    from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb
    from sparsat.sim.mission.tally import Tally

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


def wait_for_nodes(registry: pb_grpc.RegistryStub, satellites: list[str], trainers: int,
                   timeout_s: float = REGISTER_TIMEOUT_S,
                   alive: Callable[[], None] = lambda: None) -> list[pb.NodeInfo]:
    """Block until every satellite and `trainers` trainers have registered."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive()
        try:
            nodes = list(registry.ListNodes(control.list_nodes_request(), timeout=10).nodes)
        except grpc.RpcError as e:  # a ground station restarting: not yet
            if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            nodes = []
        hosted = {s for n in nodes if n.role == control.SENSOR for s in n.satellite_ids}
        n_trainers = sum(n.role == control.TRAINER for n in nodes)
        missing = [s for s in satellites if s not in hosted]
        if not missing and n_trainers >= trainers:
            return nodes
        if time.monotonic() > deadline:
            raise MissionError(f"nodes missing after {timeout_s:.0f} s: satellites {missing}, "
                               f"trainers {n_trainers}/{trainers}")
        time.sleep(0.2)


def health(address: str, timeout_s: float, peer: str) -> pb.HealthReply:
    """One Health call to a node, on a channel of its own."""
    ch = channel(address, peer=peer)
    try:
        return pb_grpc.HealthStub(ch).Check(control.health_request(), timeout=timeout_s,
                                            wait_for_ready=True)
    finally:
        ch.close()


def wait_serving(n: pb.NodeInfo, d: Deadlines, alive: Callable[[], None]) -> None:
    """A registered node must answer Health within node_ready_s: one that does not (a
    dead process, an address that does not route) is named with its address."""
    deadline = time.monotonic() + d.node_ready_s
    while True:
        alive()
        try:
            health(n.address, 2, n.node_id)
            return
        except grpc.RpcError as e:
            if time.monotonic() > deadline:
                raise MissionError(
                    f"{n.node_id} at {n.address} (as it registered) did not answer in "
                    f"{d.node_ready_s:.0f} s: {e.code().name}: {e.details()}; is the "
                    "address reachable from here (a node behind NAT or bound to 0.0.0.0 "
                    "must advertise a routable one: --advertise)?") from e


_ABSENT = object()


class GroundStationClient:
    """The ground station as mission control calls it. Retries, restarts survived and the
    fingerprint go into `tally` (the mission's, so faults stay in the order they happened).
    `instance` is the ground-station process Prepare ran in: another one has lost it."""

    def __init__(self, address: str, scenario: Scenario, tally: Tally,
                 deadlines: Deadlines = Deadlines(), alive: Callable[[], None] = lambda: None,
                 show_progress: bool = True):
        self.address = address
        self.scenario = scenario
        self.tally = tally
        self.d = deadlines
        self.alive = alive  # raises when a locally launched node has died
        self.show_progress = show_progress
        self.instance = ""
        self.rows_per_epoch = 0  # training rows an epoch, from Stats once prepared
        self.channel = channel(address, peer=GROUND_STATION)
        self.mission = pb_grpc.MissionStub(self.channel)
        self.registry = pb_grpc.RegistryStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def call(self, what: str, call: Callable[[], T]) -> T:
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
                        or self.answers()):
                    raise MissionError(
                        f"ground station {self.address}: {what} failed: {code.name}: "
                        f"{e.details()}" + (f" (retried for {waited:.0f} s)" if retries else "")
                    ) from e
                retries += 1
                self.tally.gs_retries += 1
                log.warning("ground station %s: %s UNAVAILABLE (%s); retry %d in %.1f s",
                            self.address, what, e.details(), retries, delay)
                time.sleep(delay)
                delay = min(2 * delay, 5.0)
        if retries:
            took = time.monotonic() - t0
            log.warning("ground station %s answers %s again after %.1f s", self.address,
                        what, took)
            self.tally.faults.append({
                "fault": "ground station unavailable", "node": GROUND_STATION,
                "address": self.address, "call": what, "retries": retries,
                "recovered": True, "recovery_wall_s": round(took, 2)})
        return out

    def answers(self) -> bool:
        """Whether the ground station process answers at all (a quick Health call)."""
        try:
            pb_grpc.HealthStub(self.channel).Check(control.health_request(), timeout=2.0)
            return True
        except grpc.RpcError:
            return False

    def describe(self) -> pb.MissionInfo:
        return self.call("Describe", lambda: self.mission.Describe(
            gs_serde.describe_request(), timeout=self.d.call_s))

    def list_nodes(self) -> list[pb.NodeInfo]:
        return list(self.call("ListNodes", lambda: self.registry.ListNodes(
            control.list_nodes_request(), timeout=self.d.call_s)).nodes)

    def stats(self) -> pb.StatsReply:
        return self.call("Stats", lambda: self.mission.Stats(gs_serde.stats_request(),
                                                             timeout=self.d.call_s))

    def wait_for_nodes(self, satellites: list[str], trainers: int) -> list[pb.NodeInfo]:
        return wait_for_nodes(self.registry, satellites, trainers, self.d.register_s,
                              alive=self.alive)

    def check_scenario(self) -> None:
        """The ground station must run this scenario: the keys it uses are compared with
        this scenario's, and a difference is an error naming each key (keys that are a
        deployment's own, such as paths and devices, are left out by the ground station:
        sparsat.ground_station.config.mission_keys)."""
        info = self.describe()
        theirs = json.loads(info.config_json)
        # every key here, flattened as Describe flattens them: the ground station's decide
        # which are compared
        mine = flatten(config_tree(ground_station_config(self.scenario, Path("."))))
        diffs = [f"{k}: {json.dumps(mine[k]) if k in mine else 'absent'} here, "
                 f"{json.dumps(v)} at the ground station"
                 for k, v in sorted(theirs.items()) if mine.get(k, _ABSENT) != v]
        if diffs:
            raise MissionError(
                f"this scenario is not the one the ground station {self.address} runs "
                f"(fingerprint {info.fingerprint}): " + "; ".join(diffs))
        self.tally.fingerprint = info.fingerprint

    def ensure_prepared(self, epochs_done: int) -> tuple[int, float] | None:
        """Run Prepare unless this ground-station process has: the first time, and again
        after a restart lost it (then the trainers must have registered again first).
        (FLOPs, wall s) of the encoder stage when it ran. Training that had begun must
        continue from the ground station's checkpoint, not start again."""
        s = self.scenario
        info = self.describe()
        if info.prepared and info.instance == self.instance:
            return None
        t0, restarted = time.monotonic(), bool(self.instance)
        if restarted and info.instance != self.instance:
            log.warning("ground station %s restarted (Prepare state lost): waiting for %d "
                        "trainers to register again, then preparing again",
                        self.address, s.training.num_workers)
            self.wait_for_nodes([], s.training.num_workers)
        if not info.prepared:
            out: tuple[int, float] | None = self.prepare()
        else:
            out = None
        info = self.describe()
        self.instance = info.instance
        if restarted:
            self.tally.faults.append({
                "fault": "ground station restarted", "node": GROUND_STATION,
                "address": self.address, "epochs_done": epochs_done,
                "recovered": True, "recovery_wall_s": round(time.monotonic() - t0, 2)})
        copies = mask_spec(s).copies
        self.rows_per_epoch = int(self.stats().train_tokens) // copies
        if epochs_done and not info.rounds_done:
            raise MissionError(
                f"the ground station {self.address} has no training state: "
                f"{epochs_done} epochs were done, but it did not resume from a checkpoint "
                "(start it with --resume and the run's --checkpoint-dir); training would "
                "start again from scratch")
        return out

    def uplink(self) -> pb.UplinkReply | None:
        """Projected payloads: the basis (and zstd dictionary) to uplink, fitted on the first
        call that can; None while the ground station cannot fit it yet (FAILED_PRECONDITION:
        too few labelled samples for a supervised basis)."""
        try:  # retried while the ground station restarts (UNAVAILABLE)
            return self.call("Uplink", lambda: self.mission.Uplink(  # type: ignore[no-any-return]
                gs_serde.uplink_request(), timeout=self.d.prepare_s))
        except MissionError as e:
            cause = e.__cause__
            p = self.scenario.sensors.payload.projection
            if (isinstance(cause, grpc.RpcError)
                    and cause.code() == grpc.StatusCode.FAILED_PRECONDITION
                    and p is not None and p.method == "supervised"):
                log.info("basis not fitted yet: %s", cause.details())
                return None
            raise

    def arrived(self, satellite_id: str, transmit_id: int, ends_s: list[float]) -> int:
        """Streaming: stamp a Transmit's batches with their end on the air; samples stamped."""
        return int(self.call("Arrived", lambda: self.mission.Arrived(
            gs_serde.arrived_request(satellite_id, transmit_id, ends_s),
            timeout=self.d.call_s)).stamped)

    def prepare_stream(self, upto_s: float) -> tuple[int, float, int]:
        """Streaming: encode what arrived by `upto_s` and append it to the training data;
        (FLOPs, wall s, rows added). A ground station that restarted since the first call
        has lost the stream's state: a MissionError (streaming missions do not resume)."""
        if self.instance and self.describe().instance != self.instance:
            raise MissionError(
                f"the ground station {self.address} restarted during a streaming mission and "
                "lost its training state (streaming missions are not resumed): run the mission "
                "again from the start")
        flops, wall_s, added = 0, 0.0, 0
        for update in self.call("Prepare", lambda: list(self.mission.Prepare(
                gs_serde.prepare_request(upto_s), timeout=self.d.prepare_s))):
            if update.stage == "encode train":
                flops, wall_s, added = int(update.flops), float(update.wall_s), int(update.done)
        if not self.instance:
            self.instance = self.describe().instance
        self.rows_per_epoch = int(self.stats().train_tokens)
        return flops, wall_s, added

    def train_epoch(self, epoch: int, epochs_done: int,
                    replay_share: float | None = None) -> pb.EpochReport:
        """TrainEpoch with a deadline (each round within the coordinator's round timeout);
        a ground station that restarted meanwhile is prepared again and asked again
        (`replay_share`: a streaming update's pass over the new rows and that share of older
        ones; a restart then ends the mission)."""
        t = self.scenario.training
        rows = max(1, self.rows_per_epoch)
        rounds = -(-rows // (t.num_workers * t.local_steps * t.batch_size)) + 1
        timeout = rounds * t.round_timeout_s + self.d.epoch_slack_s
        failed: dict[str, Any] | None = None  # the fault being recovered from
        while True:
            if t.streaming:
                if self.describe().instance != self.instance:
                    raise MissionError(
                        f"the ground station {self.address} restarted during a streaming "
                        "mission (streaming missions are not resumed): run it again")
            else:
                self.ensure_prepared(epochs_done)
            if failed is not None:  # prepared again: the epoch goes on
                failed["recovery_wall_s"] = round(time.monotonic() - failed.pop("at"), 2)
                failed = None
            try:
                report: pb.EpochReport = self.mission.TrainEpoch(
                    gs_serde.train_epoch_request(epoch, replay_share), timeout=timeout)
            except grpc.RpcError as e:
                if self.describe().instance == self.instance:
                    raise MissionError(
                        f"ground station {self.address}: TrainEpoch {epoch} failed: "
                        f"{e.code().name}: {e.details()}") from e
                log.warning("ground station %s restarted during epoch %d (%s): preparing "
                            "again and continuing from its checkpoint", self.address,
                            epoch, e.code().name)
                failed = {"fault": "ground station restarted", "node": GROUND_STATION,
                          "address": self.address, "epoch": epoch, "recovered": True,
                          "at": time.monotonic()}
                self.tally.faults.append(failed)
                continue
            return report

    def prepare(self) -> tuple[int, float]:
        """Run the ground station's encoder stage; (FLOPs, wall s) of encoding the samples.
        Retried from the start while the ground station does not answer."""
        return self.call("Prepare", self._prepare_once)

    def _prepare_once(self) -> tuple[int, float]:
        bars: dict[str, tqdm] = {}
        flops, wall_s = 0, 0.0
        for update in self.mission.Prepare(gs_serde.prepare_request(), timeout=self.d.prepare_s):
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
