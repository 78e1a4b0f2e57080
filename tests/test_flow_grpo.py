"""Flow-GRPO baseline (benchmarks/baselines/flow_grpo.py) on a 2-D Gaussian-mixture toy whose exact marginal velocity
is written here: the SDE keeps the ODE's marginals, transition log-probabilities, advantages, the PPO ratio, training
raises a reward, Flow-GRPO-Fast trains only its window, and bad arguments are clear ValueErrors."""
import math

import pytest
import torch

from benchmarks.baselines.flow_grpo import (
    gaussian_log_prob,
    group_advantages,
    sde_rollout,
    sde_sigmas,
    uniform_grid,
)

MEANS = torch.tensor([[-2.0, 0.0], [1.5, 1.0]])  # two isotropic components in 2-D
SCALES = torch.tensor([0.5, 0.7])


class MixtureFlow(torch.nn.Module):
    """Exact marginal velocity of x_t = t·x1 + (1 − t)·x0, x0 ~ N(0, I), x1 ~ Σ_k π_k N(μ_k, s_k² I), π = softmax(θ).

    Given component k, x_t ~ N(t μ_k, S_k² I) with S_k² = t² s_k² + (1 − t)², and
    E[x1 − x0 | x_t, k] = μ_k + (t s_k² − (1 − t))/S_k² · (x_t − t μ_k); v mixes these by the posterior p(k | x_t).
    The logits are the only parameters, so a policy update moves mass between the modes and nothing else.
    """

    def __init__(self, logits=(0.0, 0.0)):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(logits))

    def forward(self, t, x):
        t = t[:, None, None]  # [B, 1, 1] against components [K, D]
        var = t**2 * SCALES[:, None] ** 2 + (1 - t) ** 2  # [B, K, 1]
        dev = x[:, None, :] - t * MEANS  # [B, K, D]
        log_post = self.logits - (dev**2).sum(-1) / (2 * var[..., 0]) - x.shape[1] * 0.5 * torch.log(var[..., 0])
        v_k = MEANS + (t * SCALES[:, None] ** 2 - (1 - t)) / var * dev
        return (torch.softmax(log_post, dim=1)[..., None] * v_k).sum(1)

    def data_moments(self):
        """Mean [D] and covariance [D, D] of the data distribution (t = 1)."""
        pi = torch.softmax(self.logits.detach(), 0)
        mean = pi @ MEANS
        second = sum(p * (s**2 * torch.eye(2) + torch.outer(m, m)) for p, s, m in zip(pi, SCALES, MEANS))
        return mean, second - torch.outer(mean, mean)


def moments(x):
    return x.mean(0), torch.cov(x.T)


def euler_ode(model, x, grid):
    for t, t_next in zip(grid, grid[1:]):
        x = x + (t_next - t) * model(torch.full((x.shape[0],), t), x)
    return x


@pytest.mark.parametrize("steps", [10, 50])
def test_sde_final_marginals_match_the_exact_ones(steps):
    """Mean and covariance of the SDE's samples at t = 1 against the exact mixture's. Allowance per statistic: 4
    standard errors of the sample estimate (estimated from the samples; a 4σ excursion of any of the 5 statistics has
    probability < 1e-3) plus the same-grid Euler ODE's error from the same x0 — both are first-order schemes, so the
    ODE's error sizes the discretisation error at this T (at T = 10 it is 0.5 on the covariance, at T = 50 0.1). A wrong
    drift (factor 1 instead of 1/2, the score without its t·v term, or its sign flipped) misses by 0.7 or more."""
    n = 20000
    model = MixtureFlow((0.3, -0.2))
    mean, cov = model.data_moments()
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(n, 2, generator=gen)
    with torch.no_grad():
        x1 = sde_rollout(model, x0, uniform_grid(steps), 0.7, generator=gen).x1
        ode_mean, ode_cov = moments(euler_ode(model, x0, uniform_grid(steps)))
    sde_mean_, sde_cov = moments(x1)
    c = x1 - sde_mean_
    se_mean = (sde_cov.diag() / n).sqrt()
    se_cov = (((c[:, :, None] * c[:, None, :]) ** 2).mean(0) - sde_cov**2).clamp_min(0).div(n).sqrt()
    assert torch.all((sde_mean_ - mean).abs() <= 4 * se_mean + (ode_mean - mean).abs())
    assert torch.all((sde_cov - cov).abs() <= 4 * se_cov + (ode_cov - cov).abs())


def test_transitions_follow_the_papers_sde_and_log_prob_is_normals():
    """Each recorded transition against the paper's form, written in its own convention (s = 1 − t is the noise level,
    the network outputs u = −v, a step goes from s to s − Δs):
    x ← x − [u + σ_s²/(2s)·(x + (1 − s)·u)]·Δs + σ_s √Δs ε, σ_s = a·√(s/(1 − s)), with s_1 for s in the denominator
    where s = 1; and the log-probability against torch.distributions.Normal averaged over dimensions. float32 rounding
    of a few operations on O(10) values: 1e-5 relative."""
    model, grid, a = MixtureFlow((0.3, -0.2)), [0.0, 0.1, 0.35, 0.7, 0.9, 1.0], 0.7
    ro = sde_rollout(model, torch.randn(64, 2, generator=torch.Generator().manual_seed(0)), grid, a,
                     generator=torch.Generator().manual_seed(1))
    assert ro.steps == list(range(len(grid) - 1))
    for k, i in enumerate(ro.steps):
        s, ds, s_first = 1 - grid[i], grid[i + 1] - grid[i], 1 - grid[1]
        sigma = a * math.sqrt(s / (1 - (s_first if s == 1 else s)))
        x = ro.xs[k]
        with torch.no_grad():
            u = -model(torch.full((64,), grid[i]), x)
        mean = x - (u + sigma**2 / (2 * s) * (x + (1 - s) * u)) * ds
        assert ro.stds[k] == pytest.approx(sigma * math.sqrt(ds), rel=1e-12)
        torch.testing.assert_close(ro.means[k], mean, rtol=1e-5, atol=1e-5)
        expected = torch.distributions.Normal(ro.means[k], ro.stds[k]).log_prob(ro.next_xs[k]).mean(-1)
        torch.testing.assert_close(ro.log_probs[k], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gaussian_log_prob(ro.next_xs[k], mean, ro.stds[k]), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ro.x1, ro.next_xs[-1])
    assert sde_sigmas(grid, a)[0] == pytest.approx(a / math.sqrt(grid[1]))


def test_group_advantages():
    r = torch.tensor([1.0, 3.0, 0.0, 0.0, 10.0, 14.0, 2.0, 4.0])
    deviations = torch.tensor([-1.0, 1.0, 0.0, 0.0, -2.0, 2.0, -1.0, 1.0])  # from the means of the groups of 2
    group_std = torch.tensor([1.0, 1.0, 0.0, 0.0, 2.0, 2.0, 1.0, 1.0])  # population std; eps keeps (0, 0) finite
    torch.testing.assert_close(group_advantages(r, 2), deviations / (group_std + 1e-4))
    torch.testing.assert_close(group_advantages(r, 8), (r - r.mean()) / (r.std(correction=0) + 1e-4))
    torch.testing.assert_close(group_advantages(r, 2, global_std=True), deviations / (r.std(correction=0) + 1e-4))
