"""Faults mission control survives, with real node processes (LocalCluster, TLS): a sensor
host killed mid-downlink that comes back, one that hangs for good, a ground-station restart
during training; and what it refuses: another scenario than the ground station's, queues
already empty, --resume without the ground station's checkpoint. Each recovery's wall
seconds are printed (pytest -s) and recorded in results.json's faults."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from sparsat.sim.deploy.launcher import LocalCluster
from sparsat.sim.mission.control import Deadlines, MissionControl, MissionError
from sparsat.sim.scenario.schema import Scenario, load

pytestmark = pytest.mark.slow

# 3 satellites, 2 on sensors-0 and 1 on sensors-1; a pass carries ~36 KB: several passes each
TINY: dict[str, Any] = {
    "name": "faults",
    "seed": 3,
    "dataset": {"name": "fashion_mnist", "train_subset": 480, "test_subset": 300},
    "sensors": {"count": 3, "per_process": 2, "mask": {"kind": "fixed", "ratio": 0.5},
                "payload": {"kind": "patches"}},
    "passes": {"period_s": 600, "duration_s": 30},
    "links": {"downlink": {"rate_bps": 9600, "latency_s": 0.05},
              "trainer": {"rate_bps": 1.0e8, "latency_s": 0.001}},
    "training": {"strategy": "ist", "workers": 2, "local_steps": 3, "epochs": 2,
                 "batch_size": 32, "hidden": [32, 24]},
}
FAST = Deadlines(call_s=10, register_s=60, node_ready_s=30, transmit_slack_s=3, gs_retry_s=60,
                 host_return_s=4, host_poll_s=0.5)


def _scenario(tmp_path: Path, **training: Any) -> tuple[Scenario, Path]:
    raw = json.loads(json.dumps(TINY))
    raw["training"].update(training)
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load(path), path


class FaultOnFirstTransmit(MissionControl):
    """Mission control that runs `fault` right after the first Transmit of `satellite`
    returns (its sensor host then fails for real: killed or stopped)."""

    def __init__(self, *args: Any, satellite: str, fault: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._fault_sat, self._fault, self.fault_at = satellite, fault, 0.0

    def _transmit(self, sat_id: str, budget: int) -> Any:
        report = super()._transmit(sat_id, budget)
        if sat_id == self._fault_sat and self._fault is not None:
            fault, self._fault = self._fault, None
            self.fault_at = time.monotonic()
            fault()
        return report


def test_a_sensor_host_killed_mid_downlink_comes_back_and_finishes_its_queue(
        tmp_path: Path) -> None:
    scenario, path = _scenario(tmp_path)
    with LocalCluster(scenario, path, tmp_path) as cluster:
        def kill_then_restart() -> None:
            cluster.kill("sensors-0")
            threading.Timer(2.0, cluster.restart, ["sensors-0"]).start()

        mc = FaultOnFirstTransmit(scenario, cluster.address, False, alive=cluster.check_alive,
                                  deadlines=FAST, satellite="sat-0", fault=kill_then_restart)
        results = mc.run()

    faults = [f for f in results["faults"] if f["fault"] == "sensor host unreachable"]
    assert [f["node"] for f in faults] == ["sensors-0"] and faults[0]["recovered"]
    assert faults[0]["new_address"] != faults[0]["address"]  # registered again, new port
    print(f"\nsensor host killed mid-downlink: back after {faults[0]['recovery_wall_s']} s")
    assert results["shortfall"] == {}
    # nothing lost, nothing stored twice: the returning host resent its queue, deduplicated
    assert results["samples"]["stored"] == results["samples"]["trained_on"] == 480
    assert len(results["history"]) == 2


def test_a_sensor_host_hung_for_good_ends_the_run_with_its_shortfall(tmp_path: Path) -> None:
    scenario, path = _scenario(tmp_path)
    with LocalCluster(scenario, path, tmp_path) as cluster:
        pid = cluster.procs["sensors-0"].pid
        mc = FaultOnFirstTransmit(scenario, cluster.address, False, alive=cluster.check_alive,
                                  deadlines=FAST, satellite="sat-0",
                                  fault=lambda: os.kill(pid, signal.SIGSTOP))
        try:
            results = mc.run()
        finally:
            os.kill(pid, signal.SIGCONT)
        ended = time.monotonic() - mc.fault_at

    short = results["shortfall"]
    assert sorted(short) == ["sat-0", "sat-1"]  # both satellites of the hung host
    assert all(v["host"] == "sensors-0" and v["undelivered"] > 0 for v in short.values())
    assert short["sat-1"]["undelivered"] == 160  # never sent: its whole shard
    stored = results["samples"]["stored"]
    assert stored + sum(v["undelivered"] for v in short.values()) == 480
    assert results["samples"]["trained_on"] == stored  # trained on what arrived
    print(f"\nsensor host hung for good: run went on, ended {ended:.1f} s after the fault, "
          f"{480 - stored} samples short")


def test_a_ground_station_restart_during_training_is_prepared_again_and_continues(
        tmp_path: Path) -> None:
    scenario, path = _scenario(tmp_path, epochs=3)
    restarted: list[float] = []
    with LocalCluster(scenario, path, tmp_path) as cluster:
        def after_epoch(h: dict[str, Any]) -> None:
            if h["epoch"] == 1:
                restarted.append(time.monotonic())
                cluster.restart("ground-station")  # the trainers register again by themselves

        results = MissionControl(scenario, cluster.address, False, alive=cluster.check_alive,
                                 deadlines=FAST, on_epoch=after_epoch).run()

    gs = [f for f in results["faults"] if f["fault"].startswith("ground station")]
    assert gs and all(f["recovered"] for f in gs)
    assert [h["epoch"] for h in results["history"]] == [1, 2, 3]
    assert results["samples"]["stored"] == 480  # the store survived the restart
    print(f"\nground station restarted after epoch 1: {gs}")


def test_refusals_scenario_mismatch_empty_queues_and_resume_without_checkpoint(
        tmp_path: Path) -> None:
    scenario, path = _scenario(tmp_path)
    other = scenario.model_copy(update={
        "training": scenario.training.model_copy(update={"epochs": 5}),
        "dataset": scenario.dataset.model_copy(update={"root": "/elsewhere"})})
    state = tmp_path / "mission_state.json"
    with LocalCluster(scenario, path, tmp_path) as cluster:
        with pytest.raises(MissionError) as e:
            MissionControl(other, cluster.address, False, deadlines=FAST).run()
        assert "training.epochs: 5 here, 2 at the ground station" in str(e.value)
        assert "root" not in str(e.value)  # a deployment's own key: not compared

        first = MissionControl(scenario, cluster.address, False, deadlines=FAST,
                               state_file=state).run()
        assert first["ground_station"]["scenario_fingerprint"]

        with pytest.raises(MissionError, match="queue was already empty.*480 stored"):
            MissionControl(scenario, cluster.address, False, deadlines=FAST).run()

        # the ground station comes back without its checkpoint; the mission had done 1 epoch
        saved = json.loads(state.read_text())
        state.write_text(json.dumps({**saved, "epochs_done": 1}))
        cluster.kill("ground-station")
        for f in (tmp_path / "checkpoint").glob("*"):
            f.unlink()
        cluster.restart("ground-station")  # the trainers register again by themselves
        with pytest.raises(MissionError, match="no training state.*1 epochs were done"):
            MissionControl(scenario, cluster.address, False, deadlines=FAST,
                           state_file=state, resume=True).run()
