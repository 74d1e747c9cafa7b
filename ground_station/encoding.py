"""Encoder stage: stored payloads -> CLS token dataset; the test split -> CLS tokens.

Patch payloads are rebuilt into their canvas and only their visible tokens enter the ViT;
CLS payloads are dequantized as they are. Each set counts the encoder's FLOPs
(node.encoders.encode_flops) and wall time, for the mission clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from node.codec import decode_patches, dequantize_token, masked_canvas, quantize_token
from node.datasets import ImageDataset
from node.encoders import Encoder, encode_flops
from node.masking import MaskSpec, capture
from node.sensor import sample_id as make_sample_id
from node.sensor import train_subset
from node.serde import ClsData, SampleData

Progress = Callable[[int, int], None]


@dataclass
class TokenSet:
    features: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N,) int64
    sample_ids: list[str]
    flops: int = 0  # the encoder's compute for this set
    wall_s: float = 0.0
    groups: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (N,) bool
    skipped: int = 0  # images with no usable token (clouds): not in the set

    def subset(self, rows: np.ndarray) -> TokenSet:
        return TokenSet(self.features[rows], self.labels[rows],
                        [self.sample_ids[i] for i in rows.tolist()])


def encode_samples(samples: Iterable[SampleData], total: int, encoder: Encoder,
                   batch_size: int, progress: Progress | None = None) -> TokenSet:
    t0 = time.perf_counter()
    features = np.empty((total, encoder.dim), dtype=np.float32)
    labels = np.empty(total, dtype=np.int64)
    ids: list[str] = []
    pending: list[tuple[int, np.ndarray, np.ndarray]] = []  # (row, canvas, visible)
    flops = 0

    def flush() -> None:
        if pending:
            rows = [r for r, _, _ in pending]
            features[rows] = encoder.encode_canvases(
                [c for _, c, _ in pending], [v for _, _, v in pending], batch_size)
            pending.clear()

    for row, s in enumerate(samples):
        ids.append(s.sample_id)
        labels[row] = s.label
        p = s.payload
        if isinstance(p, ClsData):
            features[row] = dequantize_token(p.data, p.dtype, p.dim, p.scale)
        else:
            pending.append((row, decode_patches(p), p.visible_idx))
            flops += encode_flops(encoder.cfg, len(p.visible_idx))
            if len(pending) >= batch_size:
                flush()
                if progress:
                    progress(row + 1, total)
    flush()
    if len(ids) != total:
        raise RuntimeError(f"store yielded {len(ids)} samples, expected {total}")
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
    ids = [make_sample_id(name, split, int(i)) for i in indices]
    covers = np.zeros(len(indices))
    kept = np.zeros(len(indices), dtype=bool)
    flops = 0
    for start in range(0, len(indices), batch_size):
        rows = range(start, min(start + batch_size, len(indices)))
        caps = [capture(eval_mask, dataset.image(int(indices[r])), grid, ids[r]) for r in rows]
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
    out = TokenSet(features, labels, ids).subset(np.flatnonzero(kept))
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
