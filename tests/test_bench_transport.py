"""Smoke test of bench/transport.py: a tiny run must end with one JSON line of sane figures."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "transport.py"


def test_transport_bench_ends_with_json(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("bench_transport", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--samples", "200", "--repeat", "1"])
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])
    for kind in ("patch", "cls"):
        for name in ("grpc", "raw", "raw_noack"):
            assert res[f"{name}_{kind}_samples_per_s"] > 0
            assert res[f"{name}_{kind}_mb_per_s"] > 0
        if res["data"] == "fashion_mnist":  # GroundStation loads the test split
            assert res[f"ingest_{kind}_samples_per_s"] > 0
    for name in ("patch_r0", "patch_r0.5", "patch_r0.75", "cls_float32", "cls_float16",
                 "cls_int8"):
        assert res[f"{name}_wire_bytes"] > res[f"{name}_payload_bytes"] > 0
        assert res[f"{name}_tcp_up_bytes"] >= res[f"{name}_wire_bytes"]
    assert res["patch_r0_payload_bytes"] == 28 * 28 + 2 * 49  # every pixel, every index
    assert res["cls_float16_payload_bytes"] == 2 * 192
