"""Encoder quality: accuracy of the MLP probe vs masking ratio (centralized).

Run from the repo root:
    .venv/bin/python bench/probe.py [--weights PATH|random] [--ratios 0,0.25,0.5,0.75,0.9]
        [--epochs 10] [--pooling cls|mean] [--train-subset N] [--validation N]
        [--test-subset N] [--smoke]
Fixed masks (drawn from the seed and each sample_id, as sensors do), the visible tokens
encoded by the same code the ground station runs, the paper's MLP (d-1000-1000-C, Adam lr
1e-3, batch 64) trained centrally. The probe trains on --train-subset training images (all
but the validation split's, by default) and picks its epoch on a validation split of
--validation other training images (5,000, at most a fifth of the split), never on the test
set: per ratio it prints the validation accuracy of that epoch and its test accuracy (the
`validation_accuracy` and `test_at_best` figures; `best_accuracy`, the best test accuracy of
any epoch, is printed beside them for comparison with earlier runs) and ends with one JSON
line. bench/gpu_check.py's adoption rule compares validation accuracies. It measures
features, not transport: no gRPC here. --smoke: 128 training, 64 validation and 64 test
images, r = 0.5, 2 epochs (seconds).
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
from sparsat.node.data import sharding
from sparsat.node.data.datasets import DatasetSpec, load_dataset
from sparsat.node.data.masking import MaskSpec, stable_seed
from sparsat.node.models import encoders
from sparsat.node.models.mlp import MLP
from sparsat.node.models.training import epoch_order, evaluate, train_steps

SMOKE = {"train_subset": 128, "validation": 64, "test_subset": 64, "ratios": "0.5",
         "epochs": 2}
VALIDATION = 5000  # default validation images (at most a fifth of the training split)


def probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
          epochs: int, seed: int, n_classes: int,
          val: tuple[np.ndarray, np.ndarray] | None = None
          ) -> tuple[list[float], list[float]]:
    """(test, validation) accuracy after each epoch of centralized MLP training (no
    validation figures without `val`)."""
    torch.manual_seed(seed)
    model = MLP(train_x.shape[1], 1000, 1000, n_classes)
    x, y = torch.from_numpy(train_x), torch.from_numpy(train_y)
    tx, ty = torch.from_numpy(test_x), torch.from_numpy(test_y)
    steps = len(x) // 64
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)  # one Adam for the whole run
    accs, val_accs = [], []
    for epoch in range(epochs):
        order = torch.from_numpy(epoch_order(len(x), stable_seed(seed, "probe", epoch)))
        train_steps(model, x, y, order[: steps * 64], 64, optimizer)
        accs.append(evaluate(model, tx, ty)[0])
        if val is not None:
            val_accs.append(evaluate(model, torch.from_numpy(val[0]),
                                     torch.from_numpy(val[1]))[0])
    return accs, val_accs


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
    p.add_argument("--validation", type=int, default=VALIDATION,
                   help="validation images the epoch is chosen on (training images the "
                        "probe does not train on)")
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
    n = len(train)
    n_val = min(args.validation, n // 5)
    n_train = args.train_subset if args.train_subset is not None else n - n_val
    train_idx = sharding.train_subset(n, n_train, args.seed)
    val_idx = sharding.validation_indices(n, n_train, n_val, args.seed)
    figures: dict[str, object] = {"encoder": args.encoder, "weights": args.weights or "default",
                                  "pooling": args.pooling, "epochs": args.epochs,
                                  "train_images": len(train_idx),
                                  "validation_images": len(val_idx)}
    for r in (float(v) for v in args.ratios.split(",")):
        mask = MaskSpec("fixed", r, args.seed)
        bars = {s: tqdm(desc=f"r={r} encode {s}", unit="img", leave=False)
                for s in ("train", "validation", "test")}

        def progress(split: str, bars: dict[str, tqdm] = bars) -> Callable[[int, int], None]:
            def update(done: int, total: int) -> None:
                bars[split].total = total
                bars[split].update(done - bars[split].n)
            return update

        tr = encode_split(train, "train", spec.name, mask, enc, 256,
                          progress=progress("train"), indices=train_idx)
        va = encode_split(train, "train", spec.name, mask, enc, 256,
                          progress=progress("validation"), indices=val_idx)
        te = encode_split(test, "test", spec.name, mask, enc, 256, args.test_subset,
                          args.seed, progress("test"))
        for bar in bars.values():
            bar.close()
        d = tr.features.shape[1] // len(poolings)
        for k, pooling in enumerate(poolings):
            cols = slice(k * d, (k + 1) * d)
            accs, val_accs = probe(tr.features[:, cols], tr.labels, te.features[:, cols],
                                   te.labels, args.epochs, args.seed, train.num_classes,
                                   (va.features[:, cols], va.labels))
            chosen = int(np.argmax(val_accs))  # the epoch the validation split picks
            best = max(accs)
            figures[f"{pooling}_r{r}_validation_accuracy"] = round(val_accs[chosen], 4)
            figures[f"{pooling}_r{r}_test_at_best"] = round(accs[chosen], 4)
            figures[f"{pooling}_r{r}_best_epoch"] = chosen + 1
            figures[f"{pooling}_r{r}_best_accuracy"] = round(best, 4)
            figures[f"{pooling}_r{r}_curve"] = [round(a, 4) for a in accs]
            figures[f"{pooling}_r{r}_validation_curve"] = [round(a, 4) for a in val_accs]
            print(f"{pooling:4s} r={r:<5} validation {val_accs[chosen]:.4f} at epoch "
                  f"{chosen + 1}/{args.epochs}: test {accs[chosen]:.4f} (best test of any "
                  f"epoch {best:.4f})", flush=True)
    figures["runtime_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
