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
