"""bench/results_diff.py: two runs' results.json compared figure by figure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparsat.bench import results_diff


def _run(folder: Path, results: dict[str, object]) -> Path:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))
    return folder


RESULTS = {"final_accuracy": 0.85, "wall_time_s": 12.0, "history": [{"accuracy": 0.8},
           {"accuracy": 0.85, "wall_s": 3.0}], "ground_station": {"peak_rss_mb": 900.0}}


def test_equal_runs_pass_whatever_their_wall_times(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    _run(tmp_path / "a" / "quick", RESULTS)
    _run(tmp_path / "b" / "quick", {**RESULTS, "wall_time_s": 99.0,
                                    "ground_station": {"peak_rss_mb": 1.0}})
    assert results_diff.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "quick: 3 figures compared, 0 differ"
    assert json.loads(out[-1]) == {"quick": {"compared": 3, "differ": 0}}


def test_a_changed_or_missing_figure_fails(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    a = _run(tmp_path / "a", RESULTS)
    b = _run(tmp_path / "b", {**RESULTS, "history": [{"accuracy": 0.8000001}]})
    assert results_diff.main([str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert ".history[0].accuracy: 0.8 -> 0.8000001" in out
    assert ".history[1].accuracy: 0.85 -> '<absent>'" in out


def test_a_missing_run_is_an_error(tmp_path: Path) -> None:
    _run(tmp_path / "a" / "quick", RESULTS)
    (tmp_path / "b").mkdir()
    with pytest.raises(SystemExit) as e:
        results_diff.main([str(tmp_path / "a"), str(tmp_path / "b")])
    assert e.value.code == 2
