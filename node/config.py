"""Plain configuration a node receives from the ground station when it registers.

The scenario schema lives in `sim`; nodes only see these dataclasses (sent as JSON in
RegisterReply.config_json), so a node never imports the simulation layer.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Literal

from node.datasets import DatasetSpec
from node.masking import MaskSpec

PayloadKind = Literal["patches", "cls"]


@dataclass(frozen=True)
class SensorConfig:
    dataset: DatasetSpec
    mask: MaskSpec
    payload: PayloadKind = "patches"
    cls_dtype: str = "float16"
    encoder: str = "vit_tiny_d8_patch4_28"  # node.encoders.DEFAULT_ENCODER (no torch import here)
    encoder_weights: str | None = None  # None: the encoder's default; see encoders.create
    encoder_seed: int = 0
    encoder_pooling: str = "cls"  # "cls" | "mean" of the visible tokens
    satellites: list[str] = field(default_factory=list)  # the whole constellation, in order
    train_indices_seed: int = 0
    train_subset: int | None = None  # first N of a seeded permutation of the training split

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SensorConfig:
        raw = json.loads(text)
        raw["dataset"] = DatasetSpec(**raw["dataset"])
        raw["mask"] = MaskSpec(**raw["mask"])
        return cls(**raw)
