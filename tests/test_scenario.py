"""Scenario files: validation errors name the problem; the shipped scenarios load."""

from pathlib import Path

import pytest

from sim.scenario import ScenarioError, ground_station_config, load

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
    ("sensors: {count: 2}\n", "name"),
    ("name: [unclosed\n", "not valid YAML"),
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
