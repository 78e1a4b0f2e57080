"""Compiler resource report of the CUDA kernels (no GPU needed): for every kernel of csrc/*.cu, built
for one architecture with the extension's flags, the registers, stack frame, spills, shared memory and
barriers from ``nvcc -Xptxas -v``, the warps per SM its registers allow, and the width of its global loads
and stores read off the SASS (``cuobjdump -sass``; Triton's bundled cuobjdump is used when the CUDA
toolkit has none) or, without any cuobjdump, off the PTX. 128-bit global loads are the 16-byte vector
loads the memory-bound kernels are written for; local loads/stores (LDL/STL) would be spills or arrays
in local memory.

Writes benchmarks/results/<folder>/nvcc_<date>_<commit>.{json,csv,md} and the raw ptxas log:

    python benchmarks/nvcc_report.py                          # sm_90 -> benchmarks/results/nvcc-sm90/
    python benchmarks/nvcc_report.py --arch sm_90a --folder my-gpu
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` and this checkout's orw_fast importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common

SOURCES = sorted((common.REPO_ROOT / "csrc").glob("*.cu"))
REGS_PER_SM, MAX_WARPS_PER_SM, REG_ALLOC_UNIT = 65536, 64, 256  # sm_80 .. sm_90: per-warp allocation in 256s
# kernels written for 16-byte vector loads: the pass kernels with VEC = 16 / sizeof(T) elements per access
EXPECT_128BIT = r"pass_kernel<\w+, (2|4|8),"
EXPECT_128BIT_MANGLED = r"pass_kernelI(?:f|d|N3c10\d+(?:BFloat16|Half)E)Li[248]E"  # the same, without a demangler


def expects_128bit(row: dict) -> bool:
    return bool(re.search(EXPECT_128BIT, row["kernel"]) or re.search(EXPECT_128BIT_MANGLED, row["mangled"]))


# ---------------------------------------------------------------------------------------------
# Tools


def _cuda_homes() -> list[str]:
    from torch.utils import cpp_extension

    return [h for h in (os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME, "/usr/local/cuda") if h]


def find_tool(name: str) -> str | None:
    """``name`` from CUDA_HOME/bin, torch's CUDA_HOME, PATH, /usr/local/cuda/bin or (cuobjdump, nvdisasm) Triton's."""
    candidates = [str(Path(h, "bin", name)) for h in _cuda_homes()] + [shutil.which(name)]
    if name in ("cuobjdump", "nvdisasm"):
        try:
            import triton

            candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name))
        except ImportError:
            pass
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def nvcc_flags(arch: str, std: str) -> list[str]:
    """The extension's nvcc flags (setup.py: -O3 -lineinfo, torch's COMMON_NVCC_FLAGS) for one architecture."""
    from torch.utils import cpp_extension

    number = arch.removeprefix("sm_")
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    flags = [
        f"-std={std}",
        *cpp_extension.COMMON_NVCC_FLAGS,
        "-O3",
        "-lineinfo",
        f"-gencode=arch=compute_{number},code={arch}",
        *(f"-I{p}" for p in includes),
    ]
    if not any(Path(p, "c10", "cuda", "impl", "cuda_cmake_macros.h").exists() for p in includes):
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")  # a CPU-only torch has no CUDA config header
    return flags


def compile_object(nvcc: str, source: Path, output: Path, arch: str) -> tuple[list[str], str]:
    """Compiles ``source`` with ``-Xptxas -v``; returns (command, ptxas log). C++20 first (torch >= 2.10's
    standard), C++17 for older torch."""
    errors = []
    for std in ("c++20", "c++17"):
        cmd = [nvcc, "-c", str(source), "-o", str(output), *nvcc_flags(arch, std), "-Xptxas", "-v"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
        if proc.returncode == 0:
            return cmd, proc.stderr + proc.stdout
        errors.append(f"-std={std}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    raise RuntimeError(f"nvcc failed on {source.name}:\n" + "\n".join(errors))


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled -> readable (c++filt when present), without namespaces and argument lists."""
    exe = shutil.which("c++filt") or shutil.which("cu++filt")
    readable = names
    if exe and names:
        readable = subprocess.run([exe], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    out = {}
    for name, text in zip(names, readable):
        text = re.sub(r"\w+::\(anonymous namespace\)::|\(anonymous namespace\)::|orw_fast::", "", text)
        text = re.sub(r"^void ", "", text)
        depth, cut = 0, len(text)
        for i, ch in enumerate(text):  # drop the argument list: the first "(" outside template brackets
            depth += ch == "<"
            depth -= ch == ">"
            if ch == "(" and depth == 0:
                cut = i
                break
        out[name] = text[:cut].replace("c10::", "")
    return out


# ---------------------------------------------------------------------------------------------
# Parsing


def parse_ptxas(log: str) -> dict[str, dict]:
    """{mangled kernel: {registers, stack_bytes, spill_store_bytes, spill_load_bytes, smem_bytes, barriers}}."""
    kernels, name = {}, None
    for line in log.splitlines():
        if m := re.search(r"Compiling entry function '([^']+)'", line):
            name = m.group(1)
            kernels[name] = {}
        elif m := re.search(r"Function properties for (\S+)", line):
            name = m.group(1)
        elif name in kernels and (
            m := re.search(
                r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes "
                r"spill loads",
                line,
            )
        ):
            kernels[name].update(
                stack_bytes=int(m.group(1)), spill_store_bytes=int(m.group(2)), spill_load_bytes=int(m.group(3))
            )
        elif name in kernels and (m := re.search(r"Used (\d+) registers", line)):
            kernels[name]["registers"] = int(m.group(1))
            b = re.search(r"used (\d+) barriers", line)
            s = re.search(r"(\d+) bytes smem", line)
            kernels[name].update(barriers=int(b.group(1)) if b else 0, smem_bytes=int(s.group(1)) if s else 0)
    return kernels


def warps_per_sm(registers: int) -> int:
    """Resident warps per SM that the register file allows (sm_80 to sm_90)."""
    per_warp = -(-registers * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    return min(MAX_WARPS_PER_SM, REGS_PER_SM // max(per_warp, 1))


def _sass_width(op: str) -> int:
    """Bits moved by one SASS LDG/STG/LDL/STL instruction, from its suffixes."""
    for bits in (128, 64):
        if f".{bits}" in op:
            return bits
    if re.search(r"\.(U|S)16\b", op):
        return 16
    if re.search(r"\.(U|S)8\b", op):
        return 8
    return 32


def parse_sass(text: str) -> dict[str, dict]:
    """{mangled kernel: {"global_loads": {bits: n}, "global_stores": {...}, "local": n}} from cuobjdump -sass."""
    kernels, name = {}, None
    for line in text.splitlines():
        if m := re.search(r"Function : (\S+)", line):
            name = m.group(1)
            kernels[name] = {"global_loads": Counter(), "global_stores": Counter(), "local": 0}
            continue
        if name is None:
            continue
        m = re.search(r"\b(LDG|STG|LDL|STL)(\.[A-Z0-9_.]+)?\b", line)
        if not m:
            continue
        op = m.group(0)
        if m.group(1) in ("LDL", "STL"):
            kernels[name]["local"] += 1
        else:
            kernels[name]["global_loads" if m.group(1) == "LDG" else "global_stores"][_sass_width(op)] += 1
    return kernels


_PTX_BITS = {"8": 8, "16": 16, "32": 32, "64": 64}


def parse_ptx(text: str) -> dict[str, dict]:
    """The same counts as :func:`parse_sass`, read off PTX ``ld.global`` / ``st.global`` / ``ld.local``."""
    kernels, name = {}, None
    for line in text.splitlines():
        if m := re.search(r"\.entry\s+(\S+?)\s*\(", line):
            name = m.group(1)
            kernels[name] = {"global_loads": Counter(), "global_stores": Counter(), "local": 0}
            continue
        if name is None:
            continue
        m = re.search(r"\b(ld|st)\.(global|local)[\w.]*?(?:\.v(\d))?\.[bfsu](8|16|32|64)\b", line)
        if not m:
            continue
        if m.group(2) == "local":
            kernels[name]["local"] += 1
            continue
        bits = int(m.group(3) or 1) * _PTX_BITS[m.group(4)]
        kernels[name]["global_loads" if m.group(1) == "ld" else "global_stores"][bits] += 1
    return kernels


def _widths(counter: dict) -> str:
    return ", ".join(f"{bits}b x{n}" for bits, n in sorted(counter.items(), key=lambda kv: -int(kv[0]))) or "-"


# ---------------------------------------------------------------------------------------------
# Report


def report_source(source: Path, arch: str, nvcc: str, cuobjdump: str | None, workdir: Path) -> tuple[list[dict], dict]:
    obj = workdir / f"{source.stem}.o"
    cmd, log = compile_object(nvcc, source, obj, arch)
    resources = parse_ptxas(log)
    if cuobjdump:
        listing = subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True, text=True, check=True).stdout
        accesses, method = parse_sass(listing), "SASS (cuobjdump -sass)"
    else:
        ptx = workdir / f"{source.stem}.ptx"
        ptx_cmd = [c for c in cmd if c not in ("-c", "-Xptxas", "-v")]
        ptx_cmd[ptx_cmd.index("-o") + 1] = str(ptx)
        subprocess.run(ptx_cmd + ["-ptx"], capture_output=True, text=True, check=True, timeout=1200)
        accesses, method = parse_ptx(ptx.read_text()), "PTX (nvcc -ptx; no cuobjdump found)"
    names = demangle(sorted(resources))
    rows = []
    for mangled in sorted(resources, key=lambda n: names[n]):
        res, acc = resources[mangled], accesses.get(mangled, {})
        loads, stores = acc.get("global_loads", {}), acc.get("global_stores", {})
        rows.append(
            {
                "source": source.name,
                "kernel": names[mangled],
                "mangled": mangled,
                **res,
                "warps_per_sm_by_registers": warps_per_sm(res.get("registers", 0)),
                "global_loads": {str(k): v for k, v in loads.items()},
                "global_stores": {str(k): v for k, v in stores.items()},
                "local_accesses": acc.get("local"),
                "has_128bit_loads": loads.get(128, 0) > 0,
            }
        )
    return rows, {"command": " ".join(cmd), "access_method": method, "ptxas_log": log}


def format_report(meta: dict, rows: list[dict]) -> str:
    header = [
        "kernel",
        "regs",
        "warps/SM",
        "stack B",
        "spill st/ld B",
        "smem B",
        "global loads",
        "global stores",
        "local ld/st",
    ]
    lines = [
        [
            r["kernel"],
            r.get("registers", "?"),
            r["warps_per_sm_by_registers"],
            r.get("stack_bytes", "?"),
            f"{r.get('spill_store_bytes', '?')}/{r.get('spill_load_bytes', '?')}",
            r.get("smem_bytes", "?"),
            _widths(r["global_loads"]),
            _widths(r["global_stores"]),
            common.fmt("{}", r["local_accesses"]),
        ]
        for r in rows
    ]
    spills = sum(r.get("spill_store_bytes", 0) + r.get("spill_load_bytes", 0) for r in rows)
    vector = [r["kernel"] for r in rows if r["has_128bit_loads"]]
    expected = [r for r in rows if expects_128bit(r)]
    missing = [r["kernel"] for r in expected if not r["has_128bit_loads"]]
    regs = [r["registers"] for r in rows if "registers" in r]
    text = [
        f"# nvcc resource report ({meta['arch']}): {', '.join(meta['sources'])}",
        "",
        f"- date (UTC) {meta['date_utc']}, commit {meta['git_commit']}, {meta['nvcc_version']}, torch {meta['torch']}",
        f"- flags: `{meta['flags']}`",
        f"- loads/stores read off the {meta['access_method']}; 'global loads' counts instructions per width "
        "(128b = 16-byte vector accesses); warps/SM: what the registers allow (64 max, 65536 registers per SM)",
        f"- summary: {len(rows)} kernels, {min(regs, default=0)}-{max(regs, default=0)} registers, {spills} bytes "
        f"of spills in all, {len(vector)} kernels with 128-bit global loads, "
        f"{sum(1 for r in rows if r['local_accesses'])} with local-memory accesses",
        f"- check: 16-byte global loads in all {len(expected)} kernels written for them (`{meta['expect_128bit']}`): "
        + ("yes" if not missing else f"MISSING in {', '.join(missing)}"),
    ]
    return "\n".join(text) + "\n\n" + common.markdown_table(header, lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sm_90", help="sm_XX or sm_XXa (default sm_90)")
    parser.add_argument(
        "--out", type=Path, default=common.RESULTS_DIR, help="results root (default benchmarks/results)"
    )
    parser.add_argument("--folder", help="folder under --out (default nvcc-<arch without _>, e.g. nvcc-sm90)")
    parser.add_argument("--sources", type=Path, nargs="+", default=SOURCES, help="default: csrc/*.cu")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"sm_\d+a?", args.arch):
        parser.error(f"--arch must look like sm_90 or sm_90a, got {args.arch!r}")
    nvcc = find_tool("nvcc")
    if nvcc is None:
        parser.error("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    cuobjdump = find_tool("cuobjdump")
    import torch

    rows, details = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for source in args.sources:
            print(f"nvcc {source.name} for {args.arch} ...", flush=True)
            source_rows, info = report_source(Path(source), args.arch, nvcc, cuobjdump, Path(tmp))
            rows += source_rows
            details.append(info)
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    meta = {
        "benchmark": "nvcc resource report",
        "arch": args.arch,
        "sources": [Path(s).name for s in args.sources],
        "device_slug": args.folder or f"nvcc-{args.arch.replace('_', '')}",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": common.git_commit(),
        "torch": torch.__version__,
        "nvcc": nvcc,
        "nvcc_version": version[-1] if version else "?",
        "cuobjdump": cuobjdump,
        "access_method": details[0]["access_method"] if details else "?",
        "expect_128bit": EXPECT_128BIT,
        "flags": " ".join(f for f in details[0]["command"].split()[5:] if not f.startswith("-I")) if details else "",
        "commands": [d["command"] for d in details],
    }
    report = format_report(meta, rows)
    print(report)
    paths = common.write_results(args.out, "nvcc", meta, rows, report, quick=False)
    log_path = paths[0].with_name(paths[0].name.replace("nvcc_", "ptxas_", 1)).with_suffix(".log")
    common.write_text_atomic(log_path, "\n".join(d["ptxas_log"] for d in details))
    print("wrote " + ", ".join(map(str, [*paths, log_path])))
    spilled = [r["kernel"] for r in rows if r.get("spill_store_bytes") or r.get("spill_load_bytes")]
    unvectorized = [r["kernel"] for r in rows if expects_128bit(r) and not r["has_128bit_loads"]]
    return 1 if spilled or unvectorized else 0


if __name__ == "__main__":
    sys.exit(main())
