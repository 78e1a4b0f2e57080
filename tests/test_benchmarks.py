"""The benchmark scripts at toy sizes on the CPU: each runs, writes well-formed JSON / CSV / Markdown / PNG
results and reports failures per case; the driver runs a stage and packs its files; the nvcc report's
parsers read real ptxas / SASS / PTX text; the official-code baseline computes what it claims. Timings are
not checked."""

import csv
import json
import math
import mmap
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import (
    bench_frozen_policy,
    bench_loss,
    bench_methods,
    bench_rollout_error,
    bench_sampler,
    bench_t2i,
    bench_time_to_target,
    bench_train_step,
    common,
    hardware,
    nvcc_report,
    run_all,
)
from benchmarks.baselines.official_eager import OfficialEagerTrainer, euler_rollout

ROOT = Path(__file__).resolve().parents[1]


def result_files(out: Path, name: str) -> dict[str, Path]:
    """{suffix: path} of the one result set ``name`` wrote under out/<device-slug>/."""
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    files = {p.suffix: p for p in folder.glob(f"{name}_*_quick.*")}
    assert set(files) >= {".json", ".csv", ".md"}, sorted(p.name for p in folder.iterdir())
    return files


def check_results(out: Path, name: str, *, plot: bool, other_table_lines: int = 0) -> list[dict]:
    files = result_files(out, name)
    data = json.loads(files[".json"].read_text())
    meta, rows = data["metadata"], data["results"]
    for key in ("device_name", "date_utc", "git_commit", "torch", "hardware"):
        assert meta[key], key
    assert meta["hardware"]["copy_gbs"] > 0 and meta["hardware"]["matmul_tflops"] > 0
    with open(files[".csv"]) as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    table = [line for line in files[".md"].read_text().splitlines() if line.startswith("| ")]
    assert len(table) == len(rows) + 2 + other_table_lines and set(table[1]) <= set("|- ")
    if plot:
        assert files[".png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return rows


def test_loss_benchmark(tmp_path):
    code = bench_loss.main(
        [
            "--device",
            "cpu",
            "--quick",
            "--out",
            str(tmp_path),
            "--sizes",
            "4x1x4x4,2x3x8x8",
            "--dtypes",
            "fp32,bf16",
            "--backends",
            "eager,native",
            "--repeats",
            "2",
        ]
    )
    rows = check_results(tmp_path, "loss", plot=True)
    expected = 2 * 2 * (1 + (bench_loss.skip_reason("native", torch.device("cpu")) is None))
    assert code == 0 and len(rows) == expected
    for r in rows:
        assert r["status"] == "ok" and r["gbps"] > 0 and r["pct_copy_bw"] > 0 and r["speedup_vs_eager"] > 0
        assert r["bytes_per_step"] == 4 * r["numel"] * bench_loss.DTYPES[r["dtype"]].itemsize
        assert r["page_faults_per_call"] >= 0


def test_loss_benchmark_nft_awm(tmp_path):
    """--ops: the NFT and AWM losses, 4 reads + the grad_v write per element (on a GPU the adaptive forms' norms pass
    reads 3 more; the CPU kernel reads them from the cache), ratios within each op."""
    code = bench_loss.main(
        [
            "--device",
            "cpu",
            "--quick",
            "--out",
            str(tmp_path),
            "--sizes",
            "2x3x8x8",
            "--ops",
            "nft,nft_adaptive,awm,awm_ghuber",
            "--dtypes",
            "fp32",
            "--backends",
            "eager,native",
            "--repeats",
            "2",
        ]
    )
    rows = check_results(tmp_path, "loss", plot=True)
    native = bench_loss.skip_reason("native", torch.device("cpu"), "nft") is None
    assert code == 0 and [(r["op"], r["backend"]) for r in rows] == [
        (op, b) for op in ("nft", "nft_adaptive", "awm", "awm_ghuber") for b in ("eager", "native")[: 1 + native]
    ]
    for r in rows:
        assert r["status"] == "ok" and r["speedup_vs_eager"] > 0
        assert r["bytes_per_step"] == 5 * r["numel"] * 4
    assert all(r["speedup_vs_eager"] == 1.0 for r in rows if r["backend"] == "eager")


def test_sampler_benchmark(tmp_path):
    variants = (
        "eager_fp32_loop,torchdiffeq_euler,ours_eager_fp32,ours_eager_bf16,ours_channels_last_fp32,ours_graph_bf16"
    )
    code = bench_sampler.main(
        ["--device", "cpu", "--quick", "--out", str(tmp_path), "--batches", "2", "--steps", "2", "--variants", variants]
    )
    rows = check_results(tmp_path, "sampler", plot=True)
    meta = json.loads(result_files(tmp_path, "sampler")[".json"].read_text())["metadata"]
    assert code == 0 and meta["skipped_variants"] == {"ours_graph_bf16": "CUDA graphs need a CUDA device"}
    assert [r["variant"] for r in rows] == variants.split(",")[:-1]
    by_variant = {r["variant"]: r for r in rows}
    assert all(r["status"] == "ok" and r["samples_per_s"] > 0 for r in rows)
    # same noise, same Euler steps: the fp32 samplers agree, bf16 is close but not equal
    assert by_variant["ours_eager_fp32"]["rel_err_vs_fp32_loop"] < 1e-5
    assert by_variant["torchdiffeq_euler"]["rel_err_vs_fp32_loop"] < 1e-5
    assert by_variant["ours_channels_last_fp32"]["rel_err_vs_fp32_loop"] < 1e-5
    assert 0 < by_variant["ours_eager_bf16"]["rel_err_vs_fp32_loop"] < 0.1


def test_train_step_benchmark(tmp_path):
    code = bench_train_step.main(
        [
            "--device",
            "cpu",
            "--quick",
            "--out",
            str(tmp_path),
            "--batches",
            "2",
            "--sampler-steps",
            "2",
            "--repeats",
            "2",
            "--no-plot",
        ]
    )
    rows = check_results(tmp_path, "train_step", plot=False)
    assert code == 0 and [r["variant"] for r in rows] == ["official_eager", "ours", "ours_ot"]
    for r in rows:
        assert r["status"] == "ok" and r["samples_per_s"] > 0 and 0 < r["rollout_share"] and r["peak_extra_mb"] > 0
    assert rows[0]["speedup_vs_official"] == 1.0


def test_text_to_image_benchmark(tmp_path):
    """Every variant on the tiny SD3 model (FLUX's path is the same code, tested in test_text_to_image.py)."""
    code = bench_t2i.main(
        [
            "--device",
            "cpu",
            "--quick",
            "--out",
            str(tmp_path),
            "--models",
            "tiny-sd3",
            "--batches",
            "2",
            "--sampler-steps",
            "2",
            "--repeats",
            "2",
            "--lora-rank",
            "2",
        ]
    )
    rows = check_results(tmp_path, "t2i", plot=True)
    assert code == 0 and [r["variant"] for r in rows] == list(bench_t2i.VARIANTS)
    for r in rows:
        if r["variant"] == "rollout_graph":
            assert r["status"] == "skipped: CUDA graphs need a CUDA device"
        else:
            assert r["status"] == "ok" and r["samples_per_s"] > 0 and r["trainable_parameters"] > 0, r
    lora, full = (
        next(r["trainable_parameters"] for r in rows if r["variant"] == v) for v in ("step_lora", "step_full")
    )
    assert lora < full
    with pytest.raises(SystemExit, match="published architectures need a GPU"):
        bench_t2i.main(["--device", "cpu", "--models", "flux-dev", "--out", str(tmp_path)])


def test_hardware_script(tmp_path, capsys):
    assert hardware.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    rows = json.loads(result_files(tmp_path, "hardware")[".json"].read_text())["results"]
    assert rows[0]["quantity"] == "copy bandwidth" and rows[0]["value"] > 0
    assert "GB/s copy bandwidth" in capsys.readouterr().out


@pytest.mark.parametrize("flush", [False, True])
def test_interleaved_samples_start_after_their_own_call(flush):
    """Side by side on a warm cache, each timed sample follows one untimed call of the same function (not the
    previous function's caches); with the cache flushed before each, a sample is the one call."""
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    timings = common.time_interleaved_ms(
        fns, torch.device("cpu"), repeats=4, warmup_s=0.0, warmup_calls=1, flush_l2=flush
    )
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    timed = calls[3:]
    per_sample = 1 if flush else 2
    assert len(timed) == 4 * 3 * per_sample and all(len(t.samples_ms) == 4 for t in timings.values())
    samples = [timed[i : i + per_sample] for i in range(0, len(timed), per_sample)]
    assert all(len(set(sample)) == 1 for sample in samples)
    assert [sample[0] for sample in samples[:6]] == ["a", "b", "c", "b", "c", "a"]  # the order rotated


def test_timed_samples_count_their_page_faults():
    """On the CPU each timed sample counts its minor page faults per call: a call that maps a fresh anonymous buffer
    and writes one byte to each of its pages faults once per page, a call that maps nothing less than once."""
    pages = 64

    def touch():
        with mmap.mmap(-1, pages * mmap.PAGESIZE) as buffer:
            for page in range(pages):
                buffer[page * mmap.PAGESIZE] = 1

    timings = common.time_interleaved_ms(
        {"touch": touch, "nothing": lambda: None}, torch.device("cpu"), repeats=5, warmup_s=0.0, min_sample_s=1e-3
    )
    assert all(len(t.faults_per_call) == 5 for t in timings.values())
    assert pages <= timings["touch"].summary()["page_faults_per_call"] < 2 * pages
    assert timings["nothing"].summary()["page_faults_per_call"] < 1


@pytest.mark.parametrize(
    ("module", "argv", "message"),
    [
        (bench_sampler, ["--batches", "0"], "expected positive integers"),
        (bench_sampler, ["--variants", "eager,ours"], "choose from"),
        (bench_train_step, ["--repeats", "x"], "expected an integer"),
        (bench_loss, ["--sizes", "64x3xx"], "is not like 64x3x32x32"),
        (bench_methods, ["--methods", "orw,grpo"], "choose from"),
        (bench_methods, ["--target", "1.5"], "expected a reward target in [0, 1], got '1.5'"),
        (bench_methods, ["--points", "5"], "at most 4 sweep points"),
        (bench_methods, ["--cap-s", "x"], "expected seconds > 0, got 'x'"),
    ],
)
def test_bad_arguments_are_named(module, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        module.parse_args(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and argv[0] in err


def test_run_all_runs_a_stage_packs_its_files_and_sums_up(tmp_path, capsys):
    archive = tmp_path / "results.tar.gz"
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/run_all.py",
            "--device",
            "cpu",
            "--quick",
            "--stages",
            "hardware",
            "--out",
            str(tmp_path / "out"),
            "--archive",
            str(archive),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (folder,) = (tmp_path / "out").iterdir()
    summary = json.loads(next(folder.glob("run_*_quick_hardware.json")).read_text())
    (stage,) = summary["stages"]
    assert stage["stage"] == "hardware" and stage["status"] == "ok" and "GB/s" in stage["detail"]
    assert any(f.startswith("hardware_") and f.endswith(".json") for f in stage["files"])
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert any("/logs/hardware_" in n for n in names) and any("/run_" in n for n in names)
    assert "| hardware | ok" in proc.stdout
    # a folder filled by several runs (a GPU run in parts) is summed up by --report
    assert run_all.main(["--report", str(folder), "--quick"]) == 0
    report = next(folder.glob("summary_*_quick.md")).read_text()
    assert "| hardware | ok" in report and "GB/s" in report and report == capsys.readouterr().out.split("\nwrote ")[0]


def test_the_gpu_quick_run_starts_every_stage_in_a_dry_run_on_the_cpu(tmp_path):
    """bash benchmarks/run_gpu.sh --quick --dry-run: the GPU proof's plan, in its order, on this CPU: the build skips
    saying why, the GPU tests are collected (not none), every benchmark parses the plan's arguments and lists its
    cases; nothing is written."""
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", "benchmarks/run_gpu.sh", "--quick", "--dry-run", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    order = [proc.stdout.index(f"] {stage} ...") for stage in run_all.PLANS["proof"]]
    assert order == sorted(order) and list(run_all.PLANS["proof"])[:3] == ["build", "tests", "hardware"]
    assert "| build      | skipped | no CUDA device" in proc.stdout
    collected = re.search(r"`pytest tests -m gpu`: (\d+)/\d+ tests collected", proc.stdout)
    assert collected and int(collected.group(1)) > 0, proc.stdout
    assert "256x4x256x256 bf16 triton" in proc.stdout and "sd3.5-medium B=4 step_lora" in proc.stdout
    assert all(f"dry run of {name} on cpu" in proc.stdout for name in ("hardware", "loss", "train_step", "t2i"))
    assert not out.exists()


def test_a_dry_run_catches_a_bad_argument_in_a_plan(tmp_path, monkeypatch, capsys):
    plan = dict(run_all.PLANS["proof"], loss=(["--dtypes", "fp33"], 60))
    monkeypatch.setitem(run_all.PLANS, "proof", plan)
    code = run_all.main(
        [
            "--device",
            "cpu",
            "--plan",
            "proof",
            "--skip",
            "tests,hardware,train_step,t2i",
            "--dry-run",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    out = capsys.readouterr().out
    assert code == 1 and "| loss  | failed  | dry run (exit 2)" in out and "| build | skipped |" in out


def test_run_all_records_a_failing_stage_and_goes_on(tmp_path, monkeypatch, capsys):
    def broken(run, result):
        raise RuntimeError("no GPU here")

    def fine(run, result):
        result.status, result.detail = "ok", "fine"

    monkeypatch.setitem(run_all.STAGE_FUNCTIONS, "loss", broken)
    monkeypatch.setitem(run_all.STAGE_FUNCTIONS, "sampler", fine)
    code = run_all.main(["--device", "cpu", "--stages", "loss,sampler", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert (
        code == 1 and "| loss    | failed | " in out and "RuntimeError: no GPU here" in out and "| sampler | ok" in out
    )


# ---------------------------------------------------------------------------------------------
# nvcc report parsers (real output shapes of nvcc 13 / cuobjdump for sm_90)

MANGLED = "_ZN8orw_fast12_GLOBAL__N_111pass_kernelIfLi4ELb1ELb0ELb0EEEvPKT_"
PTXAS_LOG = f"""ptxas info    : 28 bytes gmem
ptxas info    : Compiling entry function '{MANGLED}' for 'sm_90'
ptxas info    : Function properties for {MANGLED}
    0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 35 registers, used 1 barriers, 32 bytes smem
ptxas info    : Compile time = 60.771 ms
"""
SASS = f"""\t\tFunction : {MANGLED}
        /*2260*/                   LDG.E.128.CONSTANT R8, desc[UR18][R28.64] ;      /* 0x000000121c087981 */
        /*2270*/                   LDG.E.128.CONSTANT R16, desc[UR18][R24.64] ;     /* 0x0000001218107981 */
        /*1d60*/              @!P1 LDG.E.U16.CONSTANT R29, desc[UR6][R12.64] ;       /* 0x000000060c1d9981 */
        /*02b0*/                   LDG.E.CONSTANT R4, desc[UR18][R4.64] ;            /* 0x0000001204047981 */
        /*23b0*/                   STG.E.128.STRONG.SM desc[UR18][R30.64], R8 ;      /* 0x000000081e007986 */
        /*2f30*/                   STG.E desc[UR18][R8.64], R5 ;                     /* 0x0000000508007986 */
        /*2f40*/                   STL [R1], R5 ;                                    /* 0x0000000508007986 */
"""
PTX = f""".visible .entry {MANGLED}(
\tld.global.nc.v4.f32 \t{{%f1, %f2, %f3, %f4}}, [%rd10];
\tld.global.nc.f32 \t%f5, [%rd11];
\tld.global.nc.u16 \t%rs1, [%rd12];
\tst.global.v4.f32 \t[%rd13], {{%f1, %f2, %f3, %f4}};
\tld.local.u32 \t%r1, [%rd14];
"""


def test_nvcc_report_parsers():
    res = nvcc_report.parse_ptxas(PTXAS_LOG)[MANGLED]
    assert res == {
        "stack_bytes": 0,
        "spill_store_bytes": 8,
        "spill_load_bytes": 4,
        "registers": 35,
        "barriers": 1,
        "smem_bytes": 32,
    }
    assert nvcc_report.warps_per_sm(35) == 51 and nvcc_report.warps_per_sm(32) == 64
    for parsed in (nvcc_report.parse_sass(SASS)[MANGLED], nvcc_report.parse_ptx(PTX)[MANGLED]):
        assert parsed["global_loads"][128] >= 1 and parsed["global_loads"][16] == 1 and parsed["local"] == 1
        assert parsed["global_stores"][128] == 1
    assert dict(nvcc_report.parse_sass(SASS)[MANGLED]["global_loads"]) == {128: 2, 16: 1, 32: 1}
    assert "pass_kernel<float, 4, true, false, false>" in nvcc_report.demangle([MANGLED])[MANGLED]


# ---------------------------------------------------------------------------------------------
# The official-code baseline


class Linear(torch.nn.Module):
    """v(t, x) = A x + t b on [B, 1, 2, 2] images: small, exact, with parameters to train."""

    def __init__(self):
        super().__init__()
        self.A = torch.nn.Parameter(torch.randn(4, 4) * 0.3)
        self.b = torch.nn.Parameter(torch.randn(4))

    def forward(self, t, x):
        flat = x.reshape(x.shape[0], -1)
        return (flat @ self.A.T + t[:, None] * self.b).reshape(x.shape)


def test_euler_rollout_is_the_samplers_euler():
    from orw_fast.sampling import sample

    model, x0 = Linear(), torch.randn(5, 1, 2, 2)
    torch.testing.assert_close(euler_rollout(model, x0, 7), sample(model, x0, steps=7, cuda_graph=False))


def test_baseline_keeps_each_weight_with_its_sample():
    """torchcfm's exact-OT matcher resamples x1 with replacement; the baseline's weights follow the draw."""
    trainer = OfficialEagerTrainer(Linear(), lambda x: x.mean(dim=(1, 2, 3)), image_shape=(1, 2, 2), batch_size=16)
    x1 = torch.randn(16, 1, 2, 2)
    weights = x1.sum(dim=(1, 2, 3)).exp()  # a function of each sample, so a mismatch shows
    np.random.seed(0)
    x0 = torch.randn_like(x1)
    t, xt, ut, _, w = trainer.fm.guided_sample_location_and_conditional_flow(x0, x1, y1=weights)
    drawn_x1 = xt + (1 - t)[:, None, None, None] * ut  # sigma = 0: xt = t x1 + (1 - t) x0, ut = x1 - x0
    torch.testing.assert_close(w, drawn_x1.sum(dim=(1, 2, 3)).exp(), rtol=1e-4, atol=1e-5)
    metrics = trainer.train_step()
    assert set(metrics) == {"fm_loss", "w2_loss", "total_loss", "reward", "max_reward"}


def test_the_published_baseline_leaves_the_weights_in_rollout_order(monkeypatch):
    """pair_weights=False: the loss gets the weights as the rollout made them, next to resampled x1 (the published
    code's pairing), so some weight multiplies another sample's loss."""
    trainer = OfficialEagerTrainer(
        Linear(), lambda x: x.mean(dim=(1, 2, 3)), image_shape=(1, 2, 2), batch_size=16, pair_weights=False
    )
    x1 = torch.randn(16, 1, 2, 2)
    weights = torch.arange(16, dtype=torch.float32)
    seen = {}
    original = trainer.fm.sample_location_and_conditional_flow

    def recorded(x0, x1_):
        t, xt, ut = original(x0, x1_)
        seen["x1"] = xt + (1 - t)[:, None, None, None] * ut
        return t, xt, ut

    monkeypatch.setattr(trainer.fm, "sample_location_and_conditional_flow", recorded)
    np.random.seed(0)
    loss, _ = trainer.compute_loss(x1, weights)
    assert torch.isfinite(loss)
    resampled = [int((seen["x1"][i] - x1).flatten(1).abs().sum(1).argmin()) for i in range(16)]
    assert resampled != list(range(16))  # the matcher moved x1 (with replacement) while the weights stayed


def test_time_to_target_benchmark(tmp_path):
    code = bench_time_to_target.main(
        [
            "--device",
            "cpu",
            "--quick",
            "--out",
            str(tmp_path),
            "--seeds",
            "1",
            "--variants",
            "official_paired,official_published,orw_fast,orw_fast_reuse2",
        ]
    )
    rows = check_results(
        tmp_path, "time_to_target", plot=True, other_table_lines=1 + 4 + 2
    )  # the summary table: base row, 4 variants
    assert code == 0 and [r["variant"] for r in rows] == [
        "official_paired",
        "official_published",
        "orw_fast",
        "orw_fast_reuse2",
    ]
    for r in rows:
        assert r["status"] == "ok" and r["steps"] == 3 and r["seconds"] > 0 and not r["reached"]
        assert r["rollout_ms"] > 0 and r["reward_ms"] > 0 and r["optimizer_ms"] > 0 and r["loss_backward_ms"] > 0
        assert 0 <= r["class_entropy"] <= 2.31 and r["diversity"] > 0
        assert math.isnan(r["even_entropy"]) or 0 <= r["even_entropy"] <= math.log(5) + 1e-9
    meta = json.loads(result_files(tmp_path, "time_to_target")[".json"].read_text())["metadata"]
    assert [s["variant"] for s in meta["summary"]] == [r["variant"] for r in rows]
    assert all(s["speedup"] is None for s in meta["summary"])  # none reached the target
    data = json.loads(result_files(tmp_path, "time_to_target")[".json"].read_text())
    assert run_all.summarize_time_to_target(data).startswith("official_paired: 0/1 reached")


def test_time_to_target_other_rollouts_and_protocol(tmp_path, capsys):
    """--rollouts adds orw_fast variants with other solvers; --temperature/--refresh-every name the results file."""
    argv = ["--device", "cpu", "--quick", "--out", str(tmp_path), "--seeds", "1", "--no-plot"]
    code = bench_time_to_target.main(
        [*argv, "--rollouts", "ab2/uniform/3", "--temperature", "2.5", "--refresh-every", "2"]
    )
    rows = check_results(tmp_path, "time_to_target_tau2.5_refresh2", plot=False, other_table_lines=1 + 1 + 2)
    assert code == 0 and [r["variant"] for r in rows] == ["orw_fast@ab2/uniform/3"] and rows[0]["status"] == "ok"
    meta = json.loads(result_files(tmp_path, "time_to_target_tau2.5_refresh2")[".json"].read_text())["metadata"]
    assert (meta["temperature"], meta["refresh_every"]) == (2.5, 2)
    for bad, message in (
        (["--rollouts", "ab4/uniform/3"], "expected METHOD/GRID/STEPS"),
        (["--rollouts", "ab3/uniform/3"], "ab3 needs at least 4"),
        (["--rollouts", "euler/scheduler/3"], "--rollouts: euler/scheduler/3: the digits task's model takes a pixel"),
        (["--task", "text", "--rollouts", "ab2/both_dense/3"], "the text task's model takes GRID scheduler"),
        (["--task", "text", "--variants", "official_paired"], "--variants: the text task runs orw_fast only"),
    ):
        with pytest.raises(SystemExit):
            bench_time_to_target.parse_args(bad)
        assert message in capsys.readouterr().err


def test_time_to_target_text_task(tmp_path):
    """--task text: orw_fast on the text-alignment task (a tiny pipeline), its default rollout against others on the
    scheduler's sigmas; the ratio column is to the pipeline's 28-step Euler."""
    argv = ["--device", "cpu", "--quick", "--out", str(tmp_path), "--seeds", "1", "--no-plot", "--task", "text"]
    code = bench_time_to_target.main(
        [*argv, "--variants", "orw_fast", "--rollouts", "euler/scheduler/28,ab2/scheduler/3"]
    )
    rows = check_results(tmp_path, "time_to_target_text", plot=False, other_table_lines=1 + 3 + 2)
    assert code == 0 and [r["variant"] for r in rows] == [
        "orw_fast",
        "orw_fast@euler/scheduler/28",
        "orw_fast@ab2/scheduler/3",
    ]
    for r in rows:
        assert r["status"] == "ok" and r["steps"] == 3 and not r["reached"] and r["rollout_ms"] > 0
        assert 0 <= r["alignment"] <= 1 and r["prompt_diversity"] > 0 and r["w2_to_reference"] >= 0
    meta = json.loads(result_files(tmp_path, "time_to_target_text")[".json"].read_text())["metadata"]
    assert meta["task"] == "text" and meta["baseline"] == "orw_fast@euler/scheduler/28"
    assert (meta["target"], meta["refresh_every"], meta["method"]["weighting"]) == (0.7, 10, "softmax")


def test_frozen_policy_benchmark(tmp_path):
    variants = "no_grad,inference_mode,channels_last,jit_freeze"
    code = bench_frozen_policy.main(["--quick", "--out", str(tmp_path), "--batch", "8", "--variants", variants])
    rows = check_results(tmp_path, "frozen_policy", plot=True, other_table_lines=12 + 2)  # the profile's table
    assert code == 0 and [r["variant"] for r in rows] == variants.split(",")
    for r in rows:
        assert r["status"] == "ok" and r["median_ms"] > 0 and r["max_abs_deviation"] < 1e-4
    assert [r["follows_refresh"] for r in rows] == [True, True, True, False]  # jit.freeze folds the weights in


def test_rollout_error_benchmark(tmp_path):
    code = bench_rollout_error.main(["--device", "cpu", "--quick", "--out", str(tmp_path), "--calls", "8,16"])
    rows = check_results(tmp_path, "rollout_error", plot=True)
    assert code == 0 and all(r["status"] == "ok" for r in rows)
    by = {(r["method"], r["grid"], r["steps"]): r for r in rows}
    assert set(by) >= {("euler", "uniform", 100), ("heun", "data_dense", 8), ("midpoint", "uniform", 4)}
    # the errors shrink with the work, and second order beats Euler at the same number of calls
    assert by["euler", "uniform", 100]["rms_error"] < by["euler", "uniform", 16]["rms_error"]
    assert by["heun", "uniform", 8]["rms_error"] < by["euler", "uniform", 16]["rms_error"]
    data = json.loads(result_files(tmp_path, "rollout_error")[".json"].read_text())
    chosen = data["metadata"]["chosen"]
    base = by["euler", "uniform", 100]
    assert chosen["model_calls"] <= 100
    picked = by[chosen["method"], chosen["grid"], chosen["steps"]]
    assert picked["rms_error"] <= base["rms_error"] and picked["w2"] <= base["w2"]
    assert run_all.summarize_rollout_error(data) == (
        f"cheapest as accurate as 100 Euler steps: {chosen['method']}, {chosen['grid']} grid, {chosen['steps']} steps "
        f"({chosen['model_calls']} model calls)"
    )


def test_methods_benchmark(tmp_path, monkeypatch):
    """Both tasks at toy size with every method, one sweep point and 2 seeds for the best points (target 0: every run
    reaches it once its window is full, so the best-point and final phases run too): one row per (method, run), the
    official code skipped on the prompted task, a failing method recorded while the others go on."""
    make_runner = bench_methods.make_runner

    def failing_nft(task, method, *args):
        if method == "nft":
            raise RuntimeError("boom")
        return make_runner(task, method, *args)

    monkeypatch.setattr(bench_methods, "make_runner", failing_nft)
    argv = ["--device", "cpu", "--quick", "--out", str(tmp_path), "--points", "1", "--seeds", "2"]
    code = bench_methods.main([*argv, "--target", "0", "--text-target", "0"])
    assert code == 1  # nft failed
    files = result_files(tmp_path, "methods")
    data = json.loads(files[".json"].read_text())
    meta, rows = data["metadata"], data["results"]
    assert meta["git_commit"] and meta["date_utc"] and meta["hardware"]["copy_gbs"] > 0
    with open(files[".csv"]) as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert files[".png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    keys = [(r["task"], r["method"], r["phase"], r["seed"]) for r in rows]
    assert len(keys) == len(set(keys))
    for task in ("digits", "text"):
        ok = {"orw_cfm_w2", "awm", "flow_grpo", "flow_grpo_fast"}
        mine = [r for r in rows if r["task"] == task]
        assert {r["method"] for r in mine} == set(bench_methods.METHODS)
        (nft,) = [r for r in mine if r["method"] == "nft"]
        assert nft["status"] == "failed: RuntimeError: boom"
        official = [r for r in mine if r["method"] == "official_orw"]
        if task == "text":
            assert len(official) == 1 and official[0]["status"].startswith("skipped: the official")
            base = meta["tasks"]["text"]["base"]  # every method moved its policy (the same noise gives the same
            # samples otherwise: Flow-GRPO in groups of one sample, advantages all 0, once trained nothing)
            moved = [r for r in mine if r["status"] == "ok" and r["digits_fd"] != base["digits_fd"]]
            assert {r["method"] for r in moved} == ok
        else:
            ok.add("official_orw")
        best = meta["tasks"][task]["best_points"]
        assert set(best) == ok  # every method that ran reached the target at its one point
        for method in ok:
            runs = [r for r in mine if r["method"] == method]
            assert [(r["phase"], r["seed"]) for r in runs] == [("sweep", 0), ("final", 1)]
            for r in runs:
                assert r["status"] == "ok" and r["reached"] and r["steps"] == 2, r
                assert r["forward_calls"] > 0 and r["forward_samples"] >= r["forward_calls"]
                assert 0 < r["backward_calls"] < r["forward_calls"] and r["peak_memory_mb"] >= 0
                assert r["seconds"] > 0 and r["w2_to_reference"] >= 0 and r["digits_fd"] >= 0
                assert r["run_id"] in meta["curves"] and len(meta["curves"][r["run_id"]]["reward"]) == 2
                assert r["end_steps"] == 2 and r["end_eval_reward"] == r["eval_reward"]  # reached on the last step
        if task == "digits":  # 2 steps of: rollout calls (2 Euler; AB3, 4 steps and its Heun start: 5; 2 SDE) + the
            # loss's policy and frozen calls
            calls = {
                (r["method"], r["seed"]): (r["forward_calls"], r["backward_calls"]) for r in mine if r["status"] == "ok"
            }
            assert calls["official_orw", 0] == (2 * (2 + 2), 2)  # + policy, reference
            assert calls["orw_cfm_w2", 0] == (2 * (5 + 2), 2)
            assert calls["awm", 0] == (2 * (5 + 3), 2)  # + policy, reference, EMA
            assert calls["flow_grpo", 0] == (2 * (2 + 2 * 2), 2 * 2)  # 2 minibatches x 1 trained step x (policy, ref)
        diversity = bench_methods.DIVERSITY[task]
        assert all(r[diversity] >= 0 for r in mine if r["status"] == "ok")
        report = files[".md"].read_text()
        assert f"## {task}: target 0.0" in report and "Quality-bounded reward front" in report
    # both tables per task: a row for each method with a best point / with a run
    lines = files[".md"].read_text().splitlines()
    assert sum(line.startswith("| flow_grpo_fast ") for line in lines) == 4
    assert run_all.summarize_methods(data).startswith("digits: official_orw ")
    assert run_all.summarize_methods(data).endswith("; 2 runs failed")


def _row(method, point, seed, seconds, entropy, *, reached=True, fd=10.0, background=5.0, reward=0.9):
    return {
        "task": "digits",
        "method": method,
        "point": point,
        "seed": seed,
        "status": "ok",
        "reached": reached,
        "seconds": seconds,
        "class_entropy": entropy,
        "digits_fd": fd,
        "background": background,
        "eval_reward": reward,
    }


def test_methods_best_points_and_quality_front():
    """The selection logic on hand-made rows: the diversity floor is the lowest of the methods' most diverse reaching
    points; each method's best point is its fastest point that always reached with median diversity at the floor or
    above; the front keeps the highest reward within the quality bounds."""
    rows = [
        # a: point 0 fast but collapsed, point 1 slower and diverse, point 2 diverse but one seed missed
        _row("a", 0, 0, 10.0, 1.0),
        _row("a", 1, 0, 30.0, 2.0),
        _row("a", 1, 1, 50.0, 1.5),  # median 40 s, median entropy 1.75
        _row("a", 2, 0, 5.0, 2.0),
        _row("a", 2, 1, 5.0, 2.0, reached=False),
        # b: its most diverse reaching point has 1.5: the floor
        _row("b", 0, 0, 20.0, 1.5),
        _row("b", 1, 0, 15.0, 1.2),
        # c: never reaches: no say in the floor, no best point
        _row("c", 0, 0, 99.0, 2.2, reached=False),
        {"task": "digits", "method": "d", "point": 0, "seed": 0, "status": "failed: RuntimeError: x"},
        _row("a", 0, 0, 1.0, 2.3) | {"task": "text"},  # another task's row
    ]
    summaries = bench_methods.point_summaries(rows, "digits", "class_entropy")
    by = {(p["method"], p["point"]): p for p in summaries}
    assert by["a", 1] == {"method": "a", "point": 1, "runs": 2, "reached": 2, "seconds": 40.0, "diversity": 1.75}
    assert by["a", 2]["reached"] == 1 and ("d", 0) not in by
    floor = bench_methods.diversity_floor(summaries)
    assert floor == 1.5
    assert bench_methods.best_points(summaries, floor) == {"a": 1, "b": 0}
    assert bench_methods.best_points(summaries, 1.0) == {"a": 0, "b": 1}  # a lower floor lets the fast points in
    assert bench_methods.best_points(summaries, None) == {}
    assert bench_methods.diversity_floor([by["c", 0]]) is None
    # equal times: the lower point (the defaults) wins
    tie = bench_methods.point_summaries(
        [_row("e", 1, 0, 7.0, 1.0), _row("e", 0, 0, 7.0, 1.0)], "digits", "class_entropy"
    )
    assert bench_methods.best_points(tie, 1.0) == {"e": 0}

    base = {"digits_fd": 10.0, "background": 4.0, "prompt_diversity": 2.0}
    front_rows = [
        _row("a", 0, 0, 10.0, 1.0, fd=31.0, reward=0.99),  # FD over 3x the base's: out
        _row("a", 1, 0, 10.0, 1.0, fd=30.0, background=8.0, reward=0.9),  # on the bounds: in
        _row("a", 2, 0, 5.0, 1.0, background=8.1, reward=0.95),  # background over 2x: out
        _row("a", 3, 0, 8.0, 1.0, reward=0.9),  # same reward, sooner: the one kept
        _row("b", 0, 0, 10.0, 1.0, fd=100.0, reward=1.0),  # b has runs, none within the bounds
    ]
    front = bench_methods.quality_front(front_rows, base, "digits")
    assert (front["a"]["point"], front["a"]["at"]) == (3, "target") and front["b"] is None
    # a run that went on to its cap after the target: its evaluation there counts too, if within the bounds
    later = {"end_seconds": 25.0, "end_eval_reward": 0.97, "end_digits_fd": 20.0, "end_background": 6.0}
    front = bench_methods.quality_front([*front_rows, _row("a", 4, 1, 9.0, 1.0, reward=0.5) | later], base, "digits")
    assert (front["a"]["point"], front["a"]["at"], front["a"]["eval_reward"], front["a"]["seconds"]) == (
        4,
        "cap",
        0.97,
        25,
    )
    greyed = later | {"end_background": 9.0}
    front = bench_methods.quality_front([*front_rows, _row("a", 4, 1, 9.0, 1.0, reward=0.5) | greyed], base, "digits")
    assert (front["a"]["point"], front["a"]["at"]) == (3, "target")
    text = {"task": "text", "status": "ok", "method": "t", "seconds": 1.0, "reached": False}
    inside = text | {"point": 0, "prompt_diversity": 1.8, "background": 4.4, "eval_reward": 0.6}
    low_diversity = text | {"point": 1, "prompt_diversity": 1.79, "background": 4.0, "eval_reward": 0.9}
    (kept,) = bench_methods.quality_front([inside, low_diversity], base, "text").values()
    assert (kept["point"], kept["at"], kept["eval_reward"]) == (0, "cap", 0.6)


def test_methods_dry_run_lists_the_runs(capsys):
    code = bench_methods.main(["--device", "cpu", "--dry-run", "--tasks", "digits", "--methods", "nft,flow_grpo"])
    out = capsys.readouterr().out
    assert code == 0 and "dry run of methods on cpu: 10 case(s)" in out
    assert "digits nft point 3 seed 0" in out and "digits flow_grpo best point seeds 0-2" in out
