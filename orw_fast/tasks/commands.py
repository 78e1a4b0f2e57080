"""``orw-fast demo``: a command the tasks add to the command line through the entry point group
``orw_fast.commands`` (pyproject.toml), so that the core CLI imports nothing from the tasks."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from orw_fast.cli import _POSITIVE_INT, _number, common_options
from orw_fast.cli_paths import prepare_output_dir
from orw_fast.tasks import demo, text_alignment

# The TrainerConfig key each demo flag sets: a value the trainer refuses is reported under its flag.
DEMO_FLAGS = {
    "w2_coefficient": "--alphas",
    "temperature": "--tau",
    "weighting": "--weighting",
    "seed": "--seed",
    "learning_rate": "--lr",
}


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise argparse.ArgumentTypeError(f"must be finite numbers >= 0, got {text!r}")
    return values


def cmd_demo(args) -> None:
    given = {
        k: v
        for k, v in (
            ("epochs", args.epochs),
            ("steps_per_epoch", args.steps_per_epoch),
            ("temperature", args.tau),
            ("weighting", args.weighting),
            ("learning_rate", args.lr),
        )
        if v is not None
    }
    out = prepare_output_dir(args.out, "--out")
    if args.task == "text":
        settings = text_alignment.AlignmentSettings(alphas=args.alphas, seeds=(args.seed,), **given)
        text_alignment.run_text_demo(
            out, settings, cache_dir=args.cache_dir, device=args.device, progress=not args.quiet
        )
    else:
        settings = demo.DemoSettings(alphas=args.alphas, seed=args.seed, **given)
        demo.run_demo(out, settings, cache_dir=args.cache_dir, device=args.device, progress=not args.quiet)
    print(f"report written to {args.out}")


def add_demo_command(subparsers) -> None:
    """Adds ``demo`` to the subcommands ``subparsers`` of ``orw-fast`` (the ``orw_fast.commands`` entry point)."""
    even, text = demo.DemoSettings(), text_alignment.AlignmentSettings()
    weighting_help = "reward weights: exp(tau r) (the paper's), B softmax(tau r) or none"
    p = subparsers.add_parser(
        "demo",
        help="offline demo: fine-tune toward even digits, or toward prompt alignment of "
        "a text-conditioned SD3-architecture digits model (scikit-learn digits)",
        description="The demo's own settings (not finetune's TrainerConfig defaults): even: "
        f"{even.epochs} epochs x {even.steps_per_epoch} steps, batch {even.batch_size}, "
        f"{even.weighting} weights, tau {even.temperature}, lr {even.learning_rate:g}; text: "
        f"{text.epochs} x {text.steps_per_epoch} LoRA steps, batch {text.batch_size}, "
        f"{text.weighting} weights, tau {text.temperature}, lr {text.learning_rate:g}.",
    )
    p.add_argument(
        "--task",
        choices=("even", "text"),
        default="even",
        help="even: even digits from a pixel flow model (~8 min on 2 cores); text: prompt alignment with "
        "LoRA on an SD3-architecture digits model (~70 s; its first run pre-trains it: ~5.5 min)",
    )
    p.add_argument("--out", type=Path, default=Path("reports/demo"), help="report folder (default %(default)s)")
    p.add_argument("--alphas", type=_floats, default=even.alphas, help="W2 coefficients, comma-separated")
    p.add_argument(
        "--epochs", type=_POSITIVE_INT, default=None, help=f"default {even.epochs} (even), {text.epochs} (text)"
    )
    p.add_argument(
        "--steps-per-epoch",
        type=_POSITIVE_INT,
        default=None,
        help=f"default {even.steps_per_epoch} (even), {text.steps_per_epoch} (text)",
    )
    p.add_argument(
        "--tau",
        type=_number(),
        default=None,
        help=f"reward temperature (default {even.temperature} (even), {text.temperature} (text))",
    )
    p.add_argument(
        "--weighting",
        default=None,
        choices=("softmax", "exp", "none"),
        help=weighting_help + f" (default {even.weighting} (even), {text.weighting} (text))",
    )
    p.add_argument(
        "--lr",
        type=_number(float, 0, above=True),
        default=None,
        help=f"learning rate (default {even.learning_rate:g} (even), {text.learning_rate:g} (text))",
    )
    p.add_argument(
        "--cache-dir", type=Path, default=None, help="pre-trained models (default $ORW_FAST_CACHE or ~/.cache/orw_fast)"
    )
    common_options(p)
    p.set_defaults(run=cmd_demo, config_flags=DEMO_FLAGS)
