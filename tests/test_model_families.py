"""Model families behind the registry (orw_fast.models.families): the family of a pipeline from its transformer,
FlowModel.from_checkpoint for every family and for checkpoints written before families were recorded, a pipeline
folder found again after the run was moved, the resolution and pipeline checks made from config files alone, and
FluxPipeline's private helpers that orw_fast calls."""

import json
import shutil
import warnings

import pytest
import torch

from orw_fast.models.diffusers_flow import DiffusersFlowModel, family_of
from orw_fast.models.families import FAMILIES, family_class
from orw_fast.models.flow_model import FlowModel, ModelArgumentError, PixelFlowModel
from orw_fast.models.flux import FluxFlowModel
from orw_fast.models.sd3 import SD3FlowModel
from orw_fast.tasks.tiny_pipelines import save_tiny_pipeline, tiny_pipeline
from orw_fast.trainer import ORWCFMTrainer, TrainerConfig

warnings.filterwarnings("ignore", message=".*torchvision.*")
PROMPTS = ["a red cat", "a blue dog"]
RESOLUTION = {"sd3": 8, "flux": 16}
FAMILY = {"sd3": SD3FlowModel, "flux": FluxFlowModel}
SUPPORTED = r"orw_fast fine-tunes SD3/SD3.5 \(StableDiffusion3Pipeline\) and FLUX.1 \(FluxPipeline\)"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {kind: save_tiny_pipeline(kind, root / kind, sample_size=RESOLUTION[kind]) for kind in FAMILY}


def flow_of(source, kind, **kwargs):
    options = {"lora_rank": 4, "resolution": RESOLUTION[kind], "guidance_scale": 2.0, "max_sequence_length": 16}
    return DiffusersFlowModel(source, PROMPTS, **{**options, **kwargs})


def brightness(images, prompts=None):
    return images.mean(dim=(1, 2, 3))


def trained_checkpoint(flow, folder):
    """A checkpoint of ``flow`` after one step from a perturbed adapter (or full weights), and the trainer."""
    config = TrainerConfig(
        batch_size=2, sampler_method="euler", sampler_steps=2, learning_rate=1e-2, grid_size=0, savedir=str(folder)
    )
    trainer = ORWCFMTrainer(flow, config, "cpu", reward_fn=brightness)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trainer.weights.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    trainer.train_step()
    return trainer.save_checkpoint(folder / "last.pt"), trainer


def same_velocity(a, b, module_a, module_b):
    x = torch.randn(2, *a.sample_shape(), generator=torch.Generator().manual_seed(4))
    t = torch.tensor([0.3, 0.7])
    with torch.no_grad():
        return torch.equal(
            a.velocity(module_a, t, x, *a.conditions(PROMPTS)), b.velocity(module_b, t, x, *b.conditions(PROMPTS))
        )


def config_only_pipeline(folder, pipeline_class, transformer_class, transformer_config):
    """A pipeline folder with its config files and no weights: model_index.json, transformer/ and vae/config.json
    (the published VAE's 4 blocks: 8x downsampling)."""
    index = {
        "_class_name": pipeline_class,
        "transformer": ["diffusers", transformer_class],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    for sub, content in (
        (None, index),
        ("transformer", {"_class_name": transformer_class, **transformer_config}),
        ("vae", {"_class_name": "AutoencoderKL", "block_out_channels": [128, 256, 512, 512]}),
    ):
        path = folder / (sub or "") / ("config.json" if sub else "model_index.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content))
    return folder


@pytest.fixture
def no_weight_loads(monkeypatch):
    """from_pretrained of pipelines and models fails the test if called."""
    from diffusers import DiffusionPipeline, ModelMixin

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", refuse)
    monkeypatch.setattr(ModelMixin, "from_pretrained", refuse)


# -- the registry ------------------------------------------------------------------------------------------------


def test_the_registry_maps_names_to_families_and_refuses_unknown_ones():
    assert {name: family_class(name) for name in FAMILIES} == {
        "pixel": PixelFlowModel,
        "sd3": SD3FlowModel,
        "flux": FluxFlowModel,
    }
    with pytest.raises(ValueError, match=r"model family must be one of 'pixel', 'sd3', 'flux', got 'wan'"):
        family_class("wan")


@pytest.mark.parametrize("kind", FAMILY)
def test_a_pipeline_builds_its_family_from_a_folder_or_an_object(folders, kind):
    flow = flow_of(folders[kind], kind)
    assert type(flow) is FAMILY[kind] and isinstance(flow, DiffusersFlowModel)
    assert flow.describe()["family"] == kind and "kind" not in flow.describe()
    assert type(DiffusersFlowModel(tiny_pipeline(kind), PROMPTS, max_sequence_length=16)) is FAMILY[kind]
    assert FAMILY[kind](folders[kind], PROMPTS, resolution=RESOLUTION[kind]).family == kind
    other = "flux" if kind == "sd3" else "sd3"
    with pytest.raises(
        ModelArgumentError,
        match=rf"is a {FAMILY[other].title.split()[0]}.* pipeline; a "
        rf"{FAMILY[kind].__name__} fine-tunes",
    ):
        FAMILY[kind](folders[other], PROMPTS)


def test_an_unknown_transformer_is_refused_naming_the_supported_families(tmp_path, no_weight_loads):
    folder = config_only_pipeline(tmp_path / "qwen", "QwenImagePipeline", "QwenImageTransformer2DModel", {})
    with pytest.raises(
        ModelArgumentError,
        match=r"'.*qwen' \(QwenImagePipeline, transformer "
        rf"QwenImageTransformer2DModel\) is not a supported pipeline: "
        rf"{SUPPORTED}",
    ) as err:
        DiffusersFlowModel(folder, PROMPTS)
    assert err.value.argument == "pipeline"
    from diffusers import StableDiffusionPipeline

    with pytest.raises(
        ValueError,
        match=r"the pipeline object \(StableDiffusionPipeline, no transformer\) "
        rf"is not a supported pipeline: {SUPPORTED}",
    ):
        family_of(StableDiffusionPipeline.__new__(StableDiffusionPipeline))


# -- checks from config files, before any weight loads ---------------------------------------------------------


@pytest.mark.parametrize(
    "pipeline,transformer,config,why",
    [
        (
            "StableDiffusion3Pipeline",
            "SD3Transformer2DModel",
            {"patch_size": 2},
            r"the VAE's 8x downsampling times the transformer's 2x2 patches",
        ),
        (
            "FluxPipeline",
            "FluxTransformer2DModel",
            {"patch_size": 1},
            r"the VAE's 8x downsampling times FLUX's 2x2 latent packing",
        ),
    ],
)
def test_a_resolution_is_refused_from_the_config_files_naming_its_true_factor(
    tmp_path, no_weight_loads, pipeline, transformer, config, why
):
    folder = config_only_pipeline(tmp_path / "p", pipeline, transformer, config)
    message = rf"resolution must be a multiple of 16 for this pipeline \({why}\), got 24"
    with pytest.raises(ModelArgumentError, match=message) as err:
        DiffusersFlowModel(folder, PROMPTS, resolution=24)
    assert err.value.argument == "resolution"
    assert DiffusersFlowModel.check_pipeline(folder, 32) is family_of(folder)  # a multiple passes
    from orw_fast.cli import main

    (tmp_path / "prompts.txt").write_text("a red cat\n")
    with pytest.raises(SystemExit, match=rf"^error: --resolution: {message}$"):
        main(
            [
                "finetune",
                "--pretrained",
                str(folder),
                "--prompts",
                str(tmp_path / "prompts.txt"),
                "--resolution",
                "24",
                "--reward",
                "jpeg_compressibility",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "run"),
            ]
        )


def test_a_folder_that_is_not_a_pipeline_gets_an_error_in_command_line_words(tmp_path, no_weight_loads):
    """The model's own error (the command line refuses such a folder already at parse time: tests/test_cli.py) names
    the argument and says what was expected without Python-API wording."""
    (tmp_path / "not_a_pipeline").mkdir()
    with pytest.raises(ModelArgumentError) as err:
        DiffusersFlowModel(tmp_path / "not_a_pipeline", PROMPTS)
    assert err.value.argument == "pipeline"
    assert str(err.value) == (
        f"cannot load a diffusers pipeline from '{tmp_path / 'not_a_pipeline'}': the folder has "
        "no model_index.json; expected a local folder written by save_pretrained or a hub id"
    )


# -- FlowModel.from_checkpoint ----------------------------------------------------------------------------------


def test_a_pixel_checkpoint_rebuilds_through_flow_model(tmp_path):
    from orw_fast.models import make_flow_model

    torch.manual_seed(0)
    model, config = make_flow_model((1, 8, 8), preset="digits")
    path, trainer = trained_checkpoint(PixelFlowModel(model), tmp_path)
    assert trainer.config.model_config == {"family": "pixel", **config}
    flow = FlowModel.from_checkpoint(path)
    assert type(flow) is PixelFlowModel and not flow.weights.module.training
    trainer.flow.model.eval()
    assert same_velocity(flow, trainer.flow, flow.weights.module, trainer.flow.model)
    # a pixel config written before families were recorded (flow.pt of `orw-fast pretrain`)
    torch.save({"ema_model": model.state_dict(), "model_config": config}, tmp_path / "flow.pt")
    old = FlowModel.from_checkpoint(tmp_path / "flow.pt")
    assert type(old) is PixelFlowModel and same_velocity(old, trainer.flow, old.weights.module, trainer.flow.model)
    with pytest.raises(ModelArgumentError, match="prompts is not an option of a pixel model's checkpoint"):
        FlowModel.from_checkpoint(path, prompts=["a cat"])
    with pytest.raises(ValueError, match=r"is a checkpoint of a PixelFlowModel, not of a SD3FlowModel"):
        SD3FlowModel.from_checkpoint(path)


@pytest.mark.parametrize("kind", FAMILY)
def test_a_diffusers_checkpoint_rebuilds_its_family_through_flow_model(tmp_path, folders, kind):
    path, trainer = trained_checkpoint(flow_of(folders[kind], kind), tmp_path / "run")
    flow = FlowModel.from_checkpoint(path)
    assert type(flow) is FAMILY[kind] and flow.source == str(folders[kind].resolve())
    assert same_velocity(flow, trainer.flow, flow.weights.module, trainer.flow.transformer)
    other = FluxFlowModel if kind == "sd3" else SD3FlowModel
    with pytest.raises(ValueError, match=rf"is a checkpoint of a {FAMILY[kind].__name__}, not of a {other.__name__}"):
        other.from_checkpoint(path)
    from orw_fast.pretrain import load_flow_model

    # `orw-fast finetune --checkpoint` of a text-to-image run
    with pytest.raises(ValueError, match=rf"is a checkpoint of a '{kind}' model, not of a pixel flow model"):
        load_flow_model(path)


def test_a_diffusers_checkpoint_written_before_families_still_loads(tmp_path, folders, monkeypatch):
    """Its model_config says "kind": "diffusers" and the pipeline path as it was typed (relative)."""
    path, trainer = trained_checkpoint(flow_of(folders["sd3"], "sd3"), tmp_path / "run")
    ckpt = torch.load(path, weights_only=False)
    config = ckpt["config"]["model_config"]
    del config["family"]
    config.update(kind="diffusers", pipeline="sd3")
    torch.save(ckpt, tmp_path / "old.pt")
    monkeypatch.chdir(folders["sd3"].parent)
    flow = FlowModel.from_checkpoint(tmp_path / "old.pt")
    assert type(flow) is SD3FlowModel
    assert same_velocity(flow, trainer.flow, flow.weights.module, trainer.flow.transformer)


def test_a_relative_pipeline_path_is_found_from_another_folder_and_after_the_run_moved(tmp_path, monkeypatch):
    """--pretrained typed relative to the working folder: the checkpoint records it absolute, so sampling from
    another folder finds it; when the whole tree has moved, it is found relative to the checkpoint's folder. The
    hub is never asked."""
    import huggingface_hub

    from orw_fast.cli import main

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("the hub was asked"))
    project = tmp_path / "project"
    save_tiny_pipeline("sd3", project / "pipes" / "sd3", sample_size=8)
    (project / "prompts.txt").write_text("a red cat\n")
    monkeypatch.chdir(project)
    main(
        [
            "finetune",
            "--pretrained",
            "pipes/sd3",
            "--prompts",
            "prompts.txt",
            "--reward",
            "jpeg_compressibility",
            "--lora-rank",
            "2",
            "--epochs",
            "1",
            "--steps-per-epoch",
            "1",
            "--batch-size",
            "2",
            "--sampler-method",
            "euler",
            "--sampler-steps",
            "1",
            "--max-sequence-length",
            "8",
            "--device",
            "cpu",
            "--quiet",
            "--out",
            "runs/x",
        ]
    )
    recorded = torch.load(project / "runs/x/last.pt", weights_only=False)["config"]["model_config"]["pipeline"]
    assert recorded == str(project / "pipes" / "sd3")
    monkeypatch.chdir(tmp_path)
    main(
        [
            "sample",
            "--checkpoint",
            "project/runs/x/last.pt",
            "--n",
            "1",
            "--steps",
            "1",
            "--device",
            "cpu",
            "--out",
            "a.png",
        ]
    )
    moved = shutil.move(project, tmp_path / "moved")
    flow = FlowModel.from_checkpoint(tmp_path / "moved" / "runs" / "x" / "last.pt")
    assert flow.source == str(tmp_path / "moved" / "pipes" / "sd3") and str(moved) == str(tmp_path / "moved")
    main(
        [
            "sample",
            "--checkpoint",
            "moved/runs/x/last.pt",
            "--n",
            "1",
            "--steps",
            "1",
            "--device",
            "cpu",
            "--out",
            "b.png",
        ]
    )
    assert (tmp_path / "a.png").is_file() and (tmp_path / "b.png").is_file()


# -- FluxPipeline's private helpers: what orw_fast relies on ---------------------------------------------------


def test_the_flux_pipeline_helpers_orw_fast_calls_pack_as_it_expects(folders):
    """FluxFlowModel calls FluxPipeline._prepare_latent_image_ids and _unpack_latents (no public API): image ids
    are (0, row, column) per token in row-major order, and unpacking inverts the pipeline's 2x2 packing, so that
    to_images decodes the latents the pipeline would."""
    from diffusers import FluxPipeline

    ids = FluxPipeline._prepare_latent_image_ids(1, 3, 4, "cpu", torch.float32)
    rows, cols = torch.meshgrid(torch.arange(3.0), torch.arange(4.0), indexing="ij")
    torch.testing.assert_close(ids, torch.stack([torch.zeros(3, 4), rows, cols], -1).reshape(12, 3), rtol=0, atol=0)
    flow = flow_of(folders["flux"], "flux", lora_rank=None)
    flow.prepare(torch.device("cpu"), ema=False)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    packed = FluxPipeline._pack_latents(latents, 2, 4, 16, 16)
    assert packed.shape == (2, *flow.sample_shape())
    vae = flow.pipe.vae
    with torch.no_grad():
        expected = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample.clamp(-1, 1)
    torch.testing.assert_close(flow.to_images(packed), expected, rtol=0, atol=0)
