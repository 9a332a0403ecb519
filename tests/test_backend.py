"""Backend selection: set_backend, use_backend, DLCV_FAST_BACKEND, auto, and the errors of
a backend that cannot run a call."""

import os
import shutil
import subprocess
import sys
import types

import pytest
import torch

import dlcv_fast
from dlcv_fast import backend


def test_default_and_set_backend():
    assert dlcv_fast.get_backend() == "auto"
    dlcv_fast.set_backend("cpu")
    try:
        assert dlcv_fast.get_backend() == "cpu"
    finally:
        dlcv_fast.set_backend("auto")
    with pytest.raises(ValueError, match="unknown dlcv_fast backend 'cudnn'"):
        dlcv_fast.set_backend("cudnn")


def test_use_backend_restores_on_error():
    with pytest.raises(KeyError):
        with dlcv_fast.use_backend("triton"):
            assert dlcv_fast.get_backend() == "triton"
            raise KeyError
    assert dlcv_fast.get_backend() == "auto"


def test_auto_resolves_by_device():
    assert backend.resolve("max_pool2d", torch.empty(1)) == "cpu"
    if torch.cuda.is_available():
        assert backend.resolve("max_pool2d", torch.empty(1, device="cuda")) in ("cuda", "triton")
    # Meta tensors (shapes only) go to the ops of the backend in force: their fake kernels.
    meta = torch.empty(1, device="meta")
    assert backend.resolve("max_pool2d", meta) == "cpu"
    with dlcv_fast.use_backend("triton"):
        assert backend.resolve("max_pool2d", meta) == "triton"
    elsewhere = types.SimpleNamespace(is_cpu=False, device=torch.device("xpu"))
    with pytest.raises(dlcv_fast.BackendError, match="no dlcv_fast backend runs tensors on xpu"):
        backend.resolve("max_pool2d", elsewhere)


def test_environment_variable_picks_the_backend():
    code = "import dlcv_fast; print(dlcv_fast.get_backend())"
    env = dict(os.environ, DLCV_FAST_BACKEND="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "cpu"
    env["DLCV_FAST_BACKEND"] = "fast"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "unknown dlcv_fast backend 'fast'" in out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a machine without a GPU")
def test_no_gpu_backends_explain_themselves():
    x = torch.randn(1, 1, 4, 4)
    with dlcv_fast.use_backend("cuda"), pytest.raises(dlcv_fast.BackendError) as err:
        dlcv_fast.max_pool2d(x, 2)
    assert err.value.op == "max_pool2d" and err.value.backend == "cuda"
    assert "CUDA tensors only" in err.value.reason


def test_missing_extension_says_how_to_build(tmp_path):
    """Importing a copy of the package that lacks the compiled extension."""
    src = os.path.dirname(dlcv_fast.__file__)
    shutil.copytree(src, tmp_path / "dlcv_fast", ignore=shutil.ignore_patterns("_C*.so"))
    # -S: no .pth files, so no editable-install finder leads back to the real package.
    site_packages = os.path.dirname(os.path.dirname(torch.__file__))
    code = f"import sys; sys.path[:0] = [{str(tmp_path)!r}, {site_packages!r}]; import dlcv_fast"
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True)
    assert out.returncode != 0
    assert "compiled extension (dlcv_fast._C) is missing" in out.stderr
    assert "make build" in out.stderr
