"""torch.func support: the ops under grad, vjp, jacrev, vmap and their compositions.

torch.func's transforms run neither a C++ ``autograd::Function`` (the autograd of the C++
ops) nor a formula registered with ``torch.library.register_autograd`` (the rest). So each
formula is also wrapped in a Python ``torch.autograd.Function`` in the ``setup_context``
style that functorch runs, and an op called through :class:`Op` goes through it while a
transform is active; otherwise straight to the op, as before. The backward formulas call
their ops through :class:`Op` too, so second and higher derivatives under ``torch.func``
take the same formulas as ``torch.autograd.grad(create_graph=True)``.

Under ``vmap`` each op's batching rule (:func:`register_vmap`) runs it once on the whole
batch. (Without one, the Function's rule would be generated: its forward and backward run
on batched tensors, which PyTorch's fallback takes one sample at a time, with a warning.)
"""

from __future__ import annotations

import torch
from torch._library.custom_ops import CustomOpDef

from dlcv_fast.ops._common import forward_ad_error

_FUNCTIONS: dict = {}


def _overload(op) -> torch._ops.OpOverload:
    if isinstance(op, Op):
        return op.overload
    if isinstance(op, CustomOpDef):
        return op._opoverload
    if isinstance(op, str):
        namespace, name = op.split("::")
        op = getattr(getattr(torch.ops, namespace), name)
    return op.default if isinstance(op, torch._ops.OpOverloadPacket) else op


def register_autograd(op, backward, setup_context, *, library: bool = True) -> None:
    """Registers ``backward`` (with ``setup_context``, torch.library's signatures) as the
    op's formula under torch.func, and with ``library`` also with torch.library for plain
    autograd (off for the C++ ops, whose autograd is in C++)."""
    overload = _overload(op)
    if library:
        torch.library.register_autograd(overload, backward, setup_context=setup_context)

    def forward(*args):
        return overload(*args)

    def jvp(ctx, *tangents):
        raise forward_ad_error(overload._opname)

    _FUNCTIONS[overload] = type(
        f"{overload._opname}_function", (torch.autograd.Function,),
        {"forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
         "backward": staticmethod(backward), "jvp": staticmethod(jvp),
         "generate_vmap_rule": True})


def function(op) -> type[torch.autograd.Function]:
    """The Function that :func:`register_autograd` made for ``op``."""
    return _FUNCTIONS[_overload(op)]


class Op:
    """A registered op, called through its torch.func Function while a torch.func transform
    is active. Arguments are positional, all of them (the Function sees no defaults)."""

    __slots__ = ("overload",)

    def __init__(self, op):
        self.overload = _overload(op)

    def __call__(self, *args):
        # Dynamo fails inside these Functions (it hands their forward the context): under
        # torch.compile the op is called as it is, and a transform over it breaks the graph.
        if torch._C._are_functorch_transforms_active() and not torch.compiler.is_compiling():
            function = _FUNCTIONS.get(self.overload)
            if function is not None:
                return function.apply(*args)
        return self.overload(*args)

    def __repr__(self) -> str:
        return f"Op({self.overload})"


# --- batching rules -------------------------------------------------------------------------

def register_vmap(op, rule) -> None:
    """``rule(info, in_dims, *args) -> (output, out_dims)`` (torch.library.register_vmap's
    signature) as the batching rule of the op's Function, instead of the generated one.
    (torch.library.register_vmap would not do: a rule registered there runs with the vmap
    level still on functorch's stack, where the Functions of the ops it calls fail.)"""
    def vmap(info, in_dims, *args):
        if info.batch_size == 0:
            return _empty_batch(rule, info, in_dims, args)
        return rule(info, in_dims, *args)

    function = _FUNCTIONS[_overload(op)]
    function.generate_vmap_rule = False
    function.vmap = staticmethod(vmap)


def _empty_batch(rule, info, in_dims, args):
    """A vmapped batch of none: the rule on one sample of zeros, cut to none. (Folded, an
    empty batch would leave sizes that the rules read back unknown.)"""
    one = [a.new_zeros(a.shape[:d] + (1,) + a.shape[d + 1:]) if isinstance(d, int) else a
           for a, d in zip(args, in_dims)]
    output, out_dims = rule(info._replace(batch_size=1), in_dims, *one)

    def cut(t, d):
        return t if d is None else t.narrow(d, 0, 0)

    if isinstance(output, tuple):
        return tuple(cut(t, d) for t, d in zip(output, out_dims)), out_dims
    return cut(output, out_dims), out_dims


def batched(t, dim, size: int):
    """``t`` with its vmapped dimension first: moved there, or, for an argument that is not
    vmapped, an expanded view of ``size`` copies."""
    if t is None:
        return None
    if dim is None:
        return t.expand(size, *t.shape)
    return t.movedim(dim, 0)


def folded(t, dim, size: int):
    """``t`` with its vmapped dimension merged into the next one, the batch dim (B*N, ...),
    or per-sample parameters as one stack (B*C,); None stays None."""
    return None if t is None else batched(t, dim, size).flatten(0, 1)


def stacked(t, dim, size: int):
    """``t`` (N, C, ...) per sample as (N, B*C, ...): the samples' channels side by side, so
    that per-channel work (groups, statistics) stays per sample; None stays None."""
    return None if t is None else batched(t, dim, size).movedim(0, 1).flatten(1, 2)


def looped(op, info, in_dims, *args):
    """The op once per vmapped sample, stacked: for the argument combinations a rule does
    not fold into one call."""
    outputs = []
    for i in range(info.batch_size):
        one = [a.select(d, i) if isinstance(d, int) else a for a, d in zip(args, in_dims)]
        outputs.append(op(*one))
    if isinstance(outputs[0], tuple):
        return tuple(torch.stack(o) for o in zip(*outputs)), (0,) * len(outputs[0])
    return torch.stack(outputs), 0
