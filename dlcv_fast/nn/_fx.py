"""torch.fx symbolic tracing sees dlcv_fast's layers as it sees torch.nn's: one
``call_module`` node each. FX's default tracer treats torch.nn layers as leaves but traces
into other modules, whose Python (argument checks, ``if input.dim() != 4``) cannot run on
its proxies; torchvision's feature extraction and FX quantisation trace this way."""

from __future__ import annotations

import torch.fx


def traced_as_leaf(module, *args, **kwargs):
    """Under symbolic tracing (a Proxy among the arguments), the layer's call as one node of
    the graph, as for a leaf module; otherwise None and the layer runs."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.fx.Proxy):
            tracer = value.tracer
            path = tracer.path_of_module(module)
            if not path:  # the traced root: a graph cannot call its own module
                raise TypeError(f"torch.fx: dlcv_fast's {type(module).__name__} traces as one "
                                "node of the model that holds it; trace such a model (e.g. "
                                "torch.nn.Sequential(layer)), not the layer alone")
            return tracer.create_proxy("call_module", path, args, kwargs)
    return None
