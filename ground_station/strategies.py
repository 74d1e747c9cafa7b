"""Training strategies by name (`TrainingConfig.strategy`): how a round splits the model
over its workers and how the pieces that come back are merged.

- `ist`: K workers; every round each hidden layer gets its own random permutation split into
  K disjoint groups, worker k trains its pieces and they go back in place; the shared output
  bias is averaged over the pieces that came back (`sparsat.ground_station.ist`). With
  `subnet_scale: k` a subnet's hidden outputs are scaled by K while it trains.
- `centralized`: IST with K = 1: one worker trains the whole network.
- `local_sgd`: K full replicas start each round from the same weights, train on their own
  minibatches, and are averaged (data-parallel baseline).

With travelling moments each piece's Adam state goes out with its weights and is written back
beside them; with reset moments the states are None and nothing but weights travels. The
coordinator runs the rounds (which rows, which trainers, failures); a strategy only says what
each worker trains and how the results are put together.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from sparsat.ground_station import ist
from sparsat.ground_station.config import TrainingConfig
from sparsat.node.models.training import AdamState

# worker -> (trained pieces, their moments when they travel); the workers whose call failed
# are missing, and their part of the model keeps its pre-round weights and moments
Returned = dict[int, tuple[ist.Params, AdamState | None]]


@dataclass(frozen=True)
class Split:
    """One round's work: worker w trains pieces[w], starting from states[w]. There are
    always the strategy's K pieces; a round with fewer jobs (fewer live trainers, or fewer
    rows left) sends only the first ones, and the rest stay as they are."""

    pieces: list[ist.Params]
    states: list[AdamState | None]
    scale: float  # hidden_scale sent with every job
    part: ist.Partition | None  # where the pieces go back; None: full replicas


class Strategy(ABC):
    def workers(self, cfg: TrainingConfig) -> int:
        """Trainers a round asks for (fewer when fewer are alive)."""
        return cfg.workers

    @abstractmethod
    def split(self, cfg: TrainingConfig, params: ist.Params, state: AdamState | None, k: int,
              generator: torch.Generator) -> Split:
        """The round's pieces for K = k workers (`state`: full-size moments, or None)."""

    @abstractmethod
    def merge(self, params: ist.Params, state: AdamState | None, split: Split,
              returned: Returned) -> None:
        """Write what the workers returned into `params` and `state`, in place."""


class Subnetworks(Strategy):
    """IST: disjoint subnetworks of a fresh random partition every round."""

    def split(self, cfg: TrainingConfig, params: ist.Params, state: AdamState | None, k: int,
              generator: torch.Generator) -> Split:
        part = ist.partition(cfg.hidden[0], cfg.hidden[1], k, generator)
        return Split([ist.subnet(params, part, w) for w in range(k)],
                     [_slice_state(state, part, w) for w in range(k)],
                     self.scale(cfg, k), part)

    def scale(self, cfg: TrainingConfig, k: int) -> float:
        return float(k) if cfg.subnet_scale == "k" else 1.0

    @torch.no_grad()
    def merge(self, params: ist.Params, state: AdamState | None, split: Split,
              returned: Returned) -> None:
        if not returned or split.part is None:
            return
        part = split.part
        ist.write_back(params, part, {w: p for w, (p, _) in returned.items()})
        if state is not None:
            states = {w: s for w, (p, s) in returned.items() if s is not None}
            ist.write_back(state.exp_avg, part, {w: s.exp_avg for w, s in states.items()})
            ist.write_back(state.exp_avg_sq, part, {w: s.exp_avg_sq for w, s in states.items()})
            ist.write_back(state.step, part, {w: s.expand(returned[w][0]).step
                                              for w, s in states.items()})


class Centralized(Subnetworks):
    """One worker trains the whole network (IST with K = 1, unscaled)."""

    def workers(self, cfg: TrainingConfig) -> int:
        return 1

    def scale(self, cfg: TrainingConfig, k: int) -> float:
        return 1.0


class LocalSGD(Strategy):
    """Full replicas, averaged: weights, and moments when they travel."""

    def split(self, cfg: TrainingConfig, params: ist.Params, state: AdamState | None, k: int,
              generator: torch.Generator) -> Split:
        return Split([dict(params) for _ in range(k)],
                     [state.compact() if state is not None else None for _ in range(k)],
                     1.0, None)

    @torch.no_grad()
    def merge(self, params: ist.Params, state: AdamState | None, split: Split,
              returned: Returned) -> None:
        if not returned:
            return
        for name in params:
            params[name] = torch.stack([p[name] for p, _ in returned.values()]).mean(0)
        if state is not None:
            back = [s for _, s in returned.values() if s is not None]
            for table, tables in ((state.exp_avg, [s.exp_avg for s in back]),
                                  (state.exp_avg_sq, [s.exp_avg_sq for s in back]),
                                  (state.step, [s.expand(params).step for s in back])):
                for name in table:
                    table[name] = torch.stack([t[name] for t in tables]).mean(0)


STRATEGIES: dict[str, Strategy] = {
    "ist": Subnetworks(),
    "centralized": Centralized(),
    "local_sgd": LocalSGD(),
}


def get(name: str) -> Strategy:
    """The strategy a scenario names; ValueError naming the known ones otherwise."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown training strategy {name!r}; known: "
                         f"{', '.join(sorted(STRATEGIES))}") from None


def _slice_state(state: AdamState | None, part: ist.Partition, w: int) -> AdamState | None:
    if state is None:
        return None
    return AdamState(ist.subnet(state.exp_avg, part, w), ist.subnet(state.exp_avg_sq, part, w),
                     ist.subnet(state.step, part, w)).compact()
