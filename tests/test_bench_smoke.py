"""Every bench at its --smoke sizes, so a change that breaks one fails `make test`.

Each test runs a bench as its users do (in this process through its `main`, or its
`make` target in a child), then checks that its last stdout line is one JSON object, that
it is what `main` returned, and that its figures are the sizes asked for and plausible (byte
counts against the model's, accuracies above chance, rates consistent with each other) -
not just that it exited 0. The `make gpu-check` / `make gpu-pretrain` tests run those
targets' own recipes with GPU_DEVICE=cpu / PRETRAIN_DEVICE=cpu, so they cannot drift from
the Makefile. tests/test_bench_transport.py and tests/test_bench_mission.py smoke the other
two benches.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from sparsat.node.data.datasets import DEBIAN_FASHION_MNIST_DIR, read_idx
from sparsat.node.data.masking import num_visible
from sparsat.node.models import encoders

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_RECORD = ROOT / "node" / "weights" / "vit_tiny_d8_patch4_28_fmnist_mae_e32.json"
MLP_HIDDEN = (1000, 1000)  # bench/ist.py's MLP: 768-1000-1000-10 on random features


def bench(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(name: str, argv: list[str], capsys: pytest.CaptureFixture[str]
             ) -> tuple[dict[str, Any], list[str]]:
    """Run bench NAME's main; its figures, checked against its last stdout line, and every
    line it printed."""
    figures = bench(name).main(argv)
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[-1]) == figures, "the last line is the figures, as JSON"
    return figures, lines


def json_line(path: Path) -> dict[str, Any]:
    found = json.loads(path.read_text().strip().splitlines()[-1])
    assert isinstance(found, dict)
    return found


def make(target: str, variables: dict[str, str], env: dict[str, str] | None = None
         ) -> subprocess.CompletedProcess[str]:
    """`make TARGET` as in a checkout whose venv is this interpreter's, without remaking the
    venv or the data (`make test` has just made both)."""
    cmd = ["make", "--no-print-directory", "-o", "install", "-o", "data", target,
           f"VENV={sys.prefix}", f"PY={sys.executable}",
           *(f"{k}={v}" for k, v in variables.items())]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def make_variable(name: str) -> str:
    out = subprocess.run(["make", "--no-print-directory", "-s", "--eval",
                          f"print-var: ; @echo $({name})", "print-var"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return out.strip()


def ratio_of_rounded(a: float, b: float) -> Any:
    """a / b as a bench rounds it (to 0.01) from rates it printed rounded to 0.1."""
    q = a / b
    return pytest.approx(q, abs=0.005 + q * (0.05 / a + 0.05 / b) * 1.01)


def mlp_params(d: int, hidden: tuple[int, int], c: int) -> int:
    h1, h2 = hidden
    return d * h1 + h1 + h1 * h2 + h2 + h2 * c + c


# ---- in this process ------------------------------------------------------------------------


def test_encoder_bench_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    name = encoders.DEFAULT_ENCODER
    f, lines = run_main("encoder", ["--smoke", "--devices", "cpu", "--encoders", name], capsys)

    assert (f["batch"], f["devices"]) == (2, ["cpu"])
    tag = f"{name}_cpu"
    full = f[f"{tag}_full_images_per_s"]
    assert full > 0
    n = encoders.config(name).grid ** 2
    for r in (0.0, 0.5, 0.75):
        vis = f[f"{tag}_r{r}_visible_images_per_s"]
        assert vis > 0 and f[f"{tag}_r{r}_speedup_vs_full"] == ratio_of_rounded(vis, full)
        # the line names the tokens kept: the bench really masked at r
        assert any(f"r={r:<4} visible ({num_visible(n, r):3d} tokens)" in line for line in lines)
    for ragged in ("group", "pad"):
        assert f[f"{tag}_ragged_{ragged}_images_per_s"] > 0
    assert f[f"{tag}_ragged_group_over_pad"] == ratio_of_rounded(
        f[f"{tag}_ragged_group_images_per_s"], f[f"{tag}_ragged_pad_images_per_s"])


def test_orbits_bench_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    f, _ = run_main("orbits", ["--smoke"], capsys)

    assert (f["satellites"], f["stations"], f["hours"]) == (25, 5, 3.0)
    assert f["windows"] > 0 and sum(f["per_station"].values()) == f["windows"]
    # a 550 km LEO pass over a station lasts minutes, never more than ~15
    assert 30 < f["median_window_s"] < 900
    assert 0 < f["mission_samples"] <= 25 * 20
    assert f["mission_satellites"] == 25 and 0 < f["mission_time_h"] <= 3.0
    # every sample and its ack were charged, and resent frames on top
    sample, ack = bench("orbits").SAMPLE_BYTES, bench("orbits").ACK_BYTES
    assert f["mission_bytes"] >= f["mission_samples"] * (sample + ack)
    assert 0 <= f["retransmitted_bytes"] < f["mission_bytes"]


def test_probe_bench_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    f, lines = run_main("probe", ["--smoke", "--pooling", "both"], capsys)

    assert (f["pooling"], f["epochs"]) == ("both", 2)
    assert (f["train_images"], f["validation_images"]) == (128, 64)
    for pooling in ("cls", "mean"):
        curve, val = f[f"{pooling}_r0.5_curve"], f[f"{pooling}_r0.5_validation_curve"]
        assert len(curve) == len(val) == 2 and f[f"{pooling}_r0.5_best_accuracy"] == max(curve)
        # the epoch is the validation split's choice, and its test accuracy is reported
        epoch = f[f"{pooling}_r0.5_best_epoch"]
        assert val[epoch - 1] == max(val) == f[f"{pooling}_r0.5_validation_accuracy"]
        assert f[f"{pooling}_r0.5_test_at_best"] == curve[epoch - 1]
        # the shipped encoder's features, 128 training images: well above chance (0.1)
        assert 0.3 < max(curve) <= 1 and 0.3 < max(val) <= 1
    assert sum(line.split()[0] in ("cls", "mean") for line in lines) == 2


def test_pretrain_curve_bench_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shipped = json.loads(SHIPPED_RECORD.read_text())
    follow = {"config": shipped["config"],
              "history": [{"epoch": 1, "loss": 0.3, "elapsed_s": 60.0},
                          {"epoch": 2, "loss": 0.25, "elapsed_s": 120.0}]}
    (tmp_path / "next.json").write_text(json.dumps(follow))
    png = tmp_path / "curve.png"

    f, _ = run_main("pretrain_curve", [str(SHIPPED_RECORD), str(tmp_path / "next.json"),
                                       "--out", str(png)], capsys)

    assert f["epochs"] == len(shipped["history"]) + 2 and f["final_loss"] == 0.25
    assert f["loss"][0] == round(shipped["history"][0]["loss"], 4)
    assert f["minutes"] == round(shipped["history"][-1]["elapsed_s"] / 60 + 2, 1)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpu_check_summary_names_a_missing_figure(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    gpu_check = bench("gpu_check")
    enc = {"batch": 2, "devices": ["cpu"], "e_cpu_full_images_per_s": 10.0,
           "e_cpu_r0.0_visible_images_per_s": 9.0, "e_cpu_r0.5_visible_images_per_s": 18.0,
           "e_cpu_r0.75_visible_images_per_s": 30.0, "e_cpu_r0.75_over_r0": 3.33}
    ist = {"device": "cpu", "local_steps": 2,
           "random768/ist_k2_reset": {"round_wall_s": 0.1, "round_bytes": 10**6,
                                      "epoch_wall_s": 1.0}}
    (tmp_path / "encoder.json").write_text(json.dumps(enc))
    (tmp_path / "ist.json").write_text(json.dumps(ist))
    assert gpu_check.main(["summary", str(tmp_path)]) == 0
    assert "round 0.1 s wall, 1.000 MB" in capsys.readouterr().out

    # a bench that left out a figure (or wrote null) fails the check instead of printing None
    del enc["e_cpu_r0.5_visible_images_per_s"]
    (tmp_path / "encoder.json").write_text(json.dumps(enc))
    with pytest.raises(SystemExit, match="no e_cpu_r0.5_visible_images_per_s"):
        gpu_check.main(["summary", str(tmp_path)])
    enc["e_cpu_r0.5_visible_images_per_s"] = 18.0
    ist["random768/ist_k2_reset"]["round_wall_s"] = None  # type: ignore[index]
    (tmp_path / "encoder.json").write_text(json.dumps(enc))
    (tmp_path / "ist.json").write_text(json.dumps(ist))
    with pytest.raises(SystemExit, match="no round_wall_s"):
        gpu_check.main(["summary", str(tmp_path)])


# ---- node processes and make targets --------------------------------------------------------


@pytest.mark.slow
def test_ist_bench_accuracy_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--accuracy: Fashion-MNIST tokens of the shipped encoder (encoded, then cached), one
    trainer process with its credentials."""
    f, _ = run_main("ist", ["--smoke", "--accuracy", "--configs", "ist_k1_travel",
                            "--cache", str(tmp_path)], capsys)

    res = f["r0.5/ist_k1_travel"]
    assert (f["epochs"], f["local_steps"], f["device"]) == (1, 2, "cpu")
    assert res["failures"] == 0 and res["rounds_per_epoch"] == 512 // 64 // 2
    assert 0.3 < res["best_accuracy"] <= 1  # the shipped encoder's tokens; chance is 0.1
    assert len(list(tmp_path.glob("fmnist_tokens_*_r0.5_train512_test256.npz"))) == 1


def _tiny_fashion_mnist(root: Path, train: int, test: int) -> None:
    """The first images of Fashion-MNIST's splits, as IDX files where $SPARSAT_DATA points."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", train), ("t10k", test)):
        for kind in ("images-idx3", "labels-idx1"):
            src = DEBIAN_FASHION_MNIST_DIR / f"{prefix}-{kind}-ubyte.gz"
            data = np.ascontiguousarray(read_idx(src)[:n])
            header = bytes([0, 0, 0x08, data.ndim]) + np.array(data.shape, ">u4").tobytes()
            (raw / f"{prefix}-{kind}-ubyte").write_bytes(header + data.tobytes())


@pytest.mark.slow
def test_make_gpu_check_steps_on_cpu(tmp_path: Path) -> None:
    """`make gpu-check`'s own recipe with GPU_DEVICE=cpu GPU_SMOKE=1: the GPU tests (skipped
    without CUDA), the encoder bench, the IST bench with the Makefile's configurations
    (trainer processes with credentials, over TLS), and the summary of their JSON lines."""
    encoder_names = make_variable("GPU_ENCODERS").split(",")
    configs = make_variable("GPU_IST_CONFIGS").split(",")
    # ViT-B/16 costs ~20 CPU seconds at smoke sizes: the smoke encodes with the default
    # encoder, and only checks that the Makefile's encoders are ones the registry knows
    for name in encoder_names:
        encoders.config(name)
    gpu_tests = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                       if "pytest.mark.gpu" in p.read_text())
    out = tmp_path / "gpu-check"

    done = make("gpu-check", {"GPU_DEVICE": "cpu", "GPU_SMOKE": "1", "GPU_OUT": str(out),
                              "GPU_ENCODERS": encoders.DEFAULT_ENCODER,
                              "GPU_TESTS": " ".join(gpu_tests)})

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # the GPU tests were collected (and skipped without CUDA, or passed with it)
    assert re.search(r"\b\d+ (skipped|passed)\b", done.stdout)
    enc = json_line(out / "encoder.json")
    assert enc["devices"] == ["cpu"] and enc["batch"] == 2
    tag = f"{encoders.DEFAULT_ENCODER}_cpu"
    assert all(enc[f"{tag}_r{r}_visible_images_per_s"] > 0 for r in (0.0, 0.5, 0.75))
    ist = json_line(out / "ist.json")
    assert (ist["device"], ist["epochs"], ist["local_steps"]) == ("cpu", 1, 2)
    full = 4 * mlp_params(768, MLP_HIDDEN, 10)  # float32 bytes of the whole MLP
    for name in configs:
        res = ist[f"random768/{name}"]
        k = res["k"]
        assert res["failures"] == 0 and res["rounds_per_epoch"] == 512 // 64 // (k * 2)
        assert res["round_wall_s"] > 0 and 0 < res["best_accuracy"] <= 1
        if res["moments"] == "reset":
            # each worker's parameters out and back, float32, plus a little framing: local
            # SGD sends every worker the whole MLP, IST worker k only its 1/K slices
            h1, h2 = MLP_HIDDEN
            piece = mlp_params(768, (h1 // k, h2 // k), 10) * 4
            want = 2 * k * (full if res["strategy"] == "local_sgd" else piece)
            assert want <= res["round_bytes"] <= want * 1.001, name
    if "ist_over_local_sgd_k4" in ist:
        assert ist["ist_over_local_sgd_k4"] == pytest.approx(
            ist["ist_k4_round_bytes"] / ist["local_sgd_k4_round_bytes"], abs=1e-4)
    for name in configs:  # the summary step printed every configuration
        assert re.search(rf"random768/{name}\s+round [\d.]+ s wall, [\d.]+ MB", done.stdout)
    assert re.search(rf"{tag}\s+visible-token img/s\s+r=0.0: [\d.]+", done.stdout)


@pytest.mark.slow
def test_make_gpu_pretrain_steps_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    """`make gpu-pretrain`'s own recipe on the CPU, one epoch on a tiny Fashion-MNIST (256
    training images: one of pretraining's batches; 64 test): `sparsat pretrain`, the 2-epoch
    probe of the new and the shipped checkpoint, the adoption rule; then
    bench/pretrain_curve.py on the run's record."""
    _tiny_fashion_mnist(tmp_path / "data", 256, 64)
    out = tmp_path / "pretrain"

    done = make("gpu-pretrain", {"PRETRAIN_DEVICE": "cpu", "PRETRAIN_EPOCHS": "1",
                                 "PROBE_EPOCHS": "2", "PRETRAIN_OUT": str(out)},
                env={"SPARSAT_DATA": str(tmp_path / "data")})

    verdict = re.search(r"probe r=0.5 \(mean pooling, validation\): new ([\d.]+) vs shipped "
                        r"([\d.]+) .*"
                        r"checkpoint ([\d,]+) B .* -> (ADOPT|KEEP)", done.stdout)
    assert verdict, done.stdout[-3000:] + done.stderr[-3000:]
    # adopt's exit status is the verdict's (1 = keep the shipped one: make reports the error)
    assert done.returncode == (0 if verdict[4] == "ADOPT" else 2)
    new, shipped = (json_line(out / f) for f in ("probe.log", "probe_shipped.log"))
    assert float(verdict[1]) == new["mean_r0.5_validation_accuracy"]
    assert float(verdict[2]) == shipped["mean_r0.5_validation_accuracy"]
    assert 0.2 < shipped["mean_r0.5_validation_accuracy"] <= 1  # the shipped encoder; chance 0.1
    assert int(verdict[3].replace(",", "")) == (out / "encoder.pt").stat().st_size
    record = out / "pretrain.json"
    assert json.loads(record.read_text())["config"]["epochs"] == 1

    f, _ = run_main("pretrain_curve", [str(record)], capsys)
    assert f["epochs"] == 1 and 0 < f["final_loss"] < 10  # norm_pix MSE: O(1)


def test_tiny_fashion_mnist_reads_back(tmp_path: Path) -> None:
    """The IDX files the gpu-pretrain smoke writes are the dataset's first images."""
    _tiny_fashion_mnist(tmp_path, 5, 3)
    from sparsat.node.data.datasets import DatasetSpec, load_dataset

    got = load_dataset(DatasetSpec("fashion_mnist", root=str(tmp_path)), "test")
    want = read_idx(DEBIAN_FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")[:3]
    assert len(got) == 3 and np.array_equal(got.image(2)[..., 0], want[2])


def test_call_credentials_bench_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    f, _ = run_main("call_credentials", ["--smoke"], capsys)

    assert f["calls"] == 50 and f["nonces_held"] == 50
    assert f["sign_us"] > 0 and f["check_us"] > 0
    # quickstart's nodes: each call carries its token and a 123-character call credential
    assert set(f["credential_bytes"]) >= {"ground-station", "operator", "sensors-0"}
    assert all(n > len("authorization") + len("sparsat-call") + 123
               for n in f["credential_bytes"].values())


def test_codecs_bench_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "codecs.md"
    f, _ = run_main("pixel_codecs", ["--smoke", "--out", str(out)], capsys)

    assert (f["images"], f["train_images"], f["mosaics"]) == (32, 64, [4, 16, 64])
    rows = {(r["codec"], r["ratio"]): r for r in f["rows"]}
    codecs = ["png", "webp q30", "webp q50", "webp q75", "jpeg q30", "jpeg q50", "jpegxl q30",
              "jpegxl q60", "jpeg2k 25dB", "jpeg2k 35dB"]
    assert set(rows) == {(c, r) for c in codecs for r in (0.0, 0.5, 0.75)}
    for (codec, ratio), row in rows.items():
        assert row["raw_bytes"] == 16 * num_visible(49, ratio)  # 4 x 4 tiles of one byte
        assert 0 < row["dict_size"] <= 4096 and row["dict_bytes"] > 0
        psnrs = [row["psnr_db"], *(row[f"mosaic{g}_psnr_db"] for g in (4, 16, 64))]
        if codec == "png":  # lossless: no PSNR at all (None), not an infinity JSON cannot hold
            assert psnrs == [None] * 4
        else:
            assert all(15 < p < 60 for p in psnrs), (codec, ratio, psnrs)
    # one image's header and warm-up, shared by 16: the point of a mosaic
    for ratio in (0.0, 0.5, 0.75):
        webp = rows[("webp q50", ratio)]
        assert webp["mosaic16_bytes"] < webp["bytes"]
    table = out.read_text().splitlines()
    assert sum(line.startswith("| jpeg2k 35dB | ") for line in table) == 3
