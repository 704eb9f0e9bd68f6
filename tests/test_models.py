"""models/: exact counts, published MACs, DM semantics, the trainer-facing API."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import create_model, list_models, resolve_config
from models.flops import forward_macs, train_flops_per_image
from models.layers import _ACT_FN, ACT_GAMMA, GammaAct, WSConv2d, same_pad_amount, stochastic_depth

PARAMS = {0: 71_489_284, 1: 132_634_256, 2: 193_779_228, 3: 254_924_200,
          4: 316_069_172, 5: 377_214_144, 6: 438_359_116, 7: 499_504_088}  # fmt: skip
# Published GMACs at the test resolution (DM README; spec table 1a).
PUBLISHED_GMACS = {0: (256, 12.38), 1: (320, 35.54), 2: (352, 62.59), 3: (416, 114.76),
                   4: (512, 215.24), 5: (544, 289.76), 6: (576, 377.28)}  # fmt: skip
# "+" variants: millions of parameters, spec table 1b (derived independently of our code).
PLUS_PARAMS_M = {0: 118.82, 1: 220.36, 2: 321.89, 3: 423.42, 4: 524.95, 5: 626.49, 6: 728.02, 7: 829.55}


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("n", range(8))
def test_exact_parameter_counts(n):
    assert n_params(create_model(f"nfnet_f{n}", device="meta")) == PARAMS[n]


@pytest.mark.parametrize("n", range(8))
def test_plus_parameter_counts(n):
    count = n_params(create_model(f"nfnet_f{n}plus", device="meta"))
    assert round(count / 1e6, 2) == pytest.approx(PLUS_PARAMS_M[n], abs=0.011)


@pytest.mark.parametrize("n", sorted(PUBLISHED_GMACS))
def test_forward_macs_match_published(n):
    res, gmacs = PUBLISHED_GMACS[n]
    ours = forward_macs(resolve_config(f"nfnet_f{n}"), res) / 1e9
    assert ours == pytest.approx(gmacs, rel=0.005)


def test_training_flops_are_forward_plus_backward():
    cfg = resolve_config("nfnet_f0")
    fwd = 2 * forward_macs(cfg, 192)
    train = train_flops_per_image(cfg, 192)
    # backward = 2x forward except the first conv's input gradient, which is not computed
    assert 2.9 * fwd < train < 3.0 * fwd
    # F0 at the train resolution: 6.98 GMACs (spec table 7)
    assert fwd / 2 / 1e9 == pytest.approx(6.98, rel=0.005)


def test_list_and_unknown_names():
    names = list_models()
    for n in range(8):
        assert f"nfnet_f{n}" in names and f"nfnet_f{n}plus" in names
    with pytest.raises(ValueError) as e:
        create_model("nfnet_f9")
    assert "nfnet_f0" in str(e.value) and "nfnet_f7plus" in str(e.value)
    with pytest.raises(ValueError, match="unknown NFNet config fields"):
        create_model("nfnet_f0", not_a_field=1, device="meta")


def test_no_normalization_layers():
    norm_types = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)
    for name in ("nfnet_f0", "nfnet_f3plus", "nfnet_nano"):
        model = create_model(name, device="meta")
        offenders = [n for n, m in model.named_modules() if isinstance(m, norm_types) or "norm" in type(m).__name__.lower()]
        assert offenders == []


def test_beta_and_stochastic_depth_schedule_f0():
    # spec 2c, table "F0 schedule": (expected var, beta, sd rate) per block
    table = [(1.00, 1.0000, 0.0000), (1.04, 0.9806, 0.0208), (1.04, 0.9806, 0.0417), (1.08, 0.9623, 0.0625),
             (1.04, 0.9806, 0.0833), (1.08, 0.9623, 0.1042), (1.12, 0.9449, 0.1250), (1.16, 0.9285, 0.1458),
             (1.20, 0.9129, 0.1667), (1.24, 0.8980, 0.1875), (1.04, 0.9806, 0.2083), (1.08, 0.9623, 0.2292)]  # fmt: skip
    blocks = create_model("nfnet_f0", device="meta").blocks()
    assert len(blocks) == len(table)
    for block, (var, beta, sd) in zip(blocks, table):
        assert block.expected_var == pytest.approx(var, abs=5e-3)
        assert block.beta == pytest.approx(beta, abs=5e-5)
        assert block.sd_rate == pytest.approx(sd, abs=5e-5)
        assert block.alpha == 0.2


@pytest.mark.parametrize(
    "name,kw,mids,groups,se",
    [
        ("nfnet_f0", {}, [128, 256, 768, 768], [1, 2, 6, 6], [128, 256, 768, 768]),
        ("nfnet_f0plus", {}, [128, 384, 1024, 1024], [1, 3, 8, 8], [192, 384, 1024, 1024]),
        # small family: F1 at 1/8 width keeps F1's groups per conv
        ("nfnet_f1", {"width_mult": 1 / 8}, [16, 32, 96, 96], [1, 2, 6, 6], [16, 32, 96, 96]),
    ],
)
def test_block_structure(name, kw, mids, groups, se):
    model = create_model(name, device="meta", **kw)
    firsts = [stage[0] for stage in model.stages]
    assert [b.conv2.out_channels for b in firsts] == mids
    assert [b.conv2.groups for b in firsts] == groups
    assert [b.conv2b.groups for b in firsts] == groups
    assert [b.se.fc1.out_features for b in firsts] == se
    assert model.final_conv.out_channels == 2 * model.cfg.widths[-1]


def test_small_family_scales_width_and_depth():
    base = create_model("nfnet_f1", width_mult=1 / 8, device="meta")
    assert base.cfg.depths == (2, 4, 12, 6) and base.cfg.widths == (32, 64, 192, 192)
    shallow = create_model("nfnet_f1", width_mult=1 / 8, depth_mult=0.5, device="meta")
    assert shallow.cfg.depths == (1, 2, 6, 3)
    sizes = [n_params(create_model(n, num_classes=10)) for n in ("nfnet_pico", "nfnet_nano", "nfnet_micro", "nfnet_tiny")]
    assert sizes == sorted(sizes) and sizes[0] < 250_000 and sizes[-1] < 3_000_000


def test_ws_conv_standardizes_per_output_channel():
    torch.manual_seed(0)
    conv = WSConv2d(12, 6, 3, groups=3)
    with torch.no_grad():
        conv.weight.normal_(0.3, 2.0)
        conv.gain.uniform_(0.5, 2.0)
    w = conv.standardized_weight().double()
    fan_in = 4 * 9
    assert w.shape == (6, 4, 3, 3)
    mean = w.mean(dim=(1, 2, 3))
    n_var = fan_in * w.var(dim=(1, 2, 3), unbiased=False)
    assert torch.allclose(mean, torch.zeros(6, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(n_var, conv.gain.double() ** 2, rtol=1e-5)


def test_ws_eps_is_a_floor_on_n_var_and_timm_mode_adds():
    conv = WSConv2d(2, 2, 1, eps=1e-4)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[0.0, 1e-4], [3.0, -1.0]]).view(2, 2, 1, 1))
    w = conv.standardized_weight()
    # channel 0: N*var = 2 * (0.5e-4)^2 = 5e-9 < 1e-4 -> divided by sqrt(1e-4) = 0.01
    assert torch.allclose(w[0].flatten(), torch.tensor([-0.5e-4, 0.5e-4]) / 0.01, atol=1e-9)
    # channel 1: N*var = 2 * 4 = 8 -> (W - 1) / sqrt(8)
    assert torch.allclose(w[1].flatten(), torch.tensor([2.0, -2.0]) / math.sqrt(8), atol=1e-6)
    timm_style = WSConv2d(2, 2, 1, eps=1e-5, eps_mode="add")
    with torch.no_grad():
        timm_style.weight.copy_(conv.weight)
    expected = (conv.weight[1] - 1.0) / torch.sqrt(torch.tensor(4.0 + 1e-5)) / math.sqrt(2)
    assert torch.allclose(timm_style.standardized_weight()[1], expected, atol=1e-6)


@pytest.mark.parametrize("size,expected", [(8, (0, 1)), (7, (1, 1)), (192, (0, 1))])
def test_same_padding_matches_tf(size, expected):
    assert same_pad_amount(size, 3, 2) == expected
    torch.manual_seed(0)
    conv = WSConv2d(3, 4, 3, 2, same_padding=True)
    x = torch.randn(1, 3, size, size)
    ref = F.conv2d(F.pad(x, (expected[0], expected[1], expected[0], expected[1])), conv.standardized_weight(), conv.bias, 2)
    assert torch.allclose(conv(x), ref, atol=1e-6)
    assert conv(x).shape[-1] == math.ceil(size / 2)


def test_stochastic_depth_is_per_example_without_rescaling():
    torch.manual_seed(0)
    x = torch.ones(4000, 3, 2, 2)
    y = stochastic_depth(x, 0.25, training=True)
    per_example = y.flatten(1)
    assert set(per_example.unique().tolist()) == {0.0, 1.0}  # no 1/keep rescaling
    assert (per_example.min(1).values == per_example.max(1).values).all()  # whole examples
    assert per_example[:, 0].mean().item() == pytest.approx(0.75, abs=0.03)
    assert torch.equal(stochastic_depth(x, 0.25, training=False), x)


def test_forward_backward_shapes_and_head_api():
    torch.manual_seed(0)
    model = create_model("nfnet_pico", num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, model.num_features, 1, 1)
    logits = model(x)
    assert logits.shape == (2, 10)
    logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # classifier init N(0, 0.01^2), zero bias; fine-tuning head starts at zero
    big = create_model("nfnet_nano")
    assert big.head.fc.weight.std().item() == pytest.approx(0.01, rel=0.05)
    assert big.head.fc.bias.abs().max().item() == 0.0
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.head.fc.weight.abs().max().item() == 0.0
    # skip gains start at 0, so every block is an identity at init
    assert all(b.skip_gain.item() == 0.0 for b in model.blocks())


@pytest.mark.parametrize("name", sorted(ACT_GAMMA))
def test_every_activation_trains(name):
    """Each activation the config accepts: a whole model runs backward (relu once failed, its output
    scaled in place), and GammaAct equals gamma * act(x) in value and gradient without touching x."""
    torch.manual_seed(0)
    model = create_model("nfnet_pico", num_classes=10, activation=name)
    model(torch.randn(2, 3, 32, 32)).square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.stem.conv1.weight.grad.abs().sum() > 0  # the gradient reaches the first conv
    x = torch.randn(64, requires_grad=True)
    x0 = x.detach().clone()
    y = GammaAct(name)(x)
    ref_fn = (lambda t: F.gelu(t, approximate="tanh")) if name == "gelu" else _ACT_FN[name]
    xr = x0.clone().requires_grad_()
    ref = ref_fn(xr) * ACT_GAMMA[name]
    w = torch.randn(64)
    (y * w).sum().backward()
    (ref * w).sum().backward()
    assert torch.equal(x.detach(), x0)
    torch.testing.assert_close(y.detach(), ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-6, atol=1e-6)


def test_parameter_groups_by_name():
    model = create_model("nfnet_pico", num_classes=10)
    groups = model.param_groups(weight_decay=2e-5)
    decay, no_decay = set(groups[0]["names"]), set(groups[1]["names"])
    assert groups[0]["weight_decay"] == 2e-5 and groups[1]["weight_decay"] == 0.0
    assert decay.isdisjoint(no_decay) and decay | no_decay == {n for n, _ in model.named_parameters()}
    for n in no_decay:
        assert n.endswith((".gain", ".bias", ".skip_gain")), n
    for n in decay:
        assert n.endswith(".weight"), n
    assert {"head.fc.weight", "stem.conv1.weight", "stages.0.0.se.fc1.weight"} <= decay
    assert {"head.fc.bias", "stem.conv1.gain", "stages.0.0.skip_gain"} <= no_decay
    assert model.agc_exclude_names() == {"head.fc.weight"}


def test_signal_propagation_matches_bookkeeping():
    from models.spp import measure

    # The bookkeeping is a statement about expectations over the initialisation, so average the
    # measured variances over 4 initialisations (single draws scatter by ~10-20% through the
    # 3-channel stem). Strides 1 remove the white-noise variance loss of 2x2 avg-pooling.
    runs = []
    for seed in range(4):
        torch.manual_seed(seed)
        runs.append(measure(create_model("nfnet_f0", width_mult=0.25, strides=(1, 1, 1, 1)), batch=8, resolution=128, seed=seed))
    assert all(len(r) == 12 for r in runs)
    mean = lambda attr, i: sum(getattr(r[i], attr) for r in runs) / len(runs)  # noqa: E731
    for i, r in enumerate(runs[0]):
        assert mean("input_var", i) == pytest.approx(r.expected_var, rel=0.2), (i, mean("input_var", i))
        assert mean("branch_var", i) == pytest.approx(1.0, rel=0.2), (i, mean("branch_var", i))
        assert mean("skip_var", i) == pytest.approx(r.expected_skip_var, rel=0.2), (i, mean("skip_var", i))
    # The real strided model on white noise: the first pooled transition (stage 2) sees an input
    # near unit variance and its shortcut carries ~1/4 of it (see models/spp.py).
    torch.manual_seed(0)
    strided = measure(create_model("nfnet_f0", width_mult=0.25), batch=8, resolution=128)
    first_pooled = next(r for r in strided if r.stage == 1 and r.transition)
    assert 0.15 < first_pooled.skip_var < 0.4, first_pooled


def test_floored_ws_gradient_is_exact_in_both_regimes():
    """The fused WS backward against autograd's numerical gradient, with one floored row."""
    from models.layers import _FlooredStandardize

    torch.manual_seed(0)
    w = torch.randn(1, 6, 36, dtype=torch.float64)
    w[0, 0] *= 1e-4  # N * var = 36 * 1e-8 < 1e-4: this row uses the floor
    gain = torch.rand(6, dtype=torch.float64) + 0.5
    fn = lambda w, g: _FlooredStandardize.apply(w, g, 36, 1e-4)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (w.requires_grad_(), gain.requires_grad_()))
    # and the forward is DM's formula
    var, mean = torch.var_mean(w.detach(), dim=2, correction=0, keepdim=True)
    ref = gain.detach()[None, :, None] * (w.detach() - mean) / torch.sqrt(torch.clamp(36 * var, min=1e-4))
    assert torch.allclose(fn(w.detach(), gain.detach()), ref, atol=1e-12)
