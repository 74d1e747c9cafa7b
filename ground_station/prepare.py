"""Prepare: encode the stored samples and the test split, and make the coordinator.

The encoder stage runs in a worker thread so that its progress streams to mission control
while it works; each split is looked up in the content-addressed token cache first (a second
Prepare of the same store and encoder encodes nothing). The result is handed to the
servicer, which connects the registered trainers and keeps it; nothing here touches the
registry.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from sparsat.ground_station.checkpoints import CheckpointError
from sparsat.ground_station.config import GroundStationConfig
from sparsat.ground_station.coordinator import Coordinator
from sparsat.ground_station.encoding import (
    TokenCache,
    TokenSet,
    encode_rows,
    encode_split,
    encoder_digest,
    eval_key,
    requantize,
    train_key,
)
from sparsat.ground_station.store import SampleStore
from sparsat.node.data.datasets import ImageDataset, files_digest, load_dataset
from sparsat.node.data.sharding import validation_indices
from sparsat.node.models import encoders
from sparsat.node.models.training import resolve_device

log = logging.getLogger("sparsat.ground_station")

POLL_S = 0.2  # how often progress is passed on while the encoder works


class NotReady(RuntimeError):
    """Prepare cannot start or finish with what the ground station has (FAILED_PRECONDITION):
    no samples, an encoder that cannot be built, no training data per copy, a checkpoint that
    does not fit."""


class EncodingFailed(RuntimeError):
    """The encoder stage itself failed (INTERNAL); the cause is chained."""


@dataclass(frozen=True)
class Update:
    """One progress report (the fields of sparsat.v1.Progress)."""

    stage: str
    done: int
    total: int
    flops: int = 0
    wall_s: float = 0.0
    cached: bool = False


@dataclass
class Prepared:
    coordinator: Coordinator  # without trainers yet
    train: TokenSet
    test: TokenSet
    validation: TokenSet | None = None  # cfg.validation_subset > 0
    precision: str = "float32"  # what the encoder stage computed in
    precision_note: str = ""  # why not what the scenario asked, "" when it was


def prepare(cfg: GroundStationConfig, store: SampleStore, test_data: ImageDataset,
            n_train: int) -> Generator[Update, None, Prepared]:
    """Encode, then make the coordinator (resumed from its checkpoint when cfg.resume);
    yields progress, returns what was prepared."""
    if not len(store):
        raise NotReady("no samples stored yet")
    try:
        encoder = encoders.create(
            cfg.sensor.encoder, cfg.sensor.encoder_weights, cfg.sensor.encoder_seed,
            cfg.sensor.encoder_pooling,  # type: ignore[arg-type]
        ).to(resolve_device(cfg.device))
        encoder.set_precision(cfg.sensor.encoder_precision)
    except (OSError, ValueError) as e:
        raise NotReady(f"encoder: {e}") from e
    updates: list[Update] = []
    result: dict[str, TokenSet] = {}
    errors: list[BaseException] = []
    thread = threading.Thread(target=_encode, daemon=True,
                              args=(cfg, store, test_data, encoder, updates, result, errors))
    thread.start()
    sent = 0
    while thread.is_alive() or sent < len(updates):
        thread.join(timeout=POLL_S)
        while sent < len(updates):
            yield updates[sent]
            sent += 1
    if errors:
        raise EncodingFailed(f"encoding failed: {errors[0]}") from errors[0]
    train = result["train"]
    coord = Coordinator(cfg.training, encoder.dim, test_data.num_classes, cfg.checkpoint_dir)
    try:
        coord.set_datasets(per_copy(train, cfg.sensor.mask.copies, n_train))
    except ValueError as e:
        coord.close()
        raise NotReady(f"training data: {e}") from e
    if cfg.resume:
        try:
            coord.load_checkpoint()
        except (CheckpointError, OSError, KeyError) as e:
            coord.close()
            raise NotReady(f"resume: {e}") from e
    return Prepared(coord, train, result["test"], result.get("validation"),
                    encoder.precision, encoder.precision_note)


def _encode(cfg: GroundStationConfig, store: SampleStore, test_data: ImageDataset,
            encoder: encoders.Encoder, updates: list[Update], result: dict[str, TokenSet],
            errors: list[BaseException]) -> None:
    """The encoder stage (a worker thread): train and test tokens into `result`, progress
    appended to `updates`, an exception to `errors`."""

    def progress(stage: str) -> Callable[[int, int], None]:
        return lambda done, n: updates.append(Update(stage, done, n))

    cache = TokenCache(Path(cfg.token_cache) if cfg.token_cache is not None
                       else Path(cfg.store_dir) / "tokens")

    def stage(name: str, key: dict[str, object], compute: Callable[[], TokenSet]) -> TokenSet:
        t0 = time.perf_counter()
        tokens = cache.get(key)
        if tokens is None:
            tokens = compute()
            cache.put(key, tokens)
            wall_s, cached = tokens.wall_s, False
        else:
            wall_s, cached = time.perf_counter() - t0, True
        n = len(tokens.labels) + tokens.skipped
        updates.append(Update(name, n, n, tokens.flops, wall_s, cached))
        return tokens

    try:
        enc = encoder_digest(encoder, cfg.encode_batch)
        # a snapshot: samples may still arrive (encode_rows fails if one lands below top)
        n, top, content = store.content_digest()
        cls = cfg.sensor.payload == "cls"
        result["train"] = stage(
            "encode train", train_key(enc, content, cfg.sensor.cls_dtype if cls else None),
            lambda: encode_rows(
                (r for chunk in store.rows(upto=top) for r in chunk), n, encoder,
                cfg.encode_batch, cfg.sensor.cls_dtype, progress("encode train")))
        test = stage("encode test", eval_key(
            enc, cfg.sensor.dataset, files_digest(test_data), cfg.sensor.mask, len(test_data),
            cfg.test_subset, cfg.sensor.train_indices_seed), lambda: encode_split(
                test_data, "test", cfg.sensor.dataset.name, cfg.sensor.mask, encoder,
                cfg.encode_batch, cfg.test_subset, cfg.sensor.train_indices_seed,
                progress("encode test")))
        if cls:  # train tokens were quantized on the satellites: evaluate like for like
            test = replace(test, features=requantize(test.features, cfg.sensor.cls_dtype))
        result["test"] = test
        if cfg.validation_subset:
            result["validation"] = _validation(cfg, encoder, stage, enc, progress)
    except BaseException as e:  # reported to the caller
        errors.append(e)


def _validation(cfg: GroundStationConfig, encoder: encoders.Encoder,
                stage: Callable[[str, dict[str, object], Callable[[], TokenSet]], TokenSet],
                enc: str, progress: Callable[[str], Callable[[int, int], None]]) -> TokenSet:
    """The validation split, kept on the ground: training images no satellite holds, under
    the training data's masks and payload path (CLS: requantized like the satellites')."""
    s = cfg.sensor
    train_data = load_dataset(s.dataset, "train")
    if s.train_subset is None:
        raise ValueError("a validation split needs dataset.train_subset")
    indices = validation_indices(len(train_data), s.train_subset, cfg.validation_subset,
                                 s.train_indices_seed)
    tokens = stage("encode validation", eval_key(
        enc, s.dataset, files_digest(train_data), s.mask, len(train_data), None,
        s.train_indices_seed, (s.train_subset, cfg.validation_subset)), lambda: encode_split(
            train_data, "train", s.dataset.name, s.mask, encoder, cfg.encode_batch,
            progress=progress("encode validation"), indices=indices))
    if s.payload == "cls":
        tokens = replace(tokens, features=requantize(tokens.features, s.cls_dtype))
    return tokens


def per_copy(train: TokenSet, copies: int, n_train: int
             ) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The token datasets epochs train on: one, or with random masks one per copy (epoch e
    trains on copy e - 1), each named by its size and a digest of its features."""
    if copies == 1:
        parts = [train]
    else:
        copy_of = train.ids // n_train
        parts = [train.subset(np.flatnonzero(copy_of == c)) for c in range(copies)]
        empty = [c for c, p in enumerate(parts) if not len(p.labels)]
        if empty:
            raise ValueError(f"no samples stored for copies {empty}")
    out = []
    for c, p in enumerate(parts):
        digest = hashlib.blake2b(p.features.tobytes(), digest_size=8).hexdigest()
        name = f"train-{len(p.labels)}-{digest}" + (f"-copy{c}" if copies > 1 else "")
        out.append((name, p.features, p.labels))
    return out
