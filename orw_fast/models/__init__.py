"""Models: flow fields v_theta(t, x) (torchcfm UNets with presets) and a digit classifier for rewards."""
from orw_fast.models.classifier import DigitClassifier, load_classifier, save_classifier, split_indices, train_classifier
from orw_fast.models.flow import PRESET_SHAPES, PRESETS, build_flow_model, make_flow_model

__all__ = ["PRESETS", "PRESET_SHAPES", "DigitClassifier", "load_classifier", "save_classifier", "split_indices", "build_flow_model", "make_flow_model", "train_classifier"]
