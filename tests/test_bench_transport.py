"""Smoke test of bench/transport.py (--smoke): a tiny run must end with one JSON line of sane
figures."""

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
    figures = module.main(["--smoke"])
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])
    assert res == figures
    assert (res["samples"], res["repeat"], res["stream_bytes"]) == (200, 1, 1 << 20)
    for kind in ("patch", "cls"):
        for name in ("grpc", "grpc_bytes", "raw", "raw_noack"):
            assert res[f"{name}_{kind}_samples_per_s"] > 0
            assert res[f"{name}_{kind}_mb_per_s"] > 0
        if res["data"] == "fashion_mnist":  # GroundStation loads the test split
            assert res[f"ingest_{kind}_samples_per_s"] > 0
    for name in ("patch_r0", "patch_r0.5", "patch_r0.75", "cls_float32", "cls_float16",
                 "cls_int8"):
        assert res[f"{name}_wire_bytes"] > res[f"{name}_payload_bytes"] > 0
        # HTTP/2 frames the gRPC messages: more bytes on the socket than ByteSize + 5
        assert res[f"{name}_tcp_up_bytes"] + res[f"{name}_tcp_down_bytes"] >= res[
            f"{name}_wire_bytes"]
    # every pixel, and a 2-byte run code: [0 hidden, 49 visible]
    assert res["patch_r0_payload_bytes"] == 28 * 28 + 2
    assert res["patch_r0.5_payload_bytes"] == 24 * 16 + 7  # 24 visible tiles, 7-byte bitmap
    assert res["cls_float16_payload_bytes"] == 2 * 192
    # the protocol's targets (issue 13), acks included: byte counts, not timings
    assert res["patch_r0.5_overhead"] <= 1.02
    assert res["cls_int8_overhead"] <= 1.05
