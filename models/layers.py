"""Building blocks of a Normalizer-Free network: Scaled WS convs, gamma-scaled activations, SE.

Nothing here normalizes activations: signal propagation is controlled by standardizing the
*weights* (WSConv2d) and by the analytic gamma constants of each activation.
See ../shared/docs/nfnet-spec.md sections 2d and 3.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Gamma constants from DeepMind's base.py: gamma * act(z) has unit variance for z ~ N(0, 1).
# DM's values are Monte-Carlo estimates ~0.06% above the analytic ones; we keep them for weight
# compatibility (spec 2d).
ACT_GAMMA: dict[str, float] = {
    "gelu": 1.7015043497085571,
    "relu": 1.7139588594436646,
    "silu": 1.7881293296813965,
    "elu": 1.2716004848480225,
    "celu": 1.270926833152771,
    "leaky_relu": 1.70590341091156,
    "relu6": 1.7131484746932983,
    "selu": 1.0008515119552612,
    "sigmoid": 4.803835391998291,
    "softplus": 1.9203323125839233,
    "softsign": 2.338853120803833,
    "tanh": 1.5939117670059204,
    "log_sigmoid": 1.9193484783172607,
    "identity": 1.0,
}

_ACT_FN = {
    "relu": F.relu,
    "silu": F.silu,
    "elu": F.elu,
    "celu": F.celu,
    "leaky_relu": F.leaky_relu,
    "relu6": F.relu6,
    "selu": F.selu,
    "sigmoid": torch.sigmoid,
    "softplus": F.softplus,
    "softsign": F.softsign,
    "tanh": torch.tanh,
    "log_sigmoid": F.logsigmoid,
    "identity": lambda x: x,
}
_SCALE_IN_PLACE = frozenset({"gelu", "silu"})


class GammaAct(nn.Module):
    """gamma * act(x). DM's GELU is jax.nn.gelu, i.e. the tanh approximation (spec 2d)."""

    def __init__(self, name: str = "gelu", gelu_approximate: str = "tanh"):
        super().__init__()
        if name not in ACT_GAMMA:
            raise ValueError(f"unknown activation {name!r}; valid: {sorted(ACT_GAMMA)}")
        self.name, self.gamma, self.gelu_approximate = name, ACT_GAMMA[name], gelu_approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.name == "gelu":
            y = F.gelu(x, approximate=self.gelu_approximate)
        else:
            y = _ACT_FN[self.name](x)
        # Scale in place only where the activation's backward reads its *input* and y is a new
        # tensor: that saves one activation-sized allocation per block for the default GELU.
        # relu, sigmoid and tanh save their output for backward (in place breaks autograd), and
        # identity returns x itself (in place would scale the caller's tensor).
        if self.name in _SCALE_IN_PLACE:
            return y.mul_(self.gamma)
        return y * self.gamma

    def extra_repr(self) -> str:
        return f"{self.name}, gamma={self.gamma:.6f}"


def same_pad_amount(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TF 'SAME' padding (before, after) for one spatial dim: output = ceil(size / stride).

    Example: 3x3 stride 2 on an even size pads (0, 1); on an odd size (1, 1).
    """
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class WSConv2d(nn.Conv2d):
    """Conv2d with Scaled Weight Standardization (NF-ResNet / NFNet, spec section 3).

        W_hat[o] = gain[o] * (W[o] - mean_o) / sqrt(max(N * var_o, eps))      (eps_mode="floor", DM)
        W_hat[o] = gain[o] * (W[o] - mean_o) / sqrt(N * (var_o + eps))        (eps_mode="add", timm)

    mean_o / var_o are the biased statistics of output channel o over its fan-in (in/groups, kh, kw),
    N = kh * kw * in / groups. gain has shape (O,) (so AGC takes one norm over the whole vector
    and weight decay can exclude it by name); bias is always present.

    `same_padding=True` gives TF-style SAME padding (asymmetric for stride 2 on even inputs),
    needed only for weights trained in TF/JAX; otherwise padding is symmetric k//2.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        *,
        eps: float = 1e-4,
        eps_mode: str = "floor",
        same_padding: bool = False,
    ):
        # Stride-1 SAME on an odd kernel is symmetric, so only strided convs need dynamic padding.
        self.dynamic_pad = same_padding and stride > 1
        padding = 0 if self.dynamic_pad else kernel_size // 2
        super().__init__(in_ch, out_ch, kernel_size, stride, padding, groups=groups, bias=True)
        if eps_mode not in ("floor", "add"):
            raise ValueError(f"eps_mode must be 'floor' or 'add', got {eps_mode!r}")
        self.gain = nn.Parameter(torch.ones(out_ch))
        self.eps, self.eps_mode = eps, eps_mode
        self.fan_in = (in_ch // groups) * kernel_size * kernel_size
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # DM: variance scaling (fan_in, normal); WS makes the result insensitive to this choice.
        if not hasattr(self, "gain"):
            return  # called by nn.Conv2d.__init__ before our attributes exist
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(self.fan_in))
        nn.init.zeros_(self.bias)
        nn.init.ones_(self.gain)

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight.float().reshape(1, self.out_channels, -1)  # stats in fp32 even under bf16 (spec 8.8)
        gain = self.gain.float()
        if self.eps_mode == "add":
            # (W - mean) / sqrt(N * (var + eps)) * gain is batch-norm over each row: one fused kernel.
            w_hat = F.batch_norm(w, None, None, gain / math.sqrt(self.fan_in), None, True, 0.0, self.eps)
        elif torch.compiler.is_compiling():
            # Under torch.compile the plain formula, which inductor fuses into one kernel: the eager
            # fast path below calls native_batch_norm with None arguments, which dynamo cannot trace
            # (a graph break at every conv: 54 graphs for nfnet_pico instead of 1).
            var, mean = torch.var_mean(w, dim=-1, keepdim=True, correction=0)
            w_hat = (w - mean) * torch.rsqrt(torch.clamp(var * self.fan_in, min=self.eps)) * gain[None, :, None]
        else:
            w_hat = _FlooredStandardize.apply(w, gain, self.fan_in, self.eps)
        return w_hat.reshape_as(self.weight).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_pad:
            ph = same_pad_amount(x.shape[-2], self.kernel_size[0], self.stride[0])
            pw = same_pad_amount(x.shape[-1], self.kernel_size[1], self.stride[1])
            if any(ph) or any(pw):
                x = F.pad(x, (pw[0], pw[1], ph[0], ph[1]))
        w = self.standardized_weight()
        return F.conv2d(x, w.to(x.dtype), self.bias.to(x.dtype), self.stride, self.padding, 1, self.groups)


class _FlooredStandardize(torch.autograd.Function):
    """DM's W_hat = gain * (W - mean) / sqrt(max(N * var, eps)) on rows of w: (1, O, K), K = N.

    Autograd through var_mean and friends costs ~2.5x batch-norm's fused kernels on CPU (measured
    in bench/model_step.py), so forward and backward use the batch-norm kernels directly:
        z = (W - mean) * invstd        (native batch norm, unit variance per row)
        r = 1 / (invstd * sqrt(max(N * var, eps)))   -> 1/sqrt(N) unless the floor is active
        W_hat = z * (gain * r)
    Backward: batch-norm's backward with weight gain*r gives the exact gradient where the floor is
    inactive; where it is active the denominator is the constant sqrt(eps), so the term batch norm
    subtracts for its own variance (z * mean(dz * z)) is added back.
    """

    _TINY = 1e-30  # keeps invstd finite for an all-equal row without changing any other row in fp32

    @staticmethod
    def forward(ctx, w, gain, fan_in: int, eps: float):
        z, mean, invstd = torch.native_batch_norm(w, None, None, None, None, True, 0.0, _FlooredStandardize._TINY)
        var = invstd.pow(-2)  # (O,), biased variance
        active = var * fan_in < eps
        r = torch.rsqrt(torch.clamp(var * fan_in, min=eps)) / invstd
        ctx.save_for_backward(w, gain, mean, invstd, r, active)
        return z * (gain * r)[None, :, None]

    @staticmethod
    def backward(ctx, grad_out):
        w, gain, mean, invstd, r, active = ctx.saved_tensors
        gr = gain * r
        grad_out = grad_out.contiguous()
        dw, dweight, _ = torch.ops.aten.native_batch_norm_backward(
            grad_out, w, gr, None, None, mean, invstd, True, _FlooredStandardize._TINY, [True, True, False]
        )
        # Floored rows: add back invstd * gr * mean(dW_hat * z) * z, with z = (w - mean) * invstd.
        # On CPU, skip the two passes when no row is floored (the check is free there; on a GPU
        # it would be a host sync per conv, so the masked correction always runs).
        if w.device.type != "cpu" or bool(active.any()):
            coef = torch.where(active, invstd.pow(2) * gr * dweight / w.shape[-1], torch.zeros_like(gr))
            dw = dw + (w - mean[None, :, None]) * coef[None, :, None]
        return dw, dweight * r, None, None


class SqueezeExcite(nn.Module):
    """SE with DM's conventions: mean-pool, Linear -> ReLU (no gamma) -> Linear -> 2 * sigmoid.

    The x2 keeps the branch variance: sigmoid(~0) = 0.5 would otherwise halve it.
    """

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)
        for fc in (self.fc1, self.fc2):
            # haiku Linear default: truncated normal, std 1/sqrt(fan_in), zero bias.
            nn.init.trunc_normal_(fc.weight, std=1.0 / math.sqrt(fc.in_features), a=-2 / math.sqrt(fc.in_features), b=2 / math.sqrt(fc.in_features))
            nn.init.zeros_(fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        s = x.mean(dim=(2, 3))  # (B, C)
        s = self.fc2(F.relu(self.fc1(s)))
        return 2.0 * torch.sigmoid(s)[:, :, None, None] * x


def stochastic_depth(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """DM's per-example stochastic depth: zero the residual branch of whole examples with
    probability `rate`, *without* dividing by the keep probability (spec 2b.5, 8.4)."""
    if not training or rate <= 0.0:
        return x
    keep = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device, dtype=x.dtype)
    return x * keep.bernoulli_(1.0 - rate)
