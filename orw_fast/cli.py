"""Command line: ``orw-fast demo | pretrain | finetune | sample | bench`` (also ``python -m orw_fast``).

``finetune`` also runs multi-process: ``torchrun --nproc_per_node=N -m orw_fast finetune ...``. Its trainer flags
are made from :class:`~orw_fast.config.TrainerConfig` (one flag per field, help and default from the field), and a
run can be given as a YAML/JSON file (``--config``); every run writes the options it ran with to ``OUT/config.yaml``.
Other packages add commands through the entry point group ``orw_fast.commands`` (``orw-fast demo`` comes so from
the tasks package, which the core never imports).
Every user error is one line naming the flag it came from: argparse checks each value's type and range, output
locations and input files are checked before any weight is loaded, and a value the trainer refuses is reported
under its flag."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata
import importlib.util
import math
import re
import runpy
import sys
import typing
from pathlib import Path

import torch

from orw_fast import distributed as dist_utils
from orw_fast.cli_paths import check_output_dir, prepare_output_dir, prepare_output_file
from orw_fast.sampling import GRIDS

COMMAND_GROUP = "orw_fast.commands"  # entry points: name -> add(subparsers), which adds the command's parser


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes print a one-line usage pointer and the error, not the whole usage block."""

    def error(self, message):
        self.exit(2, f"usage: {self.prog} [options]; see {self.prog} --help\n{self.prog}: error: {message}\n")


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


def _number(kind=float, minimum=None, *, above=False, below=None, maximum=None):
    """An argparse type: a finite int/float, >= ``minimum`` (> with ``above``), < ``below``, <= ``maximum``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if minimum is not None and (value <= minimum if above else value < minimum):
            raise argparse.ArgumentTypeError(f"must be {'>' if above else '>='} {minimum:g}, got {text!r}")
        if (below is not None and value >= below) or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(
                f"must be {f'< {below:g}' if below is not None else f'<= {maximum}'}, got {text!r}"
            )
        return value

    return parse


_POSITIVE_INT = _number(int, 1)


def _classes(text: str) -> list[int]:
    try:
        classes = [int(c) for c in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated class indices, got {text!r}") from None
    if any(c < 0 for c in classes) or len(set(classes)) != len(classes):
        raise argparse.ArgumentTypeError(f"expected distinct class indices >= 0, got {text!r}")
    return classes


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _pipeline(text: str) -> str:
    """A diffusers pipeline: a local folder holding model_index.json, or a hub id (ORG/NAME)."""
    path = Path(text)
    if path.exists() and not (path / "model_index.json").is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is not a diffusers pipeline folder (it has no model_index.json)")
    if not path.exists() and not _HUB_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(f"folder {text!r} does not exist (nor is it a hub id such as ORG/NAME)")
    return text


def _check_prompts(args) -> None:
    """--prompts, read before any weight is loaded: a missing, unreadable or empty file is one line."""
    from orw_fast.prompts import PromptSource

    try:
        PromptSource(args.prompts)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: --prompts: {err}") from None


def _quiet_hf_libraries() -> None:
    """--quiet for diffusers and transformers (where installed): no loading bars, no warnings (such as the image
    processors' "requires torchvision" fallback) on any load."""
    for library in ("diffusers", "transformers"):
        if importlib.util.find_spec(library) is not None:
            logging = importlib.import_module(f"{library}.utils.logging")
            logging.disable_progress_bar()
            logging.set_verbosity_error()


# -- the trainer's flags, made from TrainerConfig ---------------------------------------------------------------

# Fields whose flag is not --field-name (the names users know); every other field with cli=True is --field-name.
TRAINER_FLAG_ALIASES = {
    "learning_rate": "--lr",
    "w2_coefficient": "--alpha",
    "temperature": "--tau",
    "savedir": "--out",
}


def _choice_type(choices):
    by_text = {str(c).lower(): c for c in choices}
    return lambda text: by_text.get(text.lower(), text)


def add_config_options(parser, config_cls, aliases=None) -> dict[str, str]:
    """Adds a flag for each field of the dataclass ``config_cls`` declared with cli=True (orw_fast.config.option):
    its dest is the field name, its help and default the field's, its type and range those of the field's checker.
    Returns {field: flag}, under which a ConfigError on that field is reported."""
    hints = typing.get_type_hints(config_cls)
    flags = {}
    for field in dataclasses.fields(config_cls):
        if not field.metadata.get("cli", True):
            continue
        flag = (aliases or {}).get(field.name, "--" + field.name.replace("_", "-"))
        check, hint = field.metadata.get("check"), hints[field.name]
        kind = next((t for t in (hint, *typing.get_args(hint)) if t in (bool, int, float, str)), str)
        choices = getattr(check, "choices", None)
        if hint is bool:
            options = {"action": argparse.BooleanOptionalAction}
        elif choices is not None:
            options = {"type": _choice_type(choices), "choices": choices}
        elif kind in (int, float):
            options = {"type": _number(kind, **getattr(check, "limits", {}))}
        else:
            options = {"type": kind}
        action = parser.add_argument(
            flag, dest=field.name, default=field.default, help=field.metadata.get("help", ""), **options
        )
        if "default" not in action.help:
            action.help += " (default: %(default)s)"
        flags[field.name] = flag
    return flags


# -- run files: --config in, OUT/config.yaml out ----------------------------------------------------------------

_NOT_IN_RUN_FILES = {"help", "config", "device", "quiet"}  # where and how verbosely a run goes, not what it does


def _file_options(parser) -> dict[str, argparse.Action]:
    """The options of ``parser`` a run file may set, by key (the option's dest)."""
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest not in _NOT_IN_RUN_FILES}


def _config_argv(parser, path: Path) -> list[str]:
    """The flags the run file ``path`` (YAML or JSON, a mapping of option keys) stands for; the command line's own
    flags come after them, so they win."""
    import yaml

    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        parser.error(f"argument --config: {str(path)!r} cannot be read as YAML or JSON ({err})".replace("\n", " "))
    if values is None:
        values = {}
    if not isinstance(values, dict):
        parser.error(
            f"argument --config: {str(path)!r} must hold a mapping of option keys, got {type(values).__name__}"
        )
    options = _file_options(parser)
    argv = []
    for key, value in values.items():
        action = options.get(key)
        if action is None:
            parser.error(f"argument --config: unknown key {key!r} in {str(path)!r}; valid keys: {', '.join(options)}")
        if isinstance(action, argparse.BooleanOptionalAction):
            if not isinstance(value, bool):
                parser.error(f"argument --config: {key} must be true or false, got {value!r}")
            argv.append(action.option_strings[0 if value else 1])
        elif value is not None:
            text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
            argv += [action.option_strings[0], text]
    return argv


def _write_run_file(args, path: Path) -> None:
    """The options of this run as a run file: ``orw-fast finetune --config PATH`` repeats it."""
    import yaml

    from orw_fast.checkpoint import write_text_atomic

    def plain(value):
        return str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value

    values = {key: plain(getattr(args, key)) for key in _file_options(args.parser)}
    write_text_atomic(
        path, f"# orw-fast finetune --config {path} repeats this run\n" + yaml.safe_dump(values, sort_keys=False)
    )


# -- commands -------------------------------------------------------------------------------------------------


def cmd_pretrain(args) -> None:
    from orw_fast.data import check_dataset_spec
    from orw_fast.pretrain import default_cache_dir, pretrain_dataset

    check_dataset_spec(args.dataset)  # a refused run creates no --out folder
    out = args.out or (default_cache_dir() / "digits" if args.dataset == "digits" else Path("runs/pretrain"))
    prepare_output_dir(out, "--out")
    result = pretrain_dataset(
        args.dataset,
        out,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        preset=args.preset,
        classifier=args.classifier,
        seed=args.seed,
        device=args.device,
        progress=not args.quiet,
    )
    for key in ("flow", "classifier_accuracy", "classifier"):
        if key in result:
            print(f"{key}: {result[key]}")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _t2i_options(p, *, sampling: bool) -> None:
    """The text-to-image flags (diffusers SD3/SD3.5 or FLUX)."""
    p.add_argument(
        "--pretrained",
        type=_pipeline,
        help="a diffusers SD3/SD3.5 or FLUX pipeline: a local folder or a hub id"
        + (" (default: the one the run loaded)" if sampling else ""),
    )
    p.add_argument("--prompts", help="text file, one prompt a line" + (" (default: the run's)" if sampling else ""))
    p.add_argument("--weights-dtype", default="fp32", choices=tuple(DTYPES), help="dtype of the pipeline's weights")
    if sampling:
        return
    p.add_argument("--samples-per-prompt", type=_POSITIVE_INT, default=1, help="samples of each prompt in a batch")
    p.add_argument("--clip-model", help="local CLIP folder (transformers format) for --reward clip_score")
    p.add_argument("--lora-rank", type=_POSITIVE_INT, default=16, help="rank of the LoRA adapter (default 16)")
    p.add_argument(
        "--full-finetune",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="train the whole transformer instead of LoRA",
    )
    p.add_argument(
        "--guidance-scale",
        type=_number(float, 0),
        default=None,
        help="rollout guidance: SD3's CFG scale, FLUX's guidance embedding (default: the pipeline's)",
    )
    p.add_argument("--negative-prompt", default="", help="SD3's unconditional prompt for guidance")
    p.add_argument(
        "--resolution", type=_POSITIVE_INT, default=None, help="image side in pixels (default: the pipeline's)"
    )
    p.add_argument("--max-sequence-length", type=_POSITIVE_INT, default=None, help="T5 tokens per prompt")
    p.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="recompute activations in backward",
    )
    p.add_argument(
        "--keep-text-encoders",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="keep the text encoders after caching the prompts' embeddings",
    )


def _reward_classifier(args, device):
    """The classifier of --classifier, or one trained on the labels of --dataset (by rank 0, whose
    weights every rank then scores with)."""
    from orw_fast.data import load_dataset
    from orw_fast.rewards import DigitClassifier, load_classifier, train_classifier

    if args.classifier is not None:
        return load_classifier(args.classifier).to(device)
    if args.dataset is None:
        raise SystemExit(
            "error: --reward classifier needs --classifier PATH (from `orw-fast pretrain`) or a "
            "labelled --dataset to train one on"
        )
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


MODEL_FLAGS = {
    "pipeline": "--pretrained",
    "prompts": "--prompts",
    "resolution": "--resolution",  # ModelArgumentError
    "dtype": "--weights-dtype",
}


def _t2i_model(args):
    """The DiffusersFlowModel of the text-to-image flags (--pretrained, --prompts, LoRA, guidance, ...)."""
    from orw_fast.models.diffusers_flow import DiffusersFlowModel
    from orw_fast.prompts import PromptSource

    if args.prompts is None:
        raise SystemExit("error: --pretrained needs --prompts FILE (one prompt a line)")
    DiffusersFlowModel.check_pipeline(args.pretrained, args.resolution)  # from config files, before any weight loads
    prompts = PromptSource(args.prompts, samples_per_prompt=args.samples_per_prompt)
    return DiffusersFlowModel(
        args.pretrained,
        prompts,
        lora_rank=None if args.full_finetune else args.lora_rank,
        resolution=args.resolution,
        guidance_scale=args.guidance_scale,
        negative_prompt=args.negative_prompt,
        max_sequence_length=args.max_sequence_length,
        dtype=DTYPES[args.weights_dtype],
        gradient_checkpointing=args.gradient_checkpointing,
        keep_text_encoders=args.keep_text_encoders,
    )


def _reward(args, device):
    from orw_fast.rewards import REWARDS, ClassifierReward, CLIPScoreReward, get_reward

    if args.reward == "classifier":
        if args.pretrained is not None:
            raise SystemExit(
                "error: --reward classifier (the default) scores the digits of a --checkpoint model; "
                f"with --pretrained choose --reward clip_score or one of {', '.join(REWARDS)}"
            )
        return ClassifierReward(_reward_classifier(args, device), args.target_classes)
    if args.reward == "clip_score":
        if args.pretrained is None:
            raise SystemExit("error: --reward clip_score needs prompts: use it with --pretrained and --prompts")
        if args.clip_model is None:
            raise SystemExit(
                "error: --reward clip_score needs --clip-model DIR, a local CLIP folder in transformers "
                "format (e.g. openai/clip-vit-large-patch14 saved with save_pretrained)"
            )
        return CLIPScoreReward(args.clip_model, device=device)
    return get_reward(args.reward)


def cmd_finetune(args) -> None:
    from orw_fast.pretrain import load_flow_model
    from orw_fast.trainer import ORWCFMTrainer, TrainerConfig

    if (args.checkpoint is None) == (args.pretrained is None):
        raise SystemExit(
            "error: give one of --checkpoint (a flow.pt of `orw-fast pretrain`) or --pretrained (a "
            "diffusers SD3/FLUX folder or hub id)"
        )
    device = args.device
    dist_utils.init_from_env(device)
    config = TrainerConfig(**{key: getattr(args, key) for key in args.config_flags})
    with dist_utils.on_all_ranks("checking --out"):
        if dist_utils.is_main():
            check_output_dir(args.savedir, "--out")
    if args.pretrained is not None:
        model = _t2i_model(args)
    else:
        model, config.model_config = load_flow_model(args.checkpoint)
    trainer = ORWCFMTrainer(model, config, device, reward_fn=_reward(args, device))
    if args.resume:
        trainer.resume(args.resume)
    with dist_utils.on_all_ranks("writing --out"):  # every check has passed: the run folder is made only now
        if dist_utils.is_main():
            _write_run_file(args, prepare_output_dir(args.savedir, "--out") / "config.yaml")
    trainer.train(args.epochs, args.steps_per_epoch, progress=not args.quiet)
    if dist_utils.is_main():
        print(
            f"checkpoints, metrics.jsonl and sample grids in {args.savedir}; the run's options in "
            f"{Path(args.savedir) / 'config.yaml'} (--config repeats it)"
        )


def cmd_sample(args) -> None:
    from orw_fast.images import save_image_grid
    from orw_fast.models.flow_model import FlowModel

    prepare_output_file(args.out, "--out")
    given = {
        "pipeline": args.pretrained,
        "prompts": args.prompts,
        "dtype": None if args.weights_dtype == "fp32" else DTYPES[args.weights_dtype],
    }
    flow = FlowModel.from_checkpoint(
        args.checkpoint, device=args.device, **{key: value for key, value in given.items() if value is not None}
    )
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
BENCH_USAGE = (
    "usage: orw-fast bench {"
    + ",".join(BENCHMARKS)
    + "} [options]\n\n"
    + "\n".join(f"  {name:<11} {about}" for name, (_, about) in BENCHMARKS.items())
    + (
        "\n\n`orw-fast bench NAME --help` lists a benchmark's options; options without a name go to the loss "
        "benchmark.\nResults: benchmarks/results/<device>/ (JSON, CSV, Markdown, PNG) with device, date and commit."
    )
)


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


def common_options(p, *, seed: bool = True) -> None:
    """--device, --seed (unless the command has its own) and --quiet: the options every command has."""
    p.add_argument("--device", type=_device, default="auto", help="cpu, cuda, cuda:N or auto (default)")
    if seed:
        p.add_argument("--seed", type=_number(int, 0), default=0, help="random seed (default %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, no library warnings on loads")


def _add_plugin_commands(sub) -> None:
    """The commands other packages register in the entry point group ``orw_fast.commands`` (the tasks' demo); one
    that cannot be loaded is reported and left out."""
    for entry in importlib.metadata.entry_points(group=COMMAND_GROUP):
        if entry.name in sub.choices:
            continue
        try:
            entry.load()(sub)
        except Exception as err:  # a broken plugin must not take the other commands down
            print(
                f"orw-fast: command {entry.name!r} ({entry.value}) cannot be loaded: {type(err).__name__}: {err}",
                file=sys.stderr,
            )


def build_parser() -> argparse.ArgumentParser:
    from orw_fast.config import TrainerConfig
    from orw_fast.rewards import REWARDS

    parser = _Parser(prog="orw-fast", description="ORW-CFM-W2 fine-tuning of flow-matching models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="train a flow-matching model (and a classifier when labels exist)")
    p.add_argument("--dataset", default="digits", help="digits | idx:PATH | folder:PATH")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: the demo's cache ~/.cache/orw_fast/digits for digits, else runs/pretrain)",
    )
    p.add_argument("--preset", default=None, help="model preset (digits, mnist, cifar10; default from the image shape)")
    p.add_argument("--steps", type=_POSITIVE_INT, default=3000)
    p.add_argument("--batch-size", type=_POSITIVE_INT, default=128)
    p.add_argument("--lr", type=_number(float, 0, above=True), default=2e-3)
    p.add_argument("--no-classifier", dest="classifier", action="store_false", help="skip the classifier")
    common_options(p)
    p.set_defaults(run=cmd_pretrain)

    p = sub.add_parser(
        "finetune",
        help="ORW-CFM-W2 fine-tuning of a pre-trained model (pixel or text-to-image)",
        description="ORW-CFM-W2 fine-tuning. The trainer options are TrainerConfig's fields, with its "
        "defaults (a Python run with the same values is the same run). A run file (--config) holds "
        "options by key: the option's name with _ for - (learning_rate, w2_coefficient, temperature "
        "and savedir for --lr, --alpha, --tau and --out); OUT/config.yaml is this run's.",
    )
    p.add_argument(
        "--config",
        type=_existing_file,
        help="run file (YAML or JSON) of options, such as a run's "
        "OUT/config.yaml (which holds every option but --device and --quiet); flags given on the command "
        "line override it",
    )
    p.add_argument("--checkpoint", type=_existing_file, help="flow.pt from `orw-fast pretrain` (or give --pretrained)")
    p.add_argument(
        "--reward",
        default="classifier",
        choices=("classifier", "clip_score", *REWARDS),
        help="a digit classifier's probability of --target-classes, CLIP text-image alignment "
        "(text-to-image), or a registered reward (default classifier)",
    )
    p.add_argument("--classifier", type=_existing_file, help="classifier.pt for --reward classifier")
    p.add_argument(
        "--dataset",
        help="labelled dataset (digits | idx:PATH | folder:PATH) to train the reward "
        "classifier on when --classifier is not given",
    )
    p.add_argument(
        "--target-classes",
        type=_classes,
        default=[0, 2, 4, 6, 8],
        help="classes the classifier reward counts (default: the even digits)",
    )
    p.add_argument("--resume", type=_existing_file, help="continue from a training checkpoint")
    p.add_argument("--epochs", type=_POSITIVE_INT, default=16, help="default %(default)s")
    p.add_argument("--steps-per-epoch", type=_POSITIVE_INT, default=15, help="default %(default)s")
    trainer_flags = add_config_options(
        p.add_argument_group("trainer (TrainerConfig)"), TrainerConfig, TRAINER_FLAG_ALIASES
    )
    _t2i_options(p.add_argument_group("text-to-image"), sampling=False)
    common_options(p, seed=False)
    p.set_defaults(run=cmd_finetune, config_flags=trainer_flags)

    p = sub.add_parser("sample", help="a grid of samples from a checkpoint")
    p.add_argument("--checkpoint", type=_existing_file, required=True, help="flow.pt or a training checkpoint")
    p.add_argument("--out", type=Path, default=Path("samples.png"), help="the PNG file to write")
    p.add_argument("--n", type=_POSITIVE_INT, default=64, help="number of samples")
    p.add_argument("--steps", type=_POSITIVE_INT, default=100)
    p.add_argument("--method", default="euler")
    p.add_argument(
        "--grid",
        default="uniform",
        choices=GRIDS,
        help="time grid of a pixel model's rollout (a diffusers model follows its scheduler)",
    )
    p.add_argument("--scale", type=_POSITIVE_INT, default=4, help="enlarge the PNG this many times")
    _t2i_options(p, sampling=True)
    common_options(p)
    p.set_defaults(run=cmd_sample)

    p = sub.add_parser(
        "bench",
        add_help=False,
        help="benchmarks: loss | sampler | train-step | t2i | hardware | nvcc | all (see `orw-fast bench --help`)",
    )
    p.set_defaults(run=cmd_bench)
    _add_plugin_commands(sub)
    for command in sub.choices.values():
        command.set_defaults(parser=command)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """The command line ``argv`` (default sys.argv[1:]) parsed, a --config run file's options under the given flags,
    and the input files a run needs checked before anything is loaded."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "config", None) is not None:
        args, rest = parser.parse_known_args(argv[:1] + _config_argv(args.parser, args.config) + argv[1:])
    if args.command == "bench":
        args.bench_args = rest  # every option belongs to the benchmark script
    elif rest:
        args.parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if dist_utils.env_world_size() > 1 and args.command != "finetune":
        args.parser.error(f"only finetune runs multi-process; run {args.command} as one process, without torchrun")
    if getattr(args, "prompts", None) is not None:
        _check_prompts(args)
    return args


def main(argv=None) -> None:
    from orw_fast.config import ConfigError
    from orw_fast.models.flow_model import ModelArgumentError

    args = parse_args(argv)
    if getattr(args, "quiet", False) and (args.command == "sample" or getattr(args, "pretrained", None)):
        _quiet_hf_libraries()  # the commands that may load a diffusers pipeline
    finished = False
    try:
        args.run(args)
        finished = True
    except ConfigError as err:
        flag = getattr(args, "config_flags", {}).get(err.key)
        raise SystemExit(
            f"error: {flag} must be {err.expected}, got {err.value!r}" if flag else f"error: {err}"
        ) from err
    except ModelArgumentError as err:
        raise SystemExit(f"error: {MODEL_FLAGS.get(err.argument, err.argument)}: {err}") from err
    except (ValueError, FloatingPointError, OSError, dist_utils.PeerError) as err:
        raise SystemExit(f"error: {err}") from err
    finally:  # after a failure the other ranks may not reach a barrier: only a finished run synchronizes
        dist_utils.shutdown(synchronize=finished)


if __name__ == "__main__":
    main()
