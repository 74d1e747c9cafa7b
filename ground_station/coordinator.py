"""Training coordinator: holds the full MLP and its Adam state, runs rounds on remote trainers.

Strategies (`TrainingConfig.strategy`):
- `ist`: K workers; every round each hidden layer gets its own random permutation split into
  K disjoint groups, worker k trains its pieces for exactly L local Adam steps, the pieces go
  back in place and the shared output bias is averaged (`ground_station.ist`).
- `centralized`: IST with K = 1 — one worker trains the whole network.
- `local_sgd`: K full replicas start each round from the same weights, train L steps on their
  own minibatches, and are averaged (data-parallel baseline).

Moments (`TrainingConfig.moments`):
- `travel`: the coordinator keeps full-size Adam moments and per-element step counts, ships
  each piece's state with its weights and writes the returned state back beside them.
- `reset`: every round starts from fresh moments; nothing but weights travels.

An epoch is the same number of samples for every K: rounds = ceil(N / (K * L * batch)).
A worker whose call fails or times out is dropped for the rest of the run (its pieces keep
their pre-round weights and moments); it rejoins when it registers again. With fewer live
trainers than K, rounds use the ones there are. Every round can be checkpointed; a coordinator
loaded from the checkpoint continues mid-epoch where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch

from ground_station import ist
from ground_station.config import TrainingConfig
from node import serde
from node.codec import CodecError
from node.masking import stable_seed
from node.mlp import MLP
from node.rpc import CHUNK_BYTES, channel, wire_size
from node.training import AdamState, evaluate
from proto.sparsat.v1 import sparsat_pb2 as pb
from proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc

log = logging.getLogger("sparsat.coordinator")

CHECKPOINT = "coordinator.pt"
WAIT_POLL_S = 0.2


class TrainerUnavailable(RuntimeError):
    """No trainer could take part in a round within the round timeout."""


class CheckpointError(RuntimeError):
    """A checkpoint that does not belong to this run or this epoch."""


@dataclass
class WorkerBytes:
    node_id: str
    sent: int = 0  # ground station -> trainer
    received: int = 0  # trainer -> ground station
    error: str = ""  # the call failed: nothing was written back


@dataclass
class EpochResult:
    epoch: int
    accuracy: float
    test_loss: float
    train_loss: float
    dataset_bytes: list[WorkerBytes] = field(default_factory=list)
    rounds: list[list[WorkerBytes]] = field(default_factory=list)
    samples_trained: int = 0
    rounds_resumed: int = 0  # rounds restored from a checkpoint, not run again
    local_sgd_round_bytes: int = 0  # one local-SGD round of this model and K, for comparison


@dataclass
class _Progress:
    """The epoch in flight: what a checkpoint must carry to continue it."""

    epoch: int
    total_rounds: int
    rounds: list[list[WorkerBytes]] = field(default_factory=list)
    dataset_bytes: list[WorkerBytes] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    samples_trained: int = 0

    @property
    def complete(self) -> bool:
        return len(self.rounds) >= self.total_rounds


class TrainerClient:
    def __init__(self, node_id: str, address: str) -> None:
        self.node_id = node_id
        self.address = address
        self.channel = channel(address)
        self.stub = pb_grpc.TrainerStub(self.channel)

    def load_dataset(self, dataset_id: str, x: np.ndarray, y: np.ndarray,
                     timeout_s: float) -> WorkerBytes:
        chunks = list(serde.dataset_chunks(dataset_id, x, y, CHUNK_BYTES))
        reply = self.stub.LoadDataset(iter(chunks), timeout=timeout_s)
        if reply.rows != len(x):
            raise RuntimeError(f"{self.node_id} loaded {reply.rows} rows, sent {len(x)}")
        return WorkerBytes(self.node_id, sum(wire_size(c) for c in chunks), wire_size(reply))

    def train(self, job: serde.TrainJob, timeout_s: float
              ) -> tuple[ist.Params, AdamState | None, float, WorkerBytes]:
        """The trained pieces, their moments (when sent), the mean loss and the bytes. A
        failed call or a reply that makes no sense raises, carrying `request_bytes`."""
        request = serde.train_job_to_pb(job)
        try:
            return self._train(job, request, timeout_s)
        except (grpc.RpcError, CodecError, RuntimeError) as e:
            e.request_bytes = wire_size(request)  # type: ignore[union-attr]
            raise

    def _train(self, job: serde.TrainJob, request: pb.TrainRequest, timeout_s: float
               ) -> tuple[ist.Params, AdamState | None, float, WorkerBytes]:
        reply = self.stub.Train(request, timeout=timeout_s)
        if reply.steps_done != job.steps:
            raise RuntimeError(f"{self.node_id} did {reply.steps_done} steps, asked {job.steps}")
        params = serde.pb_to_params(reply.params)
        for name, p in job.params.items():
            if name not in params or params[name].shape != p.shape:
                raise RuntimeError(f"{self.node_id} returned {name} of the wrong shape")
        moments = None
        if job.moments is not None:
            if not reply.HasField("moments"):
                raise RuntimeError(f"{self.node_id} did not return the moments it was sent")
            moments = serde.pb_to_adam(reply.moments, params)
        return params, moments, float(reply.mean_loss), WorkerBytes(
            self.node_id, wire_size(request), wire_size(reply))

    def close(self) -> None:
        self.channel.close()


class Coordinator:
    def __init__(self, cfg: TrainingConfig, dim: int, n_classes: int,
                 checkpoint_dir: Path | None = None) -> None:
        self.cfg = cfg
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
        self._dataset: tuple[str, np.ndarray, np.ndarray] | None = None
        self._trainers: dict[str, TrainerClient] = {}
        self._active: set[str] = set()  # registered and not failed since
        self._loaded: dict[str, str] = {}  # node_id -> dataset_id it holds
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=max(4, 2 * cfg.num_workers))

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
                return live[: self.cfg.num_workers]
            if time.monotonic() > deadline:
                raise TrainerUnavailable(f"no trainer available for round {self.round} after "
                                         f"{self.cfg.round_timeout_s:.0f} s")
            time.sleep(WAIT_POLL_S)

    # ---- dataset -----------------------------------------------------------------------------

    @property
    def dataset_id(self) -> str:
        return self._dataset[0] if self._dataset else ""

    def set_dataset(self, dataset_id: str, x: np.ndarray, y: np.ndarray) -> None:
        """The token dataset every worker trains on; each trainer receives it once, before
        its first job (again only after it restarts)."""
        self._dataset = (dataset_id, x, y)

    def _upload(self, workers: list[TrainerClient], epoch: int) -> tuple[
            list[TrainerClient], list[WorkerBytes]]:
        if self._dataset is None:
            raise RuntimeError("no dataset: call set_dataset first")
        dataset_id, x, y = self._dataset
        with self._lock:
            need = [w for w in workers if self._loaded.get(w.node_id) != dataset_id]
        futures = {w.node_id: self._pool.submit(w.load_dataset, dataset_id, x, y,
                                                self.cfg.round_timeout_s) for w in need}
        uploads, ok = [], []
        for w in workers:
            if w.node_id not in futures:
                ok.append(w)
                continue
            try:
                uploads.append(futures[w.node_id].result())
            except (grpc.RpcError, RuntimeError) as e:
                self._fail(w, epoch, f"dataset upload: {_describe(e)}")
                continue
            with self._lock:
                self._loaded[w.node_id] = dataset_id
            ok.append(w)
        return ok, uploads

    # ---- rounds ------------------------------------------------------------------------------

    def rounds_per_epoch(self, n_rows: int) -> int:
        cfg = self.cfg
        return math.ceil(n_rows / (cfg.num_workers * cfg.local_steps * cfg.batch_size))

    def train_epoch(self, epoch: int, test_x: torch.Tensor, test_y: torch.Tensor) -> EpochResult:
        if self._dataset is None:
            raise RuntimeError("no dataset: call set_dataset first")
        progress = self._start_epoch(epoch, self.rounds_per_epoch(len(self._dataset[2])))
        resumed = len(progress.rounds)
        while not progress.complete:
            self._round(epoch, progress)
            self.save_checkpoint()
        self.model.load_params(self.params)
        accuracy, test_loss = evaluate(self.model, test_x, test_y)
        return EpochResult(
            epoch, accuracy, test_loss,
            float(np.mean(progress.losses)) if progress.losses else 0.0,
            list(progress.dataset_bytes), [list(r) for r in progress.rounds],
            progress.samples_trained, resumed, self.local_sgd_round_bytes())

    def local_sgd_round_bytes(self) -> int:
        """Bytes one local-SGD round would move with this model, K and moments setting: K
        full-model requests and replies, sized from the messages themselves."""
        cfg = self.cfg
        state = self.state.compact() if self.state is not None else None
        job = serde.TrainJob(self.dataset_id, self.round,
                             cfg.num_workers - 1, cfg.local_steps, cfg.batch_size, cfg.lr,
                             stable_seed(cfg.seed, "batches", self.round, 0), self.params,
                             state)
        reply = pb.TrainReply(params=serde.params_to_pb(self.params), steps_done=cfg.local_steps,
                              mean_loss=1.0)
        if state is not None:
            reply.moments.CopyFrom(serde.adam_to_pb(state))
        return cfg.num_workers * (wire_size(serde.train_job_to_pb(job)) + wire_size(reply))

    def _start_epoch(self, epoch: int, total_rounds: int) -> _Progress:
        resumed, self._resumed = self._resumed, None
        if resumed is not None:
            if resumed.epoch == epoch:
                log.info("epoch %d: continuing after round %d/%d from the checkpoint", epoch,
                         len(resumed.rounds), resumed.total_rounds)
                self._progress = resumed
                return resumed
            if not (resumed.complete and resumed.epoch == epoch - 1):
                raise CheckpointError(
                    f"the checkpoint stopped in epoch {resumed.epoch} after round "
                    f"{len(resumed.rounds)}/{resumed.total_rounds}; asked for epoch {epoch}")
        self._progress = _Progress(epoch, total_rounds)
        return self._progress

    def _round(self, epoch: int, progress: _Progress) -> None:
        cfg = self.cfg
        workers, uploads = self._upload(self._workers(), epoch)
        progress.dataset_bytes += uploads
        if not workers:  # every upload failed: try again with whoever is left
            return
        k = len(workers)
        if cfg.strategy == "local_sgd":
            part = None
            pieces = [dict(self.params) for _ in workers]
            states = [self.state.compact() if self.state is not None else None for _ in workers]
        else:
            part = ist.partition(cfg.hidden[0], cfg.hidden[1], k, self.generator)
            pieces = [ist.subnet(self.params, part, w) for w in range(k)]
            states = [_slice_state(self.state, part, w) for w in range(k)]
        scale = float(k) if cfg.strategy == "ist" and cfg.subnet_scale == "k" else 1.0
        jobs = [serde.TrainJob(self.dataset_id, self.round, w,
                               cfg.local_steps, cfg.batch_size, cfg.lr,
                               stable_seed(cfg.seed, "batches", self.round, w), pieces[w],
                               states[w], scale) for w in range(k)]
        futures = [self._pool.submit(t.train, job, cfg.round_timeout_s)
                   for t, job in zip(workers, jobs, strict=True)]
        done: dict[int, tuple[ist.Params, AdamState | None]] = {}
        sizes: list[WorkerBytes] = []
        for w, (t, f) in enumerate(zip(workers, futures, strict=True)):
            try:
                params, moments, loss, size = f.result()
            except (grpc.RpcError, CodecError, RuntimeError) as e:  # or a reply that makes no sense
                self._fail(t, epoch, _describe(e))
                sizes.append(WorkerBytes(t.node_id, getattr(e, "request_bytes", 0), 0,
                                         _describe(e)))
                continue
            done[w] = (params, moments)
            progress.losses.append(loss)
            progress.samples_trained += cfg.local_steps * cfg.batch_size
            sizes.append(size)
        self._merge(part, done)
        progress.rounds.append(sizes)
        self.round += 1

    @torch.no_grad()
    def _merge(self, part: ist.Partition | None, done: dict[int, tuple[
            ist.Params, AdamState | None]]) -> None:
        if not done:
            return
        if part is None:  # local SGD: average the replicas that came back
            for name in self.params:
                self.params[name] = torch.stack([p[name] for p, _ in done.values()]).mean(0)
            if self.state is not None:
                back = [s for _, s in done.values() if s is not None]
                for table, tables in ((self.state.exp_avg, [s.exp_avg for s in back]),
                                      (self.state.exp_avg_sq, [s.exp_avg_sq for s in back]),
                                      (self.state.step, [s.expand(self.params).step
                                                         for s in back])):
                    for name in table:
                        table[name] = torch.stack([t[name] for t in tables]).mean(0)
            return
        ist.write_back(self.params, part, {w: p for w, (p, _) in done.items()})
        if self.state is not None:
            states = {w: s for w, (p, s) in done.items() if s is not None}
            ist.write_back(self.state.exp_avg, part, {w: s.exp_avg for w, s in states.items()})
            ist.write_back(self.state.exp_avg_sq, part,
                           {w: s.exp_avg_sq for w, s in states.items()})
            ist.write_back(self.state.step, part, {w: s.expand(done[w][0]).step
                                                   for w, s in states.items()})

    # ---- checkpoints ----------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """What a checkpoint must match: the training settings that shape the run (not the
        number of epochs or timeouts), the model's shape and the dataset."""
        settings = {k: v for k, v in asdict(self.cfg).items()
                    if k not in ("epochs", "round_timeout_s")}
        key = json.dumps([settings, self.dim, self.n_classes,
                          self.dataset_id], sort_keys=True)
        return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()

    def save_checkpoint(self) -> None:
        if self.checkpoint_dir is None:
            return
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        path = self.checkpoint_dir / CHECKPOINT
        tmp = path.with_suffix(".tmp")
        torch.save({
            "fingerprint": self.fingerprint(), "round": self.round, "params": self.params,
            "state": asdict(self.state) if self.state is not None else None,
            "generator": self.generator.get_state(), "failures": self.failures,
            "progress": asdict(self._progress) if self._progress is not None else None,
        }, tmp)
        tmp.replace(path)  # atomic: a crash leaves the previous round's checkpoint

    def load_checkpoint(self) -> bool:
        """Continue from `checkpoint_dir`'s checkpoint; False when there is none."""
        if self.checkpoint_dir is None or not (self.checkpoint_dir / CHECKPOINT).exists():
            return False
        path = self.checkpoint_dir / CHECKPOINT
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if ckpt["fingerprint"] != self.fingerprint():
            raise CheckpointError(f"{path} was written by a run with other training settings "
                                  "or another dataset")
        self.params = ckpt["params"]
        self.state = AdamState(**ckpt["state"]) if ckpt["state"] is not None else None
        self.generator.set_state(ckpt["generator"])
        self.round = ckpt["round"]
        self.failures = ckpt["failures"]
        p = ckpt["progress"]
        if p is not None:
            self._resumed = _Progress(
                p["epoch"], p["total_rounds"],
                [[WorkerBytes(**w) for w in r] for r in p["rounds"]],
                [WorkerBytes(**w) for w in p["dataset_bytes"]], p["losses"],
                p["samples_trained"])
        self.model.load_params(self.params)
        log.info("resumed from %s at round %d", path, self.round)
        return True

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        with self._lock:
            for t in self._trainers.values():
                t.close()


def _slice_state(state: AdamState | None, part: ist.Partition, w: int) -> AdamState | None:
    if state is None:
        return None
    return AdamState(ist.subnet(state.exp_avg, part, w), ist.subnet(state.exp_avg_sq, part, w),
                     ist.subnet(state.step, part, w)).compact()


def _describe(e: BaseException) -> str:
    if isinstance(e, grpc.RpcError):
        return f"{e.code().name}: {e.details()}"
    return str(e)
