"""Same seeds, same bits: runs a few training configurations with the orw_fast of this checkout and with another
checkout (e.g. an older commit) in subprocesses, and compares every step's metrics (timings excepted), the files the
default callbacks write (metrics.jsonl lines, sample-grid PNG bytes, the tensors of last.pt and of the per-epoch
checkpoints) and the per-epoch evaluation records of the experiments' runs (their "seconds" excepted).

    python scripts/same_bits.py --old /path/to/other/checkout   # exit status 1 on any difference

The other checkout needs its C++ extension built (or copied in), like this one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TIMINGS = ("samples_per_s", "peak_memory_mb", "seconds")

# name -> (TrainerConfig overrides, epochs, steps per epoch)
CASES = {
    "softmax_independent": ({}, 2, 3),
    "exp_ot_ema": ({"weighting": "exp", "coupling": "ot", "ema_decay": 0.9}, 2, 3),
    "rollout_coupling_sigma": ({"coupling": "rollout", "sigma": 0.1, "warmup_steps": 3}, 2, 3),
    "none_weighting": ({"weighting": "none", "w2_coefficient": 0.5}, 1, 4),
    "rollout_reuse": ({"rollout_batches": 3, "rollout_reuse": 2}, 2, 4),
    "refresh_interval_2": ({"refresh_interval": 2, "rollout_batches": 2}, 3, 2),
    "grids_and_checkpoints": (
        {"image_shape": [1, 4, 4], "grid_size": 4, "checkpoint_every": 1, "diversity_every": 2},
        3,
        2,
    ),
}

WORKER = r"""
import copy, hashlib, json, sys
from pathlib import Path

import torch

from orw_fast.checkpoint import load_file
from orw_fast.trainer import ORWCFMTrainer, TrainerConfig

cases, out, folder = json.loads(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
TIMINGS = set(json.loads(sys.argv[4]))


class Field(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim + 1, 32), torch.nn.SiLU(), torch.nn.Linear(32, dim))

    def forward(self, t, x):
        return self.net(torch.cat([t[:, None], x.reshape(x.shape[0], -1)], dim=1)).reshape(x.shape)


def base(shape=(2,)):
    torch.manual_seed(0)
    return Field(int(torch.Size(shape).numel()))


BASE = base()


def reward(x):
    return x.reshape(x.shape[0], -1)[:, 0]


def config(run, **overrides):
    base = dict(image_shape=(2,), batch_size=16, sampler_steps=4, learning_rate=3e-3, temperature=2.0,
                w2_coefficient=0.1, grid_size=0, savedir=str(run), seed=3)
    return TrainerConfig(**{**base, **overrides})


def tensors_digest(state):
    h = hashlib.sha256()
    for key in ("policy", "last_policy", "reference", "ema", "step"):
        value = state.get(key)
        if isinstance(value, dict):
            for name, tensor in value.items():
                h.update(name.encode() + tensor.numpy().tobytes())
        else:
            h.update(repr(value).encode())
    for key in ("optimizer",):
        for k, entry in sorted(state[key]["state"].items(), key=lambda kv: str(kv[0])):
            for name, tensor in entry.items():
                h.update(f"{k}.{name}".encode() + (tensor.numpy().tobytes() if hasattr(tensor, "numpy") else b""))
    return h.hexdigest()


def files(run):
    found = {}
    for path in sorted(run.iterdir()):
        if path.name == "metrics.jsonl":
            found[path.name] = [{k: v for k, v in json.loads(line).items() if k not in TIMINGS}
                                for line in path.read_text().splitlines()]
        elif path.suffix == ".pt":
            found[path.name] = tensors_digest(load_file(path))
        else:
            found[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def strip(history):
    return [{k: v for k, v in m.items() if k not in TIMINGS} for m in history]


results = {}
for name, (overrides, epochs, steps) in cases.items():
    run = folder / name
    trainer = ORWCFMTrainer(base(overrides.get("image_shape", (2,))), config(run, **overrides), "cpu", reward_fn=reward)
    history = trainer.train(epochs, steps, progress=False)
    results[name] = {"history": strip(history), "files": files(run)}

# resume: one epoch, a checkpoint, a new trainer (after other random draws) resumes and runs to epoch 3
first = ORWCFMTrainer(copy.deepcopy(BASE), config(folder / "resume_a", coupling="ot", rollout_reuse=2, ema_decay=0.5),
                      "cpu", reward_fn=reward)
part1 = first.train(1, 3, progress=False)
first.save_checkpoint(folder / "resume_a" / "mid.pt")
torch.manual_seed(99)
second = ORWCFMTrainer(copy.deepcopy(BASE), config(folder / "resume_b", coupling="ot", rollout_reuse=2, ema_decay=0.5),
                       "cpu", reward_fn=reward)
second.resume(folder / "resume_a" / "mid.pt")
part2 = second.train(3, 3, progress=False)
results["resume"] = {"history": strip(part1 + part2), "files": files(folder / "resume_b")}

# the experiments' per-epoch evaluation (old: tasks.sweeps.fine_tune_by_epoch; new: tasks.sweeps.evaluated_run)
from orw_fast import sampling
from orw_fast.tasks import sweeps

noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(5))


def evaluate(trainer):
    x1 = sampling.sample(trainer.model, noise, steps=5, method="midpoint", cuda_graph=False)
    return {"mean_x": x1.mean(0).tolist(), "reward": float(reward(x1).mean())}


def make(callbacks=None):
    cfg = config(folder / "never_written", grid_size=0)
    extra = {} if callbacks is None else {"callbacks": callbacks}
    return ORWCFMTrainer(copy.deepcopy(BASE), cfg, "cpu", reward_fn=reward, **extra)


if hasattr(sweeps, "fine_tune_by_epoch"):
    records = sweeps.fine_tune_by_epoch(make(), 3, 2, evaluate, progress=False)
else:
    records = sweeps.evaluated_run(make, 3, 2, evaluate, progress=False)
results["evaluation_records"] = {"history": strip(records), "files": {}}
results["_written"] = sorted(p.name for p in folder.iterdir())
out.write_text(json.dumps(results))
"""


def run(checkout: Path, folder: Path) -> dict:
    out = folder / "results.json"
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps(CASES), str(out), str(folder), json.dumps(TIMINGS)],
        check=True,
        env=env,
        cwd=folder,
    )
    return json.loads(out.read_text())


def differences(old: dict, new: dict) -> list[str]:
    found = []
    for case in old:
        if case.startswith("_"):
            if old[case] != new.get(case):
                found.append(f"{case}: {old[case]} != {new.get(case)}")
            continue
        a, b = old[case], new.get(case, {})
        if a["history"] != b.get("history"):
            steps = [i for i, (x, y) in enumerate(zip(a["history"], b.get("history", []))) if x != y]
            found.append(
                f"{case}: metrics differ (records {steps[:5]}; lengths {len(a['history'])}, "
                f"{len(b.get('history', []))})"
            )
        if a["files"] != b.get("files"):
            names = sorted(
                n for n in set(a["files"]) | set(b.get("files", {})) if a["files"].get(n) != b.get("files", {}).get(n)
            )
            found.append(f"{case}: files differ: {names}")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", required=True, type=Path, help="the other checkout (its folder holds orw_fast/)")
    parser.add_argument(
        "--new", type=Path, default=Path(__file__).resolve().parents[1], help="this checkout (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "old").mkdir()
        (Path(tmp) / "new").mkdir()
        old, new = run(args.old.resolve(), Path(tmp) / "old"), run(args.new.resolve(), Path(tmp) / "new")
    found = differences(old, new)
    steps = sum(len(c["history"]) for k, c in old.items() if not k.startswith("_"))
    print(
        f"{len(old) - 1} cases, {steps} step/epoch records compared, files: "
        f"{sum(len(c['files']) for k, c in old.items() if not k.startswith('_'))}"
    )
    print("\n".join(found) if found else "identical: every metric, file and record is the same bits")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
