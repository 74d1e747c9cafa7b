"""Trainer node: a gRPC server that trains the MLP pieces it is sent.

It holds token datasets streamed to it once, and for each Train call builds the (sub)network
from the received parameters, runs exactly the requested number of local steps, and returns
the parameters. It never sees the encoder, the partition, or other workers.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc
import numpy as np
import torch

from sparsat.node.models.mlp import MLP
from sparsat.node.models.training import Adam, epoch_order, resolve_device, steps_for, train_steps
from sparsat.node.processes.rejoin import Rejoin
from sparsat.node.wire import control
from sparsat.node.wire.codec import CodecError
from sparsat.node.wire.jobs import (
    load_dataset_reply,
    pb_to_train_job,
    request_parts,
    split_reply,
    train_reply,
)
from sparsat.node.wire.rpc import (
    CHUNK_BYTES,
    INSTANCE,
    ByteCounter,
    Registered,
    abort,
    add_standard_services,
    bind,
    make_server,
    received_size,
    register,
    wire_size,
)
from sparsat.node.wire.tensors import pb_to_ndarray
from sparsat.proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb

log = logging.getLogger("sparsat.trainer")

MAX_DATASETS = 2  # token datasets a trainer holds at once


def apply_training_config(config_json: str) -> int:
    """Set torch's CPU thread count from the ground station's RegisterReply.config_json
    ({"training": strategy, "threads": N}) and return the count in force.

    The order in which a CPU matmul sums follows the thread count, so two trainers with other
    counts give other bits for the same job, and a run drifts away from another within a few
    epochs (tests/test_trainer_threads.py). The scenario's `training.threads` is the one count
    for every trainer. A config without it (an older ground station) changes nothing."""
    try:
        config = json.loads(config_json) if config_json else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"ground station's trainer config is not JSON: {e}") from e
    threads = config.get("threads") if isinstance(config, dict) else None
    if threads is not None:
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ValueError(f"ground station's trainer config: threads must be an integer "
                             f">= 1, got {threads!r}")
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
            log.info("torch threads set to %d (the scenario's training.threads)", threads)
    return torch.get_num_threads()


def device_label(device: torch.device, threads: int | None = None) -> str:
    """RegisterRequest.device: the device and torch's CPU threads (`threads`, or this
    thread's count), e.g. "cpu (2 threads)", so results record where and how each trainer
    ran."""
    return f"{device} ({threads or torch.get_num_threads()} threads)"


def use_threads(threads: int | None) -> None:
    """Run this thread's torch work with `threads` CPU threads (None: leave it). torch's
    count is per OS thread once a thread has run torch code: torch.set_num_threads on the
    main thread (or the rejoin watcher's) misses the gRPC worker threads that already
    trained, so Train sets it on its own thread (tests/test_trainer_threads.py)."""
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def register_trainer(ground_station: str, request: pb.RegisterRequest,
                     servicer: TrainerServicer, wait_s: float | None = None) -> Registered:
    """Register, take the thread count from the ground station's answer for the servicer's
    next jobs (servicer.threads), and return the last answer. When that changed the count,
    register again so the registry (and results.json's `devices`) records the count the
    trainer trains with, not the one it started with. At start and after a ground-station
    restart (whose scenario may say another count) alike."""
    registered = register(ground_station, request, wait_s)
    threads = apply_training_config(registered.config_json)
    servicer.threads = threads
    label = device_label(servicer.device, threads)
    if label != request.device:
        request.device = label
        registered = register(ground_station, request, wait_s)
    return registered


# The most one token dataset may hold (features, float32): what is announced (total_rows x
# dim x 4) is checked at the first chunk, what arrives against what was announced at every
# chunk, before it is decoded or kept.
MAX_DATASET_BYTES = 4 << 30


def _chunk_rows(chunk: pb.DatasetChunk) -> int:
    shape = chunk.features.shape
    return int(shape[0]) if len(shape) == 2 else 0


def _check_dataset_chunk(chunk: pb.DatasetChunk, rows: int,
                         context: grpc.ServicerContext) -> None:
    """Refuse a chunk whose announced size, or the rows it brings beyond `rows` received so
    far, pass their limits (INVALID_ARGUMENT), before anything is decoded from it."""
    shape = chunk.features.shape
    dim = int(shape[1]) if len(shape) == 2 else 0  # another rank: refused when decoded
    if chunk.total_rows * dim * 4 > MAX_DATASET_BYTES:
        abort(context, grpc.StatusCode.INVALID_ARGUMENT,
              f"dataset chunk: {chunk.total_rows} rows of {dim} float32 features are more "
              f"than the {MAX_DATASET_BYTES} bytes a trainer holds for one dataset")
    if rows + _chunk_rows(chunk) > chunk.total_rows:
        abort(context, grpc.StatusCode.INVALID_ARGUMENT,
              f"dataset chunk: {rows + _chunk_rows(chunk)} rows so far, more than the "
              f"{chunk.total_rows} announced")


def _check_append(chunk: pb.DatasetChunk, context: grpc.ServicerContext) -> None:
    """Refuse an append-only upload's base that cannot be (INVALID_ARGUMENT): base rows
    without a base, or more base rows than the whole dataset announced."""
    if chunk.base_rows and not chunk.base_id:
        abort(context, grpc.StatusCode.INVALID_ARGUMENT,
              f"dataset chunk: {chunk.base_rows} base rows without a base_id")
    if chunk.base_rows > chunk.total_rows:
        abort(context, grpc.StatusCode.INVALID_ARGUMENT,
              f"dataset chunk: {chunk.base_rows} base rows, more than the {chunk.total_rows} "
              "announced")


class TrainerServicer(pb_grpc.TrainerServicer, pb_grpc.HealthServicer):
    def __init__(self, node_id: str, device: torch.device) -> None:
        self.node_id = node_id
        self.device = device
        self.bytes = ByteCounter()
        self.datasets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._lock = threading.Lock()
        # torch CPU threads for Train (the scenario's training.threads, told at
        # registration); None: whatever the worker thread has
        self.threads: int | None = None

    def LoadDataset(
        self, request_iterator: Iterator[pb.DatasetChunk], context: grpc.ServicerContext
    ) -> pb.LoadDatasetReply:
        feats: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        dataset_id, total, rows = "", 0, 0
        base: tuple[torch.Tensor, torch.Tensor] | None = None  # an append-only upload's
        base_id, base_rows, first = "", 0, True
        for chunk in request_iterator:
            self.bytes.add(received=received_size(context, chunk))
            if dataset_id and chunk.dataset_id != dataset_id:
                abort(context, grpc.StatusCode.INVALID_ARGUMENT, "dataset_id changed mid-stream")
            if dataset_id and chunk.total_rows != total:
                abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                      f"dataset chunk: total_rows changed from {total} to {chunk.total_rows}")
            if not first and (chunk.base_id, chunk.base_rows) != (base_id, base_rows):
                abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                      "dataset chunk: base_id or base_rows changed mid-stream")
            dataset_id, total = chunk.dataset_id, chunk.total_rows
            if first:  # rows so far start at the base's
                _check_append(chunk, context)
                base_id, base_rows, rows = chunk.base_id, chunk.base_rows, chunk.base_rows
            _check_dataset_chunk(chunk, rows, context)
            if first and base_id:  # held, with enough rows: before anything more is read
                base = self._base(base_id, base_rows, context)
            first = False
            rows += _chunk_rows(chunk)
            try:
                x, y = pb_to_ndarray(chunk.features), pb_to_ndarray(chunk.labels)
            except CodecError as e:
                abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"dataset chunk: {e}")
            if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or x.dtype != np.float32 \
                    or y.dtype != np.int64:
                abort(context, grpc.StatusCode.INVALID_ARGUMENT, "dataset chunk: features must be "
                              "(rows, dim) float32, labels (rows,) int64")
            if len(y) and int(y.min()) < 0:
                abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                              f"dataset chunk: negative label {int(y.min())}")
            if feats and x.shape[1] != feats[0].shape[1]:
                abort(context, grpc.StatusCode.INVALID_ARGUMENT, "dataset chunk: dim changed")
            if base is not None and x.shape[1] != base[0].shape[1]:
                abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                      f"dataset chunk: dim {x.shape[1]}, its base {base_id!r} has "
                      f"{base[0].shape[1]}")
            feats.append(x)
            labels.append(y)
        if not dataset_id or rows == 0 or rows != total:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                          f"dataset {dataset_id!r}: got {rows} rows, announced {total}")
        x_all = torch.from_numpy(np.concatenate(feats)).to(self.device)
        y_all = torch.from_numpy(np.concatenate(labels)).to(self.device)
        if base is not None:  # the base's first base_rows rows, then these
            x_all, y_all = torch.cat([base[0], x_all]), torch.cat([base[1], y_all])
        with self._lock:
            self.datasets.pop(dataset_id, None)
            self.datasets[dataset_id] = (x_all, y_all)
            # random masks bring a new dataset every epoch: keep the newest few only
            while len(self.datasets) > MAX_DATASETS:
                del self.datasets[next(iter(self.datasets))]
        log.info("dataset %s loaded: %d rows on %s (%d of them from %r)", dataset_id, rows,
                 self.device, base_rows, base_id)
        reply = load_dataset_reply(dataset_id, rows)
        self.bytes.add(sent=wire_size(reply))
        return reply

    def _base(self, base_id: str, base_rows: int, context: grpc.ServicerContext
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `base_rows` rows of held dataset `base_id` (kept referenced: an eviction
        meanwhile does not take them away), FAILED_PRECONDITION when it is not held or is
        shorter: the ground station then sends the dataset whole."""
        with self._lock:
            held = self.datasets.get(base_id)
        if held is None or len(held[0]) < base_rows:
            abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                  f"append to dataset {base_id!r}: {self.node_id} holds "
                  f"{0 if held is None else len(held[0])} of its {base_rows} rows")
        return held[0][:base_rows], held[1][:base_rows]

    def Train(self, request_iterator: Iterator[pb.TrainRequest],
              context: grpc.ServicerContext) -> Iterator[pb.TrainReply]:
        """Train the pieces sent in parts; the reply goes back in parts of about CHUNK_BYTES
        (a 768-2000-2000 MLP with its moments is more than gRPC's 64 MiB in one message)."""
        parts = request_parts()
        try:
            for part in request_iterator:  # counted as they come: a broken call is charged
                size = received_size(context, part)
                self.bytes.add(received=size)
                parts.add(part, size)  # past MAX_TRAIN_BYTES: refused before it is merged
            request = parts.joined()  # tensors that came in pieces joined
        except CodecError as e:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"train request: {e}")
        if request.dataset_id not in self.datasets:
            abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                          f"dataset {request.dataset_id!r} not loaded on {self.node_id}")
        if request.rows == 0 or request.batch_size == 0 or not request.lr > 0:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, "rows, batch_size and lr must be > 0")
        if request.steps != steps_for(request.rows, request.batch_size):
            abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                  f"{request.rows} rows in batches of {request.batch_size} are "
                  f"{steps_for(request.rows, request.batch_size)} steps, not {request.steps}")
        try:
            job = pb_to_train_job(request)
            model = MLP.from_params(job.params)
        except (CodecError, ValueError) as e:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        x, y = self.datasets[job.dataset_id]
        if not job.order_replay <= job.order_start <= len(x):
            abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                  f"a pass from row {job.order_start} replaying {job.order_replay} older rows: "
                  f"needs replay <= start <= the dataset's {len(x)} rows")
        length = len(x) - job.order_start + job.order_replay  # the pass's rows
        if job.offset + job.rows > length:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                  f"rows [{job.offset}, {job.offset + job.rows}) are past the pass's {length} "
                  f"(of the dataset's {len(x)})")
        if model.fc1.in_features != x.shape[1]:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                          f"w1 expects {model.fc1.in_features} features, dataset has {x.shape[1]}")
        if int(y.max()) >= model.fc3.out_features:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                          f"labels reach {int(y.max())}, the model has {model.fc3.out_features}")
        use_threads(self.threads)  # this worker thread may have trained at another count
        model.to(self.device)
        model.hidden_scale = job.hidden_scale
        adam = Adam(model.wire_parameters(), job.lr, job.moments)  # moments None: fresh
        order = epoch_order(len(x), job.seed, job.order_start, job.order_replay)
        rows = torch.from_numpy(order[job.offset : job.offset + job.rows])
        steps, loss = train_steps(model, x, y, rows, job.batch_size, adam)
        # moments travel (sent with the job): they go back with the weights
        reply = train_reply(model.params(), steps, loss,
                            adam.state.compact() if job.moments is not None else None)
        for part in split_reply(reply, CHUNK_BYTES):
            yield part
            self.bytes.add(sent=wire_size(part))  # handed to the transport

    def Check(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthReply:
        return control.health_reply(self.node_id, control.TRAINER, self.bytes.received,
                                    self.bytes.sent, INSTANCE)


def serve(
    listen: str, ground_station: str | None, device: str = "auto", node_id: str | None = None,
    threads: int | None = None, advertise: str | None = None,
) -> None:
    """Run a trainer until interrupted; registers with `ground_station` when given."""
    node_id = node_id or f"trainer-{uuid.uuid4().hex[:6]}"
    if threads:
        # several trainers on one machine: oversubscribed intra-op pools spin against each other
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    servicer = TrainerServicer(node_id, dev)
    server = make_server()
    pb_grpc.add_TrainerServicer_to_server(servicer, server)
    pb_grpc.add_HealthServicer_to_server(servicer, server)
    add_standard_services(server, ["sparsat.v1.Trainer", "sparsat.v1.Health"])
    address = bind(server, listen, advertise, toward=ground_station)
    server.start()
    log.info("trainer %s serving on %s (device %s)", node_id, address, dev)
    if ground_station:
        request = control.register_request(node_id, control.TRAINER, address,
                                           device=device_label(dev))
        registered = register_trainer(ground_station, request, servicer)
        log.info("registered with ground station %s; %d torch threads (the scenario's)",
                 ground_station, servicer.threads)
        gs = ground_station
        # a restarted ground station: register again (same id, same address) by ourselves,
        # and take its config again (it may run another scenario)
        Rejoin(node_id, gs, lambda wait_s: register_trainer(gs, request, servicer, wait_s),
               registered.instance).start()
    server.wait_for_termination()
