"""The registry of model families: a family name (kept in checkpoints as ``model_config["family"]``) -> its
:class:`~orw_fast.models.flow_model.FlowModel` subclass, imported when first asked for (diffusers is imported only
for a diffusers family).

Adding a family (Qwen-Image, Wan, SANA, ...) is one new file with its subclass (a diffusers family subclasses
:class:`~orw_fast.models.diffusers_flow.DiffusersFlowModel` and declares its transformer class, as
``orw_fast/models/sd3.py`` and ``orw_fast/models/flux.py`` do), its line in :data:`FAMILIES`, and its tests: the
trainer, the sampler, checkpoints and the CLI find it here, and nothing else switches on the family.
"""

from __future__ import annotations

import importlib

FAMILIES = {  # name -> "module:class"; diffusers families in the order their error messages list them
    "pixel": "orw_fast.models.flow_model:PixelFlowModel",
    "sd3": "orw_fast.models.sd3:SD3FlowModel",
    "flux": "orw_fast.models.flux:FluxFlowModel",
}


def family_class(name: str) -> type:
    """The FlowModel subclass of the family ``name``; ValueError naming the known families otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"model family must be one of {', '.join(map(repr, FAMILIES))}, got {name!r}")
    module, _, attr = FAMILIES[name].partition(":")
    cls = getattr(importlib.import_module(module), attr)
    assert cls.family == name, f"{FAMILIES[name]} declares family {cls.family!r}, registered as {name!r}"
    return cls


def family_classes(base: type) -> list[type]:
    """The registered families that subclass ``base``, in registry order."""
    return [cls for cls in map(family_class, FAMILIES) if issubclass(cls, base)]
