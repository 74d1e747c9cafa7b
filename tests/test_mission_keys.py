"""The ground station and mission control compare scenarios through one flattener
(sparsat.ground_station.config.flatten): Describe names the mission's keys, mission control
checks its own scenario against them before it drives the mission."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from sparsat.ground_station.config import (
    DEPLOYMENT_KEYS,
    GroundStationConfig,
    config_tree,
    flatten,
    mission_keys,
)
from sparsat.ground_station.server import GroundStation
from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb
from sparsat.sim.mission.ground_client import GroundStationClient, MissionError
from sparsat.sim.mission.tally import Tally
from sparsat.sim.scenario.configs import ground_station_config
from sparsat.sim.scenario.schema import Scenario, load

SCENARIO = Path(__file__).resolve().parent.parent / "scenarios" / "quickstart.yaml"


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    return load(SCENARIO)


def _deployed(s: Scenario, root: Path) -> GroundStationConfig:
    """The ground station's configuration of `s` as a deployment runs it: its own store,
    checkpoints, token cache and resume flag (mission control's has none of them)."""
    return ground_station_config(s, root / "store", checkpoint_dir=root / "ckpt", resume=True,
                                 token_cache=root / "tokens")


@pytest.fixture
def described(scenario: Scenario, tmp_path: Path) -> Iterator[pb.MissionInfo]:
    """What the real ground station's Describe answers for the scenario (in-process)."""
    station = GroundStation(_deployed(scenario, tmp_path))
    try:
        yield station.Describe(pb.DescribeRequest(), None)  # type: ignore[arg-type]
    finally:
        station.store.close()


def _check(scenario: Scenario, info: pb.MissionInfo) -> Tally:
    """Mission control's check of `scenario` against a ground station that described
    itself as `info`."""
    tally = Tally()
    client = GroundStationClient("127.0.0.1:1", scenario, tally, show_progress=False)
    try:
        client.describe = lambda: info  # type: ignore[method-assign]
        client.check_scenario()
    finally:
        client.close()
    return tally


def test_the_ground_station_and_mission_control_agree_on_the_scenario(
        scenario: Scenario, described: pb.MissionInfo) -> None:
    # Execute
    tally = _check(scenario, described)
    # Assert: accepted, and mission control's own flattening gives the keys and the
    # fingerprint the ground station answered, though their deployments differ
    here = mission_keys(ground_station_config(scenario, Path(".")))
    text = json.dumps(here, sort_keys=True)
    assert json.loads(described.config_json) == here
    assert described.fingerprint == hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
    assert tally.fingerprint == described.fingerprint


def test_another_scenario_is_refused_naming_the_keys_that_differ(
        scenario: Scenario, described: pb.MissionInfo) -> None:
    # Prepare: the same scenario with another learning rate and another mask ratio
    other = scenario.model_copy(update={
        "training": scenario.training.model_copy(update={"lr": scenario.training.lr * 2}),
        "sensors": scenario.sensors.model_copy(update={
            "mask": scenario.sensors.mask.model_copy(update={"ratio": 0.25})})})
    # Execute / Assert
    with pytest.raises(MissionError) as refused:
        _check(other, described)
    message = str(refused.value)
    assert "training.lr:" in message and "sensor.mask.ratio:" in message
    assert described.fingerprint in message


def test_every_deployment_key_is_a_key_of_the_configuration(
        scenario: Scenario, tmp_path: Path) -> None:
    """The keys Describe leaves out are exactly DEPLOYMENT_KEYS: one renamed in the config
    but not there would be compared between deployments and refuse a good scenario."""
    tree = config_tree(_deployed(scenario, tmp_path))
    assert set(flatten(tree)) - set(flatten(tree, DEPLOYMENT_KEYS)) == DEPLOYMENT_KEYS


def test_flatten_names_nested_keys_with_dots_and_leaves_tuples_as_lists() -> None:
    tree = {"a": {"b": 1, "c": {"d": (2, 3)}}, "e": "x"}
    assert flatten(tree) == {"a.b": 1, "a.c.d": [2, 3], "e": "x"}
    assert flatten(tree, frozenset({"a.c.d"})) == {"a.b": 1, "e": "x"}
