"""Batch normalisation layers: BatchNorm1d, BatchNorm2d and SyncBatchNorm."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from dlcv_fast import backend
from dlcv_fast.nn._activation import checked_activation, repr_with_activation
from dlcv_fast.nn._fx import traced_as_leaf
from dlcv_fast.ops import batch_norm as bn_ops
from dlcv_fast.ops.batch_norm import batch_norm


def _factor_and_buffers(m: torch.nn.modules.batchnorm._BatchNorm):
    """(training, momentum factor, running_mean, running_var) of a forward pass, by the
    rules of torch.nn's batch norm: num_batches_tracked counts training steps, and with
    momentum=None the running statistics are a cumulative average (factor 1 / steps)."""
    factor = 0.0 if m.momentum is None else m.momentum
    if m.training and m.track_running_stats and m.num_batches_tracked is not None:
        m.num_batches_tracked.add_(1)
        if m.momentum is None:
            factor = 1.0 / float(m.num_batches_tracked)
    training = m.training or (m.running_mean is None and m.running_var is None)
    use_buffers = not m.training or m.track_running_stats
    return (training, factor, m.running_mean if use_buffers else None,
            m.running_var if use_buffers else None)


class _Forward:
    activation = None  # for a torch layer given this class in place (dlcv_fast.convert)

    def __init__(self, *args, activation: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.activation = checked_activation(type(self).__name__, activation)

    def extra_repr(self) -> str:
        return repr_with_activation(super().extra_repr(), self.activation)

    def forward(self, input: Tensor) -> Tensor:
        traced = traced_as_leaf(self, input)
        if traced is not None:
            return traced
        self._check_input_dim(input)
        training, factor, rm, rv = _factor_and_buffers(self)
        return batch_norm(input, rm, rv, self.weight, self.bias, training, factor, self.eps,
                          activation=self.activation)


class BatchNorm1d(_Forward, torch.nn.BatchNorm1d):
    """:class:`torch.nn.BatchNorm1d` on dlcv_fast's kernels: a subclass, so the
    constructor, parameters, buffers (running_mean, running_var, num_batches_tracked),
    state_dict keys and repr are torch's; (N, C) or (N, C, L) input. One keyword more:
    ``activation='relu'`` applies a ReLU in the same pass (shown in the repr)."""


class BatchNorm2d(_Forward, torch.nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` on dlcv_fast's kernels: a subclass, so the
    constructor, parameters, buffers, state_dict keys and repr are torch's; (N, C, H, W)
    input, NCHW or channels_last. One keyword more: ``activation='relu'`` applies a ReLU in
    the same pass, forward and backward (shown in the repr)."""


def _all_gather(t: Tensor, group, world: int) -> Tensor:
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t, group=group)
    return torch.stack(out)


class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch statistics over every process of the group: each gathers every (count, mean,
    biased variance) and merges them count-weighted (Chan), so uneven per-process batches are
    right; backward all-reduces (sum_dy, sum_dy_xmu). grad_weight and grad_bias stay local,
    as in torch.nn.SyncBatchNorm (DistributedDataParallel reduces parameter gradients)."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, momentum, eps, group,
                world, relu, parts):
        stats, elemt, reduce, grad_elemt = parts
        C = input.shape[1]
        count = input.numel() // C if C else 0
        mean, var = stats(input)
        acc = mean.dtype
        packed = torch.cat([mean.new_full((1,), count), mean, var])  # no host-to-device copy
        every = _all_gather(packed, group, world)
        counts, means, variances = every[:, :1], every[:, 1:C + 1], every[:, C + 1:]
        total = counts.sum()
        n = int(total.item())
        if n <= 1:
            raise ValueError("Expected more than 1 value per channel when training, got "
                             f"{n} values per channel over all processes")
        mean = (counts * means).sum(0) / total
        m2 = (counts * (variances + (means - mean).square())).sum(0)
        var = m2 / total
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None:
            running_mean.copy_(momentum * mean + (1 - momentum) * running_mean.to(acc))
            running_var.copy_(momentum * (m2 / (total - 1)) + (1 - momentum) * running_var.to(acc))
        ctx.save_for_backward(input, weight, bias, mean, invstd)
        ctx.n, ctx.group, ctx.world, ctx.relu, ctx.parts = n, group, world, relu, parts
        return elemt(input, weight, bias, mean, invstd, relu)

    @staticmethod
    @once_differentiable  # no double backward across processes: an error, not a silent zero
    def backward(ctx, grad):
        input, weight, bias, mean, invstd = ctx.saved_tensors
        _, _, reduce, grad_elemt = ctx.parts
        grad = grad.contiguous(memory_format=bn_ops.layout(input)[1])
        sum_dy, sum_dy_xmu = reduce(grad, input, weight, bias, mean, invstd, ctx.relu)
        gw = (sum_dy_xmu * invstd).to(weight.dtype) if ctx.needs_input_grad[1] else None
        gb = sum_dy.to(bias.dtype) if ctx.needs_input_grad[2] else None
        gx = None
        if ctx.needs_input_grad[0]:
            both = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(both, group=ctx.group)
            C = sum_dy.shape[0]
            gx = grad_elemt(grad, input, weight, bias, mean, invstd, both[:C].contiguous(),
                            both[C:].contiguous(), ctx.n, ctx.relu)
        return gx, gw, gb, None, None, None, None, None, None, None, None


class SyncBatchNorm(_Forward, torch.nn.SyncBatchNorm):
    """:class:`torch.nn.SyncBatchNorm` on dlcv_fast's kernels: in training, with
    torch.distributed initialised and more than one process in ``process_group``, the
    batch statistics are those of the whole group's batch (count-weighted, so per-process
    batches may differ in size, and one process may hold a single sample or none), forward
    and backward. Otherwise a plain batch norm. Runs on CPU tensors (gloo) as well as CUDA
    tensors (nccl). A subclass: constructor, buffers, state_dict keys and repr are torch's.
    One keyword more: ``activation='relu'`` applies a ReLU in the same pass (shown in the
    repr)."""

    def forward(self, input: Tensor) -> Tensor:
        traced = traced_as_leaf(self, input)
        if traced is not None:
            return traced
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        training, factor, rm, rv = _factor_and_buffers(self)
        group = self.process_group or (dist.group.WORLD if dist.is_available()
                                       and dist.is_initialized() else None)
        world = dist.get_world_size(group) if group is not None else 1
        if not (training and self.training and world > 1):
            return batch_norm(input, rm, rv, self.weight, self.bias, training, factor, self.eps,
                              activation=self.activation)
        # One sample on this process is fine: the count that must exceed 1 is the group's,
        # checked on the gathered counts (every process raises alike, so none hangs).
        bn_ops.check_forward(input, self.weight, self.bias, rm, rv, True, self.eps,
                             op="SyncBatchNorm", local_count=False)
        parts = bn_ops.parts(backend.resolve("batch_norm", input))
        return _SyncBatchNormFunction.apply(input, self.weight, self.bias, rm, rv, factor,
                                            self.eps, group, world,
                                            self.activation == "relu", parts)

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None):
        """``module`` with every batch-norm layer (torch's or dlcv_fast's) replaced by a
        dlcv_fast SyncBatchNorm holding the same parameters, buffers, mode and fused
        activation."""
        out = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and \
                not isinstance(module, SyncBatchNorm):
            out = cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats, process_group, bias=module.bias is not None,
                      activation=getattr(module, "activation", None))
            if module.affine:
                with torch.no_grad():
                    out.weight = module.weight
                    out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        del module
        return out


__all__ = ["BatchNorm1d", "BatchNorm2d", "SyncBatchNorm"]
