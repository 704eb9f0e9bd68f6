"""Held-out evaluation inside the workers: each sample of the split counted exactly once across ranks
(the eval loader pads ranks to equal batch counts with mask 0; masked sums are all-reduced).

optim.objective=softmax: loss is the cross-entropy on the sample's label, top-1/top-5 whether it is
among the 1/5 highest logits. optim.objective=sigmoid (multi-label): loss is the training loss (binary
cross-entropy summed over classes, pipeline/train/step.py), top-1/top-5 whether any of the 1/5
highest logits is one of the sample's true labels, and mAP the mean, over the classes with at least
one positive in the split, of the average precision of ranking the split by that class's logit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.data.augment import normalize


def metric_names(objective: str) -> tuple[str, ...]:
    """The metrics evaluate() returns for optim.objective, in the order results.json lists them."""
    return ("top1", "top5", "loss") + (("map",) if objective == "sigmoid" else ())


@torch.no_grad()
def evaluate(module: torch.nn.Module, loader, device, amp_dtype: torch.dtype | None = None,
             memory_format: torch.memory_format = torch.contiguous_format, objective: str = "softmax") -> dict:  # fmt: skip
    """Exact held-out metrics (metric_names): masked sums all-reduced over ranks. Under the training's
    autocast (bf16 math on fp32 weights), so evaluation sees the numerics that training optimised."""
    was_training = module.training
    module.eval()
    sigmoid = objective == "sigmoid"
    sums = torch.zeros(5, dtype=torch.float64, device=device)
    kept = []  # sigmoid: every batch's (logits, positives, mask), for the mAP over the whole split
    for batch in loader:
        x, m = normalize(batch["image"].to(device), memory_format), batch["mask"].to(device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            logits = module(x).float()  # (B, C)
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (B, k), highest first
        if sigmoid:
            y = batch["target"].to(device)  # (B, C) multi-hot
            loss = F.binary_cross_entropy_with_logits(logits, y, reduction="none").sum(-1)
            hit = y.gather(-1, top) > 0  # (B, k): is the i-th highest logit a true label
            top1, top5 = hit[:, 0], hit.any(-1)
            kept.append((logits, (y > 0).to(torch.uint8), (m > 0).to(torch.uint8)))
        else:
            y = batch["label"].to(device)
            loss = F.cross_entropy(logits, y, reduction="none")
            top1, top5 = logits.argmax(-1) == y, (top == y[:, None]).any(-1)
        sums += torch.stack([(loss * m).sum(), (top1.float() * m).sum(), (top5.float() * m).sum(),
                             m.sum(), torch.tensor(float(batch["bad"]), device=device)]).double()  # fmt: skip
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(sums)
    module.train(was_training)
    loss, correct, correct5, n, bad = sums.tolist()
    d = max(n, 1)
    out = {"loss": loss / d, "top1": correct / d, "top5": correct5 / d, "samples": int(n), "bad": int(bad)}
    if sigmoid:
        out["map"] = split_map(*(torch.cat(parts) for parts in zip(*kept)))
    return out


def average_precision(scores: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """(N, C) scores and 0/1 positives -> (C,) average precision per class, NaN for a class without
    positives. AP = the mean over a class's positives of the precision among all samples scoring at
    least as high; tied scores enter together (sklearn's average_precision_score: no interpolation)."""
    s, order = scores.sort(dim=0, descending=True)
    t = positives.gather(0, order).double()  # (N, C), each column in descending score order
    tp = t.cumsum(0)
    # k[i, c]: samples scoring >= s[i, c] for class c, i.e. the end of i's group of ties
    # (searchsorted wants ascending rows: the negated scores, one row per class).
    neg = (-s).T.contiguous()
    k = torch.searchsorted(neg, neg, right=True).T  # (N, C), >= 1
    precision = tp.gather(0, k - 1) / k
    return (precision * t).sum(0) / t.sum(0)  # 0/0 = NaN without positives


def split_map(logits: torch.Tensor, positives: torch.Tensor, mask: torch.Tensor) -> float:
    """mAP over the whole split from this rank's (n, C) logits, 0/1 positives and (n,) 0/1 mask.

    Ranked by logit, not sigmoid: fp32 sigmoids saturate into ties at 1.0 (bf16 logits still tie
    often; average_precision counts ties together, so no tie is broken in the model's favour).

    No rank holds the whole split's scores (JFT: 18k classes): rank r gathers every rank's columns of
    class chunk r (W gathers, each rank receiving N x C/W scores), computes their APs, and the (sum of
    APs, classes with positives) pairs are all-reduced. Every rank has the same n (the eval loader
    pads), as gather needs. Each rank keeps its own n x C logits until then (on the device)."""
    dist = torch.distributed
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        keep = mask.bool()
        return float(average_precision(logits[keep], positives[keep]).nanmean())
    rank, c = dist.get_rank(), logits.shape[1]
    bounds = [c * r // world for r in range(world + 1)]
    masks = [torch.empty_like(mask) for _ in range(world)]
    dist.all_gather(masks, mask)
    mine = None
    for r in range(world):
        if bounds[r] == bounds[r + 1]:  # more ranks than classes: chunk r is empty on every rank
            continue
        got = []
        for part in (logits, positives):
            piece = part[:, bounds[r] : bounds[r + 1]].contiguous()
            bufs = [torch.empty_like(piece) for _ in range(world)] if rank == r else None
            dist.gather(piece, bufs, dst=r)
            got.append(bufs)
        if rank == r:
            mine = [torch.cat(bufs) for bufs in got]
    totals = torch.zeros(2, dtype=torch.float64, device=logits.device)
    if mine is not None:
        keep = torch.cat(masks).bool()
        ap = average_precision(mine[0][keep], mine[1][keep])
        ap = ap[~ap.isnan()]
        totals[0], totals[1] = ap.sum(), ap.numel()
    dist.all_reduce(totals)
    return float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")
