"""Ingest: validate each downlinked sample, store it once, ack it.

Validation is a plain function on decoded samples; the servicer in server.py only maps its
errors to INVALID_ARGUMENT. Nothing is stored unless every check passes.
"""

from __future__ import annotations

from dataclasses import dataclass

from node.codec import CodecError, PatchData, check_patches, dequantize_token
from node.masking import split_copy
from node.serde import ClsData, SampleData

MAX_ID_CHARS = 256


class IngestError(ValueError):
    """A sample the ground station refuses; the message says which field and why."""


@dataclass(frozen=True)
class IngestRules:
    payload: str  # "patches" | "cls": what the scenario's sensors send
    grid: int  # encoder token grid
    dim: int  # encoder width (CLS payloads)
    num_classes: int
    image_shape: tuple[int, int, int] | None  # native (H, W, C) when the dataset fixes it
    max_sample_bytes: int
    copies: int = 1  # random masks: ids carry a copy number in [0, copies)


def max_sample_bytes(image_shape: tuple[int, int, int] | None, grid: int, dim: int) -> int:
    """Largest honest Sample: every pixel and index, or a float32 token, plus headroom."""
    pixels = (image_shape[0] * image_shape[1] * image_shape[2]) if image_shape else 4096**2 * 3
    return max(pixels + 2 * grid * grid, 4 * dim) + 4096


def validate(sample: SampleData, wire_bytes: int, rules: IngestRules,
             known_sensors: set[str]) -> None:
    """Raise IngestError naming the first thing wrong with `sample`."""
    if wire_bytes > rules.max_sample_bytes:
        raise IngestError(f"oversize sample: {wire_bytes} bytes > {rules.max_sample_bytes}")
    if not sample.sample_id or len(sample.sample_id) > MAX_ID_CHARS:
        raise IngestError(f"sample_id must be 1..{MAX_ID_CHARS} characters")
    if rules.copies > 1:
        try:
            _, copy = split_copy(sample.sample_id)
        except ValueError as e:
            raise IngestError(str(e)) from e
        if copy is None or copy >= rules.copies:
            raise IngestError(f"sample_id {sample.sample_id!r} must end in #COPY, COPY in "
                              f"[0, {rules.copies}): random masks send one copy per epoch")
    if sample.sensor_id not in known_sensors:
        raise IngestError(f"unknown sensor {sample.sensor_id!r}: not registered")
    if not 0 <= sample.label < rules.num_classes:
        raise IngestError(f"label {sample.label} out of range [0, {rules.num_classes})")
    p = sample.payload
    try:
        if isinstance(p, PatchData):
            if rules.payload != "patches":
                raise IngestError("patch payload, but this scenario's sensors send CLS tokens")
            if p.grid != rules.grid:
                raise IngestError(f"grid {p.grid} does not match the encoder's {rules.grid}")
            if rules.image_shape and (p.height, p.width, p.channels) != rules.image_shape:
                raise IngestError(f"image shape {(p.height, p.width, p.channels)} does not match "
                                  f"the dataset's {rules.image_shape}")
            check_patches(p)
        elif isinstance(p, ClsData):
            if rules.payload != "cls":
                raise IngestError("CLS payload, but this scenario's sensors send patches")
            if p.dim != rules.dim:
                raise IngestError(f"CLS dim {p.dim} does not match the encoder's {rules.dim}")
            dequantize_token(p.data, p.dtype, p.dim, p.scale)
    except CodecError as e:
        raise IngestError(str(e)) from e
