"""Load timm `dm_nfnet_f*` weights (ports of DeepMind's released checkpoints) into our NFNet.

Users keep the published weights in a local file (no hub access is assumed):

    python -m models.convert dm_nfnet_f0.pth nfnet_f0.safetensors --model nfnet_f0

The converted model reproduces timm's numerics, so it is built with timm's conventions
(`TIMM_COMPAT`): erf GELU, WS eps added to the variance (1e-5), TF SAME padding.
"""

from __future__ import annotations

import argparse
import re

import torch

from . import create_model
from .nfnet import NFNet

# How timm's dm_nfnet differs numerically from DM's reference semantics (spec sections 3, 8).
TIMM_COMPAT = dict(gelu_approximate="none", ws_eps=1e-5, ws_eps_mode="add", same_padding=True)

_RENAMES = [
    (re.compile(r"\.skipinit_gain$"), ".skip_gain"),
    (re.compile(r"\.downsample\.conv\."), ".shortcut."),
    (re.compile(r"\.attn_last\."), ".se."),
]


def convert_timm_state_dict(timm_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename keys and reshape tensors: WS gains (O,1,1,1) -> (O,), SE 1x1 convs -> Linear (O, I)."""
    out = {}
    for key, value in timm_sd.items():
        new = key
        for pattern, repl in _RENAMES:
            new = pattern.sub(repl, new)
        if new.endswith(".gain") or new.endswith(".skip_gain"):
            value = value.reshape(-1)
        elif ".se.fc" in new and new.endswith(".weight"):
            value = value.reshape(value.shape[0], value.shape[1])
        out[new] = value
    return out


def state_dict_mismatch(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> str:
    """'' when `theirs` loads strictly into `ours`; else the missing, unexpected and mis-shaped tensors."""
    missing = sorted(set(ours) - set(theirs))
    unexpected = sorted(set(theirs) - set(ours))
    wrong = sorted(k for k in set(ours) & set(theirs) if ours[k].shape != theirs[k].shape)
    detail = [f"missing tensors {missing[:8]}" if missing else "", f"unexpected tensors {unexpected[:8]}" if unexpected else "",
              "shape mismatch " + ", ".join(f"{k}: model {tuple(ours[k].shape)} vs file {tuple(theirs[k].shape)}" for k in wrong[:8]) if wrong else ""]  # fmt: skip
    return "; ".join(d for d in detail if d)


def load_timm_weights(model: NFNet, timm_sd: dict[str, torch.Tensor]) -> None:
    """Load converted weights strictly; a mismatch names the missing and unexpected tensors."""
    sd = convert_timm_state_dict(timm_sd)
    problem = state_dict_mismatch(model.state_dict(), sd)
    if problem:
        raise ValueError("timm weights do not fit this architecture: " + problem)
    model.load_state_dict(sd, strict=True)


def model_from_timm(name: str, timm_sd: dict[str, torch.Tensor], **overrides) -> NFNet:
    """Build `name` with timm-compatible numerics and the class count of the weights, then load."""
    num_classes = timm_sd["head.fc.weight"].shape[0] if "head.fc.weight" in timm_sd else 0
    model = create_model(name, num_classes=num_classes, **{**TIMM_COMPAT, **overrides})
    load_timm_weights(model, timm_sd)
    return model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Convert a timm dm_nfnet_f* state dict into this project's format.")
    ap.add_argument("src", help="timm state dict (.pth/.bin loaded with weights_only=True, or .safetensors)")
    ap.add_argument("dst", help="output .safetensors file")
    ap.add_argument("--model", required=True, help="our model name, e.g. nfnet_f0")
    args = ap.parse_args(argv)
    if args.src.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(args.src)
    else:
        sd = torch.load(args.src, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    model = model_from_timm(args.model, sd)
    from safetensors.torch import save_file

    import dataclasses
    import json

    # The architecture travels in the file's metadata, so `model.init_from=FILE` rebuilds it with
    # timm's numerics without being told.
    meta = {"arch": json.dumps(dataclasses.asdict(model.cfg)), "converted_from": "timm"}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, args.dst, metadata=meta)
    print(f"wrote {args.dst}: {args.model}, {sum(p.numel() for p in model.parameters()):,} parameters")


if __name__ == "__main__":
    main()
