"""Streaming missions end to end (sparsat run, real gRPC on localhost): captures over time,
updates per pass and every T seconds, what each update trained on, the timeline.

Each update's rows are checked against the ground station's own arrival stamps: an update at
T trains on exactly the samples whose batch finished on the air by T.
"""

from __future__ import annotations

import copy
import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from sparsat.node.models import encoders
from sparsat.sim.cli import main
from sparsat.sim.scenario.schema import Scenario, ScenarioError, load

STREAM: dict[str, Any] = {
    "name": "tiny_stream",
    "seed": 3,
    "dataset": {"name": "fashion_mnist", "train_subset": 240, "test_subset": 300},
    "sensors": {"count": 3, "per_process": 2, "mask": {"kind": "fixed", "ratio": 0.5},
                "payload": {"kind": "patches"},
                "capture": {"rate_per_h": 120, "storage_bytes": 20000}},
    "passes": {"period_s": 600, "duration_s": 30},
    "links": {"downlink": {"rate_bps": 9600, "latency_s": 0.05},
              "trainer": {"rate_bps": 1.0e8, "latency_s": 0.001}},
    "mission": {"horizon_h": 1.0},
    "training": {"strategy": "ist", "workers": 2, "local_steps": 3, "batch_size": 32,
                 "hidden": [64, 48], "schedule": "per_pass",
                 "update": {"kind": "epochs", "epochs": 1}},
}


def _run(tmp_path: Path, scenario: dict[str, Any], name: str = "out") -> tuple[
        dict[str, Any], Path]:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(scenario))
    out = tmp_path / name
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    return json.loads((out / "results.json").read_text()), out


def _arrivals(out: Path) -> np.ndarray:
    with sqlite3.connect(out / "store" / "samples.sqlite") as db:
        return np.array([a for (a,) in db.execute(
            "SELECT arrival_s FROM arrivals WHERE arrival_s IS NOT NULL")])


def _rows_per_epoch(results: dict[str, Any]) -> dict[int, int]:
    rows: dict[int, int] = {}
    for r in results["per_round_bytes"]:
        rows[r["epoch"]] = rows.get(r["epoch"], 0) + sum(w["rows"] for w in r["workers"].values())
    return rows


@pytest.mark.slow
def test_a_streaming_mission_trains_on_what_arrived_by_each_update(tmp_path: Path) -> None:
    results, out = _run(tmp_path, STREAM)
    arrived = _arrivals(out)
    updates = [e for e in results["timeline"] if e["event"] == "update"]
    assert results["updates"] == len(updates) >= 8
    rows = _rows_per_epoch(results)
    for e in updates:
        # one epoch over everything stored so far: exactly what arrived by the update's start
        assert rows[e["epoch"]] == int((arrived <= e["data_upto_s"]).sum()), e
        assert e["sim_time_s"] >= e["data_upto_s"]
    assert [e["images_on_ground"] for e in updates] == sorted(e["images_on_ground"]
                                                             for e in updates)
    # the mission ends at its horizon with scenes on board: counted, every capture accounted
    c = results["captures"]
    horizon = results["timeline"][-1]
    assert horizon["event"] == "horizon" and horizon["sim_time_s"] == 3600.0
    assert c["captured"] == 3 * 120 == horizon["captured"]
    assert c["left_on_board"] > 0 and c["left_on_board"] == results["left_on_board"]["total"]
    assert c["captured"] == c["stored_on_ground"] + c["dropped_on_board"] + c["left_on_board"]
    assert results["samples"]["stored"] == c["stored_on_ground"] == results["samples_arrived"]
    assert results["accuracy_at_horizon"] == updates[-1]["accuracy"]
    # each sample encoded once: the encoder stage's FLOPs are one pass over the stored ones
    cfg = encoders.config("vit_tiny_d8_patch4_28")
    once = results["samples"]["stored"] * encoders.encode_flops(cfg, 24)
    assert results["compute"]["ground_encoder"]["flops"] == once
    # append-only uploads: the trainers got each row once (and a few bytes per update), not
    # the whole dataset again at every update
    rounds = sum(w["sent"] + w["received"] for r in results["per_round_bytes"]
                 for w in r["workers"].values())
    uploads = results["bytes"]["trainer"] - rounds
    whole = results["samples"]["stored"] * (cfg.embed_dim * 4 + 8)
    assert uploads < 2 * (whole + 400 * len(updates))
    assert sum(e["images_on_ground"] for e in updates) * cfg.embed_dim * 4 > 4 * uploads
    for name in ("accuracy_vs_bytes.png", "accuracy_vs_mission_time.png"):
        assert (out / name).stat().st_size > 0


@pytest.mark.slow
def test_every_s_with_replay_trains_the_new_rows_and_a_share_of_the_old(tmp_path: Path) -> None:
    s = copy.deepcopy(STREAM)
    s["training"].update({"schedule": {"every_s": 900},
                          "update": {"kind": "replay", "replay_share": 0.5}})
    results, out = _run(tmp_path, s)
    arrived = _arrivals(out)
    updates = [e for e in results["timeline"] if e["event"] == "update"]
    assert [e["data_upto_s"] for e in updates] == [900.0, 1800.0, 2700.0]  # none at 3600
    rows = _rows_per_epoch(results)
    before = 0
    for e in updates:
        now = int((arrived <= e["data_upto_s"]).sum())
        new = now - before
        assert rows[e["epoch"]] == new + min(before, round(0.5 * new)), e
        before = now


@pytest.mark.slow
def test_same_seed_same_timeline(tmp_path: Path) -> None:
    first, _ = _run(tmp_path, STREAM, "a")
    second, _ = _run(tmp_path, STREAM, "b")
    keep = ("event", "update", "epoch", "sim_time_s", "accuracy", "downlink_bytes",
            "trainer_bytes", "images_on_ground", "captured")
    assert [{k: e.get(k) for k in keep} for e in first["timeline"]] == [
        {k: e.get(k) for k in keep} for e in second["timeline"]]


def _scenario(**changes: Any) -> Scenario:
    tree = copy.deepcopy(STREAM)
    for key, value in changes.items():
        *path, last = key.split(".")
        node = tree
        for p in path:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return Scenario.model_validate(tree)


@pytest.mark.parametrize(("changes", "message"), [
    ({"mission": None}, "sensors.capture needs mission.horizon_h"),
    ({"training.epochs": 3}, "training.update.epochs per update"),
    ({"training.schedule": "after_downlink", "training.update": {"epochs": 2}},
     "training.update is the work of a streaming"),
    ({"sensors.capture": None, "sensors.mask": {"kind": "random", "ratio": 0.5}},
     "random means a new mask every epoch"),
    ({"sensors.capture.duty_on_s": 100}, "duty cycle needs both"),
    ({"training.update": {"kind": "epochs", "replay_share": 0.5}}, "applies to kind: replay"),
    ({"training.schedule": {"every_s": 3600}}, "not before the horizon"),
])
def test_streaming_settings_that_mean_nothing_are_refused(changes: dict[str, Any],
                                                          message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _scenario(**changes)


def test_shipped_streaming_scenarios_load() -> None:
    root = Path(__file__).resolve().parents[1] / "scenarios"
    for name in ("cubesat_uhf_stream.yaml", "deploy_stream.yaml"):
        s = load(root / name)
        assert s.training.streaming and s.sensors.capture is not None
    with pytest.raises(ScenarioError):
        bad = root.parent / "tests" / "_no_such.yaml"
        load(bad)


def test_resuming_a_streaming_mission_is_refused_with_the_reason(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(STREAM))
    assert main(["run", "--resume", str(run)]) != 0
    err = capsys.readouterr().err
    assert "streaming missions cannot be resumed" in err and "from the start" in err


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["local_sgd", "centralized"])
def test_every_strategy_trains_in_the_stream(tmp_path: Path, strategy: str) -> None:
    """Local SGD and centralized training run on the mission clock too (IST above), with
    random masks meaning a fresh mask per capture."""
    s = copy.deepcopy(STREAM)
    s["mission"]["horizon_h"] = 0.5
    s["sensors"]["mask"] = {"kind": "random", "ratio": 0.5}
    s["training"].update({"strategy": strategy, "workers": 2 if strategy == "local_sgd" else 1})
    if strategy == "centralized":
        s["training"]["moments"] = "travel"
    results, out = _run(tmp_path, s)
    arrived = _arrivals(out)
    rows = _rows_per_epoch(results)
    updates = [e for e in results["timeline"] if e["event"] == "update"]
    assert len(updates) >= 3 and results["compute"]["trainers"]["flops"] > 0
    for e in updates:
        assert rows[e["epoch"]] == int((arrived <= e["data_upto_s"]).sum())
    assert all(u["sim_time_s"] > u["data_upto_s"] for u in updates)  # training takes time



@pytest.mark.slow
def test_a_satellite_with_an_empty_shard_ends_its_downlink(tmp_path: Path) -> None:
    """Two training images for three satellites: one has nothing to capture (it reports no
    next capture, and mission control does not wait on it)."""
    s = copy.deepcopy(STREAM)
    s["dataset"]["train_subset"] = 2
    s["mission"]["horizon_h"] = 0.25
    results, _ = _run(tmp_path, s)
    per = results["captures"]["per_satellite"]
    assert per["sat-2"]["captured"] == 0 and per["sat-0"]["captured"] == 30
    assert results["timeline"][-1]["captured"] == 2 * 30


@pytest.mark.slow
def test_the_link_bound_scenario_leaves_scenes_on_board(tmp_path: Path) -> None:
    """scenarios/cubesat_link_bound.yaml, its first 6 hours and 300 test images: the pass
    brings down far fewer scenes than were captured; the rest waits on board at the horizon
    (the whole day, AX.25 framing included: 3,876 of 9,600 delivered at r = 0.5)."""
    s = load(Path(__file__).resolve().parents[1] / "scenarios" / "cubesat_link_bound.yaml")
    tree = s.model_dump(mode="json")
    tree["mission"]["horizon_h"] = 6
    tree["dataset"]["test_subset"] = 300
    results, _ = _run(tmp_path, tree)
    c = results["captures"]
    assert c["captured"] == 6 * 400 and results["updates"] >= 1
    assert 0 < c["stored_on_ground"] < c["captured"] and c["left_on_board"] > 0
    assert c["left_on_board"] == c["captured"] - c["stored_on_ground"] - c["dropped_on_board"]
    assert results["accuracy_at_horizon"] is not None
