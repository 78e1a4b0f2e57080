"""Models: flow fields v_theta(t, x) (torchcfm UNets with presets) behind the FlowModel interface."""

from orw_fast.models.unet import PRESET_SHAPES, PRESETS, build_flow_model, make_flow_model

__all__ = ["PRESETS", "PRESET_SHAPES", "build_flow_model", "make_flow_model"]
