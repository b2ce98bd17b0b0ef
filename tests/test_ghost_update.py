"""norm.ghost_update: ghost BN's running statistics per step (chunk average) or per chunk."""
from __future__ import annotations

import pytest
import torch

from bnexp.config import ConfigError
from bnexp.layers.batchnorms import GhostBatchNorm2d
from bnexp.layers.norms import make_norm
from conftest import TINY, make_config


def chunk_stats(x: torch.Tensor, sizes):
    """Each contiguous chunk's per-channel mean and unbiased variance, by hand."""
    out, start = [], 0
    for n in sizes:
        part = x[start:start + n].transpose(0, 1).reshape(x.shape[1], -1)
        out.append((part.mean(1), part.var(1, unbiased=True)))
        start += n
    return out


@pytest.mark.parametrize("batch, sizes", [(12, [4, 4, 4]), (10, [4, 4, 2])])
def test_per_chunk_update_is_one_momentum_step_per_chunk_in_order(batch, sizes):
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 5, 5) * 2 + 1
    layer = GhostBatchNorm2d(3, virtual_batch=4, update="chunk", momentum=0.1).train()
    mean, var = layer.running_mean.clone(), layer.running_var.clone()
    y = layer(x)
    for m, v in chunk_stats(x, sizes):
        mean, var = 0.9 * mean + 0.1 * m, 0.9 * var + 0.1 * v
    assert torch.allclose(layer.running_mean, mean, atol=1e-6)
    assert torch.allclose(layer.running_var, var, atol=1e-6)
    assert int(layer.num_batches_tracked) == len(sizes)
    step = GhostBatchNorm2d(3, virtual_batch=4, momentum=0.1).train()
    assert torch.equal(step(x), y)  # the normalization itself does not change


def test_equal_chunks_give_the_effective_momentum_of_hoffers_big_batch():
    """Every chunk the same: the buffer moves by 1 - 0.9^k of the way, k = chunks per step."""
    x = torch.randn(4, 2, 3, 3).repeat(4, 1, 1, 1)  # 4 identical chunks of 4
    layer = GhostBatchNorm2d(2, virtual_batch=4, update="chunk", momentum=0.1).train()
    layer(x)
    target = chunk_stats(x, [4])[0][0]
    assert torch.allclose(layer.running_mean, (1 - 0.9 ** 4) * target, atol=1e-6)


def test_the_setting_reaches_the_layer_and_is_checked():
    cfg = make_config([*TINY, "norm=ghost_bn", "norm.ghost_update=chunk"])
    assert make_norm(cfg.norm)(3).update == "chunk"
    assert make_norm(make_config([*TINY, "norm=ghost_bn"]).norm)(3).update == "step"
    with pytest.raises(ConfigError, match="norm.ghost_update"):
        make_config([*TINY, "norm.ghost_update=batch"])
