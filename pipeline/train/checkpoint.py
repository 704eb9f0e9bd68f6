"""Checkpoints and exports: consolidated safetensors + JSON, never pickles.

A checkpoint holds, for every parameter, the full fp32 value, the full SGD momentum buffer and
the EMA value, gathered through DeepSpeed's tensor-fragment API (safe_get_full_fp32_param,
safe_get_full_optimizer_state) so it is the same at ZeRO 0, 1 and 2 and can be resumed at
another world size. We do not use engine.save_checkpoint/load_checkpoint: DeepSpeed loads those
with torch.load(weights_only=False) (torch_checkpoint_engine.py), i.e. it unpickles arbitrary
objects from storage.

Layout of a checkpoint directory:
    state.safetensors   param/<name>, momentum/<name>, ema/<name>
    trainer.json        counters (step, samples_seen, train_flops, ...) and the config
An export folder (what fine-tuning consumes):
    model.safetensors, ema.safetensors, config.json, classes.json, summary.json
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from data_prep.storage import Store


def _ds():
    from deepspeed.utils import (
        safe_get_full_fp32_param,
        safe_get_full_optimizer_state,
        safe_set_full_fp32_param,
        safe_set_full_optimizer_state,
    )

    return safe_get_full_fp32_param, safe_get_full_optimizer_state, safe_set_full_fp32_param, safe_set_full_optimizer_state


def relink_optimizer_state(zero_opt, create_momentum: bool = False) -> None:
    """Make DeepSpeed's per-parameter views of the optimizer state see SGD's momentum buffers.

    ZeRO-1/2 link those views once, after the optimizer's first step; for SGD that first step is
    DeepSpeed's own state-initialising step at engine creation, when no momentum buffer exists yet,
    so the views stay empty (safe_get_full_optimizer_state then raises "momentum_buffer not found").
    We re-link (a private DeepSpeed 0.19 method; no public one exists), creating zero buffers first
    when restoring into a fresh optimizer.
    """
    if not hasattr(zero_opt, "_lazy_init_hp_params_optimizer_state"):
        return  # ZeRO-0: the client optimizer holds full tensors
    if create_momentum:
        for group in zero_opt.optimizer.param_groups:
            for flat in group["params"]:
                zero_opt.optimizer.state[flat].setdefault("momentum_buffer", torch.zeros_like(flat))
    zero_opt._hp_optimizer_states_linked = False
    zero_opt._lazy_init_hp_params_optimizer_state()


def gather_state(module: torch.nn.Module, client_opt: torch.optim.Optimizer, ema: torch.nn.Module | None,
                 zero_opt=None) -> dict[str, torch.Tensor]:  # fmt: skip
    """Full tensors on CPU. Collective at ZeRO >= 1: every rank must call it."""
    get_param, get_opt, _, _ = _ds()
    if zero_opt is not None:
        relink_optimizer_state(zero_opt)
    out = {}
    ema_params = dict(ema.module.named_parameters()) if ema is not None else {}
    for name, p in module.named_parameters():
        full = get_param(p)
        out[f"param/{name}"] = (full if full is not None else p.detach()).float().cpu().contiguous()
        try:
            mom = get_opt(p, "momentum_buffer")
        except ValueError:  # no step taken yet: no momentum
            mom = None
        if mom is None:
            mom = client_opt.state.get(p, {}).get("momentum_buffer")
        if mom is not None:
            out[f"momentum/{name}"] = mom.float().cpu().contiguous()
        if name in ema_params:
            out[f"ema/{name}"] = ema_params[name].detach().float().cpu().contiguous()
    return out


def restore_state(module: torch.nn.Module, client_opt: torch.optim.Optimizer, ema: torch.nn.Module | None,
                  tensors: dict[str, torch.Tensor], zero_opt=None) -> None:  # fmt: skip
    _, _, set_param, set_opt = _ds()
    if zero_opt is not None and any(k.startswith("momentum/") for k in tensors):
        relink_optimizer_state(zero_opt, create_momentum=True)
    ema_params = dict(ema.module.named_parameters()) if ema is not None else {}
    missing = [n for n, _ in module.named_parameters() if f"param/{n}" not in tensors]
    if missing:
        raise ValueError(f"checkpoint lacks parameters {missing[:5]} (architecture differs?)")
    with torch.no_grad():
        for name, p in module.named_parameters():
            value = tensors[f"param/{name}"].to(p.device)
            if hasattr(p, "_hp_mapping") or hasattr(p, "ds_id"):
                set_param(p, value)
            p.copy_(value.to(p.dtype))
            if f"momentum/{name}" in tensors:
                mom = tensors[f"momentum/{name}"].to(p.device)
                if hasattr(p, "_hp_mapping") or hasattr(p, "ds_id"):
                    set_opt(p, mom, "momentum_buffer")
                else:
                    client_opt.state[p]["momentum_buffer"] = mom.clone()
            if name in ema_params and f"ema/{name}" in tensors:
                ema_params[name].copy_(tensors[f"ema/{name}"].to(ema_params[name].device))


def write_checkpoint(directory: str, tensors: dict[str, torch.Tensor], counters: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "state.safetensors"))
    Path(directory, "trainer.json").write_text(json.dumps(counters, indent=1))


def read_checkpoint(directory: str) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = load_file(os.path.join(directory, "state.safetensors"))
    counters = json.loads(Path(directory, "trainer.json").read_text())
    return tensors, counters


def write_export(dest: str, tensors: dict[str, torch.Tensor], model_info: dict, classes: list[str], summary: dict,
                 endpoint: str | None = None) -> None:  # fmt: skip
    """The hand-off folder for fine-tuning, at a local path or s3:// prefix."""
    store = Store(dest, endpoint)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        raw = {k[len("param/") :]: v for k, v in tensors.items() if k.startswith("param/")}
        ema = {k[len("ema/") :]: v for k, v in tensors.items() if k.startswith("ema/")}
        save_file(raw, f"{tmp}/model.safetensors")
        if ema:
            save_file(ema, f"{tmp}/ema.safetensors")
        files = {"config.json": json.dumps(model_info, indent=1), "classes.json": json.dumps(classes),
                 "summary.json": json.dumps(summary, indent=1)}  # fmt: skip
        for name, text in files.items():
            Path(tmp, name).write_text(text)
        for name in sorted(os.listdir(tmp)):
            store.write_bytes_atomic(name, Path(tmp, name).read_bytes())
