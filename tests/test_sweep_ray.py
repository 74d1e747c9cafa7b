"""The Ray executor of `sparsat sweep` on a local Ray instance (sparsat.sim.sweeps.ray_executor)."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from sparsat.sim.cli import main
from sparsat.sim.sweeps import runner as sw
from sparsat.sim.sweeps.ray_executor import RayExecutorError, ray_executor

# smaller than test_end_to_end's TINY: one sensor, one trainer, one epoch
TINY = {
    "name": "tiny",
    "seed": 0,
    "dataset": {"name": "fashion_mnist", "train_subset": 96, "test_subset": 100},
    "sensors": {"count": 1, "per_process": 1, "mask": {"kind": "fixed", "ratio": 0.5},
                "payload": {"kind": "patches"}},
    "passes": {"period_s": 600, "duration_s": 30},
    "links": {"downlink": {"rate_bps": 9600, "latency_s": 0.05},
              "trainer": {"rate_bps": 1.0e8, "latency_s": 0.001}},
    "training": {"strategy": "centralized", "workers": 1, "epochs": 1, "batch_size": 32,
                 "hidden": [16, 8]},
}


def _sweep_file(tmp_path: Path, body: dict[str, Any]) -> Path:
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "raytest", "base": "tiny.yaml", **body}))
    return path


def _run(out: Path, points: list[sw.Point], jobs: int = 2) -> dict[str, dict[str, Any]]:
    statuses: dict[str, dict[str, Any]] = {}

    def on_done(point: sw.Point, status: dict[str, Any]) -> None:
        assert point.name not in statuses  # once per point
        statuses[point.name] = status

    for p in points:
        sw.prepare_point(out, p)
    ray_executor(out, jobs, out / "token_cache", None)(points, on_done)
    return statuses


# ---- without a Ray instance (these first: the fixture below keeps one up till the end) ------


def test_missing_ray_is_a_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails
    with pytest.raises(RayExecutorError, match=r"pip install 'sparsat\[ray\]'"):
        ray_executor(tmp_path, 1, None, None)
    sweep = _sweep_file(tmp_path, {"grid": {"seed": [0]}})
    assert main(["sweep", str(sweep), "--out", str(tmp_path / "out"), "--executor", "ray",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'sparsat[ray]'" in err and "Traceback" not in err


def test_unreachable_cluster_names_the_address(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    spec = sw.load_sweep(_sweep_file(tmp_path, {"grid": {"seed": [0]}}))
    for address in ("127.0.0.1:1", "ray://127.0.0.1:1"):
        execute = ray_executor(tmp_path, 1, None, address)
        with pytest.raises(RayExecutorError, match=f"Ray cluster at '{address}'"):
            execute(spec.points, lambda p, s: None)
    assert not ray.is_initialized()


# ---- on a local Ray instance ----------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray() -> Iterator[Any]:
    """A local Ray whose workers run at this process's priority: Ray starts them at nice 15
    by default, so on a machine whose cores another job keeps busy the points got about 3 %
    of a core and these tests took many times their length (what they test is the sweep's
    logic, not Ray's scheduling)."""
    import os

    ray = pytest.importorskip("ray")
    before = os.environ.get("RAY_worker_niceness")
    os.environ["RAY_worker_niceness"] = "0"  # read by the raylet that init starts
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning")
    finally:
        if before is None:
            del os.environ["RAY_worker_niceness"]
        else:
            os.environ["RAY_worker_niceness"] = before
    try:
        yield ray
    finally:
        ray.shutdown()


def test_ray_workers_run_at_the_tests_priority(local_ray: Any) -> None:
    import os

    @local_ray.remote
    def niceness() -> int:
        return os.nice(0)

    assert local_ray.get(niceness.remote(), timeout=120) == os.nice(0)


def test_task_errors_and_dead_workers_fail_their_point_only(
        tmp_path: Path, local_ray: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A task that raises and one whose worker dies are failed points; the sweep goes on and
    a finished task's files land where is_done looks. (No `sparsat run` here: a stand-in.)"""
    import os

    spec = sw.load_sweep(_sweep_file(tmp_path, {"grid": {"seed": [0, 1, 2]}}))

    def stand_in(point: sw.Point, token_cache: str | None) -> dict[str, Any]:
        seed = point.overrides["seed"]
        if seed == 1:
            raise RuntimeError("boom in the task")
        if seed == 2:
            os._exit(3)  # the worker dies
        return {"status": {"status": "done", "wall_s": 0.1, "error": "", "node": "n"},
                "files": {"run/results.json": b"{}", "run/config.yaml": point.yaml.encode(),
                          "run.log": b"ran\n", "../escape.txt": b"never written"}}

    monkeypatch.setattr("sparsat.sim.sweeps.ray_executor.run_on_node", stand_in)
    out = tmp_path / "out"
    statuses = _run(out, spec.points, jobs=0)
    by_seed = {p.overrides["seed"]: statuses[p.name] for p in spec.points}
    assert by_seed[0]["status"] == "done"
    assert by_seed[1]["status"] == "failed" and "boom in the task" in by_seed[1]["error"]
    assert by_seed[2]["status"] == "failed" and by_seed[2]["error"]
    done, raised, died = spec.points
    assert sw.is_done(out, done) and not sw.is_done(out, raised) and not sw.is_done(out, died)
    assert (sw.point_dir(out, done) / "run.log").read_text() == "ran\n"
    assert not (out / "points" / "escape.txt").exists()
    for p in spec.points:
        record = json.loads((sw.point_dir(out, p) / "status.json").read_text())
        assert record["status"] == statuses[p.name]["status"]


@pytest.mark.slow
def test_ray_sweep_runs_resumes_and_collects(tmp_path: Path, local_ray: Any) -> None:
    sweep = _sweep_file(tmp_path, {"grid": {"seed": [0, 1]}})
    out = tmp_path / "out"
    args = ["sweep", str(sweep), "--out", str(out), "--executor", "ray", "--jobs", "2",
            "--quiet"]
    assert main(args) == 0
    spec = sw.load_sweep(sweep)
    assert len(spec.points) == 2
    for p in spec.points:
        run = sw.point_dir(out, p) / "run"
        assert json.loads((run / "results.json").read_text())["history"]
        assert (run / "config.yaml").exists() and (run / "history.csv").exists()
        assert list(run.glob("*.png"))
        assert not (run / "store").exists()  # stays on the node
        assert (sw.point_dir(out, p) / "run.log").stat().st_size > 0
        status = json.loads((sw.point_dir(out, p) / "status.json").read_text())
        assert status["status"] == "done" and status["node"]
        assert sw.is_done(out, p)
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {r["status"] for r in rows} == {"done"}

    stamps = {p.name: (sw.point_dir(out, p) / "run" / "results.json").stat().st_mtime_ns
              for p in spec.points}
    assert main(args) == 0  # resumed: nothing left to run
    assert json.loads((out / "sweep_status.json").read_text())["skipped"] == 2
    for p in spec.points:
        assert (sw.point_dir(out, p) / "run" / "results.json").stat().st_mtime_ns \
            == stamps[p.name]


@pytest.mark.slow
def test_ray_sweep_reports_a_failed_point(tmp_path: Path, local_ray: Any) -> None:
    """A point whose dataset is missing fails at the start of its run; the other is done."""
    sweep = _sweep_file(tmp_path, {
        "grid": {"dataset.name": ["fashion_mnist", "imagefolder"],
                 "dataset.root": [None, str(tmp_path / "no-such-dataset")]},
        "zip": [["dataset.name", "dataset.root"]]})
    spec = sw.load_sweep(sweep)
    out = tmp_path / "out"
    statuses = _run(out, spec.points)
    good, bad = spec.points
    assert statuses[good.name]["status"] == "done" and sw.is_done(out, good)
    assert statuses[bad.name]["status"] == "failed" and not sw.is_done(out, bad)
    assert "exit code" in statuses[bad.name]["error"]
    assert "no-such-dataset" in (sw.point_dir(out, bad) / "run.log").read_text()
    record = json.loads((sw.point_dir(out, bad) / "status.json").read_text())
    assert record["status"] == "failed" and record["error"] == statuses[bad.name]["error"]
    assert [p for p in spec.points if not sw.is_done(out, p)] == [bad]  # a rerun runs it only
