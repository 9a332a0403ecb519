"""The ``activation`` keyword that dlcv_fast's layers add to torch's constructors."""

from __future__ import annotations

from dlcv_fast.ops._common import relu_flag


def checked_activation(layer: str, activation):
    relu_flag(layer, activation)
    return activation


def repr_with_activation(extra: str, activation) -> str:
    return extra + f", activation={activation!r}" if activation else extra
