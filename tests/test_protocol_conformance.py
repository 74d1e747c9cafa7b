"""A sensor host written from docs/protocol.md alone, against a real ground station.

Nothing here uses the generated message classes or sparsat's encoders to build or read what
travels: a tiny protobuf writer and reader (varints, tags, length-delimited fields), the
bitmap and run codes and the tile layout as the document states them. It registers, reads
its setup from the reply's bytes, masks and cuts its own images, streams its batches as raw
bytes and reads the acks' bytes; the ground station must store every sample, exactly.
"""

from __future__ import annotations

import importlib.util
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import grpc
import numpy as np
import pytest

from sparsat.ground_station.config import GroundStationConfig
from sparsat.ground_station.server import GroundStation, build_server
from sparsat.node.data.config import SensorConfig
from sparsat.node.data.datasets import DatasetSpec, load_dataset
from sparsat.node.data.masking import MaskSpec
from sparsat.node.wire.codec import parse_patch_record
from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb
from sparsat.proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc

DOCS = Path(__file__).resolve().parents[1] / "docs"
SATS = ["sat-0", "sat-1"]

# ---- a protobuf writer and reader, from the encoding's definition ---------------------------


def varint(n: int) -> bytes:
    """Base-128, least significant group first, high bit set on every byte but the last."""
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def f_varint(field: int, value: int) -> bytes:
    return varint(field << 3 | 0) + varint(value) if value else b""  # proto3: 0 is left out


def f_bytes(field: int, data: bytes) -> bytes:
    return varint(field << 3 | 2) + varint(len(data)) + data if data else b""


def f_packed(field: int, values: list[int]) -> bytes:
    return f_bytes(field, b"".join(varint(v) for v in values))


def read_varint(data: bytes, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, at


def fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of each field: an int (varint) or bytes (length-delimited)."""
    at = 0
    while at < len(data):
        key, at = read_varint(data, at)
        if key & 7 == 0:
            value, at = read_varint(data, at)
            yield key >> 3, value
        elif key & 7 == 2:
            n, at = read_varint(data, at)
            yield key >> 3, data[at : at + n]
            at += n
        else:
            raise AssertionError(f"wire type {key & 7} is not used by sparsat.v1")


def message(data: bytes) -> dict[int, list[int | bytes]]:
    """A message's fields by number, each a list (repeated fields, one value otherwise)."""
    out: dict[int, list[int | bytes]] = {}
    for k, v in fields(data):
        out.setdefault(k, []).append(v)
    return out


def num(value: int | bytes) -> int:
    assert isinstance(value, int)
    return value


def blob(value: int | bytes) -> bytes:
    assert isinstance(value, bytes)
    return value


def unpacked(data: bytes) -> list[int]:
    out, at = [], 0
    while at < len(data):
        v, at = read_varint(data, at)
        out.append(v)
    return out


# ---- the payload layout of docs/protocol.md ---------------------------------------------------


def bitmap(visible: list[int], g: int) -> bytes:
    code = bytearray((g * g + 7) // 8)
    for t in visible:
        code[t // 8] |= 1 << (t % 8)  # LSB first
    return bytes(code)


def runs(visible: list[int], g: int) -> bytes:
    """Lengths alternating hidden, visible, hidden... (the first may be 0), as varints."""
    seen, out, current, length = set(visible), [], False, 0
    for t in range(g * g):
        if (t in seen) != current:
            out.append(length)
            current, length = not current, 0
        length += 1
    out.append(length)
    return b"".join(varint(r) for r in out)


def tiles(image: np.ndarray, rows: list[int], cols: list[int], visible: list[int]) -> bytes:
    g = len(rows) - 1
    return b"".join(image[rows[t // g] : rows[t // g + 1], cols[t % g] : cols[t % g + 1], :]
                    .tobytes() for t in sorted(visible))


def downlink_batch(satellite: str, ids: list[int], labels: list[int], records: list[bytes],
                   is_runs: list[bool]) -> bytes:
    deltas = [ids[0]] + [b - a for a, b in zip(ids, ids[1:], strict=False)]
    rle = bytearray((len(ids) + 7) // 8)
    for k, r in enumerate(is_runs):
        rle[k // 8] |= r << (k % 8)
    return (f_bytes(1, satellite.encode()) + f_packed(2, deltas) + f_packed(3, labels)
            + b"".join(varint(4 << 3 | 2) + varint(len(r)) + r for r in records)
            + f_bytes(5, bytes(rle).rstrip(b"\0")) + f_varint(9, ids[-1]))


# ---- the tests --------------------------------------------------------------------------------


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("wire_example",
                                                  DOCS / "protocol_runs" / "wire_example.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_documented_example_is_what_the_python_host_sends_and_the_hand_encoder_makes(
        ) -> None:
    # Prepare: the worked example's bytes, made by sparsat's own code, and the document
    example = _example()
    made = example.messages()
    doc = (DOCS / "protocol.md").read_text()
    image = example.IMAGE
    rows = cols = [0, 1, 3, 4, 6, 7]  # floor(k * 7 / 5 + 1/2)

    # Execute: the same batch and setup from the document's layout
    batch = downlink_batch("sat-0", [130, 164], [3, 9],
                           [bitmap([0, 6, 24], 5) + tiles(image, rows, cols, [0, 6, 24]),
                            runs(list(range(10)), 5) + tiles(image, rows, cols, list(range(10)))],
                           [False, True])
    setup = (f_varint(1, 100) + f_varint(2, 5) + f_varint(3, 2) + f_varint(4, 1)
             + f_packed(7, rows) + f_packed(8, cols)
             + f_bytes(9, f_bytes(1, b"sat-0") + f_packed(2, [3, 27, 34])))

    # Assert: byte for byte, and the document quotes those bytes
    assert batch == made["DownlinkBatch, patches"]
    assert setup == made["SensorSetup (RegisterReply.sensor)"]
    assert varint(300) == b"\xac\x02" and varint(130) == b"\x82\x01"
    for name, data in made.items():
        block = re.search(re.escape(f"{name}: {len(data)} bytes") + r"[^\n]*\n((?:[0-9a-f ]+\n)+)",
                          doc)
        assert block is not None, f"docs/protocol.md does not quote {name!r}"
        assert bytes.fromhex(block.group(1)) == data, name


def test_a_host_written_from_the_docs_has_every_sample_stored(tmp_path: Path) -> None:
    # Prepare: a real ground station on 127.0.0.1 (plaintext, as tests run)
    sensor = SensorConfig(dataset=DatasetSpec("fashion_mnist", download=False),
                          mask=MaskSpec("fixed", 0.5), payload="patches", satellites=SATS,
                          train_subset=40)
    cfg = GroundStationConfig(sensor=sensor, store_dir=tmp_path / "store")
    server, address = build_server(GroundStation(cfg), "127.0.0.1:0")
    server.start()
    data = load_dataset(sensor.dataset, "train")  # the host's own copy: pixels and labels
    ch = grpc.insecure_channel(address)
    try:
        # Execute: Register (RegisterRequest: 1 node_id, 2 role = SENSOR 1, 3 address,
        # 4 satellite_ids), read RegisterReply.sensor (3) by hand
        register = ch.unary_unary("/sparsat.v1.Registry/Register")
        reply = register(f_bytes(1, b"foreign-host") + f_varint(2, 1)
                         + f_bytes(3, b"127.0.0.1:9") + f_bytes(4, b"sat-1"), timeout=30,
                         wait_for_ready=True)
        setup = message(blob(message(reply)[3][0]))
        n, g, payload, copies = (num(setup[k][0]) for k in (1, 2, 4, 3))
        rows, cols = unpacked(blob(setup[7][0])), unpacked(blob(setup[8][0]))
        (images,) = (message(blob(v)) for v in setup[9])
        indices = np.cumsum(unpacked(blob(images[2][0]))).tolist()
        assert (images[1], payload, copies) == ([b"sat-1"], 1, 1)  # PAYLOAD_PATCHES, 1 copy
        # masks of its own: a fixed pattern a bitmap, every fourth image whole (runs)
        batches: list[bytes] = []
        sent = []
        for start in range(0, len(indices), 6):
            ids, labels, records, is_runs = [], [], [], []
            for i in indices[start : start + 6]:
                image = data.image(i)
                whole = i % 4 == 0
                visible = [t for t in range(g * g) if whole or (t + i) % 3]
                code = runs(visible, g) if whole else bitmap(visible, g)
                ids.append(i)  # copy 0: id = index
                labels.append(data.label(i))
                records.append(code + tiles(image, rows, cols, visible))
                is_runs.append(whole)
                sent.append((i, data.label(i), image, visible))
            batches.append(downlink_batch("sat-1" if not batches else "", ids, labels, records,
                                          is_runs))
        send = ch.stream_stream("/sparsat.v1.Downlink/Send")
        acks = list(send(iter(batches), timeout=60))
        again = list(send(iter(batches[:1]), timeout=60))  # a resend: duplicates
        health = pb_grpc.HealthStub(ch).Check(pb.HealthRequest(), timeout=10)
    finally:
        ch.close()
        server.stop(None)

    # Assert: one ack a batch, every sample stored (BatchAck: 1 stored, 2 duplicate_runs,
    # 3 rejected), the resend acked as duplicates (runs: 0 not-duplicate, then all)
    assert (n, g, rows[-1], cols[-1]) == (60_000, 7, 28, 28)
    assert [message(a) for a in acks] == [{1: [len(indices[s : s + 6])]}
                                          for s in range(0, len(indices), 6)]
    assert [(k, unpacked(blob(v))) for k, v in fields(again[0])] == [(2, [0, 6])]
    assert health.bytes_received == sum(len(b) + 5 for b in batches) + len(batches[0]) + 5
    with sqlite3.connect(cfg.store_dir / "samples.sqlite") as db:
        stored = {r[0]: r for r in db.execute(
            "SELECT id, satellite, label, runs, height, width, channels, data FROM payloads")}
    assert sorted(stored) == [i for i, *_ in sent] == indices
    for i, label, image, visible in sent:
        _, satellite, y, is_runs, h, w, c, record = stored[i]
        patch = parse_patch_record(record, bool(is_runs), (h, w, c), g)
        assert (satellite, y, patch.visible_idx.tolist()) == ("sat-1", label, visible)
        assert patch.pixels == tiles(image, rows, cols, visible)


@pytest.mark.parametrize("first", [b"", b"sat-9"])
def test_a_stream_that_does_not_start_with_a_registered_satellite_is_refused(
        tmp_path: Path, first: bytes) -> None:
    sensor = SensorConfig(dataset=DatasetSpec("fashion_mnist", download=False),
                          mask=MaskSpec("fixed", 0.5), payload="patches", satellites=SATS,
                          train_subset=40)
    cfg = GroundStationConfig(sensor=sensor, store_dir=tmp_path / "store")
    server, address = build_server(GroundStation(cfg), "127.0.0.1:0")
    server.start()
    ch = grpc.insecure_channel(address)
    try:
        send = ch.stream_stream("/sparsat.v1.Downlink/Send")
        batch = downlink_batch(first.decode(), [1], [0], [bitmap([0], 7) + bytes(16)], [False])
        try:
            answer: list[bytes] | grpc.StatusCode = list(send(iter([batch]), timeout=30,
                                                             wait_for_ready=True))
        except grpc.RpcError as e:
            answer = e.code()
    finally:
        ch.close()
        server.stop(None)
    if first:  # named but never registered: every sample refused, PERMISSION_DENIED (7)
        assert isinstance(answer, list) and len(answer) == 1
        rejected = message(blob(message(answer[0])[3][0]))
        assert rejected[2] == [grpc.StatusCode.PERMISSION_DENIED.value[0]]
        assert b"not registered" in blob(rejected[3][0])
    else:  # the first batch names no satellite: the stream is torn down
        assert answer == grpc.StatusCode.INVALID_ARGUMENT
