"""Command line: ``orw-fast demo | pretrain | finetune | sample | bench`` (also ``python -m orw_fast``).

``finetune`` also runs multi-process: ``torchrun --nproc_per_node=N -m orw_fast finetune ...``.
Every user error is one line naming the flag it came from: argparse checks each value's type and range, output
locations are checked before long work starts, and a value the trainer refuses is reported under its flag."""
from __future__ import annotations

import argparse
import math
import runpy
import sys
from pathlib import Path

import torch

from orw_fast import distributed as dist_utils
from orw_fast.checkpoint import prepare_output_dir, prepare_output_file
from orw_fast.sampling import FIXED_STEP_METHODS, GRIDS


# -- argument types: a bad value is an argparse error naming the flag -----------------------------------------


def _device(text: str) -> torch.device:
    try:
        return dist_utils.local_device(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _existing_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"file {text!r} does not exist")
    return path


def _number(kind=float, minimum=None, *, above=False):
    """An argparse type: a finite int/float, >= ``minimum`` (> with ``above``)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if minimum is not None and (value <= minimum if above else value < minimum):
            raise argparse.ArgumentTypeError(f"must be {'>' if above else '>='} {minimum:g}, got {text!r}")
        return value
    return parse


_POSITIVE_INT = _number(int, 1)


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise argparse.ArgumentTypeError(f"must be finite numbers >= 0, got {text!r}")
    return values


def _classes(text: str) -> list[int]:
    try:
        classes = [int(c) for c in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated class indices, got {text!r}") from None
    if any(c < 0 for c in classes) or len(set(classes)) != len(classes):
        raise argparse.ArgumentTypeError(f"expected distinct class indices >= 0, got {text!r}")
    return classes


# -- commands -------------------------------------------------------------------------------------------------


def cmd_demo(args) -> None:
    given = {k: v for k, v in (("epochs", args.epochs), ("steps_per_epoch", args.steps_per_epoch),
                               ("temperature", args.tau), ("weighting", args.weighting),
                               ("learning_rate", args.lr)) if v is not None}
    if args.task == "text":
        from orw_fast.tasks.text_alignment import AlignmentSettings, run_text_demo

        settings = AlignmentSettings(alphas=args.alphas, seeds=(args.seed,), **given)
        run_text_demo(prepare_output_dir(args.out, "--out"), settings, cache_dir=args.cache_dir, device=args.device,
                      progress=not args.quiet)
    else:
        from orw_fast.tasks.demo import DemoSettings, run_demo

        settings = DemoSettings(alphas=args.alphas, seed=args.seed, **given)
        run_demo(prepare_output_dir(args.out, "--out"), settings, cache_dir=args.cache_dir, device=args.device,
                 progress=not args.quiet)
    print(f"report written to {args.out}")


def cmd_pretrain(args) -> None:
    from orw_fast.pretrain import default_cache_dir, pretrain_dataset

    out = args.out or (default_cache_dir() / "digits" if args.dataset == "digits" else Path("runs/pretrain"))
    prepare_output_dir(out, "--out")
    result = pretrain_dataset(args.dataset, out, steps=args.steps, batch_size=args.batch_size,
                              lr=args.lr, preset=args.preset, classifier=args.classifier, seed=args.seed,
                              device=args.device, progress=not args.quiet)
    for key in ("flow", "classifier_accuracy", "classifier"):
        if key in result:
            print(f"{key}: {result[key]}")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _t2i_options(p, *, sampling: bool) -> None:
    """The text-to-image flags (diffusers SD3/SD3.5 or FLUX)."""
    p.add_argument("--pretrained", help="a diffusers SD3/SD3.5 or FLUX pipeline: a local folder or a hub id"
                   + (" (default: the one the run loaded)" if sampling else ""))
    p.add_argument("--prompts", help="text file, one prompt a line" + (" (default: the run's)" if sampling else ""))
    p.add_argument("--weights-dtype", default="fp32", choices=tuple(DTYPES), help="dtype of the pipeline's weights")
    if sampling:
        return
    p.add_argument("--samples-per-prompt", type=_POSITIVE_INT, default=1, help="samples of each prompt in a batch")
    p.add_argument("--clip-model", help="local CLIP folder (transformers format) for --reward clip_score")
    p.add_argument("--lora-rank", type=_POSITIVE_INT, default=16, help="rank of the LoRA adapter (default 16)")
    p.add_argument("--full-finetune", action="store_true", help="train the whole transformer instead of LoRA")
    p.add_argument("--guidance-scale", type=_number(float, 0), default=None,
                   help="rollout guidance: SD3's CFG scale, FLUX's guidance embedding (default: the pipeline's)")
    p.add_argument("--negative-prompt", default="", help="SD3's unconditional prompt for guidance")
    p.add_argument("--resolution", type=_POSITIVE_INT, default=None, help="image side in pixels (default: the "
                   "pipeline's)")
    p.add_argument("--max-sequence-length", type=_POSITIVE_INT, default=None, help="T5 tokens per prompt")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--keep-text-encoders", action="store_true", help="keep the text encoders after caching the "
                   "prompts' embeddings")


def _reward_classifier(args, device):
    """The classifier of --classifier, or one trained on the labels of --dataset (by rank 0, whose
    weights every rank then scores with)."""
    from orw_fast.data import load_dataset
    from orw_fast.rewards import DigitClassifier, load_classifier, train_classifier

    if args.classifier is not None:
        return load_classifier(args.classifier).to(device)
    if args.dataset is None:
        raise SystemExit("error: --reward classifier needs --classifier PATH (from `orw-fast pretrain`) or a "
                         "labelled --dataset to train one on")
    images, labels = load_dataset(args.dataset)
    if labels is None:
        raise SystemExit(f"error: --dataset {args.dataset} has no labels to train a reward classifier on")
    classifier = DigitClassifier(image_shape=tuple(images.shape[1:]), num_classes=int(labels.max()) + 1)
    with dist_utils.on_all_ranks("training the reward classifier"):
        if dist_utils.is_main():
            accuracy = train_classifier(classifier, images, labels, seed=args.seed, progress=not args.quiet)
            print(f"reward classifier: {accuracy}")
    classifier.to(device)
    dist_utils.broadcast_module(classifier)
    return classifier


# The TrainerConfig key each finetune flag sets: a value the trainer refuses is reported under its flag.
FINETUNE_FLAGS = {"learning_rate": "--lr", "w2_coefficient": "--alpha", "temperature": "--tau",
                  "batch_size": "--batch-size", "savedir": "--out", "weighting": "--weighting",
                  "coupling": "--coupling", "sampler_steps": "--sampler-steps", "precision": "--precision",
                  "compile": "--compile", "seed": "--seed", "fsdp": "--fsdp", "ema_decay": "--ema-decay",
                  "sampler_method": "--sampler-method", "rollout_batches": "--rollout-batches",
                  "rollout_reuse": "--rollout-reuse"}
MODEL_FLAGS = {"pipeline": "--pretrained", "prompts": "--prompts", "resolution": "--resolution",  # ModelArgumentError
               "dtype": "--weights-dtype"}
DEMO_FLAGS = {"w2_coefficient": "--alphas", "temperature": "--tau", "weighting": "--weighting", "seed": "--seed",
              "learning_rate": "--lr"}


def _t2i_model(args):
    """The DiffusersFlowModel of the text-to-image flags (--pretrained, --prompts, LoRA, guidance, ...)."""
    from orw_fast.models.diffusers_flow import DiffusersFlowModel
    from orw_fast.prompts import PromptSource

    if args.prompts is None:
        raise SystemExit("error: --pretrained needs --prompts FILE (one prompt a line)")
    DiffusersFlowModel.check_pipeline(args.pretrained, args.resolution)  # from config files, before any weight loads
    prompts = PromptSource(args.prompts, samples_per_prompt=args.samples_per_prompt)
    return DiffusersFlowModel(args.pretrained, prompts, lora_rank=None if args.full_finetune else args.lora_rank,
                              resolution=args.resolution, guidance_scale=args.guidance_scale,
                              negative_prompt=args.negative_prompt, max_sequence_length=args.max_sequence_length,
                              dtype=DTYPES[args.weights_dtype], gradient_checkpointing=args.gradient_checkpointing,
                              keep_text_encoders=args.keep_text_encoders)


def _reward(args, device):
    from orw_fast.rewards import REWARDS, ClassifierReward, CLIPScoreReward, get_reward

    if args.reward == "classifier":
        if args.pretrained is not None:
            raise SystemExit("error: --reward classifier (the default) scores the digits of a --checkpoint model; "
                             f"with --pretrained choose --reward clip_score or one of {', '.join(REWARDS)}")
        return ClassifierReward(_reward_classifier(args, device), args.target_classes)
    if args.reward == "clip_score":
        if args.pretrained is None:
            raise SystemExit("error: --reward clip_score needs prompts: use it with --pretrained and --prompts")
        if args.clip_model is None:
            raise SystemExit("error: --reward clip_score needs --clip-model DIR, a local CLIP folder in transformers "
                             "format (e.g. openai/clip-vit-large-patch14 saved with save_pretrained)")
        return CLIPScoreReward(args.clip_model, device=device)
    return get_reward(args.reward)


def cmd_finetune(args) -> None:
    from orw_fast.pretrain import load_flow_model
    from orw_fast.trainer import ORWCFMTrainer, TrainerConfig

    if (args.checkpoint is None) == (args.pretrained is None):
        raise SystemExit("error: give one of --checkpoint (a flow.pt of `orw-fast pretrain`) or --pretrained (a "
                         "diffusers SD3/FLUX folder or hub id)")
    device = args.device
    dist_utils.init_from_env(device)
    config = TrainerConfig(learning_rate=args.lr, w2_coefficient=args.alpha, temperature=args.tau,
                           batch_size=args.batch_size, savedir=str(args.out), weighting=args.weighting,
                           coupling=args.coupling, sampler_steps=args.sampler_steps,
                           sampler_method=args.sampler_method, rollout_batches=args.rollout_batches,
                           rollout_reuse=args.rollout_reuse, precision=args.precision, compile=args.compile,
                           seed=args.seed, fsdp=args.fsdp, ema_decay=args.ema_decay)
    with dist_utils.on_all_ranks("checking --out"):
        if dist_utils.is_main():
            prepare_output_dir(args.out, "--out")
    if args.pretrained is not None:
        model = _t2i_model(args)
    else:
        model, config.model_config = load_flow_model(args.checkpoint)
    trainer = ORWCFMTrainer(model, config, device, reward_fn=_reward(args, device))
    if args.resume:
        trainer.resume(args.resume)
    trainer.train(args.epochs, args.steps_per_epoch, progress=not args.quiet)
    if dist_utils.is_main():
        print(f"checkpoints, metrics.jsonl and sample grids in {args.out}")


def cmd_sample(args) -> None:
    from orw_fast.images import save_image_grid
    from orw_fast.models.flow_model import FlowModel

    prepare_output_file(args.out, "--out")
    given = {"pipeline": args.pretrained, "prompts": args.prompts,
             "dtype": None if args.weights_dtype == "fp32" else DTYPES[args.weights_dtype]}
    flow = FlowModel.from_checkpoint(args.checkpoint, device=args.device,
                                     **{key: value for key, value in given.items() if value is not None})
    module, prompts = flow.weights.module, None if flow.prompts is None else flow.prompts.first(args.n)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    x0 = torch.randn((args.n, *flow.sample_shape()), device=args.device, generator=gen)
    grid = None if args.grid == "uniform" and flow.rollout_grid is None else args.grid
    images = flow.to_images(flow.generate(module, x0, prompts, steps=args.steps, method=args.method, grid=grid))
    print(f"wrote {save_image_grid(images, args.out, scale=args.scale, captions=prompts)}")


BENCHMARKS = {  # name -> (script in benchmarks/, what it measures)
    "loss": ("bench_loss.py", "fused loss forward + backward: eager, torch.compile, native, triton"),
    "sampler": ("bench_sampler.py", "rollout sampler: eager fp32 loop, torchdiffeq, ours eager / CUDA graph / compile"),
    "train-step": ("bench_train_step.py", "whole training step: ours against the official algorithm run eagerly"),
    "t2i": ("bench_t2i.py", "text-to-image: rollouts, LoRA/full training steps, prompt caching (SD3, FLUX)"),
    "hardware": ("hardware.py", "the device's copy bandwidth and matmul rate"),
    "nvcc": ("nvcc_report.py", "registers, spills and 16-byte loads of the CUDA kernels (needs nvcc, no GPU)"),
    "all": ("run_all.py", "every stage in one run with a summary (benchmarks/run_gpu.sh, run_cpu.sh)"),
}
BENCH_USAGE = "usage: orw-fast bench {" + ",".join(BENCHMARKS) + "} [options]\n\n" + "\n".join(
    f"  {name:<11} {about}" for name, (_, about) in BENCHMARKS.items()) + (
    "\n\n`orw-fast bench NAME --help` lists a benchmark's options; options without a name go to the loss "
    "benchmark.\nResults: benchmarks/results/<device>/ (JSON, CSV, Markdown, PNG) with device, date and commit.")


def cmd_bench(args) -> None:
    rest = list(args.bench_args)
    if not rest or rest[0] in ("-h", "--help"):
        print(BENCH_USAGE)
        raise SystemExit(0 if rest else 2)
    name = "loss" if rest[0].startswith("-") else rest.pop(0)
    if name not in BENCHMARKS:
        raise SystemExit(f"error: unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    script = Path(__file__).resolve().parent.parent / "benchmarks" / BENCHMARKS[name][0]
    if not script.is_file():
        raise SystemExit(f"error: `orw-fast bench` runs benchmarks/{BENCHMARKS[name][0]} of a source checkout")
    sys.argv = [str(script), *rest]
    runpy.run_path(str(script), run_name="__main__")


def build_parser() -> argparse.ArgumentParser:
    from orw_fast.rewards import REWARDS

    parser = argparse.ArgumentParser(prog="orw-fast", description="ORW-CFM-W2 fine-tuning of flow-matching models.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--device", type=_device, default="auto", help="cpu, cuda, cuda:N or auto (default)")
        p.add_argument("--seed", type=_number(int, 0), default=0)
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    from orw_fast.config import TrainerConfig
    from orw_fast.tasks.text_alignment import AlignmentSettings
    from orw_fast.tasks.demo import DemoSettings

    demo = DemoSettings()
    weighting_help = "reward weights: exp(tau r) (the paper's), B softmax(tau r) or none"
    text = AlignmentSettings()
    p = sub.add_parser("demo", help="offline demo: fine-tune toward even digits, or toward prompt alignment of a "
                                    "text-conditioned SD3-architecture digits model (scikit-learn digits)")
    p.add_argument("--task", choices=("even", "text"), default="even",
                   help="even: even digits from a pixel flow model (~8 min on 2 cores); text: prompt alignment with "
                        "LoRA on an SD3-architecture digits model (~70 s; its first run pre-trains it: ~5.5 min)")
    p.add_argument("--out", type=Path, default=Path("reports/demo"), help="report folder (default %(default)s)")
    p.add_argument("--alphas", type=_floats, default=demo.alphas, help="W2 coefficients, comma-separated")
    p.add_argument("--epochs", type=_POSITIVE_INT, default=None,
                   help=f"default {demo.epochs} (even), {text.epochs} (text)")
    p.add_argument("--steps-per-epoch", type=_POSITIVE_INT, default=None,
                   help=f"default {demo.steps_per_epoch} (even), {text.steps_per_epoch} (text)")
    p.add_argument("--tau", type=_number(), default=None,
                   help=f"reward temperature (default {demo.temperature} (even), {text.temperature} (text))")
    p.add_argument("--weighting", default=None, choices=("softmax", "exp", "none"),
                   help=weighting_help + f" (default {demo.weighting} (even), {text.weighting} (text))")
    p.add_argument("--lr", type=_number(float, 0, above=True), default=None,
                   help=f"learning rate (default {demo.learning_rate:g} (even), {text.learning_rate:g} (text))")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="pre-trained models (default $ORW_FAST_CACHE or ~/.cache/orw_fast)")
    common(p)
    p.set_defaults(run=cmd_demo, config_flags=DEMO_FLAGS)

    p = sub.add_parser("pretrain", help="train a flow-matching model (and a classifier when labels exist)")
    p.add_argument("--dataset", default="digits", help="digits | idx:PATH | folder:PATH")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: the demo's cache ~/.cache/orw_fast/digits for digits, else "
                   "runs/pretrain)")
    p.add_argument("--preset", default=None, help="model preset (digits, mnist, cifar10; default from the image shape)")
    p.add_argument("--steps", type=_POSITIVE_INT, default=demo.pretrain_steps)
    p.add_argument("--batch-size", type=_POSITIVE_INT, default=128)
    p.add_argument("--lr", type=_number(float, 0, above=True), default=2e-3)
    p.add_argument("--no-classifier", dest="classifier", action="store_false", help="skip the classifier")
    common(p)
    p.set_defaults(run=cmd_pretrain)

    p = sub.add_parser("finetune", help="ORW-CFM-W2 fine-tuning of a pre-trained model (pixel or text-to-image)")
    p.add_argument("--checkpoint", type=_existing_file, help="flow.pt from `orw-fast pretrain` (or give --pretrained)")
    p.add_argument("--reward", default="classifier", choices=("classifier", "clip_score", *REWARDS),
                   help="a digit classifier's probability of --target-classes, CLIP text-image alignment "
                   "(text-to-image), or a registered reward (default classifier)")
    p.add_argument("--classifier", type=_existing_file, help="classifier.pt for --reward classifier")
    p.add_argument("--dataset", help="labelled dataset (digits | idx:PATH | folder:PATH) to train the reward "
                   "classifier on when --classifier is not given")
    p.add_argument("--target-classes", type=_classes, default=[0, 2, 4, 6, 8],
                   help="classes the classifier reward counts (default: the even digits)")
    p.add_argument("--out", type=Path, default=Path("runs/finetune"))
    p.add_argument("--resume", type=_existing_file, help="continue from a training checkpoint")
    p.add_argument("--alpha", type=_number(float, 0), default=1.0, help="W2 coefficient")
    p.add_argument("--tau", type=_number(), default=demo.temperature, help="reward temperature")
    p.add_argument("--weighting", default=demo.weighting, choices=("softmax", "exp", "none"), help=weighting_help)
    p.add_argument("--coupling", default="independent", choices=("independent", "ot", "rollout"))
    p.add_argument("--epochs", type=_POSITIVE_INT, default=demo.epochs)
    p.add_argument("--steps-per-epoch", type=_POSITIVE_INT, default=demo.steps_per_epoch)
    p.add_argument("--batch-size", type=_POSITIVE_INT, default=demo.batch_size,
                   help="the whole batch; under torchrun split evenly over the processes")
    p.add_argument("--lr", type=_number(float, 0, above=True), default=demo.learning_rate)
    p.add_argument("--sampler-steps", type=_POSITIVE_INT, default=demo.sampler_steps, help="rollout steps (default "
                   f"{demo.sampler_steps}; with the default method and grid as accurate as 100 Euler steps)")
    p.add_argument("--sampler-method", default=TrainerConfig.sampler_method, choices=FIXED_STEP_METHODS,
                   help=f"rollout solver (default {TrainerConfig.sampler_method}: 2 model calls a step)")
    p.add_argument("--rollout-batches", type=_POSITIVE_INT, default=1,
                   help="make the rollouts of this many steps in one sampler call (default 1)")
    p.add_argument("--rollout-reuse", type=_POSITIVE_INT, default=1,
                   help="use each rollout in this many updates (default 1: a fresh rollout per sample and step)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--compile", action="store_true", help="torch.compile the policy")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the policy and its frozen copies with FSDP2 instead of DDP replicas")
    p.add_argument("--ema-decay", type=_number(float, 0), default=0.0, help="EMA of the policy (0: none)")
    _t2i_options(p, sampling=False)
    common(p)
    p.set_defaults(run=cmd_finetune, config_flags=FINETUNE_FLAGS)

    p = sub.add_parser("sample", help="a grid of samples from a checkpoint")
    p.add_argument("--checkpoint", type=_existing_file, required=True, help="flow.pt or a training checkpoint")
    p.add_argument("--out", type=Path, default=Path("samples.png"), help="the PNG file to write")
    p.add_argument("--n", type=_POSITIVE_INT, default=64, help="number of samples")
    p.add_argument("--steps", type=_POSITIVE_INT, default=100)
    p.add_argument("--method", default="euler")
    p.add_argument("--grid", default="uniform", choices=GRIDS,
                   help="time grid of a pixel model's rollout (a diffusers model follows its scheduler)")
    p.add_argument("--scale", type=_POSITIVE_INT, default=4, help="enlarge the PNG this many times")
    _t2i_options(p, sampling=True)
    common(p)
    p.set_defaults(run=cmd_sample)

    p = sub.add_parser("bench", add_help=False,
                       help="benchmarks: loss | sampler | train-step | t2i | hardware | nvcc | all (see `orw-fast bench --help`)")
    p.set_defaults(run=cmd_bench)
    return parser


def main(argv=None) -> None:
    from orw_fast.config import ConfigError
    from orw_fast.models.flow_model import ModelArgumentError

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = rest  # every option belongs to the benchmark script
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if dist_utils.env_world_size() > 1 and args.command != "finetune":
        parser.error(f"only finetune runs multi-process; run {args.command} as one process, without torchrun")
    finished = False
    try:
        args.run(args)
        finished = True
    except ConfigError as err:
        flag = getattr(args, "config_flags", {}).get(err.key)
        raise SystemExit(f"error: {flag} must be {err.expected}, got {err.value!r}" if flag else f"error: {err}") from err
    except ModelArgumentError as err:
        raise SystemExit(f"error: {MODEL_FLAGS.get(err.argument, err.argument)}: {err}") from err
    except (ValueError, FloatingPointError, OSError, dist_utils.PeerError) as err:
        raise SystemExit(f"error: {err}") from err
    finally:  # after a failure the other ranks may not reach a barrier: only a finished run synchronizes
        dist_utils.shutdown(synchronize=finished)


if __name__ == "__main__":
    main()
