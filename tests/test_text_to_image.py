"""Text-to-image fine-tuning on tiny SD3 and FLUX pipelines saved to folders and loaded back through orw_fast's
loader: the velocity convention, rollouts equal to the pipeline's own sampling, LoRA-only updates, the reference,
the diffusers LoRA export, exact resume, a reward that rises, CLIP rewards on prompts, the CLI, and bad input."""

import copy
import math
import warnings

import pytest
import torch
from conftest import requires_gpu

from orw_fast.models.diffusers_flow import DiffusersFlowModel, load_pipeline
from orw_fast.prompts import PromptSource
from orw_fast.tasks.tiny_pipelines import save_tiny_pipeline, tiny_pipeline
from orw_fast.trainer import ORWCFMTrainer, TrainerConfig

warnings.filterwarnings("ignore", message=".*torchvision.*")
PROMPTS = ["a red cat", "a blue dog", "a small green bird"]
RESOLUTION = {"sd3": 8, "flux": 16}
KINDS = ("sd3", "flux")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {kind: save_tiny_pipeline(kind, root / kind, sample_size=RESOLUTION[kind]) for kind in KINDS}


def flow_of(folders, kind, **kwargs):
    options = dict(lora_rank=4, resolution=RESOLUTION[kind], guidance_scale=2.0, max_sequence_length=16)
    return DiffusersFlowModel(folders[kind], kwargs.pop("prompts", PROMPTS), **{**options, **kwargs})


def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))


def config(tmp_path, **overrides):
    base = dict(batch_size=4, sampler_steps=4, learning_rate=1e-2, grid_size=0, savedir=str(tmp_path), seed=0)
    return TrainerConfig(**{**base, **overrides})


def perturb_lora(flow, scale=0.3, seed=1):
    """Non-zero LoRA B matrices (peft starts them at zero), so that the policy differs from the base model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.weights.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.device) * scale)


# -- conventions ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_velocity_is_minus_the_transformer_output_at_sigma_one_minus_t(folders, kind):
    flow = flow_of(folders, kind, lora_rank=None)
    flow.prepare(torch.device("cpu"), ema=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *flow.sample_shape(), generator=g)
    t = torch.tensor([0.25, 0.8])
    embeds, pooled = flow.conditions(PROMPTS[:2])
    transformer = flow.pipe.transformer
    with torch.no_grad():
        if kind == "sd3":  # SD3 takes timestep = 1000 sigma
            out = transformer(
                hidden_states=x,
                timestep=(1 - t) * 1000,
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                return_dict=False,
            )[0]
        else:  # FLUX takes sigma itself (the pipeline divides its timesteps by 1000), plus the guidance embedding
            out = transformer(
                hidden_states=x,
                timestep=1 - t,
                guidance=torch.full((2,), 2.0),
                pooled_projections=pooled,
                encoder_hidden_states=embeds,
                txt_ids=flow._txt_ids,
                img_ids=flow._img_ids,
                return_dict=False,
            )[0]
        v = flow.velocity(transformer, t, x, embeds, pooled)
    torch.testing.assert_close(v, -out, rtol=0, atol=0)


@pytest.mark.parametrize("kind,guidance", [("sd3", 1.0), ("sd3", 4.5), ("flux", 3.5)])
def test_rollouts_equal_the_pipelines_own_sampling(folders, kind, guidance):
    """Same latents, embeddings, schedule and guidance as pipe(..., output_type="latent"): equal up to float32
    rounding (atol 1e-5 on latents of size ~4)."""
    flow = flow_of(folders, kind, lora_rank=None, guidance_scale=guidance)
    flow.prepare(torch.device("cpu"), ema=False)
    x0 = torch.randn(2, *flow.sample_shape(), generator=torch.Generator().manual_seed(3))
    prompts = PROMPTS[1:]
    with flow.weights.last_policy() as module:
        ours = flow.generate(module, x0, prompts, steps=5, cuda_graph=False)
    embeds, pooled = flow.conditions(prompts)
    call = dict(
        prompt_embeds=embeds,
        pooled_prompt_embeds=pooled,
        latents=x0.clone(),
        num_inference_steps=5,
        guidance_scale=guidance,
        output_type="latent",
        height=RESOLUTION[kind],
        width=RESOLUTION[kind],
    )
    if kind == "sd3":
        call.update(
            negative_prompt_embeds=flow._embeds[-1:].expand(2, -1, -1),
            negative_pooled_prompt_embeds=flow._pooled[-1:].expand(2, -1),
        )
    else:
        call.update(max_sequence_length=16)
    theirs = flow.pipe(**call).images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert not torch.allclose(ours, x0)


@pytest.mark.parametrize("kind", KINDS)
def test_the_time_grid_is_the_schedulers_shifted_sigmas(folders, kind):
    flow = flow_of(folders, kind)
    times = flow.times(4)
    pipe = load_pipeline(folders[kind])
    if kind == "sd3":
        pipe.scheduler.set_timesteps(4)
    else:
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        pipe.scheduler.set_timesteps(sigmas=np.linspace(1, 1 / 4, 4), mu=calculate_shift((16 // 2) ** 2))
    torch.testing.assert_close(times, 1 - pipe.scheduler.sigmas.double(), rtol=0, atol=0)
    uniform = torch.linspace(0, 1, 5, dtype=torch.float64)
    assert times[0] == 0 and times[-1] == 1 and not torch.allclose(times, uniform)


@requires_gpu
@pytest.mark.parametrize("kind", KINDS)
def test_graphed_rollouts_equal_eager_ones_and_follow_the_swapped_adapter(folders, kind):
    """On a GPU the rollout of the last policy (the adapter's copy swapped in) replays a CUDA graph: equal to the
    eager loop, and a refreshed last policy is read by the same graph (values copied in place)."""
    flow = flow_of(folders, kind)
    flow.prepare(torch.device("cuda"), ema=False)
    x0 = torch.randn(3, *flow.sample_shape(), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    results = []
    for _ in range(2):
        with flow.weights.last_policy() as module:
            eager = flow.generate(module, x0, PROMPTS, steps=4, cuda_graph=False)
            graphed = flow.generate(module, x0, PROMPTS, steps=4, cuda_graph=True)
        torch.testing.assert_close(graphed, eager, rtol=1e-4, atol=1e-4)
        results.append(graphed)
        perturb_lora(flow)
        flow.weights.refresh_last_policy()
    assert not torch.allclose(results[0], results[1], atol=1e-3)


# -- LoRA ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_step_changes_only_the_lora_weights_and_the_reference_is_the_base(tmp_path, folders, kind):
    flow = flow_of(folders, kind)
    trainer = ORWCFMTrainer(flow, config(tmp_path), "cpu", reward_fn=brightness)
    perturb_lora(flow)
    base = {n: p.detach().clone() for n, p in flow.transformer.named_parameters() if "lora" not in n}
    lora = [p.detach().clone() for p in trainer.weights.trainable_parameters()]
    trainer.train_step()
    assert all(torch.equal(p, base[n]) for n, p in flow.transformer.named_parameters() if "lora" not in n)
    assert all(not torch.equal(a, b) for a, b in zip(lora, trainer.weights.trainable_parameters()))
    assert {n for n, p in flow.transformer.named_parameters() if p.requires_grad} == set(trainer.weights.names)
    # the reference is the base model: the same velocity as a fresh pipeline without the adapter
    fresh = flow_of(folders, kind, lora_rank=None)
    fresh.prepare(torch.device("cpu"), ema=False)
    x = torch.randn(3, *flow.sample_shape(), generator=torch.Generator().manual_seed(4))
    t, cond = torch.rand(3, generator=torch.Generator().manual_seed(5)), flow.conditions(PROMPTS)
    with torch.no_grad():
        with trainer.weights.reference() as reference:
            v_ref = flow.velocity(reference, t, x, *cond)
        v_base = fresh.velocity(fresh.transformer, t, x, *fresh.conditions(PROMPTS))
        v_policy = flow.velocity(flow.transformer, t, x, *cond)
    torch.testing.assert_close(v_ref, v_base, rtol=0, atol=1e-6)
    assert not torch.allclose(v_policy, v_ref, atol=1e-4)  # the adapter is back on after the reference


def test_the_lora_adapter_starts_from_the_seed_whatever_ran_before(tmp_path, folders):
    adapters = []
    for seed, noise in ((3, 0), (3, 1), (4, 0)):
        torch.manual_seed(noise)  # the global RNG's state before the trainer
        trainer = ORWCFMTrainer(flow_of(folders, "sd3"), config(tmp_path, seed=seed), "cpu", reward_fn=brightness)
        adapters.append([p.detach().clone() for p in trainer.weights.trainable_parameters()])
    assert all(torch.equal(a, b) for a, b in zip(adapters[0], adapters[1]))
    assert not all(torch.equal(a, b) for a, b in zip(adapters[0], adapters[2]))


@pytest.mark.parametrize("objective", ["orw_cfm_w2", "nft", "awm"])
@pytest.mark.parametrize("kind", KINDS)
def test_the_saved_lora_reproduces_the_fine_tuned_model_in_a_fresh_pipeline(tmp_path, folders, kind, objective):
    """For every objective (nft and awm with their defaults: the old policy an EMA of the adapter), on two samples
    per prompt (a group with a spread of rewards): a step moves only the adapter, and its export is the policy."""
    flow = flow_of(folders, kind, prompts=PromptSource(PROMPTS, samples_per_prompt=2))
    trainer = ORWCFMTrainer(flow, config(tmp_path, objective=objective), "cpu", reward_fn=brightness)
    perturb_lora(flow)
    frozen = {n: p.detach().clone() for n, p in flow.transformer.named_parameters() if "lora" not in n}
    lora = [p.detach().clone() for p in trainer.weights.trainable_parameters()]
    metrics = trainer.train_step()
    assert math.isfinite(metrics["loss"]) and metrics["w2_loss"] >= 0, metrics
    assert all(torch.equal(p, frozen[n]) for n, p in flow.transformer.named_parameters() if "lora" not in n)
    assert any(not torch.equal(a, b) for a, b in zip(lora, trainer.weights.trainable_parameters()))
    trainer.save_checkpoint(tmp_path / "last.pt")
    assert (tmp_path / "last_lora" / "pytorch_lora_weights.safetensors").is_file()
    pipe = load_pipeline(folders[kind])
    x = torch.randn(2, *flow.sample_shape(), generator=torch.Generator().manual_seed(6))
    t, cond = torch.tensor([0.3, 0.7]), flow.conditions(PROMPTS[:2])
    with torch.no_grad():
        ours = flow.velocity(flow.transformer, t, x, *cond)
        base = flow.velocity(pipe.transformer, t, x, *cond)  # the fresh pipeline, before the export is loaded
        pipe.load_lora_weights(tmp_path / "last_lora")
        theirs = flow.velocity(pipe.transformer, t, x, *cond)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert not torch.allclose(base, ours, atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_a_lora_run_resumes_exactly(tmp_path, folders, kind):
    def run(folder, epochs, resume=None):
        trainer = ORWCFMTrainer(
            flow_of(folders, kind, prompts=PromptSource(PROMPTS, samples_per_prompt=2)),
            config(folder, ema_decay=0.9, grid_size=2),
            "cpu",
            reward_fn=brightness,
        )
        if resume:
            trainer.resume(resume)
        return [m["loss"] for m in trainer.train(epochs, 2, progress=False)], trainer

    full, _ = run(tmp_path / "full", 2)
    part1, _ = run(tmp_path / "part", 1)
    torch.manual_seed(999)
    part2, resumed = run(tmp_path / "resumed", 2, resume=tmp_path / "part" / "last.pt")
    assert part1 + part2 == full
    assert (tmp_path / "full" / "samples_epoch002.png").stat().st_size > 0


@pytest.mark.parametrize("seed", [1, 2])
def test_the_reward_weights_raise_the_reward_a_tiny_model_can_learn(tmp_path, folders, seed):
    """Mean brightness of the decoded images, LoRA on the attention and the output projection, 3 epochs of 5
    steps. A random tiny transformer is not the flow of any data, so flow matching on its own samples moves it even
    with uniform weights, in a direction unrelated to the reward (measured: the reward then falls for some seeds).
    What the reward weights add is the difference to the same run with temperature 0 (uniform weights, the same
    rollouts in the first epoch): the weighted policy's samples from the same noise and prompts are brighter, by
    0.7-1.0 of the brightness spread in seeds 1-3 (asserted: a quarter, and 4 standard errors)."""
    final = []
    for temperature in (300.0, 0.0):
        flow = flow_of(folders, "sd3", lora_targets=["to_q", "to_k", "to_v", "to_out.0", "proj_out"])
        trainer = ORWCFMTrainer(
            flow,
            config(tmp_path, batch_size=16, temperature=temperature, w2_coefficient=0.0, seed=seed),
            "cpu",
            reward_fn=brightness,
        )
        history = trainer.train(3, 5, progress=False)
        assert all(math.isfinite(m["loss"]) for m in history)
        x0 = torch.randn(64, *flow.sample_shape(), generator=torch.Generator().manual_seed(99))
        with torch.no_grad():
            x1 = flow.generate(flow.transformer, x0, [PROMPTS[i % 3] for i in range(64)], steps=3)
            final.append(brightness(flow.to_images(x1), None))
    gain = final[0] - final[1]
    assert gain.mean() > 0.25 * final[1].std() and gain.mean() > 4 * gain.std() / 8, (gain.mean(), final[1].std())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_train_a_float32_adapter(tmp_path, folders, dtype):
    """Loaded in bf16/fp16: the base weights keep that dtype and stay as they are, the adapter trains in float32,
    the rollout state stays float32, and the step is finite."""
    flow = flow_of(folders, "sd3", dtype=dtype)
    trainer = ORWCFMTrainer(
        flow, config(tmp_path, precision="bf16" if dtype == torch.bfloat16 else "fp32"), "cpu", reward_fn=brightness
    )
    base = {n: p.detach().clone() for n, p in flow.transformer.named_parameters() if not p.requires_grad}
    assert {p.dtype for p in base.values()} == {dtype}
    assert {p.dtype for p in trainer.weights.trainable_parameters()} == {torch.float32}
    _, x1, _ = trainer.rollout(4)
    assert x1.dtype == torch.float32 and torch.isfinite(x1).all()
    metrics = trainer.train_step()
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
    assert all(torch.equal(p, base[n]) for n, p in flow.transformer.named_parameters() if not p.requires_grad)


def test_prompts_are_encoded_once_and_the_text_encoders_dropped(tmp_path, folders, monkeypatch):
    flow = flow_of(folders, "sd3", prompts=PROMPTS + PROMPTS)
    calls = []
    encode = flow.pipe.encode_prompt
    monkeypatch.setattr(
        flow.pipe, "encode_prompt", lambda prompts, *a, **k: calls.append(list(prompts)) or encode(prompts, *a, **k)
    )
    trainer = ORWCFMTrainer(flow, config(tmp_path), "cpu", reward_fn=brightness)
    for _ in range(2):
        trainer.train_step()
    assert calls == [PROMPTS + [""]]  # the distinct prompts and the negative one, in one batch, once
    assert flow.pipe.text_encoder is None and flow.pipe.text_encoder_2 is None


def test_rewards_get_the_prompts_of_their_images(tmp_path, folders):
    seen = []

    def reward(images, prompts):
        seen.append((images.shape, list(prompts)))
        return images.mean(dim=(1, 2, 3))

    trainer = ORWCFMTrainer(
        flow_of(folders, "sd3", prompts=PromptSource(PROMPTS, samples_per_prompt=2)),
        config(tmp_path),
        "cpu",
        reward_fn=reward,
    )
    trainer.train_step()
    ((shape, prompts),) = seen
    assert shape == (4, 3, 8, 8) and prompts[0] == prompts[1] and prompts[2] == prompts[3]
    assert set(prompts) <= set(PROMPTS)


def test_full_fine_tuning_of_a_small_transformer(tmp_path, folders):
    flow = flow_of(folders, "sd3", lora_rank=None)
    trainer = ORWCFMTrainer(flow, config(tmp_path), "cpu", reward_fn=brightness)
    before = copy.deepcopy(flow.transformer.state_dict())
    trainer.train_step()
    assert any(not torch.equal(before[k], v) for k, v in flow.transformer.state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in trainer.reference.state_dict().items())


# -- the command line -------------------------------------------------------------------------------------------


def test_cli_finetune_and_sample_a_lora_run(tmp_path, folders):
    from orw_fast.cli import main

    (tmp_path / "prompts.txt").write_text("a red cat\n\na blue dog\n")
    main(
        [
            "finetune",
            "--pretrained",
            str(folders["sd3"]),
            "--prompts",
            str(tmp_path / "prompts.txt"),
            "--reward",
            "jpeg_compressibility",
            "--lora-rank",
            "4",
            "--resolution",
            "8",
            "--guidance-scale",
            "2",
            "--epochs",
            "1",
            "--steps-per-epoch",
            "2",
            "--batch-size",
            "2",
            "--sampler-method",
            "euler",
            "--sampler-steps",
            "2",
            "--device",
            "cpu",
            "--quiet",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert (tmp_path / "run" / "last_lora" / "pytorch_lora_weights.safetensors").is_file()
    main(
        [
            "sample",
            "--checkpoint",
            str(tmp_path / "run" / "last.pt"),
            "--n",
            "2",
            "--steps",
            "2",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "grid.png"),
        ]
    )
    from PIL import Image

    with Image.open(tmp_path / "grid.png") as grid:  # two 32-pixel images with a caption under each
        assert grid.width > 64 and grid.height > 32


@pytest.mark.parametrize(
    "extra,match",
    [
        ([], r"--pretrained needs --prompts FILE"),
        (["--prompts", "PROMPTS", "--reward", "clip_score"], r"--reward clip_score needs --clip-model DIR"),
        (
            ["--prompts", "PROMPTS"],
            r"--reward classifier \(the default\) scores the digits of a --checkpoint model; "
            r"with --pretrained choose --reward clip_score or one of jpeg_compressibility",
        ),
        (["--prompts", "MISSING", "--reward", "jpeg_compressibility"], r"prompt file '.*missing.txt' does not exist"),
        (["--prompts", "PROMPTS", "--checkpoint", "PROMPTS"], r"give one of --checkpoint .* or --pretrained"),
    ],
)
def test_cli_text_to_image_mistakes_are_one_line(tmp_path, folders, extra, match):
    from orw_fast.cli import main

    (tmp_path / "prompts.txt").write_text("a red cat\n")
    paths = {"PROMPTS": str(tmp_path / "prompts.txt"), "MISSING": str(tmp_path / "missing.txt")}
    with pytest.raises(SystemExit, match=match):
        main(
            [
                "finetune",
                "--pretrained",
                str(folders["sd3"]),
                *[paths.get(a, a) for a in extra],
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "run"),
            ]
        )


# -- bad input --------------------------------------------------------------------------------------------------


def test_bad_input_gets_clear_errors(tmp_path, folders):
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no prompt"):
        PromptSource(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError, match="prompt file .*missing.txt' does not exist"):
        PromptSource(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="lora_rank must be None or an integer >= 1, got 0"):
        flow_of(folders, "sd3", lora_rank=0)
    with pytest.raises(ValueError, match="resolution must be a multiple of 2"):
        flow_of(folders, "flux", resolution=15)
    from diffusers import StableDiffusionPipeline

    class NotAFlowPipeline(StableDiffusionPipeline):
        def __init__(self):  # no weights needed to be refused
            self.transformer = None

    with pytest.raises(ValueError, match="is not a supported pipeline: orw_fast fine-tunes SD3/SD3.5"):
        DiffusersFlowModel(NotAFlowPipeline.__new__(NotAFlowPipeline), PROMPTS)
    with pytest.raises(ValueError, match="cannot load a diffusers pipeline from"):
        DiffusersFlowModel(tmp_path / "no_such_model", PROMPTS)
    trainer = ORWCFMTrainer(
        flow_of(folders, "sd3"), config(tmp_path), "cpu", reward_fn=lambda im, p: im.mean((1, 2, 3))[:2]
    )
    with pytest.raises(ValueError, match=r"the reward function returned rewards of shape \[2\] for 4 images"):
        trainer.train_step()
    with pytest.raises(ValueError, match="sampler_grid must be None for a SD3FlowModel .*scheduler's sigma"):
        ORWCFMTrainer(flow_of(folders, "sd3"), config(tmp_path, sampler_grid="uniform"), "cpu", reward_fn=brightness)
    with pytest.raises(ValueError, match=r"must be a multiple of samples_per_prompt \(3\)"):
        ORWCFMTrainer(
            flow_of(folders, "sd3", prompts=PromptSource(PROMPTS, samples_per_prompt=3)),
            config(tmp_path),
            "cpu",
            reward_fn=brightness,
        )


def test_an_in_memory_pipeline_object_is_used_as_it_is():
    pipe = tiny_pipeline("sd3")
    flow = DiffusersFlowModel(pipe, PROMPTS, lora_rank=2, max_sequence_length=16)
    assert flow.pipe is pipe and flow.resolution == 8 and flow.describe()["pipeline"] is None
