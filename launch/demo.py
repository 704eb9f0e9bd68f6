"""`make demo`: what the project can do today, on CPU, with real numbers only.

Prints the NFNet family (exact parameter counts, published-convention GMACs, training FLOPs per
image) and the signal-propagation check of a small member. Pretraining joins here when it lands.
"""

from __future__ import annotations

from models import create_model, list_models, resolve_config
from models.flops import forward_macs, train_flops_per_image
from models.spp import format_table, measure


def main() -> None:
    print(f"{'model':<14} {'params':>13} {'train res':>9} {'GMACs@test':>10} {'train GFLOPs/img':>16}")
    for name in list_models():
        if name.endswith("plus") and name not in ("nfnet_f0plus", "nfnet_f7plus"):
            continue
        cfg = resolve_config(name)
        params = sum(p.numel() for p in create_model(name, device="meta").parameters())
        macs = forward_macs(cfg, cfg.test_res) / 1e9
        train = train_flops_per_image(cfg, cfg.train_res) / 1e9
        print(f"{name:<14} {params:>13,} {cfg.train_res:>9} {macs:>10.2f} {train:>16.2f}")
    print("\nSignal propagation at init, nfnet_f0 at width 1/4, 128px white noise, strides 1 (python -m models.spp):")
    print(format_table(measure(create_model("nfnet_f0", width_mult=0.25, strides=(1, 1, 1, 1)), batch=4, resolution=128)))


if __name__ == "__main__":
    main()
