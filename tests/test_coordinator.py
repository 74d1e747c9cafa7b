"""The training coordinator against real trainer servers on localhost."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from sparsat.ground_station import ist
from sparsat.ground_station.checkpoints import CheckpointError
from sparsat.ground_station.config import TrainingConfig
from sparsat.ground_station.coordinator import Coordinator
from sparsat.node.data.masking import stable_seed
from sparsat.node.models.mlp import MLP
from sparsat.node.models.training import Adam, AdamState, epoch_order, train_steps
from sparsat.node.processes.trainer import TrainerServicer
from sparsat.node.wire.jobs import TrainJob, split_request, train_job_to_pb
from sparsat.node.wire.rpc import CHUNK_BYTES, bind, make_server, wire_size
from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb
from sparsat.proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc

DIM, CLASSES, ROWS = 16, 4, 1024


class Trainers:
    """Trainer servers on localhost that a test can stop and start again."""

    def __init__(self) -> None:
        self.servers: dict[str, grpc.Server] = {}
        self.servicers: dict[str, TrainerServicer] = {}
        self.addresses: dict[str, str] = {}

    def start(self, node_id: str) -> str:
        servicer = TrainerServicer(node_id, torch.device("cpu"))
        server = make_server()
        pb_grpc.add_TrainerServicer_to_server(servicer, server)
        self.addresses[node_id] = bind(server, "127.0.0.1:0")
        server.start()
        self.servers[node_id], self.servicers[node_id] = server, servicer
        return self.addresses[node_id]

    def stop(self, node_id: str) -> None:
        self.servers.pop(node_id).stop(None)


@pytest.fixture()
def trainers() -> Iterator[Trainers]:
    t = Trainers()
    yield t
    for server in t.servers.values():
        server.stop(None)


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    centers = np.random.default_rng(42).normal(0, 3, (CLASSES, DIM))  # same classes, any split
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, ROWS)
    return (centers[y] + rng.normal(0, 1, (ROWS, DIM))).astype(np.float32), y.astype(np.int64)


def _coordinator(trainers: Trainers, cfg: TrainingConfig, n: int | None = None,
                 checkpoint_dir: Path | None = None) -> Coordinator:
    coord = Coordinator(cfg, DIM, CLASSES, checkpoint_dir)
    for k in range(cfg.num_workers if n is None else n):
        node_id = f"trainer-{k}"
        coord.add_trainer(node_id, trainers.addresses.get(node_id) or trainers.start(node_id))
    x, y = _data()
    coord.set_dataset("d1", x, y)
    return coord


def _rows(seed: int, epoch: int, start: int, n: int) -> torch.Tensor:
    """Rows [start, start + n) of the coordinator's order for `epoch`."""
    order = epoch_order(ROWS, stable_seed(seed, "order", epoch))
    return torch.from_numpy(order[start : start + n])


def _test_set() -> tuple[torch.Tensor, torch.Tensor]:
    tx, ty = _data(1)
    return torch.from_numpy(tx), torch.from_numpy(ty)


@pytest.mark.parametrize("strategy, k, moments", [
    ("centralized", 1, "travel"), ("ist", 2, "reset"), ("ist", 2, "travel"),
    ("local_sgd", 2, "reset"), ("local_sgd", 2, "travel")])
def test_epochs_train_and_bytes_match_the_trainers_counts(
        trainers: Trainers, strategy: str, k: int, moments: str) -> None:
    cfg = TrainingConfig(strategy=strategy, workers=k, local_steps=4, batch_size=32,  # type: ignore[arg-type]
                         hidden=(33, 17), seed=1, lr=1e-2, moments=moments)  # type: ignore[arg-type]
    coord = _coordinator(trainers, cfg)
    before = {n: v.clone() for n, v in coord.params.items()}

    first = coord.train_epoch(1, *_test_set())
    second = coord.train_epoch(2, *_test_set())
    coord.close()

    assert len(first.dataset_bytes) == k and second.dataset_bytes == []  # sent once
    rounds = -(-ROWS // (k * 4 * 32))  # an epoch is the same number of samples for every K
    assert len(first.rounds) == len(second.rounds) == rounds
    assert first.samples_trained == second.samples_trained == ROWS  # every row, once
    assert first.distinct_trained == second.distinct_trained == ROWS
    assert second.accuracy > 0.9  # four well separated blobs
    assert all(not torch.equal(before[n], coord.params[n]) for n in before)
    for node_id, servicer in trainers.servicers.items():  # charged == what each trainer saw
        mine = [w for r in first.rounds + second.rounds for w in r if w.node_id == node_id]
        up = [w for w in first.dataset_bytes if w.node_id == node_id]
        assert servicer.bytes.received == sum(w.sent for w in mine + up)
        assert servicer.bytes.sent == sum(w.received for w in mine + up)


def _centralized_reference(cfg: TrainingConfig, epochs: int) -> dict[str, torch.Tensor]:
    """Plain centralized training: torch.optim.Adam kept for the whole run, one pass over
    the rows per epoch in the coordinator's order."""
    x, y = (torch.from_numpy(a) for a in _data())
    torch.manual_seed(cfg.seed)
    model = MLP(DIM, cfg.hidden[0], cfg.hidden[1], CLASSES)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    for epoch in range(1, epochs + 1):
        train_steps(model, x, y, _rows(cfg.seed, epoch, 0, ROWS), cfg.batch_size, optimizer)
    return model.params()


def test_k1_with_travelling_moments_is_centralized_training_step_for_step(
        trainers: Trainers) -> None:
    cfg = TrainingConfig(strategy="ist", workers=1, local_steps=5, batch_size=32,
                         hidden=(33, 17), seed=3, lr=1e-2, moments="travel")
    coord = _coordinator(trainers, cfg)
    coord.train_epoch(1, *_test_set())
    coord.train_epoch(2, *_test_set())
    coord.close()
    reference = _centralized_reference(cfg, 2)
    assert coord.round == 2 * (-(-ROWS // (5 * 32)))  # 1024 rows: 6 rounds of 5, one of 2
    for name, ref in reference.items():
        torch.testing.assert_close(coord.params[name], ref, rtol=1e-5, atol=1e-6)

    # and resetting the moments every round is measurably not the same training
    reset = _coordinator(trainers, TrainingConfig(**{**cfg.__dict__, "moments": "reset"}))
    reset.train_epoch(1, *_test_set())
    reset.train_epoch(2, *_test_set())
    reset.close()
    assert (reset.params["w1"] - reference["w1"]).abs().max() > 1e-3


def test_our_adam_is_torch_adam() -> None:
    x, y = (torch.from_numpy(a) for a in _data())
    torch.manual_seed(0)
    a = MLP(DIM, 20, 10, CLASSES)
    b = MLP(DIM, 20, 10, CLASSES)
    b.load_params(a.params())
    rows = torch.from_numpy(epoch_order(ROWS, 7)[: 25 * 32 + 5])  # 25 steps and a short one
    train_steps(a, x, y, rows, 32, torch.optim.Adam(a.parameters(), lr=1e-2))
    train_steps(b, x, y, rows, 32, Adam(b.wire_parameters(), 1e-2))
    for name, p in a.params().items():
        torch.testing.assert_close(b.params()[name], p, rtol=0, atol=1e-7)


@pytest.mark.parametrize("scale", ["none", "k"])
def test_an_ist_round_is_each_subnet_trained_exactly_l_steps_and_written_back(
        trainers: Trainers, scale: str) -> None:
    cfg = TrainingConfig(strategy="ist", workers=3, local_steps=6, batch_size=16,
                         hidden=(31, 20), seed=5, lr=1e-2, moments="travel",
                         subnet_scale=scale)  # type: ignore[arg-type]
    coord = _coordinator(trainers, cfg)
    before = {n: v.clone() for n, v in coord.params.items()}
    generator = torch.Generator().manual_seed(stable_seed(cfg.seed, "partition"))
    part = ist.partition(31, 20, 3, generator)  # the coordinator's first partition
    progress = coord._start_epoch(1, ROWS)
    coord._round(1, progress)
    coord.close()

    x, y = (torch.from_numpy(a) for a in _data())
    expected = {n: v.clone() for n, v in before.items()}
    pieces = {}
    for w in range(3):
        model = MLP.from_params(ist.subnet(before, part, w))
        model.hidden_scale = 3.0 if scale == "k" else 1.0
        steps, _ = train_steps(model, x, y, _rows(cfg.seed, 1, w * 96, 96), 16,
                               torch.optim.Adam(model.parameters(), lr=1e-2))
        assert steps == 6
        pieces[w] = model.params()
    ist.write_back(expected, part, pieces)
    for name in expected:
        torch.testing.assert_close(coord.params[name], expected[name], rtol=1e-5, atol=1e-6)
    off_diagonal = torch.ones(20, 31, dtype=torch.bool)
    for g1, g2 in zip(part.hidden1, part.hidden2, strict=True):
        off_diagonal[g2.unsqueeze(1), g1.unsqueeze(0)] = False
    assert torch.equal(coord.params["w2"][off_diagonal], before["w2"][off_diagonal])
    assert coord.state is not None  # moments and step counts went back beside the weights
    assert torch.all(coord.state.step["w2"][off_diagonal] == 0)
    assert torch.all(coord.state.step["w2"][~off_diagonal] == 6)
    assert torch.all(coord.state.step["w1"] == 6) and torch.all(coord.state.step["b3"] == 6)
    assert torch.all(coord.state.exp_avg["w2"][off_diagonal] == 0)


def test_step_counts_follow_each_w2_element_over_rounds(trainers: Trainers) -> None:
    cfg = TrainingConfig(strategy="ist", workers=2, local_steps=3, batch_size=32,
                         hidden=(12, 10), seed=2, moments="travel")
    coord = _coordinator(trainers, cfg)
    coord.train_epoch(1, *_test_set())
    coord.close()
    assert coord.state is not None
    steps = coord.state.step
    # 1024 rows: 5 rounds of 3 batches per worker, then 2 batches left: one each
    assert coord.round == 6
    total = 5 * 3 + 1
    assert torch.all(steps["w1"] == total) and torch.all(steps["w3"] == total)
    w2 = steps["w2"]
    assert w2.max() <= total and w2.min() < w2.max()
    # each round, each row of W2 is trained in one of its columns' groups: half the columns
    assert torch.allclose(w2.sum(1), torch.full((10,), total * 6.0))


def test_local_sgd_averages_the_replicas(trainers: Trainers) -> None:
    cfg = TrainingConfig(strategy="local_sgd", workers=2, local_steps=4, batch_size=32,
                         hidden=(9, 7), seed=4, lr=1e-2)
    coord = _coordinator(trainers, cfg)
    before = {n: v.clone() for n, v in coord.params.items()}
    coord._round(1, coord._start_epoch(1, ROWS))
    coord.close()
    x, y = (torch.from_numpy(a) for a in _data())
    replicas = []
    for w in range(2):
        model = MLP.from_params(before)
        train_steps(model, x, y, _rows(cfg.seed, 1, w * 128, 128), 32,
                    torch.optim.Adam(model.parameters(), lr=1e-2))
        replicas.append(model.params())
    for name in before:
        mean = (replicas[0][name] + replicas[1][name]) / 2
        torch.testing.assert_close(coord.params[name], mean, rtol=1e-5, atol=1e-6)


def test_a_failed_trainer_keeps_its_pieces_and_rejoins_after_registering_again(
        trainers: Trainers) -> None:
    cfg = TrainingConfig(strategy="ist", workers=2, local_steps=2, batch_size=32,
                         hidden=(8, 8), round_timeout_s=5, moments="travel")
    coord = _coordinator(trainers, cfg)
    coord.train_epoch(1, *_test_set())
    trainers.stop("trainer-1")
    before = {n: v.clone() for n, v in coord.params.items()}
    state_before = {n: v.clone() for n, v in coord.state.exp_avg.items()}  # type: ignore[union-attr]
    generator = torch.Generator()
    generator.set_state(coord.generator.get_state())
    part = ist.partition(8, 8, 2, generator)
    progress = coord._start_epoch(2, ROWS)
    coord._round(2, progress)  # trainer-1 is gone: its group keeps its pre-round state
    assert [w.error != "" for w in progress.rounds[0]] == [False, True]
    assert progress.todo[-1] == (64, 64)  # its rows wait at the end of the epoch's queue
    assert progress.samples_trained == 64
    g1 = part.hidden1[1]
    assert torch.equal(coord.params["w1"][g1], before["w1"][g1])
    assert torch.equal(coord.state.exp_avg["w1"][g1], state_before["w1"][g1])  # type: ignore[union-attr]
    assert not torch.equal(coord.params["w1"][part.hidden1[0]], before["w1"][part.hidden1[0]])
    assert [f["node_id"] for f in coord.failures] == ["trainer-1"]

    coord._round(2, progress)  # one trainer left: the round runs on it alone
    assert [w.node_id for w in progress.rounds[1]] == ["trainer-0"]

    coord.add_trainer("trainer-1", trainers.start("trainer-1"))  # back, with no dataset
    coord._round(2, progress)
    assert [w.node_id for w in progress.rounds[2]] == ["trainer-0", "trainer-1"]
    assert [w.node_id for w in progress.dataset_bytes] == ["trainer-1"]
    assert all(w.error == "" for w in progress.rounds[2])
    coord.close()


def test_no_trainer_at_all_fails_the_epoch_after_the_round_timeout(trainers: Trainers) -> None:
    from sparsat.ground_station.coordinator import TrainerUnavailable

    cfg = TrainingConfig(strategy="ist", workers=2, local_steps=2, batch_size=32,
                         hidden=(8, 8), round_timeout_s=1)
    coord = Coordinator(cfg, DIM, CLASSES)
    coord.add_trainer("gone", "127.0.0.1:1")
    coord.set_dataset("d1", *_data())
    with pytest.raises(TrainerUnavailable):
        coord.train_epoch(1, *_test_set())
    assert coord.failures and coord.failures[0]["node_id"] == "gone"
    coord.close()


class _Crash(Exception):
    pass


def test_resuming_mid_epoch_from_the_checkpoint_equals_an_uninterrupted_run(
        trainers: Trainers, tmp_path: Path) -> None:
    cfg = TrainingConfig(strategy="ist", workers=2, local_steps=3, batch_size=32,
                         hidden=(12, 10), seed=6, moments="travel")
    whole = _coordinator(trainers, cfg)
    for epoch in (1, 2):
        whole.train_epoch(epoch, *_test_set())
    whole.close()

    first = _coordinator(trainers, cfg, checkpoint_dir=tmp_path)
    first.train_epoch(1, *_test_set())
    original = first._round

    def crash_after_two(epoch: int, progress: object) -> None:
        if first.round >= whole.round // 2 + 2:
            raise _Crash
        original(epoch, progress)  # type: ignore[arg-type]

    first._round = crash_after_two  # type: ignore[method-assign]
    with pytest.raises(_Crash):
        first.train_epoch(2, *_test_set())
    first.close()

    second = _coordinator(trainers, cfg, checkpoint_dir=tmp_path)
    assert second.load_checkpoint()
    with pytest.raises(CheckpointError):  # the checkpoint stopped in epoch 2
        second._start_epoch(3, ROWS)
    assert second.load_checkpoint()
    result = second.train_epoch(2, *_test_set())
    second.close()
    assert result.rounds_resumed == 2
    assert len(result.rounds) == whole.round // 2
    for name in whole.params:
        assert torch.equal(second.params[name], whole.params[name])

    other = Coordinator(TrainingConfig(**{**cfg.__dict__, "lr": 0.5}), DIM, CLASSES, tmp_path)
    other.set_dataset("d1", *_data())
    with pytest.raises(CheckpointError, match="other training settings"):
        other.load_checkpoint()
    other.close()


@pytest.mark.parametrize("rows, k, steps, batch", [(1000, 2, 3, 64), (1001, 3, 2, 10),
                                                   (5, 4, 3, 2), (64, 2, 10, 64)])
def test_an_epoch_visits_every_row_once_and_only_the_last_batch_is_short(
        rows: int, k: int, steps: int, batch: int) -> None:
    coord = Coordinator(TrainingConfig(strategy="ist", workers=k, local_steps=steps,
                                       batch_size=batch, hidden=(8, 8)), DIM, CLASSES)
    progress = coord._start_epoch(1, rows)
    slices = []
    while not progress.complete:
        quotas = coord._quotas(progress.remaining, k)
        assert len(quotas) == k and all(q <= steps * batch for q in quotas)
        slices += progress.take(quotas)
    coord.close()
    covered = np.concatenate([np.arange(o, o + n) for o, n in slices])
    assert np.array_equal(covered, np.arange(rows))  # each row of the order once, in order
    short = [n for _, n in slices if n % batch]
    assert len(short) <= 1 and (not short or slices[-1][1] % batch)


def test_a_failed_call_is_charged_what_went_out(trainers: Trainers) -> None:
    """Connection refused: nothing. A trainer that stops reading half way: the parts of
    the request that went out, not the request's size."""
    cfg = TrainingConfig(strategy="ist", workers=2, local_steps=2, batch_size=32,
                         hidden=(4000, 2000), round_timeout_s=10)
    coord = _coordinator(trainers, cfg, n=1)
    coord.add_trainer("gone", "127.0.0.1:1")  # nothing listens on port 1
    quits = Quitter()
    server = make_server()
    pb_grpc.add_TrainerServicer_to_server(quits, server)
    coord.add_trainer("quits", bind(server, "127.0.0.1:0"))
    server.start()
    try:
        progress = coord._start_epoch(1, ROWS)
        coord._round(1, progress)  # workers "gone" (refused) and "quits" (aborts Train)
        coord._round(1, progress)  # the one left: trainer-0, the same (half-model) job
    finally:
        server.stop(None)
        coord.close()
    upload = {w.node_id: w for w in progress.dataset_bytes}
    assert upload["gone"].sent == 0 and upload["gone"].error
    assert upload["quits"].sent == upload["trainer-0"].sent > 0
    first, second = ({w.node_id: w for w in r} for r in progress.rounds)
    assert list(first) == ["quits"] and list(second) == ["trainer-0"]
    quit = first["quits"]
    assert quit.error and quit.received == 0 and quit.rows == 0
    # parts (head, W1, b1), W2 cut in pieces of CHUNK_BYTES, (b2, W3, b3): charged whole
    # parts that went out, at least the one it read (how many more the transport took in
    # before the abort is up to HTTP/2 flow control), never more than the request
    full = second["trainer-0"].sent
    half = ist.subnet(coord.params, ist.partition(4000, 2000, 2, torch.Generator()), 0)
    job = TrainJob("d1", 0, 0, 2, 32, 1e-3, 0, half, rows=64)  # each got 1/K, K = 2
    parts = [wire_size(p) for p in split_request(train_job_to_pb(job), CHUNK_BYTES)]
    assert len(parts) > 3 and max(parts) < CHUNK_BYTES + 1024  # W2 (8 MB) went in pieces
    assert quit.sent - quits.parts[0] in {sum(parts[1:i]) for i in range(1, len(parts) + 1)}
    # whole: as trainer-0's (the head's varints (round, seed, offset) differ from quits' job)
    assert abs(quits.parts[0] + sum(parts[1:]) - full) < 32


class Quitter(pb_grpc.TrainerServicer):
    """Takes datasets like a trainer; reads one part of a Train call and gives up."""

    def __init__(self) -> None:
        self.parts: list[int] = []

    def LoadDataset(self, request_iterator, context):  # type: ignore[no-untyped-def]
        rows = sum(int(c.labels.shape[0]) for c in request_iterator)
        return pb.LoadDatasetReply(dataset_id="d1", rows=rows)

    def Train(self, request_iterator, context):  # type: ignore[no-untyped-def]
        self.parts = [wire_size(next(request_iterator))]
        time.sleep(0.3)  # the client sees its first write complete and starts the second
        context.abort(grpc.StatusCode.INTERNAL, "gave up")


@pytest.mark.parametrize("moments", ["reset", "travel"])
def test_the_local_sgd_comparison_is_the_size_of_a_real_local_sgd_round(
        trainers: Trainers, moments: str) -> None:
    common = dict(workers=2, local_steps=4, batch_size=32, hidden=(40, 30), seed=1,
                  moments=moments)
    ist_coord = _coordinator(trainers, TrainingConfig(strategy="ist", **common))  # type: ignore[arg-type]
    ist_coord._round(1, ist_coord._start_epoch(1, ROWS))  # IST's state: per-element steps
    ist_coord._round(1, ist_coord._progress)  # type: ignore[arg-type]
    predicted = ist_coord.local_sgd_round_bytes()
    ist_coord.close()
    sgd = _coordinator(trainers, TrainingConfig(strategy="local_sgd", **common))  # type: ignore[arg-type]
    progress = sgd._start_epoch(1, ROWS)
    for _ in range(3):  # the round after two: where the IST coordinator stands
        sgd._round(1, progress)
    sgd.close()
    measured = sum(w.sent + w.received for w in progress.rounds[-1])
    assert predicted == measured


def _ist_round_by_hand(coord: Coordinator, epoch: int, progress: Any) -> tuple[
        ist.Partition, dict[str, torch.Tensor], AdamState, list[int]]:
    """Run one round of `coord`, returning its partition, the weights and moments before it
    and the bytes each job of it would send if it carried one 1/K subnet (built here from
    the pre-round weights, the partition replayed from the coordinator's generator)."""
    cfg = coord.cfg
    generator = torch.Generator()
    generator.set_state(coord.generator.get_state())
    k = cfg.workers
    part = ist.partition(cfg.hidden[0], cfg.hidden[1], k, generator)
    before = {n: v.clone() for n, v in coord.params.items()}
    assert coord.state is not None
    state = AdamState(*({n: v.clone() for n, v in t.items()} for t in (
        coord.state.exp_avg, coord.state.exp_avg_sq, coord.state.step)))
    slices = list(progress.todo)  # the round takes from the front of the queue
    offset = slices[0][0]
    jobs = []
    live = min(len(coord._active), k)
    for w, q in enumerate(coord._quotas(progress.remaining, live)):
        if q:
            piece = ist.subnet(before, part, w)
            moments = AdamState(ist.subnet(state.exp_avg, part, w),
                                ist.subnet(state.exp_avg_sq, part, w),
                                ist.subnet(state.step, part, w)).compact()
            job = coord._job(w, piece, moments, 1.0, epoch, (offset, q))
            jobs.append(sum(wire_size(m) for m in split_request(
                train_job_to_pb(job), CHUNK_BYTES)))
            offset += q
    coord._round(epoch, progress)
    return part, before, state, jobs


def _untouched(coord: Coordinator, part: ist.Partition, w: int,
               before: dict[str, torch.Tensor], state: AdamState) -> None:
    """Subnet w's neurons kept their weights, moments and step counts this round."""
    assert coord.state is not None
    g1, g2 = part.hidden1[w], part.hidden2[w]
    for table, old in ((coord.params, before), (coord.state.exp_avg, state.exp_avg),
                       (coord.state.exp_avg_sq, state.exp_avg_sq),
                       (coord.state.step, state.step)):
        assert torch.equal(table["w1"][g1], old["w1"][g1])
        assert torch.equal(table["b1"][g1], old["b1"][g1])
        assert torch.equal(table["w2"][g2], old["w2"][g2])  # its rows: every column block
        assert torch.equal(table["w2"][:, g1], old["w2"][:, g1])
        assert torch.equal(table["b2"][g2], old["b2"][g2])
        assert torch.equal(table["w3"][:, g2], old["w3"][:, g2])


def _blobs(rows: int) -> tuple[np.ndarray, np.ndarray]:
    centers = np.random.default_rng(42).normal(0, 3, (CLASSES, DIM))
    rng = np.random.default_rng(7)
    y = rng.integers(0, CLASSES, rows)
    return (centers[y] + rng.normal(0, 1, (rows, DIM))).astype(np.float32), y.astype(np.int64)


def test_an_epochs_last_single_batch_trains_one_subnet_not_the_whole_model(
        trainers: Trainers) -> None:
    """N = 9·1280 + 50, K = 2, L = 10, B = 64: nine rounds of two 640-row jobs, then one
    short batch. That last round is still a K-way partition: one job on one half (with a
    half's bytes), the other half neither sent nor changed."""
    n = 9 * 1280 + 50
    cfg = TrainingConfig(strategy="ist", workers=2, local_steps=10, batch_size=64,
                         hidden=(12, 10), seed=8, lr=1e-2, moments="travel")
    coord = _coordinator(trainers, cfg)
    coord.set_dataset("blobs", *_blobs(n))
    progress = coord._start_epoch(1, n)
    expected_bytes = []
    while not progress.complete:
        part, before, state, jobs = _ist_round_by_hand(coord, 1, progress)
        expected_bytes.append(jobs)
    coord.close()

    assert [len(r) for r in progress.rounds] == [2] * 9 + [1]
    assert [w.rows for w in progress.rounds[-1]] == [50]
    assert progress.samples_trained == n
    for r, jobs in zip(progress.rounds, expected_bytes, strict=True):
        assert [w.sent for w in r] == jobs  # every job one 1/K subnet, the last one too
    whole = coord._job(0, before, state.compact(), 1.0, 1, (9 * 1280, 50))
    whole_bytes = sum(wire_size(m) for m in split_request(
        train_job_to_pb(whole), CHUNK_BYTES))
    assert progress.rounds[-1][0].sent < 0.7 * whole_bytes
    _untouched(coord, part, 1, before, state)  # the subnet with no rows left
    g1 = part.hidden1[0]
    assert not torch.equal(coord.params["w1"][g1], before["w1"][g1])  # the one that trained


def test_one_trainer_alive_trains_one_subnet_a_round_never_the_union(
        trainers: Trainers) -> None:
    cfg = TrainingConfig(strategy="ist", workers=3, local_steps=4, batch_size=32,
                         hidden=(12, 10), seed=9, lr=1e-2, moments="travel")
    coord = _coordinator(trainers, cfg, n=1)  # K = 3, only trainer-0 registered
    progress = coord._start_epoch(1, ROWS)
    rounds = 0
    while not progress.complete:
        part, before, state, jobs = _ist_round_by_hand(coord, 1, progress)
        sizes = progress.rounds[-1]
        assert [w.node_id for w in sizes] == ["trainer-0"] and len(jobs) == 1
        assert sizes[0].sent == jobs[0]  # one third of the model, not the whole
        for w in (1, 2):  # no job: not sent, not changed, moments and steps as they were
            _untouched(coord, part, w, before, state)
        rounds += 1
    coord.close()
    assert rounds == ROWS // (4 * 32) and progress.samples_trained == ROWS
    assert coord.state is not None  # every W1 row trained in about a third of the rounds
    assert 0 < int(coord.state.step["w1"][:, 0].min()) < 4 * rounds


def test_a_trainers_replies_are_charged_the_bytes_that_arrived() -> None:
    # Prepare: a trainer whose encoder is not Python's: it writes an explicit empty
    # dataset_id before the real fields (valid protobuf, 2 bytes more than Python's encoding)
    from sparsat.ground_station.coordinator import TrainerClient

    canonical = pb.LoadDatasetReply(dataset_id="ds", rows=3).SerializeToString()
    raw = b"\x0a\x00" + canonical

    def load(chunks: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        for _ in chunks:
            pass
        return raw

    server = make_server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "sparsat.v1.Trainer", {"LoadDataset": grpc.stream_unary_rpc_method_handler(load)})])
    address = bind(server, "127.0.0.1:0")
    server.start()
    client = TrainerClient("odd-encoder", address)
    x, y = np.zeros((3, 4), np.float32), np.zeros(3, np.int64)

    # Execute
    try:
        size = client.load_dataset("ds", x, y, timeout_s=10)
    finally:
        client.channel.close()
        server.stop(None)

    # Assert: what came in, not what Python would re-encode
    assert size.received == len(raw) + 5 == wire_size(pb.LoadDatasetReply.FromString(raw)) + 2
