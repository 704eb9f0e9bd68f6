"""Held-out evaluation inside the workers: each sample of the split counted exactly once across ranks
(the eval loader pads ranks to equal batch counts with mask 0; masked sums are all-reduced)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.data.augment import normalize


@torch.no_grad()
def evaluate(module: torch.nn.Module, loader, device, amp_dtype: torch.dtype | None = None,
             memory_format: torch.memory_format = torch.contiguous_format) -> dict:  # fmt: skip
    """Exact held-out loss/top-1: masked sums all-reduced over ranks. Under the training's autocast
    (bf16 math on fp32 weights), so evaluation sees the numerics that training optimised."""
    was_training = module.training
    module.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    for batch in loader:
        x, y, m = normalize(batch["image"].to(device), memory_format), batch["label"].to(device), batch["mask"].to(device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            logits = module(x).float()  # (B, C)
        ce = F.cross_entropy(logits, y, reduction="none")
        top5 = (logits.topk(min(5, logits.shape[-1]), dim=-1).indices == y[:, None]).any(-1)  # (B,)
        sums += torch.stack([(ce * m).sum(), ((logits.argmax(-1) == y).float() * m).sum(), (top5.float() * m).sum(),
                             m.sum(), torch.tensor(float(batch["bad"]), device=device)]).double()  # fmt: skip
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    module.train(was_training)
    loss, correct, correct5, n, bad = sums.tolist()
    return {"loss": loss / max(n, 1), "top1": correct / max(n, 1), "top5": correct5 / max(n, 1), "samples": int(n), "bad": int(bad)}
