"""The device's own ceilings, measured in the same run as each benchmark: copy bandwidth (a large
device-to-device copy, bytes read + bytes written over the median time) and matmul rate (bf16 on CUDA,
fp32 on the CPU, random operands), plus the device's properties and, on NVIDIA GPUs, nvidia-smi's
read-only view of clocks, power and temperature (the card is measured as it is found; nothing is set).

Every benchmark calls :func:`measure` once and reports its bandwidth as a % of ``copy_gbs``. As a script it
writes benchmarks/results/<device>/hardware_<date>_<commit>.{json,csv,md}:

    python benchmarks/hardware.py [--device cuda] [--quick]
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and this checkout's orw_fast importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks import common

# bytes copied (each of src and dst), matmul side and dtype; much larger than any L2 / last-level cache
COPY_BYTES = {"cuda": 1 << 30, "cpu": 256 << 20}
MATMUL = {"cuda": (8192, torch.bfloat16), "cpu": (1024, torch.float32)}
QUICK_COPY_BYTES, QUICK_MATMUL_N = 16 << 20, 256
SMI_FIELDS = (
    "name",
    "driver_version",
    "pstate",
    "clocks.sm",
    "clocks.mem",
    "clocks.max.sm",
    "clocks.max.mem",
    "power.draw",
    "power.limit",
    "temperature.gpu",
    "utilization.gpu",
    "memory.used",
    "memory.total",
)


def nvidia_smi() -> dict | None:
    """nvidia-smi's current clocks, power, temperature... (read-only query), or None without it."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as err:
        return {"error": str(err)}
    first = out.strip().splitlines()[0] if out.strip() else ""
    return dict(zip(SMI_FIELDS, (v.strip() for v in first.split(","))))


def device_properties(device: torch.device) -> dict:
    if device.type != "cuda":
        return {
            "name": common.device_name(device),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        }
    p = torch.cuda.get_device_properties(device)
    return {
        "name": p.name,
        "capability": f"{p.major}.{p.minor}",
        "multiprocessors": p.multi_processor_count,
        "l2_mb": getattr(p, "L2_cache_size", 0) / 2**20,
        "memory_gib": p.total_memory / 2**30,
    }


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 20) -> float:
    """GB/s of dst.copy_(src) over ``nbytes``, counting the bytes read and written (2 x nbytes)."""
    if device.type == "cuda":
        src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device)
    else:
        src = torch.full((nbytes,), 7, dtype=torch.uint8)  # written once, so every page is really there
    dst = torch.empty_like(src)
    timing = common.time_ms(lambda: dst.copy_(src), device, repeats=repeats, warmup_s=0.2)
    return 2 * nbytes / (timing.median * 1e-3) / 1e9


def matmul_rate(device: torch.device, n: int, dtype: torch.dtype, repeats: int = 10) -> float:
    """TFLOP/s of an n x n x n matmul (2 n^3 flops) on random operands."""
    gen = torch.Generator(device=device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=gen) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    timing = common.time_ms(lambda: torch.mm(a, b, out=out), device, repeats=repeats, warmup_s=0.2)
    return 2 * n**3 / (timing.median * 1e-3) / 1e12


@functools.cache
def measure(device: torch.device, quick: bool = False) -> dict:
    """The device's copy bandwidth (GB/s) and matmul rate (TFLOP/s), measured now (once per process)."""
    kind = device.type
    nbytes = QUICK_COPY_BYTES if quick else COPY_BYTES[kind]
    n, dtype = MATMUL[kind]
    n = QUICK_MATMUL_N if quick else n
    smi_before = nvidia_smi() if kind == "cuda" else None
    copy_gbs = copy_bandwidth(device, nbytes)
    common.free_memory(device)
    tflops = matmul_rate(device, n, dtype)
    common.free_memory(device)
    return {
        "device_properties": device_properties(device),
        "copy_gbs": copy_gbs,
        "copy_method": f"median dst.copy_(src) of {nbytes / 2**20:.0f} MiB, 2 x bytes / time",
        "matmul_tflops": tflops,
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "matmul_method": f"median torch.mm {n}x{n}x{n}, random operands",
        "nvidia_smi_before": smi_before,
        "nvidia_smi_after": nvidia_smi() if kind == "cuda" else None,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser, plot=False)
    args = parser.parse_args(argv)
    if args.dry_run:
        return common.dry_run("hardware", args.device, [("copy bandwidth",), ("matmul rate",)])
    hw = measure(args.device, args.quick)
    meta = common.run_metadata(args.device, "device ceilings", hardware=hw)
    common.finish_metadata(meta)
    rows = [
        {"quantity": "copy bandwidth", "value": hw["copy_gbs"], "unit": "GB/s", "method": hw["copy_method"]},
        {
            "quantity": f"{hw['matmul_dtype']} matmul",
            "value": hw["matmul_tflops"],
            "unit": "TFLOP/s",
            "method": hw["matmul_method"],
        },
    ]
    rows += [
        {"quantity": k, "value": v, "unit": "", "method": "device properties"}
        for k, v in hw["device_properties"].items()
    ]
    for when in ("before", "after"):
        for k, v in (hw[f"nvidia_smi_{when}"] or {}).items():
            rows.append({"quantity": f"nvidia-smi {k}", "value": v, "unit": "", "method": f"{when} the measurements"})
    table = common.markdown_table(
        ["quantity", "value", "unit", "method"],
        [
            [
                r["quantity"],
                f"{r['value']:.4g}" if isinstance(r["value"], float) else r["value"],
                r["unit"],
                r["method"],
            ]
            for r in rows
        ],
    )
    report = f"# Device ceilings: {meta['device_name']}\n\n" + "\n".join(common.metadata_lines(meta)) + f"\n\n{table}\n"
    print(report)
    paths = common.write_results(args.out, "hardware", meta, rows, report, quick=args.quick)
    print("wrote " + ", ".join(map(str, paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
