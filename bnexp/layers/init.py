"""Weight initializations chosen by ``model.init`` (after the model is built and seeded).

* ``kaiming``: the models' own init (``models._init_weights``: Kaiming-normal convs with
  ``fan_out``, as torchvision's ResNets; nn.Linear's default head). Nothing is changed.
* ``lsuv``: layer-sequential unit variance (Mishkin & Matas, ICLR 2016): orthonormal weights, then,
  layer by layer in module order, the weight rescaled until the layer's output on a probe batch
  of training images has variance 1 (within ``tol``, at most ``max_iter`` rescalings).

Norm layers are left at weight 1 / bias 0. For nets with a norm after every conv the choice
hardly matters (the norm rescales); it is meant for ``norm=none`` and its noise variants.

Measured at init (unnormalized VGG, width 8, 256 synthetic images, eval mode), each conv's and the
head's output variance in order: ``kaiming`` depth 4: 0.82 1.13 0.36 0.24 0.025; depth 8: 0.72 ...
0.26 0.046 (the head's logits nearly flat); ``lsuv``: 1.00 at every layer. A fan_in Kaiming was
tried and dropped: the 2x2 max pools raise the second moment, and its variances grew to 9.3
(depth 4) and 10.3 (depth 8).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

INITS = ("kaiming", "lsuv")
LSUV_BATCH = 256  # training images in the probe batch


def apply(model: nn.Module, name: str, probe: Callable[[], torch.Tensor]) -> dict:
    """Initialize ``model`` as ``name`` says; ``probe()`` gives the input batch LSUV needs (called
    only for ``lsuv``). Returns ``{layer: output variance}`` for ``lsuv``, else ``{}``."""
    if name == "kaiming":
        return {}
    if name == "lsuv":
        return lsuv(model, probe())
    raise ValueError(f"model.init={name!r} is not an option; allowed values: {', '.join(INITS)}")


def weighted(model: nn.Module) -> dict[str, nn.Module]:
    """The convs and linear layers of ``model`` by name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


@torch.no_grad()
def lsuv(model: nn.Module, x: torch.Tensor, tol: float = 0.05, max_iter: int = 10) -> dict:
    """LSUV on ``x`` (model inputs), in eval mode (dropout off; norm layers use their initial
    running statistics, which no forward pass here changes). The training flag is restored.
    Returns each layer's final output variance on ``x``."""
    was_training = model.training
    model.eval()
    final = {}
    try:
        for name, layer in weighted(model).items():
            # drawn contiguous: orthogonal_ views the weight as 2-d, which channels_last breaks
            layer.weight.copy_(nn.init.orthogonal_(torch.empty(layer.weight.shape, device=layer.weight.device)))
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
            for _ in range(max_iter):
                var = output_variance(model, layer, x)
                if abs(var - 1.0) < tol or var == 0:
                    break
                layer.weight.div_(var ** 0.5)
            final[name] = output_variance(model, layer, x)
    finally:
        model.train(was_training)
    return final


def output_variance(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> float:
    """Variance of ``layer``'s output over all its elements when ``model`` runs on ``x``."""
    seen = []
    handle = layer.register_forward_hook(lambda m, i, out: seen.append(out.detach().float().var().item()))
    try:
        model(x)
    finally:
        handle.remove()
    return seen[0]
