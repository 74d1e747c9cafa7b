"""The worked examples of docs/protocol.md, made with sparsat's own Python code.

Run from the repository root: `python docs/protocol_runs/wire_example.py` (it writes
docs/protocol_runs/wire_example.txt, which the document quotes). The scenario is made up and
tiny, so every byte can be read: N = 100 training images of 7 x 7 x 1 pixels, a 5 x 5 token
grid, random masks with 2 copies. tests/test_protocol_conformance.py encodes the same batch
by hand from the document and checks it against these bytes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from sparsat.node.data.config import SensorSetup  # noqa: E402
from sparsat.node.data.tiles import tile_edges  # noqa: E402
from sparsat.node.wire import downlink, setup  # noqa: E402
from sparsat.node.wire.codec import encode_patches, quantize_token  # noqa: E402
from sparsat.node.wire.rpc import GRPC_FRAME_BYTES  # noqa: E402
from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb  # noqa: E402

N, GRID, H, W = 100, 5, 7, 7
IMAGE = np.arange(H * W, dtype=np.uint8).reshape(H, W, 1)  # pixel (r, c) = 7 r + c


def setup_message() -> pb.SensorSetup:
    """The setup of a host of sat-0, which holds images 3, 30 and 64."""
    return setup.setup_to_pb(SensorSetup(
        n_train=N, grid=GRID, copies=2, payload="patches", cls_dim=0, cls_dtype=None,
        tile_rows=tuple(tile_edges(H, GRID).tolist()),
        tile_cols=tuple(tile_edges(W, GRID).tolist()),
        images={"sat-0": np.array([3, 30, 64])}))


def patch_batch() -> pb.DownlinkBatch:
    """The first batch of a Transmit's stream from sat-0 (which sent copy 0 of its images and
    id 103 in earlier passes): id 130 (copy 1 of image 30, label 3) with tokens 0, 6 and 24
    visible, and id 164 (copy 1 of image 64, label 9) with tokens 0-9 visible. One made-up
    image stands in for both, so the pixels are easy to follow."""
    batch = downlink.BatchBuilder("sat-0")
    batch.add(downlink.patch_payload(130, 3, encode_patches(IMAGE, GRID, np.array([0, 6, 24])),
                                  with_shape=False))
    batch.add(downlink.patch_payload(164, 9, encode_patches(IMAGE, GRID, np.arange(10)),
                                  with_shape=False))
    assert batch.wire_size() == batch.to_pb().ByteSize() + GRPC_FRAME_BYTES
    return batch.to_pb()


def cls_batch() -> pb.DownlinkBatch:
    """A CLS int8 batch (a 4-value token, for the example), not the stream's first batch."""
    token = np.array([0.5, -1.0, 0.25, 0.0], dtype=np.float32)
    data, scale = quantize_token(token, "int8")
    batch = downlink.BatchBuilder("", cls=True, int8=True)
    batch.add(downlink.cls_payload(64, 1, downlink.ClsData(data, "int8", 4, scale)))
    return batch.to_pb()


def acks() -> dict[str, pb.BatchAck]:
    return {
        "both stored": downlink.ack_to_pb(downlink.AckData(2, [], [])),
        "position 1 a duplicate": downlink.ack_to_pb(downlink.AckData(1, [1], [])),
        "positions 1, 3, 4 of 5 duplicates": downlink.ack_to_pb(downlink.AckData(2, [1, 3, 4], [])),
        "position 0 refused": downlink.ack_to_pb(downlink.AckData(1, [], [
            (0, 7, downlink.RejectCause.NOT_YOURS, "image not held by sat-0")])),
    }


def messages() -> dict[str, bytes]:
    out = {"SensorSetup (RegisterReply.sensor)": setup_message().SerializeToString(),
           "DownlinkBatch, patches": patch_batch().SerializeToString(),
           "DownlinkBatch, CLS int8": cls_batch().SerializeToString()}
    out.update({f"BatchAck, {k}": v.SerializeToString() for k, v in acks().items()})
    return out


def hexdump(data: bytes) -> str:
    return "\n".join(" ".join(f"{b:02x}" for b in data[i : i + 16])
                     for i in range(0, len(data), 16))


def main() -> int:
    lines = [f"tile edges of {H} rows on a {GRID}-grid: {tile_edges(H, GRID).tolist()}; "
             f"of 5 rows on a 2-grid: {tile_edges(5, 2).tolist()}"]
    for name, data in messages().items():
        lines += ["", f"{name}: {len(data)} bytes (+{GRPC_FRAME_BYTES} on the wire)",
                  hexdump(data)]
    text = "\n".join(lines) + "\n"
    (Path(__file__).parent / "wire_example.txt").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
