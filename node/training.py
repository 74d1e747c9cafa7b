"""The training step and evaluation, as plain functions of explicit arguments."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def minibatch_indices(n_rows: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """(steps, batch) row indices: passes over seeded permutations, so no row repeats
    within a pass. Drawn on the CPU so a worker's batches do not depend on its device."""
    gen = torch.Generator().manual_seed(seed)
    need = steps * batch_size
    passes = [torch.randperm(n_rows, generator=gen) for _ in range(-(-need // n_rows))]
    return torch.cat(passes)[:need].view(steps, batch_size)


def train_steps(
    model: nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    optimizer: torch.optim.Optimizer | None = None,
) -> tuple[int, float]:
    """Exactly `steps` Adam steps on minibatches drawn from (features, labels).

    Returns (steps done, mean loss). Without `optimizer`, a fresh Adam: moments start at zero.
    """
    if steps <= 0:
        return 0, 0.0
    device = features.device
    if optimizer is None:
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batches = minibatch_indices(len(features), steps, batch_size, seed).to(device)
    model.train()
    total = torch.zeros((), device=device)
    for rows in batches:
        loss = F.cross_entropy(model(features[rows]), labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
    return steps, float(total) / steps


@torch.no_grad()
def evaluate(
    model: nn.Module, features: torch.Tensor, labels: torch.Tensor, batch_size: int = 4096
) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) over the whole set."""
    model.eval()
    correct, loss = 0, 0.0
    for start in range(0, len(features), batch_size):
        logits = model(features[start : start + batch_size])
        y = labels[start : start + batch_size]
        correct += int((logits.argmax(-1) == y).sum())
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
    n = max(1, len(features))
    return correct / n, loss / n


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device
