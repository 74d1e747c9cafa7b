"""Content-aware tile choice (sparsat.node.data.masking, choice: content): the kept tokens are
those of highest tile variance, ties by a seeded order; what it costs on board; the test
split's cache key and the scenario's checks follow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sparsat.ground_station.encoding import eval_key
from sparsat.node.data.clouds import CloudSpec
from sparsat.node.data.config import SensorConfig
from sparsat.node.data.datasets import DatasetSpec
from sparsat.node.data.masking import (
    MaskSpec,
    capture,
    num_visible,
    score_flops,
    tile_scores,
    visible_indices,
)
from sparsat.node.data.tiles import tile_edges
from sparsat.sim.scenario.configs import mask_spec
from sparsat.sim.scenario.schema import ScenarioError, load

GRID = 7  # 28 x 28 images, 4 x 4 tiles


def _ranked_image(order: np.ndarray) -> np.ndarray:
    """28 x 28 x 1: tile order[k] is a checkerboard of amplitude 2k + 1 around 100, so its
    variance is (2k + 1)^2 and the tiles rank exactly as `order` says (last: highest)."""
    image = np.full((28, 28, 1), 100, dtype=np.uint8)
    board = np.where((np.arange(4)[:, None] + np.arange(4)[None, :]) % 2 == 0, 1, -1)
    for k, t in enumerate(order.tolist()):
        r, c = divmod(t, GRID)
        image[4 * r : 4 * r + 4, 4 * c : 4 * c + 4, 0] = 100 + (2 * k + 1) * board
    return image


def test_tile_scores_are_each_tiles_variance_on_an_uneven_tiling() -> None:
    # Prepare: 30 x 29 x 3 on a 7 x 7 grid: tiles of 4 and 5 rows, 4 and 5 columns
    image = np.random.default_rng(0).integers(0, 256, (30, 29, 3), dtype=np.uint8)
    ys, xs = tile_edges(30, GRID), tile_edges(29, GRID)

    # Execute
    scores = tile_scores(image, GRID)

    # Assert
    expected = [image[ys[r]:ys[r + 1], xs[c]:xs[c + 1]].astype(np.float64).var()
                for r in range(GRID) for c in range(GRID)]
    np.testing.assert_allclose(scores, expected, rtol=1e-12)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.9])
def test_content_keeps_exactly_the_highest_variance_tiles(ratio: float) -> None:
    # Prepare: a known ranking of the 49 tiles
    order = np.random.default_rng(3).permutation(49)
    image = _ranked_image(order)
    spec = MaskSpec("fixed", ratio, seed=0, choice="content")

    # Execute
    cap = capture(spec, image, GRID, "fashion_mnist/train/0")

    # Assert: the top num_visible(49, r) of the ranking, sorted, uint16
    keep = num_visible(49, ratio)
    assert cap.visible.dtype == np.uint16
    np.testing.assert_array_equal(cap.visible, np.sort(order[-keep:]))
    assert cap.onboard_flops == 3 * 28 * 28 + 4 * 49  # every tile scored
    assert cap.image is image  # nothing drawn in


def test_content_is_deterministic_and_differs_from_random() -> None:
    # Prepare: Fashion-MNIST-like content: a bright blob on a dark ground
    rng = np.random.default_rng(1)
    image = np.zeros((28, 28, 1), dtype=np.uint8)
    image[6:22, 8:20] = rng.integers(60, 250, (16, 12, 1), dtype=np.uint8)
    content = MaskSpec("fixed", 0.75, seed=5, choice="content")
    random = MaskSpec("fixed", 0.75, seed=5)

    # Execute
    a = capture(content, image, GRID, "s1").visible
    b = capture(content, image.copy(), GRID, "s1").visible
    r = capture(random, image, GRID, "s1")

    # Assert: the same image and id give the same tiles; the random draw keeps others, and
    # costs nothing on board
    np.testing.assert_array_equal(a, b)
    assert len(a) == len(r.visible) == 12
    assert a.tobytes() != r.visible.tobytes()
    assert r.onboard_flops == 0
    scores = tile_scores(image, GRID)
    assert scores[a].min() >= scores[np.setdiff1d(np.arange(49), a)].max()


def test_ties_go_by_a_seeded_order_that_follows_the_seed_and_id() -> None:
    # Prepare: 10 textured tiles of equal variance, 39 flat ones (all variance 0); at r = 0.5
    # the 10 are kept and 14 of the 39 flat ones are chosen by the seeded order
    textured = np.arange(0, 49, 5)[:10]
    image = np.full((28, 28, 1), 50, dtype=np.uint8)
    for t in textured.tolist():
        r, c = divmod(t, GRID)
        image[4 * r : 4 * r + 4, 4 * c : 4 * c + 2] = 90
    spec = MaskSpec("fixed", 0.5, seed=0, choice="content")

    # Execute
    masks = [capture(spec, image, GRID, f"s{i}").visible for i in range(8)]
    again = capture(spec, image, GRID, "s0").visible
    other_seed = capture(MaskSpec("fixed", 0.5, seed=1, choice="content"), image, GRID,
                         "s0").visible

    # Assert
    for m in masks:
        assert len(m) == 24 and set(textured.tolist()) <= set(m.tolist())
    assert len({m.tobytes() for m in masks}) == 8  # each id its own draw among the ties
    np.testing.assert_array_equal(again, masks[0])
    assert other_seed.tobytes() != masks[0].tobytes()


def test_content_on_clouds_chooses_among_the_usable_tokens_and_counts_their_scoring() -> None:
    # Prepare: broken scenes only, on a ranked image
    broken = CloudSpec(cover_mean=0.3, clear_share=0.0, overcast_share=0.0)
    image = _ranked_image(np.random.default_rng(4).permutation(49))
    oracle = MaskSpec("clouds", 0.0, seed=2, clouds=broken)
    content = MaskSpec("clouds", 0.5, seed=2, clouds=broken, choice="content")

    checked = 0
    for i in range(30):
        # Execute
        usable = capture(oracle, image, GRID, f"s{i}")
        cap = capture(content, image, GRID, f"s{i}")

        # Assert: the top-scored half of the usable tokens, scored on the image as recorded
        keep = num_visible(len(usable.visible), 0.5)
        assert len(cap.visible) == keep
        np.testing.assert_array_equal(cap.image, usable.image)
        scores = tile_scores(cap.image, GRID)
        rest = np.setdiff1d(usable.visible, cap.visible)
        if len(rest):
            checked += 1
            assert scores[cap.visible].min() >= scores[rest].max()
            assert cap.onboard_flops == score_flops(image, GRID, usable.visible)
            assert cap.onboard_flops == 3 * 16 * len(usable.visible) + 4 * len(usable.visible)
        else:
            assert cap.onboard_flops == 0  # one usable token: kept without scoring
    assert checked > 20


def test_content_masks_need_the_image() -> None:
    with pytest.raises(ValueError, match="use capture"):
        visible_indices(MaskSpec("fixed", 0.5, choice="content"), 49, "s0")


@pytest.mark.parametrize("kind", ["random", "none"])
def test_mask_spec_refuses_content_where_it_has_no_effect(kind: str) -> None:
    with pytest.raises(ValueError, match="no effect"):
        MaskSpec(kind, 0.5, choice="content")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mask choice"):
        MaskSpec("fixed", 0.5, choice="variance")  # type: ignore[arg-type]


def test_the_test_splits_key_follows_the_choice() -> None:
    spec = DatasetSpec("fashion_mnist", download=False)

    def key(mask: MaskSpec) -> dict[str, object]:
        return eval_key("enc", spec, "files:1", mask, 10, None, 0)

    fixed = key(MaskSpec("fixed", 0.5, 0))
    assert key(MaskSpec("fixed", 0.5, 0, choice="content")) != fixed
    clouds = key(MaskSpec("clouds", 0.5, 0))
    assert key(MaskSpec("clouds", 0.5, 0, choice="content")) != clouds
    assert fixed == {**fixed, "mask": {"kind": "fixed", "ratio": 0.5, "seed": 0}}  # as before


def test_the_sensor_config_carries_the_choice_and_omits_the_default() -> None:
    content = SensorConfig(DatasetSpec("fashion_mnist"), MaskSpec("fixed", 0.5, 0,
                                                                   choice="content"))
    plain = SensorConfig(DatasetSpec("fashion_mnist"), MaskSpec("fixed", 0.5, 0))
    assert SensorConfig.from_json(content.to_json()) == content
    assert SensorConfig.from_json(plain.to_json()) == plain
    assert "choice" not in plain.to_json()  # a store bound before the key still binds


@pytest.mark.parametrize("mask, needle", [
    ("{kind: random, choice: content}", "a random mask is a fresh draw"),
    ("{kind: none, ratio: 0, choice: content}", "every token is kept"),
    ("{kind: fixed, ratio: 0, choice: content}", "no effect with ratio 0"),
    ("{kind: clouds, ratio: 0, choice: content}", "no effect with ratio 0"),
    ("{kind: fixed, choice: entropy}", "choice"),
])
def test_the_scenario_refuses_a_content_choice_that_changes_nothing(
        tmp_path: Path, mask: str, needle: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(f"name: x\nsensors: {{mask: {mask}}}\n")
    with pytest.raises(ScenarioError, match=needle):
        load(path)


def test_the_scenario_gives_the_sensors_the_choice(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("name: x\nsensors: {mask: {kind: clouds, ratio: 0.5, choice: content}}\n")
    assert mask_spec(load(path)).choice == "content"


@pytest.mark.slow
def test_a_mission_with_content_choice_downlinks_the_top_variance_tiles(tmp_path: Path) -> None:
    # Prepare: a tiny mission (tests/test_end_to_end.py's) with content-chosen fixed masks
    import json
    import sqlite3

    import yaml

    from sparsat.ground_station.store import Row
    from sparsat.node.data.datasets import load_dataset
    from sparsat.node.wire.codec import parse_patch_record
    from sparsat.sim.cli import main

    scenario = {
        "name": "content", "seed": 3,
        "dataset": {"name": "fashion_mnist", "train_subset": 240, "test_subset": 200},
        "sensors": {"count": 2, "per_process": 2, "payload": {"kind": "patches"},
                    "mask": {"kind": "fixed", "ratio": 0.75, "choice": "content"}},
        "passes": {"period_s": 600, "duration_s": 60},
        "links": {"downlink": {"rate_bps": 9600, "latency_s": 0.05},
                  "trainer": {"rate_bps": 1.0e8, "latency_s": 0.001}},
        "training": {"strategy": "centralized", "epochs": 1, "batch_size": 32,
                     "hidden": [32, 32]},
    }
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(scenario))
    out = tmp_path / "out"

    # Execute
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0

    # Assert: every stored sample carries the 12 tiles of highest variance of its image
    results = json.loads((out / "results.json").read_text())
    assert results["samples"]["stored"] == 240
    train = load_dataset(DatasetSpec("fashion_mnist"), "train")
    with sqlite3.connect(out / "store" / "samples.sqlite") as db:
        rows = [Row(*r) for r in db.execute("SELECT * FROM payloads")]
    assert len(rows) == 240
    for r in rows:
        data = parse_patch_record(r.data, r.runs, (28, 28, 1), GRID)
        scores = tile_scores(train.image(r.id), GRID)
        kept = data.visible_idx.astype(np.int64)
        assert len(kept) == 12
        assert scores[kept].min() >= scores[np.setdiff1d(np.arange(49), kept)].max()
