"""The whole benchmark run in one command: each stage in its own process, with its own log and time limit; a
failed stage is recorded and the next one runs; a summary (with the issue's targets on GPU) comes last.

Stages (default on cuda: all of them; on cpu: hardware, loss, sampler, train_step, t2i; rollout_error and
time_to_target take 25 and 12 minutes on a 2-core CPU, methods about 30, so they run on the CPU only when named):
  build       pip install --no-build-isolation --no-deps --no-index -e . for the GPU's architecture
              (TORCH_CUDA_ARCH_LIST, e.g. 9.0), `python setup.py build_ext --inplace` if pip fails; skipped
              when orw_fast._C already has a CUDA kernel newer than every source
  nvcc        benchmarks/nvcc_report.py: registers, spills, 16-byte loads in the SASS
  tests       python -m pytest tests (the CUDA tests run on a GPU), with a JUnit XML file
  hardware    benchmarks/hardware.py: copy bandwidth, matmul rate, clocks
  loss        benchmarks/bench_loss.py
  sampler     benchmarks/bench_sampler.py
  train_step  benchmarks/bench_train_step.py
  t2i         benchmarks/bench_t2i.py (text-to-image: SD3.5-medium and FLUX.1-dev sizes on cuda, tiny on cpu)
  rollout_error   benchmarks/bench_rollout_error.py (rollout accuracy against model calls)
  time_to_target  benchmarks/bench_time_to_target.py (wall-clock to a reward: official algorithm vs orw_fast)
  methods     benchmarks/bench_methods.py (time to a reward and the quality-bounded reward front: ORW-CFM-W2
              official and orw_fast, NFT, AWM, Flow-GRPO, Flow-GRPO-Fast; even digits and text alignment)
Results, logs and the summary run_<date>_<commit>_<stages>.md go to OUT/<device-slug>/ (default
benchmarks/results/); --archive also packs the files this run wrote into one .tar.gz after every stage (so a
run cut short still leaves its results); --report sums up a folder filled by several runs.

    python benchmarks/run_all.py                          # cuda if available, else cpu
    python benchmarks/run_all.py --device cpu --quick     # smoke run
    python benchmarks/run_all.py --stages sampler,train_step --archive /tmp/results.tar.gz
    python benchmarks/run_all.py --report benchmarks/results/nvidia-h100-80gb-hbm3   # no GPU needed
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and this checkout's orw_fast importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import common
from benchmarks.bench_loss import OPS as LOSS_OPS

ROOT = common.REPO_ROOT
STAGES = (
    "build",
    "nvcc",
    "tests",
    "hardware",
    "loss",
    "sampler",
    "train_step",
    "t2i",
    "rollout_error",
    "time_to_target",
    "methods",
)
DEFAULT_STAGES = {"cuda": STAGES, "cpu": ("hardware", "loss", "sampler", "train_step", "t2i")}
BENCH_SCRIPTS = {
    "hardware": "hardware.py",
    "loss": "bench_loss.py",
    "sampler": "bench_sampler.py",
    "train_step": "bench_train_step.py",
    "t2i": "bench_t2i.py",
    "rollout_error": "bench_rollout_error.py",
    "time_to_target": "bench_time_to_target.py",
    "methods": "bench_methods.py",
}
TIMEOUT_S = {
    "build": 900,
    "nvcc": 600,
    "tests": 1200,
    "hardware": 300,
    "loss": 1200,
    "sampler": 1500,
    "train_step": 1500,
    "t2i": 1500,
    "rollout_error": 1800,
    "time_to_target": 1800,
    "methods": 3600,
}
# Named plans: stage -> (extra arguments, time limit in s), run in this order. "proof" (run_gpu.sh --quick) shows on
# one GPU, in one 10-minute call (about 6-8 min on an H100/H200), that the CUDA and Triton paths work and how fast
# they are: the build for the GPU's architecture, the GPU tests (fused ops against float64 in every dtype, graph
# capture of loss + backward and of the sampler, graphed diffusers rollouts), the copy bandwidth, the loss at 16M and
# 64M elements, the training step against the official one, and the SD3.5-medium-size LoRA step with its memory.
PLANS = {
    "proof": {
        "build": ([], 240),
        "tests": (["-m", "gpu"], 150),
        "hardware": ([], 60),
        "loss": (
            [
                "--sizes",
                "256x4x128x128,256x4x256x256",
                "--dtypes",
                "fp32,bf16",
                "--backends",
                "eager,compile,native,triton",
                "--repeats",
                "20",
            ],
            150,
        ),
        # ours_compile is left out: its first step compiles for about 94 s on an H200 and it ran no faster than ours
        # there (the step is rollout-bound); the full plan keeps it
        "train_step": (["--batches", "64", "--repeats", "4", "--variants", "official_eager,ours,ours_ot"], 120),
        "t2i": (
            [
                "--models",
                "sd3.5-medium",
                "--batches",
                "4",
                "--variants",
                "rollout_eager,rollout_graph,step_lora",
                "--repeats",
                "3",
            ],
            150,
        ),
    },
}


@dataclass
class StageResult:
    stage: str
    status: str  # ok | failed | timeout | skipped
    seconds: float = 0.0
    detail: str = ""
    commands: list[str] = field(default_factory=list)
    log: str | None = None
    files: list[str] = field(default_factory=list)


class Run:
    """Runs commands for the stages, logging each stage's output to OUT/<slug>/logs/."""

    def __init__(self, args, device: torch.device):
        self.args, self.device = args, device
        self.slug = common.device_slug(device)
        self.folder = Path(args.out) / self.slug
        if not args.dry_run:
            self.folder.mkdir(parents=True, exist_ok=True)
        self.date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
        self.commit = common.git_commit()
        self.suffix = "_quick" if args.quick else ""
        self.plan = PLANS.get(args.plan, {})
        self.written: set[Path] = set()
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.dry_run_output = ""  # what the last command printed in a dry run

    def log_path(self, stage: str) -> Path:
        return self.folder / "logs" / f"{stage}_{self.date}_{self.commit}{self.suffix}.log"

    def stage_args(self, stage: str) -> list[str]:
        """The plan's extra arguments of ``stage`` (none without a plan)."""
        return list(self.plan.get(stage, ([], None))[0])

    def timeout(self, stage: str) -> float:
        """``stage``'s time limit: the plan's, else TIMEOUT_S's scaled by --timeout-scale (benchmark stages)."""
        if stage in self.plan:
            return self.plan[stage][1]
        return TIMEOUT_S[stage] * (self.args.timeout_scale if stage in BENCH_SCRIPTS else 1)

    def command(self, result: StageResult, cmd: list[str], timeout: float, env: dict | None = None) -> int:
        """Runs ``cmd`` in the repository root, appending its output to the stage's log (printing it in a dry run);
        returns the exit status (124 on timeout)."""
        if self.args.dry_run:
            result.commands.append(" ".join(cmd))
            try:
                proc = subprocess.run(
                    cmd,
                    cwd=ROOT,
                    timeout=timeout,
                    env={**self.env, **(env or {})},
                    text=True,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                )
            except subprocess.TimeoutExpired:
                return 124
            print(proc.stdout, end="", flush=True)
            self.dry_run_output = proc.stdout
            return proc.returncode
        log = self.log_path(result.stage)
        log.parent.mkdir(parents=True, exist_ok=True)
        result.log = str(log.relative_to(self.folder))
        result.commands.append(" ".join(cmd))
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            try:
                proc = subprocess.run(
                    cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env={**self.env, **(env or {})}
                )
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = 124
            f.write(f"\n[exit {rc}]\n")
        self.written.add(log)
        return rc

    def snapshot(self) -> dict[Path, float]:
        return {p: p.stat().st_mtime for p in self.folder.rglob("*") if p.is_file()}

    def archive(self) -> None:
        """Packs the files this run wrote into --archive (atomically)."""
        if not self.args.archive or self.args.dry_run:
            return
        target = Path(self.args.archive)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        with tarfile.open(tmp, "w:gz") as tar:
            for path in sorted(self.written):
                if path.exists():
                    tar.add(path, arcname=str(path.relative_to(Path(self.args.out))))
        os.replace(tmp, target)


# ---------------------------------------------------------------------------------------------
# Stages


def _arch_list(device: torch.device) -> str:
    """TORCH_CUDA_ARCH_LIST (e.g. "9.0"): the environment's, else the GPU's compute capability."""
    if "TORCH_CUDA_ARCH_LIST" in os.environ:
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}.{minor}"


def _built_kernel_is_current() -> bool:
    """True when orw_fast._C has a CUDA kernel (checked in a fresh process) and is newer than every source."""
    libs = list((ROOT / "orw_fast").glob("_C*.so"))
    sources = [*(ROOT / "csrc").iterdir(), ROOT / "setup.py"]
    if not libs or min(p.stat().st_mtime for p in libs) < max(p.stat().st_mtime for p in sources):
        return False
    return _has_cuda_kernel()


def _has_cuda_kernel() -> bool:
    check = "from orw_fast import _native; import sys; sys.exit(0 if _native.has_kernel('orw_cfm_w2', 'cuda') else 1)"
    return subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True).returncode == 0


def stage_build(run: Run, result: StageResult) -> None:
    if run.device.type != "cuda":
        result.status = "skipped"
        result.detail = (
            "no CUDA device: the build for the GPU runs there (the CPU kernels are built by pip install -e .)"
        )
        return
    if _built_kernel_is_current():
        result.status, result.detail = "ok", "up to date: orw_fast._C has a CUDA kernel newer than every source"
        return
    arch = _arch_list(run.device)
    env = {"TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": str(os.cpu_count() or 4)}
    rc = run.command(
        result,
        [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."],
        run.timeout("build"),
        env,
    )
    how = "pip install -e"
    if rc != 0 or not _has_cuda_kernel():  # e.g. pip refuses offline, or put the library elsewhere
        rc = run.command(result, [sys.executable, "setup.py", "build_ext", "--inplace"], run.timeout("build"), env)
        how = "setup.py build_ext --inplace (after pip install -e gave no CUDA kernel)"
    ok = rc == 0 and _has_cuda_kernel()
    result.status = "ok" if ok else "failed"
    result.detail = f"{how}, TORCH_CUDA_ARCH_LIST={arch}" + ("" if ok else f": exit {rc}, or no CUDA kernel after it")


def stage_nvcc(run: Run, result: StageResult) -> None:
    if run.args.dry_run:
        result.status, result.detail = "skipped", "dry run: the nvcc report has no dry run"
        return
    first = re.split(r"[;\s]", _arch_list(run.device).strip())[0].removesuffix("+PTX")
    arch = "sm_" + first.replace(".", "") if run.device.type == "cuda" else "sm_90"
    rc = run.command(
        result,
        [sys.executable, "benchmarks/nvcc_report.py", "--arch", arch, "--out", str(run.args.out), "--folder", run.slug],
        run.timeout("nvcc"),
    )
    result.status = "ok" if rc == 0 else ("timeout" if rc == 124 else "failed")
    result.detail = headline("nvcc", run_results(run, "nvcc"))


def stage_tests(run: Run, result: StageResult) -> None:
    selection = run.stage_args("tests")
    if run.args.dry_run:  # collect what the plan selects: the GPU tests exist here but skip
        rc = run.command(
            result,
            [
                sys.executable,
                "-m",
                "pytest",
                "--collect-only",
                "-q",
                "-p",
                "no:cacheprovider",
                "tests",
                *selection,
            ],
            run.timeout("tests"),
        )
        counts = re.search(r"(\d+(?:/\d+)? tests? collected)", run.dry_run_output)
        result.status = "ok" if rc == 0 else "failed"
        result.detail = (
            f"dry run: `pytest tests {' '.join(selection)}`: "
            f"{counts.group(1) if counts else 'no test collected'} (exit {rc}; they skip without CUDA)"
        )
        return
    xml = run.folder / f"tests_{run.date}_{run.commit}{run.suffix}.xml"
    env = {"ORW_FAST_REQUIRE_NVCC": "1"} if run.device.type == "cuda" else {}
    rc = run.command(
        result,
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rfEs",
            "-p",
            "no:cacheprovider",
            "tests",
            *selection,
            f"--junitxml={xml}",
        ],
        run.timeout("tests"),
        env,
    )
    run.written.add(xml)
    result.status = "ok" if rc == 0 else ("timeout" if rc == 124 else "failed")
    tail = (run.folder / result.log).read_text().splitlines()
    counts = next((line.strip("= ") for line in reversed(tail) if re.search(r"\d+ (passed|failed|error)", line)), "")
    result.detail = counts


def stage_bench(run: Run, result: StageResult) -> None:
    if run.args.dry_run and result.stage in NO_DRY_RUN:
        result.status, result.detail = "skipped", f"dry run: {BENCH_SCRIPTS[result.stage]} has no dry run"
        return
    cmd = (
        [
            sys.executable,
            f"benchmarks/{BENCH_SCRIPTS[result.stage]}",
            "--device",
            str(run.device),
            "--out",
            str(run.args.out),
        ]
        + (["--quick"] if run.args.quick else [])
        + run.stage_args(result.stage)
    )
    if result.stage == "loss" and run.device.type == "cuda" and not run.plan:  # the whole GPU run: every fused op
        cmd += ["--triton-sweep", "--ops", ",".join(LOSS_OPS)]
    rc = run.command(result, cmd + (["--dry-run"] if run.args.dry_run else []), run.timeout(result.stage))
    result.status = "ok" if rc == 0 else ("timeout" if rc == 124 else "failed")
    result.detail = (
        f"dry run (exit {rc})" if run.args.dry_run else headline(result.stage, run_results(run, result.stage))
    )


NO_DRY_RUN = ("rollout_error", "time_to_target")  # their scripts have no --dry-run
STAGE_FUNCTIONS = {
    "build": stage_build,
    "nvcc": stage_nvcc,
    "tests": stage_tests,
    "hardware": stage_bench,
    "loss": stage_bench,
    "sampler": stage_bench,
    "train_step": stage_bench,
    "t2i": stage_bench,
    "rollout_error": stage_bench,
    "time_to_target": stage_bench,
    "methods": stage_bench,
}


# ---------------------------------------------------------------------------------------------
# Headlines of each stage's results (and the targets on GPU)


def run_results(run: Run, name: str) -> dict | None:
    """The JSON results of ``name`` this run wrote (its date, commit and --quick), or None."""
    paths = sorted(run.folder.glob(f"{name}_{run.date}_{run.commit}{run.suffix}.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(paths[-1].read_text()) if paths else None


def newest_results(folder: Path, name: str, quick: bool = False) -> dict | None:
    """The newest JSON results of ``name`` in ``folder`` (by their recorded date), quick runs only with ``quick``."""
    found = []
    for path in folder.glob(f"{name}_*.json"):
        if path.stem.endswith("_quick") != quick:
            continue
        data = json.loads(path.read_text())
        found.append((data["metadata"]["date_utc"], path.stat().st_mtime, data))
    return max(found, key=lambda f: f[:2])[2] if found else None


def _ok(rows):
    return [r for r in rows if r.get("status") == "ok"]


def _failed(data: dict) -> str:
    failed = sum(r.get("status") != "ok" for r in data["results"])
    return f"; {failed} cases failed" if failed else ""


def summarize_nvcc(data: dict) -> str:
    rows = data["results"]
    regs = [r["registers"] for r in rows if "registers" in r]
    spills = sum(r.get("spill_store_bytes", 0) + r.get("spill_load_bytes", 0) for r in rows)
    vec = sum(r["has_128bit_loads"] for r in rows)
    return f"{len(rows)} kernels, {min(regs)}-{max(regs)} registers, {spills} B spills, {vec} with 128-bit loads"


def summarize_hardware(data: dict) -> str:
    hw = data["metadata"]["hardware"]
    return f"copy {hw['copy_gbs']:.1f} GB/s, {hw['matmul_dtype']} matmul {hw['matmul_tflops']:.4g} TFLOP/s"


def _loss_rows(data: dict) -> list[dict]:
    return [r for r in _ok(data["results"]) if "triton_config" not in r]


def summarize_loss(data: dict) -> str:
    rows, parts = _loss_rows(data), []
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        largest = max(r["numel"] for r in rows if r["dtype"] == dtype)
        for backend in ("native", "triton"):
            r = next(
                (r for r in rows if r["dtype"] == dtype and r["numel"] == largest and r["backend"] == backend), None
            )
            if r:
                parts.append(
                    f"{dtype} {backend} @{largest / 1e6:.1f}M: {r['pct_copy_bw']:.0f}% copy BW, "
                    f"{common.fmt('{:.1f}x', r.get('speedup_vs_eager'))} eager, "
                    f"{common.fmt('{:.2f}x', r.get('speedup_vs_compile'))} compile, "
                    f"{r['peak_extra_grad_bufs']:.2f} grad bufs"
                )
    sweep = [r for r in _ok(data["results"]) if "triton_config" in r]
    for dtype in dict.fromkeys(r["dtype"] for r in sweep):
        best = min((r for r in sweep if r["dtype"] == dtype), key=lambda r: r["median_ms"])
        parts.append(f"best triton launch {dtype}: {best['triton_config']} ({best['pct_copy_bw']:.0f}% copy BW)")
    return "; ".join(parts) + _failed(data)


def summarize_sampler(data: dict) -> str:
    rows, parts = _ok(data["results"]), []
    for batch in sorted({r["batch"] for r in rows}):
        ours = [r for r in rows if r["batch"] == batch and r["variant"].startswith("ours")]
        if not ours:
            continue
        best = max(ours, key=lambda r: r.get("speedup_vs_fp32_loop") or 0)
        text = f"batch {batch}: {best['variant']} {common.fmt('{:.2f}x', best.get('speedup_vs_fp32_loop'))} fp32 loop"
        if "replay_vs_n_forwards" in best:
            text += f" (replay / N fwd {best['replay_vs_n_forwards']:.3f})"
        parts.append(text)
    return "; ".join(parts) + _failed(data)


def summarize_train_step(data: dict) -> str:
    parts = [
        f"batch {r['batch']} {r['variant']}: {r['samples_per_s']:.1f} samples/s, "
        f"{common.fmt('{:.2f}x', r.get('speedup_vs_official'))} official"
        for r in _ok(data["results"])
        if r["variant"] != "official_eager"
    ]
    return "; ".join(parts) + _failed(data)


def summarize_t2i(data: dict) -> str:
    parts = [
        f"{r['model']} B={r['batch']} {r['variant']}: {r['median_ms']:.1f} ms"
        + common.fmt(", {:.0f} MB peak", r.get("peak_allocated_mb"))
        for r in _ok(data["results"])
        if r["variant"] in ("rollout_graph", "rollout_eager", "step_lora")
    ]
    return "; ".join(parts) + _failed(data)


def summarize_rollout_error(data: dict) -> str:
    chosen = data["metadata"].get("chosen")
    if chosen is None:
        return "no configuration reaches 100-step Euler's error" + _failed(data)
    return (
        f"cheapest as accurate as 100 Euler steps: {chosen['method']}, {chosen['grid']} grid, {chosen['steps']} "
        f"steps ({chosen['model_calls']} model calls)" + _failed(data)
    )


def summarize_time_to_target(data: dict) -> str:
    parts = [
        f"{s['variant']}: {s['reached']}/{s['seeds']} reached, {s['seconds']:.0f} s"
        + common.fmt(" ({:.1f}x)", s.get("speedup"))
        for s in data["metadata"]["summary"]
    ]
    return "; ".join(parts) + _failed(data)


def summarize_methods(data: dict) -> str:
    """Per task: each method's best point's median wall-clock to the target, or that none reached it."""
    rows, parts = data["results"], []
    for task, t in data["metadata"]["tasks"].items():
        times = []
        for method, point in t["best_points"].items():
            runs = [r for r in rows if (r["task"], r["method"], r.get("point")) == (task, method, point)]
            runs = [r for r in runs if r["status"] == "ok"]
            times.append(f"{method} {statistics.median(r['seconds'] for r in runs):.0f} s")
        parts.append(f"{task}: " + (", ".join(times) if times else "no method reached the target"))
    failed = sum(not r["status"].startswith(("ok", "skipped")) for r in rows)
    return "; ".join(parts) + (f"; {failed} runs failed" if failed else "")


RESULT_NAMES = {
    "nvcc": "nvcc",
    "hardware": "hardware",
    "loss": "loss",
    "sampler": "sampler",
    "train_step": "train_step",
    "t2i": "t2i",
    "rollout_error": "rollout_error",
    "time_to_target": "time_to_target",
    "methods": "methods",
}
SUMMARIES = {
    "nvcc": summarize_nvcc,
    "hardware": summarize_hardware,
    "loss": summarize_loss,
    "sampler": summarize_sampler,
    "train_step": summarize_train_step,
    "t2i": summarize_t2i,
    "rollout_error": summarize_rollout_error,
    "time_to_target": summarize_time_to_target,
    "methods": summarize_methods,
}


def headline(stage: str, data: dict | None) -> str:
    if data is None:
        return "no results"
    try:
        return SUMMARIES[stage](data)
    except (KeyError, ValueError, TypeError) as err:  # a results file of another layout
        return f"results unreadable: {common.error_status(err)}"


def target_checks(results: dict[str, dict | None]) -> list[tuple[str, str, str]]:
    """(target, measured, met|missed) for the issue's GPU targets, from the results of each benchmark."""
    checks = []
    if loss := results.get("loss"):
        rows = _loss_rows(loss)
        largest = max((r["numel"] for r in rows), default=None)
        for r in (r for r in rows if r["numel"] == largest and r["backend"] in ("native", "triton")):
            name = f"loss {r['dtype']} {r['backend']} @{largest / 1e6:.0f}M"
            checks.append((f"{name}: >= 80 % copy BW", f"{r['pct_copy_bw']:.1f} %", r["pct_copy_bw"] >= 80))
            if r.get("speedup_vs_eager") is not None:
                checks.append((f"{name}: >= 5x eager", f"{r['speedup_vs_eager']:.2f}x", r["speedup_vs_eager"] >= 5))
            if r.get("speedup_vs_compile") is not None:
                checks.append(
                    (
                        f"{name}: >= 1.5x torch.compile",
                        f"{r['speedup_vs_compile']:.2f}x",
                        r["speedup_vs_compile"] >= 1.5,
                    )
                )
            checks.append(
                (
                    f"{name}: extra memory <= 1 grad buffer",
                    f"{r['peak_extra_grad_bufs']:.2f}",
                    r["peak_extra_grad_bufs"] <= 1.05,
                )
            )
    if sampler := results.get("sampler"):
        for r in (r for r in _ok(sampler["results"]) if "replay_vs_n_forwards" in r):
            checks.append(
                (
                    f"sampler batch {r['batch']} {r['variant']}: replay <= 1.05 x N graphed forwards",
                    f"{r['replay_vs_n_forwards']:.3f}",
                    r["replay_vs_n_forwards"] <= 1.05,
                )
            )
    if train := results.get("train_step"):
        for r in (
            r for r in _ok(train["results"]) if r.get("speedup_vs_official") and r["variant"] != "official_eager"
        ):
            checks.append(
                (
                    f"train step batch {r['batch']} {r['variant']}: >= 3x official (aim 4x)",
                    f"{r['speedup_vs_official']:.2f}x",
                    r["speedup_vs_official"] >= 3,
                )
            )
    return [(name, value, "met" if ok else "missed") for name, value, ok in checks]


def headline_rows(results: dict[str, dict | None]) -> list[list[str]]:
    """One row per headline comparison (the README's table): the loss at its largest size per dtype (eager
    against native), the sampler at its largest batch and the training step at each batch (baseline against
    the fastest of ours), all medians of the same run."""
    rows = []
    if loss := results.get("loss"):
        ok = _loss_rows(loss)
        for dtype in dict.fromkeys(r["dtype"] for r in ok):
            largest = max(r["numel"] for r in ok if r["dtype"] == dtype)
            case = {r["backend"]: r for r in ok if r["dtype"] == dtype and r["numel"] == largest}
            if "eager" in case and "native" in case:
                e, n = case["eager"], case["native"]
                rows.append(
                    [
                        "loss fwd+bwd",
                        f"{'x'.join(map(str, n['size']))} {dtype}",
                        f"eager {e['median_ms']:.3f} ms",
                        f"native {n['median_ms']:.3f} ms ({n['pct_copy_bw']:.0f} % of copy BW)",
                        f"{n['speedup_vs_eager']:.1f}x",
                    ]
                )
    if sampler := results.get("sampler"):
        ok = _ok(sampler["results"])
        if ok:
            batch = max(r["batch"] for r in ok)
            rows += _versus_baseline(
                "rollout sampler",
                ok,
                batch,
                "eager_fp32_loop",
                "eager fp32 loop",
                lambda best, batch=batch: f"batch {batch}, {best['steps']} Euler steps",
            )
    if train := results.get("train_step"):
        ok = _ok(train["results"])
        for batch in sorted({r["batch"] for r in ok}):
            rows += _versus_baseline(
                "training step",
                ok,
                batch,
                "official_eager",
                "official eager",
                lambda best, batch=batch: f"batch {batch}, {best['sampler_steps']}-step rollout",
            )
    return rows


def _versus_baseline(
    benchmark: str, rows: list[dict], batch: int, baseline: str, baseline_label: str, case: Callable[[dict], str]
) -> list[list[str]]:
    """One headline row at ``batch``: the ``baseline`` variant against the fastest of orw_fast's ("ours*")
    variants (none when either is missing)."""
    base = next((r for r in rows if r["batch"] == batch and r["variant"] == baseline), None)
    ours = [r for r in rows if r["batch"] == batch and r["variant"].startswith("ours")]
    if base is None or not ours:
        return []
    best = min(ours, key=lambda r: r["median_ms"])
    return [
        [
            benchmark,
            case(best),
            f"{baseline_label} {base['samples_per_s']:.1f} samples/s",
            f"{best['variant']} {best['samples_per_s']:.1f} samples/s",
            f"{base['median_ms'] / best['median_ms']:.2f}x",
        ]
    ]


def summary_text(title: str, header_lines: list[str], stages: list[dict], checks, results) -> str:
    rows = [[r["stage"], r["status"], f"{r['seconds']:.0f}", r["detail"].replace("|", "/")] for r in stages]
    lines = [
        f"# {title}",
        "",
        *header_lines,
        "",
        common.markdown_table(["stage", "status", "seconds", "headline"], rows),
    ]
    if headlines := headline_rows(results):
        lines += [
            "",
            "## Headline",
            "",
            common.markdown_table(["benchmark", "case", "baseline", "orw_fast", "speedup"], headlines),
        ]
    if checks:
        lines += ["", "## Targets (issue 4)", "", common.markdown_table(["target", "measured", "result"], checks)]
    return "\n".join(lines) + "\n"


def write_summary(run: Run, results: list[StageResult], stages: list[str], started: str) -> Path:
    """run_<date>_<commit>[_quick]_<stages>.{md,json}: this invocation's stages and, on GPU, the targets."""
    records = [asdict(r) for r in results]
    found = {name: run_results(run, name) for name in RESULT_NAMES}
    checks = target_checks(found) if run.device.type == "cuda" else []
    text = summary_text(
        f"Benchmark run: {common.device_name(run.device)}",
        [
            f"- started (UTC) {started}, commit {run.commit}, torch {torch.__version__}, triton "
            f"{common.package_version('triton')}, CUDA {torch.version.cuda}, python {sys.version.split()[0]}",
            f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`; logs in logs/",
        ],
        records,
        checks,
        found,
    )
    stem = f"run_{run.date}_{run.commit}{run.suffix}_{'-'.join(stages)}"
    path = common.write_text_atomic(run.folder / f"{stem}.md", text)
    common.write_text_atomic(
        run.folder / f"{stem}.json",
        json.dumps(
            {
                "started_utc": started,
                "commit": run.commit,
                "device": common.device_name(run.device),
                "stages": records,
                "targets": checks,
            },
            indent=2,
        )
        + "\n",
    )
    run.written.update({path, run.folder / f"{stem}.json"})
    print("\n" + text)
    return path


def write_report(folder: Path, quick: bool = False) -> Path:
    """summary_<date>_<commits>.md of a results folder filled by several runs (a GPU run in parts, say): the
    newest record of each stage from the run_*.json files, headlines and targets from the newest results."""
    records = {}
    runs = [json.loads(p.read_text()) | {"_path": p} for p in folder.glob("run_*.json")]
    for data in sorted(runs, key=lambda d: d["started_utc"]):
        if ("_quick" in data["_path"].stem) == quick:
            records.update({r["stage"]: r for r in data["stages"]})
    results = {name: newest_results(folder, name, quick) for name in RESULT_NAMES}
    for stage, record in records.items():
        if stage in RESULT_NAMES:
            record["detail"] = headline(stage, results[stage])
    metas = [d["metadata"] for d in results.values() if d]
    commits = sorted({m["git_commit"] for m in metas})
    device = next((m["device_name"] for m in metas if "device_name" in m), folder.name)
    checks = target_checks(results) if any(m.get("device") == "cuda" for m in metas) else []
    text = summary_text(
        f"Benchmark results: {device}",
        [
            f"- {folder}: the newest record of each stage (run_*.json) and the newest results of each benchmark; "
            f"commit(s) {', '.join(commits) or 'unknown'}"
        ],
        [records[s] for s in STAGES if s in records],
        checks,
        results,
    )
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    name = f"summary_{date}_{'+'.join(commits) or 'unknown'}{'_quick' * quick}.md"
    path = common.write_text_atomic(folder / name, text)
    print(text + f"\nwrote {path}")
    return path


# ---------------------------------------------------------------------------------------------
# Script


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add(
        "--device",
        type=common.parse_device,
        default=common.default_device(),
        help="cpu or cuda[:N] (default: cuda when available, else cpu)",
    )
    add(
        "--stages",
        type=common.parse_list(STAGES),
        help=f"comma-separated subset of {','.join(STAGES)} "
        "(default: all on cuda; hardware,loss,sampler,train_step,t2i on cpu)",
    )
    add("--skip", type=common.parse_list(STAGES), default=[], help="stages to leave out")
    add("--out", type=Path, default=common.RESULTS_DIR, help="results root (default benchmarks/results)")
    add("--archive", type=Path, help="also pack this run's files into this .tar.gz, refreshed after every stage")
    add("--quick", action="store_true", help="benchmarks at toy sizes (smoke run)")
    add("--timeout-scale", type=float, default=1.0, help="multiplies every benchmark stage's time limit")
    add(
        "--plan",
        choices=tuple(PLANS),
        help="a named plan of stages, each with its own arguments and time limit "
        "(proof: build, GPU tests, copy bandwidth, loss at 16M and 64M elements, training step, SD3.5-medium LoRA "
        "step; what bash benchmarks/run_gpu.sh --quick runs)",
    )
    add(
        "--dry-run",
        action="store_true",
        help="start every stage without measuring or writing anything: the "
        "benchmarks check their arguments and list their cases, the tests are collected, the build and other CUDA "
        "stages skip with a line saying why (checks a GPU plan on the CPU)",
    )
    add(
        "--report",
        type=Path,
        metavar="FOLDER",
        help="run nothing: sum up a results folder filled by several runs "
        "(e.g. benchmarks/results/<gpu>/ after a GPU run in parts) into summary_<date>_<commit>.md",
    )
    args = parser.parse_args(argv)
    if args.report is not None and not args.report.is_dir():
        parser.error(f"--report {args.report}: no such folder")
    if args.plan and args.stages:
        parser.error("give --plan or --stages, not both")
    args.out = args.out.resolve()
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.report is not None:
        write_report(args.report, args.quick)
        return 0
    device = args.device
    stages = [
        s for s in (args.stages or list(PLANS.get(args.plan, ())) or DEFAULT_STAGES[device.type]) if s not in args.skip
    ]
    if device.type != "cuda" and "build" in stages and not args.dry_run:
        print("note: the build stage is for CUDA devices (the CPU extension is built by pip install -e .); skipped")
        stages.remove("build")
    needs_kernel = {"tests", "loss", "sampler", "train_step"} & set(stages)
    if (
        device.type == "cuda"
        and needs_kernel
        and "build" not in stages + args.skip
        and not args.dry_run
        and not _has_cuda_kernel()
    ):
        print("note: orw_fast._C has no CUDA kernel here yet: the build stage runs first")
        stages.insert(0, "build")
    run = Run(args, device)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print(
        f"orw_fast benchmark run on {common.device_name(device)} ({run.slug}), commit {run.commit}: "
        f"{', '.join(stages)} -> {run.folder}",
        flush=True,
    )
    results = []
    for i, stage in enumerate(stages, 1):
        print(f"[{i}/{len(stages)}] {stage} ...", end=" ", flush=True)
        result = StageResult(stage, "failed")
        before, start = run.snapshot(), time.perf_counter()
        try:
            STAGE_FUNCTIONS[stage](run, result)
        except Exception as err:  # a broken stage must not stop the run
            result.status, result.detail = "failed", common.error_status(err)
        result.seconds = time.perf_counter() - start
        after = run.snapshot()
        new = [p for p, mtime in after.items() if before.get(p) != mtime]
        run.written.update(new)
        result.files = sorted(str(p.relative_to(run.folder)) for p in new)
        results.append(result)
        print(f"{result.status} ({result.seconds:.0f} s) {result.detail}", flush=True)
        run.archive()
    if args.dry_run:
        rows = [[r.stage, r.status, r.detail, " && ".join(r.commands)] for r in results]
        print("\n" + common.markdown_table(["stage", "status", "detail", "command"], rows))
        return 0 if all(r.status in ("ok", "skipped") for r in results) else 1
    write_summary(run, results, stages, started)
    run.archive()
    if args.archive:
        print(f"archive: {args.archive}")
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
