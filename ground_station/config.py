"""Plain configuration of the ground station, built from a scenario by `sim`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

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
    device: str = "auto"  # where the encoder stage runs
    encode_batch: int = 256
    checkpoint_dir: Path | None = None  # the coordinator's per-round checkpoint
    resume: bool = False  # continue from checkpoint_dir's checkpoint when there is one
    # encoded splits, content-addressed (may be shared by runs); None: STORE/tokens
    token_cache: Path | None = None
