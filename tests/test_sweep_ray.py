"""`sparsat sweep --executor ray` on a local Ray instance: points as Ray tasks, their files
brought back to the sweep's folder, a failing point reported alone, done points skipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sim import sweep as sw
from sim.cli import main

pytest.importorskip("ray")
pytestmark = pytest.mark.slow

BASE = {
    "name": "tiny", "seed": 3,
    "dataset": {"name": "fashion_mnist", "train_subset": 120, "test_subset": 100},
    "sensors": {"count": 2, "per_process": 2, "mask": {"kind": "fixed", "ratio": 0.5}},
    "passes": {"period_s": 600, "duration_s": 60},
    "links": {"downlink": {"rate_bps": 100000, "latency_s": 0.01},
              "trainer": {"rate_bps": 1.0e8, "latency_s": 0.001}},
    "training": {"strategy": "ist", "workers": 2, "local_steps": 2, "epochs": 1,
                 "batch_size": 32, "hidden": [16, 16]},
}


def test_ray_executor_runs_points_and_reports_a_failure_alone(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    sweep = tmp_path / "sweep.yaml"
    # the third point's dataset folder does not exist: its run fails at start
    sweep.write_text(yaml.safe_dump({
        "name": "ray", "base": "base.yaml",
        "grid": {"dataset.name": ["fashion_mnist", "fashion_mnist", "imagefolder"],
                 "dataset.root": [None, None, str(tmp_path / "no-such-folder")],
                 "seed": [0, 1, 0]},
        "zip": [["dataset.name", "dataset.root", "seed"]]}, sort_keys=False))
    out = tmp_path / "out"
    args = ["sweep", str(sweep), "--out", str(out), "--executor", "ray", "--jobs", "2",
            "--quiet"]

    assert main(args) == 1  # one point failed

    spec = sw.load_sweep(sweep)
    done = [p for p in spec.points if sw.is_done(out, p)]
    assert [p.overrides["seed"] for p in done] == [0, 1]
    for p in done:  # the files came back from the Ray task into the sweep's folder
        results = json.loads((out / "points" / p.name / "run" / "results.json").read_text())
        assert results["samples"]["stored"] == 120
    failed = next(p for p in spec.points if p not in done)
    status = json.loads((out / "points" / failed.name / "status.json").read_text())
    assert status["status"] == "failed" and status["error"]
    rows = (out / "sweep.csv").read_text().strip().splitlines()
    assert sum(",done," in r for r in rows) == 2 and sum(",failed," in r for r in rows) == 1

    assert main(args) == 1  # again: only the failed point runs
    assert json.loads((out / "sweep_status.json").read_text())["run"] == 1
