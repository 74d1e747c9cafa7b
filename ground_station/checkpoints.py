"""The coordinator's per-round checkpoint: what it must match, and writing and reading it.

A checkpoint is one `torch.save` dict in CHECKPOINT under the run's checkpoint folder, with
the keys fingerprint, round, params, state, generator, failures, progress and seen (the
coordinator decides what they hold). It is written atomically after every round, so a crash
leaves the previous round's, and is refused when its fingerprint is not this run's.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from sparsat.ground_station.config import TrainingConfig

CHECKPOINT = "coordinator.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that does not belong to this run or this epoch."""


def fingerprint(cfg: TrainingConfig, dim: int, n_classes: int, dataset_ids: list[str]) -> str:
    """What a checkpoint must match: the training settings that shape the run (not the
    number of epochs or timeouts), the model's shape and the datasets."""
    settings = {k: v for k, v in asdict(cfg).items()
                if k not in ("epochs", "round_timeout_s", "threads")}
    key = json.dumps([settings, dim, n_classes, dataset_ids], sort_keys=True)
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


def save(directory: Path, checkpoint: dict[str, Any]) -> Path:
    """Write `checkpoint` to directory/CHECKPOINT, replacing the previous one atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT
    tmp = path.with_suffix(".tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(path)  # atomic: a crash leaves the previous round's checkpoint
    return path


def load(directory: Path, expected: str) -> dict[str, Any] | None:
    """directory/CHECKPOINT's contents, None when there is none; CheckpointError when it was
    written by a run whose fingerprint is not `expected`."""
    path = directory / CHECKPOINT
    if not path.exists():
        return None
    checkpoint: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    if checkpoint["fingerprint"] != expected:
        raise CheckpointError(f"{path} was written by a run with other training settings "
                              "or another dataset")
    return checkpoint
