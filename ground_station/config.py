"""Plain configuration of the ground station, built from a scenario by `sim`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from sparsat.node.data.config import SensorConfig

Strategy = Literal["centralized", "ist", "local_sgd"]
Moments = Literal["travel", "reset"]
SubnetScale = Literal["none", "k"]


@dataclass(frozen=True)
class TrainingConfig:
    strategy: Strategy = "ist"
    workers: int = 2  # K; centralized always uses 1
    local_steps: int = 10  # L: local Adam steps per round
    moments: Moments = "reset"  # Adam state: shipped with the pieces, or fresh every round
    subnet_scale: SubnetScale = "none"  # IST: hidden outputs x K while a subnet trains
    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    hidden: tuple[int, int] = (1000, 1000)
    seed: int = 0
    round_timeout_s: float = 600.0
    threads: int = 1  # torch's CPU threads in every trainer (told at registration)

    @property
    def num_workers(self) -> int:
        return 1 if self.strategy == "centralized" else self.workers


@dataclass(frozen=True)
class GroundStationConfig:
    sensor: SensorConfig  # what every sensor is told when it registers
    training: TrainingConfig = field(default_factory=TrainingConfig)
    store_dir: Path = Path("runs/store")
    node_id: str = "ground-station"
    test_subset: int | None = None  # evaluate on the first N of a seeded test permutation
    # the validation split: the next N training images after the satellites' (0: none)
    validation_subset: int = 0
    device: str = "auto"  # where the encoder stage runs
    encode_batch: int = 256
    checkpoint_dir: Path | None = None  # the coordinator's per-round checkpoint
    resume: bool = False  # continue from checkpoint_dir's checkpoint when there is one
    # encoded splits, content-addressed (may be shared by runs); None: STORE/tokens
    token_cache: Path | None = None


# keys of the configuration that are this deployment's own, not the mission's: where files
# are (store, checkpoints, token cache, dataset root), what runs the encoder stage, how long
# the coordinator waits for a trainer, and this process's own settings. Mission control's
# scenario may differ from the ground station's in these and nothing else.
DEPLOYMENT_KEYS = frozenset({
    "store_dir", "checkpoint_dir", "resume", "token_cache", "node_id", "device",
    "encode_batch", "sensor.dataset.root", "sensor.dataset.download",
    "training.round_timeout_s"})


def config_tree(cfg: GroundStationConfig) -> dict[str, Any]:
    """`cfg` as JSON data (paths and other values JSON has no type for as strings)."""
    tree: dict[str, Any] = json.loads(json.dumps(asdict(cfg), default=str))
    return tree


def flatten(tree: dict[str, Any], skip: frozenset[str] = frozenset(),
            prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}, leaving out the keys in `skip`: the keys of a
    configuration as the ground station's Describe names them and mission control compares
    them (the one flattener both use)."""
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            flat.update(flatten(v, skip, key))
        elif key not in skip:
            flat[key] = list(v) if isinstance(v, tuple) else v
    return flat


def mission_keys(cfg: GroundStationConfig) -> dict[str, Any]:
    """The mission `cfg` runs, flattened: every key but the deployment's own
    (DEPLOYMENT_KEYS). What Describe answers, and mission control checks its scenario
    against."""
    return flatten(config_tree(cfg), DEPLOYMENT_KEYS)
