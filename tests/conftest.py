"""Shared test parametrisation: backend x device x dtype, and the tolerance table.

Without a GPU, Triton's kernels run through its interpreter on CPU tensors
(TRITON_INTERPRET=1 must be set before triton is first imported, hence here), and the
cuda tests are not collected as runnable: they need a device. With a GPU, the cuda and
triton backends run on it and the cpu backend on the host.

Every kernel output starts as NaN (DLCV_FAST_POISON=1), so an element a kernel forgets to
write fails the comparison.

With the build that runs the CUDA kernels on the CPU loaded (DLCV_FAST_EXTENSION, see
tests/cuda_emu.py and `make test-cuda-emulated`), the cpu backend runs the CUDA kernels and
is the only backend tested.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["DLCV_FAST_POISON"] = "1"

import dlcv_fast  # noqa: E402
from dlcv_fast.backend import triton_interpreted  # noqa: E402

# Whether the extension is the build that runs the CUDA kernels on the CPU
# (tests/cuda_emu.py): then the cpu backend runs them, and only it is tested.
CUDA_EMULATED = dlcv_fast._C.cuda_emulated()
if CUDA_EMULATED:
    # The tests expect the CPU's float32 convolutions (no TF32 on a CPU); the TF32 tests set
    # the flag themselves.
    torch.backends.cudnn.allow_tf32 = False

# (backend, device) pairs that can run here.
BACKEND_DEVICES = [("cpu", "cpu")]
if not CUDA_EMULATED:
    if HAS_CUDA and dlcv_fast.cuda_built():
        BACKEND_DEVICES.append(("cuda", "cuda"))
    if HAS_CUDA:
        BACKEND_DEVICES.append(("triton", "cuda"))
    elif triton_interpreted():
        BACKEND_DEVICES.append(("triton", "cpu"))

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def dtypes_for(backend: str, device: str) -> list[torch.dtype]:
    """The dtypes a backend is tested in on a device. Triton's interpreter gets bfloat16
    wrong (the backend refuses it there; tested on the GPU instead)."""
    if backend == "triton" and device == "cpu":
        return [torch.float32, torch.float64, torch.float16]
    return list(FLOAT_DTYPES)


# (rtol, atol) by dtype, for results that are sums (gradients). Selections (a max, an
# index) are compared exactly.
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (8e-3, 8e-3),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 msg: str = "") -> None:
    """Compares with the tolerance of ``dtype`` (default: ``actual``'s)."""
    rtol, atol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True,
                               check_dtype=False, msg=lambda m: f"{msg}\n{m}" if msg else m)


def check_error(ours, ref64, torch_result, dtype, what):
    """float64: the conftest tolerance against the float64 reference. Other dtypes, the
    library's rule for reductions and attention: our error against the float64
    reference at most twice PyTorch's own in the same dtype, plus the conftest absolute
    tolerance of the dtype (elementwise relative bounds fail where a result is a
    near-cancelling sum)."""
    if dtype == torch.float64:
        assert_close(ours, ref64, dtype, msg=what)
        return
    ours_err = (ours.double() - ref64).abs().max().item()
    torch_err = (torch_result.double() - ref64).abs().max().item()
    atol = TOLERANCES[dtype][1]
    assert ours_err <= 2 * torch_err + atol, (
        f"{what}: error {ours_err:.3e} against float64, PyTorch's {torch_err:.3e}")


def _ids(pair):
    return f"{pair[0]}-{pair[1]}"


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global random state, whatever ran before it: a
    failure then repeats when the test runs alone."""
    torch.manual_seed(0)


@pytest.fixture(params=BACKEND_DEVICES, ids=_ids)
def backend_device(request):
    """(backend, device): runs the test with that backend in force."""
    backend, device = request.param
    with dlcv_fast.use_backend(backend):
        yield backend, device


def backend_dtype_cases() -> list:
    """pytest params of (backend, device, dtype) over everything that runs here."""
    return [
        pytest.param(b, d, t, id=f"{b}-{d}-{str(t).removeprefix('torch.')}")
        for b, d in BACKEND_DEVICES
        for t in dtypes_for(b, d)
    ]


def supported_isas() -> list[str]:
    """The instruction sets the CPU kernels can run with here (dlcv_fast._C.set_cpu_isa)."""
    isas = []
    for isa in ("base", "avx2", "avx512"):
        try:
            dlcv_fast._C.set_cpu_isa(isa)
            isas.append(isa)
        except ValueError:
            pass
    dlcv_fast._C.set_cpu_isa("auto")
    return isas
