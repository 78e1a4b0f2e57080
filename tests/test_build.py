"""Build checks that need no GPU: every csrc/*.cu compiles with nvcc without register spills, and
CMakeLists.txt builds a library that registers a correct orw_fast::orw_cfm_w2 with the current torch.

A missing nvcc or cmake skips its test, or fails it when ORW_FAST_REQUIRE_NVCC=1 / ORW_FAST_REQUIRE_CMAKE=1
(as CI sets them)."""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc").glob("*.cu"))


def find_nvcc():
    """nvcc from CUDA_HOME, torch's CUDA_HOME, PATH or /usr/local/cuda; None if absent."""
    homes = [os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME]
    candidates = [str(Path(h, "bin", "nvcc")) for h in homes if h]
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def require(tool, path, env_var):
    """Returns path; a missing tool skips the test, or fails it when env_var=1."""
    if path is None:
        if os.environ.get(env_var) == "1":
            pytest.fail(f"{tool} not found, and {env_var}=1 requires it")
        pytest.skip(f"{tool} not found (set {env_var}=1 to fail instead)")
    return path


def nvcc_command(nvcc, source, output, *extra):
    """Compile-only nvcc command for one .cu file against the current torch's headers (sm_90)."""
    return [
        nvcc,
        "-c",
        str(source),
        "-o",
        str(output),
        "-std=c++20",
        *cpp_extension.COMMON_NVCC_FLAGS,
        "-O3",
        "-arch=sm_90",
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
        *(f"-I{p}" for p in cpp_extension.include_paths()),
        f"-I{sysconfig.get_paths()['include']}",
        *extra,
    ]


def run(cmd, **kwargs):
    """Runs cmd and asserts it succeeded, showing its output otherwise; returns the CompletedProcess."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=900, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\nexit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def ptxas_spill_stores(log):
    """{function: spill-store bytes} from `nvcc -Xptxas -v` output."""
    spills, name = {}, None
    for line in log.splitlines():
        if m := re.search(r"Function properties for (\S+)", line):
            name = m.group(1)
        elif m := re.search(r"(\d+) bytes spill stores", line):
            spills[name] = int(m.group(1))
    return spills


@pytest.fixture(scope="module")
def nvcc_logs(tmp_path_factory):
    """source -> (exit code, nvcc's output) of every .cu file compiled at once, one nvcc process each: on the 2-core
    CI machine the compiles, bound by parsing torch's headers, take the time of one. Output goes to files, not pipes,
    so that no process waits on a full pipe while another is read."""
    nvcc = require("nvcc", find_nvcc(), "ORW_FAST_REQUIRE_NVCC")
    folder = tmp_path_factory.mktemp("nvcc")
    running = {}
    for source in CUDA_SOURCES:
        log = open(folder / f"{source.stem}.log", "w+")  # closed below, once nvcc is done
        cmd = nvcc_command(nvcc, source, folder / f"{source.stem}.o", "-Xptxas", "-v")
        running[source] = (subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT), log, cmd)
    logs = {}
    for source, (proc, log, cmd) in running.items():
        with log:
            code = proc.wait(timeout=900)
            log.seek(0)
            logs[source] = (code, f"{' '.join(map(str, cmd))}\n{log.read()}")
    return logs


@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_sources_compile(source, nvcc_logs):
    code, log = nvcc_logs[source]
    assert code == 0, f"exit {code}\n{log}"
    spills = ptxas_spill_stores(log)
    registers = [int(r) for r in re.findall(r"Used (\d+) registers", log)]
    print(f"{source.name}: {len(spills)} functions, {min(registers, default=0)}-{max(registers, default=0)} registers")
    if "__global__" in source.read_text():
        assert spills, f"no ptxas report parsed from:\n{log}"
    spilling = {f: n for f, n in spills.items() if n}
    assert not spilling, f"ptxas spilled registers (bytes stored): {spilling}\n{log}"


# Runs in a fresh interpreter that never imports orw_fast: its own _C defines the same TORCH_LIBRARY.
CHECK_OP = r"""
import sys, torch
torch.ops.load_library(sys.argv[1])
op = torch.ops.orw_fast.orw_cfm_w2
torch.manual_seed(0)
v, u, v_ref = torch.randn(3, 4, 3).unbind(0)
rewards, alpha, tau = torch.randn(4), 0.3, 2.0
w = 4 * torch.softmax(tau * rewards, 0)
fm, w2 = ((v - u) ** 2).mean(1), ((v - v_ref) ** 2).mean(1)
grad_v = (w[:, None] * (v - u) + alpha * (v - v_ref)) * 2 / v.numel()
for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
    out = op(*(t.to(device) for t in (v, u, v_ref, rewards)), alpha, tau, 0, True, False, False)
    for got, want in zip(out, [(w * fm + alpha * w2).mean(), fm, w2, w, grad_v]):
        torch.testing.assert_close(got.cpu(), want)
print(op)
"""


def test_cmake_build(tmp_path):
    cmake = require("cmake", shutil.which("cmake"), "ORW_FAST_REQUIRE_CMAKE")
    build = tmp_path / "build"
    run([cmake, "-S", ROOT, "-B", build, "-DCMAKE_BUILD_TYPE=Release", f"-DPython_EXECUTABLE={sys.executable}"])
    run([cmake, "--build", build, "-j2"])
    library = build / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    assert library.is_file(), sorted(p.name for p in build.iterdir())
    run([sys.executable, "-c", CHECK_OP, library], cwd=tmp_path)
