"""MAE pretraining of a small encoder on unlabelled images (He et al., 2022).

The encoder is the same `Encoder` the system uses (visible tokens only); a light decoder
reconstructs the masked patches' pixels from the encoder's tokens and mask tokens; the loss
is the MSE on masked patches only, against per-patch normalised pixels (norm_pix_loss).
Positional embeddings are fixed 2D sin-cos, as in MAE. Training checkpoints every epoch and
resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from timm.models.vision_transformer import Block
from torch import nn
from tqdm import tqdm

from sparsat.node.models.encoders import DEFAULT_ENCODER, Encoder, EncoderConfig, config
from sparsat.node.models.training import resolve_device


def sincos_2d(dim: int, grid: int, cls_token: bool) -> torch.Tensor:
    """Fixed 2D sin-cos positional embedding (1, [1 +] grid*grid, dim): half the channels
    encode the row, half the column; the CLS position is zeros."""
    if dim % 4:
        raise ValueError(f"sin-cos embedding needs dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")

    def embed(pos: np.ndarray) -> np.ndarray:
        out = np.outer(pos.reshape(-1), omega)  # (N, dim/4)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([embed(cols), embed(rows)], axis=1)  # (N, dim)
    if cls_token:
        emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
    return torch.from_numpy(emb).float().unsqueeze(0)


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), row-major patches."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


@dataclass(frozen=True)
class DecoderConfig:
    dim: int = 96
    depth: int = 1
    num_heads: int = 4


class MaskedAutoencoder(nn.Module):
    decoder_pos_embed: torch.Tensor
    def __init__(self, encoder: Encoder, dec: DecoderConfig) -> None:
        super().__init__()
        self.encoder = encoder
        cfg = encoder.cfg
        n = cfg.grid * cfg.grid
        pos = encoder.vit.pos_embed
        assert pos is not None
        with torch.no_grad():
            pos.copy_(sincos_2d(cfg.embed_dim, cfg.grid, cls_token=True))
        pos.requires_grad_(False)
        self.decoder_embed = nn.Linear(cfg.embed_dim, dec.dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec.dim))
        self.register_buffer("decoder_pos_embed", sincos_2d(dec.dim, cfg.grid, cls_token=True))
        self.decoder_blocks = nn.ModuleList(
            Block(dec.dim, dec.num_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(dec.depth))
        self.decoder_norm = nn.LayerNorm(dec.dim)
        self.decoder_pred = nn.Linear(dec.dim, cfg.patch_size**2 * cfg.in_chans)
        nn.init.normal_(self.mask_token, std=0.02)
        self.n_tokens = n

    def forward(self, images: torch.Tensor, mask_ratio: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
        b, n = images.shape[0], self.n_tokens
        keep = max(1, int(n * (1 - mask_ratio)))
        noise = torch.rand(b, n, generator=generator).to(images.device)
        visible = torch.argsort(noise, dim=1)[:, :keep].sort(dim=1).values  # (B, L)
        latent = self.encoder.forward_tokens(images, visible)  # (B, 1 + L, D)
        x = self.decoder_embed(latent)  # (B, 1 + L, Dd)
        full = self.mask_token.expand(b, n, -1).clone()  # (B, N, Dd)
        full.scatter_(1, visible.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x[:, 1:])
        x = torch.cat([x[:, :1], full], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]  # (B, N, p*p*C)
        target = patchify(images, self.encoder.cfg.patch_size)
        mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5  # norm_pix_loss
        per_patch = ((pred - target) ** 2).mean(-1)  # (B, N)
        masked = torch.ones(b, n, device=images.device)
        masked.scatter_(1, visible, 0.0)
        return (per_patch * masked).sum() / masked.sum()


@dataclass(frozen=True)
class PretrainConfig:
    encoder: str = DEFAULT_ENCODER
    dataset: str = "fashion_mnist"
    epochs: int = 32  # the shipped default encoder's recipe (docs/pretraining.md)
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    mask_ratio: float = 0.75
    seed: int = 0
    decoder: DecoderConfig = DecoderConfig()
    init: str | None = None  # start from this last.pt's weights (a new schedule, fresh AdamW)


def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _load_init(model: MaskedAutoencoder, init: object, path: str) -> bool:
    """Load an earlier run's weights; returns True when only its encoder fitted.

    The encoder must match; a decoder of another width or depth is left freshly initialised,
    so a run can go on with a larger decoder than the one it started with.
    """
    if not isinstance(init, dict) or not isinstance(init.get("model"), dict):
        raise ValueError(f"--init {path}: not a pretraining checkpoint (no 'model' weights)")
    state = init["model"]
    # decided up front: a failed strict load_state_dict has already copied every tensor
    # whose shape matched, which would leave the "fresh" decoder partly the old one
    own = model.state_dict()
    if state.keys() == own.keys() and all(state[k].shape == own[k].shape for k in own):
        model.load_state_dict(state)
        return False
    encoder = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    try:
        model.encoder.load_state_dict(encoder)
    except RuntimeError as e:
        raise ValueError(f"--init {path}: not a pretraining checkpoint of this encoder "
                         f"({e})") from e
    return True


def pretrain(images: np.ndarray, cfg: PretrainConfig, work_dir: Path,
             log: Callable[[str], None] = print, stop_after: int | None = None,
             device: str = "cpu") -> Path | None:
    """MAE-pretrain `cfg.encoder` on uint8 images (N, H, W, C) at the encoder's input size.

    Checkpoints to work_dir/last.pt every epoch (resumed from if present) and writes the
    final encoder weights, fp16, to work_dir/encoder.pt; returns that path. With `stop_after`,
    stops (checkpointed, returning None) after that many epochs of this call: a later call
    resumes, and every epoch's randomness is seeded by (seed, epoch), so the result is the
    same as one uninterrupted run. `device` ("cpu", "cuda", "auto") is where the model
    trains; the masks and the data order come from CPU generators whatever it is, and a
    checkpoint made on one device resumes on another.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    enc_cfg: EncoderConfig = config(cfg.encoder)
    torch.manual_seed(cfg.seed)
    model = MaskedAutoencoder(Encoder(enc_cfg), cfg.decoder).to(resolve_device(device))
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim > 1
             and "token" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and (p.ndim <= 1
                or "token" in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    steps_per_epoch = len(images) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    history: list[dict[str, float]] = []
    start_epoch, elapsed = 0, 0.0
    ckpt = work_dir / "last.pt"
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)  # copied in below
        if state["config"] != asdict(cfg):
            raise ValueError(f"{ckpt} was made with another configuration; use a new directory")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, history, elapsed = state["epoch"], state["history"], state["elapsed_s"]
        log(f"resuming from {ckpt} after epoch {start_epoch}")
    elif cfg.init:
        init = torch.load(cfg.init, map_location="cpu", weights_only=False)
        fresh_decoder = _load_init(model, init, cfg.init)
        history = []  # this run's epochs only; the earlier run's are in its own pretrain.json
        log(f"starting from the weights of {cfg.init} ({init['epoch']} epochs)"
            + (": its encoder only, with a fresh decoder (the decoders differ)"
               if fresh_decoder else ""))
    data = torch.from_numpy(images)
    end = cfg.epochs if stop_after is None else min(cfg.epochs, start_epoch + stop_after)
    for epoch in range(start_epoch, end):
        t0 = time.monotonic()
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        order = torch.randperm(len(data), generator=gen)
        model.train()
        losses = []
        bar = tqdm(range(steps_per_epoch), desc=f"pretrain {epoch + 1}/{cfg.epochs}",
                   unit="step", leave=False)
        for i in bar:
            step = epoch * steps_per_epoch + i
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, total, cfg.warmup_epochs * steps_per_epoch, cfg.lr)
            batch = data[order[i * cfg.batch_size : (i + 1) * cfg.batch_size]]
            x = model.encoder.preprocess(batch.numpy())
            flip = (torch.rand(len(x), generator=gen) < 0.5).to(x.device)
            x[flip] = x[flip].flip(-1)  # the only augmentation: masking does the rest
            loss = model(x, cfg.mask_ratio, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
        elapsed += time.monotonic() - t0
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)),
                        "elapsed_s": elapsed})
        log(f"epoch {epoch + 1}/{cfg.epochs}: loss {history[-1]['loss']:.4f} "
            f"({elapsed / 60:.1f} min so far)")
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                    "epoch": epoch + 1, "history": history, "elapsed_s": elapsed,
                    "config": asdict(cfg)}, tmp)
        tmp.replace(ckpt)  # atomic: an interrupt never leaves half a checkpoint
    if end < cfg.epochs:
        return None
    out = work_dir / "encoder.pt"
    weights = {k: v.half().cpu() for k, v in model.encoder.vit.state_dict().items()}
    torch.save(weights, out)
    (work_dir / "pretrain.json").write_text(json.dumps(
        {"config": asdict(cfg), "history": history, "elapsed_s": elapsed}, indent=2) + "\n")
    return out
