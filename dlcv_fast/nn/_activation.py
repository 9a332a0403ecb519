"""The ``activation`` keyword that dlcv_fast's layers add to torch's constructors."""

from __future__ import annotations

from dlcv_fast.ops.conv2d import ACTIVATIONS


def checked_activation(layer: str, activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"{layer}: activation must be None or 'relu', but got {activation!r}")
    return activation


def repr_with_activation(extra: str, activation) -> str:
    return extra + f", activation={activation!r}" if activation else extra
