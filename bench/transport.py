"""Transport benchmark: payload vs wire bytes, and loopback gRPC vs a raw TCP socket.

Run from the repo root: .venv/bin/python bench/transport.py [--samples N] [--repeat R]
Samples are real Downlink messages: Fashion-MNIST images with fixed masks on the 7x7 grid of
vit_tiny_d8_patch4_28, or random CLS tokens of dim 192 (their size does not depend on their
values). Throughput streams them through DownlinkStub.Send to an ack-only servicer and to the
real GroundStation (decode, validate, SQLite), and sends the same serialized, gRPC-framed
bytes over a raw TCP socket. The last stdout line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc
import numpy as np

from ground_station.config import GroundStationConfig
from ground_station.server import GroundStation, build_server
from node import encoders, serde
from node.codec import CLS_DTYPES, PatchData, encode_patches, quantize_token
from node.config import PayloadKind, SensorConfig
from node.datasets import DatasetMissingError, DatasetSpec, load_dataset
from node.masking import MaskSpec, visible_indices
from node.rpc import GRPC_FRAME_BYTES, bind, channel, make_server, wait_ready, wire_size
from node.sensor import sample_id
from proto.sparsat.v1 import sparsat_pb2 as pb
from proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc

ENCODER = encoders.config(encoders.DEFAULT_ENCODER)
GRID, DIM = ENCODER.grid, ENCODER.embed_dim
RATIOS = (0.0, 0.5, 0.75)
SENSOR = "sat-0"
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


def messages(payloads: Iterable[PatchData | serde.ClsData], labels: np.ndarray) -> list[pb.Sample]:
    return [serde.sample_to_pb(serde.SampleData(sid(i), SENSOR, int(y), p))
            for i, (p, y) in enumerate(zip(payloads, labels, strict=True))]


def patch_messages(images: np.ndarray, labels: np.ndarray, ratio: float) -> list[pb.Sample]:
    spec = MaskSpec("fixed", ratio)
    return messages((encode_patches(im, GRID, visible_indices(spec, GRID**2, sid(i)))
                     for i, im in enumerate(images)), labels)


def cls_messages(tokens: np.ndarray, labels: np.ndarray, dtype: str) -> list[pb.Sample]:
    quantized = (quantize_token(t, dtype) for t in tokens)
    return messages((serde.ClsData(d, dtype, DIM, sc) for d, sc in quantized), labels)


def payload_bytes(msg: pb.Sample) -> int:
    if msg.WhichOneof("payload") == "patches":
        return len(msg.patches.pixels) + len(msg.patches.visible_idx)
    return len(msg.cls.token.data)


def renamed(m: pb.Sample, prefix: str) -> pb.Sample:
    copy = pb.Sample.FromString(m.SerializeToString())
    copy.sample_id = prefix + m.sample_id
    return copy


class AckOnly(pb_grpc.DownlinkServicer):
    """Transport only: ack every Sample, store nothing."""

    def Send(self, request_iterator: Iterator[pb.Sample],
             context: grpc.ServicerContext) -> Iterator[pb.SampleAck]:
        for msg in request_iterator:
            yield pb.SampleAck(sample_id=msg.sample_id)


def grpc_run(stub: pb_grpc.DownlinkStub, msgs: Sequence[pb.Sample]) -> float:
    t0 = time.perf_counter()
    acks = sum(1 for _ in stub.Send(iter(msgs)))
    elapsed = time.perf_counter() - t0
    if acks != len(msgs):
        raise RuntimeError(f"{acks} acks for {len(msgs)} samples")
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


def grpc_tcp_bytes(upstream: str, msgs: Sequence[pb.Sample]) -> tuple[float, float]:
    """TCP bytes per sample (client->server, server->client) of one gRPC stream, counted by a
    proxy between the channel and the server."""
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
    ch = channel(f"127.0.0.1:{lsock.getsockname()[1]}")
    wait_ready(ch)
    stub = pb_grpc.DownlinkStub(ch)
    grpc_run(stub, msgs[:10])
    time.sleep(0.1)
    before = list(counts)
    grpc_run(stub, msgs)
    time.sleep(0.1)
    ch.close()
    lsock.close()
    return (counts[0] - before[0]) / len(msgs), (counts[1] - before[1]) / len(msgs)


def ingest_runs(kind: str, msgs: Sequence[pb.Sample], warm: int, repeat: int) -> list[float]:
    """Full ingest: a fresh GroundStation (own SQLite store) per run, sensor registered."""
    times: list[float] = []
    payload: PayloadKind = "patches" if kind == "patch" else "cls"
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(repeat):
            cfg = GroundStationConfig(
                sensor=SensorConfig(DatasetSpec("fashion_mnist"), MaskSpec("fixed", 0.5),
                                    payload=payload, satellites=[SENSOR]),
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
            grpc_run(stub, [renamed(m, "warmup/") for m in msgs[:warm]])
            times.append(grpc_run(stub, msgs))
            if len(station.store) != warm + len(msgs):
                raise RuntimeError(f"store holds {len(station.store)} samples")
            ch.close()
            server.stop(None)
            station.store.close()
    return times


def throughput(kind: str, ms: list[pb.Sample], stub: pb_grpc.DownlinkStub, repeat: int,
               warm: int) -> dict[str, float | None]:
    frames = [frame(m.SerializeToString()) for m in ms]
    acks = [frame(pb.SampleAck(sample_id=m.sample_id).SerializeToString()) for m in ms]
    grpc_run(stub, ms[:warm])
    raw_run(frames[:warm], acks[:warm], True)
    times = {"grpc": [grpc_run(stub, ms) for _ in range(repeat)],
             "raw": [raw_run(frames, acks, True) for _ in range(repeat)],
             "raw_noack": [raw_run(frames, acks, False) for _ in range(repeat)]}
    try:
        times["ingest"] = ingest_runs(kind, ms, warm, repeat)
    except DatasetMissingError:
        print("note: GroundStation needs the Fashion-MNIST test split; ingest skipped")
    mb, out = sum(wire_size(m) for m in ms) / 1e6, {}
    for name in ("grpc", "ingest", "raw", "raw_noack"):
        med = statistics.median(times[name]) if name in times else None
        out[f"{name}_{kind}_samples_per_s"] = len(ms) / med if med else None
        out[f"{name}_{kind}_mb_per_s"] = mb / med if med else None
    g, ingest = out[f"grpc_{kind}_samples_per_s"], out[f"ingest_{kind}_samples_per_s"]
    for name in ("raw", "raw_noack"):
        out[f"grpc_over_{name}_{kind}"] = g / out[f"{name}_{kind}_samples_per_s"]  # type: ignore
    out[f"ingest_over_grpc_{kind}"] = ingest / g if ingest and g else None
    return out


def fmt(v: float | int | str | None, spec: str) -> str:
    return f"{v:{spec}}" if isinstance(v, float | int) else f"{'n/a':>{spec.split('.')[0]}}"


def main(argv: Sequence[str] | None = None) -> Result:
    ap = argparse.ArgumentParser(description="sparsat transport benchmark")
    ap.add_argument("--samples", type=int, default=20000, help="samples per stream")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs (median reported)")
    args = ap.parse_args(argv)
    n, repeat, warm = args.samples, args.repeat, min(500, args.samples)
    start = time.perf_counter()
    images, labels, source = load_images(n)
    tokens = np.random.default_rng(0).standard_normal((n, DIM)).astype(np.float32)
    res: Result = {"samples": n, "repeat": repeat, "data": source}
    msgs = {f"patch_r{r:g}": patch_messages(images, labels, r) for r in RATIOS}
    msgs |= {f"cls_{d}": cls_messages(tokens, labels, d) for d in CLS_DTYPES}
    server = make_server()
    pb_grpc.add_DownlinkServicer_to_server(AckOnly(), server)
    address = bind(server, "127.0.0.1:0")
    server.start()
    ch = channel(address)
    wait_ready(ch)
    stub = pb_grpc.DownlinkStub(ch)

    print(f"== payload vs wire bytes, mean per sample ({n} samples, {source}; tcp: gRPC's "
          f"HTTP/2 bytes on the socket, over {min(n, 2000)} samples) ==")
    print(f"{'payload':<14}{'payload B':>10}{'wire B':>9}{'wire/pay':>9}{'tcp up B':>10}"
          f"{'tcp/pay':>9}{'tcp down B':>11}")
    for name, ms in msgs.items():
        pay = float(np.mean([payload_bytes(m) for m in ms]))
        wire = float(np.mean([wire_size(m) for m in ms]))
        up, down = grpc_tcp_bytes(address, ms[: min(n, 2000)])
        res |= {f"{name}_payload_bytes": pay, f"{name}_wire_bytes": wire,
                f"{name}_overhead": wire / pay, f"{name}_tcp_up_bytes": up,
                f"{name}_tcp_overhead": up / pay, f"{name}_tcp_down_bytes": down}
        print(f"{name:<14}{pay:>10.1f}{wire:>9.1f}{wire / pay:>9.3f}{up:>10.1f}"
              f"{up / pay:>9.3f}{down:>11.1f}")
    res |= throughput("patch", msgs["patch_r0.5"], stub, repeat, warm)
    res |= throughput("cls", msgs["cls_float16"], stub, repeat, warm)
    ch.close()
    server.stop(None)

    print(f"\n== loopback throughput, {n} samples/stream, median of {repeat} "
          "(patch r=0.5, CLS float16; MB = Sample wire bytes) ==")
    print(f"{'transport':<40}{'patch/s':>10}{'MB/s':>8}{'cls/s':>10}{'MB/s':>8}")
    rows = {"grpc": "gRPC, ack-only servicer (transport)",
            "ingest": "gRPC, GroundStation (full ingest)",
            "raw": "raw TCP, ack per message", "raw_noack": "raw TCP, one ack at the end"}
    for name, label in rows.items():
        print(f"{label:<40}" + "".join(fmt(res[f"{name}_{k}_samples_per_s"], ">10.0f")
                                       + fmt(res[f"{name}_{k}_mb_per_s"], ">8.2f")
                                       for k in ("patch", "cls")))
    for key in ("grpc_over_raw", "grpc_over_raw_noack", "ingest_over_grpc"):
        print(f"{key.replace('_', ' '):<40}"
              + "".join(fmt(res[f"{key}_{k}"], ">10.3f") + " " * 8 for k in ("patch", "cls")))
    res["runtime_s"] = time.perf_counter() - start
    print(f"runtime {res['runtime_s']:.1f} s")
    res = {k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
