"""Build the model a run trains: from scratch, or initialised from an export / timm weights file."""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from models import NFNet, create_model
from models.variants import NFNetConfig

from .config import ModelConfig


def _load_export(path: str) -> tuple[NFNetConfig, dict[str, torch.Tensor], int]:
    from safetensors.torch import load_file

    from data_prep.storage import Store

    store = Store(path)
    info = json.loads(store.read_bytes("config.json"))
    arch = NFNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in info["arch"].items()})
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "model.safetensors")
        with open(local, "wb") as f:
            f.write(store.read_bytes("model.safetensors"))
        return arch, load_file(local), int(info["num_classes"])


def build_model(mc: ModelConfig, num_classes: int) -> tuple[NFNet, dict]:
    """Returns (model, model_info); model_info is written to exports as config.json."""
    if mc.init_from:
        if mc.init_from.endswith((".pth", ".pt", ".bin")):
            from models.convert import model_from_timm

            model = model_from_timm(mc.name, torch.load(mc.init_from, map_location="cpu", weights_only=True), **mc.overrides)
        else:
            arch, weights, n_src = _load_export(mc.init_from)
            arch = dataclasses.replace(arch, **{k: tuple(v) if isinstance(v, list) else v for k, v in mc.overrides.items()})
            model = NFNet(arch, num_classes=n_src)
            model.load_state_dict(weights, strict=True)
        if model.num_classes != num_classes:
            model.reset_classifier(num_classes, zero_init=True)
    else:
        model = create_model(mc.name, num_classes, width_mult=mc.width_mult, depth_mult=mc.depth_mult, **mc.overrides)
    info = {"name": mc.name, "width_mult": mc.width_mult, "depth_mult": mc.depth_mult, "num_classes": num_classes,
            "arch": dataclasses.asdict(model.cfg),
            "params": sum(p.numel() for p in model.parameters())}  # fmt: skip
    return model, info
