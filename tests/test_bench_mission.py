"""Smoke test of bench/mission.py (--smoke): a tiny whole mission (real node processes with
their credentials, real gRPC over TLS) must report every stage's wall time and end with one
JSON line, also written to its --out."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from sparsat.node.data.masking import num_visible

BENCH = Path(__file__).resolve().parents[1] / "bench" / "mission.py"

pytestmark = pytest.mark.slow


def test_mission_bench_reports_every_stage(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("bench_mission", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "bench"
    figures = module.main(["--smoke", "--out", str(out)])
    lines = capsys.readouterr().out.strip().splitlines()
    res = json.loads(lines[-1])
    assert res == figures == json.loads((out / "bench_mission.json").read_text())
    assert (res["satellites"], res["images"], res["epochs"]) == (10, 300, 1)
    assert res["sensor_processes"] == 2 and res["processes"] == 5  # + ground station, 2 trainers
    assert res["samples_stored"] == 300 and res["test_images"] == 200
    # r = 0.5 patches: each image's visible 4x4 tiles and a little framing, well under the
    # whole images
    assert 300 * num_visible(49, 0.5) * 16 < res["downlink_bytes"] < 300 * 28 * 28 * 0.6
    walls = res["stage_wall_s"]
    assert set(walls) == {"startup", "contacts", "downlink", "prepare", "training", "report",
                          "shutdown"}
    assert all(v >= 0 for v in walls.values()) and walls["prepare"] > 0
    assert sum(walls.values()) <= res["total_wall_s"] + 0.5
    assert 0.2 < res["final_accuracy"] <= 1  # chance is 0.1
    assert (out / "certs" / "ground-station" / "token").exists()  # its nodes ran with credentials
    assert set(res["stage_cpu_s"]["prepare"]) >= {"ground-station", "mission-control"}
    assert (out / "results.json").exists() and (out / "scenario.yaml").exists()
    from sparsat.node.models.encoders import _cpu_flags

    assert set(res["cpu_flags"]) <= _cpu_flags()  # this CPU's, as /proc/cpuinfo says
    assert res["encoder_precision"]["asked"] == "float32"
    assert res["encoder_precision"]["ground_station"] == "float32"
    assert any(line.startswith("CPU: ") for line in lines)
    assert any(line.startswith("total") for line in lines)  # the stage table
