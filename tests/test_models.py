"""Flow-model presets and configs, the digit classifier and its training."""

import json

import pytest
import torch
from torchcfm.models.unet.unet import UNetModelWrapper

from orw_fast.data import load_digits_dataset
from orw_fast.models import PRESET_SHAPES, PRESETS, build_flow_model, make_flow_model
from orw_fast.rewards import DigitClassifier, train_classifier


@pytest.mark.parametrize("preset", ["digits", "mnist"])
def test_flow_model_forward(preset):
    shape = PRESET_SHAPES[preset]
    torch.manual_seed(0)
    model, config = make_flow_model(shape, preset=preset)
    assert isinstance(model, UNetModelWrapper)
    assert config == {"dim": list(shape), **PRESETS[preset]}
    x, t = torch.randn(3, *shape), torch.rand(3)
    v = model(t, x)
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
    v.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_cifar10_preset_is_the_paper_config():
    model, config = make_flow_model((3, 32, 32))  # preset picked from the shape
    assert config == dict(
        dim=[3, 32, 32],
        num_channels=128,
        num_res_blocks=2,
        channel_mult=[1, 2, 2, 2],
        attention_resolutions="16",
        num_heads=4,
        num_head_channels=64,
        dropout=0.1,
    )
    assert sum(p.numel() for p in model.parameters()) == 35_746_307


def test_build_flow_model_round_trip(tmp_path):
    torch.manual_seed(0)
    model, config = make_flow_model((1, 8, 8), num_channels=64)
    assert config["num_channels"] == 64
    torch.save({"model_config": config, "model": model.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert json.loads(json.dumps(ckpt["model_config"])) == config  # plain data
    rebuilt = build_flow_model(ckpt["model_config"])
    rebuilt.load_state_dict(ckpt["model"])
    model.eval(), rebuilt.eval()
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    with torch.no_grad():
        assert torch.equal(rebuilt(t, x), model(t, x))


def test_flow_model_errors():
    with pytest.raises(ValueError, match="no preset for image_shape"):
        make_flow_model((3, 16, 16))
    with pytest.raises(ValueError, match="preset must be one of"):
        make_flow_model((1, 8, 8), preset="imagenet")
    with pytest.raises(ValueError, match="H == W"):
        make_flow_model((1, 8, 16), preset="digits")
    with pytest.raises(ValueError, match="image_shape"):
        make_flow_model((8, 8), preset="digits")
    with pytest.raises(TypeError, match="unknown UNetModelWrapper kwargs"):
        make_flow_model((1, 8, 8), channels=3)
    with pytest.raises(TypeError, match="image_shape, not dim"):
        make_flow_model((1, 8, 8), dim=(1, 8, 8))
    with pytest.raises(ValueError, match="attention_resolutions"):
        make_flow_model((1, 8, 8), attention_resolutions="")
    with pytest.raises(ValueError, match="divisible by 2\\^2"):
        make_flow_model((1, 6, 6), preset="mnist")
    with pytest.raises(TypeError, match="does not take"):
        build_flow_model({"dim": [1, 8, 8], "num_channels": 32, "num_res_blocks": 1, "width": 3})
    with pytest.raises(TypeError, match="needs 'dim'"):
        build_flow_model({"num_channels": 32, "num_res_blocks": 1})
    with pytest.raises(TypeError, match="config must be a dict"):
        build_flow_model([("dim", [1, 8, 8])])


def test_classifier_shapes_and_errors():
    model = DigitClassifier()
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    assert DigitClassifier((3, 28, 28), num_classes=4)(torch.randn(2, 3, 28, 28)).shape == (2, 4)
    with pytest.raises(ValueError, match=r"x must have shape \[B, 1, 8, 8\]"):
        model(torch.randn(5, 1, 9, 9))
    with pytest.raises(ValueError, match="image_shape"):
        DigitClassifier((1, 2, 2))
    with pytest.raises(ValueError, match="num_classes"):
        DigitClassifier(num_classes=1)
    images, labels = torch.randn(10, 1, 8, 8), torch.arange(10)
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        train_classifier(model, images, labels.float(), progress=False)
    with pytest.raises(ValueError, match=r"labels must have shape \[10\]"):
        train_classifier(model, images, labels[:9], progress=False)
    with pytest.raises(ValueError, match="epochs"):
        train_classifier(model, images, labels, epochs=0, progress=False)
    with pytest.raises(ValueError, match="test_fraction"):
        train_classifier(model, images, labels, test_fraction=1.0, progress=False)


def test_classifier_learns_digits():
    images, labels = load_digits_dataset()
    torch.manual_seed(0)
    model = DigitClassifier()
    result = train_classifier(model, images, labels, epochs=8, seed=0, progress=False)
    assert result["num_train"] + result["num_test"] == 1797 and result["num_test"] == 359
    assert result["test_accuracy"] >= 0.9 and result["train_accuracy"] >= 0.9
    assert not model.training


def test_pretraining_gives_the_same_model_whatever_the_global_random_state(tmp_path):
    from orw_fast.pretrain import pretrain_dataset

    weights = []
    for i, noise in enumerate((1, 2)):
        torch.manual_seed(noise)  # another process starts from another (random) global seed
        pretrain_dataset("digits", tmp_path / str(i), steps=2, classifier=False, progress=False)
        weights.append(torch.load(tmp_path / str(i) / "flow.pt", weights_only=False)["ema_model"])
    assert weights[0].keys() == weights[1].keys()
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k
