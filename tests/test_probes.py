"""Probes on hand-made tiny models against hand computations, and probes=all through fit()."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnexp import records
from bnexp.measure import probes
from bnexp.measure import modes as stats


class RawPipe:
    def prep(self, x, train=False):
        return x

    def amp(self):
        return contextlib.nullcontext()


def identity_conv(c=1):
    conv = nn.Conv2d(c, c, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(c).view(c, c, 1, 1))
    return conv


def test_noise_matches_a_hand_computation_on_constant_images():
    # Each image is one constant c_i, so a batch's mean is mean(c) and its (biased) variance var(c).
    g = torch.Generator().manual_seed(0)
    consts = {2: torch.randn(6, 2, generator=g), 4: torch.randn(6, 4, generator=g) * 2 + 1}
    batches = {s: [c.view(-1, 1, 1, 1).expand(-1, 1, 3, 3).clone() for c in consts[s]] for s in consts}
    model = nn.Sequential(identity_conv(), nn.BatchNorm2d(1))
    rows = probes.batch_noise(model, batches, RawPipe())

    every = torch.cat([consts[2].flatten(), consts[4].flatten()]).double()
    pop_var = every.var(unbiased=False)  # all batches pooled, as BN's own (biased) statistic
    for s, c in consts.items():
        c = c.double()
        mean_noise = c.mean(1).std() / pop_var.sqrt()
        var_noise = c.var(1, unbiased=False).std() / pop_var
        got = {r["name"]: r["value"] for r in rows if r["batch_size"] == s}
        assert got["noise.mean"] == pytest.approx(mean_noise.item(), rel=1e-5)
        assert got["noise.var"] == pytest.approx(var_noise.item(), rel=1e-5)
    assert {r["layer"] for r in rows} == {"1"}


def two_conv_bn(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def by_hand(model, x, batch_stats: bool):
    """Forward of two_conv_bn with F.batch_norm written out; returns (second conv output, logits)."""
    def bn(z, m):
        if batch_stats:
            return F.batch_norm(z, None, None, m.weight, m.bias, training=True, eps=m.eps)
        return F.batch_norm(z, m.running_mean, m.running_var, m.weight, m.bias, training=False, eps=m.eps)
    pre = model[3](F.relu(bn(model[0](x), model[1])))
    h = F.relu(bn(pre, model[4]))
    return pre, model[8](h.mean((2, 3)))


def test_activations_follow_one_unit_of_the_nonlinearitys_input():
    """Ioffe & Szegedy's Fig. 1: one unit's input to the nonlinearity, i.e. the second BN's output
    (batch statistics, gamma, beta) before the ReLU, in one fixed channel."""
    model = two_conv_bn()
    x = torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    layer = probes.default_layer(model)
    assert layer == "5"  # the ReLU after the second norm layer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with stats.preserved(model):
        unit = probes.pick_unit(model, layer, x, seed=0, unit=None)
        assert unit == probes.pick_unit(model, layer, x, seed=0, unit=None)  # chosen by the seed
        rows = probes.activation_percentiles(model, x, RawPipe(), layer, unit)
    with torch.no_grad():
        pre, _ = by_hand(model, x, batch_stats=True)
        bn_out = F.batch_norm(pre, None, None, model[4].weight, model[4].bias, training=True, eps=model[4].eps)
    expected = torch.quantile(bn_out[:, unit].flatten(), torch.tensor([0.15, 0.5, 0.85]))
    assert [r["name"] for r in rows] == ["activations.p15", "activations.p50", "activations.p85"]
    assert [r["value"] for r in rows] == pytest.approx(expected.tolist(), abs=1e-6)
    assert {r["unit"] for r in rows} == {unit} and 0 <= unit < 5
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match=r"probes\.unit=7"):
        probes.pick_unit(model, layer, x, seed=0, unit=7)


def test_discrepancy_is_batch_stat_minus_ema_on_the_same_images():
    model = two_conv_bn()
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(8, 3, 6, 6, generator=g) + 0.3 for _ in range(3)]
    ys = [torch.randint(0, 3, (8,), generator=g) for _ in range(3)]
    with stats.preserved(model):
        got = {r["name"]: r["value"] for r in probes.discrepancy(model, xs, ys, RawPipe())}
    with torch.no_grad():
        batch = torch.cat([by_hand(model, x, True)[1] for x in xs])
        ema = torch.cat([by_hand(model, x, False)[1] for x in xs])
    y = torch.cat(ys)
    assert got["discrepancy.loss"] == pytest.approx((F.cross_entropy(batch, y) - F.cross_entropy(ema, y)).item(), abs=1e-5)
    acc = lambda logits: (logits.argmax(1) == y).float().mean().item()
    assert got["discrepancy.acc"] == pytest.approx(acc(batch) - acc(ema))
    assert got["discrepancy.logit"] == pytest.approx((batch - ema).abs().mean().item(), rel=1e-5)


def dropout_conv_bn(p, relu: bool, seed=3):
    """Dropout(p) -> 1x1 conv (weight 2) -> BN, trained with momentum None on inputs that are
    N(0, 1) or, with ``relu``, ReLU of N(0, 1) (mean 1 / sqrt(2 pi) != 0); and probe batches."""
    torch.manual_seed(0)
    conv = identity_conv()
    with torch.no_grad():
        conv.weight.fill_(2.0)
    bn = nn.BatchNorm2d(1, momentum=None)  # cumulative average: running_var is the plain mean
    model = nn.Sequential(nn.Dropout(p), conv, bn).train()
    g = torch.Generator().manual_seed(seed)
    draw = lambda: torch.randn(64, 1, 8, 8, generator=g).clamp_min(0.0 if relu else -float("inf"))
    with torch.no_grad():
        for _ in range(100):
            model(draw())
    return model, bn, [draw() for _ in range(20)]


def shift_rows(model, probe):
    with stats.preserved(model):
        rows = {r["name"]: r["value"] for r in probes.variance_shift(model, probe, RawPipe())}
    assert model.training  # restored
    return rows


@pytest.mark.parametrize("p", [0.0, 0.2, 0.5])
def test_variance_shift_of_dropout_before_bn_is_one_over_one_minus_p(p):
    # Dropout(p) -> 1x1 conv (weight 2) -> BN on zero-mean inputs: in train mode the BN input has
    # variance 4 E[x^2] / (1 - p), in eval mode 4 E[x^2]; so running_var / real var ~ 1 / (1 - p).
    model, bn, probe = dropout_conv_bn(p, relu=False)
    rows = shift_rows(model, probe)
    real = torch.var(torch.cat(probe).double() * 2.0)
    ratio = (bn.running_var.double() / real).item()
    assert rows["variance_shift.abs_log"] == pytest.approx(abs(math.log(ratio)), rel=1e-5, abs=1e-9)
    assert rows["variance_shift.max"] == pytest.approx(max(ratio, 1 / ratio), rel=1e-5)
    assert rows["variance_shift.max"] == pytest.approx(1 / (1 - p), rel=0.03)


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_variance_shift_after_relu_counts_variances_not_second_moments(p):
    # After ReLU the input has mean m = 1 / sqrt(2 pi) and E[x^2] = 1/2. Train mode: dropout keeps
    # E[x] and makes E[x^2] = 1 / (2 (1 - p)), so the train/eval variance ratio is
    # (1 / (2 (1 - p)) - m^2) / (1/2 - m^2), larger than 1 / (1 - p), the second-moment ratio.
    model, bn, probe = dropout_conv_bn(p, relu=True)
    m2 = 1 / (2 * math.pi)
    expected = (0.5 / (1 - p) - m2) / (0.5 - m2)
    assert shift_rows(model, probe)["variance_shift.max"] == pytest.approx(expected, rel=0.03)
    assert expected > 1.05 / (1 - p)  # 3% tolerance tells variances from second moments


def test_variance_shift_channels_above_and_below_one_do_not_cancel():
    model = nn.Sequential(identity_conv(2), nn.ReLU(), nn.BatchNorm2d(2))
    probe = [torch.randn(16, 2, 4, 4, generator=torch.Generator().manual_seed(i)) + 0.5 for i in range(4)]
    real = torch.var(torch.cat(probe).clamp_min(0).double(), dim=(0, 2, 3))
    with torch.no_grad():
        model[2].running_var.copy_(real * torch.tensor([1.5, 0.5], dtype=torch.float64))
    rows = shift_rows(model, probe)  # the mean ratio is (1.5 + 0.5) / 2 = 1: no shift, wrongly
    assert rows["variance_shift.abs_log"] == pytest.approx((math.log(1.5) + math.log(2)) / 2, rel=1e-5)
    assert rows["variance_shift.max"] == pytest.approx(2.0, rel=1e-5)


def test_weight_norms_and_effective_lr_only_where_a_norm_follows():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.ReLU(),
                          nn.Conv2d(2, 2, 1), nn.GroupNorm(1, 2))
    rows = probes.weight_norms(model, lr=0.1)
    norm = {r["layer"]: r["value"] for r in rows if r["name"] == "weight_norm.norm"}
    eff = {r["layer"]: r["value"] for r in rows if r["name"] == "weight_norm.effective_lr"}
    for name in ("0", "3", "5"):
        assert norm[name] == pytest.approx(torch.sqrt((model[int(name)].weight ** 2).sum()).item(), rel=1e-6)
    assert set(eff) == {"0", "5"}
    assert eff["0"] == pytest.approx(0.1 / norm["0"] ** 2)


def test_calibration_matches_stats_evaluate_in_eval_mode():
    from test_stats import tiny_setup

    cfg, model, data, pipe = tiny_setup()
    with stats.preserved(model):
        got = {r["name"]: r["value"] for r in probes.calibration(model, data.train, data.test, pipe, 32)}
    model.eval()
    te = stats.evaluate(model, data.test.x, data.test.y, pipe, 7)
    tr = stats.evaluate(model, data.train.x, data.train.y, pipe, 7)
    assert got["calibration.test_acc"] == pytest.approx(te["acc"])
    assert got["calibration.ece"] == pytest.approx(te["ece"], abs=1e-6)
    assert got["calibration.gen_gap"] == pytest.approx(tr["acc"] - te["acc"])


def test_recorder_runs_every_probe_leaves_the_model_alone_and_is_silent_when_off(tmp_path, monkeypatch):
    from test_stats import tiny_setup

    monkeypatch.setattr(probes, "PROBE_IMAGES", 32)

    cfg, model, data, pipe = tiny_setup(extra=["probes=all", "probes.noise_sizes=[4,8]",
                                               "probes.noise_batches=3", "probes.every_steps=5"])
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng, gen = torch.get_rng_state(), pipe.generator.get_state()
    rec = probes.Probes(cfg.probes, model, data, pipe, 16, cfg.seed, tmp_path, lambda: 0.05)
    for step in range(7):
        rec.maybe_record(step, 0)
    rec.end_epoch(7, 0)  # every_steps > 0: epochs do not record
    rows = records.read_jsonl(tmp_path / records.PROBES)
    assert sorted({r["step"] for r in rows}) == [0, 5]
    assert {r["name"].split(".")[0] for r in rows} == set(cfg.probes.names)
    assert len({r["unit"] for r in rows if r["name"].startswith("activations")}) == 1  # one fixed unit
    assert all(set(r) >= {"step", "epoch", "layer", "name", "value"} for r in rows)
    assert {r["batch_size"] for r in rows if r["name"] == "noise.mean"} == {4, 8, 16}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.training
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(pipe.generator.get_state(), gen)
    # a resumed run does not write the steps it already has
    again = probes.Probes(cfg.probes, model, data, pipe, 16, cfg.seed, tmp_path, lambda: 0.05)
    again.maybe_record(5, 0)
    assert len(records.read_jsonl(tmp_path / records.PROBES)) == len(rows)

    cfg, model, data, pipe = tiny_setup(extra=["probes=none"])
    off = probes.Probes(cfg.probes, model, data, pipe, 16, cfg.seed, tmp_path / "off", lambda: 0.05)
    off.maybe_record(0, 0)
    off.end_epoch(1, 0)
    assert not (tmp_path / "off").exists()


def test_probes_work_without_norm_layers(tmp_path, monkeypatch):
    from test_stats import tiny_setup

    monkeypatch.setattr(probes, "PROBE_IMAGES", 32)
    cfg, model, data, pipe = tiny_setup("none", ["probes=all", "probes.noise_batches=2"])
    rows = probes.Probes(cfg.probes, model, data, pipe, 16, cfg.seed, tmp_path, lambda: 0.1).record(0, 0)
    names = {r["name"].split(".")[0] for r in rows}
    assert names == {"calibration", "activations", "weight_norm"}  # no statistics to probe
    assert {r["layer"] for r in rows if r["name"].startswith("activations")} == {"features.1.act"}


def test_fit_with_probes_all_writes_every_probe_and_trains_exactly_as_without(tmp_path, monkeypatch):
    from conftest import TINY, make_config
    from bnexp.training import fit as train

    monkeypatch.setattr(probes, "PROBE_IMAGES", 64)
    base = [*TINY, "optim.epochs=2", "checkpoint=false", "data.synthetic_train=128", "data.batch_size=32",
            "data.synthetic_test=64", "eval.precise_samples=64", "eval.modes=[ema,precise,batch,adapted]"]
    (tmp_path / "on").mkdir()
    (tmp_path / "off").mkdir()
    on = train.fit(make_config([*base, "probes=all", "probes.noise_batches=2",
                                "probes.noise_sizes=[8]"]), tmp_path / "on")
    off = train.fit(make_config(base), tmp_path / "off")
    rows = records.read_jsonl(tmp_path / "on" / records.PROBES)
    assert {r["name"].split(".")[0] for r in rows} == {"noise", "discrepancy", "calibration",
                                                       "activations", "variance_shift", "weight_norm"}
    assert sorted({(r["epoch"], r["step"]) for r in rows}) == [(0, 4), (1, 8)]  # once per epoch
    assert not (tmp_path / "off" / records.PROBES).exists()
    # probes are measurements, not interventions: the same numbers with and without them
    assert on["metrics"] == off["metrics"]
    m = on["metrics"]
    for mode in ("ema", "precise", "batch", "adapted"):
        assert 0 <= m[f"test_acc.{mode}"] <= 1 and m[f"ece.{mode}"] >= 0
    assert m["test_acc"] == m["test_acc.ema"] and on["skipped_modes"] == {}
    assert on["default_mode"] == "ema" and "frozen_after" in on


def test_probe_registry_names_are_the_config_choices():
    from bnexp import config

    assert tuple(probes.PROBES) == config.PROBES
    with pytest.raises(config.ConfigError, match=r"probes\.names='nosie'.*variance_shift"):
        probes.PROBES.get("nosie")


# --- forward_noise: batch-mates' noise in every norm's output ------------------------------------

def test_forward_noise_of_one_bn_layer_matches_a_direct_computation():
    """A single BN layer (train mode, affine) on random data: each batch's statistics from
    torch.var_mean, the probe images' outputs, their spread over batches and the pooled std."""
    from collections import OrderedDict
    from bnexp.measure import forward_noise as fn
    from bnexp.layers.norms import BatchNorm2d

    g = torch.Generator().manual_seed(3)
    layer = BatchNorm2d(3, momentum=0.1)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2.0)
        layer.bias.uniform_(-1.0, 1.0)
    model = nn.Sequential(OrderedDict(norm=layer))
    probe = torch.randn(2, 3, 2, 2, generator=g) * 2 + 1
    batches = [torch.randn(8, 3, 2, 2, generator=g) * torch.tensor([1.0, 3.0, 0.5]).view(1, 3, 1, 1)
               for _ in range(6)]
    running = layer.running_mean.clone(), layer.running_var.clone()
    rows = fn.forward_noise(model, probe, batches, RawPipe())

    where = torch.tensor([0, 4])  # 2 probe images in batches of 8: 4 apart
    outs = []
    for x in batches:
        x = x.clone().double()
        x[where] = probe.double()
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0, keepdim=True)
        w, b = layer.weight.detach().double().view(1, 3, 1, 1), layer.bias.detach().double().view(1, 3, 1, 1)
        outs.append((x - mean) / torch.sqrt(var + 1e-5) * w + b)
    outs = torch.stack(outs)  # [R, B, C, H, W]
    spread = outs[:, where].var(0).mean((0, 2, 3)).sqrt()
    signal = outs.transpose(0, 2).reshape(3, -1).std(1, unbiased=False)
    assert [r["layer"] for r in rows] == ["norm"] and rows[0]["name"] == "forward_noise.ratio"
    assert rows[0]["value"] == pytest.approx((spread / signal).mean().item(), rel=1e-4)
    assert torch.equal(layer.running_mean, running[0]) and torch.equal(layer.running_var, running[1])


def test_forward_noise_of_bn_shrinks_as_one_over_sqrt_batch():
    """A BN layer on i.i.d. N(0, 1) values: x_hat = (x - mu_B) / sigma_B moves by about
    sqrt((1 + x^2 / 2) / B) across batches (delta method), against a pooled std of 1."""
    from collections import OrderedDict
    from bnexp.measure import forward_noise as fn

    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(OrderedDict(norm=nn.BatchNorm2d(64, affine=False)))
    got = {}
    for size in (16, 64):
        probe = torch.randn(1, 64, 1, 1, generator=g)
        batches = [torch.randn(size, 64, 1, 1, generator=g) for _ in range(400)]
        got[size] = fn.forward_noise(model, probe, batches, RawPipe())[0]["value"]
        want = ((1 + probe.flatten().square() / 2) / size).sqrt().mean().item()
        assert got[size] == pytest.approx(want, rel=0.15)
    assert got[16] / got[64] == pytest.approx(2.0, rel=0.15)


@pytest.mark.parametrize("norm,extra,noisy", [
    ("none", [], False), ("ln", [], False), ("gn", [], False), ("pn", [], False),
    ("bn", [], True), ("ghost_bn", ["norm.virtual_batch=4"], True),
    ("noisy_bn", ["norm.noise_mul=0.2"], True),
    ("none", ["norm.ghost_noise=4"], True), ("ln", ["norm.ghost_noise=4"], True),
    ("pn", ["norm.ghost_noise=4"], True)])
def test_forward_noise_is_exactly_zero_without_batch_dependence(norm, extra, noisy):
    """Every normalization position of the net has a row; the value is exactly 0 when a sample's
    output depends on its own input only, > 0 with batch statistics or injected noise."""
    from test_stats import tiny_setup
    from bnexp.measure import forward_noise as fn

    cfg, model, data, pipe = tiny_setup(norm, extra)
    batches = [pipe.prep(data.train.x[i * 16:(i + 1) * 16]) for i in range(4)]
    probe = pipe.prep(data.test.x[:1])
    with stats.preserved(model):
        rows = fn.forward_noise(model, probe, batches, pipe)
    assert [r["layer"] for r in rows] == [f"features.{i}.norm" for i in range(4)]
    values = [r["value"] for r in rows]
    if noisy:
        assert all(v > 1e-3 for v in values), values
    else:
        assert values == [0.0] * 4


def test_forward_noise_of_frozen_bn_is_zero_and_dropout_stays_off():
    from test_stats import tiny_setup
    from bnexp.measure import forward_noise as fn
    from bnexp.layers import norms

    cfg, model, data, pipe = tiny_setup("bn", ["model.dropout=0.5", "model.dropout_placement=before_norm"])
    norms.set_frozen(model, True)  # FrozenBN: training normalizes with the running statistics
    batches = [pipe.prep(data.train.x[i * 16:(i + 1) * 16]) for i in range(3)]
    with stats.preserved(model):
        rows = fn.forward_noise(model, pipe.prep(data.test.x[:1]), batches, pipe)
    assert [r["value"] for r in rows] == [0.0] * 4  # dropout would make it > 0


def test_forward_noise_probe_records_every_position_and_leaves_the_model_alone(tmp_path):
    from test_stats import tiny_setup

    cfg, model, data, pipe = tiny_setup("ln", ["probes=all", "probes.names=[forward_noise]",
                                               "probes.noise_batches=3", "norm.ghost_noise=4"])
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng, gen = torch.get_rng_state(), pipe.generator.get_state()
    rec = probes.Probes(cfg.probes, model, data, pipe, 32, cfg.seed, tmp_path, lambda: 0.05)
    rows = rec.record(0, 0)
    again = rec.record(1, 0)
    assert {r["layer"] for r in rows} == {f"features.{i}.norm" for i in range(4)}
    assert all(r["name"] == "forward_noise.ratio" and r["value"] > 0 for r in rows)
    # the same images and (RNG restored) the same ghost draws: the value moves only as the model does
    assert [r["value"] for r in again] == [r["value"] for r in rows]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.training
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(pipe.generator.get_state(), gen)
