"""Encoder quality: best test accuracy of the MLP probe vs masking ratio (centralized).

Run from the repo root:
    .venv/bin/python bench/probe.py [--weights PATH|random] [--ratios 0,0.25,0.5,0.75,0.9]
        [--epochs 10] [--pooling cls|mean] [--train-subset N] [--test-subset N] [--smoke]
Fixed masks (drawn from the seed and each sample_id, as sensors do), the visible tokens
encoded by the same code the ground station runs, the paper's MLP (d-1000-1000-C, Adam lr
1e-3, batch 64) trained centrally; prints the best test accuracy per ratio and ends with one
JSON line. It measures features, not transport: no gRPC here. --smoke: 128 training and
64 test images, r = 0.5, 2 epochs (seconds).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from sparsat.bench import parse_args
from sparsat.ground_station.encoding import encode_split
from sparsat.node.data.datasets import DatasetSpec, load_dataset
from sparsat.node.data.masking import MaskSpec, stable_seed
from sparsat.node.models import encoders
from sparsat.node.models.mlp import MLP
from sparsat.node.models.training import epoch_order, evaluate, train_steps

SMOKE = {"train_subset": 128, "test_subset": 64, "ratios": "0.5", "epochs": 2}


def probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
          epochs: int, seed: int, n_classes: int) -> list[float]:
    """Accuracy after each epoch of centralized MLP training."""
    torch.manual_seed(seed)
    model = MLP(train_x.shape[1], 1000, 1000, n_classes)
    x, y = torch.from_numpy(train_x), torch.from_numpy(train_y)
    tx, ty = torch.from_numpy(test_x), torch.from_numpy(test_y)
    steps = len(x) // 64
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)  # one Adam for the whole run
    accs = []
    for epoch in range(epochs):
        order = torch.from_numpy(epoch_order(len(x), stable_seed(seed, "probe", epoch)))
        train_steps(model, x, y, order[: steps * 64], 64, optimizer)
        accs.append(evaluate(model, tx, ty)[0])
    return accs


class BothPoolings(encoders.Encoder):
    """The same encoder returning [CLS, mean of visible tokens]: one pass, two probes."""

    def __init__(self, enc: encoders.Encoder) -> None:
        super().__init__(enc.cfg)
        self.load_state_dict(enc.state_dict())
        self.eval()

    @property
    def dim(self) -> int:
        return 2 * self.cfg.embed_dim

    def encode(self, images: torch.Tensor, visible_idx: torch.Tensor,
               valid: torch.Tensor | None = None) -> torch.Tensor:
        x = self.forward_tokens(images, visible_idx, valid)
        return torch.cat([x[:, 0], x[:, 1:].mean(1)], dim=1)


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", default=encoders.DEFAULT_ENCODER)
    p.add_argument("--weights", default=None, help="default: the encoder's default weights")
    p.add_argument("--pooling", default="cls", choices=["cls", "mean", "both"],
                   help="both: one encoding pass, CLS and mean probed separately")
    p.add_argument("--ratios", default="0,0.25,0.5,0.75,0.9")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    args = parse_args(p, argv, SMOKE)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    spec = DatasetSpec("fashion_mnist")
    train, test = load_dataset(spec, "train"), load_dataset(spec, "test")
    enc = encoders.create(args.encoder, args.weights)
    if args.pooling == "mean":
        enc.pooling = "mean"
    elif args.pooling == "both":
        enc = BothPoolings(enc)
    poolings = ["cls", "mean"] if args.pooling == "both" else [args.pooling]
    figures: dict[str, object] = {"encoder": args.encoder, "weights": args.weights or "default",
                                  "pooling": args.pooling, "epochs": args.epochs}
    for r in (float(v) for v in args.ratios.split(",")):
        mask = MaskSpec("fixed", r, args.seed)
        bars = {s: tqdm(desc=f"r={r} encode {s}", unit="img", leave=False)
                for s in ("train", "test")}

        def progress(split: str, bars: dict[str, tqdm] = bars) -> Callable[[int, int], None]:
            def update(done: int, total: int) -> None:
                bars[split].total = total
                bars[split].update(done - bars[split].n)
            return update

        tr = encode_split(train, "train", spec.name, mask, enc, 256, args.train_subset,
                          args.seed, progress("train"))
        te = encode_split(test, "test", spec.name, mask, enc, 256, args.test_subset,
                          args.seed, progress("test"))
        for bar in bars.values():
            bar.close()
        d = tr.features.shape[1] // len(poolings)
        for k, pooling in enumerate(poolings):
            cols = slice(k * d, (k + 1) * d)
            accs = probe(tr.features[:, cols], tr.labels, te.features[:, cols], te.labels,
                         args.epochs, args.seed, train.num_classes)
            best = max(accs)
            figures[f"{pooling}_r{r}_best_accuracy"] = round(best, 4)
            figures[f"{pooling}_r{r}_curve"] = [round(a, 4) for a in accs]
            print(f"{pooling:4s} r={r:<5} best {best:.4f} "
                  f"(epoch {int(np.argmax(accs)) + 1}/{args.epochs})", flush=True)
    figures["runtime_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
