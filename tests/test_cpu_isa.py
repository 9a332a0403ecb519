"""The CPU kernels compiled once per instruction set (batch_norm, attention, the diffusion
ops; max_pool2d has its own test) run the op's reference tests again under every set the
CPU supports other than the one chosen by default, which the other tests run."""

from __future__ import annotations

import pytest
import test_attention
import test_batch_norm
import test_noise
import test_scheduler_steps
import torch
from conftest import supported_isas

import dlcv_fast


def _default_isa() -> str:
    dlcv_fast._C.set_cpu_isa("auto")
    return dlcv_fast._C.cpu_isa()


OTHER_ISAS = [isa for isa in supported_isas() if isa != _default_isa()]


def _cases():
    """(name, test function, its arguments after backend, device, dtype)."""
    cases = []
    for kind in ("add_noise", "get_velocity"):
        for shape in test_noise.SHAPES:
            cases.append((f"{kind}-{'x'.join(map(str, shape))}", test_noise.test_matches_the_formula,
                          (shape, kind)))
        cases.append((f"{kind}-gradients", test_noise.test_gradients, (kind,)))
    cases.append(("ddpm_step", test_scheduler_steps.test_ddpm_step, ()))
    cases.append(("ddim_step", test_scheduler_steps.test_ddim_step, ()))
    for training in (True, False):
        for relu in (False, True):
            tag = f"{'train' if training else 'eval'}{'-relu' if relu else ''}"
            cases.append((f"batch_norm-forward-{tag}", test_batch_norm.test_forward_matches_torch,
                          (training, relu)))
            cases.append((f"batch_norm-gradients-{tag}",
                          test_batch_norm.test_gradients_match_torch, (training, relu)))
    cases.append(("batch_norm-channels-last-wide-and-long",
                  test_batch_norm.test_channels_last_wide_and_long_rows, ()))
    for mask_kind in test_attention.MASKS:
        cases.append((f"attention-{mask_kind}", test_attention.test_forward_and_gradients,
                      (mask_kind,)))
    return cases


@pytest.mark.skipif(not OTHER_ISAS, reason="the CPU supports only the default instruction set")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("isa", OTHER_ISAS)
@pytest.mark.parametrize(("name", "test", "args"), _cases(), ids=[c[0] for c in _cases()])
def test_reference_tests_under_every_instruction_set(isa, dtype, name, test, args):
    dlcv_fast._C.set_cpu_isa(isa)
    try:
        assert dlcv_fast._C.cpu_isa() == isa
        test("cpu", "cpu", dtype, *args)
    finally:
        dlcv_fast._C.set_cpu_isa("auto")
