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

# patch payloads' image codecs (sparsat.node.wire.images codes and decodes)
CODECS = ("raw", "png", "webp", "jpeg", "jpeg2k", "jpegxl")
LOSSY = ("webp", "jpeg", "jpeg2k", "jpegxl")
QUALITY_RANGE = {"webp": (1, 100), "jpeg": (1, 100), "jpegxl": (1, 100), "jpeg2k": (10, 80)}
HEADERS = ("inline", "shared")
# codecs whose header is whole bytes the shape and settings fix (JPEG XL's is bit-packed
# with the image's own metadata: it stays inline)
SHARED_HEADER = ("png", "webp", "jpeg", "jpeg2k")
# of those, the ones whose shared header is the ground station's library's bytes, sent in the
# setup (SensorSetup.codec_header); PNG's and WebP's follow from the shape alone
SETUP_HEADER = ("jpeg", "jpeg2k")


@dataclass(frozen=True)
class ImageCodecSpec:
    """How a patch payload's pixels are coded (scenario `sensors.payload.codec`)."""

    name: str = "raw"
    quality: int = 0  # lossy codecs only; 0 for raw and png
    # "shared": the stream's header (container, tables, sizes), which the sample's shape and
    # the codec's settings fix, is left off each sample and made again on the ground
    # (sparsat.node.wire.images.strip_header); "inline": every sample's stream whole
    header: str = "inline"

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise ValueError(f"image codec must be one of {', '.join(CODECS)}, got {self.name!r}")
        if self.header not in HEADERS:
            raise ValueError(f"header must be one of {', '.join(HEADERS)}, got {self.header!r}")
        if self.header == "shared" and self.name not in SHARED_HEADER:
            raise ValueError(f"{self.name} has no header to share (shared headers: "
                             f"{', '.join(SHARED_HEADER)})")
        if self.name in LOSSY:
            lo, hi = QUALITY_RANGE[self.name]
            if not lo <= self.quality <= hi:
                raise ValueError(f"{self.name} quality must be in {lo}..{hi}, got {self.quality}")
        elif self.quality:
            raise ValueError(f"{self.name} takes no quality (it is lossless), got {self.quality}")

    @property
    def coded(self) -> bool:
        return self.name != "raw"

    @property
    def header_in_setup(self) -> bool:
        """A shared header whose bytes travel in the sensor setup (JPEG, JPEG 2000)."""
        return self.header == "shared" and self.name in SETUP_HEADER

    @property
    def label(self) -> str:
        label = self.name if self.name not in LOSSY else f"{self.name} q{self.quality}"
        return label + (", shared header" if self.header == "shared" else "")


# projected CLS tokens (sparsat.node.wire.basis)
QUANTIZERS = ("int8", "int4", "sign", "pq")
SCALES = ("float32", "float16", "fixed")  # int8 / int4: how a token's scale travels
METHODS = ("pca", "supervised")
MAX_DIM = 4096  # E and D bound what a basis from the wire may size
MAX_PQ_BITS = 8


@dataclass(frozen=True)
class ProjectionSpec:
    """How a CLS payload is projected and quantized (scenario `sensors.payload.projection`)."""

    dim: int = 32  # D
    quantizer: str = "int4"
    scale: str = "float16"  # int8 / int4 only
    method: str = "pca"  # pca: fitted on unlabelled images; supervised: on labelled samples
    pq_subspaces: int = 0  # pq: M (divides D); 0: D / 4 where 4 divides D, else D
    pq_bits: int = 8  # pq: 2^bits centroids a subspace
    fit_images: int = 5000  # pca: unlabelled training-split images outside the scenario's
    fit_samples: int = 1000  # supervised: labelled samples downlinked first (int8 CLS)
    # entropy-coded batches: zstd at this level with a dictionary of zstd_dict_bytes trained
    # on the ground (on the fit tokens' codes) and uplinked; 0: off
    zstd_level: int = 0
    zstd_dict_bytes: int = 4096

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.dim <= MAX_DIM:
            problems.append(f"dim {self.dim} out of 1..{MAX_DIM}")
        if self.quantizer not in QUANTIZERS:
            problems.append(f"quantizer {self.quantizer!r} not one of {QUANTIZERS}")
        if self.scale not in SCALES:
            problems.append(f"scale {self.scale!r} not one of {SCALES}")
        if self.method not in METHODS:
            problems.append(f"method {self.method!r} not one of {METHODS}")
        if self.quantizer == "pq" and (self.subspaces < 1 or self.dim % self.subspaces):
            problems.append(f"pq_subspaces {self.pq_subspaces} does not divide dim {self.dim}")
        if not 1 <= self.pq_bits <= MAX_PQ_BITS:
            problems.append(f"pq_bits {self.pq_bits} out of 1..{MAX_PQ_BITS}")
        if self.fit_images < 2 or self.fit_samples < 2:
            problems.append("fit_images and fit_samples must be at least 2")
        if problems:
            raise ValueError("projection: " + "; ".join(problems))

    @property
    def subspaces(self) -> int:
        """PQ's M: pq_subspaces, or by default one subspace per 4 dimensions."""
        if self.pq_subspaces:
            return self.pq_subspaces
        return self.dim // 4 if self.dim % 4 == 0 else self.dim


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
    projection: ProjectionSpec | None = None  # CLS payloads: projected and quantized tokens
    # patch payloads: how the visible tiles' pixels are coded (sparsat.node.wire.images)
    codec: ImageCodecSpec = field(default_factory=ImageCodecSpec)

    def to_json(self) -> str:
        raw = asdict(self)
        if raw["encoder_precision"] == "float32":  # the default: stores bound before it was
            del raw["encoder_precision"]            # a key still bind (from_json restores it)
        for key in ("capture", "placement_alpha", "projection"):  # likewise
            if raw[key] is None:
                del raw[key]
        if raw["codec"]["name"] == "raw":  # likewise
            del raw["codec"]
        for key, default in (("choice", "random"), ("detector", "oracle"),
                             ("detector_params", "")):  # likewise (MaskSpec restores them)
            if raw["mask"][key] == default:
                del raw["mask"][key]
        return json.dumps(raw)

    @classmethod
    def from_json(cls, text: str) -> SensorConfig:
        raw = json.loads(text)
        raw["dataset"] = DatasetSpec(**raw["dataset"])
        raw["mask"] = MaskSpec(**raw["mask"])
        if raw.get("capture") is not None:
            raw["capture"] = CaptureSpec(**raw["capture"])
        if raw.get("projection") is not None:
            raw["projection"] = ProjectionSpec(**raw["projection"])
        if raw.get("codec") is not None:
            raw["codec"] = ImageCodecSpec(**raw["codec"])
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
    # CLS payloads with a projection: codes of an uplinked basis; until a satellite has one it
    # waits, or with send_unprojected sends cls_dtype tokens (SensorSetup.projected)
    projected: bool = False
    send_unprojected: bool = False
    # patch payloads: the image codec of the pixels (SensorSetup.codec, codec_quality)
    codec: ImageCodecSpec = field(default_factory=ImageCodecSpec)
    # a shared JPEG / JPEG 2000 header: its bytes, as the ground station makes them
    codec_header: bytes = b""
