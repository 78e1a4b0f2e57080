"""The orw-fast command line: help, errors for bad paths/options, and a tiny end-to-end run."""
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
    _fails_with([command, *extra, "--device", "bogus"], r"argument --device: device must be cpu, cuda, cuda:N or "
                r"auto, got 'bogus'", capsys)


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
        (["finetune", *ckpt, "--batch-size", "0"], r"argument --batch-size: must be >= 1"),
        (["finetune", *ckpt, "--reward", "clip"], r"invalid choice: 'clip' \(choose from 'classifier', "
                                                  r"'clip_score', 'jpeg_compressibility', 'jpeg_incompressibility'\)"),
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
    _fails_with(["demo", "--cache-dir", str(a_file), "--out", str(tmp_path / "report")],
                r"the cache folder .*a_file/digits': the folder cannot be created", capsys)


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
    proc = run_cli("pretrain", "--dataset", f"idx:{tmp_path}", "--steps", "3", "--batch-size", "8",
                   "--out", str(pre), "--quiet", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert (pre / "flow.pt").is_file() and (pre / "classifier.pt").is_file()
    common = ["--checkpoint", str(pre / "flow.pt"), "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "4",
              "--sampler-steps", "2", "--quiet", "--device", "cpu"]
    proc = run_cli("finetune", *common, "--classifier", str(pre / "classifier.pt"), "--out", str(tmp_path / "ft"))
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("finetune", *common, "--dataset", f"idx:{tmp_path}", "--out", str(tmp_path / "ft_ds"))
    assert proc.returncode == 0 and "reward classifier:" in proc.stdout, proc.stderr
    proc = run_cli("finetune", *common, "--out", str(tmp_path / "ft_none"))
    assert proc.returncode == 1 and "needs --classifier PATH" in proc.stderr
    assert (tmp_path / "ft" / "last.pt").is_file() and (tmp_path / "ft" / "samples_epoch001.png").is_file()
    proc = run_cli("finetune", *common[:3], "2", *common[4:], "--reward", "jpeg_compressibility",
                   "--resume", str(tmp_path / "ft" / "last.pt"), "--out", str(tmp_path / "ft2"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ft2" / "metrics.jsonl").read_text().count("\n") == 2  # steps 3-4 only
    proc = run_cli("sample", "--checkpoint", str(tmp_path / "ft2" / "last.pt"), "--n", "4", "--steps", "2",
                   "--out", str(tmp_path / "grid.png"), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_demo_runs_and_writes_its_report(tmp_path):
    """The demo end to end at toy size (a few pre-training steps), report files included."""
    from orw_fast.tasks.demo import DemoSettings, run_demo

    settings = DemoSettings(epochs=1, steps_per_epoch=2, batch_size=8, sampler_steps=2, eval_samples=16,
                            pretrain_steps=2)
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
    main(["demo", "--alphas", "0.25", "--weighting", "softmax", "--tau", "10", "--lr", "3e-4", "--out",
          str(tmp_path / "r")])
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
