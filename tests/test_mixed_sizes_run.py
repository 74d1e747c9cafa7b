"""`sparsat run` on an imagefolder whose images differ in size (issue 15 item 4): the whole
mission, real node processes over TLS, for patch payloads (the ground station rebuilds and
encodes each canvas at its own size) and CLS payloads (the sensor host encodes them on board).
Before, the encoder stage's np.stack failed after the whole downlink; tests/test_mixed_sizes.py
covers the same path in-process, this one as a user runs it."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from sparsat.sim.cli import main

pytestmark = pytest.mark.slow

SIZES = [(28, 28), (40, 24), (17, 33)]  # (width, height) as PIL takes them
PER_CLASS = 20  # 40 images: 32 to train, 8 to test (val_fraction 0.2)


def _folder(root: Path) -> Path:
    """Two classes that differ in brightness, each image at one of three sizes."""
    rng = np.random.default_rng(0)
    for cls, level in (("fields", 60), ("forest", 180)):
        (root / cls).mkdir(parents=True)
        for k in range(PER_CLASS):
            w, h = SIZES[k % len(SIZES)]
            pixels = np.clip(rng.normal(level, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{k}.png")
    return root


def _scenario(root: Path, payload: str) -> dict[str, object]:
    return {
        "name": f"mixed-{payload}", "seed": 3,
        "dataset": {"name": "imagefolder", "root": str(root)},
        "sensors": {"count": 2, "per_process": 2, "mask": {"kind": "fixed", "ratio": 0.5},
                    "payload": {"kind": payload}},
        "passes": {"period_s": 600, "duration_s": 30},
        "links": {"downlink": {"rate_bps": 9600, "latency_s": 0.05},
                  "trainer": {"rate_bps": 1.0e8, "latency_s": 0.001}},
        "training": {"strategy": "ist", "workers": 2, "local_steps": 2, "epochs": 2,
                     "batch_size": 8, "hidden": [32, 16]},
    }


@pytest.mark.parametrize("payload", ["patches", "cls"])
def test_a_run_on_an_imagefolder_of_mixed_sizes_downlinks_encodes_and_trains(
        tmp_path: Path, payload: str) -> None:
    # Prepare
    scenario = _scenario(_folder(tmp_path / "images"), payload)
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(scenario))
    out = tmp_path / "out"

    # Execute
    code = main(["run", str(path), "--out", str(out), "--quiet"])

    # Assert: every training image sent, stored, encoded and trained on; the test split too
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    train, test = 2 * PER_CLASS * 4 // 5, 2 * PER_CLASS // 5
    s = results["samples"]
    assert (s["sent"], s["stored"], s["trained_on"], s["test"]) == (train, train, train, test)
    assert s["rejected"] == 0
    assert [h["epoch"] for h in results["history"]] == [1, 2]
    with sqlite3.connect(out / "store" / "samples.sqlite") as db:
        shapes = set(db.execute("SELECT height, width FROM payloads").fetchall())
    if payload == "patches":  # each stored at its own size
        assert shapes == {(h, w) for w, h in SIZES}
    else:  # tokens: no image shape travels
        assert shapes == {(0, 0)}
        assert results["compute"]["onboard_encoder"]["flops"] > 0
