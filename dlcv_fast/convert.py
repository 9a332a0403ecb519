"""Swap the torch.nn layers of any model for dlcv_fast's, in place, and back.

:func:`convert` walks a model and replaces every layer whose exact type is in
:data:`REGISTRY` by its dlcv_fast counterpart; :func:`revert` undoes it. The dlcv_fast
layers are subclasses of the torch.nn layers they replace with the same attributes, so
the swap changes the module's class in place (``module.__class__``): the module object,
its parameters, buffers, hooks and any outside reference to it stay the same, and the
``state_dict`` keys and tensors are untouched. A converted model's ``state_dict`` loads
into the unconverted model and back.

A layer stays on torch when its type has no entry (``Linear``, ``LayerNorm``, ...), when
it is a subclass of a registered type (its forward may differ), or when the entry's check
refuses it (a dtype or device no backend runs); the summary says which layers and why.
torch.nn's composite modules (``TransformerEncoderLayer``, ``Transformer``, ...) are
walked into like a model's own, so their MultiheadAttention layers are converted (their
fast inference path, when torch takes it, still runs torch's fused kernel).

Adding a layer type is one line: ``register(torch.nn.X, dlcv_fast.nn.X, check)`` where
``check(module)`` returns None when dlcv_fast can run the module, else the reason. A
dlcv_fast layer that is not a subclass of the torch one is registered with ``make`` and
``undo`` functions that build the one from the other, sharing the parameters; the new
module then takes the old one's place in its parent.
"""

from __future__ import annotations

import collections
import dataclasses
import warnings
from collections.abc import Callable

import torch
from torch import nn

import dlcv_fast.nn as dnn
from dlcv_fast import backend
from dlcv_fast.ops.attention import MAX_HEAD_DIM

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class Entry:
    """How to run one torch.nn layer type on dlcv_fast.

    ``make(module)`` returns the dlcv_fast layer for the torch module, sharing its
    parameters and buffers, or raises :class:`Unsupported` with the reason; ``undo(layer)``
    returns the torch module for a dlcv_fast layer. ``in_place``: both change the module's
    class and return the same object (for dlcv_fast layers that subclass the torch ones);
    otherwise they build new modules and leave their argument as it was."""

    torch_cls: type
    dlcv_cls: type
    make: Callable[[nn.Module], nn.Module]
    undo: Callable[[nn.Module], nn.Module]
    in_place: bool = True


class Unsupported(Exception):
    """Raised by an entry's ``make`` when dlcv_fast cannot run that module."""


# torch class -> Entry; and dlcv_fast class -> Entry for revert.
REGISTRY: dict[type, Entry] = {}
_BY_DLCV: dict[type, Entry] = {}


def register(torch_cls: type, dlcv_cls: type,
             check: Callable[[nn.Module], str | None] = lambda m: None,
             extra: dict | None = None, *,
             make: Callable[[nn.Module], nn.Module] | None = None,
             undo: Callable[[nn.Module], nn.Module] | None = None) -> None:
    """Registers ``dlcv_cls`` as the replacement of ``torch_cls``.

    When ``dlcv_cls`` subclasses ``torch_cls`` and its state is the torch module's plus the
    attributes in ``extra`` (set to these defaults on conversion), the swap changes the
    module's class in place. ``check(module)`` returns None, or why dlcv_fast cannot run
    that module. Otherwise pass ``make(torch_module) -> dlcv_layer`` and ``undo(dlcv_layer)
    -> torch_module``, which build new modules sharing the parameters and buffers
    (``make`` raises :class:`Unsupported` with the reason when it cannot)."""
    if make is not None or undo is not None:
        if make is None or undo is None:
            raise TypeError("register: make and undo go together")

        def checked_make(module: nn.Module) -> nn.Module:
            reason = check(module)
            if reason is not None:
                raise Unsupported(reason)
            return make(module)

        REGISTRY[torch_cls] = _BY_DLCV[dlcv_cls] = Entry(torch_cls, dlcv_cls, checked_make,
                                                         undo, in_place=False)
        return
    if not issubclass(dlcv_cls, torch_cls):
        raise TypeError(f"register: {dlcv_cls.__name__} must subclass {torch_cls.__name__}, "
                        f"or pass make and undo")
    extra = dict(extra or {})

    def swap_in(module: nn.Module) -> nn.Module:
        reason = check(module)
        if reason is not None:
            raise Unsupported(reason)
        module.__class__ = dlcv_cls
        for name, value in extra.items():
            setattr(module, name, value)
        return module

    def swap_out(module: nn.Module) -> nn.Module:
        module.__class__ = torch_cls
        for name in extra:
            module.__dict__.pop(name, None)
        return module

    REGISTRY[torch_cls] = _BY_DLCV[dlcv_cls] = Entry(torch_cls, dlcv_cls, swap_in, swap_out)


def _check_tensors(op: str, module: nn.Module) -> str | None:
    """Why no backend runs ``op`` on the module's parameters, or None."""
    for name, p in module.named_parameters(recurse=False):
        if isinstance(p, nn.parameter.UninitializedParameter):
            return f"{name} is not initialised yet (lazy module)"
        if p.dtype not in _FLOATS:
            return f"{name} has dtype {p.dtype}; dlcv_fast runs float32/64/16 and bfloat16"
        try:
            backend.resolve(op, p)
        except backend.BackendError as e:
            return str(e)
    return None


def _check_conv2d(m: nn.Conv2d) -> str | None:
    if m.padding_mode not in ("zeros", "reflect", "replicate", "circular"):
        return f"padding_mode {m.padding_mode!r} is not supported"
    return _check_tensors("conv2d", m)


register(nn.Conv2d, dnn.Conv2d, _check_conv2d, extra={"activation": None})
register(nn.MaxPool2d, dnn.MaxPool2d)
register(nn.BatchNorm1d, dnn.BatchNorm1d, lambda m: _check_tensors("batch_norm", m),
         extra={"activation": None})
register(nn.BatchNorm2d, dnn.BatchNorm2d, lambda m: _check_tensors("batch_norm", m),
         extra={"activation": None})
register(nn.SyncBatchNorm, dnn.SyncBatchNorm, lambda m: _check_tensors("batch_norm", m),
         extra={"activation": None})


def _check_attention(m: nn.MultiheadAttention) -> str | None:
    if m.head_dim > MAX_HEAD_DIM:
        return (f"head dim {m.head_dim} (embed_dim // num_heads) is above the fused kernels' "
                f"{MAX_HEAD_DIM}")
    return _check_tensors("scaled_dot_product_attention", m)


register(nn.MultiheadAttention, dnn.MultiheadAttention, _check_attention)


# The layers whose ReLU fuse_relus folds into them (activation='relu').
_FUSABLE = (dnn.Conv2d, dnn.BatchNorm2d)


class _FusedReLU(nn.ReLU):
    """The place of a ReLU whose work the preceding layer (a Conv2d or BatchNorm2d with
    activation='relu') does: passes its input through. Keeps the ReLU's attributes so
    :func:`revert` restores it."""

    def forward(self, input):
        return input

    def extra_repr(self) -> str:
        return super().extra_repr() + ", fused into the preceding layer"


@dataclasses.dataclass
class Summary:
    """What :func:`convert` did: ``converted`` counts swapped layers by torch type name,
    ``fused`` the Conv2d+ReLU and BatchNorm2d+ReLU pairs, ``left`` lists (name, type,
    reason) of the layers that stay on torch, ``notes`` what else the user should know."""

    converted: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    fused: int = 0
    left: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = ["converted to dlcv_fast:"]
        lines += [f"  {n:>4} x {t}" for t, n in sorted(self.converted.items())] or ["  none"]
        if self.fused:
            lines.append(f"  {self.fused:>4} x Conv2d/BatchNorm2d+ReLU fused")
        lines.append("left on torch:")
        groups = collections.Counter((t, r) for _, t, r in self.left)
        lines += [f"  {n:>4} x {t}: {r}" for (t, r), n in sorted(groups.items())] or ["  none"]
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)


# Layers that compute nothing worth a kernel: not listed as left on torch.
_PASSIVE = (nn.Identity, nn.Dropout, nn.Flatten, nn.Unflatten)


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _is_layer(module: nn.Module) -> bool:
    """A layer in its own right, reported when left on torch: a subclass of a registered
    type, a torch.nn module without sub-modules, or a model's own module with parameters
    and no children. Other modules (containers, torch.nn's composites such as the
    Transformer layers, a model's blocks) are walked into."""
    if isinstance(module, _CONTAINERS):
        return False
    if any(isinstance(module, c) for c in REGISTRY):
        return True
    if type(module).__module__.startswith("torch.nn."):
        return not module._modules
    return not module._modules and bool(module._parameters or module._buffers)


def convert(model: nn.Module, *, fuse_relu: bool = False) -> Summary:
    """Swaps, in place, every layer of ``model`` that dlcv_fast can run for its dlcv_fast
    counterpart (registered types: ``REGISTRY``), sharing parameters and buffers.

    ``fuse_relu=True`` also folds a ReLU that directly follows a Conv2d or BatchNorm2d in
    an ``nn.Sequential`` into that layer (:func:`fuse_relus`). The state_dict is the same
    either way.

    Returns a :class:`Summary`; ``str(summary)`` is a readable table.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, but got "
                        f"{type(model).__name__}")
    summary = Summary()
    done: dict[int, nn.Module] = {}  # id of a visited module -> what replaces it

    def visit(module: nn.Module, name: str, parent: nn.Module | None, key: str) -> None:
        if id(module) in done:  # a layer used in several places: convert it once
            if parent is not None and done[id(module)] is not module:
                parent._modules[key] = done[id(module)]
            return
        done[id(module)] = module
        cls = type(module)
        if cls in _BY_DLCV or isinstance(module, _FusedReLU):
            return  # already on dlcv_fast
        entry = REGISTRY.get(cls)
        if entry is not None:
            if parent is None and not entry.in_place:
                summary.left.append((name, cls.__name__, "the model itself is this layer; "
                                     "convert a model that contains it"))
                return
            try:
                new = entry.make(module)
            except Unsupported as e:
                summary.left.append((name, cls.__name__, str(e)))
                return
            if new is not module:
                parent._modules[key] = done[id(module)] = new
            summary.converted[cls.__name__] += 1
            return
        if _is_layer(module):
            if _quiet(module):
                return  # activations, dropout, ...: elementwise, nothing to report
            base = next((c for c in REGISTRY if isinstance(module, c)), None)
            if base is not None:
                reason = (f"a subclass of torch.nn.{base.__name__} (its forward may differ "
                          f"from the registered layer's)")
            else:
                reason = f"dlcv_fast has no layer for {cls.__module__}.{cls.__qualname__}"
            summary.left.append((name, cls.__name__, reason))
            return
        for child_name, child in list(module._modules.items()):  # shared ones repeated
            if child is None:
                continue
            visit(child, f"{name}.{child_name}" if name else child_name, module, child_name)

    visit(model, "", None, "")
    # torch takes that path only with batch_first (and more conditions, checked per call).
    fast_path = sum(type(m) is nn.TransformerEncoderLayer and m.self_attn.batch_first
                    and isinstance(m.self_attn, dnn.MultiheadAttention) for m in model.modules())
    if fast_path:
        summary.notes.append(
            f"{fast_path} x TransformerEncoderLayer: in eval mode without grad, torch's fused "
            f"inference path runs in place of the converted MultiheadAttention; "
            f"torch.backends.mha.set_fastpath_enabled(False) turns that path off")
    if fuse_relu:
        summary.fused = fuse_relus(model)
    return summary


def fuse_relus(model: nn.Module) -> int:
    """Folds, in place, each ReLU that directly follows a dlcv_fast Conv2d or BatchNorm2d in
    an ``nn.Sequential`` of ``model`` into that layer (``activation='relu'``: one pass over
    memory each way instead of two), unless either has hooks or is used in more than one
    place. The ReLU's place holds a pass-through, so state_dict keys stay; :func:`revert`
    turns it back. Returns the number of pairs fused."""
    uses = _uses(model)
    return sum(_fuse_in(m, uses) for m in model.modules() if isinstance(m, nn.Sequential))


def _uses(model: nn.Module) -> collections.Counter:
    """How many places of the module tree hold each module (by id)."""
    uses: collections.Counter = collections.Counter()

    def walk(m: nn.Module) -> None:
        uses[id(m)] += 1
        if uses[id(m)] == 1:
            for child in m._modules.values():
                if child is not None:
                    walk(child)

    walk(model)
    return uses


def _quiet(module: nn.Module) -> bool:
    """Activation functions, dropout and reshapes: not reported as left on torch."""
    return isinstance(module, _PASSIVE) or (
        type(module).__module__ == "torch.nn.modules.activation"
        and not (module._parameters or module._modules))


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None))


def _fuse_in(seq: nn.Sequential, uses: collections.Counter) -> int:
    """Fuses the layer+ReLU pairs of one Sequential; a layer used in more than one place
    (a shared ReLU, say) or with hooks is left alone, since its output would change."""
    n = 0
    mods = list(seq._modules.values())
    for layer, relu in zip(mods, mods[1:]):
        if (type(layer) in _FUSABLE and layer.activation is None and type(relu) is nn.ReLU
                and uses[id(layer)] == 1 and uses[id(relu)] == 1
                and not _has_hooks(layer) and not _has_hooks(relu)):
            layer.activation = "relu"
            relu.__class__ = _FusedReLU
            n += 1
    return n


def revert(model: nn.Module) -> collections.Counter:
    """Turns every dlcv_fast layer of ``model`` back into its torch.nn layer, in place
    (also those the model was built with), and un-fuses what ``convert(fuse_relu=True)``
    fused. Returns the counts by type. A Conv2d or batch norm built with
    ``activation='relu'`` (not fused by :func:`convert`) has no single torch.nn layer and
    stays as it is. So does a subclass of a dlcv_fast layer (a user's, or one that
    ``torch.nn.utils.parametrize`` made after the conversion), with a warning naming it."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"revert: model must be a torch.nn.Module, but got "
                        f"{type(model).__name__}")
    counts: collections.Counter = collections.Counter()
    for seq in model.modules():
        if isinstance(seq, nn.Sequential):
            mods = list(seq._modules.values())
            for layer, relu in zip(mods, mods[1:]):
                if isinstance(relu, _FusedReLU) and isinstance(layer, _FUSABLE):
                    layer.activation = None
                    relu.__class__ = nn.ReLU
    done: dict[int, nn.Module] = {}

    def undo(module: nn.Module) -> nn.Module:
        if id(module) in done:
            return done[id(module)]
        new = done[id(module)] = module
        entry = _BY_DLCV.get(type(module))
        if entry is not None and not getattr(module, "activation", None):
            new = done[id(module)] = entry.undo(module)
            counts[entry.torch_cls.__name__] += 1
        elif entry is None and isinstance(module, tuple(_BY_DLCV)):
            subclasses.append(type(module).__name__)
        if new is module:
            for key, child in list(module._modules.items()):
                if child is not None:
                    module._modules[key] = undo(child)
        return new

    subclasses: list[str] = []
    root = undo(model)
    if root is not model:  # the model itself was a dlcv_fast layer of another kind
        raise TypeError(f"revert: the model is a {type(model).__name__}, whose torch.nn "
                        f"layer is a new module; revert a model that contains it")
    if subclasses:
        warnings.warn(f"revert: left {len(subclasses)} layer(s) that subclass dlcv_fast layers "
                      f"as they are ({', '.join(sorted(set(subclasses)))}): only the "
                      f"dlcv_fast classes themselves are turned back into torch.nn layers",
                      stacklevel=2)
    return counts


def torch_equivalent(module: nn.Module) -> nn.Module:
    """A torch.nn module that computes what the dlcv_fast layer ``module`` computes and
    shares its parameters (for timing and checking one layer against PyTorch)."""
    entry = _BY_DLCV.get(type(module))
    if entry is None:
        raise TypeError(f"torch_equivalent: {type(module).__name__} is not a dlcv_fast layer")
    relu = getattr(module, "activation", None) == "relu"
    if entry.in_place:
        twin = object.__new__(type(module))
        twin.__dict__ = dict(module.__dict__)  # shares parameters, buffers and hooks
        twin = entry.undo(twin)
    else:
        twin = entry.undo(module)
    return nn.Sequential(twin, nn.ReLU()) if relu else twin


__all__ = ["REGISTRY", "Entry", "Summary", "Unsupported", "convert", "fuse_relus", "register",
           "revert", "torch_equivalent"]
