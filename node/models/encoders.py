"""Visible-token ViT encoders, chosen by name.

An encoder turns an image and the indices of its visible tokens into one feature vector (the
CLS token after the final norm). Masked tokens never enter the transformer, MAE style:
patch-embed, add positional embedding, gather the visible tokens, prepend CLS (+ its
positional embedding), blocks, final norm, read CLS.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

Pooling = Literal["cls", "mean"]
Ragged = Literal["group", "pad"]


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
    default_weights: str = "random"  # what `weights=None` means: see `create`

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DEFAULT_ENCODER = "vit_tiny_d8_patch4_28"  # what scenarios, nodes and benchmarks use unless told
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"  # node/weights/

ENCODERS: dict[str, EncoderConfig] = {
    # The default: a small ViT for 28x28 grey images (Fashion-MNIST), a 7x7 grid of 4x4
    # patches, width 192, depth 8 (3.6 M parameters, 7.2 MB in fp16: the deepest that fits the
    # 8 MB checkpoint cap at this width), MAE-pretrained offline by `sparsat pretrain`
    # (docs/pretraining.md); the checkpoint ships here.
    "vit_tiny_d8_patch4_28": EncoderConfig(
        28, 4, 1, 192, 8, 3, (0.2860,), (0.3530,),
        default_weights=str(WEIGHTS_DIR / "vit_tiny_d8_patch4_28_fmnist_mae_e32.pt")),
    # The same, two blocks shallower (2.7 M parameters): the default until 2026-11-26.
    "vit_tiny_patch4_28": EncoderConfig(
        28, 4, 1, 192, 6, 3, (0.2860,), (0.3530,),
        default_weights=str(WEIGHTS_DIR / "vit_tiny_patch4_28_fmnist_mae_e32.pt")),
    # The paper's encoder: timm vit_base_patch16_224 with the official MAE weights, from
    # mae_pretrain_vit_base.pth (give its path) or timm's hub when the machine is online.
    "mae_vit_base_patch16": EncoderConfig(224, 16, 3, 768, 12, 12, IMAGENET_MEAN, IMAGENET_STD,
                                          default_weights="timm:vit_base_patch16_224.mae"),
}


def encode_flops(cfg: EncoderConfig, n_visible: int) -> int:
    """FLOPs of encoding one image from `n_visible` tokens (2 per multiply-add): the patch
    embedding of the visible patches, then per block (n + 1 tokens with CLS) the qkv and
    output projections (4 D^2), the MLP (8 D^2, ratio 4) and attention (2 n^2 D). Puts the
    encoder's compute on the mission clock; norms and softmax are left out."""
    d, n = cfg.embed_dim, n_visible + 1
    embed = n_visible * cfg.patch_size**2 * cfg.in_chans * d
    block = 12 * n * d * d + 2 * n * n * d
    return 2 * (embed + cfg.depth * block)


class EncoderWeightsError(FileNotFoundError):
    """Weights that cannot be found or do not fit the architecture."""


def config(name: str) -> EncoderConfig:
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; known: {', '.join(sorted(ENCODERS))}")
    return ENCODERS[name]


Precision = Literal["float32", "bfloat16"]
PRECISIONS = ("float32", "bfloat16")
NO_BF16_ENV = "SPARSAT_NO_BF16"  # set (to anything): act as a machine without bfloat16

log = logging.getLogger("sparsat.encoders")


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def bf16_refusal(device: torch.device) -> str | None:
    """Why `device` does not run bfloat16 natively (None when it does): a CPU needs
    AVX512-BF16 or AMX-BF16 (else bfloat16 is emulated, slower than float32), a GPU
    torch.cuda.is_bf16_supported()."""
    if os.environ.get(NO_BF16_ENV):
        return f"{NO_BF16_ENV} is set"
    if device.type == "cuda":
        with torch.cuda.device(device):
            native = torch.cuda.is_bf16_supported(including_emulation=False)
        return None if native else "this GPU has no native bfloat16"
    if device.type == "cpu":
        if {"avx512_bf16", "amx_bf16"} & _cpu_flags():
            return None
        return "this CPU has neither AVX512-BF16 nor AMX-BF16 (/proc/cpuinfo)"
    return f"no bfloat16 on {device.type}"


class Encoder(nn.Module):
    """A timm VisionTransformer run on visible tokens only."""

    mean: torch.Tensor
    std: torch.Tensor
    precision: Precision = "float32"  # what encode_canvases computes in (set_precision)
    precision_note: str = ""  # why the precision asked was not used, "" when it was

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

    def set_precision(self, asked: str) -> Precision:
        """Encode in `asked` from now on (bfloat16: torch.autocast; the weights stay float32)
        where this encoder's device runs it natively, else in float32 with
        `precision_note` saying why (call it after moving the encoder to its device)."""
        if asked not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {asked!r}")
        self.precision, self.precision_note = "float32", ""
        if asked == "bfloat16":
            why = bf16_refusal(self.mean.device)
            if why is None:
                self.precision = "bfloat16"
            else:
                self.precision_note = f"bfloat16 asked, float32 used: {why}"
                log.warning("encoder: %s", self.precision_note)
        return self.precision

    @property
    def dim(self) -> int:
        return self.cfg.embed_dim

    @property
    def num_tokens(self) -> int:
        return self.cfg.grid * self.cfg.grid

    def encode(self, images: torch.Tensor, visible_idx: torch.Tensor,
               valid: torch.Tensor | None = None) -> torch.Tensor:
        """images (B, C, S, S) normalised, visible_idx (B, L) -> features (B, D).

        The CLS token after the final norm, or with pooling "mean" the mean of the visible
        tokens' outputs. `valid` (B, L) bool marks real entries when rows were padded to a
        common L; padded entries are masked out of attention and of the mean.
        """
        x = self.forward_tokens(images, visible_idx, valid)  # (B, 1 + L, D)
        if self.pooling == "cls":
            return x[:, 0]
        if valid is None:
            return x[:, 1:].mean(1)
        w = valid.unsqueeze(-1).to(x.dtype)  # (B, L, 1)
        return (x[:, 1:] * w).sum(1) / w.sum(1)

    def forward_tokens(self, images: torch.Tensor, visible_idx: torch.Tensor,
                       valid: torch.Tensor | None = None) -> torch.Tensor:
        """All output tokens, CLS first: (B, 1 + L, D)."""
        vit = self.vit
        pos = vit.pos_embed
        assert pos is not None and vit.cls_token is not None  # built with class_token=True
        x = vit.patch_embed(images)  # (B, N, D)
        x = x + pos[:, 1:, :]
        idx = visible_idx.long().unsqueeze(-1).expand(-1, -1, x.shape[-1])
        x = torch.gather(x, 1, idx)  # (B, L, D)
        cls = (vit.cls_token + pos[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)  # (B, 1 + L, D)
        if valid is None:
            x = vit.blocks(x)
        else:
            keys = torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1)  # CLS always on
            mask = keys[:, None, None, :]  # (B, 1, 1, 1 + L): True = may be attended to
            for blk in vit.blocks:
                x = blk(x, attn_mask=mask)
        return vit.norm(x)

    def preprocess(self, canvases: np.ndarray) -> torch.Tensor:
        """uint8 canvases (B, H, W, C) -> normalised float (B, in_chans, S, S) on my device."""
        x = torch.from_numpy(np.ascontiguousarray(canvases)).to(self.mean.device)
        x = x.permute(0, 3, 1, 2).float() / 255.0
        if x.shape[1] != self.cfg.in_chans:
            # grey -> RGB by repetition, RGB -> grey by the mean: the encoder's channels rule
            x = x.mean(1, keepdim=True) if self.cfg.in_chans == 1 else x.expand(-1, 3, -1, -1)
        size = self.cfg.img_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std

    def preprocess_each(self, canvases: Sequence[np.ndarray]) -> torch.Tensor:
        """preprocess() for canvases whose sizes may differ (an imagefolder of mixed
        sizes): each is resized to the encoder's input on its own. The sensor tiled it into
        the g x g token grid in proportion to its own size (sparsat.node.data.tiles.tile_edges), so
        after
        the resize its tile i is the encoder's patch i, whatever its native size."""
        if len({c.shape for c in canvases}) <= 1:
            return self.preprocess(np.stack(canvases))
        return torch.cat([self.preprocess(c[None]) for c in canvases])

    @torch.no_grad()
    def encode_canvases(
        self, canvases: Sequence[np.ndarray], visible: Sequence[np.ndarray],
        batch_size: int = 256, ragged: Ragged = "group",
    ) -> np.ndarray:
        """Features (N, D) float32 for images whose visible counts may differ.

        ragged="group" batches images with the same number of visible tokens together (dense
        batches, no wasted work); "pad" pads every batch to its longest row and masks the
        padding in attention. Both use every token exactly once and keep the input order;
        bench/encoder.py measures which is faster.
        """
        out = np.empty((len(canvases), self.dim), dtype=np.float32)
        device = self.mean.device
        if ragged == "pad":
            batches = [list(range(s, min(s + batch_size, len(canvases))))
                       for s in range(0, len(canvases), batch_size)]
        else:
            groups: dict[int, list[int]] = {}
            for i, v in enumerate(visible):
                groups.setdefault(len(v), []).append(i)
            batches = [m[s : s + batch_size] for m in groups.values()
                       for s in range(0, len(m), batch_size)]
        for rows in batches:
            images = self.preprocess_each([canvases[i] for i in rows])
            width = max(len(visible[i]) for i in rows)
            idx = np.zeros((len(rows), width), dtype=np.int64)
            valid = np.zeros((len(rows), width), dtype=bool)
            for r, i in enumerate(rows):
                idx[r, : len(visible[i])] = visible[i]
                valid[r, : len(visible[i])] = True
            mask = None if valid.all() else torch.from_numpy(valid).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16,
                                enabled=self.precision == "bfloat16"):
                feats = self.encode(images, torch.from_numpy(idx).to(device), mask)
            out[rows] = feats.float().cpu().numpy()
        return out


def create(name: str, weights: str | Path | None = None, seed: int = 0,
           pooling: Pooling = "cls") -> Encoder:
    """Build encoder `name` with `weights`:

    - None: the encoder's default (the shipped checkpoint, or timm's hub for MAE ViT-B);
    - "random": random weights drawn from `seed` (identical on every machine with the same
      torch version, so a sensor and the ground station agree without shipping weights);
    - "timm:NAME": a pretrained timm model from the hub (needs internet);
    - a path: a timm-layout state dict, our fp16 checkpoint, or an official MAE checkpoint
      (`mae_pretrain_vit_base.pth`; a `_full` one has its decoder and mask token dropped).
    """
    cfg = config(name)
    spec = str(weights) if weights is not None else cfg.default_weights
    state = None  # found before the ViT is built: weights that are not there fail at once
    if spec.startswith("timm:"):
        state = _timm_state(spec[5:], name)
    elif spec != "random":
        state = _file_state(Path(spec), name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = Encoder(cfg, pooling)
    if state is not None:
        load_state(encoder, state, spec)
    return encoder.eval()


def _file_state(path: Path, name: str) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise EncoderWeightsError(
            f"weights for {name} not found: {path}. Give the path of a checkpoint (for "
            f"mae_vit_base_patch16: mae_pretrain_vit_base.pth from "
            f"https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth), "
            f"'timm:<model>' to download from timm's hub, or 'random'")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state:  # MAE's checkpoints wrap the weights
        state = state["model"]
    return {k: v for k, v in state.items() if not k.startswith("decoder") and k != "mask_token"}


HUB_PROBE_S = 3.0  # one look at the hub before timm's download, whose retries take a minute
HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm fetches, in its order


def _timm_state(timm_name: str, name: str) -> dict[str, torch.Tensor]:
    import timm
    from huggingface_hub import constants

    pretrained = timm.models.get_pretrained_cfg(timm_name)
    hub_id = getattr(pretrained, "hf_hub_id", None)
    offline = False
    if hub_id and not _hub_reachable():
        if not _hub_cached(hub_id):  # offline, nothing to load: say so now, not in a minute
            raise EncoderWeightsError(
                f"cannot get {timm_name} weights for {name}: timm's hub ({constants.ENDPOINT}) "
                f"does not answer and {hub_id} is not in its local cache "
                f"({constants.HF_HUB_CACHE}). Offline, download mae_pretrain_vit_base.pth "
                f"elsewhere and set `encoder.weights: /path/to/mae_pretrain_vit_base.pth` in "
                f"the scenario")
        offline = True  # in the cache: load it from there without the hub's retries
    try:
        with _hub_offline(offline):
            model = timm.create_model(timm_name, pretrained=True, num_classes=0)
    except Exception as e:  # offline, hub errors, unknown names: one clear message
        raise EncoderWeightsError(
            f"cannot get {timm_name} weights for {name} from timm's hub ({type(e).__name__}: "
            f"{e}). Offline, download mae_pretrain_vit_base.pth elsewhere and set "
            f"`encoder.weights: /path/to/mae_pretrain_vit_base.pth` in the scenario") from e
    return dict(model.state_dict())


def _hub_reachable(timeout_s: float | None = None) -> bool:
    """Whether the Hugging Face hub answers at all (any HTTP status), in one try of at most
    `timeout_s` (HUB_PROBE_S), name lookup included (the probe has its own thread: a lookup
    that hangs is not waited for). False at once in the hub's offline mode (HF_HUB_OFFLINE)."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return False
    timeout_s = HUB_PROBE_S if timeout_s is None else timeout_s
    answered: list[bool] = []

    def probe() -> None:
        request = urllib.request.Request(constants.ENDPOINT, method="HEAD")
        try:
            urllib.request.urlopen(request, timeout=timeout_s).close()
            answered.append(True)
        except urllib.error.HTTPError:
            answered.append(True)  # an error status is an answer: the hub is there
        except (OSError, ValueError):
            answered.append(False)

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(answered) and answered[0]


def _hub_cached(hub_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(hub_id, f), str) for f in HUB_FILES)


@contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """The hub's offline mode for one load (huggingface_hub reads the flag at each call)."""
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = before or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def load_state(encoder: Encoder, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a timm-layout state dict into the encoder's ViT; the classifier head is optional."""
    state = {k: v.float() for k, v in state.items() if not k.startswith("head")}
    try:
        missing, unexpected = encoder.vit.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise EncoderWeightsError(f"{source} does not fit {encoder.cfg}: {e}") from e
    missing = [k for k in missing if not k.startswith("head")]
    if missing or unexpected:
        raise EncoderWeightsError(
            f"{source} does not fit {encoder.cfg}: missing keys {missing[:5]}, unexpected "
            f"keys {unexpected[:5]}")


def hash_weights(h: hashlib.blake2b, encoder: Encoder) -> None:
    """Every weight of `encoder` into `h`: its name, dtype and shape, then its bytes (bfloat16
    as float32). Part of both token caches' keys (this module's weights_digest, and the
    ground station's encoder_digest)."""
    for name, tensor in encoder.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)], separators=(",", ":")).encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())


def weights_digest(encoder: Encoder) -> str:
    """What an encoder's output depends on besides its input: this module's code, torch (its
    build included), the architecture, pooling, precision, device kind and every weight's
    bytes. The on-board token cache's key (sparsat.node.processes.sensor)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(Path(__file__).read_bytes())
    h.update(json.dumps([torch.__version__, str(encoder.cfg), encoder.pooling,
                         encoder.precision, encoder.mean.device.type]).encode())
    hash_weights(h, encoder)
    return h.hexdigest()

