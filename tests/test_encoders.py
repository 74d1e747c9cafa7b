"""Encoders: visible-token forward equals MAE's forward_encoder; ragged batches; loaders."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparsat.node.models import encoders
from sparsat.node.models.encoders import Encoder, EncoderConfig, EncoderWeightsError

SMALL = EncoderConfig(28, 4, 1, 64, 3, 4, (0.5,), (0.25,))


def mae_forward_encoder_reference(state: dict[str, torch.Tensor], imgs: torch.Tensor,
                                  ids_keep: torch.Tensor, patch: int, heads: int,
                                  depth: int) -> torch.Tensor:
    """facebookresearch/mae models_mae.py forward_encoder, re-done with plain tensor ops on
    the official key layout (no timm): patch embed, + pos, keep ids_keep, prepend CLS (+ its
    pos), pre-norm blocks, final norm; returns the CLS token."""
    w = state["patch_embed.proj.weight"]
    x = F.conv2d(imgs, w, state["patch_embed.proj.bias"], stride=patch)  # (B, D, g, g)
    x = x.flatten(2).transpose(1, 2) + state["pos_embed"][:, 1:, :]
    x = torch.stack([x[b, ids_keep[b]] for b in range(len(x))])  # MAE's gather
    cls = state["cls_token"] + state["pos_embed"][:, :1, :]
    x = torch.cat([cls.expand(len(x), -1, -1), x], dim=1)
    dim = x.shape[-1]

    def ln(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(t, (dim,), state[f"{name}.weight"], state[f"{name}.bias"], 1e-6)

    for i in range(depth):
        p = f"blocks.{i}"
        h = ln(x, f"{p}.norm1")
        qkv = h @ state[f"{p}.attn.qkv.weight"].T + state[f"{p}.attn.qkv.bias"]
        q, k, v = qkv.reshape(len(x), -1, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-2, -1)) * (dim // heads) ** -0.5).softmax(-1)
        h = (att @ v).transpose(1, 2).reshape(len(x), -1, dim)
        x = x + h @ state[f"{p}.attn.proj.weight"].T + state[f"{p}.attn.proj.bias"]
        h = ln(x, f"{p}.norm2")
        h = F.gelu(h @ state[f"{p}.mlp.fc1.weight"].T + state[f"{p}.mlp.fc1.bias"])
        x = x + h @ state[f"{p}.mlp.fc2.weight"].T + state[f"{p}.mlp.fc2.bias"]
    return ln(x, "norm")[:, 0]


def _randomised(cfg: EncoderConfig, seed: int = 0) -> Encoder:
    torch.manual_seed(seed)
    enc = Encoder(cfg).eval()
    with torch.no_grad():  # timm's init leaves cls_token ~0 and biases 0: make them count
        for p in enc.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return enc


@pytest.mark.parametrize("keep", [49, 24, 12, 1])
def test_visible_token_encoding_matches_mae_forward_encoder(keep: int) -> None:
    enc = _randomised(SMALL)
    imgs = torch.randn(3, 1, 28, 28)
    gen = torch.Generator().manual_seed(keep)
    # MAE keeps ids in shuffled order; ours are sorted: attention does not care
    ids_keep = torch.stack([torch.randperm(49, generator=gen)[:keep] for _ in range(3)])
    state = {k: v.detach() for k, v in enc.vit.state_dict().items()}

    with torch.no_grad():
        ours = enc.encode(imgs, ids_keep.sort(dim=1).values)
    ref = mae_forward_encoder_reference(state, imgs, ids_keep, 4, SMALL.num_heads, SMALL.depth)

    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_vit_base_matches_reference_on_its_real_architecture() -> None:
    enc = _randomised(encoders.config("mae_vit_base_patch16"))
    imgs = torch.randn(2, 3, 224, 224)
    ids_keep = torch.stack([torch.randperm(196)[:49] for _ in range(2)])
    state = {k: v.detach() for k, v in enc.vit.state_dict().items()}

    with torch.no_grad():
        ours = enc.encode(imgs, ids_keep.sort(dim=1).values)
    ref = mae_forward_encoder_reference(state, imgs, ids_keep, 16, 12, 12)

    assert ours.shape == (2, 768)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
@pytest.mark.parametrize("ragged", ["group", "pad"])
def test_mixed_visible_counts_equal_one_by_one(pooling: str, ragged: str) -> None:
    enc = _randomised(SMALL)
    enc.pooling = pooling
    rng = np.random.default_rng(0)
    canvases = [rng.integers(0, 256, (28, 28, 1), dtype=np.uint8) for _ in range(9)]
    visible = [np.sort(rng.permutation(49)[: n]).astype(np.uint16)
               for n in (49, 3, 24, 24, 1, 30, 3, 49, 12)]

    batched = enc.encode_canvases(canvases, visible, batch_size=4, ragged=ragged)  # type: ignore[arg-type]
    single = np.concatenate([enc.encode_canvases([c], [v]) for c, v in zip(canvases, visible,
                                                                           strict=True)])

    np.testing.assert_allclose(batched, single, atol=2e-5, rtol=1e-4)


def test_mean_pooling_is_the_mean_of_visible_outputs() -> None:
    enc = _randomised(SMALL)
    imgs = torch.randn(2, 1, 28, 28)
    idx = torch.tensor([[0, 5, 9, 48], [1, 2, 3, 4]])
    enc.pooling = "mean"

    with torch.no_grad():
        pooled = enc.encode(imgs, idx)
        tokens = enc.forward_tokens(imgs, idx)

    torch.testing.assert_close(pooled, tokens[:, 1:].mean(1))


def test_loads_official_mae_checkpoint_layout(tmp_path: Path) -> None:
    # mae_pretrain_vit_base_full.pth layout: {'model': encoder keys + decoder_* + mask_token}
    src = _randomised(encoders.config("vit_tiny_patch4_28"), seed=1)
    state = dict(src.vit.state_dict())
    state["mask_token"] = torch.zeros(1, 1, 128)
    state["decoder_embed.weight"] = torch.zeros(128, 192)
    state["decoder_pos_embed"] = torch.zeros(1, 50, 128)
    path = tmp_path / "mae_pretrain_full.pth"
    torch.save({"model": state, "epoch": 799}, path)

    enc = encoders.create("vit_tiny_patch4_28", weights=path)

    for k, v in src.vit.state_dict().items():
        torch.testing.assert_close(enc.vit.state_dict()[k], v, rtol=0, atol=0)


def test_weights_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    state = dict(_randomised(SMALL).vit.state_dict())  # width 64, the encoder wants 192
    torch.save(state, tmp_path / "small.pt")
    del state["norm.weight"]

    with pytest.raises(EncoderWeightsError, match="does not fit"):
        encoders.create("vit_tiny_patch4_28", weights=tmp_path / "small.pt")


def test_missing_weights_say_where_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(EncoderWeightsError, match="mae_pretrain_vit_base.pth"):
        encoders.create("mae_vit_base_patch16", weights=tmp_path / "nope.pth")


def test_hub_errors_give_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm

    def offline(*args: object, **kwargs: object) -> None:  # what timm raises with no network
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(encoders, "_hub_reachable", lambda: True)  # answers, then fails
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(EncoderWeightsError, match="Offline, download"):
        encoders.create("mae_vit_base_patch16")


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[bool]:
    """The hub's endpoint on a loopback port nobody listens on (no traffic leaves the
    machine), an empty local cache, and timm's download recorded (the hub's offline flag
    during each call) instead of run."""
    import timm
    from huggingface_hub import constants

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    calls: list[bool] = []

    def download(*args: object, **kwargs: object) -> None:
        calls.append(constants.HF_HUB_OFFLINE)
        raise OSError("not downloading in a test")

    monkeypatch.setattr(timm, "create_model", download)
    return calls


def test_hub_weights_offline_fail_in_seconds_with_a_clear_error(hub: list[bool]) -> None:
    # Execute: MAE ViT-B's default weights, from a hub that does not answer (before: a minute
    # of the hub's retries, for both file names, then the error)
    t0 = time.monotonic()
    with pytest.raises(EncoderWeightsError) as err:
        encoders.create("mae_vit_base_patch16")
    took_s = time.monotonic() - t0

    # Assert
    assert "does not answer" in str(err.value) and "not in its local cache" in str(err.value)
    assert "mae_pretrain_vit_base.pth" in str(err.value)
    # never tried to download; the probe gives up after 3 s (before: about 60 s of retries)
    assert hub == [] and took_s < 20


def test_a_hub_that_never_answers_is_given_up_after_the_probes_limit(
        hub: list[bool], monkeypatch: pytest.MonkeyPatch) -> None:
    # Arrange: a port that takes the connection and never answers
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setattr(encoders, "HUB_PROBE_S", 0.5)

        # Execute
        t0 = time.monotonic()
        reachable = encoders._hub_reachable()
        took_s = time.monotonic() - t0

    # Assert
    assert not reachable and 0.4 < took_s < 10  # given up, not waited out


def test_cached_hub_weights_load_offline_without_the_hubs_retries(
        hub: list[bool], monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(encoders, "_hub_cached", lambda hub_id: True)

    with pytest.raises(EncoderWeightsError, match="not downloading in a test"):
        encoders.create("mae_vit_base_patch16")

    assert hub == [True] and constants.HF_HUB_OFFLINE is False  # offline for that call only


def test_the_hubs_offline_mode_skips_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.request

    from huggingface_hub import constants

    probed: list[object] = []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # HF_HUB_OFFLINE=1
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **kw: probed.append(a))

    assert encoders._hub_reachable() is False and probed == []


def test_random_weights_are_reproducible() -> None:
    a = encoders.create("vit_tiny_patch4_28", weights="random", seed=5)
    b = encoders.create("vit_tiny_patch4_28", weights="random", seed=5)
    c = encoders.create("vit_tiny_patch4_28", weights="random", seed=6)

    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert not torch.equal(a.vit.patch_embed.proj.weight, c.vit.patch_embed.proj.weight)


def test_unknown_encoder_and_pooling() -> None:
    with pytest.raises(ValueError, match="unknown encoder"):
        encoders.create("resnet50")
    with pytest.raises(ValueError, match="pooling"):
        Encoder(SMALL, pooling="max")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["vit_tiny_d8_patch4_28", "vit_tiny_patch4_28"])
def test_shipped_checkpoints_load_and_are_small(name: str) -> None:
    path = Path(encoders.config(name).default_weights)
    assert path.exists(), "the offline encoders' weights must ship with the package"
    assert path.stat().st_size <= 8 * 1024 * 1024
    enc = encoders.create(name)  # weights=None: the shipped checkpoint
    random = encoders.create(name, weights="random")
    assert not torch.equal(enc.vit.blocks[0].attn.qkv.weight, random.vit.blocks[0].attn.qkv.weight)


def test_every_default_names_the_same_encoder() -> None:
    from sparsat.node.data.config import SensorConfig
    from sparsat.sim.cli import parser
    from sparsat.sim.scenario.schema import EncoderCfg

    # the default encoder's weights=None is a checkpoint that ships with the package
    assert Path(encoders.config(encoders.DEFAULT_ENCODER).default_weights).parent == (
        encoders.WEIGHTS_DIR)
    assert SensorConfig.encoder == EncoderCfg().name == encoders.DEFAULT_ENCODER
    pre = parser().parse_args(["pretrain", "--out", "x"])
    assert pre.encoder == encoders.DEFAULT_ENCODER


def test_deeper_tiny_encoder_fits_the_checkpoint_cap() -> None:
    enc = encoders.create("vit_tiny_d8_patch4_28", weights="random")
    assert len(enc.vit.blocks) == 8 and enc.dim == 192 and enc.grid == 7
    fp16_bytes = sum(t.numel() * 2 for t in enc.vit.state_dict().values())
    assert 6 * 1024 * 1024 < fp16_bytes <= 8 * 1024 * 1024, fp16_bytes
