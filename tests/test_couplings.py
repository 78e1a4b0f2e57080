"""Couplings and the conditional path: exact OT against brute force, every x1 kept once with its own weight
(unlike torchcfm's exact-OT matcher, which resamples pairs with replacement), and sample_path against
torchcfm's ConditionalFlowMatcher."""

import itertools

import numpy as np
import pytest
import torch
from torchcfm.conditional_flow_matching import ConditionalFlowMatcher, ExactOptimalTransportConditionalFlowMatcher

from orw_fast.couplings import COUPLINGS, couple, ot_permutation, sample_path, stratified_times


def _cost(x0, x1, perm):
    return float(((x0[perm] - x1).double() ** 2).sum())


def _row_indices(rows, x1):
    """Index into x1 of each row of ``rows`` (every row must be an exact copy of one x1 row)."""
    match = (rows.reshape(rows.shape[0], 1, -1) == x1.reshape(1, x1.shape[0], -1)).all(-1)
    assert bool((match.sum(1) == 1).all())
    return match.int().argmax(1)


@pytest.mark.parametrize("seed", range(5))
def test_ot_permutation_is_optimal_against_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    x0, x1 = torch.randn(6, 2, 3, generator=g), torch.randn(6, 2, 3, generator=g)
    perm = ot_permutation(x0, x1)
    assert perm.dtype == torch.long and sorted(perm.tolist()) == list(range(6))
    best = min(_cost(x0, x1, list(p)) for p in itertools.permutations(range(6)))
    assert _cost(x0, x1, perm) == pytest.approx(best, rel=1e-12)
    assert torch.equal(perm, ot_permutation(x0, x1))


def test_ot_permutation_of_a_shuffled_copy_undoes_the_shuffle():
    x1 = torch.randn(32, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    shuffle = torch.randperm(32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x1[shuffle][ot_permutation(x1[shuffle], x1)], x1)


def test_couplings_keep_every_x1_once_with_its_weight():
    g = torch.Generator().manual_seed(0)
    x1, weights = torch.randn(16, 3, 4, 4, generator=g), torch.rand(16, generator=g)
    pairs = sorted(zip(map(tuple, x1.reshape(16, -1).tolist()), weights.tolist()))
    rollout_x0 = torch.randn(16, 3, 4, 4, generator=g)
    for coupling in COUPLINGS:
        x0 = rollout_x0 if coupling == "rollout" else None
        c0, c1, cw = couple(x1, weights, coupling=coupling, x0=x0, generator=torch.Generator().manual_seed(7))
        assert c0.shape == x1.shape and c0.dtype == x1.dtype
        assert sorted(zip(map(tuple, c1.reshape(16, -1).tolist()), cw.tolist())) == pairs
        assert torch.equal(c1, x1) and torch.equal(cw, weights)
    assert couple(x1, weights, coupling="rollout", x0=rollout_x0)[0] is rollout_x0


def test_ot_coupling_reorders_the_independent_noise_and_lowers_the_cost():
    x1, weights = torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(0)), torch.ones(16)
    ind = couple(x1, weights, coupling="independent", generator=torch.Generator().manual_seed(3))[0]
    ot = couple(x1, weights, coupling="ot", generator=torch.Generator().manual_seed(3))[0]
    assert torch.equal(ot, ind[ot_permutation(ind, x1)])
    assert _cost(ot, x1, list(range(16))) < _cost(ind, x1, list(range(16)))


def test_torchcfm_exact_ot_duplicates_and_drops_x1_but_ours_never_does():
    """The official code pairs x1 with torchcfm's ExactOptimalTransportConditionalFlowMatcher, which draws B
    (x0, x1) pairs from the OT plan with replacement: some x1 appear twice, others not at all, so the
    per-x1 weights no longer line up with the samples it trains on. At t = 1, xt is exactly the x1 used."""
    batch, ones = 64, torch.ones(64)
    x1, weights = torch.randn(batch, 3, 4, 4, generator=torch.Generator().manual_seed(0)), torch.rand(batch)
    fm = ExactOptimalTransportConditionalFlowMatcher(sigma=0.0)
    for seed in range(5):
        np.random.seed(seed)
        x0 = torch.randn(batch, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
        _, xt, _ = fm.sample_location_and_conditional_flow(x0, x1, t=ones)
        used = _row_indices(xt, x1)
        assert used.unique().numel() < batch  # duplicates, hence dropped rows too
        assert not torch.equal(weights[used], weights)

        c0, c1, cw = couple(x1, weights, coupling="ot", generator=torch.Generator().manual_seed(seed))
        _, xt, _ = sample_path(c0, c1, ones)
        assert torch.equal(_row_indices(xt, x1), torch.arange(batch)) and torch.equal(cw, weights)


@pytest.mark.parametrize("sigma", [0.0, 0.1])
def test_sample_path_matches_torchcfm_for_the_same_t_and_eps(sigma):
    """With t given, the only draw is eps: torchcfm's from the global RNG, ours from the generator."""
    g = torch.Generator().manual_seed(0)
    x0, x1, t = torch.randn(8, 3, 5, 5, generator=g), torch.randn(8, 3, 5, 5, generator=g), torch.rand(8, generator=g)
    torch.manual_seed(5)
    _, xt_ref, ut_ref = ConditionalFlowMatcher(sigma).sample_location_and_conditional_flow(x0, x1, t)
    t_ours, xt, ut = sample_path(x0, x1, t, sigma=sigma, generator=torch.Generator().manual_seed(5))
    assert t_ours is t and torch.equal(xt, xt_ref) and torch.equal(ut, ut_ref)


def test_sample_path_same_draws_as_torchcfm_with_one_seed():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(8, 3, 5, 5, generator=g), torch.randn(8, 3, 5, 5, generator=g)
    torch.manual_seed(11)
    t_ref, xt_ref, ut_ref = ConditionalFlowMatcher(0.3).sample_location_and_conditional_flow(x0, x1)
    t, xt, ut = sample_path(x0, x1, sigma=0.3, generator=torch.Generator().manual_seed(11))
    assert torch.equal(t, t_ref) and torch.equal(xt, xt_ref) and torch.equal(ut, ut_ref)
    assert t.shape == (8,) and bool(((t >= 0) & (t < 1)).all())


def test_stratified_times_give_each_sample_one_time_per_stratum():
    t = stratified_times(500, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    per_sample = t.reshape(500, 4)  # sample-major: sample i's times are t[4i : 4i + 4]
    for j in range(4):
        assert ((per_sample[:, j] >= j / 4) & (per_sample[:, j] < (j + 1) / 4)).all()
        assert abs(per_sample[:, j].mean().item() - (j + 0.5) / 4) < 0.02  # uniform within its stratum
    one = stratified_times(7, 1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(one, torch.rand(7, generator=torch.Generator().manual_seed(3)))  # times = 1: plain U(0, 1)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="times must be an integer >= 1"):
            stratified_times(3, bad)


def test_bad_inputs():
    x1, w = torch.randn(4, 3, 2, 2), torch.ones(4)
    with pytest.raises(ValueError, match="coupling must be one of"):
        couple(x1, w, coupling="minibatch")
    with pytest.raises(ValueError, match="needs x0"):
        couple(x1, w, coupling="rollout")
    with pytest.raises(ValueError, match="x0 and x1 must have the same shape"):
        couple(x1, w, coupling="rollout", x0=torch.randn(4, 3, 2, 3))
    with pytest.raises(ValueError, match="x0 is only used by coupling='rollout'"):
        couple(x1, w, coupling="ot", x0=torch.randn_like(x1))
    with pytest.raises(ValueError, match=r"weights must have shape \[B\] = \[4\]"):
        couple(x1, torch.ones(5), coupling="independent")
    with pytest.raises(TypeError, match="weights must be a torch.Tensor"):
        couple(x1, [1.0] * 4, coupling="independent")
    with pytest.raises(ValueError, match="x1 must be a floating tensor"):
        couple(torch.zeros(4, 3, dtype=torch.long), w, coupling="independent")
    with pytest.raises(ValueError, match="x0 and x1 must have the same shape"):
        ot_permutation(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="sigma must be a finite number >= 0"):
        sample_path(x1, x1, sigma=-0.1)
    with pytest.raises(ValueError, match=r"t must have shape \[B\] = \[4\]"):
        sample_path(x1, x1, torch.rand(4, 1))
