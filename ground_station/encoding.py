"""Encoder stage: stored payloads -> CLS token dataset; the test split -> CLS tokens.

Patch payloads are rebuilt into their canvas and only their visible tokens enter the ViT;
CLS payloads are dequantized as they are. Stored rows stream in, a chunk at a time, so memory
is the token dataset plus one chunk, whatever the store's size. Each set counts the encoder's
FLOPs (node.encoders.encode_flops) and wall time, for the mission clock.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ground_station.config import GroundStationConfig
from ground_station.store import Row
from node.codec import (
    decode_patches,
    dequantize_token,
    masked_canvas,
    parse_patch_record,
    quantize_token,
)
from node.datasets import ImageDataset
from node.encoders import Encoder, encode_flops
from node.masking import MaskSpec, capture
from node.sensor import sample_id as make_sample_id
from node.sensor import train_subset

Progress = Callable[[int, int], None]


@dataclass
class TokenSet:
    features: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N,) int64
    ids: np.ndarray  # (N,) int64: compact sample ids (stored samples) or dataset indices
    flops: int = 0  # the encoder's compute for this set
    wall_s: float = 0.0
    groups: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (N,) bool
    skipped: int = 0  # images with no usable token (clouds): not in the set

    def subset(self, rows: np.ndarray) -> TokenSet:
        return TokenSet(self.features[rows], self.labels[rows], self.ids[rows])


def encode_rows(rows: Iterable[Row], total: int, encoder: Encoder, batch_size: int,
                cls_dtype: str, progress: Progress | None = None) -> TokenSet:
    """Encode `total` stored samples (patches through the encoder, CLS tokens dequantized)."""
    t0 = time.perf_counter()
    features = np.empty((total, encoder.dim), dtype=np.float32)
    labels = np.empty(total, dtype=np.int64)
    ids = np.empty(total, dtype=np.int64)
    pending: list[tuple[int, np.ndarray, np.ndarray]] = []  # (row, canvas, visible)
    flops, count = 0, 0

    def flush() -> None:
        if pending:
            at = [r for r, _, _ in pending]
            features[at] = encoder.encode_canvases(
                [c for _, c, _ in pending], [v for _, _, v in pending], batch_size)
            pending.clear()

    for k, row in enumerate(rows):
        if k >= total:
            raise RuntimeError(f"store yielded more than the {total} samples expected")
        ids[k], labels[k] = row.id, row.label
        if not row.height:  # a CLS token
            features[k] = dequantize_token(row.data, cls_dtype, encoder.dim, row.scale)
        else:
            data = parse_patch_record(row.data, row.runs, (row.height, row.width, row.channels),
                                      encoder.grid)
            pending.append((k, decode_patches(data), data.visible_idx))
            flops += encode_flops(encoder.cfg, len(data.visible_idx))
            if len(pending) >= batch_size:
                flush()
                if progress:
                    progress(k + 1, total)
        count = k + 1
    flush()
    if count != total:
        raise RuntimeError(f"store yielded {count} samples, expected {total}")
    if progress:
        progress(total, total)
    return TokenSet(features, labels, ids, flops, time.perf_counter() - t0)


def encode_split(dataset: ImageDataset, split: str, name: str, mask: MaskSpec,
                 encoder: Encoder, batch_size: int, subset: int | None = None, seed: int = 0,
                 progress: Progress | None = None) -> TokenSet:
    """Encode a split held at the ground station (the test set) under the scenario's mask.

    Clouds: every image gets its own clouds (its id seeds them, so other seeds than the
    training images'); an image with no usable token is left out and counted, and the groups
    `clear` (no cloud at all) and `cloudy` say which rows are which."""
    t0 = time.perf_counter()
    # Evaluation must be repeatable: `random` masks are drawn like `fixed` ones here.
    eval_mask = MaskSpec("fixed", mask.ratio, mask.seed) if mask.kind == "random" else mask
    indices = train_subset(len(dataset), subset, seed)
    grid = encoder.grid
    features = np.empty((len(indices), encoder.dim), dtype=np.float32)
    labels = np.array([dataset.label(int(i)) for i in indices], dtype=np.int64)
    names = [make_sample_id(name, split, int(i)) for i in indices]
    covers = np.zeros(len(indices))
    kept = np.zeros(len(indices), dtype=bool)
    flops = 0
    for start in range(0, len(indices), batch_size):
        rows = range(start, min(start + batch_size, len(indices)))
        caps = [capture(eval_mask, dataset.image(int(indices[r])), grid, names[r])
                for r in rows]
        covers[start : rows.stop] = [c.cover for c in caps]
        use = [(r, c) for r, c in zip(rows, caps, strict=True) if len(c.visible)]
        used = [r for r, _ in use]
        kept[used] = True
        if use:
            features[used] = encoder.encode_canvases(
                [masked_canvas(c.image, grid, c.visible) for _, c in use],
                [c.visible for _, c in use], batch_size)
            flops += sum(encode_flops(encoder.cfg, len(c.visible)) for _, c in use)
        if progress:
            progress(rows.stop, len(indices))
    out = TokenSet(features, labels, indices.astype(np.int64)).subset(np.flatnonzero(kept))
    out.flops, out.wall_s, out.skipped = flops, time.perf_counter() - t0, int((~kept).sum())
    if mask.kind == "clouds":
        out.groups = {"clear": covers[kept] == 0, "cloudy": covers[kept] > 0}
    return out


def requantize(features: np.ndarray, dtype: str) -> np.ndarray:
    """Round-trip tokens through the wire dtype, as a satellite's CLS payload would be."""
    out = np.empty_like(features)
    for i, tok in enumerate(features):
        data, scale = quantize_token(tok, dtype)
        out[i] = dequantize_token(data, dtype, len(tok), scale)
    return out


class TokenCache:
    """Encoded splits on disk (the store's folder), so an encoded split is not recomputed when
    nothing it depends on changed. A file's name is a digest of all of it: the encoder's
    weights and pooling, the device kind, the sensor configuration (dataset, mask, payload),
    the test subset and batch size, and for the training split the store's content version."""

    def __init__(self, folder: Path, encoder: Encoder, cfg: GroundStationConfig) -> None:
        self.folder = folder
        h = hashlib.blake2b(digest_size=16)
        for name, tensor in encoder.state_dict().items():
            h.update(name.encode())
            h.update(tensor.detach().cpu().numpy().tobytes())
        h.update(json.dumps([cfg.sensor.to_json(), cfg.test_subset, cfg.encode_batch,
                             encoder.mean.device.type]).encode())
        self.base = h.hexdigest()

    def path(self, stage: str, key: object) -> Path:
        digest = hashlib.blake2b(f"{self.base}/{stage}/{key!r}".encode(), digest_size=12)
        return self.folder / f"{stage.replace(' ', '-')}-{digest.hexdigest()}.npz"

    def get(self, stage: str, key: object) -> TokenSet | None:
        path = self.path(stage, key)
        if not path.exists():
            return None
        with np.load(path) as z:
            groups = {k[len("group_"):]: z[k] for k in z.files if k.startswith("group_")}
            return TokenSet(z["features"], z["labels"], z["ids"], int(z["flops"]),
                            float(z["wall_s"]), groups, int(z["skipped"]))

    def put(self, stage: str, key: object, tokens: TokenSet) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(stage, key)
        tmp = path.with_suffix(".tmp.npz")
        arrays: dict[str, Any] = {
            "features": tokens.features, "labels": tokens.labels, "ids": tokens.ids,
            "flops": tokens.flops, "wall_s": tokens.wall_s, "skipped": tokens.skipped,
            **{f"group_{k}": v for k, v in tokens.groups.items()}}
        np.savez(tmp, **arrays)
        tmp.replace(path)  # atomic: a reader never sees half a file
