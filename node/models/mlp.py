"""The classifier trained on CLS tokens: d -> h1 -> h2 -> C, ReLU, biases on."""

from __future__ import annotations

import torch
from torch import nn

# Parameter names on the wire and in checkpoints, in layer order.
PARAM_NAMES = ("w1", "b1", "w2", "b2", "w3", "b3")


class MLP(nn.Module):
    def __init__(self, d_in: int, hidden1: int, hidden2: int, n_classes: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden1)
        self.fc2 = nn.Linear(hidden1, hidden2)
        self.fc3 = nn.Linear(hidden2, n_classes)
        # An IST subnet holding 1/K of each hidden layer may train with its hidden outputs
        # scaled by K, so the next layer sees sums of the full network's size.
        self.hidden_scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x))  # (B, h1)
        if self.hidden_scale != 1.0:
            x = x * self.hidden_scale
        x = torch.relu(self.fc2(x))  # (B, h2)
        if self.hidden_scale != 1.0:
            x = x * self.hidden_scale
        return self.fc3(x)  # (B, C)

    def wire_parameters(self) -> dict[str, torch.Tensor]:
        """The live parameters under their wire names (for the optimizer)."""
        return {"w1": self.fc1.weight, "b1": self.fc1.bias, "w2": self.fc2.weight,
                "b2": self.fc2.bias, "w3": self.fc3.weight, "b3": self.fc3.bias}

    def params(self) -> dict[str, torch.Tensor]:
        """Detached copies of the parameters under their wire names."""
        layers = (self.fc1, self.fc2, self.fc3)
        out: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(layers, start=1):
            out[f"w{i}"] = layer.weight.detach().clone()
            out[f"b{i}"] = layer.bias.detach().clone()
        return out

    @torch.no_grad()
    def load_params(self, params: dict[str, torch.Tensor]) -> None:
        for i, layer in enumerate((self.fc1, self.fc2, self.fc3), start=1):
            layer.weight.copy_(params[f"w{i}"])
            layer.bias.copy_(params[f"b{i}"])

    @classmethod
    def from_params(cls, params: dict[str, torch.Tensor]) -> MLP:
        """An MLP shaped by `params` (a whole model or one IST worker's subnet)."""
        missing = [n for n in PARAM_NAMES if n not in params]
        if missing:
            raise ValueError(f"MLP parameters missing: {missing}")
        h1, d_in = params["w1"].shape
        h2, h1b = params["w2"].shape
        n_classes, h2b = params["w3"].shape
        if h1b != h1 or h2b != h2 or params["b1"].shape != (h1,) or params["b2"].shape != (h2,):
            raise ValueError("MLP parameter shapes do not chain: " + ", ".join(
                f"{n}{tuple(params[n].shape)}" for n in PARAM_NAMES))
        if params["b3"].shape != (n_classes,):
            raise ValueError(f"b3 must have shape ({n_classes},), got {tuple(params['b3'].shape)}")
        model = cls(int(d_in), int(h1), int(h2), int(n_classes))
        model.load_params(params)
        return model
