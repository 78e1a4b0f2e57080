"""Flow models v_theta(t, x): torchcfm's UNet (``UNetModelWrapper``) with presets per dataset.

A model is described by a plain dict of constructor kwargs (ints, floats, strs, lists), stored in
checkpoints and turned back into the model by :func:`build_flow_model`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

from torchcfm.models.unet.unet import UNetModelWrapper

# Constructor kwargs without ``dim``, which is the image shape. In torchcfm, attention_resolutions
# lists the resolutions (image side / 2^level) with attention in the down and up paths; the middle
# block always has one.
PRESETS: dict[str, dict] = {
    # 8x8 digits: 285k parameters, ~40 ms forward + backward at batch 128 on 2 CPU cores; in the same
    # training time it samples better digits than channel_mult [1, 2] (701k parameters, ~70 ms).
    "digits": dict(
        num_channels=32,
        num_res_blocks=1,
        channel_mult=[1, 1],
        attention_resolutions="4",
        num_heads=1,
        num_head_channels=-1,
        dropout=0.0,
    ),
    # torchcfm's MNIST example: UNetModel(dim=(1, 28, 28), num_channels=32, num_res_blocks=1).
    "mnist": dict(
        num_channels=32,
        num_res_blocks=1,
        channel_mult=[1, 2, 2],
        attention_resolutions="16",
        num_heads=1,
        num_head_channels=-1,
        dropout=0.0,
    ),
    # The CIFAR-10 model of the ORW-CFM-W2 paper and torchcfm's examples/images/cifar10 (35.7M parameters).
    "cifar10": dict(
        num_channels=128,
        num_res_blocks=2,
        channel_mult=[1, 2, 2, 2],
        attention_resolutions="16",
        num_heads=4,
        num_head_channels=64,
        dropout=0.1,
    ),
}
PRESET_SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
_KWARGS = frozenset(inspect.signature(UNetModelWrapper.__init__).parameters) - {"self"}


def _plain(value):
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _check_image_shape(image_shape) -> tuple[int, int, int]:
    shape = tuple(image_shape) if isinstance(image_shape, (list, tuple)) else None
    if (
        shape is None
        or len(shape) != 3
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
        or shape[1] != shape[2]
    ):
        raise ValueError(
            f"image_shape must be (C, H, W) of positive ints with H == W (torchcfm's UNet), got {image_shape!r}"
        )
    return shape


def build_flow_model(config: Mapping) -> UNetModelWrapper:
    """The torchcfm UNet of a config dict (``config["dim"]`` = [C, H, W] plus UNetModelWrapper
    kwargs), freshly initialized; load weights with ``load_state_dict``.

    Raises TypeError for a non-mapping or unknown keys, ValueError for a bad shape or
    attention_resolutions, or an image side the UNet's down/up-sampling cannot halve.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict of UNetModelWrapper kwargs, got {type(config).__name__}")
    unknown = sorted(set(config) - _KWARGS)
    if unknown:
        raise TypeError(f"config has keys that UNetModelWrapper does not take: {unknown}")
    if "dim" not in config:
        raise TypeError("config needs 'dim', the image shape [C, H, W]")
    shape = _check_image_shape(config["dim"])
    attention = config.get("attention_resolutions", "16")
    if not isinstance(attention, str) or not all(r.strip().isdigit() and int(r) > 0 for r in attention.split(",")):
        raise ValueError(
            "attention_resolutions must be comma-separated positive ints such as '16' (torchcfm cannot take ''; a "
            "resolution the UNet never reaches, e.g. '1', leaves attention in the middle block only), "
            f"got {attention!r}"
        )
    levels = len(config.get("channel_mult") or ())
    if levels and shape[1] % 2 ** (levels - 1):
        raise ValueError(
            f"image side {shape[1]} must be divisible by 2^{levels - 1} for channel_mult {config['channel_mult']!r}"
        )
    model = UNetModelWrapper(**{**config, "dim": shape})
    model.orw_fast_model_config = dict(config)  # the trainer keeps it in checkpoints: `orw-fast sample` rebuilds it
    return model


def make_flow_model(image_shape, preset: str | None = None, **overrides) -> tuple[UNetModelWrapper, dict]:
    """A new flow model ``model(t, x)`` (t: [B] in [0, 1], x: [B, C, H, W] -> velocity [B, C, H, W])
    and its config dict (for :func:`build_flow_model`).

    Args:
        image_shape: (C, H, W) with H == W.
        preset: a key of :data:`PRESETS` ("digits", "mnist", "cifar10"); None picks the preset whose
            shape (:data:`PRESET_SHAPES`) is ``image_shape``. A preset also works for other shapes.
        overrides: UNetModelWrapper kwargs replacing the preset's (e.g. num_channels=64).
    """
    shape = _check_image_shape(image_shape)
    if preset is None:
        preset = next((name for name, s in PRESET_SHAPES.items() if s == shape), None)
        if preset is None:
            raise ValueError(f"no preset for image_shape {shape}; pass preset= one of {sorted(PRESETS)}")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    if "dim" in overrides:
        raise TypeError("pass the image shape as image_shape, not dim=")
    unknown = sorted(set(overrides) - _KWARGS)
    if unknown:
        raise TypeError(f"unknown UNetModelWrapper kwargs: {unknown}")
    config = {k: _plain(v) for k, v in {"dim": shape, **PRESETS[preset], **overrides}.items()}
    return build_flow_model(config), config
