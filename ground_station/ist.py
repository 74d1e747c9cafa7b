"""Independent Subnetwork Training: partition, slice, write back (pure tensor functions).

Each round every hidden layer gets its own random permutation split into K disjoint
near-equal groups (K need not divide the width). Worker k gets
    w1[g1_k, :], b1[g1_k], w2[g2_k][:, g1_k], b2[g2_k], w3[:, g2_k], b3 (shared)
Trained pieces go back in place; the off-diagonal blocks of w2 are untouched that round, and
the shared output bias is averaged (the reference code never synchronised biases).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Partition:
    hidden1: list[torch.Tensor]  # K groups of neuron indices of layer 1
    hidden2: list[torch.Tensor]  # K groups of neuron indices of layer 2


def partition(width1: int, width2: int, k: int, generator: torch.Generator) -> Partition:
    if not 1 <= k <= min(width1, width2):
        raise ValueError(f"cannot split hidden layers of {width1} and {width2} into {k} groups")
    g1 = torch.randperm(width1, generator=generator).tensor_split(k)
    g2 = torch.randperm(width2, generator=generator).tensor_split(k)
    return Partition([g.sort().values for g in g1], [g.sort().values for g in g2])


def subnet(params: Params, part: Partition, k: int) -> Params:
    """Copies of worker k's pieces."""
    g1, g2 = part.hidden1[k], part.hidden2[k]
    return {
        "w1": params["w1"][g1].clone(),  # (h1/K, d)
        "b1": params["b1"][g1].clone(),
        "w2": params["w2"][g2][:, g1].clone(),  # (h2/K, h1/K)
        "b2": params["b2"][g2].clone(),
        "w3": params["w3"][:, g2].clone(),  # (C, h2/K)
        "b3": params["b3"].clone(),
    }


@torch.no_grad()
def write_back(params: Params, part: Partition, pieces: dict[int, Params]) -> None:
    """Write trained pieces in place; average the shared output bias over the workers that
    returned. Workers missing from `pieces` leave their neurons as they were."""
    for k, piece in pieces.items():
        g1, g2 = part.hidden1[k], part.hidden2[k]
        params["w1"][g1] = piece["w1"]
        params["b1"][g1] = piece["b1"]
        params["w2"][g2.unsqueeze(1), g1.unsqueeze(0)] = piece["w2"]
        params["b2"][g2] = piece["b2"]
        params["w3"][:, g2] = piece["w3"]
    if pieces:
        params["b3"].copy_(torch.stack([p["b3"] for p in pieces.values()]).mean(0))
