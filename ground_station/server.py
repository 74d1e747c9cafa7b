"""The ground-station process: Downlink, Registry, Health and Mission services.

Servicers are thin: decode with serde, validate with plain functions, map errors to status
codes, and call the store, the encoder stage or the coordinator.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import resource
import threading
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy as np
import torch

from sparsat.ground_station import serde as gs_serde
from sparsat.ground_station import uplink
from sparsat.ground_station.checkpoints import CheckpointError
from sparsat.ground_station.config import GroundStationConfig, mission_keys
from sparsat.ground_station.coordinator import Coordinator, TrainerUnavailable
from sparsat.ground_station.encoding import Projection, TokenSet
from sparsat.ground_station.ingest import Checked, IngestRules, check_batch, refusal
from sparsat.ground_station.prepare import (
    EncodingFailed,
    NotReady,
    Stream,
    Update,
    build_encoder,
    prepare,
    prepare_stream,
)
from sparsat.ground_station.store import NodeRecord, SampleStore
from sparsat.ground_station.uplink import Fitted
from sparsat.node.data.config import SensorSetup
from sparsat.node.data.datasets import load_dataset, split_size
from sparsat.node.data.sharding import owners, satellite_images, validation_indices
from sparsat.node.data.tiles import tile_edges
from sparsat.node.models import encoders
from sparsat.node.wire import control, downlink, security
from sparsat.node.wire.basis import Basis, from_pb, pb_basis
from sparsat.node.wire.codec import CodecError
from sparsat.node.wire.images import shared_head
from sparsat.node.wire.rpc import (
    INSTANCE,
    MAX_CONTROL_BYTES,
    ByteCounter,
    abort,
    add_standard_services,
    at_most,
    bind,
    caller,
    credential_bytes_received,
    make_server,
    received_size,
    wire_size,
)
from sparsat.node.wire.security import RESERVED_NAMES, Identity
from sparsat.node.wire.setup import MAX_N_TRAIN, setup_to_pb
from sparsat.proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb

log = logging.getLogger("sparsat.ground_station")
T = TypeVar("T")
SERVICES = ["sparsat.v1.Downlink", "sparsat.v1.Registry", "sparsat.v1.Health",
            "sparsat.v1.Mission"]

# A stalled or slow client must not take every worker thread: Send streams are capped (the
# ones beyond get RESOURCE_EXHAUSTED), one without a message for SEND_IDLE_S is cancelled,
# and the pool keeps CONTROL_WORKERS threads beyond the cap for Health, Register, Prepare...
MAX_SEND_STREAMS = 16
# One caller (a node's verified identity; without security, one connection) holds at most
# this many: one sensor host cannot take every stream, and what one caller can make the
# ground station hold is this many messages in flight (docs/deployment.md, "Bad bytes").
MAX_SEND_STREAMS_PER_CALLER = 4
SEND_IDLE_S = 30.0
CONTROL_WORKERS = 16
MAX_REGISTER_BYTES = 1 << 20  # a RegisterRequest within the field limits is under 600 kB
# Registration fields past these are refused (INVALID_ARGUMENT naming the limit); error
# messages quote at most QUOTE_CHARS of an offending id, so a status always fits gRPC's
# metadata limit (8 KiB) instead of turning into RESOURCE_EXHAUSTED on the client.
MAX_NODE_ID_CHARS = 128
MAX_ADDRESS_CHARS = 256
MAX_DEVICE_CHARS = 64
MAX_SATELLITES = 1024
QUOTE_CHARS = 64
MAX_ARRIVED_BATCHES = 4097  # one Transmit's batches (TRANSMIT_MAX_SAMPLES, and a spare)
MAX_REPLAY_SHARE = 1000.0
MAX_TRANSMIT_ID = 2**63 - 1  # what the store's integer column holds


class BatchRefused(Exception):
    """A batch refused whole, before it is decoded (it ends its stream)."""


def quote(text: str) -> str:
    """`text` for an error message: repr of at most QUOTE_CHARS characters."""
    return repr(text[:QUOTE_CHARS]) + ("..." if len(text) > QUOTE_CHARS else "")


class SendStreams:
    """The open Downlink.Send streams: at most `limit` at once, each cancelled by a watchdog
    thread when no message arrived for `idle_s` (a client that opened a stream and went
    silent holds a worker thread until then)."""

    def __init__(self, limit: int, idle_s: float,
                 per_caller: int = MAX_SEND_STREAMS_PER_CALLER) -> None:
        self.limit, self.idle_s, self.per_caller = limit, idle_s, per_caller
        self._lock = threading.Lock()
        self._open: dict[int, tuple[grpc.ServicerContext, float]] = {}
        self._caller: dict[int, str] = {}  # stream -> who opened it
        self._next = 0
        self._watchdog: threading.Thread | None = None
        self.cancelled = 0  # streams cancelled for being idle (tests, logs)

    def open(self, context: grpc.ServicerContext, who: str = "") -> int | str:
        """A key for a new stream from caller `who`, or why not (all `limit` streams open,
        or `per_caller` of them by `who`)."""
        with self._lock:
            if len(self._open) >= self.limit:
                return (f"{self.limit} downlink streams are open, the most this ground "
                        "station takes at once; retry later")
            mine = sum(1 for k in self._open if self._caller.get(k) == who)
            if mine >= self.per_caller:
                return (f"{who} has {mine} downlink streams open, the most one caller may "
                        "hold at once; retry later")
            self._next += 1
            self._open[self._next] = (context, time.monotonic())
            self._caller[self._next] = who
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch, daemon=True,
                                                  name="send-idle-watchdog")
                self._watchdog.start()
            return self._next

    def touch(self, key: int) -> None:
        with self._lock:
            if key in self._open:
                self._open[key] = (self._open[key][0], time.monotonic())

    def close(self, key: int) -> None:
        with self._lock:
            self._open.pop(key, None)
            self._caller.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._open)

    def _watch(self) -> None:
        tick = max(0.05, min(1.0, self.idle_s / 4))
        while True:
            time.sleep(tick)
            now = time.monotonic()
            with self._lock:
                idle = [(k, c) for k, (c, last) in self._open.items() if now - last > self.idle_s]
                for k, _ in idle:
                    del self._open[k]
                    self._caller.pop(k, None)
                self.cancelled += len(idle)
            for _, context in idle:
                log.warning("Send from %s: no message for %.0f s, cancelled", context.peer(),
                            self.idle_s)
                context.cancel()


class GroundStation(pb_grpc.DownlinkServicer, pb_grpc.RegistryServicer,
                    pb_grpc.HealthServicer, pb_grpc.MissionServicer):
    def __init__(self, cfg: GroundStationConfig, max_streams: int = MAX_SEND_STREAMS,
                 idle_s: float = SEND_IDLE_S) -> None:
        self.cfg = cfg
        self.streams = SendStreams(max_streams, idle_s)
        self.store = SampleStore(Path(cfg.store_dir) / "samples.sqlite")
        self.store.bind(hashlib.blake2b(cfg.sensor.to_json().encode(), digest_size=16).hexdigest())
        self.bytes = ByteCounter()  # this process's own count (Health)
        self.test_data = load_dataset(cfg.sensor.dataset, "test")
        enc = encoders.config(cfg.sensor.encoder)
        n_train = split_size(cfg.sensor.dataset, "train")
        if cfg.validation_subset:  # refused now, not after the downlink (ValueError)
            validation_indices(n_train, cfg.sensor.train_subset or n_train,
                               cfg.validation_subset, cfg.sensor.train_indices_seed)
        # which images each satellite holds, in sending order: told to each sensor host when it
        # registers, and the owner table ingest checks every sample against
        self.images = satellite_images(cfg.sensor)
        copies = cfg.sensor.mask.copies
        if cfg.sensor.capture is not None:  # revisits: copies of the id space, not of masks
            copies = cfg.sensor.capture.revisits(
                min((len(v) for v in self.images.values() if len(v)), default=1))
            if copies * n_train > MAX_N_TRAIN:
                raise ValueError(f"sensors.capture makes {cfg.sensor.capture.max_captures} "
                                 f"captures per satellite, {copies} visits of each image: "
                                 f"more sample ids than {MAX_N_TRAIN}; lower the rate")
        if cfg.sensor.codec.coded and self.test_data.image_shape is None:
            raise ValueError(f"sensors.payload.codec {cfg.sensor.codec.name}: image codecs "
                             "need a dataset whose images have one shape (a coded image's "
                             "size would come from the wire alone); use codec raw")
        self.rules = IngestRules(
            payload=cfg.sensor.payload, grid=enc.grid, dim=enc.embed_dim,
            num_classes=self.test_data.num_classes, image_shape=self.test_data.image_shape,
            n_train=n_train, copies=copies, cls_dtype=cfg.sensor.cls_dtype,
            owner=owners(n_train, [self.images[s] for s in cfg.sensor.satellites]),
            satellites={s: k for k, s in enumerate(cfg.sensor.satellites)},
            projected=cfg.sensor.projection is not None,
            unprojected=(cfg.sensor.projection is not None
                         and cfg.sensor.projection.method == "supervised"),
            bases={}, dictionaries={}, codec=cfg.sensor.codec)
        # projected CLS payloads: what was fitted and uplinked (Uplink), by version: the
        # ingest rules read the same mappings
        self.bases: dict[int, Basis] = self.rules.bases  # type: ignore[assignment]
        self.dictionaries: dict[int, Any] = self.rules.dictionaries  # type: ignore[assignment]
        self.fitted: Fitted | None = None
        self._uplink_lock = threading.Lock()
        for _, basis, dictionary, fit_tokens, fit_s in self.store.uplinked():  # a restart
            self._adopt(Fitted(from_pb(pb_basis(basis), enc.embed_dim),
                               uplink.load_dictionary(dictionary), fit_tokens, fit_s))
        # Every registration is stored. After a restart a node's enrollment holds (its role,
        # its satellites: their samples are accepted, no other node takes them), but its
        # address is listed (nodes: ListNodes, trainers for Prepare) only once it registered
        # with this process: it may have moved (sparsat run --resume starts new processes on
        # new ports), and it registers again by itself within seconds (node/processes/rejoin.py).
        self.enrolled: dict[str, pb.NodeInfo] = {
            r.node_id: control.node_info(r.node_id, control.role_name(r.role), r.address,
                                         r.satellites, r.device)
            for r in self.store.nodes()}
        self.nodes: dict[str, pb.NodeInfo] = {}
        self.known_sensors: set[str] = self._enrolled()
        if self.enrolled:
            log.info("enrolled nodes from the store: %s", ", ".join(sorted(self.enrolled)))
        self._lock = threading.Lock()  # nodes, tokens, coordinator
        self._train_lock = threading.Lock()  # one Prepare or TrainEpoch at a time
        self.train_tokens: TokenSet | None = None
        self.test_tokens: TokenSet | None = None
        self.validation_tokens: TokenSet | None = None
        self.encoder_precision = ("", "")  # (what the encoder stage used, why), after Prepare
        self.coordinator: Coordinator | None = None
        self.stream: Stream | None = None  # streaming missions: the encoder stage's state

    # ---- Downlink ------------------------------------------------------------------------

    def Send(self, request_iterator: Iterator[pb.DownlinkBatch],
             context: grpc.ServicerContext) -> Iterator[pb.BatchAck]:
        who = caller(context)
        key = self.streams.open(context, who.describe() if who else f"peer {context.peer()}")
        if isinstance(key, str):
            abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, key)
        try:
            yield from self._send(request_iterator, context, key)
        finally:
            self.streams.close(key)

    def _send(self, request_iterator: Iterator[pb.DownlinkBatch],
              context: grpc.ServicerContext, key: int) -> Iterator[pb.BatchAck]:
        satellite, transmit_id = "", 0
        for msg in request_iterator:
            self.streams.touch(key)
            size = received_size(context, msg)  # as it arrived, however it was encoded
            self.bytes.add(received=size)
            if not satellite:
                # the stream's call credentials came on the downlink with its first batch (as
                # the sensor host charges them): counted as received
                credentials = credential_bytes_received(context)
                if credentials:
                    self.store.count(received_bytes=credentials, credential_bytes=credentials)
                    self.bytes.add(received=credentials)
                refusal = self._stream_refusal(msg.satellite_id, caller(context))
                if refusal is not None:  # the whole batch refused, counted as such
                    self.store.count(received_bytes=size, received=len(msg.ids),
                                     rejected=len(msg.ids))
                    abort(context, *refusal)
                satellite, transmit_id = msg.satellite_id, int(msg.transmit_id)
                if transmit_id > MAX_TRANSMIT_ID:
                    self.store.count(received_bytes=size, received=len(msg.ids),
                                     rejected=len(msg.ids))
                    abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                          f"transmit_id {transmit_id} is past {MAX_TRANSMIT_ID}")
            try:
                ack = self._ingest(msg, satellite, size, transmit_id)
            except BatchRefused as e:
                abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"{satellite[:64]}: {e}")
            self.bytes.add(sent=wire_size(ack))
            yield ack
            self.streams.touch(key)

    @staticmethod
    def _stream_refusal(satellite: str, who: Identity | None
                        ) -> tuple[grpc.StatusCode, str] | None:
        """Why a stream whose first batch names `satellite` is refused, or None: it must name
        one, and a caller with credentials may speak only for its own satellites."""
        if not satellite:
            return (grpc.StatusCode.INVALID_ARGUMENT,
                    "the first batch of a stream must name its satellite")
        if who is not None and satellite not in who.satellites:
            return (grpc.StatusCode.PERMISSION_DENIED,
                    f"{who.name} may not send as {quote(satellite)}")
        return None

    def _ingest(self, msg: pb.DownlinkBatch, satellite: str, size: int,
                transmit_id: int = 0) -> pb.BatchAck:
        """Check, store and answer one batch: every sample stored, a duplicate, or refused
        alone with its reason."""
        try:
            batch = downlink.pb_to_batch(msg, self.rules.max_id)
        except CodecError as e:  # more samples than a batch may hold: nothing was allocated
            self.store.count(received_bytes=size, received=len(msg.ids), rejected=len(msg.ids))
            raise BatchRefused(str(e)) from e
        if msg.satellite_id and msg.satellite_id != satellite:
            n = len(batch.ids)
            checked = Checked([], [], [
                refusal(k, downlink.RejectCause.SATELLITE_CHANGED,
                        "the satellite changed within a stream")
                for k in range(n)])
        else:
            checked = check_batch(batch, satellite, self.rules, self.known_sensors)
        duplicates, conflicts = self.store.put_batch(
            checked.rows, size, batch.ids.astype("<i8").tobytes(), satellite[:256],
            bool(msg.satellite_id), len(checked.rejected), transmit_id)
        rejected = checked.rejected + [
            refusal(checked.positions[k], downlink.RejectCause.CONFLICT,
                    "id stored before with other content")
            for k in conflicts]
        for pos, _, _, reason in rejected[:4]:  # the whole reason; the ack carries its head
            log.warning("%s: sample at %d refused: %s", satellite[:64], pos, reason)
        return downlink.ack_to_pb(downlink.AckData(
            stored=len(checked.rows) - len(duplicates) - len(conflicts),
            duplicates=[checked.positions[k] for k in duplicates], rejected=sorted(rejected)))

    # ---- Registry and Health --------------------------------------------------------------

    def Register(self, request: pb.RegisterRequest,
                 context: grpc.ServicerContext) -> pb.RegisterReply:
        if not request.node_id or not request.address:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, "node_id and address are required")
        if request.role not in (control.SENSOR, control.TRAINER):  # before anything names it
            known = control.known_role(request.role)
            abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                  f"role {control.role_name(request.role) if known else request.role} cannot "
                  f"register: the roles are SENSOR ({control.SENSOR}) and TRAINER "
                  f"({control.TRAINER})")
        _check_sizes(request, context)
        if request.node_id in RESERVED_NAMES:  # nodes dial these names: never a node's
            abort(context, grpc.StatusCode.PERMISSION_DENIED,
                  f"node id {quote(request.node_id)} is reserved for the "
                  f"{RESERVED_NAMES[request.node_id]}; no sensor host or trainer may register "
                  "under it")
        who = caller(context)
        if who is not None:  # the credentials decide who a node may register as
            role = {control.SENSOR: "sensor", control.TRAINER: "trainer"}.get(request.role)
            if request.node_id != who.name or role != who.role:
                abort(context, grpc.StatusCode.PERMISSION_DENIED,
                      f"{who.describe()} may register only as itself, not as "
                      f"{quote(request.node_id)} ({role or 'no node role'})")
            stray = [s for s in request.satellite_ids if s not in who.satellites]
            if stray:
                abort(context, grpc.StatusCode.PERMISSION_DENIED,
                      f"{who.name} may not speak for satellites {_quote_list(stray)}")
        if request.role == control.SENSOR:
            scenario = self.cfg.sensor.satellites
            stray = [s for s in request.satellite_ids if s not in scenario]
            if not request.satellite_ids:
                abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                      "a sensor host must name the satellites it hosts (satellite_ids)")
            if stray:
                abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                      f"satellites {_quote_list(stray)} are not in this scenario, whose "
                      f"{len(scenario)} satellites are {_quote_list(scenario)}")
            config_json = self.cfg.sensor.to_json()
            setup = setup_to_pb(sensor_setup(
                self.rules, {s: self.images[s] for s in request.satellite_ids}))
        else:  # TRAINER
            setup = None
            config_json = json.dumps({"training": self.cfg.training.strategy,
                                      "threads": self.cfg.training.threads})
        info = control.node_info(request.node_id, request.role, request.address,
                                 request.satellite_ids, request.device)
        with self._lock:
            self._check_enrollment(request, context)
            self.store.save_node(NodeRecord(request.node_id, request.role, request.address,
                                            tuple(request.satellite_ids), request.device))
            self.enrolled[request.node_id] = self.nodes[request.node_id] = info
            if request.role == control.SENSOR:  # only validated sensor registrations count
                self.known_sensors = self._enrolled()
            elif self.coordinator is not None:  # a trainer (back) during training: it rejoins
                self.coordinator.add_trainer(request.node_id, request.address)
        log.info("registered %s (%s) at %s", request.node_id, control.role_name(request.role),
                 request.address)
        # the instance the node registered with: a restart any time after this is one it sees
        creds = security.active()  # the revocation list it holds goes to every node
        revoked = creds.revocations.signed() if creds and creds.revocations else b""
        return control.register_answer(config_json, INSTANCE, setup, revoked)

    def _check_enrollment(self, request: pb.RegisterRequest,
                          context: grpc.ServicerContext) -> None:
        """A node keeps its role, and a satellite belongs to the sensor host that enrolled
        it, until that node registers again (with other satellites). Called holding _lock."""
        old = self.enrolled.get(request.node_id)
        if old is not None and old.role != request.role:
            abort(context, grpc.StatusCode.PERMISSION_DENIED,
                  f"node {quote(request.node_id)} is registered as "
                  f"{control.role_name(old.role)}; it cannot register as "
                  f"{control.role_name(request.role)}")
        owner = {s: n.node_id for n in self.enrolled.values()
                 if n.role == control.SENSOR and n.node_id != request.node_id
                 for s in n.satellite_ids}
        taken = [s for s in request.satellite_ids if s in owner]
        if taken:
            abort(context, grpc.StatusCode.PERMISSION_DENIED,
                  f"satellites {_quote_list(taken)} are enrolled by sensor host "
                  f"{quote(owner[taken[0]])}; only it may register them")

    def _enrolled(self) -> set[str]:
        """The satellites enrolled sensor hosts speak for (the ones Send accepts)."""
        return {s for n in self.enrolled.values() if n.role == control.SENSOR
                for s in n.satellite_ids}

    def ListNodes(self, request: pb.ListNodesRequest,
                  context: grpc.ServicerContext) -> pb.ListNodesReply:
        with self._lock:
            nodes = [self.nodes[k] for k in sorted(self.nodes)]
        return control.list_nodes_reply(nodes)

    def Check(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthReply:
        return control.health_reply(self.cfg.node_id, control.GROUND_STATION,
                                    self.bytes.received, self.bytes.sent, INSTANCE)

    # ---- Mission ----------------------------------------------------------------------------

    def Prepare(self, request: pb.PrepareRequest,
                context: grpc.ServicerContext) -> Iterator[pb.Progress]:
        """Encode the store and the test split, connect the trainers; streams progress."""
        if not self._train_lock.acquire(blocking=False):
            abort(context, grpc.StatusCode.FAILED_PRECONDITION, "Prepare or TrainEpoch running")
        try:
            if request.stream:
                yield from self._prepare_stream(request, context)
            else:
                yield from self._prepare(context)
        finally:
            self._train_lock.release()

    def _prepare_stream(self, request: pb.PrepareRequest,
                        context: grpc.ServicerContext) -> Iterator[pb.Progress]:
        """A streaming update's encoder stage: what arrived by request.upto_s and was not
        encoded yet is encoded and appended (the first call also encodes the test split and
        makes the coordinator)."""
        if not (math.isfinite(request.upto_s) and request.upto_s >= 0):
            abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                  f"upto_s must be a mission time (finite, >= 0), got {request.upto_s}")
        if self.cfg.resume:
            abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                  "a streaming mission cannot resume from a checkpoint: run it from the start")
        self._trainer_nodes(context)
        first = self.stream is None
        try:
            stream = yield from _as_progress(prepare_stream(
                self.cfg, self.store, self.test_data, request.upto_s, self.stream,
                self._projection(context)))
        except NotReady as e:
            abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except EncodingFailed as e:
            log.error("encoding failed", exc_info=e.__cause__)
            abort(context, grpc.StatusCode.INTERNAL, str(e))
        prepared = stream.prepared
        with self._lock:
            if first:
                for n in self.nodes.values():
                    if n.role == control.TRAINER:
                        prepared.coordinator.add_trainer(n.node_id, n.address)
                self.coordinator = prepared.coordinator
                self.test_tokens = prepared.test
                self.validation_tokens = prepared.validation
                self.encoder_precision = (prepared.precision, prepared.precision_note)
            self.stream = stream
            self.train_tokens = prepared.train

    def Arrived(self, request: pb.ArrivedRequest,
                context: grpc.ServicerContext) -> pb.ArrivedReply:
        """Stamp one Transmit's batches with the mission times they finished on the air."""
        if request.satellite_id not in (self.rules.satellites or {}):
            abort(context, grpc.StatusCode.NOT_FOUND,
                  f"{quote(request.satellite_id)} is not a satellite of this mission")
        if not 0 < request.transmit_id <= MAX_TRANSMIT_ID:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                  f"transmit_id must be in [1, {MAX_TRANSMIT_ID}], got {request.transmit_id}")
        ends = list(request.batch_end_s)
        if len(ends) > MAX_ARRIVED_BATCHES:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                  f"{len(ends)} batch times, at most {MAX_ARRIVED_BATCHES} (one Transmit's)")
        if not all(math.isfinite(e) and e >= 0 for e in ends):
            abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                  "batch_end_s must be mission times (finite, >= 0)")
        return gs_serde.arrived_reply(self.store.stamp(request.satellite_id,
                                                       int(request.transmit_id), ends))

    def _prepare(self, context: grpc.ServicerContext) -> Iterator[pb.Progress]:
        if not len(self.store):
            abort(context, grpc.StatusCode.FAILED_PRECONDITION, "no samples stored yet")
        self._trainer_nodes(context)  # fail early, before the long encoding
        try:
            prepared = yield from _as_progress(prepare(self.cfg, self.store, self.test_data,
                                                       self.rules.n_train,
                                                       self._projection(context)))
        except NotReady as e:
            abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except EncodingFailed as e:
            log.error("encoding failed", exc_info=e.__cause__)
            abort(context, grpc.StatusCode.INTERNAL, str(e))
        with self._lock:  # with the registry locked: no trainer registers in between
            for n in self.nodes.values():
                if n.role == control.TRAINER:
                    prepared.coordinator.add_trainer(n.node_id, n.address)
            self.train_tokens, self.test_tokens = prepared.train, prepared.test
            self.validation_tokens = prepared.validation
            self.encoder_precision = (prepared.precision, prepared.precision_note)
            if self.coordinator is not None:
                self.coordinator.close()
            self.coordinator = prepared.coordinator

    def _trainer_nodes(self, context: grpc.ServicerContext) -> list[pb.NodeInfo]:
        k = self.cfg.training.num_workers
        with self._lock:
            found = [self.nodes[n] for n in sorted(self.nodes)
                     if self.nodes[n].role == control.TRAINER]
        if len(found) < k:
            abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                  f"{self.cfg.training.strategy} needs {k} trainers, {len(found)} registered")
        return found

    def TrainEpoch(self, request: pb.TrainEpochRequest,
                   context: grpc.ServicerContext) -> pb.EpochReport:
        if not self._train_lock.acquire(blocking=False):
            abort(context, grpc.StatusCode.FAILED_PRECONDITION, "Prepare or TrainEpoch running")
        try:
            return self._train_epoch(request, context)
        finally:
            self._train_lock.release()

    def _train_epoch(self, request: pb.TrainEpochRequest,
                     context: grpc.ServicerContext) -> pb.EpochReport:
        with self._lock:
            coord, train, test = self.coordinator, self.train_tokens, self.test_tokens
            val = self.validation_tokens
        if coord is None or train is None or test is None:
            abort(context, grpc.StatusCode.FAILED_PRECONDITION, "call Prepare first")
        share = float(request.replay_share)
        if not (math.isfinite(share) and 0 <= share <= MAX_REPLAY_SHARE):
            abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                  f"replay_share must be in [0, {MAX_REPLAY_SHARE}], got {share}")
        if request.new_rows_only and self.stream is None:
            abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                  "new_rows_only is for streaming missions (Prepare with stream set)")
        try:
            result = coord.train_epoch(int(request.epoch), torch.from_numpy(test.features),
                                       torch.from_numpy(test.labels),
                                       {k: torch.from_numpy(v) for k, v in test.groups.items()},
                                       (torch.from_numpy(val.features),
                                        torch.from_numpy(val.labels)) if val else None,
                                       new_rows_only=bool(request.new_rows_only),
                                       replay_share=share)
        except TrainerUnavailable as e:
            abort(context, grpc.StatusCode.UNAVAILABLE, str(e))
        except CheckpointError as e:
            abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except (RuntimeError, ValueError) as e:
            log.error("epoch %d failed", request.epoch, exc_info=e)
            abort(context, grpc.StatusCode.INTERNAL, f"training failed: {e}")
        log.info("epoch %d: accuracy %.4f", result.epoch, result.accuracy)
        return gs_serde.epoch_to_pb(result)

    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StatsReply:
        c = self.store.counters()  # the store's: the whole run, across restarts
        return gs_serde.stats_reply(
            samples_stored=len(self.store), samples_received=c.get("received", 0),
            duplicates=c.get("duplicates", 0), rejected=c.get("rejected", 0),
            downlink_bytes_received=c.get("received_bytes", 0),
            downlink_credential_bytes_received=c.get("credential_bytes", 0),
            encoder_precision=self.encoder_precision[0],
            encoder_precision_note=self.encoder_precision[1],
            samples_arrived=c.get("arrived", 0),
            train_tokens=len(self.train_tokens.labels) if self.train_tokens else 0,
            test_tokens=len(self.test_tokens.labels) if self.test_tokens else 0,
            test_skipped=self.test_tokens.skipped if self.test_tokens else 0,
            test_encode_flops=self.test_tokens.flops if self.test_tokens else 0,
            peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
            detector=self.test_tokens.detector if self.test_tokens else (0, 0, 0, 0),
        )

    def _projection(self, context: grpc.ServicerContext) -> Projection | None:
        """(bases, the final one) for the encoder stage; None without a projection.
        FAILED_PRECONDITION when the scenario projects and no basis was fitted yet."""
        if self.cfg.sensor.projection is None:
            return None
        if self.fitted is None:
            abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                  "no basis was fitted (Uplink): projected tokens cannot be read yet")
        return dict(self.bases), self.fitted.basis

    def _adopt(self, fitted: Fitted) -> None:
        """A basis (and dictionary) uplinked: its codes are read from now on."""
        self.bases[fitted.basis.version] = fitted.basis
        if fitted.dictionary is not None:
            self.dictionaries[fitted.dictionary.dict_id()] = fitted.dictionary
        self.fitted = fitted

    def Uplink(self, request: pb.UplinkRequest,
               context: grpc.ServicerContext) -> pb.UplinkReply:
        """The basis (and zstd dictionary) satellites are to be uplinked: fitted on the first
        call that can (uplink.fit), the same one after."""
        if self.cfg.sensor.projection is None:
            abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                  "this scenario's payload has no projection: nothing to uplink")
        with self._uplink_lock:
            if self.fitted is None:
                try:
                    encoder = build_encoder(self.cfg)
                    fitted = uplink.fit(self.cfg, self.store, encoder)
                except (uplink.NotFitted, NotReady) as e:
                    abort(context, grpc.StatusCode.FAILED_PRECONDITION, str(e))
                except ValueError as e:  # the scenario's projection cannot be fitted at all
                    abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"basis: {e}")
                self.store.save_uplinked(
                    fitted.basis.version, fitted.basis.to_pb().SerializeToString(),
                    fitted.dictionary.as_bytes() if fitted.dictionary is not None else b"",
                    fitted.fit_tokens, fitted.fit_s)
                self._adopt(fitted)
                log.info("basis %d fitted (%s, D=%d, %s) on %d tokens in %.1f s",
                         fitted.basis.version, fitted.basis.method, fitted.basis.dim,
                         fitted.basis.quantizer, fitted.fit_tokens, fitted.fit_s)
            f = self.fitted
            assert f is not None
        return gs_serde.uplink_reply(f.basis.to_pb(), f.dictionary.as_bytes()
                                     if f.dictionary is not None else b"", f.fit_tokens, f.fit_s)

    def Describe(self, request: pb.DescribeRequest,
                 context: grpc.ServicerContext) -> pb.MissionInfo:
        """The mission this ground station runs (its scenario's keys, flattened), so that mission
        control can refuse to drive it with another scenario; and whether a restart lost the
        Prepare state (prepared) or the training (rounds_done)."""
        text = json.dumps(mission_keys(self.cfg), sort_keys=True)
        with self._lock:
            coord = self.coordinator
        return gs_serde.mission_info(
            text, INSTANCE, coord is not None,
            hashlib.blake2b(text.encode(), digest_size=16).hexdigest(),
            coord.round if coord is not None else 0)


def sensor_setup(rules: IngestRules, images: dict[str, np.ndarray]) -> SensorSetup:
    """What a sensor host holding `images` (satellite -> training indices, in sending order)
    is told at registration: the scenario's ids, grid, payload and tiles, as ingest checks
    them."""
    cls = rules.payload == "cls"
    shape = rules.image_shape
    return SensorSetup(
        n_train=rules.n_train, grid=rules.grid, copies=rules.copies,
        payload="cls" if cls else "patches", cls_dim=rules.dim if cls else 0,
        cls_dtype=rules.cls_dtype if cls else None,
        tile_rows=tuple(tile_edges(shape[0], rules.grid).tolist()) if shape else (),
        tile_cols=tuple(tile_edges(shape[1], rules.grid).tolist()) if shape else (),
        images=images, projected=rules.projected, send_unprojected=rules.unprojected,
        codec=rules.codec,
        codec_header=shared_head(rules.codec, shape) if shape is not None else b"")


def _check_sizes(request: pb.RegisterRequest, context: grpc.ServicerContext) -> None:
    """Absurdly long fields are refused before they reach the registry, its store and logs."""
    limits = [("node_id", len(request.node_id), MAX_NODE_ID_CHARS, "characters"),
              ("address", len(request.address), MAX_ADDRESS_CHARS, "characters"),
              ("device", len(request.device), MAX_DEVICE_CHARS, "characters"),
              ("satellite_ids", len(request.satellite_ids), MAX_SATELLITES, "satellites")]
    for field, size, limit, unit in limits:
        if size > limit:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                  f"{field} has {size} {unit}, more than the limit of {limit}")


def _quote_list(ids: list[str]) -> str:
    """At most 4 ids, each quoted with at most QUOTE_CHARS characters."""
    shown = ", ".join(quote(s) for s in ids[:4])
    return f"[{shown}{f', ... ({len(ids)} in all)' if len(ids) > 4 else ''}]"


def _as_progress(run: Generator[Update, None, T]) -> Generator[pb.Progress, None, T]:
    """prepare()'s updates as sparsat.v1.Progress messages; returns what it returns."""
    while True:
        try:
            update = next(run)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        yield gs_serde.update_to_pb(update)


def build_server(station: GroundStation, listen: str) -> tuple[grpc.Server, str]:
    # every Send stream can hold a thread, and control calls still find one
    # a message is sized before it is parsed: batches field by field, a registration (up to
    # MAX_SATELLITES names) whole, every other call (health, mission, reflection) whole
    server = make_server(max_workers=station.streams.limit + CONTROL_WORKERS,
                         prechecks={"/sparsat.v1.Downlink/Send": downlink.check_batch_wire,
                                    "/sparsat.v1.Registry/Register": at_most(MAX_REGISTER_BYTES)},
                         max_request_bytes=MAX_CONTROL_BYTES)
    pb_grpc.add_DownlinkServicer_to_server(station, server)
    pb_grpc.add_RegistryServicer_to_server(station, server)
    pb_grpc.add_HealthServicer_to_server(station, server)
    pb_grpc.add_MissionServicer_to_server(station, server)
    add_standard_services(server, SERVICES)
    return server, bind(server, listen)


def serve(cfg: GroundStationConfig, listen: str, port_file: Path | None = None) -> None:
    station = GroundStation(cfg)
    server, address = build_server(station, listen)
    server.start()
    log.info("ground station serving on %s", address)
    if port_file is not None:
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(address)
        tmp.replace(port_file)  # atomic: a reader never sees half an address
    server.wait_for_termination()



