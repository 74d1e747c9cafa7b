"""Streaming missions grow one dataset: a trainer holding an earlier version is sent only the
appended rows (DatasetChunk.base_id), one lacking it the dataset whole, and an epoch may pass
over the new rows and a replayed share of older ones (epoch_order's start and replay), on
real trainer servers on localhost."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from sparsat.ground_station import checkpoints
from sparsat.ground_station.config import TrainingConfig
from sparsat.ground_station.coordinator import Coordinator, EpochResult
from sparsat.node.data.masking import stable_seed
from sparsat.node.models.mlp import MLP
from sparsat.node.models.training import epoch_order, train_steps
from sparsat.node.processes.trainer import TrainerServicer
from sparsat.node.wire import jobs, tensors
from sparsat.node.wire.rpc import CHUNK_BYTES, bind, channel, make_server, wire_size
from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb
from sparsat.proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc

DIM, CLASSES = 8, 3
CFG = TrainingConfig(strategy="ist", workers=2, local_steps=2, batch_size=16, hidden=(12, 8),
                     seed=5, lr=1e-2, moments="travel")


class Trainers:
    """Trainer servers on localhost; `start` again gives a node a fresh server (a restart)."""

    def __init__(self) -> None:
        self.servers: list[grpc.Server] = []
        self.servicers: dict[str, TrainerServicer] = {}

    def start(self, node_id: str) -> str:
        servicer = TrainerServicer(node_id, torch.device("cpu"))
        server = make_server()
        pb_grpc.add_TrainerServicer_to_server(servicer, server)
        address = bind(server, "127.0.0.1:0")
        server.start()
        self.servers.append(server)
        self.servicers[node_id] = servicer
        return address


@pytest.fixture()
def trainers() -> Iterator[Trainers]:
    t = Trainers()
    yield t
    for server in t.servers:
        server.stop(None)


def _data(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, DIM)).astype(np.float32),
            rng.integers(0, CLASSES, rows).astype(np.int64))


def _test_set() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _data(30, 99)
    return torch.from_numpy(x), torch.from_numpy(y)


def _coordinator(trainers: Trainers, cfg: TrainingConfig = CFG,
                 checkpoint_dir: Path | None = None) -> Coordinator:
    coord = Coordinator(cfg, DIM, CLASSES, checkpoint_dir)
    for k in range(cfg.num_workers):
        coord.add_trainer(f"trainer-{k}", trainers.start(f"trainer-{k}"))
    return coord


def _upload_bytes(dataset_id: str, x: np.ndarray, y: np.ndarray, base_id: str = "",
                  base_rows: int = 0) -> int:
    """What an upload's chunks weigh on the wire (the coordinator's Outbox counts the same)."""
    return sum(wire_size(c) for c in jobs.dataset_chunks(
        dataset_id, x[base_rows:], y[base_rows:], CHUNK_BYTES, base_id, base_rows))


def _uploads(result: EpochResult, node_id: str) -> list[tuple[int, str]]:
    return [(w.sent, w.error) for w in result.dataset_bytes if w.node_id == node_id]


# ---- epoch_order ------------------------------------------------------------------------------


@pytest.mark.parametrize("n_rows, seed", [(1, 0), (100, 7), (1000, 2**40 + 3)])
def test_a_whole_pass_is_todays_seeded_permutation(n_rows: int, seed: int) -> None:
    today = np.random.default_rng(seed).permutation(n_rows)
    assert np.array_equal(epoch_order(n_rows, seed), today)
    assert np.array_equal(epoch_order(n_rows, seed, 0, 0), today)


@pytest.mark.parametrize("n_rows, start, replay", [(50, 30, 7), (50, 30, 30), (50, 50, 0),
                                                   (50, 10, 0), (5, 5, 5)])
def test_a_subset_pass_is_the_new_rows_once_and_distinct_older_ones(
        n_rows: int, start: int, replay: int) -> None:
    order = epoch_order(n_rows, 11, start, replay)

    assert len(order) == n_rows - start + replay
    assert np.array_equal(np.sort(order[order >= start]), np.arange(start, n_rows))
    older = order[order < start]
    assert len(older) == replay == len(set(older.tolist())) and (older >= 0).all()
    assert np.array_equal(order, epoch_order(n_rows, 11, start, replay))  # from the seed alone


def test_a_subset_pass_past_its_rows_is_refused() -> None:
    with pytest.raises(ValueError, match="replay <= start"):
        epoch_order(50, 0, 10, 11)
    with pytest.raises(ValueError, match="replay <= start"):
        epoch_order(50, 0, 51, 0)


def test_a_train_job_carries_its_pass_both_ways() -> None:
    params = MLP(DIM, 4, 4, CLASSES).params()
    job = jobs.TrainJob("d", 1, 0, 1, 8, 1e-3, 9, params, offset=3, rows=8, order_start=2**33,
                        order_replay=17)

    back = jobs.pb_to_train_job(pb.TrainRequest.FromString(
        jobs.train_job_to_pb(job).SerializeToString()))

    assert (back.order_start, back.order_replay) == (2**33, 17)


# ---- uploads -----------------------------------------------------------------------------------


def test_a_trainer_holding_the_last_version_is_sent_only_the_new_rows(
        trainers: Trainers) -> None:
    # Prepare
    coord = _coordinator(trainers)
    parts = [_data(n, seed) for seed, n in enumerate([200, 40, 24])]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    ids = [coord.extend_dataset(*parts[0])]
    first = coord.train_epoch(1, *_test_set())

    # Execute: two more extensions, an epoch after each
    ids.append(coord.extend_dataset(*parts[1]))
    second = coord.train_epoch(2, *_test_set())
    ids.append(coord.extend_dataset(*parts[2]))
    third = coord.train_epoch(3, *_test_set())
    coord.close()

    # Assert
    assert len(set(ids)) == 3 and ids[1].startswith("stream-240-")
    for node_id, servicer in trainers.servicers.items():
        assert _uploads(first, node_id) == [(_upload_bytes(ids[0], x[:200], y[:200]), "")]
        append = _upload_bytes(ids[1], x[:240], y[:240], ids[0], 200)
        assert _uploads(second, node_id) == [(append, "")]
        assert append < _upload_bytes(ids[1], x[:240], y[:240]) / 3
        assert _uploads(third, node_id) == [(_upload_bytes(ids[2], x, y, ids[1], 240), "")]
        held_x, held_y = servicer.datasets[ids[2]]  # base rows, then the appended ones
        assert torch.equal(held_x, torch.from_numpy(x)) and torch.equal(held_y,
                                                                        torch.from_numpy(y))
        assert list(servicer.datasets) == ids[1:]  # MAX_DATASETS: the newest two
        calls = [w for r in first.rounds + second.rounds + third.rounds for w in r
                 if w.node_id == node_id]
        ups = [w for e in (first, second, third) for w in e.dataset_bytes
               if w.node_id == node_id]
        assert servicer.bytes.received == sum(w.sent for w in calls + ups)  # charged == seen
    assert third.samples_trained == third.distinct_trained == 264


def test_extending_keeps_what_was_trained_and_refuses_what_cannot_grow(
        trainers: Trainers) -> None:
    coord = Coordinator(CFG, DIM, CLASSES)
    coord.set_dataset("d1", *_data(20, 0))
    coord._seen["d1"][:5] = True

    grown = coord.extend_dataset(*_data(10, 1))

    assert np.array_equal(coord._seen[grown], np.r_[[True] * 5, [False] * 25])
    assert list(coord._seen) == [grown] and coord.distinct_trained == 5
    with pytest.raises(ValueError, match="features a row"):
        coord.extend_dataset(np.zeros((3, DIM + 1), np.float32), np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="rows > 0"):
        coord.extend_dataset(np.zeros((0, DIM), np.float32), np.zeros(0, np.int64))
    coord.set_datasets([("a", *_data(4, 0)), ("b", *_data(4, 1))])
    with pytest.raises(ValueError, match="grows one dataset"):
        coord.extend_dataset(*_data(3, 2))
    coord.close()


def test_a_restarted_trainer_is_sent_the_dataset_whole(trainers: Trainers) -> None:
    coord = _coordinator(trainers)
    first = coord.extend_dataset(*_data(200, 0))
    coord.train_epoch(1, *_test_set())
    coord.add_trainer("trainer-0", trainers.start("trainer-0"))  # registered again, empty

    second = coord.extend_dataset(*_data(40, 1))
    result = coord.train_epoch(2, *_test_set())
    coord.close()

    x, y = coord._datasets[0][1:]
    assert _uploads(result, "trainer-0") == [(_upload_bytes(second, x, y), "")]
    assert _uploads(result, "trainer-1") == [(_upload_bytes(second, x, y, first, 200), "")]
    assert torch.equal(trainers.servicers["trainer-0"].datasets[second][0], torch.from_numpy(x))


def test_a_trainer_that_lost_the_base_is_sent_the_dataset_whole_in_the_same_round(
        trainers: Trainers) -> None:
    # Prepare: trainer-0 lost the first version; the coordinator believes it holds it
    coord = _coordinator(trainers)
    first = coord.extend_dataset(*_data(200, 0))
    coord.train_epoch(1, *_test_set())
    lost = trainers.servicers["trainer-0"]
    lost.datasets.clear()

    # Execute
    second = coord.extend_dataset(*_data(40, 1))
    result = coord.train_epoch(2, *_test_set())
    coord.close()

    # Assert: the refused append and the whole upload are both charged; it trains on
    x, y = coord._datasets[0][1:]
    (refused, why), whole = _uploads(result, "trainer-0")
    assert "FAILED_PRECONDITION" in why
    assert refused in (0, _upload_bytes(second, x, y, first, 200))  # 0: refused before counted
    assert whole == (_upload_bytes(second, x, y), "")
    assert coord.failures == []
    assert any(w.node_id == "trainer-0" for w in result.rounds[0])
    assert torch.equal(lost.datasets[second][0], torch.from_numpy(x))
    assert result.samples_trained == 240


# ---- the trainer refusing appends ---------------------------------------------------------


@pytest.fixture()
def stub(trainers: Trainers) -> Iterator[pb_grpc.TrainerStub]:
    """A trainer holding dataset "base" (10 rows)."""
    ch = channel(trainers.start("trainer-x"))
    trainer = pb_grpc.TrainerStub(ch)
    trainer.LoadDataset(jobs.dataset_chunks("base", *_data(10, 0), CHUNK_BYTES), timeout=10)
    yield trainer
    ch.close()


def _append(base_id: str, base_rows: int, total: int, rows: int = 2,
            dim: int = DIM) -> pb.DatasetChunk:
    return pb.DatasetChunk(
        dataset_id="grown", total_rows=total, base_id=base_id, base_rows=base_rows,
        features=tensors.ndarray_to_pb(np.ones((rows, dim), np.float32)),
        labels=tensors.ndarray_to_pb(np.ones(rows, np.int64)))


@pytest.mark.parametrize(("chunk", "code", "match"), [
    (_append("base", 11, 10), grpc.StatusCode.INVALID_ARGUMENT, "11 base rows, more than"),
    (_append("", 4, 6), grpc.StatusCode.INVALID_ARGUMENT, "without a base_id"),
    (_append("base", 9, 10), grpc.StatusCode.INVALID_ARGUMENT, "11 rows so far, more than"),
    (_append("other", 4, 6), grpc.StatusCode.FAILED_PRECONDITION, "holds 0 of its 4 rows"),
    (_append("base", 11, 13), grpc.StatusCode.FAILED_PRECONDITION, "holds 10 of its 11 rows"),
    (_append("base", 4, 6, dim=DIM - 1), grpc.StatusCode.INVALID_ARGUMENT, "its base 'base'"),
], ids=["base past the total", "rows without a base", "more rows than announced",
        "unknown base", "base too short", "other dim"])
def test_an_append_that_cannot_be_is_refused_at_its_first_chunk(
        stub: pb_grpc.TrainerStub, chunk: pb.DatasetChunk, code: grpc.StatusCode,
        match: str) -> None:
    def stream() -> Iterator[pb.DatasetChunk]:
        yield chunk
        threading.Event().wait(5)  # had the refusal waited for the stream's end, 5 s here

    with pytest.raises(grpc.RpcError) as e:
        stub.LoadDataset(stream(), timeout=4)
    assert e.value.code() == code
    assert match in (e.value.details() or "")


def test_an_append_is_the_bases_first_rows_then_the_new_ones(
        trainers: Trainers, stub: pb_grpc.TrainerStub) -> None:
    reply = stub.LoadDataset(iter([_append("base", 4, 7, rows=3)]), timeout=10)

    x, y = trainers.servicers["trainer-x"].datasets["grown"]
    base_x, base_y = _data(10, 0)
    assert reply.rows == 7
    assert torch.equal(x, torch.from_numpy(np.r_[base_x[:4], np.ones((3, DIM), np.float32)]))
    assert torch.equal(y, torch.from_numpy(np.r_[base_y[:4], [1, 1, 1]]))


@pytest.mark.parametrize(("start", "replay", "rows", "code"), [
    (6, 2, 6, grpc.StatusCode.OK), (6, 2, 7, grpc.StatusCode.INVALID_ARGUMENT),
    (6, 7, 1, grpc.StatusCode.INVALID_ARGUMENT), (11, 0, 1, grpc.StatusCode.INVALID_ARGUMENT),
])
def test_a_train_job_is_checked_against_its_pass(
        stub: pb_grpc.TrainerStub, start: int, replay: int, rows: int,
        code: grpc.StatusCode) -> None:
    job = jobs.TrainJob("base", 0, 0, 1, 8, 1e-3, 3, MLP(DIM, 4, 4, CLASSES).params(),
                        rows=rows, order_start=start, order_replay=replay)  # pass: 10 - 6 + 2

    try:
        list(stub.Train(iter(jobs.split_request(jobs.train_job_to_pb(job), CHUNK_BYTES)),
                        timeout=10))
        got = grpc.StatusCode.OK
    except grpc.RpcError as e:
        got = e.code()

    assert got == code


# ---- passes over the new rows ----------------------------------------------------------------


@pytest.mark.parametrize("share, replay", [(0.0, 0), (0.25, 10), (5.0, 200)])
def test_a_new_rows_pass_trains_every_added_row_once_and_the_replayed_share(
        trainers: Trainers, share: float, replay: int) -> None:
    coord = _coordinator(trainers)
    coord.extend_dataset(*_data(200, 0))
    grown = coord.extend_dataset(*_data(40, 1))

    result = coord.train_epoch(1, *_test_set(), new_rows_only=True, replay_share=share)
    coord.close()

    seen = coord._seen[grown]
    assert result.samples_trained == result.distinct_trained == 40 + replay  # each row once
    assert seen[200:].all() and seen[:200].sum() == replay  # replay: at most the 200 older
    assert sum(w.rows for r in result.rounds for w in r) == 40 + replay


def test_a_new_rows_pass_is_centralized_training_on_the_pass_step_for_step(
        trainers: Trainers) -> None:
    # Prepare: K = 1 with travelling moments is centralized training
    cfg = TrainingConfig(strategy="ist", workers=1, local_steps=3, batch_size=8,
                         hidden=(12, 8), seed=2, lr=1e-2, moments="travel")
    coord = _coordinator(trainers, cfg)
    old, new = _data(60, 0), _data(25, 1)
    base = coord.extend_dataset(*old)
    coord.train_epoch(1, *_test_set())  # the first version: a whole pass

    # Execute
    grown = coord.extend_dataset(*new)
    result = coord.train_epoch(2, *_test_set(), new_rows_only=True, replay_share=0.4)
    coord.close()

    # Assert: the trainer's dataset (base + appended rows) and the pass are the reference's
    x, y = coord._datasets[0][1:]
    assert [w.sent for w in result.dataset_bytes] == [_upload_bytes(grown, x, y, base, 60)]
    assert result.samples_trained == 25 + 10
    for name, p in _reference(cfg, old, new).items():
        torch.testing.assert_close(coord.params[name], p, rtol=1e-5, atol=1e-6)


def _reference(cfg: TrainingConfig, old: tuple[np.ndarray, np.ndarray],
               new: tuple[np.ndarray, np.ndarray]) -> dict[str, torch.Tensor]:
    """Plain centralized training, torch.optim.Adam kept throughout: a whole pass over `old`,
    then the pass over `new` and 40 % of its size replayed from `old`."""
    torch.manual_seed(cfg.seed)
    model = MLP(DIM, cfg.hidden[0], cfg.hidden[1], CLASSES)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    x, y = torch.from_numpy(old[0]), torch.from_numpy(old[1])
    order = epoch_order(60, stable_seed(cfg.seed, "order", 1))
    train_steps(model, x, y, torch.from_numpy(order), cfg.batch_size, optimizer)
    x = torch.from_numpy(np.concatenate([old[0], new[0]]))
    y = torch.from_numpy(np.concatenate([old[1], new[1]]))
    order = epoch_order(85, stable_seed(cfg.seed, "order", 2), 60, 10)
    train_steps(model, x, y, torch.from_numpy(order), cfg.batch_size, optimizer)
    return model.params()


class _Crash(Exception):
    pass


def test_a_new_rows_pass_resumed_from_a_checkpoint_ends_as_an_uninterrupted_one(
        trainers: Trainers, tmp_path: Path) -> None:
    # Prepare: the uninterrupted pass, and one that crashes after two rounds
    def grown(coord: Coordinator) -> Coordinator:
        coord.extend_dataset(*_data(100, 0))
        coord.extend_dataset(*_data(150, 1))
        return coord

    whole = grown(_coordinator(trainers))
    expected = whole.train_epoch(1, *_test_set(), new_rows_only=True, replay_share=0.2)
    whole.close()
    first = grown(_coordinator(trainers, checkpoint_dir=tmp_path))
    original = first._round

    def crash_after_two(epoch: int, progress: object) -> None:
        if first.round >= 2:
            raise _Crash
        original(epoch, progress)  # type: ignore[arg-type]

    first._round = crash_after_two  # type: ignore[method-assign]
    with pytest.raises(_Crash):
        first.train_epoch(1, *_test_set(), new_rows_only=True, replay_share=0.2)
    first.close()

    # Execute: continued, asked with another share: the checkpoint's pass goes on
    second = grown(_coordinator(trainers, checkpoint_dir=tmp_path))
    assert second.load_checkpoint()
    result = second.train_epoch(1, *_test_set(), new_rows_only=True, replay_share=0.9)
    second.close()

    # Assert
    assert result.rounds_resumed == 2 and result.samples_trained == 150 + 30
    assert result.distinct_trained == expected.distinct_trained == 180
    for name in whole.params:
        assert torch.equal(second.params[name], whole.params[name])
    ckpt = torch.load(tmp_path / checkpoints.CHECKPOINT, weights_only=False)
    for key in ("start", "replay"):  # a checkpoint from before subset passes
        del ckpt["progress"][key]
    checkpoints.save(tmp_path, ckpt)
    older = grown(Coordinator(CFG, DIM, CLASSES, tmp_path))
    assert older.load_checkpoint()
    assert older._resumed is not None and (older._resumed.start, older._resumed.replay) == (0, 0)
    older.close()
