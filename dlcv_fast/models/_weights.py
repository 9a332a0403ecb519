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


def override_param(kwargs: dict, name: str, value) -> None:
    """Sets ``kwargs[name] = value`` for pretrained weights that need that value; a
    different value given by the caller is an error, as in torchvision."""
    if name in kwargs and kwargs[name] != value:
        raise ValueError(f"{name} must be {value!r} with pretrained weights, but got "
                         f"{kwargs[name]!r}")
    kwargs[name] = value


def verified_weights(name: str, weights, kwargs: dict):
    """torchvision's weights enum member for ``weights`` (None stays None), and
    ``kwargs["num_classes"]`` set to its number of categories (another value given is an
    error before anything is built or downloaded, as in torchvision)."""
    if weights is None:
        return None
    import torchvision

    weights = torchvision.models.get_model_weights(name).verify(weights)
    override_param(kwargs, "num_classes", len(weights.meta["categories"]))
    return weights
