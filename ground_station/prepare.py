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
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from sparsat.ground_station.checkpoints import CheckpointError
from sparsat.ground_station.config import GroundStationConfig
from sparsat.ground_station.coordinator import Coordinator
from sparsat.ground_station.encoding import (
    Projection,
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


def build_encoder(cfg: GroundStationConfig) -> encoders.Encoder:
    try:
        encoder = encoders.create(
            cfg.sensor.encoder, cfg.sensor.encoder_weights, cfg.sensor.encoder_seed,
            cfg.sensor.encoder_pooling,  # type: ignore[arg-type]
        ).to(resolve_device(cfg.device))
        encoder.set_precision(cfg.sensor.encoder_precision)
    except (OSError, ValueError) as e:
        raise NotReady(f"encoder: {e}") from e
    return encoder


def _in_thread(work: Callable[[list[Update], dict[str, TokenSet]], None]
               ) -> Generator[Update, None, dict[str, TokenSet]]:
    """Run `work(updates, result)` in a worker thread, yielding its progress as it comes;
    returns its result. EncodingFailed carries what it raised."""
    updates: list[Update] = []
    result: dict[str, TokenSet] = {}
    errors: list[BaseException] = []

    def run() -> None:
        try:
            work(updates, result)
        except BaseException as e:  # reported to the caller
            errors.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    sent = 0
    while thread.is_alive() or sent < len(updates):
        thread.join(timeout=POLL_S)
        while sent < len(updates):
            yield updates[sent]
            sent += 1
    if errors:
        raise EncodingFailed(f"encoding failed: {errors[0]}") from errors[0]
    return result


def prepare(cfg: GroundStationConfig, store: SampleStore, test_data: ImageDataset,
            n_train: int, projection: Projection | None = None
            ) -> Generator[Update, None, Prepared]:
    """Encode, then make the coordinator (resumed from its checkpoint when cfg.resume);
    yields progress, returns what was prepared."""
    if not len(store):
        raise NotReady("no samples stored yet")
    encoder = build_encoder(cfg)
    result = yield from _in_thread(
        lambda updates, result: _encode(cfg, store, test_data, encoder, updates, result,
                                        projection))
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


Stage = Callable[[str, dict[str, object], Callable[[], TokenSet]], TokenSet]


def _stages(cfg: GroundStationConfig, updates: list[Update]
            ) -> tuple[Stage, Callable[[str], Callable[[int, int], None]]]:
    """A cached stage runner and a progress maker, both reporting into `updates`."""

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

    return stage, progress


def _read_as(cfg: GroundStationConfig, projection: Projection | None) -> str | None:
    """How CLS payloads are read, for the training split's cache key (None: patches)."""
    if cfg.sensor.payload != "cls":
        return None
    if projection is None:
        return cfg.sensor.cls_dtype
    return f"{cfg.sensor.cls_dtype}+basis{projection[1].version}"


def _as_sent(cfg: GroundStationConfig, tokens: TokenSet, projection: Projection | None
             ) -> TokenSet:
    """Ground-held tokens (test, validation) as the satellites' arrive: through the final
    basis, or requantized to the wire dtype; patches: as they are."""
    if cfg.sensor.payload != "cls":
        return tokens
    if projection is not None:
        return replace(tokens, features=projection[1].recode(tokens.features))
    return replace(tokens, features=requantize(tokens.features, cfg.sensor.cls_dtype))


def _encode(cfg: GroundStationConfig, store: SampleStore, test_data: ImageDataset,
            encoder: encoders.Encoder, updates: list[Update], result: dict[str, TokenSet],
            projection: Projection | None = None) -> None:
    """The encoder stage (a worker thread): train and test tokens into `result`, progress
    appended to `updates`."""
    stage, progress = _stages(cfg, updates)
    enc = encoder_digest(encoder, cfg.encode_batch)
    # a snapshot: samples may still arrive (encode_rows fails if one lands below top)
    n, top, content = store.content_digest()
    result["train"] = stage(
        "encode train", train_key(enc, content, _read_as(cfg, projection), cfg.sensor.codec),
        lambda: encode_rows(
            (r for chunk in store.rows(upto=top) for r in chunk), n, encoder,
            cfg.encode_batch, cfg.sensor.cls_dtype, progress("encode train"), projection,
            cfg.sensor.codec))
    _evaluation_sets(cfg, test_data, encoder, stage, progress, enc, result, projection)


def _evaluation_sets(cfg: GroundStationConfig, test_data: ImageDataset,
                     encoder: encoders.Encoder, stage: Stage,
                     progress: Callable[[str], Callable[[int, int], None]], enc: str,
                     result: dict[str, TokenSet], projection: Projection | None = None) -> None:
    """The test split (and the validation split) under the training data's masks and
    payload path, into `result`."""
    test = stage("encode test", eval_key(
        enc, cfg.sensor.dataset, files_digest(test_data), cfg.sensor.mask, len(test_data),
        cfg.test_subset, cfg.sensor.train_indices_seed, codec=cfg.sensor.codec),
        lambda: encode_split(
            test_data, "test", cfg.sensor.dataset.name, cfg.sensor.mask, encoder,
            cfg.encode_batch, cfg.test_subset, cfg.sensor.train_indices_seed,
            progress("encode test"), codec=cfg.sensor.codec))
    # train tokens were quantized (and projected) on the satellites: evaluate like for like
    result["test"] = _as_sent(cfg, test, projection)
    if cfg.validation_subset:
        result["validation"] = _as_sent(cfg, _validation(cfg, encoder, stage, enc, progress),
                                        projection)


@dataclass
class Stream:
    """A streaming mission's encoder stage between updates, kept by the ground station: the
    encoder, what was prepared (the coordinator, the training tokens so far, the test and
    validation splits) and the ids encoded already (each sample is encoded once)."""

    encoder: encoders.Encoder
    prepared: Prepared
    encoded: set[int] = field(default_factory=set)
    added: int = 0  # rows the last update appended


def prepare_stream(cfg: GroundStationConfig, store: SampleStore, test_data: ImageDataset,
                   upto_s: float, stream: Stream | None, projection: Projection | None = None
                   ) -> Generator[Update, None, Stream]:
    """One streaming update's encoder stage: the samples that arrived by `upto_s` and were
    not encoded yet, in order of arrival (then id), encoded in batches of encode_batch
    formed from that order alone (so a deployed run encodes exactly what a local one does),
    appended to the training tokens and to the coordinator's dataset. The first call also
    encodes the test (and validation) split and makes the coordinator."""
    if stream is None:
        encoder = build_encoder(cfg)
        enc = encoder_digest(encoder, cfg.encode_batch)

        def evaluation(updates: list[Update], result: dict[str, TokenSet]) -> None:
            stage, progress = _stages(cfg, updates)
            _evaluation_sets(cfg, test_data, encoder, stage, progress, enc, result, projection)

        result = yield from _in_thread(evaluation)
        coord = Coordinator(cfg.training, encoder.dim, test_data.num_classes,
                            cfg.checkpoint_dir)
        empty = TokenSet(np.empty((0, encoder.dim), np.float32), np.empty(0, np.int64),
                         np.empty(0, np.int64))
        stream = Stream(encoder, Prepared(coord, empty, result["test"], result.get("validation"),
                                          encoder.precision, encoder.precision_note))
    new = [i for _, i in store.arrived(upto_s) if i not in stream.encoded]
    s = stream

    def encode(updates: list[Update], result: dict[str, TokenSet]) -> None:
        result["train"] = encode_rows(
            store.rows_of(new), len(new), s.encoder, cfg.encode_batch, cfg.sensor.cls_dtype,
            lambda done, n: updates.append(Update("encode train", done, n)), projection,
            cfg.sensor.codec)

    tokens = (yield from _in_thread(encode))["train"] if new else None
    stream.added = len(new)
    if tokens is None:
        yield Update("encode train", 0, 0)
        return stream
    stream.encoded.update(new)
    old = stream.prepared.train
    stream.prepared.train = TokenSet(np.concatenate([old.features, tokens.features]),
                                     np.concatenate([old.labels, tokens.labels]),
                                     np.concatenate([old.ids, tokens.ids]))
    try:
        stream.prepared.coordinator.extend_dataset(tokens.features, tokens.labels)
    except ValueError as e:
        raise NotReady(f"training data: {e}") from e
    yield Update("encode train", len(new), len(new), tokens.flops, tokens.wall_s)
    return stream


def _validation(cfg: GroundStationConfig, encoder: encoders.Encoder,
                stage: Callable[[str, dict[str, object], Callable[[], TokenSet]], TokenSet],
                enc: str, progress: Callable[[str], Callable[[int, int], None]]) -> TokenSet:
    """The validation split, kept on the ground: training images no satellite holds, under
    the training data's masks (the caller passes it through the payload's path, _as_sent)."""
    s = cfg.sensor
    train_data = load_dataset(s.dataset, "train")
    if s.train_subset is None:
        raise ValueError("a validation split needs dataset.train_subset")
    indices = validation_indices(len(train_data), s.train_subset, cfg.validation_subset,
                                 s.train_indices_seed)
    tokens = stage("encode validation", eval_key(
        enc, s.dataset, files_digest(train_data), s.mask, len(train_data), None,
        s.train_indices_seed, (s.train_subset, cfg.validation_subset), codec=s.codec),
        lambda: encode_split(
            train_data, "train", s.dataset.name, s.mask, encoder, cfg.encode_batch,
            progress=progress("encode validation"), indices=indices, codec=s.codec))
    return tokens  # _as_sent then reads it as the satellites' payloads arrive


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
