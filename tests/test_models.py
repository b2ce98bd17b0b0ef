"""Models x every registered norm x dropout placement: shapes, gradients, structure, invariances."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from bnexp import config
from bnexp.config import DROPOUT_PLACEMENTS, ModelConfig
from bnexp.layers.models import MODELS, ResNet, VGG, build_model, downsamples
from bnexp.layers.norms import NORMS, BatchNorm2d, make_norm

SMALL = {"vgg": {"width": 8, "depth": 4}, "resnet": {"width": 8, "depth": 8}}


def small_model(name, norm, norm_cfg, dropout=0.0, placement="classifier", in_channels=3,
                image_size=32, **kw):
    """The registry's builder for ``name``, as ``build_model`` calls it."""
    layer = make_norm(norm_cfg(name=norm, virtual_batch=2, noise_mul=0.1, noise_add=0.1))
    cfg = ModelConfig(name=name, dropout=dropout, dropout_placement=placement, **{**SMALL[name], **kw})
    return MODELS.get(name)(cfg, layer, 10, in_channels, image_size)


def images(n=4, seed=0, channels=3, size=32):
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def test_registry_names_are_the_configs_choices():
    assert MODELS.names() == config.MODELS and MODELS.setting == "model.name"


@pytest.mark.parametrize("placement", DROPOUT_PLACEMENTS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_is_finite(name, norm, placement, norm_cfg):
    torch.manual_seed(0)
    model = small_model(name, norm, norm_cfg, dropout=0.3, placement=placement)
    logits = model(images())
    logits.logsumexp(1).sum().backward()
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert isinstance(model.head, nn.Linear) and model.head.out_features == 10


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", MODELS)
def test_conv_bias_only_without_a_real_norm(name, norm, norm_cfg):
    model = small_model(name, norm, norm_cfg)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all((c.bias is not None) == (norm == "none") for c in convs)


@pytest.mark.parametrize("mode, norm", [("train", "gn"), ("train", "ln"), ("train", "none"),
                                        ("eval", "bn"), ("eval", "ghost_bn"), ("eval", "batch_renorm"),
                                        ("eval", "noisy_bn")])
@pytest.mark.parametrize("name", MODELS)
def test_per_sample_norms_do_not_mix_samples(name, mode, norm, norm_cfg):
    """A sample's logits alone equal its logits inside a batch: GN/LN always, BN-likes in eval."""
    model = small_model(name, norm, norm_cfg).train(mode == "train")
    x = images(4)
    with torch.no_grad():
        torch.testing.assert_close(model(x[:1]), model(x)[:1], rtol=1e-4, atol=1e-5)


def test_train_mode_bn_does_mix_samples(norm_cfg):
    """The control for the test above: batch statistics make a sample depend on the others."""
    model = small_model("vgg", "bn", norm_cfg)
    x = images(4)
    assert not torch.allclose(model(x[:2])[:1], model(x)[:1], atol=1e-3)


def dropout_sites(model):
    return [name for name, m in model.named_modules() if isinstance(m, nn.Dropout)]


@pytest.mark.parametrize("name, depth, before_count", [("vgg", 8, 7), ("vgg", 4, 3), ("resnet", 14, 12)])
def test_dropout_placements(name, depth, before_count, norm_cfg):
    kw = dict(dropout=0.3, depth=depth)
    before = dropout_sites(small_model(name, "bn", norm_cfg, placement="before_norm", **kw))
    assert len(before) == before_count  # every conv input but the first (ResNet: not the shortcut)
    assert all(site.startswith("features.") for site in before)
    assert dropout_sites(small_model(name, "bn", norm_cfg, placement="after_norm", **kw)) == ["drop_features"]
    assert dropout_sites(small_model(name, "bn", norm_cfg, placement="classifier", **kw)) == ["drop_head"]
    for placement in DROPOUT_PLACEMENTS:
        no_drop = small_model(name, "bn", norm_cfg, placement=placement, dropout=0.0, depth=depth)
        assert dropout_sites(no_drop) == []


def test_before_norm_dropout_feeds_each_conv(norm_cfg):
    """In VGG the dropout sits right before the conv of every block but the first."""
    model = small_model("vgg", "bn", norm_cfg, dropout=0.5, placement="before_norm")
    for i, block in enumerate(model.features):
        names = [n for n, _ in block.named_children()]
        assert names[names.index("conv") - 1:names.index("conv")] == ([] if i == 0 else ["drop"])


def test_after_norm_dropout_acts_after_the_last_activation(norm_cfg):
    model = small_model("resnet", "bn", norm_cfg, dropout=0.5, placement="after_norm").eval()
    seen = {}
    model.features.register_forward_hook(lambda m, i, o: seen.setdefault("features", o))
    model.drop_features.register_forward_hook(lambda m, i, o: seen.setdefault("dropped", o))
    model.drop_features.train()
    model(images())
    assert (seen["features"] >= 0).all()  # the input of drop_features is the last ReLU's output
    kept = seen["dropped"] != 0
    assert 0.4 < kept[seen["features"] > 0].float().mean() < 0.6
    torch.testing.assert_close(seen["dropped"][kept], 2 * seen["features"][kept])


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", MODELS)
def test_channels_last_gives_the_same_outputs(name, norm, norm_cfg):
    if norm == "noisy_bn":
        pytest.skip("random noise: covered by noisy_bn == bn without noise")
    torch.manual_seed(0)
    model = small_model(name, norm, norm_cfg)
    cl = small_model(name, norm, norm_cfg).to(memory_format=torch.channels_last)
    cl.load_state_dict(model.state_dict())
    x = images(6)
    want = model(x)
    got = cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_stable_layer_names(norm_cfg):
    vgg_names = dict(small_model("vgg", "bn", norm_cfg, depth=8).named_modules())
    assert isinstance(vgg_names["features.0.conv"], nn.Conv2d)
    assert isinstance(vgg_names["features.7.norm"], BatchNorm2d)
    assert isinstance(vgg_names["features.2.pool"], nn.MaxPool2d)
    res_names = dict(small_model("resnet", "bn", norm_cfg, depth=14).named_modules())
    for name in ("features.stem.conv", "features.stage1.1.norm2", "features.stage2.0.shortcut.conv",
                 "features.stage3.1.conv1", "head"):
        assert name in res_names
    assert "features.stage1.0.shortcut.conv" not in res_names  # identity where shapes match


def test_resnet20_has_the_papers_parameter_count():
    """He et al. 2016 Table 6: ResNet-20 on CIFAR-10 has 0.27M parameters."""
    model = ResNet(10, nn.BatchNorm2d, width=16, depth=20)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(0.27e6, rel=0.02)


def test_vgg_widths_and_downsampling():
    model = VGG(10, nn.BatchNorm2d, width=8, depth=8)
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [8, 8, 16, 16, 32, 32, 64, 64]
    assert model.features(images(2)).shape == (2, 64, 4, 4)


@pytest.mark.parametrize("name, depth", [("vgg", 6), ("vgg", 0), ("resnet", 18), ("resnet", 2)])
def test_invalid_depth_names_the_setting(name, depth, norm_cfg):
    with pytest.raises(ValueError, match=rf"model\.depth={depth}.*{name}"):
        small_model(name, "bn", norm_cfg, depth=depth)


def test_build_model_reads_its_config_section(norm_cfg):
    cfg = ModelConfig(name="resnet", width=4, depth=8, dropout=0.2, dropout_placement="after_norm")
    model = build_model(cfg, make_norm(norm_cfg(name="gn")), num_classes=7)
    assert isinstance(model, ResNet) and model.head.out_features == 7
    assert dropout_sites(model) == ["drop_features"]
    assert isinstance(model.features.stem.norm, nn.GroupNorm)
    assert model.features.stem.conv.in_channels == 3  # build_model's default: CIFAR's shape
    grey = build_model(cfg, make_norm(norm_cfg(name="gn")), 7, in_channels=1, image_size=28)
    assert grey.features.stem.conv.in_channels == 1 and grey(images(2, channels=1, size=28)).shape == (2, 7)
    with pytest.raises(ValueError, match=r"model\.name='alexnet'.*vgg"):
        build_model(ModelConfig("alexnet", 4, 8, 0.0, "classifier"), nn.BatchNorm2d, 10)
    with pytest.raises(ValueError, match=r"model\.dropout_placement='everywhere'"):
        build_model(ModelConfig("vgg", 4, 8, 0.1, "everywhere"), nn.BatchNorm2d, 10)


# ------------------------------------------------------------------- input shape from the data

@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", MODELS)
def test_one_channel_28px_inputs_through_every_model_and_norm(name, norm, norm_cfg):
    """Fashion-MNIST's shape: the first conv takes 1 channel; train and eval forward, backward."""
    torch.manual_seed(0)
    model = small_model(name, norm, norm_cfg, in_channels=1, image_size=28)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 1
    x = images(4, channels=1, size=28)
    logits = model.train()(x)
    logits.logsumexp(1).sum().backward()
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        assert torch.isfinite(model.eval()(x)).all()
    with pytest.raises(RuntimeError):  # a 3-channel image is refused, not silently adapted
        model(images(4, channels=3, size=28))


def rule_sizes(size: int, stages: int) -> list[int]:
    """Map size entering each stage after the first, by the rule as stated in bnexp.layers.models:
    halve (floor, as a 2x2 max-pool or a stride-2 conv of these nets) only from 4x4 up."""
    sizes = []
    for _ in range(stages - 1):
        size = size // 2 if size >= 4 else size
        sizes.append(size)
    return sizes


@pytest.mark.parametrize("size, vgg_final, resnet_final", [(32, 4, 8), (28, 3, 7), (12, 3, 3),
                                                           (8, 2, 2), (6, 3, 3), (4, 2, 2)])
def test_no_pooling_rule(size, vgg_final, resnet_final):
    """28 -> 14 -> 7 -> 3 and 32 -> 16 -> 8 -> 4 for VGG; never a map below 2x2 (the finals are
    worked out by hand from the docstring's rule, the per-stage sizes by ``rule_sizes``)."""
    assert rule_sizes(size, 4)[-1] == vgg_final and rule_sizes(size, 3)[-1] == resnet_final
    assert [downsamples(s) for s in (3, 4, 7, 28)] == [False, True, True, True]
    for model, stages, final in ((VGG(10, nn.BatchNorm2d, width=4, depth=4, in_channels=1, image_size=size), 4, vgg_final),
                                 (ResNet(10, nn.BatchNorm2d, width=4, depth=8, in_channels=1, image_size=size), 3, resnet_final)):
        seen = []
        stage_inputs = ([model.features[i] for i in range(1, 4)] if stages == 4 else
                        [model.features.stage2, model.features.stage3])
        for block in stage_inputs:
            block.register_forward_hook(lambda m, i, o, seen=seen: seen.append(o.shape[-1]))
        out = model.features(images(2, channels=1, size=size))
        assert seen == rule_sizes(size, stages) and out.shape[-2:] == (final, final)
        assert min(seen) >= 2
    pools = sum(isinstance(m, nn.MaxPool2d) for m in VGG(10, nn.BatchNorm2d, width=4, depth=8, image_size=size).modules())
    assert pools == sum(b < a for a, b in itertools.pairwise([size, *rule_sizes(size, 4)]))
