"""Training coordinator: holds the full MLP and its Adam state, runs rounds on remote trainers.

Strategies (`TrainingConfig.strategy`: ist, centralized, local_sgd) say how a round splits
the model over its workers and merges what comes back (`sparsat.ground_station.strategies`); every
worker trains its piece for at most L local Adam steps.

Moments (`TrainingConfig.moments`):
- `travel`: the coordinator keeps full-size Adam moments and per-element step counts, ships
  each piece's state with its weights and writes the returned state back beside them.
- `reset`: every round starts from fresh moments; nothing but weights travels.

An epoch is one pass over the epoch's dataset: its rows in a seeded order (the same on the
trainers, which receive only the seed and their slice), cut into jobs of L batches, one job
per worker per round, so every row is trained on exactly once. The last round takes what is
left in whole batches split as evenly as possible over the workers (only the epoch's very last
batch can be short, and a worker may get fewer than L steps or none). A worker whose call
fails or times out is dropped for the rest of the run (its pieces keep their pre-round weights
and moments; its rows go back to the end of the epoch's queue); it rejoins when it registers
again. Every round splits the model K ways whatever is left of the epoch and whoever is live:
with fewer live trainers than K, or fewer jobs' worth of rows left, only that many pieces get
a job, and the others are neither sent nor changed that round (no worker is ever sent the
whole model unless K = 1). Every round can be
checkpointed; a coordinator loaded from the checkpoint continues mid-epoch where it stopped.

Streaming missions grow one dataset (`extend_dataset`): each version has its own id, a trainer
holding an earlier version is sent only the rows past it (DatasetChunk.base_id), and an epoch
may pass over the rows the last extension added and a share of older ones replayed
(`train_epoch(new_rows_only=True, replay_share=...)`).

`random` masks bring one dataset per epoch (each a freshly masked copy of every image):
epoch e trains on dataset (e - 1) mod len(datasets).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
import torch

from sparsat.ground_station import checkpoints, ist, strategies
from sparsat.ground_station.checkpoints import CheckpointError
from sparsat.ground_station.config import TrainingConfig
from sparsat.node.data.masking import stable_seed
from sparsat.node.models.mlp import MLP
from sparsat.node.models.training import AdamState, epoch_order, evaluate, steps_for, train_flops
from sparsat.node.wire.codec import CodecError
from sparsat.node.wire.jobs import (
    TrainJob,
    dataset_chunks,
    parse_load_reply,
    parse_reply,
    pb_to_adam,
    reply_parts,
    serialize_chunk,
    serialize_request,
    split_reply,
    split_request,
    train_job_to_pb,
    train_reply,
)
from sparsat.node.wire.rpc import CHUNK_BYTES, Outbox, channel, sized, wire_size
from sparsat.node.wire.tensors import pb_to_params

if TYPE_CHECKING:
    from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb

log = logging.getLogger("sparsat.coordinator")

WAIT_POLL_S = 0.2


class TrainerUnavailable(RuntimeError):
    """No trainer could take part in a round within the round timeout."""


@dataclass
class WorkerBytes:
    node_id: str
    sent: int = 0  # ground station -> trainer: what went out, also of a failed call
    received: int = 0  # trainer -> ground station
    error: str = ""  # the call failed: nothing was written back
    flops: int = 0  # the job's training compute (sparsat.node.models.training.train_flops)
    wall_s: float = 0.0  # measured wall time of the call
    rows: int = 0  # rows trained on


class CallFailed(RuntimeError):
    """A trainer call that failed, or came back with a reply that makes no sense; `bytes`
    holds what did cross the wire before it failed, with the error."""

    def __init__(self, message: str, bytes: WorkerBytes,
                 code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.bytes = replace(bytes, error=message)
        self.code = code  # the trainer's status, when it answered with one


@dataclass
class EpochResult:
    epoch: int
    accuracy: float
    test_loss: float
    train_loss: float
    dataset_bytes: list[WorkerBytes] = field(default_factory=list)
    rounds: list[list[WorkerBytes]] = field(default_factory=list)
    samples_trained: int = 0  # rows trained on this epoch
    rounds_resumed: int = 0  # rounds restored from a checkpoint, not run again
    local_sgd_round_bytes: int = 0  # one local-SGD round of this model and K, for comparison
    distinct_trained: int = 0  # distinct rows of every dataset trained on so far
    group_accuracy: dict[str, float] = field(default_factory=dict)  # per test group
    group_size: dict[str, int] = field(default_factory=dict)
    validation_accuracy: float | None = None  # on the validation split, when there is one
    validation_size: int = 0


@dataclass
class _Progress:
    """The epoch in flight: what a checkpoint must carry to continue it."""

    epoch: int
    todo: list[tuple[int, int]]  # (offset, rows) of the epoch's order not trained yet
    rounds: list[list[WorkerBytes]] = field(default_factory=list)
    dataset_bytes: list[WorkerBytes] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    samples_trained: int = 0
    start: int = 0  # the pass's rows: epoch_order's start and replay (0, 0: all of them)
    replay: int = 0

    @property
    def complete(self) -> bool:
        return not self.todo

    @property
    def remaining(self) -> int:
        return sum(n for _, n in self.todo)

    def take(self, quotas: list[int]) -> list[tuple[int, int]]:
        """One contiguous slice of the order per quota (shorter where a slice of rows that
        failed earlier ends first)."""
        jobs = []
        for q in quotas:
            if q == 0 or not self.todo:
                continue
            offset, n = self.todo[0]
            take = min(q, n)
            jobs.append((offset, take))
            if take == n:
                self.todo.pop(0)
            else:
                self.todo[0] = (offset + take, n - take)
        return jobs


MAX_REPLY_PART = 4 * CHUNK_BYTES  # trainers cut replies in parts of about CHUNK_BYTES
MAX_CONTROL_REPLY = 64 << 10


class TrainerClient:
    def __init__(self, node_id: str, address: str) -> None:
        self.node_id = node_id
        self.address = address
        self.channel = channel(address, peer=node_id)
        # replies are charged as they arrived (their raw length + gRPC's frame), not as
        # Python would re-encode them: a trainer in another language may encode differently
        # A reply part bigger than any a trainer cuts is not parsed (a hostile trainer's 64
        # MiB of packed shape values would parse into half a gigabyte)
        self._load = self.channel.stream_unary(
            "/sparsat.v1.Trainer/LoadDataset",
            request_serializer=serialize_chunk,
            response_deserializer=sized(parse_load_reply, MAX_CONTROL_REPLY))
        self._train = self.channel.stream_stream(
            "/sparsat.v1.Trainer/Train", request_serializer=serialize_request,
            response_deserializer=sized(parse_reply, MAX_REPLY_PART))

    def load_dataset(self, dataset_id: str, x: np.ndarray, y: np.ndarray, timeout_s: float,
                     base_id: str = "", base_rows: int = 0) -> WorkerBytes:
        """Upload dataset (x, y); with `base_id`, only its rows past the first `base_rows`,
        which the trainer holds as dataset base_id (CallFailed with FAILED_PRECONDITION when
        it does not)."""
        outbox = Outbox(dataset_chunks(dataset_id, x[base_rows:], y[base_rows:], CHUNK_BYTES,
                                       base_id, base_rows))
        t0, reply_bytes = time.monotonic(), 0
        try:
            reply, reply_bytes = self._load(iter(outbox), timeout=timeout_s)
            if reply is None:
                raise CodecError(f"a LoadDataset reply of {reply_bytes} bytes, more than the "
                                 f"{MAX_CONTROL_REPLY} it may be")
        except (grpc.RpcError, CodecError) as e:
            why = _describe(e) if isinstance(e, grpc.RpcError) else str(e)
            raise CallFailed(f"dataset upload: {why}", WorkerBytes(
                self.node_id, outbox.bytes, reply_bytes, wall_s=time.monotonic() - t0),
                e.code() if isinstance(e, grpc.RpcError) else None) from e
        size = WorkerBytes(self.node_id, outbox.bytes, reply_bytes,
                           wall_s=time.monotonic() - t0)
        if reply.rows != len(x):
            raise CallFailed(f"dataset upload: {self.node_id} loaded {reply.rows} rows, sent "
                             f"{len(x)}", size)
        return size

    def train(self, job: TrainJob, timeout_s: float
              ) -> tuple[ist.Params, AdamState | None, float, WorkerBytes]:
        """The trained pieces, their moments (when sent), the mean loss and the bytes. A
        failed call or a reply that makes no sense raises CallFailed with what was sent."""
        outbox = Outbox(split_request(train_job_to_pb(job), CHUNK_BYTES))
        t0 = time.monotonic()
        parts = reply_parts()  # counts what came in: a call that breaks is charged it
        call = self._train(iter(outbox), timeout=timeout_s)
        try:
            for part, part_bytes in call:
                if part is None:
                    parts.received += part_bytes
                    raise CodecError(f"a reply part of {part_bytes} bytes, more than the "
                                     f"{MAX_REPLY_PART} a trainer's parts may be")
                parts.add(part, part_bytes)  # past MAX_TRAIN_BYTES: refused before merged
            reply = parts.joined()  # tensors that came in pieces joined
        except (grpc.RpcError, CodecError) as e:
            call.cancel()  # a reply refused half way: the trainer sends no more
            why = _describe(e) if isinstance(e, grpc.RpcError) else f"reply: {e}"
            raise CallFailed(why, WorkerBytes(
                self.node_id, outbox.bytes, parts.received,
                wall_s=time.monotonic() - t0)) from e
        size = WorkerBytes(self.node_id, outbox.bytes, parts.received,
                           wall_s=time.monotonic() - t0, rows=job.rows,
                           flops=train_flops(job.params, job.rows, job.batch_size))
        try:
            params, moments = self._check(job, reply)
        except (CodecError, RuntimeError) as e:
            size.flops, size.rows = 0, 0
            raise CallFailed(str(e), size) from e
        return params, moments, float(reply.mean_loss), size

    def _check(self, job: TrainJob, reply: pb.TrainReply
               ) -> tuple[ist.Params, AdamState | None]:
        if reply.steps_done != job.steps:
            raise RuntimeError(f"{self.node_id} did {reply.steps_done} steps, asked {job.steps}")
        params = pb_to_params(reply.params)
        for name, p in job.params.items():
            if name not in params or params[name].shape != p.shape:
                raise RuntimeError(f"{self.node_id} returned {name} of the wrong shape")
        moments = None
        if job.moments is not None:
            if not reply.HasField("moments"):
                raise RuntimeError(f"{self.node_id} did not return the moments it was sent")
            moments = pb_to_adam(reply.moments, params)
        return params, moments

    def close(self) -> None:
        self.channel.close()


class Coordinator:
    def __init__(self, cfg: TrainingConfig, dim: int, n_classes: int,
                 checkpoint_dir: Path | None = None) -> None:
        self.cfg = cfg
        self.strategy = strategies.get(cfg.strategy)
        self.dim, self.n_classes = dim, n_classes
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.model = MLP(dim, cfg.hidden[0], cfg.hidden[1], n_classes)
        self.params = self.model.params()
        # full-size moments and per-element step counts, kept only when they travel
        self.state = (AdamState.zeros(self.params, full_steps=True)
                      if cfg.moments == "travel" else None)
        self.generator = torch.Generator().manual_seed(stable_seed(cfg.seed, "partition"))
        self.round = 0
        self.checkpoint_dir = checkpoint_dir
        self.failures: list[dict[str, Any]] = []
        self._progress: _Progress | None = None
        self._resumed: _Progress | None = None  # loaded from a checkpoint, not yet continued
        self._datasets: list[tuple[str, np.ndarray, np.ndarray]] = []
        self._seen: dict[str, np.ndarray] = {}  # dataset_id -> rows trained on (bool)
        self._order_cache: tuple[tuple[int, int, int, int], np.ndarray] | None = None
        self._trainers: dict[str, TrainerClient] = {}
        self._active: set[str] = set()  # registered and not failed since
        self._loaded: dict[str, tuple[str, int]] = {}  # node_id -> (dataset_id, rows) it holds
        # the growing dataset (extend_dataset): its earlier versions (id -> rows, each a prefix
        # of the current one), the rows before the last extension, the digest of its features
        self._versions: dict[str, int] = {}
        self._added_from = 0
        self._digest: Any = None
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max(4, 2 * self.strategy.workers(cfg)))

    # ---- trainers -------------------------------------------------------------------------------

    def add_trainer(self, node_id: str, address: str) -> None:
        """A trainer registered (or registered again after a restart): it takes part from
        the next round, and gets the token dataset before its first job."""
        with self._lock:
            old = self._trainers.pop(node_id, None)
            if old is not None:
                old.close()
            self._trainers[node_id] = TrainerClient(node_id, address)
            self._active.add(node_id)
            self._loaded.pop(node_id, None)

    def _fail(self, client: TrainerClient, epoch: int, error: str) -> None:
        node_id = client.node_id
        with self._lock:
            if self._trainers.get(node_id) is client:  # not registered again meanwhile
                self._active.discard(node_id)
                self._loaded.pop(node_id, None)
        self.failures.append({"epoch": epoch, "round": self.round, "node_id": node_id,
                              "error": error})
        log.warning("round %d: trainer %s failed (%s); its pieces keep their pre-round state",
                    self.round, node_id, error)

    def _workers(self) -> list[TrainerClient]:
        """Up to K live trainers, in node_id order; waits for one when there are none."""
        deadline = time.monotonic() + self.cfg.round_timeout_s
        while True:
            with self._lock:
                live = [self._trainers[n] for n in sorted(self._active)]
            if live:
                return live[: self.strategy.workers(self.cfg)]
            if time.monotonic() > deadline:
                raise TrainerUnavailable(f"no trainer available for round {self.round} after "
                                         f"{self.cfg.round_timeout_s:.0f} s")
            time.sleep(WAIT_POLL_S)

    # ---- dataset -----------------------------------------------------------------------------

    @property
    def dataset_id(self) -> str:
        """The dataset of the epoch in flight (the first before training starts)."""
        if not self._datasets:
            return ""
        epoch = self._progress.epoch if self._progress is not None else 1
        return self._dataset_of(epoch)[0]

    def _dataset_of(self, epoch: int) -> tuple[str, np.ndarray, np.ndarray]:
        return self._datasets[(epoch - 1) % len(self._datasets)]

    def set_dataset(self, dataset_id: str, x: np.ndarray, y: np.ndarray) -> None:
        """The token dataset every worker trains on; each trainer receives it once, before
        its first job (again only after it restarts)."""
        self.set_datasets([(dataset_id, x, y)])

    def set_datasets(self, datasets: list[tuple[str, np.ndarray, np.ndarray]]) -> None:
        """One dataset per epoch, cycled (random masks: epoch e trains on copy e)."""
        if not datasets:
            raise ValueError("no datasets")
        self._datasets = list(datasets)
        self._seen = {d: np.zeros(len(y), dtype=bool) for d, _, y in datasets}
        self._versions, self._added_from, self._digest = {}, 0, None

    def extend_dataset(self, x_new: np.ndarray, y_new: np.ndarray) -> str:
        """Append rows to the one dataset a streaming mission trains on (the first call
        creates it) and return the grown version's new id, f"stream-{rows}-{digest}" (blake2b
        of all its float32 features). A trainer holding an earlier version is sent only the
        rows past it; the rows trained on so far stay trained on."""
        if len(self._datasets) > 1:
            raise ValueError(f"extend_dataset grows one dataset; there are "
                             f"{len(self._datasets)} (set_datasets)")
        if x_new.ndim != 2 or y_new.ndim != 1 or len(x_new) != len(y_new) or not len(y_new):
            raise ValueError(f"extend_dataset needs (rows, dim) features and (rows,) labels, "
                             f"rows > 0; got {x_new.shape} and {y_new.shape}")
        x_new, y_new = x_new.astype(np.float32), y_new.astype(np.int64)  # the wire's dtypes
        if self._datasets:
            old_id, x, y = self._datasets[0]
            if x_new.shape[1] != x.shape[1]:
                raise ValueError(f"extend_dataset: {x_new.shape[1]} features a row, the "
                                 f"dataset has {x.shape[1]}")
            if self._digest is None:  # grown from set_dataset's
                self._digest = hashlib.blake2b(
                    np.ascontiguousarray(x, np.float32).tobytes(), digest_size=8)
            self._versions[old_id] = len(y)
            seen = self._seen.pop(old_id, np.zeros(len(y), dtype=bool))
            self._added_from = len(y)
            x, y = np.concatenate([x, x_new]), np.concatenate([y, y_new])
        else:
            self._digest = hashlib.blake2b(digest_size=8)
            seen, self._added_from, x, y = np.zeros(0, dtype=bool), 0, x_new, y_new
        self._digest.update(np.ascontiguousarray(x_new).tobytes())
        dataset_id = f"stream-{len(y)}-{self._digest.hexdigest()}"
        self._datasets = [(dataset_id, x, y)]
        self._seen[dataset_id] = np.concatenate([seen, np.zeros(len(y_new), dtype=bool)])
        return dataset_id

    @property
    def distinct_trained(self) -> int:
        return int(sum(seen.sum() for seen in self._seen.values()))

    def _upload(self, workers: list[TrainerClient], epoch: int) -> tuple[
            list[TrainerClient], list[WorkerBytes]]:
        if not self._datasets:
            raise RuntimeError("no dataset: call set_dataset first")
        dataset_id, x, y = self._dataset_of(epoch)
        futures = {}
        for w in workers:
            with self._lock:
                held = self._loaded.get(w.node_id)
            if held is not None and held[0] == dataset_id:
                continue
            # an earlier version of the growing dataset: only the rows past it travel
            base = held if held is not None and self._versions.get(held[0]) == held[1] else None
            futures[w.node_id] = self._pool.submit(self._load, w, dataset_id, x, y, base)
        uploads: list[WorkerBytes] = []
        ok = []
        for w in workers:
            if w.node_id not in futures:
                ok.append(w)
                continue
            sizes, error = futures[w.node_id].result()
            uploads += sizes  # what went out, also of a failed call, is charged
            if error:
                self._fail(w, epoch, error)
                continue
            with self._lock:
                self._loaded[w.node_id] = (dataset_id, len(y))
            ok.append(w)
        return ok, uploads

    def _load(self, w: TrainerClient, dataset_id: str, x: np.ndarray, y: np.ndarray,
              base: tuple[str, int] | None) -> tuple[list[WorkerBytes], str]:
        """Upload the dataset to `w`: the rows past `base` (a dataset id and its rows, a
        prefix of this one that `w` holds) or, without one, whole; an append it refuses for
        want of the base (FAILED_PRECONDITION: it lost it) is followed by the whole dataset.
        Returns each call's bytes and the error of the last ("": loaded)."""
        timeout_s = self.cfg.round_timeout_s
        sizes = []
        if base is not None:
            try:
                return [w.load_dataset(dataset_id, x, y, timeout_s, *base)], ""
            except CallFailed as e:
                if e.code != grpc.StatusCode.FAILED_PRECONDITION:
                    return [e.bytes], str(e)
                log.info("%s lacks %s to append to (%s): sending %s whole", w.node_id,
                         base[0], e, dataset_id)
                sizes.append(e.bytes)
        try:
            sizes.append(w.load_dataset(dataset_id, x, y, timeout_s))
        except CallFailed as e:
            return [*sizes, e.bytes], str(e)
        return sizes, ""

    # ---- rounds ------------------------------------------------------------------------------

    def train_epoch(self, epoch: int, test_x: torch.Tensor, test_y: torch.Tensor,
                    groups: dict[str, torch.Tensor] | None = None,
                    validation: tuple[torch.Tensor, torch.Tensor] | None = None,
                    new_rows_only: bool = False, replay_share: float = 0.0
                    ) -> EpochResult:
        """One pass over the epoch's dataset, then the test set (`groups`: boolean masks of
        test rows whose accuracy is reported apart) and the validation split, if any.

        new_rows_only (streaming missions): the pass covers only the rows the last
        extend_dataset added, and min(older rows, round(replay_share x added)) older rows
        drawn from the seed, so the model keeps seeing what came before; replay_share is
        ignored otherwise. A pass continued from a checkpoint keeps the rows it started with."""
        if not self._datasets:
            raise RuntimeError("no dataset: call set_dataset first")
        if not (replay_share >= 0 and np.isfinite(replay_share)):
            raise ValueError(f"replay_share must be >= 0, got {replay_share}")
        n_rows = len(self._dataset_of(epoch)[2])
        start = min(self._added_from, n_rows) if new_rows_only else 0
        replay = min(start, round(replay_share * (n_rows - start))) if new_rows_only else 0
        progress = self._start_epoch(epoch, n_rows, start, replay)
        resumed = len(progress.rounds)
        while not progress.complete:
            self._round(epoch, progress)
            self.save_checkpoint()
        self.model.load_params(self.params)
        accuracy, test_loss = evaluate(self.model, test_x, test_y)
        group_accuracy, group_size = {}, {}
        for name, rows in (groups or {}).items():
            group_size[name] = int(rows.sum())
            if group_size[name]:
                group_accuracy[name] = evaluate(self.model, test_x[rows], test_y[rows])[0]
        val = (evaluate(self.model, *validation)[0]
               if validation is not None and len(validation[1]) else None)
        return EpochResult(
            epoch, accuracy, test_loss,
            float(np.mean(progress.losses)) if progress.losses else 0.0,
            list(progress.dataset_bytes), [list(r) for r in progress.rounds],
            progress.samples_trained, resumed, self.local_sgd_round_bytes(),
            self.distinct_trained, group_accuracy, group_size, val,
            len(validation[1]) if validation is not None else 0)

    def local_sgd_round_bytes(self) -> int:
        """Bytes one full round of local SGD moves with this model, K and moments setting:
        the K requests and replies that round would send (full replicas, L batches each, and
        local SGD's own Adam state: full moments, one step count per tensor), sized from the
        messages themselves."""
        cfg = self.cfg
        k, rows = self.strategy.workers(cfg), cfg.local_steps * cfg.batch_size
        state = AdamState.zeros(self.params) if self.state is not None else None
        # the round that would come next: its number and offsets (varints) as a real one's
        p = self._progress
        epoch = p.epoch if p is not None else 1
        offset = p.todo[0][0] if p and p.todo else 0
        order = (p.start, p.replay) if p is not None else (0, 0)
        total = 0
        for w in range(k):
            job = self._job(w, self.params, state, 1.0, epoch, (offset + w * rows, rows), order)
            total += sum(wire_size(m) for m in split_request(train_job_to_pb(job), CHUNK_BYTES))
            reply = train_reply(self.params, job.steps, 1.0,
                                state.compact() if state is not None else None)
            total += sum(wire_size(m) for m in split_reply(reply, CHUNK_BYTES))
        return total

    def _order_seed(self, epoch: int) -> int:
        """Seed of the epoch's row order (sparsat.node.models.training.epoch_order), sent to the
        trainers."""
        return stable_seed(self.cfg.seed, "order", epoch)

    def _job(self, w: int, params: ist.Params, state: AdamState | None, scale: float,
             epoch: int, rows: tuple[int, int], order: tuple[int, int] = (0, 0)) -> TrainJob:
        """Worker w's job: train `params` on rows [offset, offset + n) of the epoch's order
        (`order`: the pass's start and replay, see epoch_order)."""
        cfg = self.cfg
        offset, n = rows
        return TrainJob(self._dataset_of(epoch)[0], self.round, w,
                        steps_for(n, cfg.batch_size), cfg.batch_size, cfg.lr,
                        self._order_seed(epoch), params, state, scale, offset, n, *order)

    def _start_epoch(self, epoch: int, n_rows: int, start: int = 0,
                     replay: int = 0) -> _Progress:
        """The epoch's progress: continued from the checkpoint's, or a new pass over
        n_rows - start + replay rows (see epoch_order)."""
        resumed, self._resumed = self._resumed, None
        if resumed is not None:
            if resumed.epoch == epoch:
                log.info("epoch %d: continuing after round %d with %d rows to go from the "
                         "checkpoint", epoch, len(resumed.rounds), resumed.remaining)
                self._progress = resumed
                return resumed
            if not (resumed.complete and resumed.epoch == epoch - 1):
                raise CheckpointError(
                    f"the checkpoint stopped in epoch {resumed.epoch} after round "
                    f"{len(resumed.rounds)} with {resumed.remaining} rows to go; asked for "
                    f"epoch {epoch}")
        length = n_rows - start + replay
        self._progress = _Progress(epoch, [(0, length)] if length else [], start=start,
                                   replay=replay)
        return self._progress

    def _order(self, n_rows: int, seed: int, start: int = 0, replay: int = 0) -> np.ndarray:
        key = (n_rows, seed, start, replay)
        if self._order_cache is None or self._order_cache[0] != key:
            self._order_cache = (key, epoch_order(*key))
        return self._order_cache[1]

    def _quotas(self, remaining: int, k: int) -> list[int]:
        """Rows per worker this round: L batches each, or, when less than that is left for
        all k, what is left in whole batches spread evenly (the last worker's may be short)."""
        cfg = self.cfg
        full = cfg.local_steps * cfg.batch_size
        if remaining >= k * full:
            return [full] * k
        batches = steps_for(remaining, cfg.batch_size)
        per = [batches // k + (1 if w < batches % k else 0) for w in range(k)]
        quotas = [b * cfg.batch_size for b in per]
        last = max(w for w in range(k) if per[w]) if batches else 0
        quotas[last] -= sum(quotas) - remaining
        return quotas

    def _round(self, epoch: int, progress: _Progress) -> None:
        cfg = self.cfg
        workers, uploads = self._upload(self._workers(), epoch)
        progress.dataset_bytes += uploads
        if not workers:  # every upload failed: try again with whoever is left
            return
        slices = progress.take(self._quotas(progress.remaining, len(workers)))
        workers = workers[: len(slices)]
        # always the strategy's K pieces (IST: K-way groups, even when fewer trainers are live
        # or fewer slices are left); piece w goes to worker w, and a piece without a job is
        # not sent and keeps its weights and moments this round
        split = self.strategy.split(cfg, self.params, self.state, self.strategy.workers(cfg),
                                    self.generator)
        order = (progress.start, progress.replay)
        jobs = [self._job(w, split.pieces[w], split.states[w], split.scale, epoch, slices[w],
                          order) for w in range(len(workers))]
        futures = [self._pool.submit(t.train, job, cfg.round_timeout_s)
                   for t, job in zip(workers, jobs, strict=True)]
        done: strategies.Returned = {}
        sizes: list[WorkerBytes] = []
        seen = self._seen[jobs[0].dataset_id]
        for w, (t, f) in enumerate(zip(workers, futures, strict=True)):
            try:
                params, moments, loss, size = f.result()
            except CallFailed as e:  # or a reply that makes no sense
                self._fail(t, epoch, str(e))
                sizes.append(e.bytes)
                progress.todo.append(slices[w])  # its rows are trained later this epoch
                continue
            done[w] = (params, moments)
            progress.losses.append(loss)
            progress.samples_trained += size.rows
            offset, n = slices[w]
            seen[self._order(len(seen), jobs[w].seed, *order)[offset : offset + n]] = True
            sizes.append(size)
        self.strategy.merge(self.params, self.state, split, done)
        progress.rounds.append(sizes)
        self.round += 1

    # ---- checkpoints ----------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """What a checkpoint must match (sparsat.ground_station.checkpoints.fingerprint)."""
        return checkpoints.fingerprint(self.cfg, self.dim, self.n_classes,
                                       [d for d, _, _ in self._datasets])

    def save_checkpoint(self) -> None:
        if self.checkpoint_dir is None:
            return
        checkpoints.save(self.checkpoint_dir, {
            "fingerprint": self.fingerprint(), "round": self.round, "params": self.params,
            "state": asdict(self.state) if self.state is not None else None,
            "generator": self.generator.get_state(), "failures": self.failures,
            "progress": asdict(self._progress) if self._progress is not None else None,
            "seen": self._seen,
        })

    def load_checkpoint(self) -> bool:
        """Continue from `checkpoint_dir`'s checkpoint; False when there is none."""
        if self.checkpoint_dir is None:
            return False
        ckpt = checkpoints.load(self.checkpoint_dir, self.fingerprint())
        if ckpt is None:
            return False
        self.params = ckpt["params"]
        self.state = AdamState(**ckpt["state"]) if ckpt["state"] is not None else None
        self.generator.set_state(ckpt["generator"])
        self.round = ckpt["round"]
        self.failures = ckpt["failures"]
        p = ckpt["progress"]
        if p is not None:
            self._resumed = _Progress(
                p["epoch"], [tuple(t) for t in p["todo"]],
                [[WorkerBytes(**w) for w in r] for r in p["rounds"]],
                [WorkerBytes(**w) for w in p["dataset_bytes"]], p["losses"],
                p["samples_trained"], p.get("start", 0), p.get("replay", 0))  # older: 0, 0
        self._seen = ckpt["seen"]
        self.model.load_params(self.params)
        log.info("resumed from %s at round %d", self.checkpoint_dir / checkpoints.CHECKPOINT,
                 self.round)
        return True

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        with self._lock:
            for t in self._trainers.values():
                t.close()


def _describe(e: BaseException) -> str:
    if isinstance(e, grpc.RpcError):
        return f"{e.code().name}: {e.details()}"
    return str(e)
