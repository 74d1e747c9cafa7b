"""The IST coordinator against real trainer servers on localhost."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch

from ground_station.config import TrainingConfig
from ground_station.coordinator import Coordinator, TrainerClient
from node.rpc import bind, make_server
from node.trainer import TrainerServicer
from proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc

DIM, CLASSES, ROWS = 16, 4, 1024


@pytest.fixture()
def trainers() -> Iterator[list[tuple[TrainerServicer, str]]]:
    out, servers = [], []
    for k in range(2):
        servicer = TrainerServicer(f"trainer-{k}", torch.device("cpu"))
        server = make_server()
        pb_grpc.add_TrainerServicer_to_server(servicer, server)
        address = bind(server, "127.0.0.1:0")
        server.start()
        servers.append(server)
        out.append((servicer, address))
    yield out
    for server in servers:
        server.stop(None)


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    centers = np.random.default_rng(42).normal(0, 3, (CLASSES, DIM))  # same classes, any split
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, ROWS)
    return (centers[y] + rng.normal(0, 1, (ROWS, DIM))).astype(np.float32), y.astype(np.int64)


@pytest.mark.parametrize("strategy, k", [("centralized", 1), ("ist", 2)])
def test_epochs_train_and_bytes_match_the_trainers_counts(
        trainers: list[tuple[TrainerServicer, str]], strategy: str, k: int) -> None:
    cfg = TrainingConfig(strategy=strategy, workers=k, local_steps=4, batch_size=32,  # type: ignore[arg-type]
                         hidden=(33, 17), seed=1, lr=1e-2)
    clients = [TrainerClient(s.node_id, a) for s, a in trainers[:k]]
    coord = Coordinator(cfg, clients, DIM, CLASSES)
    x, y = _data()
    tx, ty = _data(1)
    before = {n: v.clone() for n, v in coord.params.items()}

    uploads = coord.upload("d1", x, y)
    again = coord.upload("d1", x, y)  # the dataset travels once
    first = coord.train_epoch(1, ROWS, torch.from_numpy(tx), torch.from_numpy(ty))
    second = coord.train_epoch(2, ROWS, torch.from_numpy(tx), torch.from_numpy(ty))
    coord.close()

    assert len(uploads) == k and again == []
    rounds = -(-ROWS // (k * 4 * 32))  # an epoch is the same number of samples for every K
    assert len(first.rounds) == len(second.rounds) == rounds
    assert first.samples_trained == rounds * k * 4 * 32
    assert second.accuracy > 0.9  # four well separated blobs
    assert all(not torch.equal(before[n], coord.params[n]) for n in before)
    for servicer, _ in trainers[:k]:  # what the coordinator charged == what each trainer saw
        mine = [w for r in first.rounds + second.rounds for w in r if w.node_id == servicer.node_id]
        up = [w for w in uploads if w.node_id == servicer.node_id]
        assert servicer.bytes.received == sum(w.sent for w in mine + up)
        assert servicer.bytes.sent == sum(w.received for w in mine + up)


def test_a_dead_trainer_fails_the_epoch_loudly(trainers: list[tuple[TrainerServicer, str]]) -> None:
    cfg = TrainingConfig(strategy="ist", workers=2, local_steps=2, batch_size=32,
                         hidden=(8, 8), round_timeout_s=5)
    clients = [TrainerClient("trainer-0", trainers[0][1]), TrainerClient("gone", "127.0.0.1:1")]
    coord = Coordinator(cfg, clients, DIM, CLASSES)
    x, y = _data()
    with pytest.raises(grpc.RpcError):
        coord.upload("d1", x, y)
    assert coord.dataset_id == ""  # not marked as uploaded: the next epoch tries again
    coord.close()
