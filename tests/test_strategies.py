"""The strategy registry: names, workers per round, and split/merge as exact inverses."""

from __future__ import annotations

import pytest
import torch

from sparsat.ground_station import strategies
from sparsat.ground_station.config import TrainingConfig
from sparsat.node.models.mlp import MLP
from sparsat.node.models.training import AdamState


def _model() -> tuple[dict[str, torch.Tensor], AdamState]:
    torch.manual_seed(0)
    params = MLP(8, 6, 5, 3).params()
    state = AdamState.zeros(params, full_steps=True)
    for table in (state.exp_avg, state.exp_avg_sq, state.step):
        for name, t in table.items():
            table[name] = torch.rand_like(t) if name != "w1" or table is not state.step else t + 3
    return params, state


def test_registry_names_every_configurable_strategy() -> None:
    assert set(strategies.STRATEGIES) == {"ist", "centralized", "local_sgd"}
    with pytest.raises(ValueError, match="unknown training strategy 'fedavg'; known: "
                                         "centralized, ist, local_sgd"):
        strategies.get("fedavg")


@pytest.mark.parametrize(("name", "workers"), [("ist", 3), ("centralized", 1), ("local_sgd", 3)])
def test_workers_per_round_agree_with_the_config(name: str, workers: int) -> None:
    cfg = TrainingConfig(strategy=name, workers=3)  # type: ignore[arg-type]
    assert strategies.get(name).workers(cfg) == workers == cfg.num_workers


@pytest.mark.parametrize(("name", "subnet_scale", "scale"), [
    ("ist", "none", 1.0), ("ist", "k", 2.0), ("centralized", "k", 1.0), ("local_sgd", "k", 1.0)])
def test_pieces_returned_untouched_merge_back_to_the_same_model(
        name: str, subnet_scale: str, scale: float) -> None:
    cfg = TrainingConfig(strategy=name, hidden=(6, 5), subnet_scale=subnet_scale)  # type: ignore[arg-type]
    params, state = _model()
    before = {k: v.clone() for k, v in params.items()}
    moments = {k: v.clone() for k, v in state.exp_avg.items()}
    strategy = strategies.get(name)
    k = strategy.workers(cfg)
    split = strategy.split(cfg, params, state, k, torch.Generator().manual_seed(1))
    assert split.scale == scale and len(split.pieces) == len(split.states) == k
    if name != "local_sgd":  # disjoint pieces: together they hold every hidden unit once
        assert sum(p["b1"].numel() for p in split.pieces) == 6
    strategy.merge(params, state, split, dict(enumerate(zip(split.pieces, split.states,
                                                             strict=True))))
    for key in before:
        assert torch.equal(params[key], before[key]), key
        assert torch.allclose(state.exp_avg[key], moments[key]), key


@pytest.mark.parametrize("name", ["ist", "centralized", "local_sgd"])
def test_merge_writes_back_what_the_workers_trained(name: str) -> None:
    cfg = TrainingConfig(strategy=name, hidden=(6, 5))  # type: ignore[arg-type]
    params, state = _model()
    before = {k: v.clone() for k, v in params.items()}
    strategy = strategies.get(name)
    split = strategy.split(cfg, params, state, strategy.workers(cfg),
                           torch.Generator().manual_seed(1))
    trained = {w: ({k: v + 1 for k, v in p.items()}, s) for w, (p, s) in
               enumerate(zip(split.pieces, split.states, strict=True))}
    strategy.merge(params, state, split, trained)
    for key in ("w1", "b1", "b2", "w3", "b3"):  # every unit trained by exactly one worker
        assert torch.allclose(params[key], before[key] + 1), key
    changed = int((params["w2"] != before["w2"]).sum())
    if split.part is None or len(split.pieces) == 1:
        assert changed == 30  # replicas averaged, or the one worker's whole network
    else:  # only the diagonal blocks of w2 were trained
        assert changed == sum(len(a) * len(b) for a, b in
                              zip(split.part.hidden1, split.part.hidden2, strict=True)) < 30
