"""Pretrained weights come from torchvision: the architectures share its state_dict."""

from __future__ import annotations

import torch


def load_torchvision_weights(model: torch.nn.Module, name: str, weights, progress: bool):
    """Loads torchvision's ``weights`` (an enum member or its name, as torchvision takes
    them) for the model ``name`` into ``model``; downloads them as torchvision does."""
    if weights is None:
        return model
    import torchvision

    weights = torchvision.models.get_model_weights(name).verify(weights)
    model.load_state_dict(weights.get_state_dict(progress=progress, check_hash=True))
    return model
