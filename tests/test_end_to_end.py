"""End to end over real gRPC on localhost: real node processes, real byte accounting."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from sparsat.ground_station.store import Row
from sparsat.node.wire.downlink import BatchBuilder, Payload
from sparsat.node.wire.rpc import GRPC_FRAME_BYTES
from sparsat.sim.cli import main

pytestmark = pytest.mark.slow

TINY = {
    "name": "tiny",
    "seed": 3,
    "dataset": {"name": "fashion_mnist", "train_subset": 480, "test_subset": 500},
    "sensors": {"count": 3, "per_process": 2, "mask": {"kind": "fixed", "ratio": 0.5},
                "payload": {"kind": "patches"}},
    "passes": {"period_s": 600, "duration_s": 30},
    "links": {"downlink": {"rate_bps": 9600, "latency_s": 0.05},
              "trainer": {"rate_bps": 1.0e8, "latency_s": 0.001}},
    "training": {"strategy": "ist", "workers": 2, "local_steps": 3, "epochs": 2,
                 "batch_size": 32, "hidden": [64, 48]},
}


def _write(tmp_path: Path, scenario: dict[str, Any]) -> Path:
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(scenario))
    return path


def _stored_wire_bytes(store: Path, scale_bytes: int | None = None) -> tuple[int, int]:
    """(samples stored, downlink bytes): every batch the ground station recorded, rebuilt
    from its stored samples with the sensors' own builder, must have the wire size recorded
    (ByteSize + 5 of the message that arrived); their sum is the downlink."""
    with sqlite3.connect(store / "samples.sqlite") as db:
        rows = {r[0]: Row(*r) for r in db.execute("SELECT * FROM payloads")}
        batches = db.execute("SELECT satellite, named, ids, wire_bytes FROM batches "
                             "ORDER BY seq").fetchall()
    total = 0
    for satellite, named, ids, wire in batches:
        samples = [rows[i] for i in np.frombuffer(ids, "<i8").tolist()]
        cls = samples[0].height == 0
        basis = samples[0].basis  # projected tokens: their codes' basis, `scale_bytes` a token
        batch = BatchBuilder(satellite if named else "", cls, cls and samples[0].scale != 0,
                             basis=basis, scale_bytes=scale_bytes if basis else None)
        for r in samples:
            batch.add(Payload(r.id, r.label, r.data, bool(r.runs), r.scale, basis=r.basis))
        assert batch.wire_size() == wire == batch.to_pb().ByteSize() + GRPC_FRAME_BYTES
        total += wire
    return len(rows), total


def _check_common(results: dict[str, Any], scenario: dict[str, Any]) -> None:
    n = scenario["dataset"]["train_subset"]
    b = results["bytes"]
    # lossless and unframed unless the scenario says otherwise
    assert b["total"] == (b["downlink"] + b["uplink"] + b["trainer"] + b["retransmitted"]
                          + b["framing"])
    assert b["retransmitted"] == 0 or scenario["links"]["downlink"].get("loss")
    assert b["framing"] == 0 or scenario["links"]["downlink"].get("framing")
    assert results["samples"] == {**results["samples"], "sent": n, "stored": n, "trained_on": n}
    # the timeline: an entry after every update, the radio's and the LAN's bytes apart
    updates = [e for e in results["timeline"] if e["event"] == "update"]
    assert [e["epoch"] for e in updates] == [h["epoch"] for h in results["history"]]
    assert all(e["downlink_bytes"] == b["downlink"] for e in updates)  # trained after it
    assert all(e["images_on_ground"] == n and e["captured"] == n for e in updates)
    lan = [e["trainer_bytes"] for e in updates]
    assert lan == sorted(lan) and lan[-1] == b["trainer"] and len(set(lan)) == len(lan)
    # downlink: sensors' count == ground station's count, the Send streams' call credentials
    # included (as many as streams, each of the same size per sensor host), counted apart too
    assert results["ground_station"]["downlink_bytes_received"] == b["downlink"]
    assert results["ground_station"]["downlink_credential_bytes_received"] == \
        b["downlink_credentials"] > 0  # the launcher's nodes run with credentials
    sensors = {k: v for k, v in results["node_bytes"].items() if k.startswith("sensors")}
    assert sum(v["sent"] for v in sensors.values()) == b["downlink"]
    assert sum(v["received"] for v in sensors.values()) == b["uplink"] > 0  # the acks
    # trainer links: coordinator's count == what the trainer processes counted themselves
    trainers = {k: v for k, v in results["node_bytes"].items() if k.startswith("trainer")}
    assert sum(v["sent"] + v["received"] for v in trainers.values()) == b["trainer"]
    assert sum(results["per_link_bytes"].values()) == b["total"]
    hist = results["history"]
    assert [h["epoch"] for h in hist] == list(range(1, scenario["training"]["epochs"] + 1))
    assert all(0.0 <= h["accuracy"] <= 1.0 for h in hist)
    assert hist[-1]["bytes_total"] == b["total"]
    assert all(a["bytes_total"] < c["bytes_total"] for a, c in zip(hist, hist[1:], strict=False))
    assert results["sim_time_s"] == hist[-1]["sim_time_s"] > results["downlink_done_s"] > 0
    assert results["final_accuracy"] == hist[-1]["accuracy"]
    # the best model is chosen on the validation split, never on the test set
    if "validation_accuracy" in hist[-1]:
        vals = [h["validation_accuracy"] for h in hist]
        best = vals.index(max(vals))
        assert results["best_chosen_on"] == "validation"
    else:
        best = len(hist) - 1
        assert results["best_chosen_on"] == "none (the last model)"
    assert (results["best_epoch"], results["best_accuracy"]) == (hist[best]["epoch"],
                                                                 hist[best]["accuracy"])


def test_local_run_patches_ist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scenario_file = _write(tmp_path, TINY)
    out = tmp_path / "out"

    code = main(["run", str(scenario_file), "--out", str(out), "--quiet"])

    assert code == 0
    results = json.loads((out / "results.json").read_text())
    _check_common(results, TINY)
    # every byte charged on the downlink is a stored message's serialized size + frame
    count, wire = _stored_wire_bytes(out / "store")
    assert count == TINY["dataset"]["train_subset"]
    assert wire + results["bytes"]["downlink_credentials"] == results["bytes"]["downlink"]
    # 480 samples / (2 workers * 3 steps * 32) = 3 rounds per epoch, 2 workers each
    assert len(results["per_round_bytes"]) == 2 * 3
    assert all(len(r["workers"]) == 2 for r in results["per_round_bytes"])
    # 9.6 kbit/s in 30 s passes: the downlink (~64 kB a satellite) needs two passes of 600 s
    assert results["downlink_done_s"] > 600
    for name in ("config.yaml", "history.csv", "accuracy_vs_bytes.png",
                 "accuracy_vs_mission_time.png"):
        assert (out / name).stat().st_size > 0
    assert "final accuracy" in capsys.readouterr().out


def test_the_mission_ends_at_its_horizon_with_samples_on_board(tmp_path: Path) -> None:
    """mission.horizon_h = 0.2 h (720 s): sat-0's passes at 0 and 600 s fit, sat-1's and
    sat-2's second ones (800, 1000 s) do not; what is left is reported, not an error, and
    the ground trains on what arrived (here done before the horizon)."""
    scenario = {**TINY, "name": "horizon", "mission": {"horizon_h": 0.2}}
    out = tmp_path / "out"
    assert main(["run", str(_write(tmp_path, scenario)), "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    left = results["left_on_board"]
    assert left["per_satellite"]["sat-0"] == 0
    assert left["per_satellite"]["sat-1"] > 0 and left["per_satellite"]["sat-2"] > 0
    stored = results["samples"]["stored"]
    assert left["total"] == sum(left["per_satellite"].values()) == 480 - stored > 0
    assert results["horizon_h"] == 0.2
    assert 600 < results["downlink_done_s"] <= results["sim_time_s"] <= 720
    assert results["accuracy_at_horizon"] == results["final_accuracy"]
    assert [h["epoch"] for h in results["history"]] == [1, 2]
    timeline = results["timeline"]
    assert [e["event"] for e in timeline] == ["update", "update", "horizon"]
    at = timeline[-1]
    assert (at["sim_time_s"], at["accuracy"], at["epoch"]) == (720, results["final_accuracy"], 2)
    assert at["images_on_ground"] == stored and at["captured"] == 480
    assert at["downlink_bytes"] == results["bytes"]["downlink"]
    assert results["samples"]["trained_on"] == stored


def test_radio_framing_is_charged_on_the_air_and_counted_apart(tmp_path: Path) -> None:
    """AX.25/CSP frames (252 data bytes, 24 around them) on a lossy link: every batch and ack
    pays its frames' overhead, resent frames too; the air's bytes are gRPC + resent + framing,
    and every sample still arrives."""
    links = {**TINY["links"], "downlink": {**TINY["links"]["downlink"], "loss": 0.05,
                                           "framing": {"kind": "ax25"}}}
    scenario = {**TINY, "name": "framing", "links": links}
    out = tmp_path / "out"
    assert main(["run", str(_write(tmp_path, scenario)), "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    _check_common(results, scenario)
    b = results["bytes"]
    air = sum(v for k, v in results["per_link_bytes"].items() if k.startswith("downlink:"))
    assert air == b["downlink"] + b["uplink"] + b["retransmitted"] + b["framing"]
    transfers = results["samples"]["batches"] * 2  # each batch, and its ack
    assert b["framing"] >= 24 * (transfers + b["downlink"] // 252)
    assert b["framing"] <= 24 * (transfers + (b["downlink"] + b["retransmitted"]) // 252 + 64)
    assert results["samples"]["stored"] == TINY["dataset"]["train_subset"]


def test_a_horizon_before_any_window_says_so(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    scenario = {**TINY, "name": "early", "mission": {"horizon_h": 0.01},  # 36 s
                "passes": {**TINY["passes"], "offset_s": 100}}
    code = main(["run", str(_write(tmp_path, scenario)), "--out", str(tmp_path / "out"),
                 "--quiet"])
    err = capsys.readouterr().err
    assert code != 0 and "nothing reached the ground by the horizon" in err, err
    assert "480 samples left on board" in err


def test_a_validation_split_bigger_than_what_is_left_is_refused_before_the_downlink(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scenario = {**TINY, "name": "val", "dataset": {**TINY["dataset"],
                                                   "validation_subset": 59_521}}
    code = main(["run", str(_write(tmp_path, scenario)), "--out", str(tmp_path / "out"),
                 "--quiet"])
    out = capsys.readouterr()
    assert code != 0
    assert "59520 left for it" in out.err + out.out
    assert not (tmp_path / "out" / "results.json").exists()


def test_the_best_model_is_chosen_on_a_validation_split_kept_on_the_ground(
        tmp_path: Path) -> None:
    """dataset.validation_subset: 200 training images no satellite holds, encoded at the
    ground station like the training data; every epoch is scored on them, and the best
    model (and the test accuracy reported for it) is the one they pick."""
    from sparsat.node.data.sharding import train_subset, validation_indices

    train = train_subset(60_000, 480, TINY["seed"])
    val = validation_indices(60_000, 480, 200, TINY["seed"])
    assert len(val) == 200 and not set(val) & set(train)  # never on board
    with pytest.raises(ValueError, match="59520 left for it"):
        validation_indices(60_000, 480, 59_521, TINY["seed"])

    scenario = {**TINY, "name": "validation",
                "dataset": {**TINY["dataset"], "validation_subset": 200},
                "training": {**TINY["training"], "epochs": 3}}
    out = tmp_path / "out"
    assert main(["run", str(_write(tmp_path, scenario)), "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    _check_common(results, scenario)
    assert all(0 <= h["validation_accuracy"] <= 1 for h in results["history"])
    assert results["best_chosen_on"] == "validation"
    assert "validation_accuracy" in (out / "history.csv").read_text().splitlines()[0]


def test_random_masks_downlink_one_copy_per_epoch_and_compute_is_on_the_clock(
        tmp_path: Path) -> None:
    """E epochs of random masks: E copies of every image downlinked, each charged and stored
    as its own sample, each epoch trained on its copy; compute time on the mission clock."""
    scenario = {**TINY, "name": "random",
                "sensors": {**TINY["sensors"], "mask": {"kind": "random", "ratio": 0.5}},
                "training": {**TINY["training"], "trainer_flops": 1.0e9, "ground_flops": 1.0e9}}
    out = tmp_path / "out"

    assert main(["run", str(_write(tmp_path, scenario)), "--out", str(out), "--quiet"]) == 0

    results = json.loads((out / "results.json").read_text())
    n, epochs = TINY["dataset"]["train_subset"], TINY["training"]["epochs"]
    s = results["samples"]
    assert s["sent"] == s["stored"] == s["trained_on"] == s["rows_trained"] == epochs * n
    count, wire = _stored_wire_bytes(out / "store")
    assert count == epochs * n
    assert wire + results["bytes"]["downlink_credentials"] == results["bytes"]["downlink"]
    # ids are copy * N + index (N = 60,000 Fashion-MNIST training images): each copy once
    with sqlite3.connect(out / "store" / "samples.sqlite") as db:
        ids = np.array([r[0] for r in db.execute("SELECT id FROM payloads")])
    assert np.bincount(ids // 60000).tolist() == [n] * epochs
    assert sorted(set((ids % 60000).tolist())) == sorted(set((ids[ids < 60000]).tolist()))
    # two copies of one image carry different masks
    with sqlite3.connect(out / "store" / "samples.sqlite") as db:
        a, b = (db.execute("SELECT data FROM payloads WHERE id = ?",
                           (int(ids.min()) + c * 60000,)).fetchone()[0] for c in (0, 1))
    assert a != b
    # each epoch uploads its own copy to both trainers
    trainers = {k: v for k, v in results["node_bytes"].items() if k.startswith("trainer")}
    assert sum(v["sent"] + v["received"] for v in trainers.values()) == results["bytes"]["trainer"]
    c = results["compute"]
    flops = sum(w["flops"] for r in results["per_round_bytes"] for w in r["workers"].values())
    assert c["trainers"]["flops"] == flops > 0
    assert abs(c["trainers"]["sim_s"] - flops / 1.0e9) < 1e-6
    assert c["ground_encoder"]["flops"] > 0 and c["ground_encoder"]["wall_s"] > 0
    assert abs(c["ground_encoder"]["sim_s"] - c["ground_encoder"]["flops"] / 1.0e9) < 1e-6
    # the mission clock holds the encoder stage and every round's compute
    rounds = sum(r["sim_s"] for r in results["per_round_bytes"])
    assert rounds >= c["trainers"]["sim_s"] / 2  # two workers compute side by side
    assert results["sim_time_s"] >= results["downlink_done_s"] + c["ground_encoder"]["sim_s"] \
        + rounds


def test_clouds_drop_cloudy_tokens_skip_overcast_scenes_and_report_both_test_groups(
        tmp_path: Path) -> None:
    scenario = {**TINY, "name": "clouds",
                "sensors": {**TINY["sensors"], "mask": {"kind": "clouds", "ratio": 0.5}}}
    out = tmp_path / "out"

    assert main(["run", str(_write(tmp_path, scenario)), "--out", str(out), "--quiet"]) == 0

    results = json.loads((out / "results.json").read_text())
    n, s = TINY["dataset"]["train_subset"], results["samples"]
    # default climatology: about 27 % of scenes overcast, never sent
    assert 0.15 * n < s["cloudy_skipped"] < 0.40 * n
    assert s["sent"] + s["cloudy_skipped"] == n == s["stored"] + s["cloudy_skipped"]
    count, wire = _stored_wire_bytes(out / "store")
    assert count == s["stored"]
    assert wire + results["bytes"]["downlink_credentials"] == results["bytes"]["downlink"]
    groups = results["accuracy_by_group"]
    assert set(groups) == {"clear", "cloudy"} and all(0 <= v <= 1 for v in groups.values())
    assert 0 < s["test_cloudy_skipped"] < TINY["dataset"]["test_subset"] // 2
    assert s["test"] + s["test_cloudy_skipped"] == TINY["dataset"]["test_subset"]


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-m", "sparsat.sim.cli", *args], stdout=f,
                                stderr=subprocess.STDOUT)


def test_deployed_nodes_cls_centralized(tmp_path: Path) -> None:
    """Nodes started one by one, as on separate machines; `sparsat run` attaches to them."""
    scenario = {**TINY, "name": "deployed",
                "sensors": {**TINY["sensors"], "payload": {"kind": "cls", "cls_dtype": "int8"}},
                "training": {**TINY["training"], "strategy": "centralized", "workers": 1}}
    scenario_file = _write(tmp_path, scenario)
    addr_file = tmp_path / "gs.addr"
    certs = tmp_path / "certs"
    assert main(["certs", str(certs), "--node", "ground_station:ground-station", "--node",
                 "trainer:trainer-a", "--node", "sensor:sensors-x:sat-0,sat-1,sat-2",
                 "--node", "operator:ops"]) == 0
    procs = [_spawn(["ground-station", "--listen", "127.0.0.1:0", "--scenario",
                     str(scenario_file), "--store", str(tmp_path / "store"),
                     "--port-file", str(addr_file), "--certs", str(certs / "ground-station")],
                    tmp_path / "gs.log")]
    try:
        deadline = time.monotonic() + 120
        while not addr_file.exists():
            assert procs[0].poll() is None, (tmp_path / "gs.log").read_text()
            assert time.monotonic() < deadline, "ground station did not start"
            time.sleep(0.1)
        gs = addr_file.read_text()
        procs.append(_spawn(["node", "trainer", "--listen", "127.0.0.1:0", "--ground-station",
                             gs, "--device", "cpu", "--certs", str(certs / "trainer-a")],
                            tmp_path / "t.log"))
        procs.append(_spawn(["node", "sensor", "--ground-station", gs, "--listen",
                             "127.0.0.1:0", "--id", "sat-0", "--id", "sat-1", "--id", "sat-2",
                             "--certs", str(certs / "sensors-x")], tmp_path / "s.log"))

        code = main(["run", str(scenario_file), "--out", str(tmp_path / "out"), "--quiet",
                     "--ground-station", gs, "--certs", str(certs / "ops")])

        assert code == 0
        results = json.loads((tmp_path / "out" / "results.json").read_text())
        _check_common(results, scenario)
        count, wire = _stored_wire_bytes(tmp_path / "store")
        assert wire + results["bytes"]["downlink_credentials"] == results["bytes"]["downlink"]
        # an int8 CLS token of the default encoder: 192 bytes + its scale and framing
        assert 192 < wire / count < 192 + 64
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=20)


# ---- failures and resume, with real processes --------------------------------------------

FAULTS = {**TINY, "name": "faults",
          "training": {**TINY["training"], "epochs": 4, "moments": "travel",
                       "round_timeout_s": 20}}


def _node_address(cluster: Any, node_id: str) -> str:
    import grpc  # noqa: F401  (imported for the stub's errors)

    from sparsat.node.wire.rpc import channel
    from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb
    from sparsat.proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc

    ch = channel(cluster.address, peer="ground-station")
    try:
        nodes = pb_grpc.RegistryStub(ch).ListNodes(pb.ListNodesRequest(), timeout=10).nodes
    finally:
        ch.close()
    return next((n.address for n in nodes if n.node_id == node_id), "")


def test_a_killed_trainer_does_not_stop_the_run_and_rejoins_when_it_registers_again(
        tmp_path: Path) -> None:
    from sparsat.sim.deploy.launcher import LocalCluster
    from sparsat.sim.mission.control import MissionControl
    from sparsat.sim.scenario.schema import Scenario, dump

    scenario = Scenario.model_validate(FAULTS)
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text(dump(scenario))
    with LocalCluster(scenario, out / "config.yaml", out) as cluster:
        def on_epoch(entry: dict[str, Any]) -> None:
            if entry["epoch"] == 1:  # the next round finds it dead
                cluster.procs["trainer-1"].kill()
                cluster.procs["trainer-1"].wait()
            if entry["epoch"] == 2:  # back as a new process, before epoch 3 starts
                old = _node_address(cluster, "trainer-1")
                cluster.spawn_trainer("trainer-1", name="trainer-1-again")
                deadline = time.monotonic() + 120
                while _node_address(cluster, "trainer-1") == old:
                    assert time.monotonic() < deadline, cluster.log_tail("trainer-1-again")
                    time.sleep(0.2)

        results = MissionControl(scenario, cluster.address, False, on_epoch=on_epoch).run()

    rounds = results["per_round_bytes"]
    # 480 rows: 3 rounds of 2 x 96 (the third 64 + 32); in epoch 2 the first round's other half
    # fails and trainer-0 takes the other 384 rows alone, 96 a round
    per_epoch = {1: 3, 2: 5, 3: 3, 4: 3}
    assert [r["epoch"] for r in rounds] == [e for e, n in per_epoch.items() for _ in range(n)]
    assert all(sum(w["rows"] for r in rounds if r["epoch"] == e for w in r["workers"].values())
               == 480 for e in per_epoch)  # every epoch, every row, once
    failures = results["trainer_failures"]
    assert [(f["epoch"], f["round"], f["node_id"]) for f in failures] == [(2, 0, "trainer-1")]
    assert "UNAVAILABLE" in failures[0]["error"]
    epoch2 = [r for r in rounds if r["epoch"] == 2]
    assert set(epoch2[0]["workers"]) == {"trainer-0", "trainer-1"}
    assert "error" in epoch2[0]["workers"]["trainer-1"]
    assert all(set(r["workers"]) == {"trainer-0"} for r in epoch2[1:])  # alone meanwhile
    assert all(set(r["workers"]) == {"trainer-0", "trainer-1"}
               for r in rounds if r["epoch"] >= 3)  # rejoined
    assert [h["epoch"] for h in results["history"]] == [1, 2, 3, 4]
    assert results["final_accuracy"] > 0.2  # 10 classes, 480 samples, 4 short epochs
    # the new trainer process counted exactly what was charged to it after it came back
    later = sum(w["sent"] + w["received"] for r in rounds if r["epoch"] >= 3
                for n, w in r["workers"].items() if n == "trainer-1")
    node = results["node_bytes"]["trainer-1"]
    assert node["sent"] + node["received"] > later  # + the dataset it was sent again


def test_run_resume_continues_a_run_whose_ground_station_was_killed(tmp_path: Path) -> None:
    from sparsat.sim.deploy.launcher import LocalCluster
    from sparsat.sim.mission.control import Deadlines, MissionControl, MissionError
    from sparsat.sim.scenario.schema import Scenario, dump

    scenario = Scenario.model_validate({**FAULTS, "name": "resume"})
    whole = tmp_path / "whole"
    assert main(["run", str(_write(tmp_path, {**FAULTS, "name": "resume"})), "--out",
                 str(whole), "--quiet"]) == 0
    expected = json.loads((whole / "results.json").read_text())

    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text(dump(scenario))
    with LocalCluster(scenario, out / "config.yaml", out) as cluster:
        def on_epoch(entry: dict[str, Any]) -> None:
            if entry["epoch"] == 2:
                cluster.procs["ground-station"].kill()
                cluster.procs["ground-station"].wait()

        with pytest.raises(MissionError):  # after a short wait for the ground station
            MissionControl(scenario, cluster.address, False, state_file=out / "mission_state.json",
                           on_epoch=on_epoch, deadlines=Deadlines(gs_retry_s=3.0)).run()
    assert (out / "checkpoint" / "coordinator.pt").exists()

    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["resumed"] == 1
    assert [h["epoch"] for h in results["history"]] == [1, 2, 3, 4]
    assert [h["accuracy"] for h in results["history"]] == \
        [h["accuracy"] for h in expected["history"]]
    assert results["bytes"]["downlink"] == expected["bytes"]["downlink"]  # not sent twice
    assert results["samples"]["sent"] == expected["samples"]["sent"]
    assert len(results["per_round_bytes"]) == len(expected["per_round_bytes"])
    assert results["sim_time_s"] >= expected["sim_time_s"]  # + the dataset sent again
    # every figure is the whole run's, not the resumed half's: the restarted ground station's
    # counters come from its store, the sensors' counts from before their restart
    counts = ("downlink_bytes_received", "rejected")  # (peak memory: a property of the process)
    assert [results["ground_station"][k] for k in counts] == [
        expected["ground_station"][k] for k in counts]
    assert results["ground_station"]["downlink_bytes_received"] == results["bytes"]["downlink"]
    assert results["samples"] == expected["samples"]
    sensors = [v for k, v in results["node_bytes"].items() if k.startswith("sensors")]
    assert sum(v["sent"] for v in sensors) == results["bytes"]["downlink"]
    assert sum(v["received"] for v in sensors) == results["bytes"]["uplink"]


# ---- orbits: contact windows, link budget, losses, antenna queues --------------------------


def _twin_tle(path: Path) -> None:
    """Two satellites 2 degrees apart in one polar orbit: always in view together."""
    from datetime import UTC, datetime

    from sgp4.api import WGS72, Satrec

    from sparsat.sim.space import orbits

    epoch = datetime(2026, 1, 1, tzinfo=UTC)
    days = orbits._julian(epoch) - orbits.SGP4_EPOCH_JD
    n = orbits.mean_motion_rad_min(550.0)
    sats = []
    for k, anomaly in enumerate((0.0, 0.035)):
        rec = Satrec()
        rec.sgp4init(WGS72, "i", k + 1, days, 0.0, 0.0, 0.0, 0.0, 0.0, 1.7, anomaly, n, 0.3)
        sats.append(orbits.Satellite(f"sat-{k}", rec))
    orbits.write_tle(sats, path)


@pytest.mark.parametrize(("antennas", "acm"), [(1, False), (2, False), (1, True),
                                                (1, "replan"), (1, "weak")])
def test_orbital_downlink_uses_only_contact_windows_and_queues_for_antennas(
        tmp_path: Path, antennas: int, acm: bool | str) -> None:
    """(acm: the rate from DVB-S2 MODCODs instead of Shannon's capacity; on this UHF budget
    both stay above the modem's 9.6 kbit/s, so the mission is the same; "replan": a MODCOD
    chosen again every 5 s of a pass; "weak": 20 dB less EIRP, so that near the horizon
    (beyond about 1,450 km) no MODCOD closes, slices of 0.01 s, shorter than the latency:
    the satellite waits for the geometry, then stretches its slices, and all comes down)"""
    from sparsat.sim.scenario.schema import load
    from sparsat.sim.space import orbits

    _twin_tle(tmp_path / "twins.tle")
    scenario = {
        **{k: v for k, v in TINY.items() if k != "passes"},  # orbits give the windows
        "name": "orbital", "dataset": {**TINY["dataset"], "train_subset": 240},
        "sensors": {**TINY["sensors"], "count": 2},
        "mission": {"horizon_h": 24},
        "orbits": {"epoch": "2026-01-01T00:00:00Z", "tle": "twins.tle",
                   "stations": [{"name": "svalbard", "lat_deg": 78.23, "lon_deg": 15.39,
                                 "min_elevation_deg": 5, "antennas": antennas}]},
        "links": {"downlink": {"rate_bps": 9600, "latency_s": 0.05, "loss": 0.05,
                               "budget": {"frequency_hz": 437e6,
                                          "eirp_dbw": -20.0 if acm == "weak" else 0.0,
                                          "gt_dbk": -15.0, "bandwidth_hz": 25e3,
                                          **({"modcod": {"margin_db": 1.0, **(
                                              {"replan_s": 5.0} if acm == "replan" else
                                              {"replan_s": 0.01} if acm == "weak" else {})}}
                                             if acm else {})}},
                  "trainer": TINY["links"]["trainer"]},
        "training": {**TINY["training"], "strategy": "centralized", "workers": 1, "epochs": 1,
                     "target_accuracy": 0.05},
    }
    path = _write(tmp_path, scenario)
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())

    b = results["bytes"]
    assert b["retransmitted"] > 0  # 5% of frames lost, resent and charged
    assert b["total"] == b["downlink"] + b["uplink"] + b["retransmitted"] + b["trainer"]
    assert sum(results["per_link_bytes"].values()) == b["total"]
    assert results["samples"]["stored"] == 240
    s = load(path)
    windows = orbits.contact_windows(orbits.constellation(s), orbits.stations(s),
                                     s.orbits.epoch, 24 * 3600.0)
    assert windows[0].start_s > 0
    done = results["downlink_done_s"]
    assert done > windows[0].start_s  # nothing moves before the first contact
    assert any(c.start_s < done <= c.end_s + 1 for c in windows)  # it ends inside one
    station = results["stations"]["svalbard"]
    assert station["bytes"] == b["downlink"] + b["uplink"] + b["retransmitted"]
    assert 0 < station["utilisation"] <= 1
    if acm:  # every second and byte on the air is booked on the MODCOD that carried it
        m = results["modcods"]
        assert m and "none" not in m
        assert sum(v["bytes"] for v in m.values()) == station["bytes"]
        assert sum(v["seconds"] for v in m.values()) == pytest.approx(station["busy_s"])
        assert sum(v["time_share"] for v in m.values()) == pytest.approx(1.0)
        transfers = sum(v["transfers"] for v in m.values())
        if acm == "replan":  # 5-s slices (latency and a part-filled last one aside)
            assert len(m) >= 2 and station["busy_s"] / transfers <= 5.0 + 1.0
    else:
        assert results["modcods"] is None
    if antennas == 1:  # the twins are in view together: one waits for the other
        assert station["queued_s"] > 0
    else:
        assert station["queued_s"] == 0
    assert results["time_to_accuracy_s"] == results["history"][0]["sim_time_s"]


@pytest.mark.parametrize("projection", [
    {"dim": 16, "quantizer": "int4", "fit_images": 300},
    {"dim": 8, "quantizer": "pq", "pq_bits": 4, "method": "supervised", "fit_samples": 60,
     "zstd_level": 19, "zstd_dict_bytes": 256},
], ids=["pca-int4", "supervised-pq-zstd"])
def test_projected_tokens_go_up_as_a_basis_and_down_as_codes(
        tmp_path: Path, projection: dict[str, Any]) -> None:
    scenario = {**TINY, "name": "tokens",
                "sensors": {**TINY["sensors"], "mask": {"kind": "none"},
                            "payload": {"kind": "cls", "cls_dtype": "int8",
                                        "projection": projection}},
                "links": {**TINY["links"], "uplink": {"rate_bps": 4800, "latency_s": 0.05}}}
    out = tmp_path / "out"

    assert main(["run", str(_write(tmp_path, scenario)), "--out", str(out), "--quiet"]) == 0

    results = json.loads((out / "results.json").read_text())
    _check_common(results, scenario)  # the sensors' received bytes: acks and the uplink
    b, p = results["bytes"], results["projection"]
    up = b["uplink_breakdown"]
    assert b["uplink"] == up["acks"] + up["bases"] + up["codebooks"] + up["dictionaries"]
    assert p["uplinks"] == 3 and p["uplink_s"] > 3 * 8 * up["bases"] / 3 / 4800
    assert (up["codebooks"] > 0) == (projection["quantizer"] == "pq")
    assert (up["dictionaries"] > 0) == ("zstd_level" in projection)
    assert p["basis"]["method"] == projection.get("method", "pca")
    with sqlite3.connect(out / "store" / "samples.sqlite") as db:
        versions = dict(db.execute("SELECT basis, COUNT(*) FROM payloads GROUP BY basis"))
    n = scenario["dataset"]["train_subset"]
    if projection.get("method") == "supervised":  # each satellite's share went plain first
        assert versions == {0: 60, p["basis"]["version"]: n - 60}
        assert p["basis"]["fit_tokens"] == 60 and p["basis_waits"].get("fit", 0) >= 1
    else:
        assert versions == {p["basis"]["version"]: n}
        count, wire = _stored_wire_bytes(out / "store", scale_bytes=2)
        assert wire + b["downlink_credentials"] == b["downlink"]
        # 8 int4 bytes and a float16 scale a token, ids and labels: ~13 B an image
        assert (b["downlink"] - b["downlink_credentials"]) / n < 14


def test_projected_tokens_with_orbits_uplink_inside_contact_windows(tmp_path: Path) -> None:
    from sparsat.sim.scenario.schema import load
    from sparsat.sim.space import orbits

    _twin_tle(tmp_path / "twins.tle")
    scenario = {
        **{k: v for k, v in TINY.items() if k != "passes"},
        "name": "orbital_tokens", "dataset": {**TINY["dataset"], "train_subset": 240},
        "sensors": {**TINY["sensors"], "count": 2, "mask": {"kind": "none"},
                    "payload": {"kind": "cls", "cls_dtype": "int8", "projection": {
                        "dim": 16, "quantizer": "int4", "fit_images": 300}}},
        "mission": {"horizon_h": 24},
        "orbits": {"epoch": "2026-01-01T00:00:00Z", "tle": "twins.tle",
                   "stations": [{"name": "svalbard", "lat_deg": 78.23, "lon_deg": 15.39,
                                 "min_elevation_deg": 5, "antennas": 1}]},
        "links": {"downlink": {"rate_bps": 9600, "latency_s": 0.05},
                  "uplink": {"rate_bps": 1200, "latency_s": 0.05},
                  "trainer": TINY["links"]["trainer"]},
        "training": {**TINY["training"], "strategy": "centralized", "workers": 1, "epochs": 1},
    }
    path = _write(tmp_path, scenario)
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())

    b, p = results["bytes"], results["projection"]
    up = b["uplink_breakdown"]
    assert p["uplinks"] == 2 and results["samples"]["stored"] == 240
    # each uplink: the slant range / c and the link's latency, then its bytes at 1.2 kbit/s
    per = up["bases"] / 2
    assert p["uplink_s"] > 2 * (0.05 + 8 * per / 1200 + 500 / 299_792.458)
    station = results["stations"]["svalbard"]  # the uplink is on the antenna too
    assert station["bytes"] == b["downlink"] + b["uplink"]
    assert sum(results["per_link_bytes"].values()) == b["total"]
    s = load(path)
    windows = orbits.contact_windows(orbits.constellation(s), orbits.stations(s),
                                     s.orbits.epoch, 24 * 3600.0)
    first = min(c.start_s for c in windows)
    assert results["downlink_done_s"] > first + 8 * per / 1200  # nothing before the uplink
