"""encoder.precision: bfloat16 where the hardware runs it natively (torch.autocast, float32
weights), float32 with the reason recorded elsewhere; keyed in the token cache; the same for
every split and on board; recorded in results.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from sparsat.ground_station.encoding import encoder_digest
from sparsat.node.models import encoders
from sparsat.node.models.encoders import NO_BF16_ENV, bf16_refusal
from sparsat.node.wire.codec import masked_canvas
from sparsat.sim.cli import main

NATIVE = bf16_refusal(torch.device("cpu")) is None  # this machine's CPU, established here


def _canvases(n: int = 64) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(0)
    vis = [np.sort(rng.choice(49, 24, replace=False)) for _ in range(n)]
    imgs = [rng.integers(0, 256, (28, 28, 1), dtype=np.uint8) for _ in range(n)]
    return [masked_canvas(im, 7, v) for im, v in zip(imgs, vis, strict=True)], vis


def test_bfloat16_where_native_else_float32_with_the_reason(
        monkeypatch: pytest.MonkeyPatch) -> None:
    enc = encoders.create("vit_tiny_d8_patch4_28", pooling="mean")
    cans, vis = _canvases()
    f32 = enc.encode_canvases(cans, vis, 32)
    digest32 = encoder_digest(enc, 32)
    used = enc.set_precision("bfloat16")
    assert used == ("bfloat16" if NATIVE else "float32")
    assert (enc.precision_note == "") == NATIVE
    fbf = enc.encode_canvases(cans, vis, 32)
    assert fbf.dtype == np.float32
    cos = (f32 * fbf).sum(1) / np.linalg.norm(f32, axis=1) / np.linalg.norm(fbf, axis=1)
    assert cos.min() > 0.99
    if NATIVE:
        assert not np.array_equal(f32, fbf)  # computed otherwise...
        assert encoder_digest(enc, 32) != digest32  # ... and keyed apart in the token cache
    monkeypatch.setenv(NO_BF16_ENV, "1")  # a machine without it
    assert enc.set_precision("bfloat16") == "float32"
    assert enc.precision_note == f"bfloat16 asked, float32 used: {NO_BF16_ENV} is set"
    assert np.array_equal(enc.encode_canvases(cans, vis, 32), f32)
    assert encoder_digest(enc, 32) == digest32  # float32 keys are today's
    with pytest.raises(ValueError, match="precision must be one of"):
        enc.set_precision("float16")


@pytest.mark.slow
@pytest.mark.parametrize("no_bf16", [False, True], ids=["as-is", "without-bf16"])
def test_a_run_records_the_precision_asked_and_used(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_bf16: bool) -> None:
    if no_bf16:  # the ground station inherits it: a machine without bfloat16
        monkeypatch.setenv(NO_BF16_ENV, "1")
    scenario = {
        "name": "bf16", "seed": 1,
        "dataset": {"name": "fashion_mnist", "train_subset": 240, "test_subset": 200},
        "encoder": {"precision": "bfloat16"},
        "sensors": {"count": 2, "per_process": 2, "mask": {"kind": "fixed", "ratio": 0.5},
                    "payload": {"kind": "cls", "cls_dtype": "int8"}},
        "passes": {"period_s": 600, "duration_s": 300},
        "training": {"strategy": "centralized", "workers": 1, "epochs": 1,
                     "batch_size": 32, "hidden": [32, 32]},
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(scenario))
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    p = json.loads((tmp_path / "out" / "results.json").read_text())["encoder_precision"]
    native = NATIVE and not no_bf16
    assert p["asked"] == "bfloat16"
    assert p["ground_station"] == ("bfloat16" if native else "float32")
    assert p["onboard"] == ["bfloat16" if native else "float32"]  # the CLS payloads' encoder
    assert (p["note"] == "") == native
