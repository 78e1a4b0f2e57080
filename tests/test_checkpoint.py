"""Checkpoints: loads are all-or-nothing, damaged files are refused, killed writes leave nothing behind for long,
files get the user's umask, and every orw_fast model's checkpoint can be sampled."""

import copy
import os
import random
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch

from orw_fast.checkpoint import load_file, remove_stale_temporaries, save_atomic
from orw_fast.models import make_flow_model
from orw_fast.trainer import ORWCFMTrainer, TrainerConfig


def unet(channels=32, seed=0):
    torch.manual_seed(seed)
    return make_flow_model((1, 8, 8), preset="digits", num_channels=channels)[0]


def trainer_for(tmp_path, model=None, **overrides):
    config = dict(
        batch_size=4,
        sampler_method="euler",
        sampler_steps=2,
        grid_size=0,
        savedir=str(tmp_path / "run"),
        ema_decay=0.9,
        learning_rate=1e-3,
    )
    return ORWCFMTrainer(
        model or unet(), TrainerConfig(**{**config, **overrides}), "cpu", reward_fn=lambda x: x.mean(dim=(1, 2, 3))
    )


def everything(trainer) -> dict:
    """A deep copy of all the state a load could touch."""
    return copy.deepcopy(
        {
            "models": {k: getattr(trainer, k).state_dict() for k in ("model", "last_policy", "reference", "ema")},
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(),
            "scaler": trainer.scaler.state_dict(),
            "step": trainer.step,
            "generator": trainer.generator.get_state(),
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state()[1],
            "python": random.getstate(),
        }
    )


def assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


# -- all-or-nothing loads -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["bare", "torchcfm", "orw_fast"])
def test_weights_of_another_architecture_change_nothing(tmp_path, fmt):
    other = unet(channels=64)  # same keys, other shapes
    state = other.state_dict()
    payload = {
        "bare": state,
        "torchcfm": {"net_model": state, "ema_model": state},
        "orw_fast": {"format": "orw_fast.checkpoint", "policy": state, "ema": None},
    }[fmt]
    save_atomic(payload, tmp_path / "other.pt")
    trainer = trainer_for(tmp_path)
    before = everything(trainer)
    with pytest.raises(
        ValueError,
        match=r"other.pt', entry .* does not match the model .* shape mismatch.*nothing "
        r"was loaded",
    ):
        trainer.load_pretrained(tmp_path / "other.pt")
    assert_same(everything(trainer), before)


def test_a_bad_reference_path_leaves_the_policy_as_it_was(tmp_path):
    save_atomic({"net_model": unet(seed=1).state_dict()}, tmp_path / "good.pt")
    save_atomic({"net_model": unet(channels=64).state_dict()}, tmp_path / "bad_ref.pt")
    for ref_path, match in (
        (tmp_path / "bad_ref.pt", "bad_ref.pt', entry 'net_model' does not match"),
        (tmp_path / "missing.pt", "missing.pt' does not exist"),
    ):
        trainer = trainer_for(tmp_path, ref_path=str(ref_path))
        before = everything(trainer)
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            trainer.load_pretrained(tmp_path / "good.pt")
        assert_same(everything(trainer), before)


def test_load_pretrained_takes_the_official_net_model_and_says_so(tmp_path, capsys):
    net, ema = unet(seed=1).state_dict(), unet(seed=2).state_dict()
    save_atomic({"net_model": {f"module.{k}": v for k, v in net.items()}, "ema_model": ema}, tmp_path / "cfm.pt")
    trainer = trainer_for(tmp_path)
    message = trainer.load_pretrained(tmp_path / "cfm.pt")
    assert "loaded 'net_model'" in message and "policy, last policy, EMA and reference" in message
    assert message in capsys.readouterr().out
    for module in (trainer.model, trainer.reference, trainer.last_policy, trainer.ema):
        assert_same(module.state_dict(), net)
    assert "'ema_model'" in trainer.load_pretrained(tmp_path / "cfm.pt", weights="ema", verbose=False)
    assert_same(trainer.model.state_dict(), ema)


def _other_optimizer_state():
    model = unet(channels=64)
    opt = torch.optim.Adam(model.parameters())
    model(torch.rand(2), torch.randn(2, 1, 8, 8)).sum().backward()
    opt.step()
    return opt.state_dict()


BAD_ENTRIES = {
    "scheduler_missing": (lambda c: c.pop("scheduler"), "has no entry 'scheduler'"),
    "reference_of_another_model": (
        lambda c: c.update(reference=unet(channels=64).state_dict()),
        "entry 'reference' does not match the model",
    ),
    "optimizer_of_another_model": (
        lambda c: c.update(optimizer=_other_optimizer_state()),
        "entry 'optimizer'.*another model's optimizer state",
    ),
    "optimizer_not_a_state_dict": (lambda c: c.update(optimizer=[1, 2]), "entry 'optimizer' is not an optimizer"),
    "corrupt_generator_state": (
        lambda c: c["rng"][0].update(generator=torch.zeros(3, dtype=torch.uint8)),
        "entry 'rng' of rank 0: the 'generator' random state cannot be restored",
    ),
    "corrupt_numpy_state": (
        lambda c: c["rng"][0].update(numpy=("MT19937", [1, 2])),
        "the 'numpy' random state cannot be restored",
    ),
    "policy_none": (lambda c: c.update(policy=None), "entry 'policy' is a NoneType, not a state dict"),
    "step_not_an_integer": (lambda c: c.update(step=2.5), "entry 'step' must be an integer >= 0, got 2.5"),
    "step_a_string": (lambda c: c.update(step="2"), "entry 'step' must be an integer"),
    "scheduler_malformed": (lambda c: c.update(scheduler={"last_epoch": "x"}), "entry 'scheduler' is not an LR"),
    "config_missing": (lambda c: c.pop("config"), "has no entry 'config'"),
}


@pytest.mark.parametrize("case", BAD_ENTRIES)
def test_resume_of_a_bad_checkpoint_changes_nothing(tmp_path, case):
    mutate, match = BAD_ENTRIES[case]
    source = trainer_for(tmp_path / "a")
    source.train_step()
    ckpt = load_file(source.save_checkpoint(tmp_path / "good.pt"))
    mutate(ckpt)
    save_atomic(ckpt, tmp_path / "bad.pt")
    trainer = trainer_for(tmp_path / "b", model=unet(seed=5))
    trainer.train_step()
    before = everything(trainer)
    with pytest.raises(ValueError, match=rf"checkpoint '.*bad.pt'.*{match}"):
        trainer.resume(tmp_path / "bad.pt")
    assert_same(everything(trainer), before)
    trainer.resume(tmp_path / "good.pt")  # the good one still resumes
    assert trainer.step == 1


# -- integrity ----------------------------------------------------------------------------------------------


def test_flipped_bytes_are_refused_before_anything_is_read(tmp_path):
    trainer = trainer_for(tmp_path)
    path = trainer.save_checkpoint(tmp_path / "c.pt")
    good = path.read_bytes()
    with zipfile.ZipFile(path) as archive:  # the largest record: a weight tensor
        record = max(archive.infolist(), key=lambda i: i.file_size)
    data_start = record.header_offset + 30 + len(record.filename.encode()) + len(record.extra)
    one = bytearray(good)
    one[data_start + record.file_size // 2] ^= 0x01  # one bit of one weight
    many = bytearray(good)
    for pos in random.Random(0).sample(range(len(good)), 64):
        many[pos] ^= 0xFF
    for name, data in (("one_bit_of_a_weight", one), ("64_random_bytes", many)):
        (tmp_path / f"{name}.pt").write_bytes(bytes(data))
        with pytest.raises(ValueError, match=rf"{name}.pt' is damaged"):
            load_file(tmp_path / f"{name}.pt")
    assert load_file(path)["step"] == 0


# -- killed writes, permissions -------------------------------------------------------------------------------

_KILLED_WRITER = """
import sys, time
from orw_fast.checkpoint import _write_atomic
def write(f):
    f.write(b"x" * 2**20)
    f.flush()
    open(sys.argv[2], "w").close()  # tell the test that the temporary file exists
    time.sleep(60)
_write_atomic(sys.argv[1], write)
"""


def test_a_killed_save_leaves_a_temporary_that_the_next_save_removes(tmp_path):
    target, ready = tmp_path / "ckpt.pt", tmp_path / "ready"
    save_atomic({"a": 1}, target)
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(target), str(ready)])
    deadline = time.monotonic() + 60
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready.exists(), "the writer never started"
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and leftovers[0].stat().st_size == 2**20
    assert remove_stale_temporaries(target) == []  # its writer is alive: never touched
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:  # a live writer's temporary (another process's pid) stays
        live = target.with_name(f"{leftovers[0].name.split(str(proc.pid))[0]}{sleeper.pid}.abcd1234.tmp")
        live.write_bytes(b"in progress")
        save_atomic({"a": 2}, target)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, live.name, ready.name])
    finally:
        sleeper.kill()
        sleeper.wait()
    assert load_file(target) == {"a": 2}


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_are_written_with_the_users_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        path = save_atomic({"a": 1}, tmp_path / "c.pt")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# -- every orw_fast model's checkpoint can be sampled ---------------------------------------------------------


def test_checkpoints_of_orw_fast_models_are_sampleable_and_others_say_how(tmp_path, capsys):
    from torchcfm.models.unet.unet import UNetModelWrapper

    from orw_fast.cli import main

    trainer = trainer_for(tmp_path)  # as the README's Python example: a model of orw_fast.models, no model_config
    path = trainer.save_checkpoint(tmp_path / "ours.pt")
    main(
        [
            "sample",
            "--checkpoint",
            str(path),
            "--n",
            "2",
            "--steps",
            "1",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "grid.png"),
        ]
    )
    assert (tmp_path / "grid.png").stat().st_size > 0
    foreign = UNetModelWrapper(
        dim=(1, 8, 8), num_channels=32, num_res_blocks=1, channel_mult=[1, 1], attention_resolutions="4", num_heads=1
    )
    path = trainer_for(tmp_path, model=foreign).save_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(SystemExit, match=r"records no model config.*TrainerConfig\(model_config="):
        main(["sample", "--checkpoint", str(path), "--device", "cpu", "--out", str(tmp_path / "g2.png")])
