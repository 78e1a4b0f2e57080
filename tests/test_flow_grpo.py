"""Flow-GRPO baseline (benchmarks/baselines/flow_grpo.py) on a 2-D Gaussian-mixture toy whose exact marginal velocity
is written here: the SDE keeps the ODE's marginals, transition log-probabilities, advantages, the PPO ratio, training
raises a reward, Flow-GRPO-Fast trains only its window, and bad arguments are clear ValueErrors."""

import math

import pytest
import torch

from benchmarks.baselines.flow_grpo import (
    FlowGRPOConfig,
    FlowGRPOTrainer,
    clipped_policy_loss,
    gaussian_kl,
    gaussian_log_prob,
    group_advantages,
    sde_rollout,
    sde_sigmas,
    uniform_grid,
)

MEANS = torch.tensor([[-2.0, 0.0], [1.5, 1.0]])  # two isotropic components in 2-D
SCALES = torch.tensor([0.5, 0.7])


def mixture_velocity(t, x, logits):
    """The velocity below for t [B], x [B, D] and mixture logits [K] or, one set per sample, [B, K]."""
    t = t[:, None, None]  # [B, 1, 1] against components [K, D]
    var = t**2 * SCALES[:, None] ** 2 + (1 - t) ** 2  # [B, K, 1]
    dev = x[:, None, :] - t * MEANS  # [B, K, D]
    log_post = logits - (dev**2).sum(-1) / (2 * var[..., 0]) - x.shape[1] * 0.5 * torch.log(var[..., 0])
    v_k = MEANS + (t * SCALES[:, None] ** 2 - (1 - t)) / var * dev
    return (torch.softmax(log_post, dim=1)[..., None] * v_k).sum(1)


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
        return mixture_velocity(t, x, self.logits)

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
    ro = sde_rollout(
        model,
        torch.randn(64, 2, generator=torch.Generator().manual_seed(0)),
        grid,
        a,
        generator=torch.Generator().manual_seed(1),
    )
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


def test_kl_is_the_closed_form_and_the_clip_stops_gradients_outside_the_trust_region():
    """gaussian_kl against torch.distributions.kl_divergence (averaged over dimensions); PPO's clip: a positive
    advantage gets no gradient once ρ > 1 + ε, a negative one once ρ < 1 − ε, and full gradient inside."""
    mean, mean_ref, std = torch.randn(5, 3), torch.randn(5, 3), 0.3
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, std), torch.distributions.Normal(mean_ref, std)
    ).mean(-1)
    torch.testing.assert_close(gaussian_kl(mean, mean_ref, std), expected)
    eps = 0.1
    log_prob = torch.log(torch.tensor([1.2, 0.8, 1.05, 1.2, 0.8])).requires_grad_()
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])
    loss, ratio = clipped_policy_loss(log_prob, torch.zeros(5), adv, eps)
    loss.backward()
    torch.testing.assert_close(ratio.detach(), torch.tensor([1.2, 0.8, 1.05, 1.2, 0.8]))
    # d loss / d log_prob = −A ρ / n where the unclipped term is the max, 0 where the clipped constant is
    torch.testing.assert_close(log_prob.grad, torch.tensor([0.0, 0.0, -1.05, 1.2, -0.8]) / 5)


def mode_reward(x):
    """−distance to the second mode: higher when the policy puts more mass there."""
    return -(x - MEANS[1]).norm(dim=1)


def test_training_raises_the_reward():
    """20 Flow-GRPO steps (defaults but a toy's batch and step size: the only parameters are the two mixture logits,
    so lr 0.05) raise the reward of 50-step ODE samples from fixed noise by more than 4 standard errors of the
    difference (each mean's SE from its 4000 samples; reward std about 1.4, so SE about 0.03) and move mass to the
    rewarded mode; with β = 0.04 the KL to the reference is positive once the policy has moved."""
    model = MixtureFlow()
    trainer = FlowGRPOTrainer(model, mode_reward, sample_shape=(2,), config=FlowGRPOConfig(batch_size=64, lr=0.05))
    x0, grid = torch.randn(4000, 2, generator=torch.Generator().manual_seed(7)), uniform_grid(50)
    with torch.no_grad():
        before = mode_reward(euler_ode(model, x0, grid))
    metrics = [trainer.train_step() for _ in range(20)]
    with torch.no_grad():
        after = mode_reward(euler_ode(model, x0, grid))
    se = math.sqrt(before.var().item() / len(before) + after.var().item() / len(after))
    assert after.mean() - before.mean() > 4 * se
    assert torch.softmax(model.logits.detach(), 0)[1] > 0.6
    assert metrics[-1]["kl"] > 0 and all(math.isfinite(m["loss"]) for m in metrics)
    assert {"reward_mean", "reward_std", "loss", "kl", "clip_fraction", "seconds"} <= metrics[-1].keys()


def test_the_first_update_has_ratio_one_and_later_ones_move():
    """The first minibatch update evaluates the policy that sampled the batch: every ratio is exactly 1 (bitwise:
    the same model, inputs and arithmetic as the rollout). Later updates see a changed policy (approx_kl > 0)."""
    trainer = FlowGRPOTrainer(
        MixtureFlow(),
        mode_reward,
        sample_shape=(2,),
        config=FlowGRPOConfig(batch_size=32, lr=0.05, inner_epochs=2, beta=0.0),
    )
    for _ in range(2):
        metrics = trainer.train_step()
        assert metrics["first_ratio_max_dev"] == 0.0
        assert metrics["approx_kl"] > 0 and metrics["clip_fraction"] > 0


class ConditionalMixtureFlow(torch.nn.Module):
    """MixtureFlow with one set of logits per condition c in {0, 1}: model(t, x, c)."""

    def __init__(self):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.zeros(2, 2))

    def forward(self, t, x, cond):
        return mixture_velocity(t, x, self.logits[cond])


def test_conditional_groups_train_each_condition_toward_its_own_mode():
    """With conditions, each group of group_size samples shares one condition and is normalised on its own; the
    reward asks condition c for mode c, so condition 0's mass moves to mode 0 and condition 1's to mode 1 (from 1/2
    each; 15 steps with lr 0.05 move a logit pair by about 0.5 or more, so 0.6 is a clear margin)."""
    model, seen = ConditionalMixtureFlow(), []

    def reward(x, cond):
        seen.append(cond.clone())
        return -(x - MEANS[cond]).norm(dim=1)

    config = FlowGRPOConfig(batch_size=32, group_size=8, lr=0.05)
    trainer = FlowGRPOTrainer(
        model, reward, sample_shape=(2,), config=config, condition_fn=lambda n: torch.arange(n) % 2
    )
    for _ in range(15):
        trainer.train_step()
    assert torch.equal(seen[0], torch.tensor([0, 1, 0, 1]).repeat_interleave(8))
    pi = torch.softmax(model.logits.detach(), dim=1)
    assert pi[0, 0] > 0.6 and pi[1, 1] > 0.6


class CallLog(torch.nn.Module):
    """Wraps a flow and records the time of every call made with autograd on (the calls that train)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.grad_times = inner, []

    def forward(self, t, x):
        if torch.is_grad_enabled():
            self.grad_times.append(round(t[0].item(), 6))
        return self.inner(t, x)


def test_fast_is_stochastic_and_trained_only_in_its_window():
    """Flow-GRPO-Fast: the rollout outside the window is the deterministic Euler ODE (two noise draws agree up to the
    window and differ after it), and the trainer differentiates the policy only at the window's steps, which lie in
    the default range, the first half of the grid."""
    model, grid = MixtureFlow((0.3, -0.2)), uniform_grid(10)
    x0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    a, b = (
        sde_rollout(model, x0, grid, 0.7, sde_steps=[3, 4], generator=torch.Generator().manual_seed(s)) for s in (1, 2)
    )
    assert a.steps == [3, 4] and a.log_probs.shape == (2, 16)
    with torch.no_grad():
        torch.testing.assert_close(a.xs[0], euler_ode(model, x0, grid[:4]), rtol=0, atol=0)
        torch.testing.assert_close(a.x1, euler_ode(model, a.next_xs[-1], grid[5:]), rtol=0, atol=0)
    assert torch.equal(a.xs[0], b.xs[0]) and not torch.equal(a.next_xs[0], b.next_xs[0])

    log = CallLog(MixtureFlow())
    trainer = FlowGRPOTrainer(
        log, mode_reward, sample_shape=(2,), config=FlowGRPOConfig(batch_size=16, lr=0.05, sde_window=2)
    )
    starts = set()
    for _ in range(6):
        log.grad_times.clear()
        steps = trainer.train_step()["trained_steps"]
        assert len(steps) == 2 and steps[1] == steps[0] + 1 and 0 <= steps[0] <= 3
        assert set(log.grad_times) == {round(grid[i], 6) for i in steps}
        starts.add(steps[0])
    assert len(starts) > 1  # the window moves between batches


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="group_size"):
        FlowGRPOConfig(batch_size=10, group_size=4)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(10), 4)
    with pytest.raises(ValueError, match="group_size"):  # unconditional: one group, the batch
        FlowGRPOTrainer(MixtureFlow(), mode_reward, sample_shape=(2,), config=FlowGRPOConfig(group_size=8))
    for a in (0.0, -0.7):
        with pytest.raises(ValueError, match="noise_level"):
            FlowGRPOConfig(noise_level=a)
        with pytest.raises(ValueError, match="noise_level"):
            sde_rollout(MixtureFlow(), torch.zeros(4, 2), uniform_grid(4), a)
    with pytest.raises(ValueError, match="steps"):
        FlowGRPOConfig(steps=1)
    with pytest.raises(ValueError, match="grid"):
        sde_rollout(MixtureFlow(), torch.zeros(4, 2), [0.0, 1.0], 0.7)
    with pytest.raises(ValueError, match="grid"):
        FlowGRPOConfig(grid=[0.0, 0.5, 0.4, 1.0])
    with pytest.raises(ValueError, match="minibatches"):
        FlowGRPOConfig(batch_size=32, minibatches=3)
    with pytest.raises(ValueError, match="sde_window_range"):
        FlowGRPOConfig(steps=10, sde_window=2, sde_window_range=(4, 5))
    with pytest.raises(ValueError, match="sde_window"):
        FlowGRPOConfig(sde_window=-1)
    with pytest.raises(ValueError, match="train_timesteps"):
        FlowGRPOConfig(steps=10, train_timesteps=11)
    trainer = FlowGRPOTrainer(
        MixtureFlow(), lambda x: mode_reward(x)[:-1], sample_shape=(2,), config=FlowGRPOConfig(batch_size=8)
    )
    with pytest.raises(ValueError, match="reward_fn"):
        trainer.train_step()


class TinyConvFlow(torch.nn.Module):
    """An image-shaped flow field model(t, x) for x [B, 1, 4, 4]."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, t, x):
        return self.conv(torch.cat([x, t[:, None, None, None].expand_as(x)], dim=1))


def test_image_shaped_model_trains_every_step_but_the_last():
    """On [B, C, H, W] samples the rollout records [T, B, C, H, W] transitions and [T, B] log-probabilities, the
    default trains the first T − 1 transitions, and a step's metrics are finite."""
    config = FlowGRPOConfig(batch_size=8, steps=4, lr=1e-3)
    trainer = FlowGRPOTrainer(
        TinyConvFlow(), lambda x: -x.flatten(1).abs().mean(1), sample_shape=(1, 4, 4), config=config
    )
    ro, cond = trainer.rollout()
    assert cond is None and ro.xs.shape == (4, 8, 1, 4, 4) and ro.log_probs.shape == (4, 8)
    metrics = trainer.train_step()
    assert metrics["trained_steps"] == [0, 1, 2] and metrics["first_ratio_max_dev"] == 0.0
    keys = ("reward_mean", "reward_std", "loss", "kl", "clip_fraction", "seconds")
    assert all(math.isfinite(metrics[k]) for k in keys)
