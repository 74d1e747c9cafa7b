"""`sparsat pretrain`: the encoder the nodes deploy, MAE-pretrained on a dataset's unlabelled
training images (sparsat.node.models.pretrain does the training; docs/pretraining.md)."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_pretrain(args: argparse.Namespace) -> int:
    import numpy as np

    from sparsat.node.data.datasets import DatasetSpec, load_dataset
    from sparsat.node.models.encoders import config
    from sparsat.node.models.pretrain import DecoderConfig, PretrainConfig, pretrain
    from sparsat.node.models.training import resolve_device

    resolve_device(args.device)  # an unavailable device fails before the dataset is read

    cfg = PretrainConfig(encoder=args.encoder, dataset=args.dataset, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, mask_ratio=args.mask_ratio,
                         seed=args.seed,
                         decoder=DecoderConfig(args.decoder_dim, args.decoder_depth, 4),
                         warmup_epochs=args.warmup_epochs,
                         init=str(Path(args.init).resolve()) if args.init else None)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    data = load_dataset(DatasetSpec(args.dataset, root=args.data_root), "train")
    size = config(args.encoder).img_size
    if data.image_shape is None or data.image_shape[:2] != (size, size):
        raise ValueError(f"pretraining needs {size}x{size} images; {args.dataset} has "
                         f"{data.image_shape}")
    # training images only, labels never read
    images = np.stack([data.image(i) for i in range(len(data))])
    out = pretrain(images, cfg, Path(args.out), stop_after=args.stop_after, device=args.device)
    print(f"encoder weights: {out}" if out else "stopped; resume with the same command")
    return 0
