"""IST benchmark: wall time and bytes per epoch, and accuracy, vs K and strategy.

Run from the repo root:
    .venv/bin/python bench/ist.py [--rows 60000] [--epochs 1] [--device cpu|cuda]
        bytes and wall time per epoch on the paper's 768-1000-1000-10 MLP (random 768-d
        features: sizes and time do not depend on their values), for IST K = 1, 2, 4 and
        local SGD K = 2, 4, each with moments reset and travel.
    .venv/bin/python bench/ist.py --accuracy [--ratios 0,0.5] [--epochs 5] [--configs ...]
        best test accuracy on Fashion-MNIST tokens of the default encoder (fixed masks,
        the scenario's mean pooling), for the configurations named in --configs;
        --encoder NAME / --weights PATH for another encoder or checkpoint. Tokens are
        cached in --cache, keyed by the weights' sha256 (the encoder's name for random
        weights), the ratio and the subset sizes (--train-subset / --test-subset: the
        first N images of each split).
    .venv/bin/python bench/ist.py --smoke [--accuracy] [--configs ...]
        the same at tiny sizes, in seconds (512 rows or training images, 256 test images,
        2 local steps, configs ist_k2_reset and local_sgd_k2_reset unless --configs names
        others): what tests/test_bench_smoke.py runs.
Trainers are local `sparsat node trainer` processes on localhost, started as the local
launcher starts nodes (forked from its fork server), training on --device (default cpu; cuda
puts every trainer on this machine's GPU); the coordinator is the ground station's own,
talking real gRPC to them over TLS with node tokens (credentials made for the run in its log
folder, printed when a trainer fails). Every figure is measured from the messages; a
round's wall time (`round_wall_s`) is the median over rounds of its slowest trainer call
(parameters out, the L local steps, parameters back).
The last stdout line is one JSON object with every figure, including ist_k4_round_bytes and
local_sgd_k4_round_bytes (all workers, both directions, moments reset).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import torch
from tqdm import tqdm

from sparsat.bench import parse_args
from sparsat.ground_station.config import TrainingConfig
from sparsat.ground_station.coordinator import Coordinator
from sparsat.node.models.encoders import DEFAULT_ENCODER
from sparsat.node.wire import security
from sparsat.node.wire.rpc import channel
from sparsat.node.wire.security import GROUND_STATION, Credentials
from sparsat.proto.sparsat.v1 import sparsat_pb2 as pb
from sparsat.proto.sparsat.v1 import sparsat_pb2_grpc as pb_grpc
from sparsat.sim.deploy.certs import NodeSpec, make_deployment
from sparsat.sim.deploy.launcher import Proc, start_node

# name: (strategy, K, moments, subnet_scale)
CONFIGS: dict[str, tuple[str, int, str, str]] = {
    "ist_k1_travel": ("ist", 1, "travel", "none"),  # = centralized training
    "ist_k1_reset": ("ist", 1, "reset", "none"),
    "ist_k2_reset": ("ist", 2, "reset", "none"),
    "ist_k2_travel": ("ist", 2, "travel", "none"),
    "ist_k2_reset_scale": ("ist", 2, "reset", "k"),
    "ist_k2_travel_scale": ("ist", 2, "travel", "k"),
    "ist_k4_reset": ("ist", 4, "reset", "none"),
    "ist_k4_travel": ("ist", 4, "travel", "none"),
    "ist_k4_reset_scale": ("ist", 4, "reset", "k"),
    "ist_k4_travel_scale": ("ist", 4, "travel", "k"),
    "local_sgd_k2_reset": ("local_sgd", 2, "reset", "none"),
    "local_sgd_k2_travel": ("local_sgd", 2, "travel", "none"),
    "local_sgd_k4_reset": ("local_sgd", 4, "reset", "none"),
    "local_sgd_k4_travel": ("local_sgd", 4, "travel", "none"),
}
BYTES_CONFIGS = ["ist_k1_travel", "ist_k1_reset", "ist_k2_reset", "ist_k2_travel",
                 "ist_k4_reset", "ist_k4_travel", "local_sgd_k2_reset", "local_sgd_k4_reset",
                 "local_sgd_k4_travel"]
# 512 rows = 8 batches of 64: whole rounds for K * L = 1, 2, 4, 8 (L = 2)
SMOKE = {"rows": 512, "train_subset": 512, "test_subset": 256, "epochs": 1,
         "local_steps": 2, "ratios": "0.5", "configs": "ist_k2_reset,local_sgd_k2_reset"}
START_TIMEOUT_S = 120.0  # a trainer process's start-up (torch's import, CUDA's set-up)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 8) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return "\n".join(text.splitlines()[-lines:])


def _wait_serving(proc: Proc, node_id: str, address: str, log: Path,
                  timeout_s: float = START_TIMEOUT_S) -> None:
    """Until the trainer answers Health over TLS; a trainer that exits (bad credentials, a
    taken port) is reported with its log at once, not after the timeout."""
    ch = channel(address, peer=node_id)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                pb_grpc.HealthStub(ch).Check(pb.HealthRequest(), timeout=1.0,
                                             wait_for_ready=True)
                return
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise
            if proc.poll() is not None:
                raise SystemExit(f"{node_id} exited with code {proc.returncode} before "
                                 f"serving ({log}):\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise SystemExit(f"{node_id} did not serve on {address} in {timeout_s:.0f} s "
                                 f"({log}):\n{_tail(log)}")
    finally:
        ch.close()


@contextmanager
def local_trainers(k: int, log_dir: Path, device: str = "cpu"
                   ) -> Iterator[list[tuple[str, str]]]:
    """K trainer processes sharing this machine's cores (and GPU with device "cuda");
    yields (node_id, address). They speak TLS with node tokens, as a local run's do
    (sparsat.sim.deploy.launcher.LocalCluster): a throw-away CA in LOG_DIR/certs, a folder per
    trainer
    (`--certs`), and this process, whose coordinator is the ground station's, holds the
    ground station's credentials while they run."""
    threads = max(1, (os.cpu_count() or 1) // k)
    names = [f"trainer-{i}" for i in range(k)]
    certs = log_dir / "certs"
    make_deployment(certs, [NodeSpec(GROUND_STATION, "ground_station"),
                            *(NodeSpec(n, "trainer") for n in names)],
                    {"*": ("127.0.0.1",)}, days=1)
    previous = security.active()
    security.configure(Credentials.from_dir(certs / GROUND_STATION))
    procs: list[Proc] = []
    out: list[tuple[str, str]] = []
    try:
        for name in names:
            address = f"127.0.0.1:{_free_port()}"
            procs.append(start_node(name, [
                "--log-level", "warning", "node", "trainer", "--listen", address, "--id", name,
                "--device", device, "--threads", str(threads), "--certs", str(certs / name)],
                log_dir / f"{name}.log"))
            out.append((name, address))
        for proc, (name, address) in zip(procs, out, strict=True):
            _wait_serving(proc, name, address, log_dir / f"{name}.log")
        yield out
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=20)
        security.configure(previous)


def run_config(name: str, x: np.ndarray, y: np.ndarray, tx: np.ndarray, ty: np.ndarray,
               epochs: int, local_steps: int, n_classes: int, log_dir: Path,
               device: str = "cpu") -> dict[str, Any]:
    strategy, k, moments, scale = CONFIGS[name]
    cfg = TrainingConfig(strategy=strategy, workers=k, local_steps=local_steps,  # type: ignore[arg-type]
                         moments=moments, subnet_scale=scale, hidden=(1000, 1000),  # type: ignore[arg-type]
                         batch_size=64, lr=1e-3, seed=0)
    with local_trainers(k, log_dir, device) as trainers:
        coord = Coordinator(cfg, x.shape[1], n_classes)
        for node_id, address in trainers:
            coord.add_trainer(node_id, address)
        coord.set_dataset(f"bench-{len(x)}", x, y)
        test_x, test_y = torch.from_numpy(tx), torch.from_numpy(ty)
        accs, walls, epoch_bytes, round_bytes, upload = [], [], [], [], 0
        round_walls: list[float] = []
        try:
            for epoch in tqdm(range(1, epochs + 1), desc=name, unit="epoch", leave=False):
                t0 = time.perf_counter()
                r = coord.train_epoch(epoch, test_x, test_y)
                walls.append(time.perf_counter() - t0)
                accs.append(r.accuracy)
                upload += sum(w.sent + w.received for w in r.dataset_bytes)
                rounds = [sum(w.sent + w.received for w in ws) for ws in r.rounds]
                epoch_bytes.append(sum(rounds))
                round_bytes += rounds
                round_walls += [max(w.wall_s for w in ws) for ws in r.rounds if ws]
            failures = len(coord.failures)
        finally:
            coord.close()
    return {"strategy": strategy, "k": k, "moments": moments, "subnet_scale": scale,
            "rounds_per_epoch": len(round_bytes) // epochs,
            "round_bytes": int(np.mean(round_bytes)), "epoch_bytes": int(np.mean(epoch_bytes)),
            "dataset_bytes": upload, "epoch_wall_s": round(float(np.median(walls)), 2),
            "round_wall_s": round(float(np.median(round_walls)), 4) if round_walls else None,
            "accuracy": [round(a, 4) for a in accs], "best_accuracy": round(max(accs), 4),
            "failures": failures}


def weights_tag(encoder: str, weights: str | None) -> str:
    """A cache key for the encoder's weights: what the file holds, not its name."""
    from sparsat.node.models import encoders

    if weights == "random":
        return f"{encoder}_random"
    path = Path(weights) if weights else Path(encoders.config(encoder).default_weights)
    if not path.is_file():
        raise SystemExit(f"--weights {path}: no such file")
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def fmnist_tokens(ratio: float, cache: Path, encoder: str = DEFAULT_ENCODER,
                  weights: str | None = None, train_subset: int | None = None,
                  test_subset: int | None = None) -> tuple[np.ndarray, ...]:
    """Encoder tokens (mean pooling, fixed masks) of the train and test sets (the first
    `*_subset` images of each, or all); the encoder's shipped weights unless `weights` names
    others."""
    subsets = "".join(f"_{s}{n}" for s, n in (("train", train_subset), ("test", test_subset))
                      if n)
    path = cache / f"fmnist_tokens_{weights_tag(encoder, weights)}_r{ratio}{subsets}.npz"
    if path.exists():
        d = np.load(path)
        return d["x"], d["y"], d["tx"], d["ty"]
    from sparsat.ground_station.encoding import encode_split
    from sparsat.node.data.datasets import DatasetSpec, load_dataset
    from sparsat.node.data.masking import MaskSpec
    from sparsat.node.models import encoders

    enc = encoders.create(encoder, weights, pooling="mean")
    mask = MaskSpec("fixed", ratio, 0)
    spec = DatasetSpec("fashion_mnist")
    sets = []
    for split, subset in (("train", train_subset), ("test", test_subset)):
        data = load_dataset(spec, split)
        bar = tqdm(desc=f"encode {split} r={ratio}", unit="img", leave=False)

        def progress(done: int, total: int, bar: tqdm = bar) -> None:
            bar.total = total
            bar.update(done - bar.n)

        sets.append(encode_split(data, split, spec.name, mask, enc, 256, subset, 0,
                                 progress))
        bar.close()
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=sets[0].features, y=sets[0].labels, tx=sets[1].features, ty=sets[1].labels)
    return sets[0].features, sets[0].labels, sets[1].features, sets[1].labels


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--accuracy", action="store_true",
                   help="Fashion-MNIST tokens of the default encoder instead of random features")
    p.add_argument("--ratios", default="0,0.5", help="--accuracy: masking ratios")
    p.add_argument("--encoder", default=DEFAULT_ENCODER, help="--accuracy: encoder name")
    p.add_argument("--weights", help="--accuracy: encoder weights (default: the shipped ones)")
    p.add_argument("--configs", help="comma-separated names from: " + ", ".join(CONFIGS))
    p.add_argument("--train-subset", type=int,
                   help="--accuracy: the first N training images (default all)")
    p.add_argument("--test-subset", type=int,
                   help="--accuracy: the first N test images (default all)")
    p.add_argument("--rows", type=int, default=60000, help="random features: training rows")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                   help="where the trainer processes train (default cpu)")
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "sparsat-bench"),
                   help="--accuracy: where encoded tokens are kept between runs")
    args = parse_args(p, argv, SMOKE)
    names = args.configs.split(",") if args.configs else (
        list(CONFIGS) if args.accuracy else BYTES_CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown configs {unknown}; choose from {', '.join(CONFIGS)}")
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available on this machine")
    figures: dict[str, object] = {"epochs": args.epochs, "local_steps": args.local_steps,
                                  "cores": os.cpu_count(), "device": device}
    if device == "cuda":
        figures["cuda_device"] = torch.cuda.get_device_name(0)
    log_dir = Path(tempfile.mkdtemp(prefix="sparsat-bench-ist-"))
    if args.accuracy:
        datasets = {f"r{r}": fmnist_tokens(float(r), Path(args.cache), args.encoder,
                                           args.weights, args.train_subset, args.test_subset)
                    for r in args.ratios.split(",")}
    else:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((args.rows, 768), dtype=np.float32)
        y = rng.integers(0, 10, args.rows)
        datasets = {"random768": (x, y, x[:1000], y[:1000])}
    for data_name, (x, y, tx, ty) in datasets.items():
        for name in names:
            try:
                res = run_config(name, x, y, tx, ty, args.epochs, args.local_steps,
                                 int(max(y.max(), ty.max())) + 1, log_dir, device)
            except grpc.RpcError as e:
                print(f"{name}: {e.code().name} {e.details()} (logs in {log_dir})")
                raise
            figures[f"{data_name}/{name}"] = res
            print(f"{data_name:9s} {name:22s} round {res['round_bytes'] / 1e6:8.3f} MB  "
                  f"epoch {res['epoch_bytes'] / 1e6:9.1f} MB  {res['epoch_wall_s']:7.2f} s/epoch"
                  f"  {res['round_wall_s'] or 0:6.3f} s/round"
                  f"  best acc {res['best_accuracy']:.4f}", flush=True)
    first = next(iter(datasets))
    for key, cfg in (("ist_k4_round_bytes", "ist_k4_reset"),
                     ("local_sgd_k4_round_bytes", "local_sgd_k4_reset")):
        found = figures.get(f"{first}/{cfg}")
        if isinstance(found, dict):
            figures[key] = found["round_bytes"]
    if "ist_k4_round_bytes" in figures and "local_sgd_k4_round_bytes" in figures:
        ratio = int(figures["ist_k4_round_bytes"]) / int(figures["local_sgd_k4_round_bytes"])  # type: ignore[call-overload]
        figures["ist_over_local_sgd_k4"] = round(ratio, 4)
        print(f"IST K=4 round / local-SGD K=4 round (moments reset): {ratio:.4f}")
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
