"""CLIP rewards, from local weights only (transformers format):

- :class:`CLIPReward`: the official ORW-CFM-W2 CIFAR example, p(prompt 0 | image) - p(prompt 1 | image) under
  CLIP's softmax over fixed prompts;
- :class:`CLIPScoreReward`: text-image alignment, the cosine of the CLIP embeddings of each image and its own
  prompt (``reward(images, prompts)``; CLIPScore is 100 x max(cosine, 0));
- :class:`CLIPFeatureReward`: a user's model on CLIP image features (an aesthetic predictor, for instance).

All share :class:`CLIPEncoder`: images (model space, [B, C, H, W], C = 1 or 3) are mapped to [0, 1], resized
(bicubic, shortest side) and center-cropped to CLIP's input size, and normalized with the checkpoint's mean/std
(preprocessor_config.json; OpenAI's when absent). Rewards come back float32 [B] on the images' device, without
gradients.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

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


class CLIPEncoder(nn.Module):
    """A frozen CLIP model and tokenizer from the local folder ``model_path``, on ``device`` (None: CUDA when
    available, else CPU): unit-norm image and text embeddings (float32)."""

    def __init__(self, model_path: str | Path | None, device=None):
        super().__init__()
        if model_path is None or not (Path(model_path) / "config.json").is_file():
            where = "not given" if model_path is None else f"{str(model_path)!r} has no config.json"
            raise ValueError(f"model_path is {where}: CLIP rewards load local weights only; {_GET_WEIGHTS}")
        try:
            from transformers import CLIPModel, CLIPTokenizer
        except ImportError as e:
            raise ImportError(
                "CLIP rewards need transformers: pip install --no-deps transformers, then its "
                "dependencies (tokenizers, huggingface_hub, safetensors, regex, ...) without torch"
            ) from e
        path = Path(model_path)
        device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
        self.model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval().requires_grad_(False)
        self.tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        pre_file = path / "preprocessor_config.json"
        pre = json.loads(pre_file.read_text()) if pre_file.is_file() else {}
        dtype = self.model.dtype
        self.register_buffer(
            "mean", torch.tensor(pre.get("image_mean", OPENAI_CLIP_MEAN), dtype=dtype, device=device).view(1, 3, 1, 1)
        )
        self.register_buffer(
            "std", torch.tensor(pre.get("image_std", OPENAI_CLIP_STD), dtype=dtype, device=device).view(1, 3, 1, 1)
        )
        self.image_size = self.model.config.vision_config.image_size

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space images -> CLIP pixel values [B, 3, S, S] on CLIP's device and dtype."""
        check_images(x)
        x = ((x.detach().to(self.mean.device, torch.float32) + 1) / 2).clamp(0, 1).expand(-1, 3, -1, -1)
        scale = self.image_size / min(x.shape[-2:])
        size = [max(self.image_size, round(s * scale)) for s in x.shape[-2:]]
        x = nn.functional.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=scale < 1)
        top, left = (size[0] - self.image_size) // 2, (size[1] - self.image_size) // 2
        x = x[..., top : top + self.image_size, left : left + self.image_size].clamp(0, 1)
        return (x.to(self.mean.dtype) - self.mean) / self.std

    @torch.no_grad()
    def images(self, x: torch.Tensor) -> torch.Tensor:
        image = _pooled(self.model.get_image_features(pixel_values=self.preprocess(x))).float()
        return image / image.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def texts(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            list(prompts),
            padding=True,
            truncation=True,
            return_tensors="pt",
            max_length=self.model.config.text_config.max_position_embeddings,
        ).to(self.mean.device)
        text = _pooled(self.model.get_text_features(**tokens)).float()
        return text / text.norm(dim=-1, keepdim=True)


class CLIPReward(nn.Module):
    """reward_i = softmax_j(CLIP logits of image i and prompt j)[0] - [...][1], in [-1, 1] (prompt embeddings are
    computed once)."""

    def __init__(self, text_prompts: Sequence[str], model_path: str | Path | None = None, device=None):
        super().__init__()
        prompts = [text_prompts] if isinstance(text_prompts, str) else list(text_prompts)
        if len(prompts) < 2 or not all(isinstance(p, str) for p in prompts):
            raise ValueError(
                f"text_prompts must be at least two strings (reward = p(prompt 0) - p(prompt 1)), got {text_prompts!r}"
            )
        self.clip = CLIPEncoder(model_path, device)
        self.text_prompts = tuple(prompts)
        self.register_buffer("text_embeds", self.clip.texts(prompts))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.clip.model.logit_scale.exp().float() * self.clip.images(x) @ self.text_embeds.T
        probs = logits.softmax(dim=-1)
        return (probs[:, 0] - probs[:, 1]).to(x.device)

    def extra_repr(self) -> str:
        return f"text_prompts={self.text_prompts}, image_size={self.clip.image_size}"


class CLIPScoreReward(nn.Module):
    """reward_i = cos(CLIP image embedding of image i, CLIP text embedding of prompt i), in [-1, 1]: how well each
    image shows its own prompt. ``reward(images, prompts)``; each distinct prompt is encoded once and cached."""

    def __init__(self, model_path: str | Path | None = None, device=None):
        super().__init__()
        self.clip = CLIPEncoder(model_path, device)
        self._texts: dict[str, torch.Tensor] = {}

    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        new = [p for p in dict.fromkeys(prompts) if p not in self._texts]
        if new:
            self._texts.update(zip(new, self.clip.texts(new)))
        return torch.stack([self._texts[p] for p in prompts])

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if (
            prompts is None
            or isinstance(prompts, str)
            or len(prompts) != images.shape[0]
            or not all(isinstance(p, str) for p in prompts)
        ):
            raise ValueError(
                f"CLIPScoreReward needs one prompt (a string) per image ({images.shape[0]}), got "
                f"{prompts!r:.80}: use it with a text-to-image model"
            )
        return (self.clip.images(images) * self.text_embeddings(prompts)).sum(dim=-1).to(images.device)


class CLIPFeatureReward(nn.Module):
    """reward_i = head(CLIP image features of image i): a hook for a reward model on CLIP features, such as an
    aesthetic predictor (an MLP on CLIP ViT-L/14 embeddings). ``head`` maps [B, D] features (unit-norm when
    ``normalize``) to [B] or [B, 1] scores; it runs without gradients on CLIP's device."""

    def __init__(
        self,
        head: Callable[[torch.Tensor], torch.Tensor],
        model_path: str | Path | None = None,
        device=None,
        *,
        normalize: bool = True,
    ):
        super().__init__()
        if not callable(head):
            raise TypeError(f"head must be a callable features [B, D] -> scores [B], got {type(head).__name__}")
        self.clip = CLIPEncoder(model_path, device)
        self.head, self.normalize = head, normalize
        if isinstance(head, nn.Module):
            head.to(self.clip.mean.device).eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            features = self.clip.images(images)
        else:
            features = _pooled(self.clip.model.get_image_features(pixel_values=self.clip.preprocess(images))).float()
        scores = self.head(features)
        if not isinstance(scores, torch.Tensor) or scores.reshape(-1).shape[0] != images.shape[0]:
            got = list(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ValueError(
                f"head must return one score per image ([{images.shape[0]}] or [{images.shape[0]}, 1]), got {got}"
            )
        return scores.reshape(-1).float().to(images.device)
