"""The uplink's content: the basis projected CLS tokens are made with, and its zstd dictionary.

Fitted on the ground, never on the test split: a PCA basis on unlabelled images of the
training split that no satellite holds (the encoder was pretrained on that split, unlabelled),
encoded under the scenario's mask as the satellites' are; a supervised basis on the labelled
samples the satellites sent first as plain tokens (their downlink is in the mission's bytes).
The zstd dictionary is trained on the fit tokens' codes, cut into batches as satellites send
them. What is fitted is what travels: the ground keeps the basis as uplinked (float16).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sparsat.ground_station.config import GroundStationConfig
from sparsat.ground_station.encoding import (
    TokenCache,
    TokenSet,
    encode_split,
    encoder_digest,
    eval_key,
)
from sparsat.ground_station.store import SampleStore
from sparsat.node.data.datasets import files_digest, load_dataset
from sparsat.node.data.sharding import validation_indices
from sparsat.node.models import encoders
from sparsat.node.wire import basis as bases
from sparsat.node.wire.codec import dequantize_token
from sparsat.node.wire.downlink import SCALE_WIRE

DICT_SAMPLE_TOKENS = 16  # tokens per sample the zstd dictionary is trained on


class NotFitted(RuntimeError):
    """The basis cannot be fitted yet (FAILED_PRECONDITION): too few labelled samples, or
    no images outside the scenario's subset to fit on. (A fit that fails on its data is a
    ValueError: INVALID_ARGUMENT.)"""


@dataclass(frozen=True)
class Fitted:
    basis: bases.Basis
    dictionary: Any  # zstandard.ZstdCompressionDict, or None
    fit_tokens: int
    fit_s: float


def fit_tokens(cfg: GroundStationConfig, encoder: encoders.Encoder) -> TokenSet:
    """The unlabelled tokens a PCA basis is fitted on: `fit_images` images of the training
    split outside the scenario's subset, under its mask (cached like the other splits)."""
    s = cfg.sensor
    assert s.projection is not None
    train_data = load_dataset(s.dataset, "train")
    if s.train_subset is None:
        raise NotFitted("a PCA basis is fitted on training images no satellite holds: set "
                        "dataset.train_subset")
    # the seeded permutation the satellites' subset and the validation split are cut from:
    # the fit images come after both, so no satellite holds one and none is validated on
    before = s.train_subset + cfg.validation_subset
    if before + s.projection.fit_images > len(train_data):
        raise NotFitted(f"projection.fit_images {s.projection.fit_images}: the training split "
                        f"has {len(train_data)} images, {len(train_data) - before} left after "
                        f"the satellites' subset and the validation split")
    indices = validation_indices(len(train_data), before, s.projection.fit_images,
                                 s.train_indices_seed)
    cache = TokenCache(Path(cfg.token_cache) if cfg.token_cache is not None
                       else Path(cfg.store_dir) / "tokens")
    key = eval_key(encoder_digest(encoder, cfg.encode_batch), s.dataset, files_digest(train_data),
                   s.mask, len(train_data), None, s.train_indices_seed,
                   (before, s.projection.fit_images))
    key["stage"] = "fit"
    tokens = cache.get(key)
    if tokens is None:
        tokens = encode_split(train_data, "train", s.dataset.name, s.mask, encoder,
                              cfg.encode_batch, indices=indices)
        cache.put(key, tokens)
    return tokens


def labelled_tokens(cfg: GroundStationConfig, store: SampleStore, dim: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """The first `fit_samples` plain tokens (basis 0) stored, in id order, and their labels:
    what a supervised basis is fitted on."""
    assert cfg.sensor.projection is not None
    want = cfg.sensor.projection.fit_samples
    xs: list[np.ndarray] = []
    ys: list[int] = []
    for chunk in store.rows():
        for r in chunk:
            if not r.height and not r.basis and len(xs) < want:
                xs.append(dequantize_token(r.data, cfg.sensor.cls_dtype, dim, r.scale))
                ys.append(r.label)
    if not xs:
        return np.zeros((0, dim), np.float32), np.zeros(0, np.int64)
    return np.stack(xs), np.array(ys)


def fit(cfg: GroundStationConfig, store: SampleStore, encoder: encoders.Encoder) -> Fitted:
    spec = cfg.sensor.projection
    assert spec is not None
    t0 = time.perf_counter()
    if spec.method == "pca":
        x, y = fit_tokens(cfg, encoder).features, None
    else:
        x, y = labelled_tokens(cfg, store, encoder.dim)
        if len(x) < spec.fit_samples:
            raise NotFitted(f"a supervised basis needs {spec.fit_samples} labelled samples "
                            f"stored, {len(x)} are")
    basis = bases.fit(spec, x, y, seed=cfg.sensor.train_indices_seed)
    dictionary = train_dictionary(basis, x, spec.zstd_dict_bytes) if spec.zstd_level else None
    return Fitted(basis, dictionary, len(x), time.perf_counter() - t0)


def dictionary_id(basis: bases.Basis) -> int:
    """The zstd dictionary id that goes with a basis: above zstd's reserved ids (< 32768)."""
    return (basis.version & 0x7FFF0000) | 0x8000 | (basis.version & 0x7FFF)


def train_dictionary(basis: bases.Basis, x: np.ndarray, size: int) -> Any:
    """A zstd dictionary of `size` bytes trained on the codes (and scales) of tokens x, cut
    into samples of DICT_SAMPLE_TOKENS tokens as a batch lays them out."""
    import zstandard

    codes, scales = basis.encode(x)
    samples: list[bytes | bytearray | memoryview] = []
    per = DICT_SAMPLE_TOKENS if len(codes) >= 100 * DICT_SAMPLE_TOKENS else 1  # few: one a token
    for start in range(0, len(codes), per):
        part = slice(start, start + per)
        raw = codes[part].tobytes()
        if basis.scale_bytes:
            raw += scales[part].astype(SCALE_WIRE[basis.scale_bytes]).tobytes()
        samples.append(raw)
    try:
        return zstandard.train_dictionary(size, samples, dict_id=dictionary_id(basis), threads=1)
    except zstandard.ZstdError as e:
        raise ValueError(f"a zstd dictionary of {size} bytes cannot be trained on {len(x)} fit "
                         f"tokens ({e}): lower zstd_dict_bytes or fit on more") from e


def load_dictionary(raw: bytes) -> Any:
    """A zstd dictionary from its bytes (None for none)."""
    if not raw:
        return None
    import zstandard

    return zstandard.ZstdCompressionDict(raw)

