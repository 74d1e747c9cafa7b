"""Visible-token ViT encoders, chosen by name.

An encoder turns an image and the indices of its visible tokens into one feature vector (the
CLS token after the final norm). Masked tokens never enter the transformer, MAE style:
patch-embed, add positional embedding, gather the visible tokens, prepend CLS (+ its
positional embedding), blocks, final norm, read CLS.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

Pooling = Literal["cls", "mean"]


@dataclass(frozen=True)
class EncoderConfig:
    img_size: int
    patch_size: int
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ENCODERS: dict[str, EncoderConfig] = {
    # Small ViT for 28x28 grey images (Fashion-MNIST): a 7x7 grid of 4x4 patches.
    "vit_tiny_patch4_28": EncoderConfig(28, 4, 1, 192, 6, 3, (0.2860,), (0.3530,)),
    # The paper's encoder: timm vit_base_patch16_224, MAE-pretrained weights.
    "mae_vit_base_patch16": EncoderConfig(224, 16, 3, 768, 12, 12, IMAGENET_MEAN, IMAGENET_STD),
}


def config(name: str) -> EncoderConfig:
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; known: {', '.join(sorted(ENCODERS))}")
    return ENCODERS[name]


class Encoder(nn.Module):
    """A timm VisionTransformer run on visible tokens only."""

    def __init__(self, cfg: EncoderConfig, pooling: Pooling = "cls") -> None:
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be cls or mean, got {pooling!r}")
        self.cfg = cfg
        self.pooling = pooling
        self.vit = VisionTransformer(
            img_size=cfg.img_size,
            patch_size=cfg.patch_size,
            in_chans=cfg.in_chans,
            embed_dim=cfg.embed_dim,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            num_classes=0,
        )
        self.register_buffer("mean", torch.tensor(cfg.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std).view(1, -1, 1, 1), persistent=False)

    @property
    def grid(self) -> int:
        return self.cfg.grid

    @property
    def dim(self) -> int:
        return self.cfg.embed_dim

    @property
    def num_tokens(self) -> int:
        return self.cfg.grid * self.cfg.grid

    def encode(self, images: torch.Tensor, visible_idx: torch.Tensor) -> torch.Tensor:
        """images (B, C, S, S) normalised, visible_idx (B, L) -> features (B, D).

        The CLS token after the final norm, or with pooling "mean" the mean of the visible
        tokens' outputs.
        """
        x = self.forward_tokens(images, visible_idx)  # (B, 1 + L, D)
        return x[:, 1:].mean(1) if self.pooling == "mean" else x[:, 0]

    def forward_tokens(self, images: torch.Tensor, visible_idx: torch.Tensor) -> torch.Tensor:
        """All output tokens, CLS first: (B, 1 + L, D)."""
        vit = self.vit
        x = vit.patch_embed(images)  # (B, N, D)
        x = x + vit.pos_embed[:, 1:, :]
        idx = visible_idx.long().unsqueeze(-1).expand(-1, -1, x.shape[-1])
        x = torch.gather(x, 1, idx)  # (B, L, D)
        cls = (vit.cls_token + vit.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + L, D)
        x = vit.blocks(x)
        return vit.norm(x)

    def preprocess(self, canvases: np.ndarray) -> torch.Tensor:
        """uint8 canvases (B, H, W, C) -> normalised float (B, in_chans, S, S)."""
        x = torch.from_numpy(np.ascontiguousarray(canvases)).permute(0, 3, 1, 2).float() / 255.0
        if x.shape[1] != self.cfg.in_chans:
            # grey -> RGB by repetition, RGB -> grey by the mean: the encoder's channels rule
            x = x.mean(1, keepdim=True) if self.cfg.in_chans == 1 else x.expand(-1, 3, -1, -1)
        size = self.cfg.img_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return ((x - self.mean) / self.std).to(self.mean.device)

    @torch.no_grad()
    def encode_canvases(
        self, canvases: Sequence[np.ndarray], visible: Sequence[np.ndarray], batch_size: int = 256
    ) -> np.ndarray:
        """CLS tokens (N, D) float32 for images whose visible counts may differ.

        Images are grouped by their number of visible tokens so each forward is a dense batch;
        every token of every image is used exactly once and the output keeps the input order.
        """
        out = np.empty((len(canvases), self.dim), dtype=np.float32)
        groups: dict[int, list[int]] = {}
        for i, v in enumerate(visible):
            groups.setdefault(len(v), []).append(i)
        device = self.mean.device
        for members in groups.values():
            for start in range(0, len(members), batch_size):
                rows = members[start : start + batch_size]
                images = self.preprocess(np.stack([canvases[i] for i in rows]))
                idx = torch.from_numpy(np.stack([visible[i] for i in rows]).astype(np.int64))
                out[rows] = self.encode(images, idx.to(device)).float().cpu().numpy()
        return out


def create(name: str, weights: str | Path | None = None, seed: int = 0,
           pooling: Pooling = "cls") -> Encoder:
    """Build encoder `name`; random weights drawn from `seed` unless a weights file is given.

    The seed makes a sensor's encoder and the ground station's identical without shipping
    weights, as long as both run the same torch version.
    """
    cfg = config(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = Encoder(cfg, pooling)
    if weights is not None:
        load_weights(encoder, Path(weights))
    return encoder.eval()


def load_weights(encoder: Encoder, path: Path) -> None:
    """Load a timm-layout state dict, or an MAE checkpoint (`'model'` dict, decoder dropped)."""
    if not path.exists():
        raise FileNotFoundError(f"encoder weights not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state:
        state = state["model"]
    drop: Callable[[str], bool] = lambda k: k.startswith("decoder") or k == "mask_token"  # noqa: E731
    state = {k: v for k, v in state.items() if not drop(k)}
    missing, unexpected = encoder.vit.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("head")]
    if missing or unexpected:
        raise ValueError(f"{path}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
