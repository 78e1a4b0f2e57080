"""Rewards: JPEG sizes against PIL directly (DDPO's definition), the classifier reward against a manual
softmax, CLIP on a tiny randomly initialized checkpoint written here, and the checks on reward outputs."""

import io
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from orw_fast.rewards import (
    REWARDS,
    ClassifierReward,
    CLIPFeatureReward,
    CLIPReward,
    CLIPScoreReward,
    as_reward_fn,
    check_rewards,
    get_reward,
    jpeg_compressibility,
    jpeg_incompressibility,
    takes_prompts,
    to_uint8_images,
)


def _images(batch, channels=3, size=16, seed=0):
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _pil_kb(x_chw):
    """DDPO's jpeg size, computed directly: [0, 1] -> uint8 -> PIL JPEG quality 95 -> bytes / 1000."""
    u8 = ((x_chw + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    image = Image.fromarray(u8[..., 0], mode="L") if u8.shape[-1] == 1 else Image.fromarray(u8, mode="RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return len(buffer.getvalue()) / 1000


def test_to_uint8_images():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0, 1.7, -3.0]).view(1, 1, 1, 7)
    u8 = to_uint8_images(x)
    assert u8.dtype == np.uint8 and u8.shape == (1, 1, 7, 1)
    assert u8.ravel().tolist() == [0, 64, 128, 255, 255, 255, 0]
    assert to_uint8_images(_images(2, 3, 5)).shape == (2, 5, 5, 3)


@pytest.mark.parametrize("channels", [1, 3])
def test_jpeg_matches_pil_for_random_and_constant_images(channels):
    x = torch.cat([_images(3, channels, 32), torch.full((2, channels, 32, 32), 0.3)])
    expected = torch.tensor([_pil_kb(img) for img in x])
    sizes = jpeg_incompressibility(x)
    assert sizes.dtype == torch.float32 and sizes.shape == (5,) and sizes.device == x.device
    assert torch.equal(sizes, expected)
    assert torch.equal(jpeg_compressibility(x), -expected)
    compress = jpeg_compressibility(x)
    assert bool(compress[3:].min() > compress[:3].max())  # a constant image compresses better


def test_jpeg_thread_pool_keeps_batch_order():
    amplitude = torch.linspace(0, 1, 48).view(48, 1, 1, 1)
    x = (_images(48, 3, 32, seed=1) * amplitude).flip(0)  # image complexity decreasing along the batch
    sizes = jpeg_incompressibility(x)
    assert torch.equal(sizes, torch.tensor([_pil_kb(img) for img in x]))
    assert bool((sizes[:8] > sizes[-8:].max()).all())


def test_registry():
    assert set(REWARDS) == {"jpeg_compressibility", "jpeg_incompressibility"}
    assert get_reward("jpeg_compressibility") is jpeg_compressibility
    with pytest.raises(ValueError, match="reward must be one of"):
        get_reward("aesthetic")


class _Linear(torch.nn.Module):
    def __init__(self, in_features, classes):
        super().__init__()
        self.fc = torch.nn.Linear(in_features, classes)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(classes, in_features, generator=torch.Generator().manual_seed(0)))
            self.fc.bias.copy_(torch.linspace(-1, 1, classes))

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("batch_size", [None, 3])
def test_classifier_reward_equals_manual_softmax_mass(batch_size):
    x, clf = _images(7, 3, 4), _Linear(48, 10)
    probs = torch.softmax(clf(x).double(), dim=1)
    mass = probs[:, [2, 5, 9]].sum(1)
    prob = ClassifierReward(clf, [2, 5, 9], batch_size=batch_size)(x)
    logprob = ClassifierReward(clf, (2, 5, 9), mode="logprob", batch_size=batch_size)(x)
    assert prob.dtype == torch.float32 and prob.shape == (7,) and not prob.requires_grad
    torch.testing.assert_close(prob.double(), mass, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(logprob.double(), mass.log(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ClassifierReward(clf, 4)(x).double(), probs[:, 4], rtol=1e-6, atol=1e-7)
    assert not clf.training


def test_classifier_reward_bad_inputs():
    clf = _Linear(48, 10)
    with pytest.raises(ValueError, match="out of range for a classifier with K = 10"):
        ClassifierReward(clf, [3, 10])(_images(2, 3, 4))
    for bad in ([], [1, 1], [-1], [1.5], True):
        with pytest.raises(ValueError, match="target_classes must be"):
            ClassifierReward(clf, bad)
    with pytest.raises(ValueError, match="mode must be one of"):
        ClassifierReward(clf, 1, mode="log")
    with pytest.raises(ValueError, match="batch_size must be None or an int >= 1"):
        ClassifierReward(clf, 1, batch_size=0)
    with pytest.raises(TypeError, match="classifier must be a callable"):
        ClassifierReward("resnet", 1)
    with pytest.raises(ValueError, match=r"classifier must return logits \[B, K\]"):
        ClassifierReward(lambda x: x.sum(), 1)(_images(2, 3, 4))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A randomly initialized CLIP (8x8 images, 16-d transformers) and a character-level CLIP tokenizer,
    saved in transformers format."""
    import transformers

    path = tmp_path_factory.mktemp("tiny_clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    config = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=24,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4
        ),
        projection_dim=8,
        logit_scale_init_value=4.0,
    )
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(path)
    transformers.CLIPTokenizer.from_pretrained(path).save_pretrained(path)
    return path


def test_clip_reward_on_a_tiny_checkpoint(tiny_clip):
    from transformers import CLIPModel, CLIPTokenizer

    prompts = ["an image of a dog", "not an image of a dog", "a cat"]
    reward = CLIPReward(prompts, model_path=tiny_clip, device="cpu")
    x = torch.cat([_images(4, 3, 8), torch.full((1, 3, 8, 8), -1.0), torch.full((1, 3, 8, 8), 1.0)])
    r = reward(x)
    assert r.dtype == torch.float32 and r.shape == (6,) and bool(((r >= -1) & (r <= 1)).all())
    assert len(set(r.tolist())) > 1

    # against CLIP's own forward on the same pixel values (8x8 already CLIP's size: no resize)
    model, tokenizer = CLIPModel.from_pretrained(tiny_clip), CLIPTokenizer.from_pretrained(tiny_clip)
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    pixels = ((x + 1) / 2 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    torch.testing.assert_close(reward.clip.preprocess(x), pixels)
    with torch.no_grad():
        out = model(**tokenizer(prompts, padding=True, return_tensors="pt"), pixel_values=pixels)
    probs = out.logits_per_image.softmax(-1)
    torch.testing.assert_close(r, probs[:, 0] - probs[:, 1], rtol=1e-5, atol=1e-6)

    swapped = CLIPReward([prompts[1], prompts[0], prompts[2]], model_path=tiny_clip, device="cpu")
    torch.testing.assert_close(swapped(x), -r)
    grey, big = reward(_images(2, 1, 8)), reward(_images(2, 3, 20)[..., 2:18])  # 1 channel; resized 16 -> 8
    assert grey.shape == big.shape == (2,) and bool((big.abs() <= 1).all())


def test_clip_score_is_the_cosine_of_each_image_and_its_own_prompt(tiny_clip):
    from transformers import CLIPModel, CLIPTokenizer

    reward = CLIPScoreReward(tiny_clip, device="cpu")
    x = _images(3, 3, 8)
    prompts = ["a dog", "a cat", "a dog"]
    r = reward(x, prompts)
    model, tokenizer = CLIPModel.from_pretrained(tiny_clip), CLIPTokenizer.from_pretrained(tiny_clip)
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    with torch.no_grad():
        out = model(
            **tokenizer(prompts, padding=True, return_tensors="pt"),
            pixel_values=((x + 1) / 2 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1),
        )
    want = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
    torch.testing.assert_close(r, want, rtol=1e-5, atol=1e-6)
    assert set(reward._texts) == {"a dog", "a cat"}  # each distinct prompt encoded once
    with pytest.raises(ValueError, match="one prompt .* per image"):
        reward(x, None)
    wrapped = as_reward_fn(reward)  # the trainer's wrapper passes the prompts along
    torch.testing.assert_close(wrapped(x, prompts), r)


def test_a_model_on_clip_features_is_a_reward(tiny_clip):
    head = torch.nn.Linear(8, 1)
    reward = CLIPFeatureReward(head, tiny_clip, device="cpu")
    x = _images(4, 3, 8)
    with torch.no_grad():
        want = head(reward.clip.images(x)).squeeze(1)
    torch.testing.assert_close(reward(x), want)
    assert not takes_prompts(reward) and takes_prompts(CLIPScoreReward.forward)
    with pytest.raises(ValueError, match="head must return one score per image"):
        CLIPFeatureReward(lambda f: f, tiny_clip, device="cpu")(x)


def test_which_reward_functions_get_prompts():
    assert takes_prompts(lambda images, prompts: 0) and takes_prompts(lambda images, *, prompts=None: 0)
    assert not takes_prompts(lambda images: 0) and not takes_prompts(lambda images, quality=95: 0)
    assert not takes_prompts(jpeg_compressibility)
    x = _images(2, 3, 4)
    assert as_reward_fn(lambda im, prompts: [len(p) for p in prompts])(x, ["ab", "abc"]).tolist() == [2.0, 3.0]
    assert as_reward_fn(lambda im: [1.0, 2.0])(x, ["ignored", "too"]).tolist() == [1.0, 2.0]


def test_clip_reward_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="model_path is not given.*local weights only.*hf download"):
        CLIPReward(["a", "b"])
    with pytest.raises(ValueError, match="has no config.json"):
        CLIPReward(["a", "b"], model_path=tmp_path / "missing")
    with pytest.raises(ValueError, match="text_prompts must be at least two strings"):
        CLIPReward(["a dog"], model_path=tmp_path)
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="CLIP rewards need transformers"):
        CLIPReward(["a", "b"], model_path=tmp_path)


def test_as_reward_fn_converts_and_checks():
    x = _images(4, 3, 4)
    assert torch.equal(as_reward_fn(lambda im: [1, 2, 3, 4])(x), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    r = as_reward_fn(lambda im: np.arange(4.0))(x)  # float64 values keep their range (1e300 is finite)
    assert r.dtype == torch.float64 and r.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert as_reward_fn(lambda im: np.arange(4, dtype=np.float32))(x).dtype == torch.float32
    assert as_reward_fn(lambda im: [True, False, True, True])(x).tolist() == [1.0, 0.0, 1.0, 1.0]
    assert as_reward_fn(lambda im: torch.arange(4))(x).dtype == torch.float32
    assert as_reward_fn(lambda im: torch.zeros(4, dtype=torch.float64))(x).dtype == torch.float64
    assert not as_reward_fn(lambda im: im.mean((1, 2, 3)))(x.requires_grad_()).requires_grad
    assert torch.equal(as_reward_fn("jpeg_incompressibility")(x.detach()), jpeg_incompressibility(x.detach()))
    with pytest.raises(ValueError, match="2 of 4 rewards are non-finite"):
        as_reward_fn(lambda im: [1.0, float("nan"), float("inf"), 0.0])(x)
    with pytest.raises(ValueError, match=r"the reward function returned rewards of shape \[4, 1\] for 4 images"):
        as_reward_fn(lambda im: torch.zeros(4, 1))(x)
    with pytest.raises(TypeError, match="reward must be a callable"):
        as_reward_fn(3.0)
    with pytest.raises(TypeError, match="rewards must be a torch.Tensor"):
        check_rewards([1.0], 1)
    with pytest.raises(ValueError, match="1 of 3 rewards are non-finite"):
        check_rewards(torch.tensor([0.0, -float("inf"), 1.0]), 3)


@pytest.mark.parametrize(
    "output,exc,match",
    [
        (["a", "b", "c", "d"], TypeError, "list holding <U1 values"),
        ("good", TypeError, "str holding"),
        ({"reward": 1.0}, TypeError, "dict holding object values"),
        (None, TypeError, "NoneType"),
        ([1.0, [2.0, 3.0], 4.0, 5.0], TypeError, "returned list, expected"),
        ([[1.0, 2.0]] * 4, ValueError, r"shape \[4, 2\] for 4 images"),
        ([1.0, 2.0], ValueError, r"shape \[2\] for 4 images"),
        (torch.ones(4, dtype=torch.complex64), TypeError, "complex64"),
    ],
)
def test_a_reward_function_with_bad_output_is_named(output, exc, match):
    """Whatever a reward function returns that is not B real numbers, the error says it is its output."""
    with pytest.raises(exc, match=match) as err:
        as_reward_fn(lambda im: output)(_images(4, 3, 4))
    assert str(err.value).startswith("the reward function returned") and "B = 4 real numbers" in str(err.value)


def test_bad_images():
    with pytest.raises(TypeError, match="images must be a torch.Tensor"):
        jpeg_compressibility(np.zeros((1, 3, 4, 4)))
    with pytest.raises(ValueError, match="C = 1 or 3"):
        jpeg_compressibility(torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match="C = 1 or 3"):
        jpeg_compressibility(torch.zeros(3, 4, 4))
    x = torch.zeros(1, 3, 4, 4)
    x[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="images has 1 non-finite"):
        ClassifierReward(_Linear(48, 10), 1)(x)
