"""Encoder stage: stored payloads -> CLS token dataset; the test split -> CLS tokens.

Patch payloads are rebuilt into their canvas and only their visible tokens enter the ViT;
CLS payloads are dequantized as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from node.codec import decode_patches, dequantize_token, masked_canvas, quantize_token
from node.datasets import ImageDataset
from node.encoders import Encoder
from node.masking import MaskSpec, visible_indices
from node.sensor import sample_id as make_sample_id
from node.sensor import train_subset
from node.serde import ClsData, SampleData

Progress = Callable[[int, int], None]


@dataclass
class TokenSet:
    features: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N,) int64
    sample_ids: list[str]


def encode_samples(samples: Iterable[SampleData], total: int, encoder: Encoder,
                   batch_size: int, progress: Progress | None = None) -> TokenSet:
    features = np.empty((total, encoder.dim), dtype=np.float32)
    labels = np.empty(total, dtype=np.int64)
    ids: list[str] = []
    pending: list[tuple[int, np.ndarray, np.ndarray]] = []  # (row, canvas, visible)

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
            if len(pending) >= batch_size:
                flush()
                if progress:
                    progress(row + 1, total)
    flush()
    if len(ids) != total:
        raise RuntimeError(f"store yielded {len(ids)} samples, expected {total}")
    if progress:
        progress(total, total)
    return TokenSet(features, labels, ids)


def encode_split(dataset: ImageDataset, split: str, name: str, mask: MaskSpec,
                 encoder: Encoder, batch_size: int, subset: int | None = None, seed: int = 0,
                 progress: Progress | None = None) -> TokenSet:
    """Encode a split held at the ground station (the test set) under the scenario's mask."""
    # Evaluation must be repeatable: `random` masks are drawn like `fixed` ones here.
    eval_mask = MaskSpec("fixed", mask.ratio, mask.seed) if mask.kind == "random" else mask
    indices = train_subset(len(dataset), subset, seed)
    n_tokens = encoder.grid * encoder.grid
    features = np.empty((len(indices), encoder.dim), dtype=np.float32)
    labels = np.array([dataset.label(int(i)) for i in indices], dtype=np.int64)
    ids = [make_sample_id(name, split, int(i)) for i in indices]
    for start in range(0, len(indices), batch_size):
        rows = range(start, min(start + batch_size, len(indices)))
        vis = [visible_indices(eval_mask, n_tokens, ids[r]) for r in rows]
        canvases = [masked_canvas(dataset.image(int(indices[r])), encoder.grid, v)
                    for r, v in zip(rows, vis, strict=True)]
        features[start : rows.stop] = encoder.encode_canvases(canvases, vis, batch_size)
        if progress:
            progress(rows.stop, len(indices))
    return TokenSet(features, labels, ids)


def requantize(features: np.ndarray, dtype: str) -> np.ndarray:
    """Round-trip tokens through the wire dtype, as a satellite's CLS payload would be."""
    out = np.empty_like(features)
    for i, tok in enumerate(features):
        data, scale = quantize_token(tok, dtype)
        out[i] = dequantize_token(data, dtype, len(tok), scale)
    return out
