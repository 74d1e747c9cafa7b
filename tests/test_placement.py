"""Which satellite holds which image: IID (today's) and Dirichlet label skew
(dataset.placement), and a mission with skewed shards end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from sparsat.node.data.sharding import assign, shard, train_subset
from sparsat.sim.cli import main
from sparsat.sim.scenario.schema import Scenario

SATS = [f"sat-{k}" for k in range(5)]
LABELS = np.random.default_rng(7).integers(0, 10, 6000)


def _share_of_top_class(images: dict[str, np.ndarray]) -> float:
    """The mean over satellites of the largest class's share of its shard."""
    shares = [np.bincount(LABELS[v], minlength=10).max() / len(v)
              for v in images.values() if len(v)]
    return float(np.mean(shares))


def test_iid_is_todays_every_nth_image() -> None:
    indices = train_subset(6000, 3000, 4)
    images = assign(6000, 3000, 4, SATS)
    assert all(np.array_equal(images[s], shard(indices, k, 5)) for k, s in enumerate(SATS))
    assert _share_of_top_class(images) < 0.2  # ten classes, evenly spread


@pytest.mark.parametrize("alpha", [0.1, 0.5, 100.0])
def test_dirichlet_places_every_image_once_with_skew_set_by_alpha(alpha: float) -> None:
    images = assign(6000, 3000, 4, SATS, LABELS, alpha)
    held = np.concatenate(list(images.values()))
    assert sorted(held.tolist()) == sorted(train_subset(6000, 3000, 4).tolist())  # once each
    assert all(np.all(np.diff(v) > 0) for v in images.values())  # in increasing order
    again = assign(6000, 3000, 4, SATS, LABELS, alpha)
    assert all(np.array_equal(images[s], again[s]) for s in SATS)  # seeded
    top = _share_of_top_class(images)
    if alpha == 0.1:
        assert top > 0.4  # a few classes dominate each satellite (0.49 with numpy 2)
    elif alpha == 0.5:
        assert 0.25 < top
    else:
        assert top < 0.2  # close to IID
    other = assign(6000, 3000, 5, SATS, LABELS, alpha)
    assert any(not np.array_equal(images[s], other[s]) for s in SATS)


def test_dirichlet_needs_the_labels_and_an_alpha() -> None:
    with pytest.raises(ValueError, match="labels"):
        assign(6000, 3000, 4, SATS, None, 0.5)
    base = {"name": "p", "dataset": {"placement": "dirichlet"}}
    with pytest.raises(ValueError, match="needs dataset.alpha"):
        Scenario.model_validate(base)
    with pytest.raises(ValueError, match="applies to placement: dirichlet"):
        Scenario.model_validate({"name": "p", "dataset": {"alpha": 0.5}})


@pytest.mark.slow
def test_a_mission_on_skewed_shards_reports_each_satellites_classes(tmp_path: Path) -> None:
    scenario: dict[str, Any] = {
        "name": "skew", "seed": 3,
        "dataset": {"name": "fashion_mnist", "train_subset": 480, "test_subset": 300,
                    "placement": "dirichlet", "alpha": 0.3},
        "sensors": {"count": 3, "per_process": 3, "mask": {"kind": "fixed", "ratio": 0.5}},
        "passes": {"period_s": 600, "duration_s": 60},
        "links": {"downlink": {"rate_bps": 96000, "latency_s": 0.05}},
        "training": {"strategy": "centralized", "workers": 1, "moments": "travel",
                     "local_steps": 3, "epochs": 2, "batch_size": 32, "hidden": [64, 48]},
    }
    path = tmp_path / "skew.yaml"
    path.write_text(yaml.safe_dump(scenario))
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    p = results["placement"]
    assert (p["kind"], p["alpha"]) == ("dirichlet", 0.3)
    counts = np.array([p["label_counts"][s] for s in ("sat-0", "sat-1", "sat-2")])
    assert counts.sum() == 480 == results["samples"]["stored"]  # every shard accepted
    assert (counts.max(axis=1) / np.maximum(counts.sum(axis=1), 1)).mean() > 0.3  # skewed


def test_the_link_bound_pair_splits_classes_between_its_two_cubesats() -> None:
    """scenarios/cubesat_link_bound_pair.yaml, the placement study's base: IID gives each
    CubeSat 12,000 images of all ten classes (more than its day's 9,600 captures); Dirichlet
    0.5 gives each class mostly to one of them, every image still held once."""
    from sparsat.node.data.datasets import split_labels
    from sparsat.node.data.sharding import satellite_images
    from sparsat.sim.scenario.configs import sensor_config
    from sparsat.sim.scenario.schema import load

    path = Path(__file__).resolve().parents[1] / "scenarios" / "cubesat_link_bound_pair.yaml"
    s = load(path)
    labels = split_labels(sensor_config(s).dataset, "train")
    iid = satellite_images(sensor_config(s))
    assert [len(v) for v in iid.values()] == [12_000, 12_000]
    assert s.sensors.capture is not None and s.sensors.capture.rate_per_h * 24 < 12_000
    skewed = Scenario.model_validate(
        {**yaml.safe_load(path.read_text()),
         "dataset": {**s.dataset.model_dump(), "placement": "dirichlet", "alpha": 0.5}})
    images = satellite_images(sensor_config(skewed))
    held = np.concatenate(list(images.values()))
    assert sorted(held.tolist()) == sorted(np.concatenate(list(iid.values())).tolist())
    counts = np.stack([np.bincount(labels[v], minlength=10) for v in images.values()])
    # the larger holder's share of each class, averaged: 0.5 would be IID
    assert (counts.max(axis=0) / counts.sum(axis=0)).mean() > 0.65
