"""Tests for sparsat.ground_station.ist: partition, subnet slicing and in-place write-back."""

from __future__ import annotations

import pytest
import torch

from sparsat.ground_station import ist
from sparsat.ground_station.ist import Params, Partition
from sparsat.node.models.mlp import MLP

D, H1, H2, C = 6, 5, 4, 3  # a small d-h1-h2-C MLP: w1 (5, 6), w2 (4, 5), w3 (3, 4)


def _params(seed: int = 0) -> Params:
    g = torch.Generator().manual_seed(seed)
    return {
        "w1": torch.randn(H1, D, generator=g),
        "b1": torch.randn(H1, generator=g),
        "w2": torch.randn(H2, H1, generator=g),
        "b2": torch.randn(H2, generator=g),
        "w3": torch.randn(C, H2, generator=g),
        "b3": torch.randn(C, generator=g),
    }


def _clone(params: Params) -> Params:
    return {k: v.clone() for k, v in params.items()}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- partition ------------------------------------------------------------------------------


@pytest.mark.parametrize("width1", [1000, 999])
@pytest.mark.parametrize("width2", [1000, 999])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 7])
def test_partition_groups_are_disjoint_complete_and_balanced(
    width1: int, width2: int, k: int
) -> None:
    # Execute
    part = ist.partition(width1, width2, k, _gen())

    # Assert
    for groups, width in ((part.hidden1, width1), (part.hidden2, width2)):
        assert len(groups) == k
        joined = torch.cat(groups)
        assert len(joined) == width  # no neuron twice ...
        assert torch.equal(joined.sort().values, torch.arange(width))  # ... and none missing
        sizes = [len(g) for g in groups]
        assert max(sizes) - min(sizes) <= 1
        for g in groups:
            assert torch.equal(g, g.sort().values)


def test_partition_k1_gives_every_neuron_to_the_one_worker() -> None:
    # Execute
    part = ist.partition(7, 5, 1, _gen())

    # Assert
    assert torch.equal(part.hidden1[0], torch.arange(7))
    assert torch.equal(part.hidden2[0], torch.arange(5))


def test_partition_layers_get_independent_permutations() -> None:
    # Execute
    part = ist.partition(100, 100, 4, _gen(3))

    # Assert: both layers the same width, yet split differently
    assert any(not torch.equal(a, b) for a, b in zip(part.hidden1, part.hidden2, strict=True))


def test_partition_is_reproducible_from_the_generator_and_changes_with_it() -> None:
    # Execute
    a = ist.partition(50, 40, 3, _gen(1))
    b = ist.partition(50, 40, 3, _gen(1))
    c = ist.partition(50, 40, 3, _gen(2))

    # Assert
    assert all(torch.equal(x, y) for x, y in zip(a.hidden1 + a.hidden2, b.hidden1 + b.hidden2,
                                                  strict=True))
    assert any(not torch.equal(x, y) for x, y in zip(a.hidden1, c.hidden1, strict=True))


@pytest.mark.parametrize(("w1", "w2", "k"), [(10, 10, 0), (10, 10, -1), (10, 4, 5), (3, 10, 4)])
def test_partition_rejects_bad_k(w1: int, w2: int, k: int) -> None:
    with pytest.raises(ValueError, match="groups"):
        ist.partition(w1, w2, k, _gen())


# ---- subnet ---------------------------------------------------------------------------------


@pytest.mark.parametrize("k_workers", [1, 2, 3])
def test_subnet_takes_exactly_the_workers_slices(k_workers: int) -> None:
    # Prepare
    params = _params()
    part = ist.partition(H1, H2, k_workers, _gen(1))

    for k in range(k_workers):
        g1, g2 = part.hidden1[k].tolist(), part.hidden2[k].tolist()

        # Execute
        sub = ist.subnet(params, part, k)

        # Assert: against explicit loops
        assert sub["w1"].shape == (len(g1), D)
        assert sub["w2"].shape == (len(g2), len(g1))
        assert sub["w3"].shape == (C, len(g2))
        for i, n in enumerate(g1):
            assert torch.equal(sub["w1"][i], params["w1"][n])
            assert sub["b1"][i] == params["b1"][n]
        for i, m in enumerate(g2):
            assert sub["b2"][i] == params["b2"][m]
            for j, n in enumerate(g1):
                assert sub["w2"][i, j] == params["w2"][m, n]
            for c in range(C):
                assert sub["w3"][c, i] == params["w3"][c, m]
        assert torch.equal(sub["b3"], params["b3"])


def test_subnet_returns_copies() -> None:
    # Prepare
    params = _params()
    before = _clone(params)
    part = ist.partition(H1, H2, 2, _gen())

    # Execute
    sub = ist.subnet(params, part, 0)
    for v in sub.values():
        v.add_(1.0)

    # Assert
    for k in params:
        assert torch.equal(params[k], before[k])


def test_subnet_mlp_equals_full_mlp_with_other_workers_units_zeroed() -> None:
    # Prepare: integer-valued weights and inputs keep every float32 sum exact, whatever order
    # the matmul adds in, so the comparison can be bit-exact.
    g = _gen(5)
    params = {k: torch.randint(-3, 4, v.shape, generator=g).float() for k, v in _params().items()}
    x = torch.randint(-3, 4, (16, D), generator=g).float()
    part = ist.partition(H1, H2, 2, _gen(2))
    full = MLP.from_params(params)

    for k in range(2):
        keep1 = torch.zeros(H1)
        keep1[part.hidden1[k]] = 1.0
        keep2 = torch.zeros(H2)
        keep2[part.hidden2[k]] = 1.0

        # Execute
        with torch.no_grad():
            got = MLP.from_params(ist.subnet(params, part, k))(x)
            h1 = torch.relu(full.fc1(x)) * keep1
            h2 = torch.relu(full.fc2(h1)) * keep2
            want = full.fc3(h2)

        # Assert
        assert torch.equal(got, want)


# ---- write_back -----------------------------------------------------------------------------


def _trained_pieces(params: Params, part: Partition, workers: list[int]) -> dict[int, Params]:
    """What the workers send back: their piece plus 1000 * (k + 1), distinct per worker."""
    return {
        k: {n: v + 1000.0 * (k + 1) for n, v in ist.subnet(params, part, k).items()}
        for k in workers
    }


@pytest.mark.parametrize("k_workers", [1, 2, 3])
def test_write_back_puts_every_piece_in_place_and_leaves_off_diagonal_blocks(
    k_workers: int,
) -> None:
    # Prepare
    params = _params()
    before = _clone(params)
    part = ist.partition(H1, H2, k_workers, _gen(4))
    pieces = _trained_pieces(params, part, list(range(k_workers)))
    owner1 = {int(n): k for k in range(k_workers) for n in part.hidden1[k]}
    owner2 = {int(m): k for k in range(k_workers) for m in part.hidden2[k]}

    # Execute
    ist.write_back(params, part, pieces)

    # Assert
    for n in range(H1):
        k = owner1[n]
        i = part.hidden1[k].tolist().index(n)
        assert torch.equal(params["w1"][n], pieces[k]["w1"][i])
        assert params["b1"][n] == pieces[k]["b1"][i]
    for m in range(H2):
        k = owner2[m]
        i = part.hidden2[k].tolist().index(m)
        assert params["b2"][m] == pieces[k]["b2"][i]
        assert torch.equal(params["w3"][:, m], pieces[k]["w3"][:, i])
        for n in range(H1):
            if owner1[n] == k:  # diagonal block g2_k x g1_k
                j = part.hidden1[k].tolist().index(n)
                assert params["w2"][m, n] == pieces[k]["w2"][i, j]
            else:  # off-diagonal: nobody trained it this round
                assert params["w2"][m, n] == before["w2"][m, n]
    expected_b3 = torch.stack([p["b3"] for p in pieces.values()]).mean(0)
    assert torch.allclose(params["b3"], expected_b3)
    assert torch.allclose(params["b3"], before["b3"] + 1000.0 * (k_workers + 1) / 2)


def test_write_back_is_in_place() -> None:
    # Prepare
    params = _params()
    storages = {k: v.data_ptr() for k, v in params.items()}
    part = ist.partition(H1, H2, 2, _gen())

    # Execute
    ist.write_back(params, part, _trained_pieces(params, part, [0, 1]))

    # Assert: the same tensors, modified (so optimizer state keyed on them stays attached)
    assert {k: v.data_ptr() for k, v in params.items()} == storages


def test_write_back_of_unchanged_pieces_is_identity() -> None:
    # Prepare
    params = _params()
    before = _clone(params)
    part = ist.partition(H1, H2, 3, _gen(7))
    pieces = {k: ist.subnet(params, part, k) for k in range(3)}

    # Execute
    ist.write_back(params, part, pieces)

    # Assert: b3 is a mean of three equal vectors, exact only up to rounding
    for k in ("w1", "b1", "w2", "b2", "w3"):
        assert torch.equal(params[k], before[k])
    assert torch.allclose(params["b3"], before["b3"], rtol=1e-6, atol=0)


def test_write_back_leaves_a_missing_workers_neurons_untouched() -> None:
    # Prepare
    params = _params()
    before = _clone(params)
    part = ist.partition(H1, H2, 2, _gen(6))
    pieces = _trained_pieces(params, part, [1])  # worker 0 never answered
    g1_0, g2_0 = part.hidden1[0], part.hidden2[0]
    g1_1, g2_1 = part.hidden1[1], part.hidden2[1]

    # Execute
    ist.write_back(params, part, pieces)

    # Assert
    assert torch.equal(params["w1"][g1_0], before["w1"][g1_0])
    assert torch.equal(params["b1"][g1_0], before["b1"][g1_0])
    assert torch.equal(params["b2"][g2_0], before["b2"][g2_0])
    assert torch.equal(params["w3"][:, g2_0], before["w3"][:, g2_0])
    assert torch.equal(params["w2"][g2_0][:, g1_0], before["w2"][g2_0][:, g1_0])
    assert torch.equal(params["w2"][g2_1][:, g1_1], pieces[1]["w2"])
    assert torch.equal(params["w1"][g1_1], pieces[1]["w1"])
    assert torch.equal(params["b3"], pieces[1]["b3"])  # the mean over the one that returned


def test_write_back_with_no_pieces_changes_nothing() -> None:
    # Prepare
    params = _params()
    before = _clone(params)

    # Execute
    ist.write_back(params, ist.partition(H1, H2, 2, _gen()), {})

    # Assert
    for k in params:
        assert torch.equal(params[k], before[k])
