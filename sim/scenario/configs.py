"""The node configurations a scenario gives: the sensors', and the ground station's."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from sparsat.ground_station.config import GroundStationConfig, TrainingConfig
from sparsat.ground_station.detector import DetectorFit, fit_detector
from sparsat.node.data.capture import CaptureSpec
from sparsat.node.data.config import ImageCodecSpec, ProjectionSpec, SensorConfig
from sparsat.node.data.datasets import DatasetSpec
from sparsat.node.data.masking import MaskSpec
from sparsat.node.data.sharding import validation_indices
from sparsat.node.models.encoders import ENCODERS
from sparsat.sim.scenario.schema import Scenario


def mask_spec(s: Scenario) -> MaskSpec:
    """The sensors' masks; with captures over time a random mask is drawn per capture (its
    sample id names the revisit), so there are no per-epoch copies. A threshold cloud
    detector is fitted here (detector_fit), its parameters in the mask."""
    m = s.sensors.mask
    per_epoch = m.kind == "random" and s.sensors.capture is None
    fit = detector_fit(s)
    return MaskSpec(kind=m.kind, ratio=m.ratio, seed=s.seed,
                    copies=s.training.epochs if per_epoch else 1,
                    clouds=m.cloud_spec(), max_cloud=m.max_cloud, choice=m.choice,
                    detector=m.detector,
                    detector_params=fit.detector.to_hex() if fit is not None else "")


def detector_fit(s: Scenario) -> DetectorFit | None:
    """The threshold cloud detector the scenario's satellites run, fitted on the ground on
    `detector_fit_images` training images no satellite holds (after the satellites' subset
    and the validation split of the seeded permutation); None for the oracle. A pure
    function of the scenario, so mission control and a deployed ground station fit the same
    one (this machine needs the training split); fitted once a process."""
    m, d = s.sensors.mask, s.dataset
    if m.detector == "oracle":
        return None
    assert d.train_subset is not None  # the schema asks for it
    truth = MaskSpec(kind="clouds", ratio=0.0, seed=s.seed, clouds=m.cloud_spec(),
                     max_cloud=m.max_cloud)
    return _fit(dataset_spec(s), d.train_subset + d.validation_subset, m.detector_fit_images,
                s.seed, truth, ENCODERS[s.encoder.name].grid)


@functools.cache
def _fit(dataset: DatasetSpec, before: int, n: int, seed: int, truth: MaskSpec,
         grid: int) -> DetectorFit:
    from sparsat.node.data.datasets import load_dataset

    train = load_dataset(dataset, "train")
    if before + n > len(train):
        raise ValueError(f"sensors.mask.detector_fit_images {n}: the training split has "
                         f"{len(train)} images, {len(train) - before} left after the "
                         f"satellites' subset and the validation split")
    return fit_detector(train, validation_indices(len(train), before, n, seed), truth, grid,
                        dataset.name)


def capture_spec(s: Scenario) -> CaptureSpec | None:
    c = s.sensors.capture
    if c is None:
        return None
    assert s.mission.horizon_s is not None  # the schema asks for it
    return CaptureSpec(rate_per_h=c.rate_per_h, storage_bytes=c.storage_bytes,
                       horizon_s=s.mission.horizon_s, when_full=c.when_full,
                       duty_on_s=c.duty_on_s, duty_period_s=c.duty_period_s)


def dataset_spec(s: Scenario) -> DatasetSpec:
    d = s.dataset
    return DatasetSpec(name=d.name, root=d.root, download=d.download, split_seed=d.split_seed)


def sensor_config(s: Scenario) -> SensorConfig:
    d = s.dataset
    return SensorConfig(
        dataset=dataset_spec(s),
        mask=mask_spec(s),
        payload=s.sensors.payload.kind,
        cls_dtype=s.sensors.payload.cls_dtype,
        encoder=s.encoder.name,
        encoder_weights=s.encoder.weights,
        encoder_seed=s.encoder.seed,
        encoder_pooling=s.encoder.pooling,
        encoder_precision=s.encoder.precision,
        satellites=s.sensors.ids(),
        train_indices_seed=s.seed,
        train_subset=d.train_subset,
        capture=capture_spec(s),
        placement_alpha=d.alpha if d.placement == "dirichlet" else None,
        projection=projection_spec(s),
        codec=codec_spec(s),
    )


def codec_spec(s: Scenario) -> ImageCodecSpec:
    c = s.sensors.payload.codec
    return ImageCodecSpec() if c is None else ImageCodecSpec(c.name, c.quality or 0, c.header)


def projection_spec(s: Scenario) -> ProjectionSpec | None:
    p = s.sensors.payload.projection
    if p is None:
        return None
    fields = p.model_dump()
    fields["pq_subspaces"] = fields["pq_subspaces"] or 0
    return ProjectionSpec(**fields)


def satellite_images(s: Scenario) -> dict[str, np.ndarray]:
    """Each satellite's training indices as the ground station assigns them (this machine
    needs the training split: its size, and its labels for a Dirichlet placement)."""
    from sparsat.node.data import sharding

    return sharding.satellite_images(sensor_config(s))


def capturing_satellites(s: Scenario) -> int:
    """Satellites with images to capture (a training subset smaller than the constellation
    leaves some IID shards empty)."""
    n = s.dataset.train_subset
    return s.sensors.count if n is None else min(n, s.sensors.count)


def ground_station_config(s: Scenario, store_dir: Path, checkpoint_dir: Path | None = None,
                          resume: bool = False, token_cache: Path | None = None
                          ) -> GroundStationConfig:
    t = s.training
    return GroundStationConfig(
        sensor=sensor_config(s),
        training=TrainingConfig(
            strategy=t.strategy, workers=t.workers, local_steps=t.local_steps, epochs=t.epochs,
            batch_size=t.batch_size, lr=t.lr, hidden=t.hidden, seed=s.seed,
            round_timeout_s=t.round_timeout_s, subnet_scale=t.subnet_scale, threads=t.threads,
            moments=t.moments or ("travel" if t.strategy == "centralized" else "reset"),
        ),
        store_dir=store_dir,
        test_subset=s.dataset.test_subset,
        validation_subset=s.dataset.validation_subset,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        token_cache=token_cache,
    )
