"""Training coordinator: holds the full MLP, runs rounds on remote trainers, evaluates.

Strategies by name: `centralized` (one worker trains the whole network) and `ist` (K workers,
a fresh random disjoint partition of both hidden layers every round). An epoch is the same
number of samples for every K: rounds = ceil(N / (K * L * batch)).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from ground_station import ist
from ground_station.config import TrainingConfig
from node import serde
from node.masking import stable_seed
from node.mlp import MLP
from node.rpc import CHUNK_BYTES, channel, wire_size
from node.training import evaluate
from proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc


@dataclass
class WorkerBytes:
    node_id: str
    sent: int = 0  # ground station -> trainer
    received: int = 0  # trainer -> ground station


@dataclass
class EpochResult:
    epoch: int
    accuracy: float
    test_loss: float
    train_loss: float
    dataset_bytes: list[WorkerBytes] = field(default_factory=list)
    rounds: list[list[WorkerBytes]] = field(default_factory=list)
    samples_trained: int = 0


class TrainerClient:
    def __init__(self, node_id: str, address: str) -> None:
        self.node_id = node_id
        self.channel = channel(address)
        self.stub = pb_grpc.TrainerStub(self.channel)

    def load_dataset(self, dataset_id: str, x: np.ndarray, y: np.ndarray,
                     timeout_s: float) -> WorkerBytes:
        chunks = list(serde.dataset_chunks(dataset_id, x, y, CHUNK_BYTES))
        reply = self.stub.LoadDataset(iter(chunks), timeout=timeout_s)
        if reply.rows != len(x):
            raise RuntimeError(f"{self.node_id} loaded {reply.rows} rows, sent {len(x)}")
        return WorkerBytes(self.node_id, sum(wire_size(c) for c in chunks), wire_size(reply))

    def train(self, job: serde.TrainJob, timeout_s: float) -> tuple[ist.Params, float, WorkerBytes]:
        request = serde.train_job_to_pb(job)
        reply = self.stub.Train(request, timeout=timeout_s)
        if reply.steps_done != job.steps:
            raise RuntimeError(f"{self.node_id} did {reply.steps_done} steps, asked {job.steps}")
        params = serde.pb_to_params(reply.params)
        return params, float(reply.mean_loss), WorkerBytes(
            self.node_id, wire_size(request), wire_size(reply))

    def close(self) -> None:
        self.channel.close()


class Coordinator:
    def __init__(self, cfg: TrainingConfig, trainers: list[TrainerClient], dim: int,
                 n_classes: int) -> None:
        if len(trainers) != cfg.num_workers:
            raise ValueError(f"{cfg.strategy} needs {cfg.num_workers} trainers, "
                             f"got {len(trainers)}")
        self.cfg = cfg
        self.trainers = trainers
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.model = MLP(dim, cfg.hidden[0], cfg.hidden[1], n_classes)
        self.params = self.model.params()
        self.generator = torch.Generator().manual_seed(stable_seed(cfg.seed, "partition"))
        self.round = 0
        self.dataset_id = ""
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(trainers)))

    def upload(self, dataset_id: str, x: np.ndarray, y: np.ndarray) -> list[WorkerBytes]:
        """Send the token dataset to every trainer, once."""
        if dataset_id == self.dataset_id:
            return []
        futures = [self._pool.submit(t.load_dataset, dataset_id, x, y, self.cfg.round_timeout_s)
                   for t in self.trainers]
        uploads = [f.result() for f in futures]
        self.dataset_id = dataset_id  # only once every trainer has it
        return uploads

    def train_epoch(self, epoch: int, n_rows: int, test_x: torch.Tensor,
                    test_y: torch.Tensor) -> EpochResult:
        cfg, k = self.cfg, self.cfg.num_workers
        rounds = math.ceil(n_rows / (k * cfg.local_steps * cfg.batch_size))
        result = EpochResult(epoch, 0.0, 0.0, 0.0)
        losses: list[float] = []
        for _ in range(rounds):
            part = ist.partition(cfg.hidden[0], cfg.hidden[1], k, self.generator)
            jobs = [serde.TrainJob(self.dataset_id, self.round, w, cfg.local_steps,
                                   cfg.batch_size, cfg.lr,
                                   stable_seed(cfg.seed, "batches", self.round, w),
                                   ist.subnet(self.params, part, w)) for w in range(k)]
            futures = [self._pool.submit(t.train, job, cfg.round_timeout_s)
                       for t, job in zip(self.trainers, jobs, strict=True)]
            outcomes = [f.result() for f in futures]
            ist.write_back(self.params, part, {w: o[0] for w, o in enumerate(outcomes)})
            losses += [o[1] for o in outcomes]
            result.rounds.append([o[2] for o in outcomes])
            result.samples_trained += k * cfg.local_steps * cfg.batch_size
            self.round += 1
        self.model.load_params(self.params)
        result.accuracy, result.test_loss = evaluate(self.model, test_x, test_y)
        result.train_loss = float(np.mean(losses)) if losses else 0.0
        return result

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        for t in self.trainers:
            t.close()

