"""Builds the copy of dlcv_fast's extension whose ops run the CUDA kernels on the CPU:
csrc/cuda/*.cu compiled as C++ against csrc/emu/cuda_emu.h, which stands in for the GPU,
and the host entry points (csrc/*.cpp) built with DLCV_FAST_CUDA_EMU, which sends every
tensor, CPU tensors included, to those kernels. ``python tests/cuda_emu.py`` builds it into
build/emu/_C.so (``make test-cuda-emulated`` does, then runs the op tests with
DLCV_FAST_EXTENSION pointing at it).

It needs the CUDA toolkit's headers (CUDA_HOME), not a GPU or nvcc.
"""

from __future__ import annotations

import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = ("attention", "batch_norm", "conv2d", "conv2d_depthwise", "max_pool2d", "noise",
           "scheduler_step")


def cuda_include() -> str | None:
    """The CUDA toolkit's include folder, or None without a toolkit."""
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    path = os.path.join(home, "include") if home else None
    return path if path and os.path.exists(os.path.join(path, "cuda_runtime.h")) else None


def build(verbose: bool = False, asan: bool = False) -> str:
    """Builds (or brings up to date) the emulated extension; returns its path. With `asan`,
    under AddressSanitizer, into build/emu-asan (run it with the ASan runtime preloaded:
    asan_preload())."""
    from torch.utils import cpp_extension

    include = cuda_include()
    if include is None:
        raise RuntimeError("the CUDA emulation needs the CUDA toolkit's headers (set CUDA_HOME)")
    csrc = os.path.join(ROOT, "csrc")
    sources = sorted(glob.glob(os.path.join(csrc, "*.cpp")))
    sources += [os.path.join(csrc, "cpu", "isa.cpp"), os.path.join(csrc, "emu", "runtime.cpp")]
    sources += [os.path.join(csrc, "emu", f"{k}_cu.cpp") for k in KERNELS]
    build_dir = os.path.join(ROOT, "build", "emu-asan" if asan else "emu")
    os.makedirs(build_dir, exist_ok=True)
    sanitize = ["-fsanitize=address", "-fno-omit-frame-pointer"] if asan else []
    module = cpp_extension.load(
        name="_C",
        sources=sources,
        # -O2 also drops the calls to the CPU kernels (not built here) from the entry points,
        # where DLCV_FAST_CUDA_EMU makes their branch dead.
        extra_cflags=["-O2", "-DDLCV_FAST_WITH_CUDA=1", "-DDLCV_FAST_CUDA_EMU=1",
                      f"-I{os.path.join(csrc, 'emu', 'include')}", f"-I{include}", *sanitize],
        extra_ldflags=sanitize,
        build_directory=build_dir,
        with_cuda=False,
        verbose=verbose,
    )
    return module.__file__


def asan_preload() -> str:
    """The AddressSanitizer runtime of the compiler that builds the extension."""
    import subprocess

    return subprocess.check_output(["c++", "-print-file-name=libasan.so"], text=True).strip()


if __name__ == "__main__":
    if "--asan-runtime" in sys.argv:
        print(asan_preload())
    else:
        print(build(verbose="-v" in sys.argv, asan="--asan" in sys.argv))
