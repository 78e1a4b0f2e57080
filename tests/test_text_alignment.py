"""The offline text-to-image task: the text-conditioned digits model (captions, reward, a diffusers folder the SD3
loader reads) and the text demo's report."""
import json

import pytest
import torch

from orw_fast.text_digits import (DIGIT_WORDS, PromptedDigitReward, caption, digit_of, prompts_for, stroke_words,
                                  to_grey)


def test_captions_name_their_digit_and_stroke():
    assert caption(7) == "a handwritten seven" and caption(0, "thin ") == "a thin handwritten zero"
    assert [digit_of(p) for p in prompts_for()] == [d for d in range(10) for _ in range(3)]
    assert digit_of("eight, not nine") == 8
    with pytest.raises(ValueError, match="names no digit"):
        digit_of("a handwritten sevens")
    with pytest.raises(ValueError, match="stroke"):
        caption(1, "bold ")


def test_stroke_words_split_each_class_into_thirds_of_ink():
    images = torch.full((30, 1, 8, 8), -1.0)
    labels = torch.tensor([3] * 15 + [5] * 15)
    for i in range(30):
        images.view(30, -1)[i, : i % 15 + 1] = 1.0  # ink grows with i within each class
    words = stroke_words(images, labels)
    for start in (0, 15):
        assert words[start:start + 5] == ["thin "] * 5
        assert words[start + 5:start + 10] == [""] * 5
        assert words[start + 10:start + 15] == ["thick "] * 5


class _FixedClassifier(torch.nn.Module):
    """Logits from the mean pixel: class k gets -(mean - k / 10)^2 * 100."""

    def forward(self, x):
        m = x.mean(dim=(1, 2, 3))[:, None]
        return -((m - torch.arange(10) / 10) ** 2) * 100


def test_prompted_digit_reward_is_the_probability_of_the_prompted_digit():
    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = [caption(d) for d in (0, 3, 3, 9, 5, 1)]
    got = PromptedDigitReward(_FixedClassifier())(images, prompts)
    probs = torch.softmax(_FixedClassifier()(to_grey(images)), dim=1)
    torch.testing.assert_close(got, probs[torch.arange(6), torch.tensor([0, 3, 3, 9, 5, 1])])
    with pytest.raises(ValueError, match="one prompt per image"):
        PromptedDigitReward(_FixedClassifier())(images, prompts[:5])


@pytest.fixture(scope="module")
def cache(digits_cache):
    """The shared digits cache with a text-digits pipeline added, pre-trained for 300 steps only: enough for the
    plumbing tested here (the alignment claims are measured by experiments/text_alignment.py)."""
    from orw_fast.text_digits import pretrained_text_digits

    pretrained_text_digits(digits_cache, steps=300, progress=False)
    return digits_cache


def test_the_text_digits_model_is_a_diffusers_sd3_folder(cache):
    from diffusers import StableDiffusion3Pipeline

    from orw_fast.models.diffusers_flow import DiffusersFlowModel, load_pipeline

    folder = cache / "text_digits"
    info = json.loads((folder / "pretraining.json").read_text())
    assert info["wrong_caption_share"] == 0.3 and info["vae_rmse"] < 0.25, info  # pixel values span 2
    pipe = load_pipeline(folder)
    assert isinstance(pipe, StableDiffusion3Pipeline) and pipe.text_encoder_3 is None
    flow = DiffusersFlowModel(folder, prompts_for(), lora_rank=None, guidance_scale=1.0, max_sequence_length=1)
    assert flow.sample_shape() == (4, 8, 8) and flow.resolution == 8
    # the pipeline's own sampling gives digits-sized images in [-1, 1]
    out = pipe([caption(4)] * 2, num_inference_steps=4, guidance_scale=1.0, output_type="pt", max_sequence_length=1,
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (2, 3, 8, 8) and out.min() >= 0 and out.max() <= 1
    vocabulary = pipe.tokenizer.get_vocab()  # the digit words are whole tokens
    assert all(f"{word}</w>" in vocabulary for word in DIGIT_WORDS)


def test_the_text_demo_writes_its_report(cache, tmp_path):
    from orw_fast.cli import main

    out = tmp_path / "report"
    main(["demo", "--task", "text", "--alphas", "0", "--epochs", "1", "--steps-per-epoch", "2", "--device", "cpu",
          "--cache-dir", str(cache), "--out", str(out), "--quiet"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["runs"]["0"]["0"]) == 2
    for name in ("samples_reference.png", "samples_alpha_0.png", "curves.png"):
        assert (out / name).stat().st_size > 0
