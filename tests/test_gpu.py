"""On CUDA, the same results as on the CPU: encoders, IST trainers, the ground station's encoder.

Every test here is `-m gpu` and skipped without CUDA (`make gpu-check` runs them on a GPU
machine). Comparisons are in strict fp32: TF32 (on by default for cuDNN convolutions, such as
the patch embedding) is switched off while they run, so the tolerances are fp32 reordering
error, not TF32's 10-bit mantissa.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import grpc
import numpy as np
import pytest
import torch

from sparsat.ground_station.config import GroundStationConfig, TrainingConfig
from sparsat.ground_station.coordinator import Coordinator
from sparsat.ground_station.server import GroundStation, build_server
from sparsat.node.data.config import SensorConfig
from sparsat.node.data.datasets import DatasetSpec
from sparsat.node.data.masking import MaskSpec, num_visible
from sparsat.node.models import encoders
from sparsat.node.processes.sensor import SensorServicer
from sparsat.node.processes.trainer import TrainerServicer
from sparsat.node.wire.rpc import bind, channel, make_server
from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb
from sparsat.proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def strict_fp32() -> Iterator[None]:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _close(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float, atol: float) -> None:
    try:
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    except AssertionError as e:
        raise AssertionError(f"{what}: {e}") from None


# ---- encoders -------------------------------------------------------------------------------

# (encoder, weights, batch, atol): the default with its shipped weights; ViT-B/16 with seeded
# random weights (nothing to download). Outputs are LayerNorm-ed, O(1).
ENCODERS = [("vit_tiny_d8_patch4_28", None, 32, 1e-4),
            ("mae_vit_base_patch16", "random", 4, 5e-4)]


def _visible(n: int, ratio: float, batch: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    keep = num_visible(n, ratio)
    return torch.stack([torch.randperm(n, generator=gen)[:keep].sort().values
                        for _ in range(batch)])


@pytest.mark.parametrize("name, weights, batch, atol", ENCODERS)
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_encoder_gives_the_same_features_on_cuda_as_on_cpu(
        name: str, weights: str | None, batch: int, atol: float, pooling: str) -> None:
    cpu = encoders.create(name, weights, pooling=pooling)  # type: ignore[arg-type]
    gpu = copy.deepcopy(cpu).to(CUDA)
    cfg = cpu.cfg
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=gen)
    for ratio in (0.0, 0.5, 0.75):
        idx = _visible(cpu.num_tokens, ratio, batch, seed=int(ratio * 100))
        with torch.no_grad():
            want = cpu.encode(images, idx)
            got = gpu.encode(images.to(CUDA), idx.to(CUDA))
        assert got.device.type == "cuda" and got.shape == (batch, cpu.dim)
        _close(got.cpu(), want, f"r={ratio}", rtol=1e-4, atol=atol)


@pytest.mark.parametrize("ragged", ["group", "pad"])
def test_mixed_visible_counts_on_cuda_match_cpu(ragged: Literal["group", "pad"]) -> None:
    cpu = encoders.create(encoders.DEFAULT_ENCODER, pooling="mean")
    gpu = copy.deepcopy(cpu).to(CUDA)
    n, size = cpu.num_tokens, cpu.cfg.img_size
    rng = np.random.default_rng(0)
    canvases = [rng.integers(0, 256, (size, size, cpu.cfg.in_chans), dtype=np.uint8)
                for _ in range(40)]
    visible = [np.sort(rng.permutation(n)[: rng.integers(1, n + 1)]).astype(np.uint16)
               for _ in range(40)]
    want = cpu.encode_canvases(canvases, visible, batch_size=16, ragged=ragged)
    got = gpu.encode_canvases(canvases, visible, batch_size=16, ragged=ragged)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# ---- trainers -------------------------------------------------------------------------------

DIM, CLASSES, ROWS = 16, 4, 1024


def _data(seed: int) -> tuple[np.ndarray, np.ndarray]:
    centers = np.random.default_rng(42).normal(0, 3, (CLASSES, DIM))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, ROWS)
    return (centers[y] + rng.normal(0, 1, (ROWS, DIM))).astype(np.float32), y.astype(np.int64)


Params = dict[str, torch.Tensor]


def _ist_epochs(device: torch.device, epochs: int = 2
                ) -> tuple[Params, Params, list[float], list[TrainerServicer]]:
    """IST, K = 2, moments travelling, on two in-process trainer servers on `device`:
    (initial weights, final weights, accuracy per epoch, the trainers)."""
    cfg = TrainingConfig(strategy="ist", workers=2, local_steps=3, moments="travel",
                         batch_size=32, lr=1e-3, hidden=(64, 48), seed=0)
    servers, servicers = [], []
    coord = Coordinator(cfg, DIM, CLASSES)
    start = {k: v.clone() for k, v in coord.params.items()}
    try:
        for k in range(2):
            servicer = TrainerServicer(f"trainer-{k}", device)
            server = make_server()
            pb_grpc.add_TrainerServicer_to_server(servicer, server)
            address = bind(server, "127.0.0.1:0")
            server.start()
            servers.append(server)
            servicers.append(servicer)
            coord.add_trainer(f"trainer-{k}", address)
        x, y = _data(0)
        coord.set_dataset("d1", x, y)
        tx, ty = (torch.from_numpy(a) for a in _data(1))
        accs = [coord.train_epoch(e, tx, ty).accuracy for e in range(1, epochs + 1)]
        assert not coord.failures
        return start, {k: v.clone() for k, v in coord.params.items()}, accs, servicers
    finally:
        coord.close()
        for server in servers:
            server.stop(None)


def test_ist_local_steps_on_cuda_trainers_match_cpu_trainers() -> None:
    start, cpu, cpu_acc, _ = _ist_epochs(torch.device("cpu"))
    _, gpu, gpu_acc, servicers = _ist_epochs(CUDA)

    # the trainers really trained on the GPU
    assert all(x.device.type == "cuda" for s in servicers for x, _ in s.datasets.values())
    # the runs moved the weights far more than they differ
    assert max(float((cpu[k] - start[k]).abs().max()) for k in cpu) > 1e-2
    for k in cpu:
        _close(gpu[k], cpu[k], k, rtol=1e-3, atol=2e-4)
    assert gpu_acc == pytest.approx(cpu_acc, abs=2e-3)


# ---- the ground station's encoder stage -----------------------------------------------------

SATS = ["sat-0", "sat-1"]


class _Ctx:
    def abort(self, code: grpc.StatusCode, message: str) -> None:
        raise RuntimeError(f"{code}: {message}")


def _prepared(tmp_path: Path, device: str) -> tuple[np.ndarray, np.ndarray, set[str]]:
    """Downlink 40 half-masked Fashion-MNIST images to a ground station whose encoder stage
    runs on `device`, Prepare; (train features, test features, devices the encoder ran on)."""
    sensor = SensorConfig(dataset=DatasetSpec("fashion_mnist", download=False),
                          mask=MaskSpec("fixed", 0.5), payload="patches", satellites=SATS,
                          train_subset=40, encoder_pooling="mean")
    cfg = GroundStationConfig(
        sensor=sensor, store_dir=tmp_path / device / "store", device=device, test_subset=64,
        training=TrainingConfig(strategy="centralized", workers=1, hidden=(16, 16)))
    station = GroundStation(cfg)
    server, address = build_server(station, "127.0.0.1:0")
    server.start()
    trainer = make_server()
    pb_grpc.add_TrainerServicer_to_server(TrainerServicer("t", torch.device("cpu")), trainer)
    trainer_address = bind(trainer, "127.0.0.1:0")
    trainer.start()
    ran_on: set[str] = set()
    encode = encoders.Encoder.encode

    def spy(self: encoders.Encoder, images: torch.Tensor, *args: object,
            **kwargs: object) -> torch.Tensor:
        ran_on.add(images.device.type)
        return encode(self, images, *args, **kwargs)  # type: ignore[arg-type]

    ch = channel(address)
    try:
        registry = pb_grpc.RegistryStub(ch)
        reply = registry.Register(pb.RegisterRequest(node_id="host", role=pb.SENSOR,
                                                     address="127.0.0.1:1", satellite_ids=SATS),
                                  wait_for_ready=True, timeout=30)
        registry.Register(pb.RegisterRequest(node_id="t", role=pb.TRAINER,
                                             address=trainer_address), timeout=30)
        sensors = SensorServicer.from_reply("host", SATS, reply, address)
        for sat in SATS:
            sent = sensors.Transmit(pb.TransmitRequest(satellite_id=sat, max_bytes=10**7),
                                    _Ctx())
            assert sent.error == "" and sent.remaining == 0
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(encoders.Encoder, "encode", spy)
            stages = list(pb_grpc.MissionStub(ch).Prepare(pb.PrepareRequest(), timeout=300))
        assert {"encode train", "encode test"} <= {s.stage for s in stages}
        assert station.train_tokens is not None and station.test_tokens is not None
        order = np.argsort(station.train_tokens.ids)  # stored order may differ between runs
        return (station.train_tokens.features[order], station.test_tokens.features, ran_on)
    finally:
        ch.close()
        server.stop(None)
        trainer.stop(None)
        if station.coordinator is not None:
            station.coordinator.close()


def test_ground_station_encoder_stage_runs_on_cuda(tmp_path: Path) -> None:
    cpu_train, cpu_test, cpu_ran = _prepared(tmp_path, "cpu")
    gpu_train, gpu_test, gpu_ran = _prepared(tmp_path, "cuda")

    assert cpu_ran == {"cpu"} and gpu_ran == {"cuda"}
    assert gpu_train.shape == cpu_train.shape == (40, 192)
    assert gpu_test.shape == cpu_test.shape == (64, 192)
    np.testing.assert_allclose(gpu_train, cpu_train, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gpu_test, cpu_test, rtol=1e-4, atol=1e-4)

