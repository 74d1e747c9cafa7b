"""Trainers run with the scenario's torch thread count (issue 15 item 2: distributed and local
runs diverged after ~8 epochs unless trainers had the local launcher's count): the ground
station's config sets it, whatever the trainer started with, and the same job then gives the
same bits; registration reports device and threads."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from ground_station.coordinator import TrainerClient
from node import serde
from node.mlp import MLP
from node.rpc import bind, make_server
from node.trainer import TrainerServicer, apply_training_config, device_label
from node.training import steps_for
from proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc
from sim.scenario import TrainingCfg

ROWS, BATCH = 512, 64


@pytest.fixture(autouse=True)
def keep_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _train_once() -> dict[str, torch.Tensor]:
    """One job on a fresh trainer behind a real gRPC server on 127.0.0.1."""
    servicer = TrainerServicer("trainer-t", torch.device("cpu"))
    server = make_server()
    pb_grpc.add_TrainerServicer_to_server(servicer, server)
    client = TrainerClient("trainer-t", bind(server, "127.0.0.1:0"))
    server.start()
    try:
        rng = np.random.default_rng(0)
        client.load_dataset("d", rng.standard_normal((ROWS, 384)).astype(np.float32),
                            rng.integers(0, 10, ROWS).astype(np.int64), timeout_s=30)
        torch.manual_seed(0)
        job = serde.TrainJob("d", 0, 0, steps_for(ROWS, BATCH), BATCH, 1e-3, 3,
                             MLP(384, 256, 128, 10).params(), rows=ROWS)
        params, _, _, _ = client.train(job, timeout_s=60)
    finally:
        client.close()
        server.stop(None)
    return params


def test_trainers_started_with_other_thread_counts_give_the_same_bits() -> None:
    # Prepare: the config a ground station sends with the scenario's default
    config = f'{{"training": "ist", "threads": {TrainingCfg().threads}}}'
    results, labels = [], []

    # Execute: two trainers that started with 2 and 3 threads (a 4- and a 6-core machine
    # with K = 2 under the local launcher's old rule), each applying the config
    for start in (2, 3):
        torch.set_num_threads(start)
        apply_training_config(config)
        labels.append(device_label(torch.device("cpu")))
        results.append(_train_once())

    # Assert
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])
    assert labels == [f"cpu ({TrainingCfg().threads} threads)"] * 2


def test_the_config_sets_the_count_and_refuses_nonsense() -> None:
    torch.set_num_threads(2)
    assert apply_training_config('{"training": "ist"}') == 2  # an older ground station
    assert apply_training_config("") == 2
    assert apply_training_config('{"training": "ist", "threads": 1}') == 1
    assert torch.get_num_threads() == 1
    for bad in ('{"threads": 0}', '{"threads": "2"}', '{"threads": true}', "{"):
        with pytest.raises(ValueError, match="trainer config"):
            apply_training_config(bad)
    assert torch.get_num_threads() == 1
