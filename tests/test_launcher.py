"""The local launcher stops every node process, also when the run fails."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sparsat.sim.cli import main
from sparsat.sim.deploy.launcher import LocalCluster
from sparsat.sim.scenario.schema import load

pytestmark = pytest.mark.slow


def test_children_stopped_when_the_body_raises(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({
        "name": "stop", "dataset": {"train_subset": 64, "test_subset": 64},
        "sensors": {"count": 2, "per_process": 1},
        "training": {"strategy": "ist", "workers": 2, "hidden": [8, 8]}}))
    cluster = LocalCluster(load(path), path, tmp_path)

    with pytest.raises(RuntimeError, match="boom"), cluster:
        assert len(cluster.procs) == 5  # ground station, 2 trainers, 2 sensor hosts
        raise RuntimeError("boom")

    assert all(p.poll() is not None for p in cluster.procs.values())


def test_missing_dataset_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({
        "name": "nodata",
        "dataset": {"name": "cifar10", "root": str(tmp_path / "empty"), "download": False}}))

    code = main(["run", str(path), "--out", str(tmp_path / "out"), "--quiet"])

    assert code == 2
    err = capsys.readouterr().err
    assert "ground-station exited" in err and "CIFAR" in err
