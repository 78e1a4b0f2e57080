"""Reward functions: model-space images [B, C, H, W] in [-1, 1] (and, for text-to-image rewards, the batch's
prompts) -> rewards [B] (float tensors)."""

from orw_fast.rewards.base import check_images, check_rewards, to_uint8_images
from orw_fast.rewards.classifier import CLASSIFIER_MODES, ClassifierReward
from orw_fast.rewards.classifier_net import (
    DigitClassifier,
    load_classifier,
    save_classifier,
    split_indices,
    train_classifier,
)
from orw_fast.rewards.clip import CLIPEncoder, CLIPFeatureReward, CLIPReward, CLIPScoreReward
from orw_fast.rewards.jpeg import jpeg_compressibility, jpeg_incompressibility, jpeg_sizes_kb
from orw_fast.rewards.registry import REWARDS, RewardFn, as_reward_fn, get_reward, takes_prompts

__all__ = [
    "CLASSIFIER_MODES",
    "CLIPEncoder",
    "CLIPFeatureReward",
    "CLIPReward",
    "CLIPScoreReward",
    "ClassifierReward",
    "DigitClassifier",
    "load_classifier",
    "save_classifier",
    "split_indices",
    "train_classifier",
    "REWARDS",
    "RewardFn",
    "as_reward_fn",
    "check_images",
    "check_rewards",
    "get_reward",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "jpeg_sizes_kb",
    "takes_prompts",
    "to_uint8_images",
]
