"""The pieces of one optimizer step that TrainRun (run.py) puts together: lr schedule, loss, AGC at the
accumulation boundary, the skippable SGD, EMA, the DeepSpeed config, per-step seeds.

One optimizer step (global batch G = B x A x W):
    for a in 0..A-1:  loss = CE(model(x_a), soft targets); engine.backward(loss); [boundary:] AGC; engine.step()
At the accumulation boundary (after the last backward, before engine.step) the gradient is the
global-batch average: at ZeRO-0 it sits in p.grad (all-reduced); at ZeRO-1/2 it is partitioned and
each rank clips its own partition after one all-reduce of per-unit sums of squares
(agc_partitioned.py). AGC there is exact at every stage; inside the client optimizer's step it would
be wrong at ZeRO >= 1, which sees one flat partition per rank and no unit boundaries.

Randomness: model randomness (stochastic depth, dropout) is seeded per (seed, step, slot) and data
randomness per (seed, epoch, slot, batch), so a resumed run, and a run with another worker count
but the same global and micro batch, computes exactly the same thing.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

from pipeline.config import TrainConfig

# Dense bf16 peak FLOP/s per GPU (vendor datasheets, without sparsity), for MFU.
GPU_PEAK_BF16 = {"B200": 2250e12, "H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "L40S": 362e12,
                 "L4": 121e12, "A10": 125e12}  # fmt: skip


def peak_bf16_flops(device_name: str) -> float:
    """The peak of the GPU that `torch.cuda.get_device_name` names; 0 when unknown. Whole-word match,
    so "NVIDIA L40S" is not an L4 and "NVIDIA A100-SXM4-80GB" is not an A10."""
    return next((v for k, v in GPU_PEAK_BF16.items() if re.search(rf"\b{k}\b", device_name)), 0.0)


class SkippableSGD(torch.optim.SGD):
    """torch SGD (Nesterov, coupled weight decay) whose step can be skipped for a non-finite loss.
    Under ZeRO-1/2 DeepSpeed calls this step on flat partitions; skipping it leaves them unchanged."""

    skip = False

    def step(self, closure=None):
        if self.skip:
            return None
        return super().step(closure)


def lr_at(step: int, cfg: TrainConfig, steps_per_epoch: float, total_steps: int) -> float:
    """Linear warmup from 0 over warmup_epochs, then cosine decay to 0 (DM optim.py)."""
    warm = cfg.optim.warmup_epochs * steps_per_epoch
    peak = cfg.peak_lr
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1.0, total_steps - warm)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_c y_c log softmax(z)_c; logits cast to fp32 (DM experiment.py)."""
    return -(target * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def sigmoid_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """optim.objective=sigmoid: mean over the batch of sum over classes of binary cross-entropy with
    logits, -[y log s(z) + (1 - y) log(1 - s(z))], on (B, C) multi-hot (mixed, smoothed) targets;
    logits cast to fp32.

    Summed over classes, not averaged (BiT's and big_vision's `sigmoid_xent` on JFT): a mean over C
    would shrink every gradient by 1/C (1/18k on JFT), so the lr recipe tuned for softmax, whose
    cross-entropy is a sum over classes too, would no longer transfer; with the sum, one image's
    gradient on a positive logit is (s(z) - 1), as in softmax. Averaged over the batch, like
    soft_cross_entropy, so accumulation and world size mean the same thing for both objectives."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none").sum(-1).mean()


def loss_for(objective: str):
    """The training loss of optim.objective (one of TrainConfig's Literal choices)."""
    return {"softmax": soft_cross_entropy, "sigmoid": sigmoid_cross_entropy}[objective]


def make_ema(module: torch.nn.Module, decay: float):
    """EMA of the weights in DM's tf1_ema form: d_t = min(decay, (1 + t) / (10 + t))."""
    from torch.optim.swa_utils import AveragedModel

    def avg(ema_p, p, n):
        d = min(decay, (1.0 + float(n)) / (10.0 + float(n)))
        return ema_p * d + p.float() * (1 - d)

    ema = AveragedModel(module, avg_fn=avg, use_buffers=False)
    for p in ema.parameters():
        p.data = p.data.float()
    return ema


def agc_at_boundary(module: torch.nn.Module, exclude: set[str], clip: float, eps: float, zero_stage: int):
    """AGC on the globally averaged gradient; returns AGCStats. ZeRO-0: on the full p.grad (no
    communication). ZeRO-1/2: on this rank's gradient partition with one all-reduce of 2 x units floats
    (agc_partitioned.py), never gathering a full gradient."""
    from .agc import adaptive_grad_clip_

    if zero_stage == 0:  # p.grad is the all-reduced average: clip in place
        return adaptive_grad_clip_(((p, p.grad) for n, p in module.named_parameters() if n not in exclude), clip, eps)
    from .agc_partitioned import partitioned_agc_, unit_layout

    key = frozenset(exclude)
    cached = getattr(module, "_agc_layout", None)  # the layout depends only on the architecture: build once
    if cached is None or cached[0] != key:
        cached = module._agc_layout = (key, *unit_layout(module.named_parameters(), exclude))
    _, layout, units = cached
    device = next(module.parameters()).device
    return partitioned_agc_(layout, units, clip, eps, device)


def deepspeed_config(cfg: TrainConfig, bf16: bool, accum: int | None = None) -> dict:
    """DeepSpeed always sees an fp32 model: its bf16 mode would keep bf16 weights with fp32 masters
    that our checkpoints and EMA do not see, and accumulate and all-reduce gradients in bf16. bf16 is
    autocast around the forward pass instead (docs/precision.md), declared in DeepSpeed's
    `torch_autocast` section: without it, engine.forward runs the model under autocast(enabled=False)
    whenever CUDA autocast is on outside it, i.e. a GPU run would silently train in fp32. No module is
    "lower-precision safe", so every gradient is still all-reduced in fp32. `accum`: this world size's
    accumulation (elastic runs: V / workers; default the config's num_workers)."""
    return {
        "train_micro_batch_size_per_gpu": cfg.schedule.micro_batch,
        "gradient_accumulation_steps": accum or cfg.accum_steps,
        "train_batch_size": cfg.schedule.global_batch,
        "gradient_clipping": 0.0,  # AGC replaces it; recent DeepSpeed defaults to 1.0
        "zero_optimization": {"stage": cfg.run.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": False},
        "torch_autocast": {"enabled": bf16, "dtype": "bfloat16", "lower_precision_safe_modules": []},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def seed_for(*parts: int) -> int:
    import numpy as np

    return int(np.random.default_rng([int(p) for p in parts]).integers(2**62))
