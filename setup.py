"""Builds dlcv_fast._C.

A CUDAExtension (CPU and CUDA kernels) whenever nvcc and a CUDA build of torch are present,
with or without a GPU; a CppExtension (CPU kernels only) otherwise or with
DLCV_FAST_SKIP_CUDA=1. CUDA targets: sm_80 and sm_90a, plus sm_80 PTX for newer cards;
TORCH_CUDA_ARCH_LIST overrides.
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    if os.environ.get("DLCV_FAST_SKIP_CUDA", "0") == "1":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def _extension():
    cpp = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp: at::parallel_for is a header template over OpenMP; without the flag it
    # runs on one thread.
    cxx = ["-O3", "-fopenmp"]
    link = ["-fopenmp"]
    if not _want_cuda():
        return cpp_extension.CppExtension("dlcv_fast._C", cpp, extra_compile_args={"cxx": cxx},
                                          extra_link_args=link)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0+PTX;9.0a")
    nvcc = ["-O3", "-lineinfo"]
    return cpp_extension.CUDAExtension(
        "dlcv_fast._C",
        cpp + sorted(glob.glob("csrc/cuda/*.cu")),
        extra_compile_args={"cxx": cxx + ["-DDLCV_FAST_WITH_CUDA=1"], "nvcc": nvcc},
        extra_link_args=link,
    )


class BuildExt(cpp_extension.BuildExtension):
    """Keeps object files in build/temp, also under `pip install -e`, whose temporary
    build folder would otherwise make every rebuild a full one: ninja then recompiles
    only what changed."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = os.path.join(ROOT, "build", "temp")


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
)
