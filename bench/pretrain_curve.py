"""Loss curve of a chain of `sparsat pretrain` runs, each continuing the one before (--init).

Run from the repo root:
    .venv/bin/python bench/pretrain_curve.py RECORD.json [RECORD.json ...] [--out PNG]
Each RECORD is a run's `pretrain.json` (or the `.json` committed beside a checkpoint), given
in the order the runs were chained. Prints the per-epoch loss and training time of the whole
chain and, with --out, plots it with the run boundaries marked. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> dict[str, object]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("records", nargs="+", help="pretrain.json files, first run first")
    p.add_argument("--out", help="write the plot here (PNG)")
    args = p.parse_args(argv)
    losses: list[float] = []
    bounds: list[int] = []
    minutes = 0.0
    for path in args.records:
        record = json.loads(Path(path).read_text())
        history = record.get("history")
        if not history:
            raise SystemExit(f"{path}: no per-epoch history (is it a pretrain.json?)")
        cfg = record["config"]
        print(f"{path}: {len(history)} epochs, lr {cfg['lr']}, seed {cfg['seed']}, "
              f"mask {cfg['mask_ratio']}, {history[-1]['elapsed_s'] / 60:.1f} min")
        losses += [h["loss"] for h in history]
        minutes += history[-1]["elapsed_s"] / 60
        bounds.append(len(losses))
    for start in range(0, len(losses), 12):
        row = losses[start : start + 12]
        print(f"epochs {start + 1:>2}-{start + len(row):<2} "
              + " ".join(f"{v:.3f}" for v in row))
    print(f"{len(losses)} epochs, {minutes:.1f} min of training time")
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(range(1, len(losses) + 1), losses, marker="o", ms=3)
        for b in bounds[:-1]:
            ax.axvline(b + 0.5, color="grey", ls=":", lw=1)
        ax.set_xlabel("epoch (dotted: a continuation starts, fresh warm-up)")
        ax.set_ylabel("masked-patch loss (norm_pix)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.out, dpi=120)
        print(f"plot: {args.out}")
    figures: dict[str, object] = {"epochs": len(losses), "minutes": round(minutes, 1),
                                  "final_loss": round(losses[-1], 4),
                                  "loss": [round(v, 4) for v in losses]}
    print(json.dumps(figures))
    return figures


if __name__ == "__main__":
    main()
