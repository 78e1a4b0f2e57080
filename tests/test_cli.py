"""The orw-fast command line: help, errors for bad paths/options, and a tiny end-to-end run."""

import json
import math
import re
import struct
import subprocess
import sys

import numpy as np
import pytest

from orw_fast.cli import build_parser, main

COMMANDS = ["demo", "pretrain", "finetune", "sample", "bench"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "orw_fast", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", [None, *COMMANDS[:-1]])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"] if command else ["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "usage: orw-fast" in out
    if command is None:
        assert all(c in out for c in COMMANDS)


def test_missing_checkpoint_is_a_clear_error():
    proc = run_cli("finetune", "--checkpoint", "/nonexistent/flow.pt")
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_bad_dataset_spec_is_a_clear_error():
    proc = run_cli("pretrain", "--dataset", "imagenet", "--steps", "1")
    assert proc.returncode == 1 and "unknown dataset spec" in proc.stderr


def test_a_refused_pretrain_creates_no_output_folder(tmp_path, monkeypatch, capsys):
    """A bad --dataset is refused before the default --out (runs/pretrain, in the working folder) is made."""
    monkeypatch.chdir(tmp_path)
    for spec, match in (("imagenet", "unknown dataset spec"), (f"folder:{tmp_path / 'none'}", "does not exist")):
        with pytest.raises(SystemExit) as exit_:
            main(["pretrain", "--dataset", spec, "--steps", "1"])
        code = exit_.value.code
        assert code not in (0, None) and match in (code if isinstance(code, str) else capsys.readouterr().err)
        assert not (tmp_path / "runs").exists()


def test_bad_alphas_are_refused():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--alphas", "0,x"])


def _fails_with(argv, match, capsys):
    """main(argv) stops with one line naming the problem (argparse's exit 2 or our exit 1), no traceback."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    message = str(exit_.value.code) if isinstance(exit_.value.code, str) else capsys.readouterr().err
    assert exit_.value.code not in (0, None) and "Traceback" not in message, message
    assert re.search(match, message.strip().splitlines()[-1]), message  # the last line says it all


@pytest.mark.parametrize("command", ["demo", "pretrain", "finetune", "sample"])
def test_a_bad_device_is_one_clear_line(command, tmp_path, capsys):
    extra = ["--checkpoint", __file__] if command in ("finetune", "sample") else []
    _fails_with(
        [command, *extra, "--device", "bogus"],
        r"argument --device: device must be cpu, cuda, cuda:N or "
        r"auto, got 'bogus'",
        capsys,
    )


def test_user_errors_name_the_flag(tmp_path, capsys):
    """Each of these printed a traceback or succeeded silently before: now each is one line under its flag."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    unwritable = a_file / "sub"  # below a file: no folder can be made there, whoever runs the tests
    ckpt = ["--checkpoint", str(a_file)]
    cases = [
        (["finetune", *ckpt, "--out", str(unwritable)], r"--out '.*sub': the folder cannot be created"),
        (["finetune", *ckpt, "--out", str(a_file)], r"--out '.*a_file' is an existing file, not a folder"),
        (["pretrain", "--out", str(unwritable), "--steps", "1"], r"--out '.*sub': the folder cannot be created"),
        (["demo", "--out", str(a_file)], r"--out '.*a_file' is an existing file"),
        (["sample", *ckpt, "--out", str(tmp_path)], r"--out '.*' is a folder; give a file name"),
        (["sample", *ckpt, "--out", str(unwritable / "x.png")], r"the folder of --out '.*sub': the folder cannot"),
        (["sample", *ckpt, "--n", "-1"], r"argument --n: must be >= 1, got '-1'"),
        (["sample", *ckpt, "--scale", "0"], r"argument --scale: must be >= 1, got '0'"),
        (["sample", *ckpt, "--scale", "-3"], r"argument --scale: must be >= 1, got '-3'"),
        (["finetune", *ckpt, "--alpha", "-1"], r"argument --alpha: must be >= 0, got '-1'"),
        (["finetune", *ckpt, "--alpha", "nan"], r"argument --alpha: expected a finite number"),
        (["finetune", *ckpt, "--tau", "1e39"], r"--tau must be a finite number in float32's range"),
        (["finetune", *ckpt, "--lr", "0"], r"argument --lr: must be > 0"),
        (  # awm pulls toward an EMA: unset is the AWM code's schedule, 0 (none) is refused
            ["finetune", *ckpt, "--objective", "awm", "--ema-decay", "0"],
            r"--ema-decay must be unset \(the AWM code's schedule\) or > 0 with objective='awm'",
        ),
        (["finetune", *ckpt, "--batch-size", "0"], r"argument --batch-size: must be >= 1"),
        (
            ["finetune", *ckpt, "--reward", "clip"],
            r"invalid choice: 'clip' \(choose from 'classifier', "
            r"'clip_score', 'jpeg_compressibility', 'jpeg_incompressibility'\)",
        ),
        (["finetune", *ckpt, "--out", str(tmp_path / "ft")], r"checkpoint '.*a_file' cannot be read"),
        (["demo", "--alphas", "1,-1"], r"argument --alphas: must be finite numbers >= 0"),
    ]
    for argv, match in cases:
        _fails_with(argv, match, capsys)


def test_demo_checks_its_cache_folder_before_pretraining(tmp_path, capsys, monkeypatch):
    import orw_fast.tasks.demo as demo

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    monkeypatch.setattr(demo, "pretrain_dataset", lambda *a, **k: pytest.fail("pre-training started"))
    _fails_with(
        ["demo", "--cache-dir", str(a_file), "--out", str(tmp_path / "report")],
        r"the cache folder .*a_file/digits': the folder cannot be created",
        capsys,
    )


def write_idx(path, images, labels):
    with open(path / "train-images-idx3-ubyte", "wb") as f:
        f.write(struct.pack(">IIII", 0x803, *images.shape) + images.tobytes())
    with open(path / "train-labels-idx1-ubyte", "wb") as f:
        f.write(struct.pack(">II", 0x801, len(labels)) + labels.tobytes())


def test_pretrain_finetune_sample_end_to_end(tmp_path):
    """pretrain (flow + classifier) on a tiny IDX dataset, fine-tune with the classifier reward and with
    JPEG compressibility, resume, and sample a grid."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 64).astype(np.uint8)
    images = (rng.random((64, 8, 8)) * 255).astype(np.uint8)
    write_idx(tmp_path, images, labels)
    pre = tmp_path / "pre"
    proc = run_cli(
        "pretrain",
        "--dataset",
        f"idx:{tmp_path}",
        "--steps",
        "3",
        "--batch-size",
        "8",
        "--out",
        str(pre),
        "--quiet",
        "--device",
        "cpu",
    )
    assert proc.returncode == 0, proc.stderr
    assert (pre / "flow.pt").is_file() and (pre / "classifier.pt").is_file()
    common = [
        "--checkpoint",
        str(pre / "flow.pt"),
        "--epochs",
        "1",
        "--steps-per-epoch",
        "2",
        "--batch-size",
        "4",
        "--sampler-method",
        "euler",
        "--sampler-steps",
        "2",
        "--quiet",
        "--device",
        "cpu",
    ]
    proc = run_cli("finetune", *common, "--classifier", str(pre / "classifier.pt"), "--out", str(tmp_path / "ft"))
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("finetune", *common, "--dataset", f"idx:{tmp_path}", "--out", str(tmp_path / "ft_ds"))
    assert proc.returncode == 0 and "reward classifier:" in proc.stdout, proc.stderr
    proc = run_cli("finetune", *common, "--out", str(tmp_path / "ft_none"))
    assert proc.returncode == 1 and "needs --classifier PATH" in proc.stderr
    assert (tmp_path / "ft" / "last.pt").is_file() and (tmp_path / "ft" / "samples_epoch001.png").is_file()
    proc = run_cli(
        "finetune",
        *common[:3],
        "2",
        *common[4:],
        "--reward",
        "jpeg_compressibility",
        "--resume",
        str(tmp_path / "ft" / "last.pt"),
        "--out",
        str(tmp_path / "ft2"),
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ft2" / "metrics.jsonl").read_text().count("\n") == 2  # steps 3-4 only
    proc = run_cli(
        "sample",
        "--checkpoint",
        str(tmp_path / "ft2" / "last.pt"),
        "--n",
        "4",
        "--steps",
        "2",
        "--out",
        str(tmp_path / "grid.png"),
        "--device",
        "cpu",
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_demo_runs_and_writes_its_report(tmp_path):
    """The demo end to end at toy size (a few pre-training steps), report files included."""
    from orw_fast.tasks.demo import DemoSettings, run_demo

    settings = DemoSettings(
        epochs=1, steps_per_epoch=2, batch_size=8, sampler_steps=4, eval_samples=16, pretrain_steps=2
    )
    report = run_demo(tmp_path / "report", settings, cache_dir=tmp_path / "cache", progress=False)
    assert set(report["runs"]) == {"0", "1"}
    for name in ("samples_base.png", "samples_alpha_0.png", "samples_alpha_1.png", "curves.png", "metrics.json"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    assert all((tmp_path / "cache" / "digits" / name).is_file() for name in ("flow.pt", "classifier.pt"))
    for stats in [report["base"], *(r["final"] for r in report["runs"].values())]:
        assert 0 <= stats["even_fraction"] <= 1 and sum(stats["class_counts"]) == 16


def test_demo_passes_its_method_flags_to_the_settings(tmp_path, monkeypatch, capsys):
    import orw_fast.tasks.demo

    seen = {}
    monkeypatch.setattr(orw_fast.tasks.demo, "run_demo", lambda out, settings, **kw: seen.update(settings=settings))
    main(
        [
            "demo",
            "--alphas",
            "0.25",
            "--weighting",
            "softmax",
            "--tau",
            "10",
            "--lr",
            "3e-4",
            "--out",
            str(tmp_path / "r"),
        ]
    )
    s = seen["settings"]
    assert (s.alphas, s.weighting, s.temperature, s.learning_rate) == ((0.25,), "softmax", 10.0, 3e-4)
    assert s.epochs == orw_fast.tasks.demo.DemoSettings.epochs  # unset flags keep the demo's defaults
    with pytest.raises(SystemExit):
        main(["demo", "--lr", "0"])
    assert "argument --lr: must be > 0" in capsys.readouterr().err


def test_bench_passes_its_options_to_the_benchmark_script(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and all(name in out for name in ("loss", "sampler", "train-step", "all"))
    with pytest.raises(SystemExit, match="unknown benchmark 'sampling'"):
        main(["bench", "sampling"])
    proc = run_cli("bench", "loss", "--help")
    assert proc.returncode == 0 and "--dtypes" in proc.stdout and "--backends" in proc.stdout
    proc = run_cli("demo", "--bogus")
    assert proc.returncode == 2 and "unrecognized arguments: --bogus" in proc.stderr


# -- finetune: flags from TrainerConfig, run files, defaults shared with Python ---------------------------------


@pytest.fixture(scope="module")
def flow_checkpoint(tmp_path_factory):
    """A flow.pt pre-trained for one step on a tiny IDX dataset (8x8 images)."""
    from orw_fast.pretrain import pretrain_dataset

    folder = tmp_path_factory.mktemp("pretrained")
    rng = np.random.default_rng(0)
    write_idx(folder, (rng.random((16, 8, 8)) * 255).astype(np.uint8), rng.integers(0, 10, 16).astype(np.uint8))
    return pretrain_dataset(f"idx:{folder}", folder, steps=1, batch_size=8, classifier=False, progress=False)["flow"]


def test_finetune_has_a_flag_for_each_trainer_config_field_with_its_default(capsys):
    import dataclasses

    from orw_fast.cli import TRAINER_FLAG_ALIASES, parse_args
    from orw_fast.config import TrainerConfig

    args = parse_args(["finetune"])
    fields = {f.name: f for f in dataclasses.fields(TrainerConfig)}
    off = {"model_config", "text_prompts", "parallel", "image_shape", "clip_model_path"}
    assert set(args.config_flags) == set(fields) - off
    assert all(getattr(args, name) == fields[name].default for name in args.config_flags)
    assert all(args.config_flags[name] == flag for name, flag in TRAINER_FLAG_ALIASES.items())
    assert args.config_flags["ema_decay"] == "--ema-decay" and args.config_flags["batch_size"] == "--batch-size"
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--lr LEARNING_RATE learning rate (after the warm-up) (default: 0.0002)" in out
    assert "--weighting {softmax,exp,none}" in out and "(default: softmax)" in out
    assert "--compile, --no-compile" in out and "--model-config" not in out and "--image-shape" not in out


def test_a_new_config_field_becomes_a_flag_with_its_check():
    """What the trainer's next option gets without touching the CLI: a flag with its help, default and range."""
    import argparse
    import dataclasses

    from orw_fast.cli import add_config_options
    from orw_fast.config import _choice, _real, option

    @dataclasses.dataclass
    class Config:
        weight_decay: float = option(0.01, _real(0, below=1), "decoupled weight decay")
        optimizer: str = option("adam", _choice(("adam", "adamw")), "the optimizer")
        internal: dict | None = option(None, None, cli=False)

    parser = argparse.ArgumentParser()
    assert add_config_options(parser, Config, {"optimizer": "--opt"}) == {
        "weight_decay": "--weight-decay",
        "optimizer": "--opt",
    }
    assert vars(parser.parse_args([])) == {"weight_decay": 0.01, "optimizer": "adam"}
    assert vars(parser.parse_args(["--weight-decay", "0.5", "--opt", "adamw"])) == {
        "weight_decay": 0.5,
        "optimizer": "adamw",
    }
    assert "decoupled weight decay (default: 0.01)" in " ".join(parser.format_help().split())
    for bad in (["--weight-decay", "1"], ["--opt", "sgd"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


DETERMINISTIC = {
    "step",
    "loss",
    "fm_loss",
    "w2_loss",
    "grad_norm",
    "reward_mean",
    "reward_std",
    "reward_max",
    "ess",
    "diversity",
    "lr",
    "epoch",
}


def _metrics(folder):
    """The metrics.jsonl of a run without its timings and memory (which differ between any two runs)."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(row.keys() - DETERMINISTIC == {"samples_per_s", "peak_memory_mb"} for row in rows), rows
    return [{k: v for k, v in row.items() if k in DETERMINISTIC} for row in rows]


def test_python_and_cli_runs_are_the_same_run_and_a_run_file_repeats_it(flow_checkpoint, tmp_path):
    """ORWCFMTrainer(TrainerConfig(...)) from Python and `orw-fast finetune` with the same values (every other
    setting at its default on both sides) write the same metrics; so does `--config OUT/config.yaml`."""
    import yaml

    from orw_fast.pretrain import load_flow_model
    from orw_fast.rewards import get_reward
    from orw_fast.trainer import ORWCFMTrainer, TrainerConfig

    model, model_config = load_flow_model(flow_checkpoint)
    config = TrainerConfig(
        batch_size=4,
        sampler_steps=4,
        grid_size=4,
        diversity_every=1,
        savedir=str(tmp_path / "py"),
        model_config=model_config,
    )
    ORWCFMTrainer(model, config, "cpu", reward_fn=get_reward("jpeg_compressibility")).train(1, 3, progress=False)
    common = [
        "--checkpoint",
        str(flow_checkpoint),
        "--reward",
        "jpeg_compressibility",
        "--epochs",
        "1",
        "--steps-per-epoch",
        "3",
        "--quiet",
        "--device",
        "cpu",
    ]
    main(
        [
            "finetune",
            *common,
            "--batch-size",
            "4",
            "--sampler-steps",
            "4",
            "--grid-size",
            "4",
            "--diversity-every",
            "1",
            "--out",
            str(tmp_path / "cli"),
        ]
    )
    python_run = _metrics(tmp_path / "py")
    assert _metrics(tmp_path / "cli") == python_run
    written = yaml.safe_load((tmp_path / "cli" / "config.yaml").read_text())
    assert written["learning_rate"] == TrainerConfig.learning_rate and written["batch_size"] == 4
    assert written["checkpoint"] == str(flow_checkpoint) and "device" not in written and "config" not in written
    main(["finetune", "--config", str(tmp_path / "cli" / "config.yaml"), "--out", str(tmp_path / "again"), "--quiet"])
    assert _metrics(tmp_path / "again") == python_run


def test_a_run_file_sets_options_and_flags_override_it(flow_checkpoint, tmp_path, capsys):
    from orw_fast.cli import parse_args

    run = tmp_path / "run.json"
    run.write_text(
        json.dumps(
            {
                "checkpoint": str(flow_checkpoint),
                "temperature": 3,
                "compile": True,
                "target_classes": [1, 3],
                "weighting": "exp",
            }
        )
    )
    args = parse_args(["finetune", "--config", str(run), "--tau", "0.5", "--no-compile"])
    assert (args.temperature, args.compile, args.target_classes, args.weighting) == (0.5, False, [1, 3], "exp")
    assert args.checkpoint == flow_checkpoint
    run.write_text("learning_rate: 1e-4\nlr_warmup: 10\n")
    _fails_with(
        ["finetune", "--config", str(run)],
        r"argument --config: unknown key 'lr_warmup' in '.*run.json'; "
        r"valid keys: .*learning_rate",
        capsys,
    )
    run.write_text("batch_size: 0\n")
    _fails_with(["finetune", "--config", str(run)], r"argument --batch-size: must be >= 1, got '0'", capsys)
    run.write_text("- a list\n")
    _fails_with(["finetune", "--config", str(run)], r"must hold a mapping of option keys, got list", capsys)


# -- the command line as a user meets it ------------------------------------------------------------------------


def test_an_argparse_mistake_is_a_short_usage_line_and_the_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["finetune", "--lr", "fast"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "usage: orw-fast finetune [options]; see orw-fast finetune --help",
        "orw-fast finetune: error: argument --lr: expected a number, got 'fast'",
    ]


@pytest.fixture
def pipeline_folder(tmp_path):
    """A folder that passes --pretrained's cheap check (it has a model_index.json) but holds no pipeline."""
    folder = tmp_path / "pipeline"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusion3Pipeline"}')
    return folder


def test_a_refused_finetune_leaves_no_out_folder(flow_checkpoint, pipeline_folder, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "prompts.txt").write_text("a red cat\n")
    (tmp_path / "not_a_pipeline").mkdir()
    out = tmp_path / "out" / "run"
    t2i = ["--pretrained", str(pipeline_folder), "--reward", "jpeg_compressibility"]
    cases = [
        ([*t2i, "--prompts", str(tmp_path / "missing.txt")], r"--prompts: prompt file '.*missing.txt' does not exist"),
        ([*t2i, "--prompts", str(tmp_path / "empty.txt")], r"--prompts: prompt file '.*empty.txt' holds no prompt"),
        (
            ["--pretrained", str(tmp_path / "not_a_pipeline"), "--prompts", str(tmp_path / "prompts.txt")],
            r"argument --pretrained: '.*not_a_pipeline' is not a diffusers pipeline folder \(it has no model_index",
        ),
        (
            ["--pretrained", str(tmp_path / "nowhere"), "--prompts", str(tmp_path / "prompts.txt")],
            r"argument --pretrained: folder '.*nowhere' does not exist",
        ),
        (
            [*t2i, "--prompts", str(tmp_path / "prompts.txt")],  # refused from its config files, before any weights
            r"--pretrained: '.*pipeline' \(StableDiffusion3Pipeline, no transformer\) is not a supported pipeline",
        ),
        (["--checkpoint", str(flow_checkpoint), "--tau", "1e39"], r"--tau must be a finite number in float32's range"),
        (
            ["--checkpoint", str(flow_checkpoint), "--reward", "classifier"],
            r"--reward classifier needs --classifier PATH",
        ),
        (["--checkpoint", str(tmp_path / "prompts.txt")], r"cannot be read"),
    ]
    for argv, match in cases:
        _fails_with(["finetune", *argv, "--device", "cpu", "--out", str(out)], match, capsys)
        assert not (tmp_path / "out").exists(), argv


def tiny_finetune(tmp_path, family):
    """``finetune`` arguments for one step of a tiny ``family`` pipeline (saved under tmp_path) on one prompt, on
    the CPU (no --out)."""
    from orw_fast.tasks.tiny_pipelines import save_tiny_pipeline

    pipeline = save_tiny_pipeline(family, tmp_path / family, sample_size=8)
    (tmp_path / "prompts.txt").write_text("a red cat\n")
    one_step = [
        "--epochs",
        "1",
        "--steps-per-epoch",
        "1",
        "--batch-size",
        "1",
        "--sampler-method",
        "euler",
        "--sampler-steps",
        "1",
    ]
    return [
        "finetune",
        *("--pretrained", str(pipeline), "--prompts", str(tmp_path / "prompts.txt")),
        *("--reward", "jpeg_compressibility", *one_step, "--grid-size", "0", "--device", "cpu"),
    ]


def test_a_bad_resolution_leaves_no_out_folder(tmp_path):
    run = tiny_finetune(tmp_path, "flux")  # FLUX packs 2x2: an even side
    with pytest.raises(SystemExit, match="resolution must be a multiple of 2"):  # a short run if it were accepted
        main([*run, "--resolution", "7", "--quiet", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_quiet_silences_the_loading_bars_and_warnings_of_diffusers_and_transformers(tmp_path):
    run = [*tiny_finetune(tmp_path, "sd3"), "--lora-rank", "2"]
    noise = ("Loading pipeline components", "Loading weights", "requires torchvision")
    loud = run_cli(*run, "--out", str(tmp_path / "loud"))
    assert loud.returncode == 0 and all(line in loud.stderr for line in noise), loud.stderr  # what --quiet hides
    quiet = run_cli(*run, "--quiet", "--out", str(tmp_path / "quiet"))
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


# -- commands from other packages -------------------------------------------------------------------------------


def test_the_tasks_register_demo_through_the_entry_point_group():
    """Holds once the package is installed (pip install -e .): its metadata names the demo command."""
    from importlib.metadata import entry_points

    (demo,) = [e for e in entry_points(group="orw_fast.commands") if e.name == "demo"]
    assert demo.value == "orw_fast.tasks.commands:add_demo_command"


def _add_hello(subparsers):
    subparsers.add_parser("hello").set_defaults(run=lambda args: print("hello from a plugin"))


def test_commands_come_from_entry_points_and_a_broken_one_is_left_out(monkeypatch, capsys):
    import importlib.metadata

    from orw_fast.cli import COMMAND_GROUP

    plugins = [
        importlib.metadata.EntryPoint("hello", f"{__name__}:_add_hello", COMMAND_GROUP),
        importlib.metadata.EntryPoint("broken", "no_such_module:add", COMMAND_GROUP),
    ]
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: plugins if group == COMMAND_GROUP else [])
    main(["hello"])
    captured = capsys.readouterr()
    assert captured.out == "hello from a plugin\n"
    assert "command 'broken' (no_such_module:add) cannot be loaded: ModuleNotFoundError" in captured.err
    _fails_with(["demo"], r"invalid choice: 'demo'", capsys)  # no entry point: no demo, and the rest works


def test_the_core_imports_nothing_from_the_tasks():
    code = (
        "import importlib.metadata, sys\n"
        "importlib.metadata.entry_points = lambda group: []\n"
        "from orw_fast.cli import parse_args\n"
        "import orw_fast.trainer, orw_fast.models, orw_fast.sampling, orw_fast.rewards, orw_fast.pretrain\n"
        "parse_args(['finetune'])\n"
        "print(sorted(m for m in sys.modules if m.startswith('orw_fast.tasks')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout == "[]\n", proc.stderr


def test_demo_help_says_the_demo_settings(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "even: 16 epochs x 15 steps, batch 64, exp weights, tau 2.5, lr 0.001" in out


@pytest.mark.parametrize("objective", ["nft", "awm"])
def test_finetune_trains_with_another_objective(flow_checkpoint, tmp_path, objective):
    """`--objective nft|awm` runs through the same command; awm's old policy is an EMA on the AWM code's schedule
    unless --ema-decay is given (--ema-decay 0: test_user_errors_name_the_flag)."""
    common = [
        "--checkpoint",
        str(flow_checkpoint),
        "--epochs",
        "1",
        "--steps-per-epoch",
        "1",
        "--batch-size",
        "4",
        "--sampler-method",
        "euler",
        "--sampler-steps",
        "2",
        "--reward",
        "jpeg_compressibility",
        "--quiet",
        "--device",
        "cpu",
        "--objective",
        objective,
        "--out",
        str(tmp_path / "ft"),
    ]
    main(["finetune", *common, "--nft-beta", "0.5"])  # in this process: a subprocess adds seconds of imports
    assert "\nema_decay: null\n" in (tmp_path / "ft" / "config.yaml").read_text()  # the run file leaves it unset
    (row,) = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert row["step"] == 1 and math.isfinite(row["loss"]) and "policy_loss" in row and "ess" not in row
