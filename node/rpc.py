"""gRPC plumbing shared by every node: message limits, byte accounting, servers, channels."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterable, Iterator
from concurrent import futures
from typing import Any, Generic, NoReturn, TypeVar

import grpc

from proto.sparsat.v1 import sparsat_pb2 as pb
from proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc

GRPC_FRAME_BYTES = 5  # gRPC length-prefixed message: 1 flag byte + 4 length bytes
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # explicit, both directions; large tensors are chunked below
CHUNK_BYTES = 1024 * 1024  # target size of one streamed dataset chunk

_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # big downlink batches: fewer HTTP/2 frames and socket reads (bench/transport.py: gRPC
    # over raw TCP 0.25-0.29 -> 0.31-0.33 at 1 MiB batches)
    ("grpc.http2.max_frame_size", (1 << 24) - 1),
    ("grpc.experimental.tcp_min_read_chunk_size", 1 << 20),
    ("grpc.experimental.tcp_read_chunk_size", 4 << 20),
    ("grpc.experimental.tcp_max_read_chunk_size", 16 << 20),
]


def wire_size(message: Any) -> int:
    """Bytes a message costs on a link: its serialized size plus gRPC's frame."""
    return int(message.ByteSize()) + GRPC_FRAME_BYTES


INSTANCE = uuid.uuid4().hex  # this process: a node that restarts gets another one

M = TypeVar("M")


class Outbox(Generic[M]):
    """The request stream of a client-streaming call, counting what went out.

    gRPC Python pulls the next request only once the previous one's write has completed
    (handed to the transport), so a message is counted when the next is asked for, or when
    the stream ends. A call that fails half way is charged the messages written before it
    failed, and nothing when the connection was refused (the first write never completes).
    """

    def __init__(self, messages: Iterable[M]) -> None:
        self._messages = messages
        self.written = 0  # messages
        self.bytes = 0  # their wire size

    def __iter__(self) -> Iterator[M]:
        for msg in self._messages:
            yield msg
            self.written += 1
            self.bytes += wire_size(msg)


class ByteCounter:
    """Thread-safe totals of bytes received and sent by a node (servicers run in a pool)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.received = 0
        self.sent = 0

    def add(self, received: int = 0, sent: int = 0) -> None:
        with self._lock:
            self.received += received
            self.sent += sent


def make_server(max_workers: int = 8) -> grpc.Server:
    return grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers), options=_OPTIONS)


def bind(server: grpc.Server, listen: str) -> str:
    """Bind `listen` (host:port, port 0 for a free one); returns the bound host:port."""
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"listen address must be HOST:PORT, got {listen!r}")
    bound = server.add_insecure_port(listen)
    if bound == 0:
        raise OSError(f"cannot listen on {listen}")
    advertised = "127.0.0.1" if host in ("0.0.0.0", "[::]", "::") else host
    return f"{advertised}:{bound}"


def channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=_OPTIONS)


def wait_ready(ch: grpc.Channel, timeout_s: float = 30.0) -> None:
    grpc.channel_ready_future(ch).result(timeout=timeout_s)


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> NoReturn:
    """context.abort, typed: it always raises, so code after it is unreachable."""
    context.abort(code, message)
    raise AssertionError("unreachable: context.abort raises")


def register(ground_station: str, request: pb.RegisterRequest, timeout_s: float = 60.0) -> str:
    """Register with the ground station (waiting for it to come up); returns config_json."""
    ch = channel(ground_station)
    try:
        wait_ready(ch, timeout_s)
        reply = pb_grpc.RegistryStub(ch).Register(request, timeout=timeout_s)
        return str(reply.config_json)
    finally:
        ch.close()
