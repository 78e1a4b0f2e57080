"""Pre-training a flow-matching model on a dataset (independent coupling, torchcfm's conditional
flow matching), saved in torchcfm's checkpoint format ``{net_model, ema_model, optim, sched, step}``."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from orw_fast.checkpoint import check_state_matches, load_file, model_state_from, save_atomic
from orw_fast.couplings import sample_path


def pretrain_flow_matching(
    model: torch.nn.Module,
    images: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 128,
    lr: float = 2e-3,
    sigma: float = 0.0,
    ema_decay: float = 0.999,
    seed: int = 0,
    progress: bool = True,
):
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
    state = {
        "net_model": model.state_dict(),
        "ema_model": ema.state_dict(),
        "optim": opt.state_dict(),
        "sched": sched.state_dict(),
        "step": steps,
    }
    return ema, state


def default_cache_dir() -> Path:
    """Where pre-trained models are kept: $ORW_FAST_CACHE, else ~/.cache/orw_fast."""
    return Path(os.environ.get("ORW_FAST_CACHE", Path.home() / ".cache" / "orw_fast"))


def pretrain_dataset(
    dataset: str,
    out_dir,
    *,
    steps: int,
    batch_size: int = 128,
    lr: float = 2e-3,
    preset: str | None = None,
    classifier: bool = True,
    seed: int = 0,
    device="cpu",
    progress: bool = True,
) -> dict:
    """Pre-trains a flow model on ``dataset`` (a load_dataset spec) into ``out_dir``/flow.pt (torchcfm
    format + model_config) and, when the data has labels and ``classifier`` is set, a classifier into
    ``out_dir``/classifier.pt. Returns the paths written and the classifier's accuracy. The same ``seed`` and
    torch thread count give the same models in any process."""
    from orw_fast.data import load_dataset
    from orw_fast.models import make_flow_model
    from orw_fast.rewards import DigitClassifier, save_classifier, train_classifier

    out_dir = Path(out_dir)
    images, labels = load_dataset(dataset)
    torch.manual_seed(seed)  # the initial weights too: torch seeds each process at random
    model, config = make_flow_model(tuple(images.shape[1:]), preset=preset)
    _, state = pretrain_flow_matching(
        model.to(device), images, steps=steps, batch_size=batch_size, lr=lr, seed=seed, progress=progress
    )
    result = {"flow": save_atomic({**state, "model_config": config}, out_dir / "flow.pt")}
    if labels is not None and classifier:
        net = DigitClassifier(image_shape=tuple(images.shape[1:]), num_classes=int(labels.max()) + 1)
        result["classifier_accuracy"] = train_classifier(net, images, labels, seed=seed, progress=progress)
        result["classifier"] = save_classifier(net, out_dir / "classifier.pt")
    return result


def load_flow_model(path, *, checkpoint: dict | None = None) -> tuple[torch.nn.Module, dict]:
    """(model, model_config) from a checkpoint that records its model config: flow.pt of pretrain_dataset (EMA
    weights) or an ORWCFMTrainer checkpoint of an orw_fast model (policy weights); ``checkpoint`` is the file's
    contents when already loaded. The config's ``"family"`` (``"pixel"``, recorded by
    :meth:`~orw_fast.models.flow_model.PixelFlowModel.describe`) is not passed to the UNet. Raises ValueError saying
    how to make a checkpoint sampleable when it records no config. The low-level helper of
    :meth:`PixelFlowModel.from_checkpoint <orw_fast.models.flow_model.FlowModel.from_checkpoint>`."""
    from orw_fast.models import build_flow_model

    ckpt = load_file(path) if checkpoint is None else checkpoint
    config = ckpt.get("model_config") or (ckpt.get("config") or {}).get("model_config")
    if config is None:
        raise ValueError(
            f"{str(path)!r} records no model config, so orw_fast cannot rebuild its model. Checkpoints "
            "of orw_fast models (orw_fast.models.make_flow_model, `orw-fast pretrain`) record it; for "
            "another model pass TrainerConfig(model_config={'dim': [C, H, W], ...UNetModelWrapper "
            "kwargs}) when training, or rebuild the model yourself and load the checkpoint's 'policy' "
            "(ORWCFMTrainer.load_pretrained(path, weights='policy'))"
        )
    if config.get("family", "pixel") != "pixel":
        raise ValueError(f"{str(path)!r} is a checkpoint of a {config['family']!r} model, not of a pixel flow model")
    model = build_flow_model({k: v for k, v in config.items() if k != "family"})
    state, key = model_state_from(ckpt, path, "ema")
    check_state_matches(model, state, f"checkpoint {str(path)!r}, entry {key!r}")
    model.load_state_dict(state)
    return model, config
