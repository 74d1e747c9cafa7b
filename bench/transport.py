"""Transport benchmark: payload vs wire bytes, and loopback gRPC vs a raw TCP socket.

Run from the repo root: .venv/bin/python bench/transport.py [--samples N] [--repeat R]
    [--stream-bytes B] [--smoke]
Samples are real Downlink batches, packed as a satellite packs them
(sparsat.node.wire.downlink.pack, the default 64 KiB batches): Fashion-MNIST images with fixed
masks on the 7x7 grid of vit_tiny_d8_patch4_28, or random CLS tokens of dim 192 (their size does
not depend on their values). Payload is what the image needs: the visible tiles' pixels and the
visible-token code (patches), the token's bytes (CLS; an int8 token's scale counts as overhead).
Wire bytes are the batches' and their acks' (ByteSize + 5 each). Throughput streams the batches
through DownlinkStub.Send to an ack-only servicer and to the real GroundStation (decode,
validate, SQLite), and sends the same serialized, gRPC-framed bytes over a raw TCP socket, one
ack frame per batch. The last stdout line is one JSON object with every figure. --smoke: 200
samples, one timed run, streams of 1 MiB (seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import grpc
import numpy as np

from sparsat.bench import parse_args
from sparsat.ground_station.config import GroundStationConfig
from sparsat.ground_station.server import GroundStation, build_server
from sparsat.node.data.config import PayloadKind, SensorConfig
from sparsat.node.data.datasets import DatasetMissingError, DatasetSpec, load_dataset
from sparsat.node.data.masking import MaskSpec, visible_indices
from sparsat.node.data.sharding import sample_id
from sparsat.node.models import encoders
from sparsat.node.wire import downlink, security
from sparsat.node.wire.codec import CLS_DTYPES, decode_visible, encode_patches, quantize_token
from sparsat.node.wire.rpc import (
    GRPC_FRAME_BYTES,
    bind,
    channel,
    make_server,
    wait_ready,
    wire_size,
)
from sparsat.node.wire.security import GROUND_STATION, Credentials
from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb
from sparsat.proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc
from sparsat.sim.deploy.certs import NodeSpec, make_deployment

ENCODER = encoders.config(encoders.DEFAULT_ENCODER)
GRID, DIM = ENCODER.grid, ENCODER.embed_dim
RATIOS = (0.0, 0.5, 0.75)
CLS_DTYPE = "float16"  # the CLS throughput runs
BATCH_BYTES = 1 << 20  # what a 1 Mbit/s link's batches are (10 s on the air, capped): --batch-bytes
SMALL_BATCH = 64 << 10  # throughput is also measured at this size
STREAM_BYTES = 64 << 20  # a transport run streams the batches again until this many bytes
SENSOR = "sat-0"
SMOKE = {"samples": 200, "repeat": 1, "stream_bytes": 1 << 20}
Result = dict[str, float | int | str | None]


def load_images(n: int) -> tuple[np.ndarray, np.ndarray, str]:
    try:
        ds = load_dataset(DatasetSpec("fashion_mnist"), "train")
    except DatasetMissingError:
        print("note: Fashion-MNIST missing, using random uint8 28x28x1 images")
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, (n, 28, 28, 1), np.uint8), rng.integers(0, 10, n), "random"
    idx = [i % len(ds) for i in range(n)]
    images, labels = np.stack([ds.image(i) for i in idx]), np.array([ds.label(i) for i in idx])
    return images, labels, "fashion_mnist"


def sid(i: int) -> str:
    return sample_id("fashion_mnist", "train", i)


Batches = list[pb.DownlinkBatch]


def batches(payloads: list[downlink.Payload], cls: bool = False, int8: bool = False,
            size: int | None = None) -> Batches:
    """Pack payloads as a satellite does, one stream: the first batch names the satellite."""
    packed = downlink.pack(iter(payloads), lambda first, _basis: downlink.BatchBuilder(
        SENSOR if first else "", cls, int8), 1 << 62, size or BATCH_BYTES)
    if sum(len(b.items) for b in packed) != len(payloads):
        raise RuntimeError("not every payload was packed")
    return [b.to_pb() for b in packed]


def patch_payloads(images: np.ndarray, labels: np.ndarray, ratio: float,
                   first: int = 0) -> list[downlink.Payload]:
    spec = MaskSpec("fixed", ratio)
    return [downlink.patch_payload(first + i, int(y), encode_patches(
        im, GRID, visible_indices(spec, GRID**2, sid(first + i))), False)
        for i, (im, y) in enumerate(zip(images, labels, strict=True))]


def cls_payloads(tokens: np.ndarray, labels: np.ndarray, dtype: str) -> list[downlink.Payload]:
    out = []
    for i, (t, y) in enumerate(zip(tokens, labels, strict=True)):
        data, scale = quantize_token(t, dtype)
        out.append(downlink.cls_payload(i, int(y), downlink.ClsData(data, dtype, DIM, scale)))
    return out


def payload_bytes(p: downlink.Payload) -> int:
    return len(p.data)  # patches: visible-token code + pixels; CLS: the token


def pixel_bytes(p: downlink.Payload) -> int:
    return len(p.data) - decode_visible(p.data, p.runs, GRID)[1]


class AckOnly(pb_grpc.DownlinkServicer):
    """Transport only: ack every batch as stored, store nothing."""

    def Send(self, request_iterator: Iterator[pb.DownlinkBatch],
             context: grpc.ServicerContext) -> Iterator[pb.BatchAck]:
        for msg in request_iterator:
            yield pb.BatchAck(stored=len(msg.ids))


def bytes_only_server() -> tuple[grpc.Server, grpc.Channel]:
    """gRPC with no protobuf at all: the server acks each message's raw bytes. What gRPC
    Python itself costs per stream, for the batches' bytes."""
    def send(it: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for _ in it:
            yield b"\x08\x01"

    server = make_server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "bench.Bytes", {"Send": grpc.stream_stream_rpc_method_handler(send)})])
    address = bind(server, "127.0.0.1:0")
    server.start()
    ch = channel(address)
    wait_ready(ch)
    return server, ch


def bytes_run(ch: grpc.Channel, data: Sequence[bytes]) -> float:
    call = ch.stream_stream("/bench.Bytes/Send")
    t0 = time.perf_counter()
    acks = sum(1 for _ in call(iter(data)))
    elapsed = time.perf_counter() - t0
    if acks != len(data):
        raise RuntimeError(f"{acks} acks for {len(data)} messages")
    return elapsed


def grpc_run(stub: pb_grpc.DownlinkStub, msgs: Sequence[pb.DownlinkBatch]) -> float:
    t0 = time.perf_counter()
    stored = sum(ack.stored for ack in stub.Send(iter(msgs)))
    elapsed = time.perf_counter() - t0
    if stored != sum(len(m.ids) for m in msgs):
        raise RuntimeError(f"{stored} samples stored of {sum(len(m.ids) for m in msgs)}")
    return elapsed


def frame(data: bytes) -> bytes:
    return b"\x00" + len(data).to_bytes(4, "big") + data  # gRPC's 5-byte message prefix


def read_frame(f: BinaryIO) -> bytes:
    head = f.read(GRPC_FRAME_BYTES)
    return f.read(int.from_bytes(head[1:], "big"))


def nodelay(s: socket.socket) -> socket.socket:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as gRPC does
    return s


def spawn(target: Callable[..., object], *args: object) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def raw_run(frames: Sequence[bytes], acks: Sequence[bytes], ack_each: bool) -> float:
    """Send `frames` on a fresh loopback connection; the server reads each one and answers
    with its ack frame (or only the last ack); the client sends from a thread."""
    lsock = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn = nodelay(lsock.accept()[0])
        with conn, conn.makefile("rb") as f:
            for i, ack in enumerate(acks):
                read_frame(f)
                if ack_each or i == len(acks) - 1:
                    conn.sendall(ack)

    def send(sock: socket.socket) -> None:
        for fr in frames:
            sock.sendall(fr)

    server = spawn(serve)
    with lsock, nodelay(socket.create_connection(lsock.getsockname())) as sock, \
            sock.makefile("rb") as f:
        t0 = time.perf_counter()
        sender = spawn(send, sock)
        for _ in range(len(acks) if ack_each else 1):
            read_frame(f)
        elapsed = time.perf_counter() - t0
        sender.join()
        server.join()
    return elapsed


def counting_proxy(upstream: str) -> tuple[socket.socket, list[int]]:
    """A TCP proxy on 127.0.0.1 in front of `upstream` (HOST:PORT): its listening socket
    (close it to stop accepting) and the bytes it has carried, [client->server,
    server->client], updated as they pass."""
    lsock = socket.create_server(("127.0.0.1", 0))
    host, _, port = upstream.rpartition(":")
    counts = [0, 0]

    def pipe(src: socket.socket, dst: socket.socket, k: int) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                counts[k] += len(data)
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                client = nodelay(lsock.accept()[0])
                server = nodelay(socket.create_connection((host, int(port))))
                spawn(pipe, client, server, 0)
                spawn(pipe, server, client, 1)

    spawn(accept)
    return lsock, counts


def grpc_tcp_bytes(upstream: str, msgs: Sequence[pb.DownlinkBatch],
                   creds: Credentials | None = None) -> tuple[float, float]:
    """TCP bytes per sample (client->server, server->client) of one gRPC stream, counted by a
    proxy between the channel and the server (`creds`: a TLS client's)."""
    lsock, counts = counting_proxy(upstream)
    ch = channel(f"127.0.0.1:{lsock.getsockname()[1]}", peer=GROUND_STATION, creds=creds)
    wait_ready(ch)
    stub = pb_grpc.DownlinkStub(ch)
    grpc_run(stub, msgs[:1])
    time.sleep(0.1)
    before = list(counts)
    grpc_run(stub, msgs)
    time.sleep(0.1)
    ch.close()
    lsock.close()
    n = sum(len(m.ids) for m in msgs)
    return (counts[0] - before[0]) / n, (counts[1] - before[1]) / n


def ingest_runs(kind: str, msgs: Batches, warm: Batches, repeat: int) -> list[float]:
    """Full ingest: a fresh GroundStation (own SQLite store) per run, sensor registered."""
    times: list[float] = []
    payload: PayloadKind = "patches" if kind == "patch" else "cls"
    n = sum(len(m.ids) for m in msgs) + sum(len(m.ids) for m in warm)
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(repeat):
            cfg = GroundStationConfig(
                sensor=SensorConfig(DatasetSpec("fashion_mnist"), MaskSpec("fixed", 0.5),
                                    payload=payload, cls_dtype=CLS_DTYPE, satellites=[SENSOR]),
                store_dir=Path(tmp) / f"{kind}-{rep}")
            station = GroundStation(cfg)
            server, address = build_server(station, "127.0.0.1:0")
            server.start()
            ch = channel(address)
            wait_ready(ch)
            pb_grpc.RegistryStub(ch).Register(pb.RegisterRequest(
                node_id="bench-sensor", role=pb.SENSOR, address="127.0.0.1:1",
                satellite_ids=[SENSOR]))
            stub = pb_grpc.DownlinkStub(ch)
            grpc_run(stub, warm)
            times.append(grpc_run(stub, msgs))
            if len(station.store) != n:
                raise RuntimeError(f"store holds {len(station.store)} samples, not {n}")
            ch.close()
            server.stop(None)
            station.store.close()
    return times


def throughput(kind: str, ms: Batches, warm: Batches, stub: pb_grpc.DownlinkStub,
               repeat: int, ingest: bool = True, stream_bytes: int = STREAM_BYTES
               ) -> dict[str, float | None]:
    # transport runs stream the batches over and over, stream_bytes at least: timeable
    ms_ = ms
    ms = ms * max(1, -(-stream_bytes // sum(wire_size(m) for m in ms)))
    frames = [frame(m.SerializeToString()) for m in ms]
    acks = [frame(pb.BatchAck(stored=len(m.ids)).SerializeToString()) for m in ms]
    grpc_run(stub, warm)
    raw_run(frames[:2], acks[:2], True)
    server, ch = bytes_only_server()
    data = [m.SerializeToString() for m in ms]
    bytes_run(ch, data[:2])
    times = {"grpc_bytes": [bytes_run(ch, data) for _ in range(repeat)]}
    ch.close()
    server.stop(None)
    times |= {"grpc": [grpc_run(stub, ms) for _ in range(repeat)],
             "raw": [raw_run(frames, acks, True) for _ in range(repeat)],
             "raw_noack": [raw_run(frames, acks, False) for _ in range(repeat)]}
    try:
        if ingest:
            times["ingest"] = ingest_runs(kind, ms_, warm, repeat)
    except DatasetMissingError:
        print("note: GroundStation needs the Fashion-MNIST test split; ingest skipped")
    n = sum(len(m.ids) for m in ms)
    mb, out = sum(wire_size(m) for m in ms) / 1e6, {}
    n_once, mb_once = sum(len(m.ids) for m in ms_), sum(wire_size(m) for m in ms_) / 1e6
    for name in ("grpc", "grpc_bytes", "ingest", "raw", "raw_noack"):
        med = statistics.median(times[name]) if name in times else None
        # transport runs streamed the batches `n / n_once` times, ingest once
        count, size = (n_once, mb_once) if name == "ingest" else (n, mb)
        out[f"{name}_{kind}_samples_per_s"] = count / med if med else None
        out[f"{name}_{kind}_mb_per_s"] = size / med if med else None
    g = out[f"grpc_{kind}_samples_per_s"]
    for name in ("raw", "raw_noack"):
        out[f"grpc_over_{name}_{kind}"] = g / out[f"{name}_{kind}_samples_per_s"]  # type: ignore
    out[f"grpc_bytes_over_raw_{kind}"] = (out[f"grpc_bytes_{kind}_samples_per_s"]  # type: ignore
                                          / out[f"raw_{kind}_samples_per_s"])
    ingest_rate = out[f"ingest_{kind}_samples_per_s"]
    out[f"ingest_over_grpc_{kind}"] = ingest_rate / g if ingest_rate and g else None
    return out


def connection_bytes(upstream: str, creds: Credentials | None) -> tuple[int, float]:
    """TCP bytes (both ways) and wall seconds of a new connection's first call (a Health
    check): the TLS handshake and HTTP/2 set-up, counted by a proxy."""
    lsock, counts = counting_proxy(upstream)
    t0 = time.perf_counter()
    ch = channel(f"127.0.0.1:{lsock.getsockname()[1]}", peer=GROUND_STATION, creds=creds)
    pb_grpc.HealthStub(ch).Check(pb.HealthRequest(), wait_for_ready=True, timeout=10)
    wall = time.perf_counter() - t0
    time.sleep(0.1)
    ch.close()
    lsock.close()
    return counts[0] + counts[1], wall


class AckHealth(AckOnly, pb_grpc.HealthServicer):
    def Check(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthReply:
        return pb.HealthReply(ready=True)


def tls_overhead(msgs: dict[str, Batches], repeat: int, stream_bytes: int = STREAM_BYTES
                 ) -> dict[str, float]:
    """What TLS (and the token on every call) adds, in one run: TCP bytes per sample and
    throughput of the same streams over a plaintext and a TLS ack-only server, and a new
    connection's set-up. TLS records are not charged on the simulated links (sparsat charges
    message bytes, ByteSize() + 5); these are the real network's extra bytes."""
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        make_deployment(Path(tmp), [NodeSpec(GROUND_STATION, "ground_station"),
                                    NodeSpec("bench-sensor", "sensor", (SENSOR,))], {})
        gs_creds = Credentials.from_dir(Path(tmp) / GROUND_STATION)
        client = Credentials.from_dir(Path(tmp) / "bench-sensor")
        servers = {}
        for mode, c in (("plain", None), ("tls", gs_creds)):
            security.configure(c)
            try:
                server = make_server()
                pb_grpc.add_DownlinkServicer_to_server(AckHealth(), server)
                pb_grpc.add_HealthServicer_to_server(AckHealth(), server)
                servers[mode] = (server, bind(server, "127.0.0.1:0"))
            finally:
                security.configure(None)
            server.start()
        for name in ("patch_r0.5", f"cls_{CLS_DTYPE}"):
            ms, n = msgs[name], sum(len(m.ids) for m in msgs[name])
            pay = sum(wire_size(m) for m in ms) / n
            for mode, c in (("plain", None), ("tls", client)):
                up, down = grpc_tcp_bytes(servers[mode][1], ms, c)
                out[f"{mode}_{name}_tcp_bytes"] = up + down
                out[f"{mode}_{name}_tcp_over_wire"] = (up + down) / pay
            out[f"tls_{name}_extra_tcp"] = (out[f"tls_{name}_tcp_bytes"]
                                            / out[f"plain_{name}_tcp_bytes"])
        ms = msgs["patch_r0.5"]
        ms = ms * max(1, -(-stream_bytes // sum(wire_size(m) for m in ms)))
        n = sum(len(m.ids) for m in ms)
        for mode, c in (("plain", None), ("tls", client)):
            ch = channel(servers[mode][1], peer=GROUND_STATION, creds=c)
            wait_ready(ch)
            stub = pb_grpc.DownlinkStub(ch)
            grpc_run(stub, ms[:2])
            out[f"{mode}_patch_samples_per_s"] = n / statistics.median(
                grpc_run(stub, ms) for _ in range(repeat))
            ch.close()
            conn = [connection_bytes(servers[mode][1], c) for _ in range(repeat)]
            out[f"{mode}_connect_bytes"] = statistics.median(b for b, _ in conn)
            out[f"{mode}_connect_s"] = statistics.median(w for _, w in conn)
        out["tls_over_plain_patch_throughput"] = (out["tls_patch_samples_per_s"]
                                                  / out["plain_patch_samples_per_s"])
        for server, _ in servers.values():
            server.stop(None)
    return out


def fmt(v: float | int | str | None, spec: str) -> str:
    return f"{v:{spec}}" if isinstance(v, float | int) else f"{'n/a':>{spec.split('.')[0]}}"


def main(argv: Sequence[str] | None = None) -> Result:
    ap = argparse.ArgumentParser(description="sparsat transport benchmark")
    ap.add_argument("--samples", type=int, default=20000, help="samples per stream")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs (median reported)")
    ap.add_argument("--batch-bytes", type=int, default=BATCH_BYTES,
                    help="largest batch, wire bytes (default %(default)s)")
    ap.add_argument("--stream-bytes", type=int, default=STREAM_BYTES,
                    help="throughput runs stream the batches again until this many wire bytes "
                         "(default %(default)s)")
    args = parse_args(ap, argv, SMOKE)
    stream = args.stream_bytes
    size = args.batch_bytes
    n, repeat, warm_n = args.samples, args.repeat, min(500, args.samples)
    start = time.perf_counter()
    images, labels, source = load_images(n + warm_n)
    tokens = np.random.default_rng(0).standard_normal((n, DIM)).astype(np.float32)
    res: Result = {"samples": n, "repeat": repeat, "data": source, "batch_bytes": size,
                   "stream_bytes": stream}
    payloads = {f"patch_r{r:g}": patch_payloads(images[:n], labels[:n], r) for r in RATIOS}
    payloads |= {f"cls_{d}": cls_payloads(tokens, labels[:n], d) for d in CLS_DTYPES}
    msgs = {name: batches(ps, name.startswith("cls"), name == "cls_int8", size)
            for name, ps in payloads.items()}
    # warm-up samples: other images (ids after the measured ones), stored before the runs
    warm = {"patch": batches(patch_payloads(images[n:], labels[n:], 0.5, first=n), size=size),
            "cls": batches([downlink.Payload(n + p.id, p.label, p.data, scale=p.scale)
                            for p in payloads[f"cls_{CLS_DTYPE}"][:warm_n]], True,
                           CLS_DTYPE == "int8", size)}
    server = make_server()
    pb_grpc.add_DownlinkServicer_to_server(AckOnly(), server)
    address = bind(server, "127.0.0.1:0")
    server.start()
    ch = channel(address)
    wait_ready(ch)
    stub = pb_grpc.DownlinkStub(ch)

    print(f"== payload vs wire bytes, mean per sample ({n} samples, {source}, batches of "
          f"{size} B; wire: batches + acks; tcp: gRPC's HTTP/2 bytes on the socket) ==")
    print(f"{'payload':<14}{'payload B':>10}{'wire B':>9}{'wire/pay':>9}{'batches':>8}"
          f"{'ack B/bat':>10}{'tcp up B':>10}{'tcp/pay':>9}{'tcp down B':>11}")
    for name, ms in msgs.items():
        ps = payloads[name]
        pay = float(np.mean([payload_bytes(p) for p in ps]))
        ack = [wire_size(pb.BatchAck(stored=len(m.ids))) for m in ms]
        wire = (sum(wire_size(m) for m in ms) + sum(ack)) / len(ps)
        up, down = grpc_tcp_bytes(address, ms)
        res |= {f"{name}_payload_bytes": pay, f"{name}_wire_bytes": wire,
                f"{name}_overhead": wire / pay, f"{name}_batches": len(ms),
                f"{name}_ack_bytes_per_batch": sum(ack) / len(ms),
                f"{name}_tcp_up_bytes": up, f"{name}_tcp_overhead": (up + down) / pay,
                f"{name}_tcp_down_bytes": down}
        if name.startswith("patch"):
            res[f"{name}_pixel_overhead"] = wire / float(np.mean([pixel_bytes(p) for p in ps]))
        print(f"{name:<14}{pay:>10.1f}{wire:>9.2f}{wire / pay:>9.4f}{len(ms):>8}"
              f"{sum(ack) / len(ms):>10.1f}{up:>10.1f}{(up + down) / pay:>9.4f}{down:>11.2f}")
    res |= throughput("patch", msgs["patch_r0.5"], warm["patch"], stub, repeat,
                      stream_bytes=stream)
    res |= throughput("cls", msgs[f"cls_{CLS_DTYPE}"], warm["cls"], stub, repeat,
                      stream_bytes=stream)
    small = batches(payloads["patch_r0.5"], size=SMALL_BATCH)  # transport only, small batches
    small_out = throughput("patch", small, small[:1], stub, repeat, ingest=False,
                           stream_bytes=stream)
    for key in ("grpc_patch_samples_per_s", "raw_patch_samples_per_s", "grpc_over_raw_patch"):
        res[f"{key}_{SMALL_BATCH >> 10}k"] = small_out[key]
    ch.close()
    server.stop(None)

    print(f"\n== loopback throughput, {n} samples/stream, median of {repeat} "
          f"(patch r=0.5, CLS {CLS_DTYPE}; MB = batch wire bytes) ==")
    print(f"{'transport':<40}{'patch/s':>10}{'MB/s':>8}{'cls/s':>10}{'MB/s':>8}")
    rows = {"grpc": "gRPC, ack-only servicer (transport)",
            "grpc_bytes": "gRPC, bytes only (no protobuf)",
            "ingest": "gRPC, GroundStation (full ingest)",
            "raw": "raw TCP, ack per batch", "raw_noack": "raw TCP, one ack at the end"}
    for name, label in rows.items():
        print(f"{label:<40}" + "".join(fmt(res[f"{name}_{k}_samples_per_s"], ">10.0f")
                                       + fmt(res[f"{name}_{k}_mb_per_s"], ">8.2f")
                                       for k in ("patch", "cls")))
    for key in ("grpc_over_raw", "grpc_over_raw_noack", "grpc_bytes_over_raw",
                "ingest_over_grpc"):
        print(f"{key.replace('_', ' '):<40}"
              + "".join(fmt(res[f"{key}_{k}"], ">10.3f") + " " * 8 for k in ("patch", "cls")))
    k = f"{SMALL_BATCH >> 10}k"
    print(f"{'batches of ' + k + ': gRPC, raw TCP, ratio':<40}"
          + fmt(res[f"grpc_patch_samples_per_s_{k}"], ">10.0f")
          + fmt(res[f"raw_patch_samples_per_s_{k}"], ">10.0f")
          + fmt(res[f"grpc_over_raw_patch_{k}"], ">8.3f"))
    tls = tls_overhead(msgs, repeat, stream)
    res |= tls
    print("\n== TLS (server certificate + a node token on every call) vs plaintext, one run; "
          "not charged on the simulated links ==")
    for name in ("patch_r0.5", f"cls_{CLS_DTYPE}"):
        print(f"{name + ': TCP bytes/sample plain, TLS, TLS/plain':<40}"
              f"{tls[f'plain_{name}_tcp_bytes']:>10.1f}{tls[f'tls_{name}_tcp_bytes']:>10.1f}"
              f"{tls[f'tls_{name}_extra_tcp']:>8.4f}")
    print(f"{'patch r=0.5 samples/s plain, TLS, ratio':<40}"
          f"{tls['plain_patch_samples_per_s']:>10.0f}{tls['tls_patch_samples_per_s']:>10.0f}"
          f"{tls['tls_over_plain_patch_throughput']:>8.3f}")
    print(f"{'new connection + 1 call: bytes, ms':<40}"
          f"{tls['plain_connect_bytes']:>10.0f}{tls['tls_connect_bytes']:>10.0f}"
          f"{1e3 * tls['plain_connect_s']:>8.1f}{1e3 * tls['tls_connect_s']:>8.1f}")
    res["runtime_s"] = time.perf_counter() - start
    print(f"runtime {res['runtime_s']:.1f} s")
    res = {k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
