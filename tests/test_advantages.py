"""group_advantages against a plain float64 computation, its refusals, and the 2-process all-gather contract."""

import numpy as np
import pytest
import torch
import torch.distributed as dist

import orw_fast
from orw_fast import distributed as dist_utils


def plain(rewards, group_size=None, eps=1e-4, clip=None, std="group"):
    """Loop over groups in numpy float64, as the papers' PerPromptStatTracker does (np.std: ddof 0)."""
    r = np.asarray(rewards.tolist(), dtype=np.float64)
    size = group_size or len(r)
    out = np.empty_like(r)
    for start in range(0, len(r), size):
        g = r[start : start + size]
        spread = np.std(g) if std == "group" else np.std(r)
        out[start : start + size] = 0.0 if g.max() == g.min() else (g - np.mean(g)) / (spread + eps)
    if clip is not None:
        out = np.clip(out, -clip, clip)
    return torch.from_numpy(out)


@pytest.mark.parametrize("group_size", [None, 1, 3, 4, 12])
@pytest.mark.parametrize("std", ["group", "batch"])
@pytest.mark.parametrize("clip", [None, 1.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_plain_float64(group_size, std, clip, dtype):
    rewards = (torch.randn(12, generator=torch.Generator().manual_seed(group_size or 0)) * 3 + 1).to(dtype)
    got = orw_fast.group_advantages(rewards, group_size, clip=clip, std=std)
    assert got.dtype == dtype and got.shape == (12,)
    want = plain(rewards, group_size, clip=clip, std=std)
    torch.testing.assert_close(got.double(), want, rtol=1e-6 if dtype == torch.float32 else 1e-13, atol=1e-7)


def test_group_statistics_and_equal_rewards():
    """Each group has mean 0 and std ~1; a group of equal rewards (whose float mean is not exactly the reward)
    gets advantage 0, finite."""
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 2.0, 4.0, 7.0, 7.0, 7.0], dtype=torch.float64)
    adv = orw_fast.group_advantages(rewards, 3, eps=1e-12).reshape(3, 3)
    assert torch.equal(adv[0], torch.zeros(3, dtype=torch.float64)) and torch.equal(adv[2], adv[0])
    assert abs(adv[1].mean().item()) < 1e-12 and abs(adv[1].std(correction=0).item() - 1) < 1e-9
    one = orw_fast.group_advantages(torch.full((5,), 1e30))  # an unconditional batch of equal rewards
    assert torch.equal(one, torch.zeros(5))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(group_size=5), ValueError, "group_size=5 does not divide the batch of 12"),
        (dict(group_size=0), ValueError, "group_size must be a positive integer"),
        (dict(group_size=2.0), ValueError, "group_size must be a positive integer"),
        (dict(eps=0.0), ValueError, "eps must be a finite number > 0"),
        (dict(eps=-1e-4), ValueError, "eps must be a finite number > 0"),
        (dict(eps=float("nan")), ValueError, "eps must be a finite number > 0"),
        (dict(clip=0.0), ValueError, "clip must be a finite number > 0"),
        (dict(std="prompt"), ValueError, "std must be one of"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        orw_fast.group_advantages(torch.randn(12), **kwargs)


@pytest.mark.parametrize(
    "rewards,exc,match",
    [
        (torch.tensor([0.0, float("nan"), 1.0]), ValueError, "rewards has 1 non-finite"),
        (torch.tensor([0.0, float("inf"), -float("inf")]), ValueError, "rewards has 2 non-finite"),
        (torch.ones(3, dtype=torch.int64), TypeError, "rewards must be a floating tensor"),
        ([1.0, 2.0], TypeError, "rewards must be a torch.Tensor"),
        (torch.ones(2, 3), ValueError, r"rewards must be a non-empty \[B\] tensor"),
        (torch.ones(0), ValueError, r"rewards must be a non-empty \[B\] tensor"),
    ],
)
def test_bad_rewards(rewards, exc, match):
    with pytest.raises(exc, match=match):
        orw_fast.group_advantages(rewards)


def _normalise_share(rank, rewards, group_size):
    """One rank: init the gloo group, gather, normalise the full vector, return this rank's share."""
    dist.init_process_group("gloo")
    share = rewards.chunk(dist.get_world_size())[rank]
    gathered = dist_utils.all_gather_cat(share)
    return orw_fast.group_advantages(gathered, group_size, clip=2.0).chunk(dist.get_world_size())[rank]


def test_two_gloo_processes_equal_one_process(tmp_path):
    """2 ranks each holding half the batch, all-gathering and normalising the full vector, then keeping their
    half, give exactly the single-process advantages."""
    from test_distributed import run_ranks

    rewards = torch.randn(16, generator=torch.Generator().manual_seed(3))
    parts = run_ranks(tmp_path, _normalise_share, rewards, 4)
    assert torch.equal(torch.cat(parts), orw_fast.group_advantages(rewards, 4, clip=2.0))
