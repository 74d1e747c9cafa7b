"""Plain configuration a node receives from the ground station when it registers.

The scenario schema lives in `sim`; nodes only see these dataclasses, so a node never imports
the simulation layer. SensorConfig travels as JSON (RegisterReply.config_json: the Python
sensor's own settings, its encoder and mask); SensorSetup as typed protobuf fields
(RegisterReply.sensor), the part of the contract any sensor host, in any language, needs.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

from sparsat.node.data.capture import CaptureSpec
from sparsat.node.data.datasets import DatasetSpec
from sparsat.node.data.masking import MaskSpec

PayloadKind = Literal["patches", "cls"]


@dataclass(frozen=True)
class SensorConfig:
    dataset: DatasetSpec
    mask: MaskSpec
    payload: PayloadKind = "patches"
    cls_dtype: str = "float16"
    # sparsat.node.models.encoders.DEFAULT_ENCODER (no torch import here)
    encoder: str = "vit_tiny_d8_patch4_28"
    encoder_weights: str | None = None  # None: the encoder's default; see encoders.create
    encoder_seed: int = 0
    encoder_pooling: str = "cls"  # "cls" | "mean" of the visible tokens
    # what the encoder computes in, on board and at the ground station alike: "float32" or
    # "bfloat16" (where the hardware runs it natively; else float32, said and recorded)
    encoder_precision: str = "float32"
    satellites: list[str] = field(default_factory=list)  # the whole constellation, in order
    train_indices_seed: int = 0
    train_subset: int | None = None  # first N of a seeded permutation of the training split
    # captures over time (sparsat.node.data.capture); None: each satellite holds its whole
    # shard at t = 0 (today's missions)
    capture: CaptureSpec | None = None
    # which satellite holds which training image (sparsat.node.data.sharding.assign):
    # None: IID; a number: Dirichlet(alpha) label skew per class
    placement_alpha: float | None = None

    def to_json(self) -> str:
        raw = asdict(self)
        if raw["encoder_precision"] == "float32":  # the default: stores bound before it was
            del raw["encoder_precision"]            # a key still bind (from_json restores it)
        for key in ("capture", "placement_alpha"):  # likewise
            if raw[key] is None:
                del raw[key]
        return json.dumps(raw)

    @classmethod
    def from_json(cls, text: str) -> SensorConfig:
        raw = json.loads(text)
        raw["dataset"] = DatasetSpec(**raw["dataset"])
        raw["mask"] = MaskSpec(**raw["mask"])
        if raw.get("capture") is not None:
            raw["capture"] = CaptureSpec(**raw["capture"])
        return cls(**raw)


@dataclass(frozen=True, eq=False)  # eq: arrays inside
class SensorSetup:
    """What the ground station told a sensor host (RegisterReply.sensor): the one source of
    which images each satellite sends, in which order, and how ids and tiles are laid out."""

    n_train: int  # N: sample id = copy * N + index into the training split
    grid: int  # g: the token grid
    copies: int  # masked copies of each image: copy 0 of every index first, then copy 1...
    payload: PayloadKind
    cls_dim: int  # CLS payloads: values per token (0 for patches)
    cls_dtype: str | None  # CLS payloads: float32 | float16 | int8 (None for patches)
    # tile edges (g + 1 each) for datasets of one image shape, () when sizes differ
    tile_rows: tuple[int, ...]
    tile_cols: tuple[int, ...]
    # satellite -> its training indices in capture order (strictly increasing), int64
    images: dict[str, np.ndarray] = field(default_factory=dict)
