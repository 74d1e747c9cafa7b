"""MAE pretraining: an interrupted run resumes to the same weights; the pieces it uses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sparsat.node.models import encoders
from sparsat.node.models.pretrain import (
    DecoderConfig,
    PretrainConfig,
    patchify,
    pretrain,
    sincos_2d,
)


def _images(n: int = 192) -> np.ndarray:
    rng = np.random.default_rng(0)
    # structured images (stripes of random phase) so there is something to reconstruct
    x = np.arange(28)
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    img = 127 + 120 * np.sin(x[None, None, :] / 3.0 + phase) * np.ones((n, 28, 1))
    return img.astype(np.uint8)[..., None]


CFG = PretrainConfig(epochs=2, batch_size=64, lr=1e-3, warmup_epochs=1,
                     decoder=DecoderConfig(32, 1, 2))


def test_resumed_run_equals_uninterrupted_run(tmp_path: Path) -> None:
    images = _images()
    whole = pretrain(images, CFG, tmp_path / "whole", log=lambda _: None)

    first = pretrain(images, CFG, tmp_path / "split", log=lambda _: None, stop_after=1)
    logs: list[str] = []
    resumed = pretrain(images, CFG, tmp_path / "split", log=logs.append)

    assert first is None and whole is not None and resumed is not None
    assert any("resuming" in line for line in logs)
    a, b = torch.load(whole), torch.load(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and the checkpoint is a working encoder, fp16 on disk
    assert a["pos_embed"].dtype == torch.float16
    enc = encoders.create(CFG.encoder, weights=whole)
    assert enc.encode(torch.zeros(1, 1, 28, 28), torch.arange(49)[None]).shape == (1, 192)


def test_a_different_config_does_not_resume(tmp_path: Path) -> None:
    pretrain(_images(), CFG, tmp_path, log=lambda _: None, stop_after=1)
    other = PretrainConfig(**{**CFG.__dict__, "mask_ratio": 0.5})

    with pytest.raises(ValueError, match="another configuration"):
        pretrain(_images(), other, tmp_path, log=lambda _: None)


def test_patchify_and_sincos() -> None:
    img = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    patches = patchify(img, 4)  # (2, 4, 16)
    assert patches.shape == (2, 4, 16)
    assert torch.equal(patches[0, 1], img[0, 0, 0:4, 4:8].reshape(-1))
    emb = sincos_2d(8, 3, cls_token=True)
    assert emb.shape == (1, 10, 8) and torch.all(emb[0, 0] == 0)
    assert len({tuple(r.tolist()) for r in emb[0, 1:]}) == 9  # every position distinct


def test_init_continues_from_an_earlier_runs_weights(tmp_path: Path) -> None:
    first = pretrain(_images(), CFG, tmp_path / "first", log=lambda _: None)
    assert first is not None
    # a vanishing learning rate: the continued run ends where the earlier one did
    cont = PretrainConfig(**{**CFG.__dict__, "epochs": 1, "lr": 1e-12,
                             "init": str(tmp_path / "first" / "last.pt")})
    seen: list[str] = []
    out = pretrain(_images(), cont, tmp_path / "cont", log=seen.append)
    assert out is not None and any("starting from the weights" in line for line in seen)
    a, b = torch.load(first), torch.load(out)
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-3) for k in a)
    fresh = pretrain(_images(), PretrainConfig(**{**cont.__dict__, "init": None}),
                     tmp_path / "fresh", log=lambda _: None)
    assert fresh is not None
    c = torch.load(fresh)
    assert not all(torch.allclose(a[k].float(), c[k].float(), atol=1e-3) for k in a)
    # another decoder: the encoder carries over, the decoder starts fresh, all of it, even
    # the parts whose shapes match (here the width is the same, one block more)
    deeper = PretrainConfig(**{**cont.__dict__, "decoder": DecoderConfig(32, 2, 2)})
    seen.clear()
    out = pretrain(_images(), deeper, tmp_path / "deeper", log=seen.append)
    assert out is not None and any("fresh decoder" in line for line in seen)
    d = torch.load(out)
    assert all(torch.allclose(a[k].float(), d[k].float(), atol=1e-3) for k in a)
    old = torch.load(tmp_path / "first" / "last.pt", weights_only=False)["model"]
    new = torch.load(tmp_path / "deeper" / "last.pt", weights_only=False)["model"]
    for k in ("mask_token", "decoder_embed.weight", "decoder_blocks.0.attn.qkv.weight",
              "decoder_pred.weight"):
        assert old[k].shape == new[k].shape and not torch.allclose(old[k], new[k], atol=1e-3), k


def test_init_refuses_what_is_not_this_encoders_checkpoint(tmp_path: Path) -> None:
    assert pretrain(_images(), CFG, tmp_path / "first", log=lambda _: None) is not None
    state = torch.load(tmp_path / "first" / "last.pt", weights_only=False)
    state["model"]["encoder.vit.pos_embed"] = torch.zeros(1, 17, 192)  # another grid
    torch.save(state, tmp_path / "other.pt")
    torch.save({"weights": {}}, tmp_path / "junk.pt")
    for path, match in [(tmp_path / "other.pt", "not a pretraining checkpoint of this encoder"),
                        (tmp_path / "junk.pt", "no 'model' weights")]:
        cfg = PretrainConfig(**{**CFG.__dict__, "epochs": 1, "init": str(path)})
        with pytest.raises(ValueError, match=match):
            pretrain(_images(), cfg, tmp_path / path.stem, log=lambda _: None)


def test_unavailable_device_is_a_clear_error(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="CUDA is not available"):
        pretrain(_images(), CFG, tmp_path / "gpu", log=lambda _: None, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_checkpoint_resumes_on_cuda(tmp_path: Path) -> None:
    # one epoch on the CPU, the second on the GPU: the result loads and is close to a CPU run
    assert pretrain(_images(), CFG, tmp_path / "mixed", log=lambda _: None, stop_after=1) is None
    mixed = pretrain(_images(), CFG, tmp_path / "mixed", log=lambda _: None, device="cuda")
    cpu = pretrain(_images(), CFG, tmp_path / "cpu", log=lambda _: None)
    assert mixed is not None and cpu is not None
    a, b = torch.load(mixed), torch.load(cpu)
    assert all(v.device.type == "cpu" for v in a.values())
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=5e-2) for k in a)
    encoders.create(CFG.encoder, weights=mixed)
