"""Trainers run with the scenario's torch thread count (issue 15 item 2: distributed and local
runs diverged after ~8 epochs unless trainers had the local launcher's count): the ground
station's config sets it, whatever the trainer started with, and the same job then gives the
same bits; registration reports device and threads."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sparsat.ground_station.config import GroundStationConfig, TrainingConfig
from sparsat.ground_station.coordinator import TrainerClient
from sparsat.ground_station.server import GroundStation, build_server
from sparsat.node.data.config import SensorConfig
from sparsat.node.data.datasets import DatasetSpec
from sparsat.node.data.masking import MaskSpec
from sparsat.node.models.mlp import MLP
from sparsat.node.models.training import steps_for, train_steps
from sparsat.node.processes import trainer as trainer_module
from sparsat.node.processes.rejoin import Rejoin
from sparsat.node.processes.trainer import (
    TrainerServicer,
    apply_training_config,
    device_label,
    register_trainer,
)
from sparsat.node.wire.jobs import TrainJob
from sparsat.node.wire.rpc import bind, make_server
from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb
from sparsat.proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc
from sparsat.sim.scenario.schema import TrainingCfg

ROWS, BATCH = 512, 64


@pytest.fixture(autouse=True)
def keep_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@contextmanager
def _trainer(workers: int = 8) -> Iterator[tuple[TrainerServicer, TrainerClient, TrainJob]]:
    """A fresh trainer behind a real gRPC server on 127.0.0.1 (its calls on `workers`
    threads), its dataset loaded, its client, and the job these tests train."""
    servicer = TrainerServicer("trainer-t", torch.device("cpu"))
    server = make_server(workers)
    pb_grpc.add_TrainerServicer_to_server(servicer, server)
    client = TrainerClient("trainer-t", bind(server, "127.0.0.1:0"))
    server.start()
    try:
        rng = np.random.default_rng(0)
        client.load_dataset("d", rng.standard_normal((ROWS, 384)).astype(np.float32),
                            rng.integers(0, 10, ROWS).astype(np.int64), timeout_s=30)
        torch.manual_seed(0)
        yield servicer, client, TrainJob("d", 0, 0, steps_for(ROWS, BATCH), BATCH, 1e-3,
                                               3, MLP(384, 256, 128, 10).params(), rows=ROWS)
    finally:
        client.close()
        server.stop(None)


def _train_once() -> dict[str, torch.Tensor]:
    """One job on a fresh trainer."""
    with _trainer() as (_, client, job):
        params, _, _, _ = client.train(job, timeout_s=60)
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _station(store: Path, listen: str, threads: int) -> Iterator[GroundStation]:
    """An in-process ground station whose scenario sets `threads`."""
    sensor = SensorConfig(dataset=DatasetSpec("fashion_mnist"), mask=MaskSpec("fixed", 0.5))
    cfg = GroundStationConfig(sensor=sensor,
                              training=TrainingConfig(threads=threads), store_dir=store)
    station = GroundStation(cfg)
    server, _ = build_server(station, listen)
    server.start()
    try:
        yield station
    finally:
        server.stop(None).wait()
        station.store.close()


def _device(station: GroundStation, node_id: str, want: str, wait_s: float = 10) -> str:
    """The device `node_id` registered with, once it is `want` or `wait_s` has passed."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < wait_s:
        node = station.nodes.get(node_id)
        if node is not None and node.device == want:
            break
        time.sleep(0.05)
    return node.device if node is not None else "not registered"


def test_a_trainer_takes_a_restarted_ground_stations_count_and_reports_it(
        tmp_path: Path) -> None:
    # Prepare: a trainer started with 1 thread, a ground station whose scenario says 2
    torch.set_num_threads(1)
    cpu, listen = torch.device("cpu"), f"127.0.0.1:{_free_port()}"
    trainer = TrainerServicer("trainer-r", cpu)  # not serving: only its settings matter
    request = pb.RegisterRequest(node_id="trainer-r", role=pb.TRAINER,
                                 address="127.0.0.1:7002", device=device_label(cpu))
    with _station(tmp_path / "store", listen, threads=2) as station:
        registered = register_trainer(listen, request, trainer, 5)
        first = trainer.threads
        first_device = _device(station, "trainer-r", "cpu (2 threads)")
        watch = Rejoin("trainer-r", listen,
                       lambda wait_s: register_trainer(listen, request, trainer, wait_s),
                       registered.instance, every_s=0.2)
        watch.start()
        time.sleep(0.5)

    # Execute: the ground station is down for 1 s (in-process, its instance id stays the
    # same: the watcher notices the outage), then back on the same store with a scenario
    # that says 3
    time.sleep(1.0)
    try:
        with _station(tmp_path / "store", listen, threads=3) as station:
            again_device = _device(station, "trainer-r", "cpu (3 threads)")
            time.sleep(0.2)  # the watcher counts the rejoin after its last call
    finally:
        watch.stop()

    # Assert: the count in force each time, and the registry says so
    assert (first, first_device) == (2, "cpu (2 threads)")
    assert watch.rejoined == 1 and trainer.threads == 3  # its next Train runs at 3
    assert again_device == "cpu (3 threads)"


def test_a_count_that_arrives_after_training_began_applies_to_the_next_job(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The count each job ran at is read inside the job, on its gRPC worker thread: whether
    2 threads give other bits than 1 depends on the CPU's BLAS (some split a matmul only
    along its outputs, so the sums keep their order), so bits alone cannot tell on every
    CPU. One worker thread runs every call, so the second job surely meets the thread that
    trained at 2 (with a pool, it may land on a fresh thread that never ran torch)."""
    jobs: list[tuple[int, int]] = []  # (worker thread, torch's count there) for each job

    def counted(*args: Any, **kw: Any) -> tuple[int, float]:
        jobs.append((threading.get_ident(), torch.get_num_threads()))
        return train_steps(*args, **kw)

    monkeypatch.setattr(trainer_module, "train_steps", counted)
    # Prepare: a trainer whose gRPC worker thread already trained at 2 threads (torch's
    # count is per thread for threads that already ran: setting it elsewhere misses them)
    torch.set_num_threads(2)
    with _trainer(workers=1) as (servicer, client, job):
        client.train(job, timeout_s=60)

        # Execute: a (restarted) ground station's config says 1, then the same job again
        servicer.threads = apply_training_config('{"training": "ist", "threads": 1}')
        at_one, _, _, _ = client.train(job, timeout_s=60)
    torch.set_num_threads(1)
    fresh = _train_once()  # a trainer that ran at 1 thread from the start

    # Assert: the second job ran at 1 thread on the thread that had trained at 2, and gave
    # the bits of a trainer that ran at 1 from the start
    (first_thread, first), (second_thread, second), (_, fresh_count) = jobs
    assert second_thread == first_thread and (first, second, fresh_count) == (2, 1, 1)
    assert all(torch.equal(at_one[n], fresh[n]) for n in fresh)
