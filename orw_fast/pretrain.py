"""Pre-training a flow-matching model on a dataset (independent coupling, torchcfm's conditional
flow matching), saved in torchcfm's checkpoint format ``{net_model, ema_model, optim, sched, step}``."""
from __future__ import annotations

import copy

import torch
from tqdm.auto import tqdm

from orw_fast.checkpoint import save_atomic
from orw_fast.couplings import sample_path


def pretrain_flow_matching(model: torch.nn.Module, images: torch.Tensor, *, steps: int, batch_size: int = 128,
                           lr: float = 2e-3, sigma: float = 0.0, ema_decay: float = 0.999, seed: int = 0,
                           progress: bool = True):
    """Trains ``model(t, x)`` to transport N(0, I) to ``images`` [N, C, H, W] (model space) with the
    loss mean |v(t, x_t) - (x1 - x0)|^2; returns (ema_model, state) where ``state`` is the torchcfm
    checkpoint dict. Runs on the device of the model's parameters; cosine LR decay."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    device = next(model.parameters()).device
    images = images.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    torch.manual_seed(seed)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    model.train()
    bar = tqdm(range(steps), disable=not progress, desc="pretrain flow", unit="step")
    for step in bar:
        x1 = images[torch.randint(len(images), (batch_size,), device=device, generator=gen)]
        x0 = torch.randn(x1.shape, device=device, generator=gen)
        t, xt, ut = sample_path(x0, x1, sigma=sigma, generator=gen)
        loss = (model(t, xt) - ut).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - ema_decay)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    state = {"net_model": model.state_dict(), "ema_model": ema.state_dict(), "optim": opt.state_dict(),
             "sched": sched.state_dict(), "step": steps}
    return ema, state


def save_torchcfm_checkpoint(state: dict, path, **extra) -> None:
    """Writes a torchcfm-format checkpoint atomically (``extra`` keys, e.g. the model config, added)."""
    save_atomic({**state, **extra}, path)
