"""`python -m dlcv_fast check`: every op of every backend that runs here against PyTorch
on a few shapes, as a pass/fail table with the worst error."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

import dlcv_fast
from dlcv_fast.bench import ddpm_alphas_cumprod
from dlcv_fast.backend import BackendError, _why_not

# (shape, kernel_size, stride, padding, dilation, ceil_mode)
_POOL_CASES = [
    ((2, 3, 13, 17), 3, 2, 1, 1, True),
    ((1, 8, 9, 9), (2, 3), (1, 2), (1, 0), (2, 1), False),
    ((4, 16, 28, 28), 2, 2, 0, 1, False),
]


@dataclasses.dataclass
class Row:
    op: str
    backend: str
    device: str
    dtype: str
    cases: int
    worst: float
    ok: bool
    note: str = ""


def _check_max_pool2d(backend: str, device: str, dtype: torch.dtype) -> Row:
    worst, ok, cases = 0.0, True, 0
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
    for shape, k, s, p, d, ceil in _POOL_CASES:
        for layout in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=layout)
            x.requires_grad_()
            with dlcv_fast.use_backend(backend):
                out, idx = dlcv_fast.max_pool2d(x, k, s, p, d, ceil, return_indices=True)
            ref_out, ref_idx = F.max_pool2d(x.detach(), k, s, p, d, ceil, return_indices=True)
            g = torch.randn_like(out)
            (grad,) = torch.autograd.grad(out, x, g)
            x64 = x.detach().double().requires_grad_()
            (ref_grad,) = torch.autograd.grad(F.max_pool2d(x64, k, s, p, d, ceil), x64, g.double())
            err = (grad.double() - ref_grad).abs().max().item()
            worst = max(worst, err)
            ok &= torch.equal(out, ref_out) and torch.equal(idx, ref_idx)
            ok &= err <= tol[dtype] * (1 + ref_grad.abs().max().item())
            cases += 1
    return Row("max_pool2d", backend, device, str(dtype).removeprefix("torch."), cases, worst, ok)


def _check_noise(op: str):
    def check(backend: str, device: str, dtype: torch.dtype) -> Row:
        tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3,
               torch.bfloat16: 2e-2}
        table = ddpm_alphas_cumprod()
        worst, cases = 0.0, 0
        for shape in [(4, 3, 16, 16), (3, 97), (2, 4, 5, 6, 7)]:
            x = torch.randn(shape, dtype=torch.float64)
            noise = torch.randn_like(x)
            t = torch.randint(0, 1000, (shape[0],))
            tab = table.to(torch.float64 if dtype == torch.float64 else torch.float32)
            a = tab.double()[t].reshape(-1, *([1] * (x.dim() - 1)))
            want = (a.sqrt() * x + (1 - a).sqrt() * noise if op == "add_noise"
                    else a.sqrt() * noise - (1 - a).sqrt() * x)
            with dlcv_fast.use_backend(backend):
                got = getattr(dlcv_fast, op)(x.to(device, dtype), noise.to(device, dtype),
                                             t.to(device), tab.to(device))
            exact = want.to(dtype).double()  # what the dtype can hold
            worst = max(worst, (got.double().cpu() - exact).abs().max().item())
            cases += 1
        return Row(op, backend, device, str(dtype).removeprefix("torch."), cases, worst,
                   worst <= tol[dtype] * 4)

    return check


def _check_step(op: str):
    from dlcv_fast.bench import fused_step, torch_step_formula

    def check(backend: str, device: str, dtype: torch.dtype) -> Row:
        tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 4e-3,
               torch.bfloat16: 3e-2}
        table = ddpm_alphas_cumprod()
        worst, cases = 0.0, 0
        for shape, (t, prev_t) in [((2, 4, 16, 16), (500, 480)), ((3, 97), (20, 0))]:
            m, s, z = (torch.randn(shape, dtype=torch.float64) for _ in range(3))
            want, _ = torch_step_formula(op, m, s, z, table, t, prev_t)
            with dlcv_fast.use_backend(backend):
                got, _ = fused_step(op, *(v.to(device, dtype) for v in (m, s, z)), table, t,
                                    prev_t)
            err = (got.double().cpu() - want).abs().max().item()
            worst = max(worst, err / (1 + want.abs().max().item()))
            cases += 1
        return Row(op, backend, device, str(dtype).removeprefix("torch."), cases, worst,
                   worst <= tol[dtype])

    return check


# (input shape, out_channels, kernel, stride, padding, dilation, groups)
_CONV_CASES = [
    ((2, 3, 17, 15), 8, 7, 2, 3, 1, 1),
    ((2, 16, 9, 9), 32, 1, 1, 0, 1, 1),
    ((1, 8, 11, 10), 8, 3, 1, "same", 2, 8),
    ((2, 6, 9, 9), 4, (3, 2), (2, 1), 1, 1, 2),
]


def _check_conv2d(backend: str, device: str, dtype: torch.dtype) -> Row:
    """Output and the three gradients (conv + bias + ReLU) against float64 PyTorch, as the
    largest error relative to the largest value; float32 without TF32."""
    conv = torch.backends.cudnn.conv
    previous = conv.fp32_precision
    conv.fp32_precision = "ieee"
    try:
        return _check_conv2d_cases(backend, device, dtype)
    finally:
        conv.fp32_precision = previous


def _check_conv2d_cases(backend: str, device: str, dtype: torch.dtype) -> Row:
    tol = {torch.float64: 1e-10, torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}
    worst, cases = 0.0, 0
    for shape, o, k, s, p, d, g in _CONV_CASES:
        kh, kw = (k, k) if isinstance(k, int) else k
        for layout in (torch.contiguous_format, torch.channels_last):
            x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=layout)
            w = torch.randn(o, shape[1] // g, kh, kw, dtype=torch.float64)
            w /= (shape[1] // g * kh * kw) ** 0.5
            b = torch.randn(o, dtype=torch.float64)
            args = [t.to(device, dtype).requires_grad_() for t in (x, w, b)]
            with dlcv_fast.use_backend(backend):
                y = dlcv_fast.conv2d(*args, s, p, d, g, activation="relu")
            gy = torch.randn(y.shape, dtype=torch.float64).to(dtype)
            got = [y, *torch.autograd.grad(y, args, gy.to(device))]
            # The reference sees the same rounded values (a ReLU mask must not flip).
            gy = gy.double()
            ref_args = [t.detach().double().cpu().requires_grad_() for t in args]
            ref = F.conv2d(*ref_args, s, p, d, g).relu()
            want = [ref, *torch.autograd.grad(ref, ref_args, gy)]
            for a, e in zip(got, want):
                err = (a.double().cpu() - e).abs().max().item() / (1 + e.abs().max().item())
                worst = max(worst, err)
            cases += 1
    return Row("conv2d", backend, device, str(dtype).removeprefix("torch."), cases, worst,
               worst <= tol[dtype])


def _check_batch_norm(backend: str, device: str, dtype: torch.dtype) -> Row:
    """Training forward and backward (plain and fused with ReLU) and evaluation forward
    against F.batch_norm in float64; errors relative to the largest reference value."""
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
    worst, cases = 0.0, 0
    for shape, layout in [((4, 8, 9, 9), torch.contiguous_format),
                          ((4, 8, 9, 9), torch.channels_last), ((16, 5), torch.contiguous_format),
                          ((2, 3, 4, 5, 6), torch.contiguous_format)]:
        for relu in (False, True):
            x64 = torch.randn(shape, dtype=torch.float64) * 2 + 1
            # The reference takes the output gradient the op gets, rounded to the dtype.
            g64 = torch.randn(shape, dtype=torch.float64).to(dtype).double()
            C = shape[1]
            w64, b64 = torch.rand(C, dtype=torch.float64) + 0.5, torch.randn(C, dtype=torch.float64)
            x = x64.to(device, dtype).contiguous(memory_format=layout).requires_grad_()
            w = w64.to(device, dtype).requires_grad_()
            b = b64.to(device, dtype).requires_grad_()
            rm = torch.zeros(C, device=device, dtype=dtype)
            rv = torch.ones(C, device=device, dtype=dtype)
            with dlcv_fast.use_backend(backend):
                out = dlcv_fast.batch_norm(x, rm, rv, w, b, True,
                                           activation="relu" if relu else None)
                grads = torch.autograd.grad(out, (x, w, b), g64.to(device, dtype))
                evals = dlcv_fast.batch_norm(x.detach(), rm, rv, w.detach(), b.detach(), False)
            xq = x.detach().double().cpu().requires_grad_()
            wq = w.detach().double().cpu().requires_grad_()
            bq = b.detach().double().cpu().requires_grad_()
            rm64, rv64 = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
            want = F.batch_norm(xq, rm64, rv64, wq, bq, True)
            want = want.relu() if relu else want
            want_grads = torch.autograd.grad(want, (xq, wq, bq), g64)
            want_eval = F.batch_norm(xq.detach(), rm64, rv64, wq.detach(), bq.detach(), False)
            for a, e in [(out, want), (evals, want_eval), (rm, rm64), (rv, rv64),
                         *zip(grads, want_grads)]:
                err = (a.detach().double().cpu() - e.detach()).abs().max().item()
                worst = max(worst, err / (1 + e.detach().abs().max().item()))
            cases += 1
    return Row("batch_norm", backend, device, str(dtype).removeprefix("torch."), cases, worst,
               worst <= tol[dtype])
def _check_attention(backend: str, device: str, dtype: torch.dtype) -> Row:
    """Output and gradients against F.scaled_dot_product_attention in float64 (math
    backend), relative to the largest reference value."""
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}
    worst, cases = 0.0, 0
    # (B, H, Hkv, L, S, E, Ev, mask, causal)
    for B, H, Hkv, L, S, E, Ev, mask_kind, causal in [
        (2, 4, 2, 37, 53, 64, 64, "padding", False),
        (1, 2, 2, 70, 45, 32, 48, None, True),
        (1, 2, 1, 19, 33, 128, 128, "additive", False),
    ]:
        q = torch.randn(B, H, L, E, dtype=torch.float64)
        k = torch.randn(B, Hkv, S, E, dtype=torch.float64)
        v = torch.randn(B, Hkv, S, Ev, dtype=torch.float64)
        mask = None
        if mask_kind == "padding":
            mask = torch.arange(S).view(1, 1, 1, S) < torch.tensor([S, S // 2]).view(B, 1, 1, 1)
        elif mask_kind == "additive":
            mask = torch.randn(1, H, L, S, dtype=torch.float64)
        grad = torch.randn(B, H, L, Ev, dtype=torch.float64)
        q64, k64, v64 = (t.clone().requires_grad_() for t in (q, k, v))
        want = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=mask, is_causal=causal,
                                              enable_gqa=True)
        want_grads = torch.autograd.grad(want, (q64, k64, v64), grad)
        ins = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
        m = None if mask is None else mask.to(device, dtype if mask.is_floating_point() else None)
        with dlcv_fast.use_backend(backend):
            got = dlcv_fast.scaled_dot_product_attention(*ins, attn_mask=m, is_causal=causal,
                                                         enable_gqa=True)
        got_grads = torch.autograd.grad(got, ins, grad.to(device, dtype))
        for a, b in zip((got, *got_grads), (want, *want_grads)):
            err = (a.double().cpu() - b).abs().max().item() / (1 + b.abs().max().item())
            worst = max(worst, err)
        cases += 1
    return Row("scaled_dot_product_attention", backend, device, str(dtype).removeprefix("torch."),
               cases, worst, worst <= tol[dtype])


CHECKS = {
    "conv2d": _check_conv2d,
    "max_pool2d": _check_max_pool2d,
    "add_noise": _check_noise("add_noise"),
    "get_velocity": _check_noise("get_velocity"),
    "ddpm_step": _check_step("ddpm_step"),
    "ddim_step": _check_step("ddim_step"),
    "batch_norm": _check_batch_norm,
    "scaled_dot_product_attention": _check_attention,
}


def runnable() -> list[tuple[str, str, torch.dtype]]:
    """(backend, device, dtype) triples that can run on this machine."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out = []
    for backend in ("cpu", "cuda", "triton"):
        for device in devices:
            for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
                if _why_not(backend, torch.empty(0, device=device, dtype=dtype)) is None:
                    out.append((backend, device, dtype))
    return out


def run(ops=None) -> list[Row]:
    rows = []
    for op in ops or dlcv_fast.OPS:
        for backend, device, dtype in runnable():
            torch.manual_seed(0)  # the same inputs on every run: a reproducible table
            try:
                rows.append(CHECKS[op](backend, device, dtype))
            except BackendError as exc:
                rows.append(Row(op, backend, device, str(dtype), 0, float("nan"), False, str(exc)))
    return rows


def format_rows(rows: list[Row]) -> str:
    head = f"{'op':<12} {'backend':<8} {'device':<7} {'dtype':<9} {'cases':>5} {'worst error':>12}  result"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.op:<12} {r.backend:<8} {r.device:<7} {r.dtype:<9} {r.cases:>5} "
                     f"{r.worst:12.3e}  {'PASS' if r.ok else 'FAIL'} {r.note}")
    return "\n".join(lines)
