"""`sparsat sweep`: grid expansion, validation, sharding, resume and collection.

The expansion and validation tests run no mission; the end-to-end ones run tiny points as
real `sparsat run` processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from sparsat.sim.cli import main
from sparsat.sim.sweeps import runner as sw

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "name": "tiny",
    "seed": 3,
    "dataset": {"name": "fashion_mnist", "train_subset": 120, "test_subset": 100},
    "sensors": {"count": 2, "per_process": 2, "mask": {"kind": "fixed", "ratio": 0.5},
                "payload": {"kind": "patches"}},
    "passes": {"period_s": 600, "duration_s": 60},
    "links": {"downlink": {"rate_bps": 100000, "latency_s": 0.01},
              "trainer": {"rate_bps": 1.0e8, "latency_s": 0.001}},
    "training": {"strategy": "ist", "workers": 2, "local_steps": 2, "epochs": 1,
                 "batch_size": 32, "hidden": [16, 16]},
}


def _files(tmp_path: Path, sweep: dict[str, Any], base: dict[str, Any] | None = None) -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base or TINY))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": "base.yaml", **sweep}, sort_keys=False))
    return path


def test_grid_zip_and_exclude_expand_in_order(tmp_path: Path) -> None:
    spec = sw.load_sweep(_files(tmp_path, {
        "name": "g",
        "set": {"training.epochs": 2},
        "grid": {"sensors.mask.kind": ["fixed", "random"],
                 "sensors.mask.ratio": [0.25, 0.5, 0.75],
                 "sensors.payload.kind": ["patches", "cls"],
                 "sensors.payload.cls_dtype": [None, "int8"],
                 "seed": [0, 1]},
        "zip": [["sensors.payload.kind", "sensors.payload.cls_dtype"]],
        "exclude": [{"sensors.mask.kind": "random", "sensors.mask.ratio": [0.25, 0.75]}],
    }))
    # 2 kinds x 3 ratios x 2 payloads (zipped) x 2 seeds, less random at 0.25 and 0.75
    assert len(spec.points) == 2 * 3 * 2 * 2 - 2 * 2 * 2 == 16
    assert spec.grid_keys == ["sensors.mask.kind", "sensors.mask.ratio",
                              "sensors.payload.kind", "sensors.payload.cls_dtype", "seed"]
    first = spec.points[0]
    assert first.overrides == {"sensors.mask.kind": "fixed", "sensors.mask.ratio": 0.25,
                               "sensors.payload.kind": "patches",
                               "sensors.payload.cls_dtype": None, "seed": 0}
    # the last key varies fastest; zipped keys go together
    assert [p.overrides["seed"] for p in spec.points[:2]] == [0, 1]
    pairs = {(p.overrides["sensors.payload.kind"], p.overrides["sensors.payload.cls_dtype"])
             for p in spec.points}
    assert pairs == {("patches", None), ("cls", "int8")}
    assert not any(p.overrides["sensors.mask.kind"] == "random"
                   and p.overrides["sensors.mask.ratio"] != 0.5 for p in spec.points)
    # overrides and `set` reach the resolved scenario; null leaves the default
    cls = next(p for p in spec.points if p.overrides["sensors.payload.kind"] == "cls")
    assert cls.resolved["sensors"]["payload"] == {"kind": "cls", "cls_dtype": "int8",
                                                  "projection": None, "codec": None}
    assert first.resolved["sensors"]["payload"]["cls_dtype"] == "float16"
    assert first.resolved["training"]["epochs"] == 2
    assert first.resolved["name"] == first.name == (
        "mask.kind=fixed_ratio=0.25_payload.kind=patches_cls_dtype=None_seed=0")
    assert len({p.name for p in spec.points}) == 16


@pytest.mark.parametrize("sweep, match", [
    ({"grid": {"sensors.mask.ratio": [0.5, 1.5]}},
     r"(?s)point ratio=1.5: .*sensors.mask.ratio.*less than 1"),
    ({"grid": {"training.no_such_key": [1]}}, r"(?s)point no_such_key=1: .*no_such_key"),
    ({"grid": {"seed": []}}, r"grid.seed must be a non-empty list"),
    ({"grid": {"seed": [0]}, "zip": [["seed", "training.epochs"]]},
     r"zip keys \['training.epochs'\] are not in the grid"),
    ({"grid": {"seed": [0, 1], "training.epochs": [1]}, "zip": [["seed", "training.epochs"]]},
     r"zipped keys need lists of one length"),
    ({"grid": {"seed": [0]}, "exclude": [{"training.lr": 1}]},
     r"exclude keys \['training.lr'\] are neither in the grid nor `set`"),
    ({"grid": {"seed": [0]}, "colour": "blue"}, r"unknown keys \['colour'\]"),
    ({"grid": {"seed": [0]}, "exclude": [{"seed": 0}]}, r"every point is excluded"),
])
def test_bad_sweeps_are_refused_before_anything_runs(
        tmp_path: Path, sweep: dict[str, Any], match: str) -> None:
    with pytest.raises(sw.SweepError, match=match):
        sw.load_sweep(_files(tmp_path, sweep))
    assert not (tmp_path / "points").exists()


def test_dry_run_prints_the_points_and_runs_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _files(tmp_path, {"grid": {"seed": [0, 1, 2]}})
    assert main(["sweep", str(path), "--dry-run", "--out", str(tmp_path / "out")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == ["seed=0\tseed=0", "seed=1\tseed=1", "seed=2\tseed=2"]
    assert not (tmp_path / "out").exists()


def test_shards_are_disjoint_and_cover_the_grid(tmp_path: Path) -> None:
    spec = sw.load_sweep(_files(tmp_path, {"grid": {"seed": list(range(7)),
                                                    "training.epochs": [1, 2]}}))
    shards = [sw.shard(spec.points, f"{i}/3") for i in range(3)]
    names = [p.name for s in shards for p in s]
    assert sorted(names) == sorted(p.name for p in spec.points) and len(set(names)) == 14
    assert [len(s) for s in shards] == [5, 5, 4]
    assert [p.name for p in sw.shard(spec.points, "1/3")] == [p.name for p in shards[1]]
    for bad in ("3/3", "1", "a/b", "-1/2"):
        with pytest.raises(sw.SweepError, match="--shard takes i/n"):
            sw.shard(spec.points, bad)


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_redoing_points(tmp_path: Path) -> None:
    path = _files(tmp_path, {"name": "resume", "grid": {"seed": [0, 1, 2]}})
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "sparsat.sim.cli", "sweep", str(path), "--out", str(out),
           "--quiet",
           "--no-token-cache"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:  # kill the sweep once its first point is done
        deadline = time.monotonic() + 240
        while not list(out.glob("points/*/run/results.json")):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        import os

        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = {p.parent.parent.name: p.stat().st_mtime_ns
            for p in out.glob("points/*/run/results.json")}
    assert 1 <= len(done) < 3

    assert main(["sweep", str(path), "--out", str(out), "--quiet", "--no-token-cache"]) == 0

    status = json.loads((out / "sweep_status.json").read_text())
    assert status["skipped"] == len(done) and status["run"] == 3 - len(done)
    for name, mtime in done.items():  # not run again
        assert (out / "points" / name / "run" / "results.json").stat().st_mtime_ns == mtime
    rows = (out / "sweep.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3 and all(",done," in r for r in rows[1:])
    # a third run does nothing at all
    assert main(["sweep", str(path), "--out", str(out), "--quiet", "--no-token-cache"]) == 0
    assert json.loads((out / "sweep_status.json").read_text())["run"] == 0


@pytest.mark.slow
def test_shards_run_apart_and_collect_together(tmp_path: Path) -> None:
    path = _files(tmp_path, {"name": "sharded", "grid": {"seed": [0, 1],
                                                         "training.epochs": [1]}})
    dirs = [tmp_path / f"shard{i}" for i in range(2)]
    for i, d in enumerate(dirs):
        assert main(["sweep", str(path), "--out", str(d), "--shard", f"{i}/2", "--quiet",
                     "--no-token-cache"]) == 0
        assert not (d / "sweep.csv").exists()  # a shard alone writes no summary
    assert main(["sweep", str(path), "--collect", *map(str, dirs),
                 "--out", str(tmp_path / "all")]) == 0
    rows = (tmp_path / "all" / "sweep.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and all(",done," in r for r in rows[1:])
    assert (tmp_path / "all" / "summary.md").stat().st_size > 0
    # changing the scenario makes a point not done any more: it would run again
    spec = sw.load_sweep(path)
    assert all(sw.is_done(dirs[i], p) for i in range(2) for p in sw.shard(spec.points,
                                                                        f"{i}/2"))
    other = sw.Point(spec.points[0].name, spec.points[0].overrides,
                     {**spec.points[0].resolved, "seed": 99})
    assert not any(sw.is_done(d, other) for d in dirs)


@pytest.mark.parametrize("spec", sorted((Path(__file__).parents[1] / "sweeps").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_shipped_sweep_expands_into_valid_scenarios(spec: Path) -> None:
    sweep = sw.load_sweep(spec)  # every point's scenario validated
    assert sweep.points
