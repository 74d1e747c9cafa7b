"""The on-board cloud detector (sparsat.node.data.detector): its rule, its few bytes and their
bounded parsing, its fit on the ground (sparsat.ground_station.detector), its decisions in a
capture and its token errors counted against the true cloud field."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sparsat.ground_station.detector import fit_threshold
from sparsat.ground_station.encoding import encode_split, eval_key
from sparsat.node.data.clouds import CloudSpec, token_cover
from sparsat.node.data.config import SensorConfig
from sparsat.node.data.datasets import ArrayImageDataset, DatasetSpec
from sparsat.node.data.detector import (
    DETECTOR_BYTES,
    ThresholdDetector,
    detector_flops,
    tile_features,
)
from sparsat.node.data.masking import MaskSpec, capture, cloudy_scene
from sparsat.sim.scenario.schema import ScenarioError, load

GRID = 7


def _tiles(bright: list[int], base: int = 40, bright_value: int = 255) -> np.ndarray:
    """28 x 28 x 1: tile t has bright[t] pixels of `bright_value`, the rest `base`."""
    image = np.full((28, 28, 1), base, dtype=np.uint8)
    for t, k in enumerate(bright):
        r, c = divmod(t, GRID)
        tile = image[4 * r : 4 * r + 4, 4 * c : 4 * c + 4, 0].reshape(-1)
        tile[:k] = bright_value
        image[4 * r : 4 * r + 4, 4 * c : 4 * c + 4, 0] = tile.reshape(4, 4)
    return image


# ---- the rule ---------------------------------------------------------------------------------


def test_the_rule_calls_a_tile_cloudy_above_its_bright_share() -> None:
    # Prepare: tiles with 0..16 saturated pixels (and 49 - 17 with none)
    counts = list(range(17)) + [0] * 32
    image = _tiles(counts)
    det = ThresholdDetector(level=255, share16=5)

    # Execute
    called = det.cloudy(image, GRID)

    # Assert: cloudy where more than 5 of 16 pixels are bright
    np.testing.assert_array_equal(called, np.array(counts) > 5)
    # a mean condition the bright tiles (mean 40 + k * 215 / 16) fail below k = 10
    np.testing.assert_array_equal(ThresholdDetector(255, 5, min_mean=170).cloudy(image, GRID),
                                  np.array(counts) >= 10)
    # a texture condition: std of k bright of 16 is 215 * sqrt(p (1 - p)); <= 60 leaves the
    # nearly uniform tiles (k >= 15)
    np.testing.assert_array_equal(ThresholdDetector(255, 5, max_std=60).cloudy(image, GRID),
                                  np.array(counts) >= 15)


def test_tile_features_match_numpy_on_an_uneven_tiling() -> None:
    image = np.random.default_rng(0).integers(0, 256, (30, 29, 3), dtype=np.uint8)
    f = tile_features(image, GRID, 200)
    ys, xs = np.floor(np.arange(8) * 30 / 7 + 0.5).astype(int), np.floor(
        np.arange(8) * 29 / 7 + 0.5).astype(int)
    tiles = [image[ys[r]:ys[r + 1], xs[c]:xs[c + 1]] for r in range(7) for c in range(7)]
    np.testing.assert_array_equal(f.values, [t.size for t in tiles])
    np.testing.assert_array_equal(f.bright, [(t >= 200).sum() for t in tiles])
    np.testing.assert_allclose(f.mean, [t.mean() for t in tiles], rtol=1e-12)
    np.testing.assert_allclose(f.std, [t.astype(float).std() for t in tiles], rtol=1e-9)


# ---- bytes --------------------------------------------------------------------------------------


def test_parameters_round_trip_in_five_bytes() -> None:
    det = ThresholdDetector(level=240, share16=7, min_mean=96, max_std=48)
    data = det.to_bytes()
    assert len(data) == DETECTOR_BYTES == 5
    assert ThresholdDetector.from_bytes(data) == det
    assert ThresholdDetector.from_hex(det.to_hex()) == det


@pytest.mark.parametrize("data, needle", [
    (b"", "5 bytes"),
    (b"\x01\xff\x04\x00", "5 bytes"),
    (b"\x01\xff\x04\x00\xff\x00", "5 bytes"),
    (b"\x01" * 10_000, "5 bytes"),
    (b"\x02\xff\x04\x00\xff", "version 2"),
    (b"\x01\xff\x11\x00\xff", "share16"),  # 17 sixteenths
    (b"\x01\xff\xff\x00\xff", "share16"),
])
def test_hostile_bytes_are_refused(data: bytes, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        ThresholdDetector.from_bytes(data)


@pytest.mark.parametrize("text, needle", [
    ("", "10 hex digits"),
    ("01ff0400ff00", "10 hex digits"),
    ("0" * 1_000_000, "10 hex digits"),
    ("01ff0400zz", "not hex"),
    ("02ff0400ff", "version"),
])
def test_hostile_hex_in_a_sensor_config_is_refused(text: str, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        ThresholdDetector.from_hex(text)
    with pytest.raises(ValueError, match=needle):
        MaskSpec("clouds", 0.5, detector="threshold", detector_params=text)


def test_fields_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match="level"):
        ThresholdDetector(level=256)
    with pytest.raises(ValueError, match="max_std"):
        ThresholdDetector(max_std=-1)


def test_the_sensor_config_carries_the_detector() -> None:
    det = ThresholdDetector(250, 6, 64, 96)
    cfg = SensorConfig(DatasetSpec("fashion_mnist"),
                       MaskSpec("clouds", 0.5, detector="threshold", detector_params=det.to_hex()))
    assert SensorConfig.from_json(cfg.to_json()) == cfg
    oracle = SensorConfig(DatasetSpec("fashion_mnist"), MaskSpec("clouds", 0.5))
    assert "detector" not in oracle.to_json()  # a store bound before the key still binds


# ---- the fit ------------------------------------------------------------------------------------


def test_the_fit_recovers_a_known_threshold() -> None:
    # Prepare: truth = more than 5 of 16 pixels saturated; clear tiles hold up to 5 of them
    # and up to 16 pixels at 250 (bright garments), so only level 255 with share16 5 makes
    # no error
    rng = np.random.default_rng(0)
    scenes = []
    for _ in range(40):
        counts = rng.integers(0, 17, 49)
        image = _tiles(counts.tolist())
        near = rng.integers(0, 17, 49)  # near-white pixels in clear tiles
        for t in np.flatnonzero(counts <= 5).tolist():
            r, c = divmod(t, GRID)
            tile = image[4 * r : 4 * r + 4, 4 * c : 4 * c + 4, 0].reshape(-1)
            tile[counts[t]:counts[t] + near[t]] = 250
            image[4 * r : 4 * r + 4, 4 * c : 4 * c + 4, 0] = tile.reshape(4, 4)
        scenes.append((image, counts > 5))

    # Execute
    fit = fit_threshold(scenes, GRID)

    # Assert
    assert fit.detector == ThresholdDetector(level=255, share16=5, min_mean=0, max_std=255)
    assert (fit.false_positives, fit.false_negatives) == (0, 0)
    assert (fit.images, fit.tokens) == (40, 40 * 49)
    assert fit.flops_per_image == 5 * 784 + 8 * 49


def test_the_fit_minimises_errors_when_none_is_perfect() -> None:
    # Prepare: two tiles with 6 bright pixels, one truly cloudy and one not: any rule errs
    # once on them; the rest is separable
    cloudy = _tiles([6, 16] + [0] * 47)
    clear = _tiles([6, 0] + [0] * 47)
    truth = np.zeros(49, dtype=bool)
    truth[:2] = True
    truth_clear = np.zeros(49, dtype=bool)

    # Execute
    fit = fit_threshold([(cloudy, truth), (clear, truth_clear)], GRID)

    # Assert: one error, the fewest possible
    assert fit.false_positives + fit.false_negatives == 1


# ---- in a capture, and counted -----------------------------------------------------------------


def _broken() -> CloudSpec:
    return CloudSpec(cover_mean=0.4, clear_share=0.2, overcast_share=0.05)


def test_a_threshold_capture_drops_what_the_detector_calls_cloudy_and_counts_its_errors() -> None:
    # Prepare: garments that saturate (255 in 3 or 10 of 16 pixels of some tiles: false
    # positives), a detector that wants more than half a tile bright (tiles 5/16 to 8/16
    # cloudy: false negatives)
    rng = np.random.default_rng(2)
    det = ThresholdDetector(level=255, share16=8)
    spec = MaskSpec("clouds", 0.0, seed=1, clouds=_broken(), detector="threshold",
                    detector_params=det.to_hex())
    oracle = MaskSpec("clouds", 0.0, seed=1, clouds=_broken())
    seen_fp = seen_fn = 0
    for i in range(40):
        image = _tiles(rng.choice([0, 0, 0, 3, 10], 49).tolist(), base=30)

        # Execute
        cap = capture(spec, image, GRID, f"s{i}")
        truth_cap = capture(oracle, image, GRID, f"s{i}")

        # Assert: the same scene as the oracle's; kept = not called cloudy; errors by hand
        np.testing.assert_array_equal(cap.image, truth_cap.image)
        recorded, clouds, _ = cloudy_scene(spec, image, f"s{i}")
        truth = token_cover(clouds, GRID) > spec.max_cloud
        called = det.cloudy(recorded, GRID)
        np.testing.assert_array_equal(cap.visible, np.flatnonzero(~called))
        np.testing.assert_array_equal(truth_cap.visible, np.flatnonzero(~truth))
        assert cap.false_positives == int((called & ~truth).sum())
        assert cap.false_negatives == int((~called & truth).sum())
        assert cap.cloudy_tokens == truth_cap.cloudy_tokens == int(truth.sum())
        assert cap.onboard_flops == detector_flops(image, GRID) == 5 * 784 + 8 * 49
        assert truth_cap.onboard_flops == truth_cap.false_positives == 0
        seen_fp += cap.false_positives
        seen_fn += cap.false_negatives
    assert seen_fp > 0 and seen_fn > 0  # the case exercises both kinds of error


def test_measured_rates_on_a_constructed_split_are_the_hand_count() -> None:
    # Prepare: three clear scenes (no clouds at all): the truth is every token usable; the
    # detector (more than 4 of 16 pixels at 255) calls exactly the tiles built bright:
    # image 0: 2 tiles with 8 saturated pixels, image 1: 1 tile with 16, image 2: 1 tile with
    # 4 (not above 4/16: clear) -> 3 false positives of 147 usable tokens, no cloudy token
    images = np.stack([_tiles([8, 0, 8] + [0] * 46), _tiles([16] + [0] * 48),
                       _tiles([4] + [0] * 48)])
    data = ArrayImageDataset(images, np.arange(3), ["a", "b", "c"])
    clear = CloudSpec(cover_mean=0.005, clear_share=0.99, overcast_share=0.0)
    params = ThresholdDetector(255, 4).to_hex()
    for seed in range(50):  # a seed whose three scenes are clear
        spec = MaskSpec("clouds", 0.0, seed, clouds=clear, detector="threshold",
                        detector_params=params)
        if all(cloudy_scene(spec, images[i], f"x/test/{i}")[2] == 0 for i in range(3)):
            break
    else:
        pytest.fail("no seed with three clear scenes")

    class Encoder:  # what encode_split needs of one
        grid, dim = GRID, 2
        cfg = None

        def encode_canvases(self, canvases: list[np.ndarray], visible: list[np.ndarray],
                            batch: int) -> np.ndarray:
            return np.zeros((len(canvases), 2), np.float32)

    import sparsat.ground_station.encoding as encoding

    real = encoding.encode_flops
    encoding.encode_flops = lambda cfg, n: 0  # type: ignore[assignment]
    try:
        # Execute
        out = encode_split(data, "test", "x", spec, Encoder(), 4,  # type: ignore[arg-type]
                           indices=np.arange(3))
    finally:
        encoding.encode_flops = real

    # Assert
    assert out.detector == (147, 0, 3, 0)


# ---- keys and the scenario ----------------------------------------------------------------------


def test_the_test_splits_key_follows_the_detector() -> None:
    spec = DatasetSpec("fashion_mnist", download=False)

    def key(mask: MaskSpec) -> dict[str, object]:
        return eval_key("enc", spec, "files:1", mask, 10, None, 0)

    oracle = key(MaskSpec("clouds", 0.5, 0))
    a = key(MaskSpec("clouds", 0.5, 0, detector="threshold",
                     detector_params=ThresholdDetector(255, 4).to_hex()))
    b = key(MaskSpec("clouds", 0.5, 0, detector="threshold",
                     detector_params=ThresholdDetector(255, 5).to_hex()))
    assert len({str(oracle), str(a), str(b)}) == 3
    assert "detector" not in oracle["mask"]  # type: ignore[operator]  # as before


@pytest.mark.parametrize("text, needle", [
    ("sensors: {mask: {kind: fixed, detector: threshold}}\n", "only apply to kind: clouds"),
    ("sensors: {mask: {kind: clouds, detector_fit_images: 50}}\n", "detector_fit_images"),
    ("sensors: {mask: {kind: clouds, detector: threshold}}\n", "set dataset.train_subset"),
    ("sensors: {mask: {kind: clouds, detector: cnn}}\n", "detector"),
])
def test_the_scenario_checks_the_detector(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\n" + text)
    with pytest.raises(ScenarioError, match=needle):
        load(path)


def test_a_detector_needs_clouds_in_the_mask_spec() -> None:
    with pytest.raises(ValueError, match="kind clouds"):
        MaskSpec("fixed", 0.5, detector="threshold",
                 detector_params=ThresholdDetector().to_hex())
    with pytest.raises(ValueError, match="need detector threshold"):
        MaskSpec("clouds", 0.5, detector_params=ThresholdDetector().to_hex())


@pytest.mark.slow
def test_a_mission_with_a_threshold_detector_reports_its_bytes_and_rates(tmp_path: Path) -> None:
    # Prepare: a tiny cloudy mission
    import json

    import yaml

    from sparsat.sim.cli import main

    scenario = {
        "name": "detector", "seed": 3,
        "dataset": {"name": "fashion_mnist", "train_subset": 240, "test_subset": 200},
        "sensors": {"count": 2, "per_process": 2, "payload": {"kind": "patches"},
                    "mask": {"kind": "clouds", "ratio": 0.5, "detector": "threshold",
                             "detector_fit_images": 300}},
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

    # Assert
    r = json.loads((out / "results.json").read_text())
    d, b = r["detector"], r["bytes"]
    assert d["kind"] == "threshold" and d["bytes"] == 2 * DETECTOR_BYTES
    assert ThresholdDetector.from_hex(d["params"]["hex"]).level == d["params"]["level"]
    assert d["fit"]["images"] == 300 and d["flops_per_image"] == 5 * 784 + 8 * 49
    assert d["tokens"] == d["truly_usable"] + d["truly_cloudy"] == 200 * 49
    assert d["false_positive_rate"] == d["false_positives"] / d["truly_usable"]
    assert d["false_negative_rate"] == d["false_negatives"] / d["truly_cloudy"]
    assert b["uplink_breakdown"]["detector"] == 2 * DETECTOR_BYTES
    assert b["uplink"] == b["uplink_breakdown"]["acks"] + 2 * DETECTOR_BYTES
    assert sum(r["per_link_bytes"].values()) == b["total"]
    assert r["samples"]["test"] + r["samples"]["test_cloudy_skipped"] == 200
