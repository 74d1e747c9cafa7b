"""Trainer calls stream their tensors in chunks both ways (issue 15 item 4): a model whose
request or reply is more than gRPC's 64 MiB in one message trains, every message stays
small, and both sides count the same bytes, also of a call that breaks half way."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import torch

from sparsat.ground_station.coordinator import CallFailed, TrainerClient
from sparsat.node.models.mlp import MLP
from sparsat.node.models.training import AdamState, steps_for
from sparsat.node.processes.trainer import TrainerServicer
from sparsat.node.wire import jobs, tensors
from sparsat.node.wire.codec import CodecError
from sparsat.node.wire.rpc import (
    CHUNK_BYTES,
    MAX_MESSAGE_BYTES,
    bind,
    channel,
    make_server,
    wire_size,
)
from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb
from sparsat.proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc

BOUND = CHUNK_BYTES + 4096  # no message on the wire is bigger than a part and its framing
ROWS, BATCH = 16, 8


@pytest.fixture()
def trainer() -> Iterator[tuple[TrainerServicer, str]]:
    servicer = TrainerServicer("trainer-big", torch.device("cpu"))
    server = make_server()
    pb_grpc.add_TrainerServicer_to_server(servicer, server)
    address = bind(server, "127.0.0.1:0")
    server.start()
    yield servicer, address
    server.stop(None)


def _big_job() -> jobs.TrainJob:
    """A 768-2000-2000-10 MLP with travelling moments and per-element step counts (IST's
    coordinator keeps them: some W2 blocks skip rounds): about 89 MB each way."""
    torch.manual_seed(0)
    params = MLP(768, 2000, 2000, 10).params()
    state = AdamState.zeros(params, full_steps=True)
    for step in state.step.values():
        step.view(-1)[0] = 1  # not uniform: the reply keeps them per element
    return jobs.TrainJob("big", 0, 0, steps_for(ROWS, BATCH), BATCH, 1e-3, 7, params,
                          state, 1.0, offset=0, rows=ROWS)


def _load(client: TrainerClient) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((ROWS, 768)).astype(np.float32)
    y = rng.integers(0, 10, ROWS).astype(np.int64)
    client.load_dataset("big", x, y, timeout_s=30)


def test_a_768_2000_2000_mlp_with_moments_trains_in_parts_each_way(
        trainer: tuple[TrainerServicer, str]) -> None:
    # Prepare
    servicer, address = trainer
    client = TrainerClient("trainer-big", address)
    _load(client)
    job = _big_job()
    request = jobs.train_job_to_pb(job)
    assert request.ByteSize() > MAX_MESSAGE_BYTES  # one message would be refused
    before = (servicer.bytes.received, servicer.bytes.sent)

    # Execute: the coordinator's client, then the same call by hand to see each message
    params, moments, loss, size = client.train(job, timeout_s=120)
    parts = jobs.split_request(request, CHUNK_BYTES)
    replies = list(pb_grpc.TrainerStub(client.channel).Train(iter(parts), timeout=120))
    client.close()

    # Assert: trained (weights moved, moments back at full shape), small messages only
    assert torch.isfinite(torch.tensor(loss))
    assert moments is not None and set(moments.exp_avg) == set(job.params)
    for name, p in job.params.items():
        assert params[name].shape == p.shape and moments.exp_avg[name].shape == p.shape
    assert not torch.equal(params["w2"], job.params["w2"])
    assert max(wire_size(m) for m in parts + replies) < BOUND
    reply, reply_bytes = jobs.merge_reply(iter(replies))
    assert reply.ByteSize() > MAX_MESSAGE_BYTES and len(replies) > 64
    # the same job twice: the same result, whatever way it was read
    again = tensors.pb_to_params(reply.params)
    assert all(torch.equal(again[n], params[n]) for n in params)
    # bytes: each side counted every part of both calls, and they agree
    received = servicer.bytes.received - before[0]
    sent = servicer.bytes.sent - before[1]
    assert size.sent + sum(wire_size(m) for m in parts) == received
    assert size.received + reply_bytes == sent
    assert size.sent == sum(wire_size(m) for m in parts)  # the same request both times


class Breaker(pb_grpc.TrainerServicer):
    """Reads the request, sends three parts of a reply and gives up."""

    def __init__(self) -> None:
        self.sent: list[int] = []

    def Train(self, request_iterator, context):  # type: ignore[no-untyped-def]
        request, _ = jobs.merge_request(request_iterator)
        reply = pb.TrainReply(params=request.params, steps_done=request.steps)
        for part in jobs.split_reply(reply, CHUNK_BYTES)[:3]:
            yield part
            self.sent.append(wire_size(part))
        time.sleep(0.2)  # the parts reach the client before the status
        context.abort(grpc.StatusCode.INTERNAL, "gave up")


def test_a_reply_that_breaks_half_way_is_charged_the_parts_that_came_in() -> None:
    # Prepare
    breaker = Breaker()
    server = make_server()
    pb_grpc.add_TrainerServicer_to_server(breaker, server)
    address = bind(server, "127.0.0.1:0")
    server.start()
    params = MLP(64, 2000, 500, 10).params()  # w2: 4 MB, in pieces
    job = jobs.TrainJob("d", 0, 0, 1, 8, 1e-3, 0, params, rows=8)
    client = TrainerClient("breaker", address)

    # Execute
    try:
        with pytest.raises(CallFailed) as failed:
            client.train(job, timeout_s=20)
    finally:
        client.close()
        server.stop(None)

    # Assert
    assert "INTERNAL" in str(failed.value)
    assert len(breaker.sent) == 3
    assert failed.value.bytes.received == sum(breaker.sent)
    assert failed.value.bytes.sent == sum(
        wire_size(p) for p in jobs.split_request(jobs.train_job_to_pb(job), CHUNK_BYTES))


def test_a_tensor_cut_in_pieces_joins_back_and_a_missing_piece_is_refused(
        trainer: tuple[TrainerServicer, str]) -> None:
    # Prepare
    params = {"w": torch.arange(100_000, dtype=torch.float32)}  # 400 KB
    reply = pb.TrainReply(params=tensors.params_to_pb(params), steps_done=3)
    parts = jobs.split_reply(reply, 100_000)

    # Execute
    merged, size = jobs.merge_reply(iter(parts))
    with pytest.raises(CodecError, match="last piece is missing"):
        jobs.merge_reply(iter(parts[:-1]))
    _, address = trainer
    request = jobs.train_job_to_pb(_big_job())
    cut = jobs.split_request(request, CHUNK_BYTES)
    cut[-1] = pb.TrainRequest(params=[pb.NamedTensor(name="b3", more=True)])  # never ends
    with channel(address) as ch, pytest.raises(grpc.RpcError) as refused:
        list(pb_grpc.TrainerStub(ch).Train(iter(cut), timeout=60))

    # Assert
    assert len(parts) == 4 and merged == reply and size == sum(wire_size(p) for p in parts)
    assert max(p.ByteSize() for p in parts) < 100_000 + 64
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
