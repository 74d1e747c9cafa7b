"""Scenario files: validation errors name the problem; the shipped scenarios load."""

from pathlib import Path

import pytest

from sparsat.sim.scenario.configs import ground_station_config
from sparsat.sim.scenario.schema import ScenarioError, load

SCENARIOS = sorted(Path(__file__).resolve().parent.parent.joinpath("scenarios").glob("*.yaml"))


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.name)
def test_shipped_scenarios_load(path: Path) -> None:
    scenario = load(path)
    cfg = ground_station_config(scenario, Path("/tmp/x"))
    assert cfg.sensor.satellites == scenario.sensors.ids()


@pytest.mark.parametrize("text, needle", [
    ("name: x\nsensors: {cuont: 4}\n", "cuont"),  # misspelt key is an error, not a default
    ("name: x\nsensors: {mask: {ratio: 1.0}}\n", "ratio"),
    ("name: x\ntraining: {strategy: ist, workers: 1}\n", "workers"),
    ("name: x\ntraining: {strategy: local_sgd, workers: 1}\n", "workers"),
    ("name: x\ntraining: {moments: keep}\n", "moments"),
    ("name: x\nlinks: {downlink: {rate_bps: 9600, loss: 1.0}}\n", "loss"),
    ("name: x\norbits: {stations: []}\n", "stations"),
    ("name: x\nencoder: {name: resnet50}\n", "unknown encoder"),
    ("name: x\npasses: {period_s: 10, duration_s: 20}\n", "duration_s"),
    ("name: x\nsensors: {count: 1}\norbits: {horizon_h: 24, walker: {planes: 1, per_plane: 1, "
     "altitude_km: 500, inclination_deg: 50}, stations: [{name: a, lat_deg: 0, lon_deg: 0}]}\n",
     "orbits.horizon_h is now mission.horizon_h"),
    ("name: x\nmission: {horizon_h: 0}\n", "horizon_h"),
    ("name: x\ndataset: {validation_subset: 100}\n", "set dataset.train_subset"),
    ("sensors: {count: 2}\n", "name"),
    ("name: [unclosed\n", "not valid YAML"),
    # settings that would change nothing are refused, naming themselves
    ("name: x\nlinks: {trainer: {rate_bps: 1.0e9, loss: 0.1}}\n", "trainer.loss"),
    ("name: x\nlinks: {trainer: {rate_bps: 1.0e9, frame_bytes: 64}}\n", "trainer.frame_bytes"),
    ("name: x\nlinks: {downlink: {rate_bps: 9600, budget: {frequency_hz: 2.2e9, eirp_dbw: 0,"
     " gt_dbk: 0, bandwidth_hz: 1.0e6}}}\n", "budget needs an `orbits`"),
    ("name: x\nlinks: {downlink: {rate_bps: 9600, frame_bytes: 64}}\n", "frame_bytes has no"),
    ("name: x\nsensors: {mask: {kind: fixed, max_cloud: 0.5}}\n", "max_cloud only apply"),
    ("name: x\nsensors: {mask: {kind: none, ratio: 0.75}}\n", "ratio has no effect"),
    ("name: x\nsensors: {payload: {kind: patches, cls_dtype: int8}}\n", "cls_dtype"),
    ("name: x\nsensors: {onboard_flops: 1.0e9}\n", "onboard_flops"),
    ("name: x\ntraining: {strategy: local_sgd, subnet_scale: k}\n", "subnet_scale"),
    ("name: x\nencoder: {seed: 3}\n", "encoder.seed"),
    ("name: x\nsensors: {mask: {kind: clouds, cover_mean: 0.1, overcast_share: 0.5}}\n",
     "infeasible"),
    ("name: x\nsensors: {count: 1}\npasses: {period_s: 100, duration_s: 10}\norbits: "
     "{walker: {planes: 1, per_plane: 1, altitude_km: 500, inclination_deg: 50}, "
     "stations: [{name: a, lat_deg: 0, lon_deg: 0}]}\n", "`passes` has no effect"),
])
def test_bad_scenarios_name_the_problem(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ScenarioError, match=needle):
        load(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="not found"):
        load(tmp_path / "nope.yaml")


@pytest.mark.parametrize("strategy, moments", [("centralized", "travel"), ("ist", "reset"),
                                               ("local_sgd", "reset")])
def test_moments_default_to_plain_adam_for_centralized_and_reset_otherwise(
        tmp_path: Path, strategy: str, moments: str) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(f"name: x\ntraining: {{strategy: {strategy}, workers: 2}}\n")
    assert ground_station_config(load(path), tmp_path).training.moments == moments


def test_a_tle_path_is_found_beside_the_scenario(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "s.yaml"
    path.write_text("name: x\nsensors: {count: 1}\norbits: {tle: c.tle, stations: "
                    "[{name: a, lat_deg: 0, lon_deg: 0}]}\n")
    scenario = load(path)
    assert scenario.orbits is not None
    assert scenario.orbits.tle == str((tmp_path / "sub" / "c.tle").resolve())


def test_loss_without_orbits_takes_effect_and_clouds_resolve(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("name: x\nlinks: {downlink: {rate_bps: 9600, loss: 0.1, frame_bytes: 64}}"
                    "\nsensors: {mask: {kind: clouds, preset: ocean, roughness: 0.3}}\n")
    cfg = ground_station_config(load(path), tmp_path)
    assert cfg.sensor.mask.clouds.cover_mean == 0.72  # the ocean preset...
    assert cfg.sensor.mask.clouds.roughness == 0.3  # ...with its roughness overridden


def test_random_masks_send_one_copy_per_epoch(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("name: x\nsensors: {mask: {kind: random}}\ntraining: {epochs: 7}\n")
    assert ground_station_config(load(path), tmp_path).sensor.mask.copies == 7


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.name)
def test_a_resolved_scenario_loads_again(tmp_path: Path, path: Path) -> None:
    """config.yaml spells every default out: none of them counts as a no-effect setting."""
    from sparsat.sim.scenario.schema import dump

    out = tmp_path / "config.yaml"
    out.write_text(dump(load(path)))
    assert load(out) == load(path)
