"""Loads the compiled extension dlcv_fast._C, which registers the C++ ops under
torch.ops.dlcv_fast, or says how to build it.

DLCV_FAST_EXTENSION=<path> loads another build of the extension instead: the tests use it
for the build that runs the CUDA kernels on the CPU (tests/cuda_emu.py)."""

import importlib.machinery
import importlib.util
import os
import sys

import torch  # noqa: F401  (the extension links against torch's libraries)


def _load_from(path: str):
    loader = importlib.machinery.ExtensionFileLoader("dlcv_fast._C", path)
    spec = importlib.util.spec_from_loader("dlcv_fast._C", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules["dlcv_fast._C"] = module
    return module


if os.environ.get("DLCV_FAST_EXTENSION"):
    _C = _load_from(os.environ["DLCV_FAST_EXTENSION"])
else:
    try:
        from dlcv_fast import _C
    except ImportError as exc:  # pragma: no cover - exercised only on a broken install
        raise ImportError(
            "dlcv_fast's compiled extension (dlcv_fast._C) is missing or does not load: "
            f"{exc}.\nBuild it from the repository root with `make build`, or with "
            "`pip install -e . --no-build-isolation` in an environment that has torch, ninja "
            "and pybind11 (set CUDA_HOME=/usr/local/cuda, or wherever the CUDA toolkit lives, "
            "to build the CUDA kernels; DLCV_FAST_SKIP_CUDA=1 builds the CPU kernels only)."
        ) from exc

__all__ = ["_C"]
