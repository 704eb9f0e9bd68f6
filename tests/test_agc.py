"""AGC against a float64 reference written plainly here, and the optimizer order of DM's SGD_AGC."""

from __future__ import annotations

import math

import pytest
import torch

from models import create_model
from pipeline.train.agc import adaptive_grad_clip_, agc_pairs
from pipeline.train.optim import build_sgd


def reference_agc(w: torch.Tensor, g: torch.Tensor, clip: float, eps: float = 1e-3) -> tuple[torch.Tensor, int]:
    """Loop over units one by one in float64: conv/linear -> rows of dim 0, vectors/scalars -> whole."""
    w, g = w.double(), g.double().clone()
    units = [...] if w.ndim <= 1 else [i for i in range(w.shape[0])]
    clipped = 0
    for u in units:
        wn = max(math.sqrt(float((w[u] ** 2).sum())), eps)
        gn = math.sqrt(float((g[u] ** 2).sum()))
        if gn / wn > clip:
            g[u] = g[u] * (clip * wn / max(gn, 1e-6))
            clipped += 1
    return g, clipped


@pytest.mark.parametrize(
    "shape",
    [(16, 4, 3, 3),  # grouped conv (O, I/groups, kh, kw): a unit is one output channel
     (10, 32),  # linear
     (16,),  # bias / gain vector: one unit
     ()],  # skip gain scalar
)  # fmt: skip
@pytest.mark.parametrize("clip", [0.01, 0.16])
def test_matches_float64_reference(shape, clip):
    torch.manual_seed(0)
    w = torch.randn(shape)
    g = torch.randn(shape) * torch.logspace(-4, 0, w.numel()).reshape(shape)  # some units clip, some not
    g_ours = g.clone()
    stats = adaptive_grad_clip_([(w, g_ours)], clip=clip)
    expected, n_clipped = reference_agc(w, g, clip)
    assert torch.allclose(g_ours.double(), expected, rtol=1e-5, atol=1e-12)
    assert int(stats.clipped_units) == n_clipped
    assert stats.total_units == (1 if len(shape) <= 1 else shape[0])


def test_zero_initialised_parameter_uses_eps_floor():
    w = torch.zeros(8, 4, 1, 1)  # e.g. a zero-init layer; also skip gains start at 0
    g = torch.randn(8, 4, 1, 1)
    adaptive_grad_clip_([(w, g)], clip=0.01, eps=1e-3)
    unit_norms = g.flatten(1).norm(dim=1)
    assert torch.allclose(unit_norms, torch.full((8,), 0.01 * 1e-3), rtol=1e-5)
    s = torch.zeros(())
    gs = torch.tensor(5.0)
    adaptive_grad_clip_([(s, gs)], clip=0.01)
    assert gs.item() == pytest.approx(1e-5)


def test_grouped_conv_units_are_output_channels():
    # Two output channels with identical gradient rows but different weight norms: only the
    # small-weight channel clips, which would not happen with a per-tensor or per-group norm.
    w = torch.stack([torch.full((2, 3, 3), 10.0), torch.full((2, 3, 3), 0.01)])
    g = torch.full((2, 2, 3, 3), 0.05)
    adaptive_grad_clip_([(w, g)], clip=0.01)
    assert torch.allclose(g[0], torch.full((2, 3, 3), 0.05))
    assert g[1].norm().item() == pytest.approx(0.01 * w[1].norm().item(), rel=1e-5)


def test_classifier_weight_excluded_by_name_bias_clipped():
    torch.manual_seed(0)
    model = create_model("nfnet_pico", num_classes=10)
    for block in model.blocks():  # at init skip gains are 0 and branch gradients vanish
        block.skip_gain.data.fill_(0.5)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            p.grad.mul_(1e3)  # every unit far over the limit
    fc_w, fc_b = model.head.fc.weight.grad.clone(), model.head.fc.bias.grad.clone()
    stats = adaptive_grad_clip_(agc_pairs(model.named_parameters(), model.agc_exclude_names()), clip=0.01)
    assert torch.equal(model.head.fc.weight.grad, fc_w)
    assert not torch.equal(model.head.fc.bias.grad, fc_b)  # DM clips the FC bias
    assert model.head.fc.bias.grad.norm().item() <= 0.01 * max(model.head.fc.bias.norm().item(), 1e-3) * (1 + 1e-5)
    assert stats.clip_fraction > 0.5 and stats.max_ratio.item() > 0.01
    from pipeline.train.agc import unitwise_norm

    for name, p in model.named_parameters():  # afterwards no unit exceeds the limit
        if name != "head.fc.weight":
            limit = 0.01 * unitwise_norm(p).clamp(min=1e-3)
            assert (unitwise_norm(p.grad) <= limit * (1 + 1e-5)).all(), name


def test_sgd_nesterov_coupled_decay_in_dm_order():
    """AGC, then g += wd*theta, m = mu*m + g, g += mu*m, theta -= lr*g; three steps in float64."""
    torch.manual_seed(0)
    lr, mu, wd, clip = 0.4, 0.9, 0.05, 0.01
    w0 = torch.randn(6, 5)
    grads = [torch.randn(6, 5) * s for s in (1.0, 0.001, 3.0)]

    p = torch.nn.Parameter(w0.clone())
    opt = build_sgd([{"params": [p], "weight_decay": wd}], lr=lr, momentum=mu)
    for g in grads:
        p.grad = g.clone()
        adaptive_grad_clip_([(p, p.grad)], clip=clip)
        opt.step()

    theta, m = w0.double().clone(), torch.zeros_like(w0, dtype=torch.float64)
    for g in grads:
        g, _ = reference_agc(theta, g, clip)
        g = g + wd * theta  # decay after clipping: never clipped
        m = mu * m + g
        g = g + mu * m
        theta = theta - lr * g
    assert torch.allclose(p.detach().double(), theta, rtol=1e-5, atol=1e-6)
