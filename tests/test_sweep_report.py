"""Sweep outputs: sweep.csv rows from real and synthetic results, the paper's byte formula,
mean ± sd over seeds, the Pareto frontier, failed/missing points, and the figures."""

from __future__ import annotations

import copy
import csv
import json
import statistics
from pathlib import Path
from typing import Any

import pytest

from sparsat.sim.scenario.schema import load
from sparsat.sim.sweeps import report as sr

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "docs" / "masks_runs"


def scenario(name: str) -> dict[str, Any]:
    return load(ROOT / "scenarios" / f"{name}.yaml").model_dump(mode="json")


def results(name: str) -> dict[str, Any]:
    out: dict[str, Any] = json.loads((RUNS / f"{name}.json").read_text())
    return out


def with_(d: dict[str, Any], **dotted: Any) -> dict[str, Any]:
    """A deep copy of `d` with values set by dotted key (`sensors__mask__ratio`)."""
    d = copy.deepcopy(d)
    for key, value in dotted.items():
        *parents, last = key.split("__")
        cur = d
        for p in parents:
            cur = cur[p]
        cur[last] = value
    return d


def fake_results(acc: float, downlink: int, stored: int, sent: int | None = None,
                 sim_time: float = 100.0, best: float | None = None) -> dict[str, Any]:
    return {
        "final_accuracy": acc, "best_accuracy": acc if best is None else best,
        "bytes": {"downlink": downlink, "uplink": 10, "trainer": 1000, "total": downlink + 1010},
        "samples": {"sent": stored if sent is None else sent, "stored": stored},
        "sim_time_s": sim_time, "time_to_accuracy_s": None, "wall_time_s": 9.0,
    }


# --- rows --------------------------------------------------------------------------------


def test_row_from_committed_quickstart_run() -> None:
    res = results("quickstart")
    row = sr.point_row("p0", {"sensors.mask.kind": "fixed", "seed": 0}, scenario("quickstart"),
                       res, "done", 41.5)
    assert list(row) == ["point", "sensors.mask.kind", "seed", *sr.METRIC_COLUMNS,
                         "_timeline"]  # the last for timelines.png only, not in sweep.csv
    assert row["_timeline"] == [(h["sim_time_s"], h["accuracy"], h["downlink_bytes"])
                                for h in res.get("timeline", []) if h["event"] == "update"]
    assert row["final_accuracy"] == 0.8488
    assert row["downlink_bytes"] == 4752532
    assert row["downlink_bytes_per_image"] == pytest.approx(4752532 / 12000)
    assert row["downlink_bytes_per_sample"] == pytest.approx(4752532 / 12000)
    assert row["uplink_bytes"] == 320
    assert row["trainer_bytes"] == 300266545
    assert row["total_bytes"] == 305019397
    assert row["mission_time_s"] == res["sim_time_s"]
    assert row["time_to_target_s"] is None
    assert row["wall_time_s"] == 41.5
    assert row["paper_bytes_per_image"] == 1568.0  # 28 * 28 * 0.5 * 4
    assert row["measured_over_paper"] == pytest.approx(4752532 / 12000 / 1568)
    assert row["samples_sent"] == 12000
    assert row["rejected"] == 0


def test_random_masks_count_distinct_images_not_copies() -> None:
    row = sr.point_row("r", {}, scenario("random"), results("random"), "done", None)
    # 60,000 stored samples are 5 epochs' copies of 12,000 images
    assert row["downlink_bytes_per_image"] == pytest.approx(23762724 / 12000)
    assert row["downlink_bytes_per_sample"] == pytest.approx(23762724 / 60000)
    assert row["paper_bytes_per_image"] == 1568.0
    assert row["wall_time_s"] == results("random")["wall_time_s"]  # no wall_s: the run's


def test_clouds_per_image_uses_images_stored() -> None:
    row = sr.point_row("c", {}, scenario("clouds"), results("clouds"), "done", 1.0)
    assert row["downlink_bytes_per_image"] == pytest.approx(1381610 / 8240)
    assert row["paper_bytes_per_image"] == 1568.0  # the formula fed the configured r


@pytest.mark.parametrize("changes, expected", [
    ({"sensors__mask__ratio": 0.75}, 28 * 28 * 0.25 * 4),  # 784
    ({"sensors__mask__ratio": 0.9}, 313.6),
    ({"sensors__mask__kind": "none"}, 28 * 28 * 4),  # r has no effect without a mask
    ({"dataset__name": "cifar10"}, 32 * 32 * 0.5 * 4),  # 2048: colour channels left out
    ({"dataset__name": "eurosat"}, 64 * 64 * 0.5 * 4),
    ({"dataset__name": "imagefolder"}, None),
    ({"sensors__payload__kind": "cls"}, 768.0),  # 192 * 4, the default encoder
    ({"sensors__payload__kind": "cls", "sensors__payload__cls_dtype": "int8"}, 768.0),
    ({"sensors__payload__kind": "cls", "encoder__name": "mae_vit_base_patch16"}, 3072.0),
])
def test_paper_formula(changes: dict[str, Any], expected: float | None) -> None:
    assert sr.paper_bytes_per_image(with_(scenario("quickstart"), **changes)) == expected


@pytest.mark.parametrize("status", ["failed", "missing"])
def test_failed_and_missing_rows_are_empty(status: str) -> None:
    row = sr.point_row("p", {"seed": 1}, scenario("quickstart"), None, status, None)
    assert row["status"] == status
    assert row["paper_bytes_per_image"] == 1568.0  # from the scenario alone
    for col in sr.METRIC_COLUMNS:
        if col not in ("status", "paper_bytes_per_image"):
            assert row[col] is None, col


def test_bad_status_is_refused() -> None:
    with pytest.raises(ValueError, match="status"):
        sr.point_row("p", {}, scenario("quickstart"), None, "running", None)


# --- statistics and frontier ---------------------------------------------------------------


def synthetic_rows() -> list[dict[str, object]]:
    """Two ratios x 3 seeds of fixed masks on Fashion-MNIST, seed 2 of r=0.75 failed, plus a
    random-mask configuration whose only point is missing."""
    base = scenario("quickstart")
    accs: dict[float, list[float | None]] = {0.5: [0.80, 0.82, 0.84], 0.75: [0.70, 0.74, None]}
    rows: list[dict[str, object]] = []
    for ratio, seeds in accs.items():
        for seed, acc in enumerate(seeds):
            sc = with_(base, sensors__mask__ratio=ratio, seed=seed)
            ov: dict[str, object] = {"sensors.mask.kind": "fixed", "sensors.mask.ratio": ratio,
                                     "seed": seed}
            name = f"fixed-r{ratio}-s{seed}"
            if acc is None:
                rows.append(sr.point_row(name, ov, sc, None, "failed", 3.0))
                continue
            downlink = 1000 * (400 if ratio == 0.5 else 200) + 1000 * seed
            rows.append(sr.point_row(name, ov, sc, fake_results(acc, downlink, 1000,
                                                                sim_time=100.0 + seed),
                                     "done", 10.0 + seed))
    sc = with_(base, sensors__mask__kind="random")
    rows.append(sr.point_row("random-r0.5-s0", {"sensors.mask.kind": "random",
                                                "sensors.mask.ratio": 0.5, "seed": 0},
                             sc, None, "missing", None))
    return rows


GRID = ["sensors.mask.kind", "sensors.mask.ratio", "seed"]


def test_mean_sd_over_seeds_skip_failed_and_missing() -> None:
    configs = sr.group(synthetic_rows(), GRID)
    assert [c.values for c in configs] == [
        {"sensors.mask.kind": "fixed", "sensors.mask.ratio": 0.5},
        {"sensors.mask.kind": "fixed", "sensors.mask.ratio": 0.75},
        {"sensors.mask.kind": "random", "sensors.mask.ratio": 0.5},
    ]
    half, quarter, rnd = configs
    assert len(half.done) == 3 and len(quarter.done) == 2 and len(rnd.done) == 0
    assert half.mean("final_accuracy") == pytest.approx(0.82)
    assert half.sd("final_accuracy") == pytest.approx(0.02)  # sample sd, ddof=1
    assert quarter.mean("final_accuracy") == pytest.approx(0.72)
    assert quarter.sd("final_accuracy") == pytest.approx(statistics.stdev([0.70, 0.74]))
    assert quarter.sd("final_accuracy") == pytest.approx(0.02 * 2**0.5)
    assert half.mean("downlink_bytes_per_image") == pytest.approx(401.0)  # 400, 401, 402
    assert quarter.mean("wall_time_s") == pytest.approx(10.5)  # the failed 3.0 left out
    assert quarter.paper() == 784.0
    assert quarter.measured_over_paper() == pytest.approx(200.5 / 784)
    assert rnd.mean("final_accuracy") is None and rnd.sd("final_accuracy") is None
    assert sr.mean_sd(half, "final_accuracy", 4) == "0.8200 ± 0.0200"
    assert sr.mean_sd(rnd, "final_accuracy", 4) == "—"


def test_sd_is_a_dash_with_one_seed() -> None:
    row = sr.point_row("a", {"seed": 0}, scenario("quickstart"),
                       fake_results(0.5, 1000, 10), "done", 1.0)
    (c,) = sr.group([row], ["seed"])
    assert sr.mean_sd(c, "final_accuracy", 4) == "0.5000 ± —"


def test_pareto_on_a_hand_made_example() -> None:
    #        0: cheap, poor  1: dominated by 0   2: mid   3: dominated by 2  4: best, dear
    pts = [(100.0, 0.60), (150.0, 0.55), (200.0, 0.80), (300.0, 0.80), (1000.0, 0.85),
           (100.0, 0.50)]  # 5: same bytes as 0, worse
    assert sr.pareto(pts) == [0, 2, 4]
    assert sr.pareto([]) == []
    assert sr.pareto([(5.0, 0.1), (5.0, 0.1)]) == [0]  # ties: the first


def test_frontier_of_configurations() -> None:
    configs = sr.group(synthetic_rows(), GRID)
    # r=0.75: fewer bytes (200.5/image), lower accuracy; r=0.5: more bytes, higher: both on it
    assert [c.values["sensors.mask.ratio"] for c in sr.frontier(configs)] == [0.75, 0.5]


def test_short_labels() -> None:
    keys = ["sensors.mask.kind", "sensors.payload.kind", "sensors.mask.ratio"]
    assert sr.short_names(keys) == {"sensors.mask.kind": "mask.kind",
                                    "sensors.payload.kind": "payload.kind",
                                    "sensors.mask.ratio": "ratio"}


# --- files ---------------------------------------------------------------------------------


def test_write_outputs(tmp_path: Path) -> None:
    rows = synthetic_rows()
    paths = sr.write_outputs(tmp_path, rows, GRID)
    names = [p.name for p in paths]
    assert names == ["sweep.csv", "summary.md", "accuracy_vs_bytes.png",
                     "accuracy_vs_ratio.png", "accuracy_vs_mission_time.png"]
    for p in paths:
        assert p.exists() and p.stat().st_size > 0
    for p in paths[2:]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with open(tmp_path / "sweep.csv", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        body = list(reader)
    assert header == ["point", *GRID, *sr.METRIC_COLUMNS]
    assert len(body) == len(rows)
    back = sr.read_csv(tmp_path / "sweep.csv")
    assert back == [{c: row.get(c) for c in header} for row in rows]  # exact round trip

    md = (tmp_path / "summary.md").read_text()
    assert "7 points: 5 done, 1 failed, 1 missing." in md
    assert "| fixed | 0.5 | 3 | 0.8200 ± 0.0200 |" in md
    assert "| fixed | 0.75 | 2 | 0.7200 ± 0.0283 |" in md
    assert "| random | 0.5 | 0 | — |" in md
    assert "| 1,568.0 |" in md and "| 784.0 |" in md
    assert "`fixed-r0.75-s2`: failed" in md and "`random-r0.5-s0`: missing" in md
    front = md.split("## Pareto frontier")[1].split("##")[0]
    assert "kind=fixed ratio=0.75: 200.5 B/image" in front
    assert "kind=fixed ratio=0.5: 401.0 B/image" in front
    assert "random" not in front
    assert "float32" in md and "colour channels" in md
    # deterministic: the same rows give the same files
    again = tmp_path / "again"
    sr.write_outputs(again, rows, GRID)
    for name in ("sweep.csv", "summary.md"):
        assert (again / name).read_text() == (tmp_path / name).read_text()


def test_figures_skipped_when_their_axis_is_not_varied(tmp_path: Path) -> None:
    # only seeds vary: one configuration, no figure is meaningful
    rows = [sr.point_row(f"s{s}", {"seed": s}, scenario("quickstart"),
                         fake_results(0.8 + s / 100, 1000, 10), "done", 1.0) for s in range(2)]
    paths = sr.write_outputs(tmp_path / "one", rows, ["seed"])
    assert [p.name for p in paths] == ["sweep.csv", "summary.md"]
    assert "| 2 | 0.8050 ± 0.0071 |" in (tmp_path / "one" / "summary.md").read_text()

    # payload varies, ratio does not: no accuracy_vs_ratio.png
    rows = []
    for kind, res in (("patches", "quickstart"), ("cls", "quickstart")):
        sc = with_(scenario("quickstart"), sensors__payload__kind=kind)
        rows.append(sr.point_row(kind, {"sensors.payload.kind": kind}, sc,
                                 results(res) if kind == "patches"
                                 else fake_results(0.7, 12000 * 400, 12000), "done", 1.0))
    paths = sr.write_outputs(tmp_path / "payload", rows, ["sensors.payload.kind"])
    assert [p.name for p in paths] == ["sweep.csv", "summary.md", "accuracy_vs_bytes.png",
                                       "accuracy_vs_mission_time.png"]
    md = (tmp_path / "payload" / "summary.md").read_text()
    assert "| cls | 1 | 0.7000 ± — |" in md and "| 768.0 |" in md


def test_committed_runs_as_a_sweep(tmp_path: Path) -> None:
    """The three committed mask runs as one sweep over sensors.mask.kind."""
    rows = [sr.point_row(name, {"sensors.mask.kind": scenario(name)["sensors"]["mask"]["kind"]},
                         scenario(name), results(name), "done", None)
            for name in ("quickstart", "random", "clouds")]
    paths = sr.write_outputs(tmp_path, rows, ["sensors.mask.kind"])
    assert (tmp_path / "accuracy_vs_bytes.png") in paths
    md = (tmp_path / "summary.md").read_text()
    assert "3 points: 3 done, 0 failed, 0 missing." in md
    front = md.split("## Pareto frontier")[1].split("##")[0]
    # clouds is the cheapest, fixed beats random on bytes, random the best accuracy
    assert front.index("kind=clouds") < front.index("kind=fixed") < front.index("kind=random")


def test_streaming_points_get_their_timelines_drawn(tmp_path: Path) -> None:
    rows = []
    for k, ratio in enumerate((0.0, 0.5)):
        row = sr.point_row(f"p{k}", {"sensors.mask.ratio": ratio}, scenario("quickstart"),
                           None, "done", 1.0)
        row.update(final_accuracy=0.8, downlink_bytes_per_image=400.0 * (k + 1),
                   _timeline=[(3600.0 * i, 0.5 + 0.1 * i, 1000 * i) for i in range(1, 4)])
        rows.append(row)
    names = [p.name for p in sr.write_outputs(tmp_path, rows, ["sensors.mask.ratio"])]
    assert "timelines.png" in names and (tmp_path / "timelines.png").stat().st_size > 0
    assert "_timeline" not in (tmp_path / "sweep.csv").read_text()
