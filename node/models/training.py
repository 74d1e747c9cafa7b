"""The training step, Adam with shippable state, and evaluation."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults
EPS = 1e-8


@dataclass
class AdamState:
    """Adam's moments and step counts per named parameter.

    `step[name]` is a 0-dim tensor when every element has had the same number of updates,
    else a tensor of the parameter's shape: IST's coordinator keeps per-element counts
    because off-diagonal W2 blocks skip the rounds their rows and columns are apart."""

    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    step: dict[str, torch.Tensor]

    @classmethod
    def zeros(cls, params: Mapping[str, torch.Tensor], full_steps: bool = False) -> AdamState:
        def step(p: torch.Tensor) -> torch.Tensor:
            return torch.zeros(p.shape if full_steps else (), dtype=torch.float32)

        return cls({n: torch.zeros_like(p) for n, p in params.items()},
                   {n: torch.zeros_like(p) for n, p in params.items()},
                   {n: step(p) for n, p in params.items()})

    def compact(self) -> AdamState:
        """Uniform step tensors become 0-dim: nothing per element travels when not needed."""
        def squeeze(t: torch.Tensor) -> torch.Tensor:
            if t.dim() and t.numel() and bool((t == t.reshape(-1)[0]).all()):
                return t.reshape(-1)[0].clone()
            return t

        return AdamState(dict(self.exp_avg), dict(self.exp_avg_sq),
                         {n: squeeze(t) for n, t in self.step.items()})

    def expand(self, like: Mapping[str, torch.Tensor]) -> AdamState:
        """Step tensors at the parameters' full shapes."""
        return AdamState(dict(self.exp_avg), dict(self.exp_avg_sq),
                         {n: t.expand(like[n].shape).clone() for n, t in self.step.items()})

    def to(self, device: torch.device) -> AdamState:
        # 0-dim step counts stay on the CPU: reading them never waits for a GPU
        return AdamState({n: t.to(device) for n, t in self.exp_avg.items()},
                         {n: t.to(device) for n, t in self.exp_avg_sq.items()},
                         {n: t if t.dim() == 0 else t.to(device) for n, t in self.step.items()})

    def check(self, params: Mapping[str, torch.Tensor]) -> None:
        """ValueError unless the state covers `params`: moments of their shapes, step counts
        scalar or of their shapes."""
        for name, p in params.items():
            for kind, table in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq)):
                if name not in table or table[name].shape != p.shape:
                    raise ValueError(f"{kind}.{name} must have shape {tuple(p.shape)}")
            t = self.step.get(name)
            if t is None or (t.dim() and t.shape != p.shape):
                raise ValueError(f"step.{name} must be a scalar or of shape {tuple(p.shape)}")


class Adam:
    """Adam with torch.optim.Adam's update, in its order of operations, over named
    parameters whose state can be sliced, shipped and merged (see AdamState)."""

    def __init__(self, params: Mapping[str, torch.Tensor], lr: float,
                 state: AdamState | None = None) -> None:
        self.params = dict(params)
        self.lr = lr
        if state is None:
            state = AdamState.zeros(self.params)
        try:
            state.check(self.params)
        except ValueError as e:
            raise ValueError(f"Adam state {e}") from e
        self.state = state.to(next(iter(self.params.values())).device)

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        b1, b2 = BETAS
        for name, p in self.params.items():
            if p.grad is None:
                continue
            g = p.grad
            m, v, t = self.state.exp_avg[name], self.state.exp_avg_sq[name], self.state.step[name]
            t += 1
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            if t.dim() == 0:  # exactly torch.optim.Adam's single-tensor path
                n = float(t)
                step_size = self.lr / (1 - b1**n)
                denom = (v.sqrt() / (1 - b2**n) ** 0.5).add_(EPS)
                p.addcdiv_(m, denom, value=-step_size)
            else:  # per-element counts
                denom = (v.sqrt() / (1 - b2**t).sqrt()).add_(EPS)
                p.sub_(m / denom * (self.lr / (1 - b1**t)))


def epoch_order(n_rows: int, seed: int, start: int = 0, replay: int = 0) -> np.ndarray:
    """The order a pass visits its rows in, identical on every machine (numpy's PCG64 stream
    is stable across versions), so a trainer and the coordinator agree on it from the seed
    alone.

    start == replay == 0: a seeded permutation of all `n_rows` rows. Otherwise a pass over a
    grown dataset's new rows (streaming missions): rows [start, n_rows), then `replay` rows
    drawn without replacement from the older [0, start), all permuted together, each draw
    from one generator seeded with `seed`; n_rows - start + replay rows. ValueError when
    start > n_rows or replay > start."""
    rng = np.random.default_rng(seed)
    if start == 0 and replay == 0:
        return rng.permutation(n_rows)  # the whole dataset, exactly as before subset passes
    if not 0 <= start <= n_rows or not 0 <= replay <= start:
        raise ValueError(f"a pass from row {start} replaying {replay} older rows: needs "
                         f"0 <= replay <= start <= {n_rows} (the dataset's rows)")
    older = rng.choice(start, size=replay, replace=False)
    return rng.permutation(np.concatenate([np.arange(start, n_rows), older]))


def steps_for(rows: int, batch_size: int) -> int:
    """Optimizer steps over `rows` rows in minibatches of `batch_size` (the last may be short)."""
    return -(-rows // batch_size)


def train_steps(
    model: nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    rows: torch.Tensor,
    batch_size: int,
    optimizer: Adam | torch.optim.Optimizer,
) -> tuple[int, float]:
    """One Adam step per `batch_size` rows of `rows` (row indices, in order); the last batch
    holds what is left. Every row is used exactly once. Returns (steps done, mean loss)."""
    if len(rows) == 0:
        return 0, 0.0
    device = features.device
    rows = rows.to(device)
    model.train()
    total = torch.zeros((), device=device)
    steps = 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        loss = F.cross_entropy(model(features[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.detach()
        steps += 1
    return steps, float(total) / steps


def step_flops(params: Mapping[str, torch.Tensor], batch: int) -> int:
    """FLOPs of one training step of an MLP with these parameters on `batch` rows: forward
    2 per multiply-add, backward twice the forward (input and weight gradients), and Adam's
    update about 10 per parameter. Used to put compute on the mission clock."""
    macs = sum(int(p.numel()) for n, p in params.items() if n.startswith("w"))
    n_params = sum(int(p.numel()) for p in params.values())
    return 6 * macs * batch + 10 * n_params


def train_flops(params: Mapping[str, torch.Tensor], rows: int, batch_size: int) -> int:
    """FLOPs of training on `rows` rows in minibatches of `batch_size`."""
    full, last = divmod(rows, batch_size)
    return full * step_flops(params, batch_size) + (step_flops(params, last) if last else 0)


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
