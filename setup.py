"""Builds orw_fast._C: the CPU kernels always, the CUDA kernels too when torch has CUDA and nvcc is found.

Install with the torch already on the machine (the convention of torch extensions):
    pip install --no-build-isolation .
Environment: ORW_FAST_CPU_ONLY=1 skips the CUDA kernels; TORCH_CUDA_ARCH_LIST (e.g. "9.0") picks the GPU archs.
"""

import os
import sys
from pathlib import Path

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).parent


def build_extension():
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    # at::parallel_for is header code around `#pragma omp parallel`: without -fopenmp it runs on one
    # thread. The library then uses the libgomp.so.1 that torch has already loaded.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx = ["-O3", *openmp]
    with_cuda = (
        torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("ORW_FAST_CPU_ONLY", "0") != "1"
    )
    if not with_cuda:
        return CppExtension("orw_fast._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=openmp)
    nvcc = ["-O3", "-lineinfo"]
    return CUDAExtension(
        "orw_fast._C",
        sources + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cu")),
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=openmp,
    )


setup(ext_modules=[build_extension()], cmdclass={"build_ext": BuildExtension})
