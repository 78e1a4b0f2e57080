"""Multi-process fine-tuning on the CPU: 2 processes spawned here join a gloo group on loopback (the
trainer initialises it from torchrun's environment variables). One step equals one process on the
concatenated batch (DDP and FSDP2), a 2-rank run resumes exactly, a failing rank stops every rank, and
``torchrun -m orw_fast finetune`` runs end to end. Every run is bounded by TIMEOUT_S (a hang fails)."""

import dataclasses
import math
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
from test_trainer import ToyField, right_reward, toy_config

import orw_fast.trainer as trainer_module
from orw_fast import distributed as dist_utils
from orw_fast.checkpoint import load_file, save_atomic
from orw_fast.couplings import couple, sample_path
from orw_fast.trainer import ORWCFMTrainer

WORLD = 2
TIMEOUT_S = 90
VARIANTS = {"ddp": False, "fsdp2": True}  # config.fsdp; each spawn runs both (starting processes is the slow part)
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(worker, rank, port, out, args):
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD)
    )
    torch.set_num_threads(1)
    finished = False
    try:  # an exception's traceback goes to stderr, the exit code to run_ranks
        torch.save(worker(rank, *args), out / f"rank{rank}.pt")
        finished = True
    finally:  # as a user script would end: the library's orderly teardown
        dist_utils.shutdown(synchronize=finished)


def run_ranks(tmp_path, worker, *args) -> list:
    """worker(rank, *args) in WORLD spawned processes; returns what each returned, in rank order. Fails
    the test when a rank crashes or any is still running after TIMEOUT_S (a hang)."""
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(worker, rank, port, tmp_path, args)) for rank in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    if hung:
        pytest.fail(f"rank(s) {hung} still running after {TIMEOUT_S} s: the ranks hang")
    assert [p.exitcode for p in procs] == [0] * WORLD, "a rank crashed (its traceback is in the captured stderr)"
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


def config(savedir, **overrides):
    base = dict(batch_size=16, sampler_steps=4, w2_coefficient=0.5, ema_decay=0.9)
    return toy_config(savedir, **{**base, **overrides})


# -- one step == one process on the concatenated batch ------------------------------------------------


def full(tensors) -> list:
    """Plain tensors from FSDP2's DTensor shards (plain tensors stay as they are)."""
    return [t.full_tensor() if hasattr(t, "full_tensor") else t for t in tensors]


# per objective: nft and awm keep their old policy as an EMA updated at last-policy refreshes, here by a large decay
OBJECTIVES = {
    "orw_cfm_w2": {},
    "nft": {"ema_decay": None, "old_policy_decay_rate": 0.3},
    "awm": {"ema_decay": None, "old_policy_decay_rate": 0.3, "awm_old_coefficient": 0.7},
}


def _make(kind, folder, savedir, objective="orw_cfm_w2"):
    """(trainer inputs) for a kind of model: the 2-D toy field, or a tiny SD3 pipeline with LoRA."""
    settings = {"objective": objective, **OBJECTIVES[objective]}
    if kind == "toy":
        return ToyField(), config(savedir, **settings), right_reward
    from orw_fast.models.diffusers_flow import DiffusersFlowModel

    flow = DiffusersFlowModel(
        folder,
        ["a red cat", "a blue dog", "a small bird"],
        lora_rank=4,
        resolution=8,
        guidance_scale=2.0,
        max_sequence_length=16,
    )
    cfg = config(savedir, sampler_method="euler", sampler_steps=2, **{"ema_decay": 0.0, **settings})
    return flow, cfg, lambda images, prompts: images.mean(dim=(1, 2, 3))


def _one_step(rank, kind, fsdp, folder, objective):
    """One step, recording this rank's random draws: rollout (x0, x1, prompts), coupling noise and t; then a
    last-policy refresh (where nft's and awm's EMA moves)."""
    torch.manual_seed(rank)  # different weights on each rank: the trainer must start all from rank 0's
    model, cfg, reward = _make(kind, folder, "unused", objective)
    trainer = ORWCFMTrainer(model, dataclasses.replace(cfg, fsdp=fsdp), "cpu", reward_fn=reward)
    drawn = {}

    def recorded(name, fn):
        def wrapper(*args, **kwargs):
            drawn[name] = fn(*args, **kwargs)
            return drawn[name]

        return wrapper

    trainer.rollout = recorded("rollout", trainer.rollout)
    with (
        mock.patch.object(trainer_module, "couple", recorded("couple", couple)),
        mock.patch.object(trainer_module, "sample_path", recorded("path", sample_path)),
    ):
        metrics = trainer.train_step()
    trainer.refresh_last_policy()
    params = trainer.weights.trainable_parameters()
    return {
        "x0": drawn["rollout"][0],
        "x1": drawn["rollout"][1],
        "prompts": drawn["rollout"][2],
        "noise": drawn["couple"][0],
        "t": drawn["path"][0],
        "metrics": metrics,
        "grads": full(p.grad for p in params),
        "params": full(params),
        "ema": full(trainer.ema.parameters()) if kind == "toy" else None,
    }


def _one_step_each(rank, folder):
    return {case: _one_step(rank, case[0], VARIANTS[case[1]], folder, case[2]) for case in CASES}


KINDS = ("toy", "sd3")
# (kind, variant, objective): every objective on the toy under DDP and FSDP2, nft and awm once each on SD3 (loading
# the pipeline is the costly part of a case); the default objective on both
CASES = [
    *((kind, variant, "orw_cfm_w2") for kind in KINDS for variant in VARIANTS),
    *(("toy", variant, objective) for objective in ("nft", "awm") for variant in VARIANTS),
    ("sd3", "fsdp2", "nft"),
    ("sd3", "ddp", "awm"),
]


@pytest.fixture(scope="module")
def one_step_runs(tmp_path_factory):
    from orw_fast.tasks.tiny_pipelines import save_tiny_pipeline

    root = tmp_path_factory.mktemp("one_step")
    folder = save_tiny_pipeline("sd3", root / "sd3", sample_size=8)
    return folder, run_ranks(root, _one_step_each, folder)


@pytest.mark.parametrize("kind,variant,objective", CASES)
def test_step_equals_one_process_on_the_concatenated_batch(
    tmp_path, monkeypatch, one_step_runs, kind, variant, objective
):
    """For a fully trained toy field and for a LoRA adapter on SD3 (prompts drawn per rank, so nft's and awm's
    advantages are normalised over prompt groups gathered from both ranks), for every objective."""
    folder, runs = one_step_runs
    ranks = [run[kind, variant, objective] for run in runs]
    for key in ("x1", "noise", "t"):  # each rank drew its own share
        assert not torch.equal(ranks[0][key], ranks[1][key])
    for key in ("params", "ema"):  # the ranks stay in sync
        if ranks[0][key] is not None:
            assert all(torch.equal(a, b) for a, b in zip(ranks[0][key], ranks[1][key]))

    # one process, batch 16, fed the same x0, x1 (rollout), prompts, coupling noise and t as the two ranks
    torch.manual_seed(0)
    model, cfg, reward = _make(kind, folder, tmp_path / "single", objective)
    single = ORWCFMTrainer(model, cfg, "cpu", reward_fn=reward)
    x0, x1, noise, t = (torch.cat([r[key] for r in ranks]) for key in ("x0", "x1", "noise", "t"))
    prompts = None if ranks[0]["prompts"] is None else ranks[0]["prompts"] + ranks[1]["prompts"]
    monkeypatch.setattr(single, "rollout", lambda batch: (x0, x1, prompts) if batch == 16 else pytest.fail(f"{batch}"))
    monkeypatch.setattr(trainer_module, "couple", lambda x1_, weights, **kwargs: (noise, x1_, weights))
    # the trainer's own t is None (one path time per sample): replaced by the test's
    monkeypatch.setattr(trainer_module, "sample_path", lambda a, b, _t, **kwargs: sample_path(a, b, t, **kwargs))
    metrics = single.train_step()
    single.refresh_last_policy()

    params = single.weights.trainable_parameters()
    for rank in ranks:
        torch.testing.assert_close(rank["grads"], [p.grad for p in params])
        torch.testing.assert_close(rank["params"], list(params))
        if rank["ema"] is not None:
            torch.testing.assert_close(rank["ema"], list(single.ema.parameters()))
        assert rank["metrics"].keys() == metrics.keys()
        common = ("loss", "w2_loss", "reward_mean", "reward_std", "reward_max", "diversity")
        for key in (*common, "fm_loss", "ess", "policy_loss", "positive_fraction"):  # orw_cfm_w2's, nft's and awm's
            if key in metrics:
                assert rank["metrics"][key] == pytest.approx(metrics[key], rel=1e-5), key
        assert rank["metrics"]["grad_norm"] == pytest.approx(metrics["grad_norm"], rel=1e-5)


# -- resume -------------------------------------------------------------------------------------------


MODELS = ("model", "last_policy", "ema")


def _train_and_resume_each(rank, root):
    """For each variant in root/<variant>: an uninterrupted run (full), its first epoch (part), and a fresh
    trainer resuming from part's last.pt to the end (resumed)."""

    def run(folder, fsdp, epochs, resume=None):
        torch.manual_seed(0)
        trainer = ORWCFMTrainer(ToyField(), config(folder, fsdp=fsdp), "cpu", reward_fn=right_reward)
        if resume is not None:
            trainer.resume(resume)
        losses = [m["loss"] for m in trainer.train(num_epochs=epochs, steps_per_epoch=2, progress=False)]
        return losses, {key: full(getattr(trainer, key).parameters()) for key in MODELS}

    results = {}
    for variant, fsdp in VARIANTS.items():
        full_losses, _ = run(root / variant / "full", fsdp, 2)
        part1, _ = run(root / variant / "part", fsdp, 1)
        torch.manual_seed(999)  # whatever happens in between must not matter
        part2, models = run(root / variant / "resumed", fsdp, 2, resume=root / variant / "part" / "last.pt")
        results[variant] = {"losses": (full_losses, part1, part2), "models": models}
    return results


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return root, run_ranks(root, _train_and_resume_each, root)


@pytest.mark.parametrize("variant", VARIANTS)
def test_two_ranks_resume_to_the_same_losses(tmp_path, resume_runs, variant):
    root, runs = resume_runs
    ranks, folder = [run[variant] for run in runs], root / variant
    assert ranks[0]["losses"] == ranks[1]["losses"]  # every rank logs the whole batch's metrics
    full_losses, part1, part2 = ranks[0]["losses"]
    assert len(full_losses) == 4 and part1 + part2 == full_losses
    # policy, last policy and EMA: the same on both ranks and in the uninterrupted run's checkpoint
    ckpt, resumed = load_file(folder / "full" / "last.pt"), load_file(folder / "resumed" / "last.pt")
    for key, ckpt_key in zip(MODELS, ("policy", "last_policy", "ema")):
        assert all(torch.equal(a, b) for a, b in zip(ranks[0]["models"][key], ranks[1]["models"][key]))
        assert all(torch.equal(a, b) for a, b in zip(ranks[0]["models"][key], ckpt[ckpt_key].values()))
        assert all(torch.equal(resumed[ckpt_key][k], v) for k, v in ckpt[ckpt_key].items())
    # rank 0 alone wrote: one log line per step, and the checkpoints
    assert (folder / "full" / "metrics.jsonl").read_text().count("\n") == 4
    written = sorted(p.name for p in (folder / "full").iterdir())
    assert written == ["checkpoint_epoch001.pt", "last.pt", "metrics.jsonl"]
    assert len(ckpt["rng"]) == WORLD and not any(k.startswith("module.") for k in ckpt["policy"])

    # the 2-rank checkpoint in one process: its weights load; a DDP run's training state resumes (not
    # bit-exactly: other random streams), an FSDP2 run's optimizer state needs FSDP2
    single = ORWCFMTrainer(ToyField(), config(tmp_path / "single"), "cpu", reward_fn=right_reward)
    single.load_pretrained(folder / "full" / "last.pt", weights="policy")
    assert all(torch.equal(v, ckpt["policy"][k]) for k, v in single.model.state_dict().items())
    if VARIANTS[variant]:
        with pytest.raises(ValueError, match="written with fsdp=True"):
            single.resume(folder / "part" / "last.pt")
        return
    with pytest.warns(UserWarning, match="written by 2 process"):
        single.resume(folder / "part" / "last.pt")
    assert single.step == 2 and math.isfinite(single.train_step()["loss"])


# -- a failing rank -----------------------------------------------------------------------------------


def _nan_on_rank_1(rank, root):
    def reward(x):
        r = x[:, 0].clone()
        if rank == 1:
            r[:3] = math.nan
        return r

    try:
        ORWCFMTrainer(ToyField(), config(root, batch_size=15), "cpu", reward_fn=reward)
        uneven = None
    except ValueError as err:
        uneven = str(err)
    torch.manual_seed(0)
    trainer = ORWCFMTrainer(ToyField(), config(root), "cpu", reward_fn=reward)
    before = [p.clone() for p in trainer.model.parameters()]
    try:
        trainer.train(num_epochs=1, steps_per_epoch=2, progress=False)
        error = None
    except Exception as err:
        error = (type(err).__name__, str(err))
    return {
        "uneven": uneven,
        "error": error,
        "step": trainer.step,
        "unchanged": all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters())),
    }


def test_nan_rewards_on_one_rank_stop_every_rank_with_a_clear_error(tmp_path):
    ranks = run_ranks(tmp_path, _nan_on_rank_1, tmp_path)
    assert ranks[1]["error"][0] == "ValueError" and "3 of 8 rewards are non-finite" in ranks[1]["error"][1]
    name, message = ranks[0]["error"]
    assert name == "PeerError" and "rank 1" in message and "3 of 8 rewards are non-finite" in message
    assert all(r["step"] == 0 and r["unchanged"] for r in ranks)
    assert all("batch_size must be divisible by the number of processes (2), got 15" in r["uneven"] for r in ranks)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({}, "needs several processes"),
        ({"precision": "fp16"}, "precision"),
        ({"sampler_method": "dopri5", "sampler_steps": 4}, "sampler_method"),
        ({"cuda_graph": True}, "cuda_graph"),
    ],
)
def test_fsdp_settings_that_cannot_work_are_refused(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        ORWCFMTrainer(ToyField(), config(tmp_path, fsdp=True, **overrides), "cpu", reward_fn=right_reward)


# -- the command line under torchrun ------------------------------------------------------------------


def test_torchrun_finetune_end_to_end(tmp_path):
    from orw_fast.models import make_flow_model

    model, model_config = make_flow_model((1, 8, 8), preset="digits")
    save_atomic({"ema_model": model.state_dict(), "model_config": model_config}, tmp_path / "flow.pt")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            "-m",
            "orw_fast",
            "finetune",
            "--checkpoint",
            str(tmp_path / "flow.pt"),
            "--reward",
            "jpeg_compressibility",
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
            "--device",
            "cpu",
            "--quiet",
            "--out",
            str(tmp_path / "ft"),
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("checkpoints, metrics.jsonl and sample grids in") == 1  # rank 0 alone prints
    assert (tmp_path / "ft" / "metrics.jsonl").read_text().count("\n") == 2
    assert (tmp_path / "ft" / "samples_epoch001.png").stat().st_size > 0
    assert load_file(tmp_path / "ft" / "last.pt")["step"] == 2


_USER_SCRIPT = """
import atexit, os, sys
import torch.distributed as dist
sys.path.insert(0, sys.argv[1])
# runs last; one os.write per rank, so the two ranks' lines cannot interleave on the shared pipe (print may write a
# line in several pieces when stdout is unbuffered)
atexit.register(lambda: os.write(1, f"group destroyed before exit: {not dist.is_initialized()}\\n".encode()))
from test_trainer import ToyField, right_reward, toy_config
from orw_fast.trainer import ORWCFMTrainer
config = toy_config(sys.argv[2], batch_size=4, sampler_method="euler", sampler_steps=2)
trainer = ORWCFMTrainer(ToyField(), config, "cpu", reward_fn=right_reward)
trainer.train_step()
"""


def test_a_torchrun_script_that_never_destroys_the_group_exits_cleanly(tmp_path):
    """A user's script under torchrun: the trainer made the process group, so the library tears it down at exit
    (its worker threads joined while the interpreter is alive), not the interpreter's finalization."""
    (tmp_path / "user.py").write_text(_USER_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            str(tmp_path / "user.py"),
            str(REPO / "tests"),
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("group destroyed before exit: True") == 2, proc.stdout
    assert "terminate called" not in proc.stderr
