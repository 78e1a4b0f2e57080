"""CLIP reward of the official ORW-CFM-W2 CIFAR example: p(prompt 0 | image) - p(prompt 1 | image) under
CLIP's softmax over the prompts. Weights are loaded from a local directory only (transformers format)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from orw_fast.rewards.base import check_images

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_GET_WEIGHTS = (
    "download a CLIP checkpoint in transformers format where the hub is reachable, e.g. "
    "`hf download openai/clip-vit-base-patch32 --local-dir DIR` (or CLIPModel.from_pretrained(name) and "
    "CLIPTokenizer.from_pretrained(name), each .save_pretrained(DIR)), copy DIR here and pass model_path=DIR"
)


def _pooled(out) -> torch.Tensor:
    """get_*_features returns the projected embeddings (transformers 4) or an output holding them in
    pooler_output (transformers 5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class CLIPReward(nn.Module):
    """reward_i = softmax_j(CLIP logits of image i and prompt j)[0] - [...][1], in [-1, 1].

    Images (model space, [B, C, H, W], C = 1 or 3) are mapped to [0, 1], resized (bicubic, shortest side)
    and center-cropped to CLIP's input size, and normalized with the checkpoint's mean/std
    (preprocessor_config.json; OpenAI's when absent). Prompt embeddings are computed once. ``device``:
    where CLIP runs (None: CUDA when available, else CPU); rewards come back float32 [B] on the images'
    device, without gradients.
    """

    def __init__(self, text_prompts: Sequence[str], model_path: str | Path | None = None, device=None):
        super().__init__()
        prompts = [text_prompts] if isinstance(text_prompts, str) else list(text_prompts)
        if len(prompts) < 2 or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"text_prompts must be at least two strings (reward = p(prompt 0) - p(prompt 1)), "
                             f"got {text_prompts!r}")
        if model_path is None or not (Path(model_path) / "config.json").is_file():
            where = "not given" if model_path is None else f"{str(model_path)!r} has no config.json"
            raise ValueError(f"model_path is {where}: CLIPReward loads local weights only; {_GET_WEIGHTS}")
        try:
            from transformers import CLIPModel, CLIPTokenizer
        except ImportError as e:
            raise ImportError("CLIPReward needs transformers: pip install --no-deps transformers, then its "
                              "dependencies (tokenizers, huggingface_hub, safetensors, ...) without torch") from e
        path = Path(model_path)
        device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        self.model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval().requires_grad_(False)
        tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        pre_file = path / "preprocessor_config.json"
        pre = json.loads(pre_file.read_text()) if pre_file.is_file() else {}
        dtype = self.model.dtype
        self.register_buffer("mean", torch.tensor(pre.get("image_mean", OPENAI_CLIP_MEAN), dtype=dtype,
                                                  device=device).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(pre.get("image_std", OPENAI_CLIP_STD), dtype=dtype,
                                                 device=device).view(1, 3, 1, 1))
        self.image_size = self.model.config.vision_config.image_size
        self.text_prompts = tuple(prompts)
        tokens = tokenizer(prompts, padding=True, truncation=True, return_tensors="pt",
                           max_length=self.model.config.text_config.max_position_embeddings).to(device)
        with torch.no_grad():
            text = _pooled(self.model.get_text_features(**tokens)).float()
        self.register_buffer("text_embeds", text / text.norm(dim=-1, keepdim=True))

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space images -> CLIP pixel values [B, 3, S, S] on CLIP's device and dtype."""
        check_images(x)
        x = ((x.detach().to(self.mean.device, torch.float32) + 1) / 2).clamp(0, 1).expand(-1, 3, -1, -1)
        scale = self.image_size / min(x.shape[-2:])
        size = [max(self.image_size, round(s * scale)) for s in x.shape[-2:]]
        x = nn.functional.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=scale < 1)
        top, left = (size[0] - self.image_size) // 2, (size[1] - self.image_size) // 2
        x = x[..., top:top + self.image_size, left:left + self.image_size].clamp(0, 1)
        return (x.to(self.mean.dtype) - self.mean) / self.std

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        image = _pooled(self.model.get_image_features(pixel_values=self.preprocess(x))).float()
        image = image / image.norm(dim=-1, keepdim=True)
        probs = (self.model.logit_scale.exp().float() * image @ self.text_embeds.T).softmax(dim=-1)
        return (probs[:, 0] - probs[:, 1]).to(x.device)

    def extra_repr(self) -> str:
        return f"text_prompts={self.text_prompts}, image_size={self.image_size}"
