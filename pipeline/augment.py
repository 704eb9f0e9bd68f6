"""The NFNet augmentation recipe with torchvision.transforms.v2 (spec section 5, 1a).

Train, per image: decode -> Inception crop (area 8-100%, aspect 3/4-4/3, bicubic) -> flip.
Per batch: MixUp (Beta(0.2, 0.2)) on the first half, CutMix (Beta(1, 1)) on the second half,
then RandAugment per image (DM applies it after mixing), label smoothing on the mixed targets
(y <- (1 - eps) y + eps / C). Every part can be switched off. Batches stay uint8; `normalize`
(ImageNet mean/std) runs on the training device.

Eval: squash-resize the whole image to (S+32)^2, centre-crop S ("squash", DM's resize_crop_32),
or resize the shorter side to S+32 and centre-crop ("center"); the +32 is `eval_pad`.

Differences from DM, on purpose: DM draws 2B images for a batch of B mixes; we mix pairs within
the batch (torchvision's MixUp/CutMix), so one sample is one position in the epoch. RandAugment
magnitudes are on DM's 0-10 scale (torchvision with 11 bins); DM's 15 exceeds its own maximum
for some ops and is capped at 10 here.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode, v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class AugmentConfig:
    train_res: int = 192
    eval_res: int = 256
    eval_crop: str = "squash"  # or "center"
    # Eval resizes to S + eval_pad, then centre-crops S. DM's +32 keeps 86% of the side at 224 px;
    # at 32 px it would keep only half of the image, so tiny presets use a proportional pad.
    eval_pad: int = 32
    random_resized_crop: bool = True
    min_area: float = 0.08
    hflip: bool = True
    randaug_layers: int = 4  # 0: off
    randaug_magnitude: int = 5
    mixup_alpha: float = 0.2  # 0: off
    cutmix_alpha: float = 1.0  # 0: off
    label_smoothing: float = 0.1


def stack_batch(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack; inside a DataLoader worker, straight into shared memory, so sending the batch
    to the training process does not copy it again (what default_collate does; batch_size=None
    loaders bypass it). ~12 MB per 64 x 3 x 256^2 uint8 batch."""
    from torch.utils.data import get_worker_info

    if get_worker_info() is None:
        return torch.stack(tensors)
    first = tensors[0]
    storage = first._typed_storage()._new_shared(len(tensors) * first.numel(), device=first.device)
    out = first.new(storage).resize_(len(tensors), *first.shape)
    return torch.stack(tensors, out=out)


def decode(jpg: bytes, target: int | None = None) -> torch.Tensor:
    """JPEG bytes -> uint8 (3, H, W). With `target`, large images are decoded at a reduced DCT
    scale by PIL's draft mode (only where the whole image is resized, i.e. evaluation)."""
    if target is not None:
        from PIL import Image

        img = Image.open(io.BytesIO(jpg))
        if min(img.size) >= 2 * target:
            img.draft("RGB", (target, target))
            return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)
    return decode_jpeg(torch.frombuffer(bytearray(jpg), dtype=torch.uint8), mode=ImageReadMode.RGB)


class TrainAugment:
    """Callable in the loader workers: (list of uint8 images, labels) -> (float batch, soft targets)."""

    def __init__(self, cfg: AugmentConfig, num_classes: int):
        self.cfg, self.num_classes = cfg, num_classes
        bicubic = InterpolationMode.BICUBIC
        if cfg.random_resized_crop:
            crop = v2.RandomResizedCrop(cfg.train_res, scale=(cfg.min_area, 1.0), interpolation=bicubic, antialias=True)
        else:
            crop = _ResizeCenterCrop(cfg.train_res, cfg.train_res)
        self.per_image = v2.Compose([crop, v2.RandomHorizontalFlip()] if cfg.hflip else [crop])
        self.mixup = v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes) if cfg.mixup_alpha > 0 else None
        self.cutmix = v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes) if cfg.cutmix_alpha > 0 else None
        self.randaug = (
            v2.RandAugment(cfg.randaug_layers, min(cfg.randaug_magnitude, 10), num_magnitude_bins=11,
                          interpolation=InterpolationMode.BILINEAR)  # tensor affine ops: nearest|bilinear
            if cfg.randaug_layers > 0 else None
        )  # fmt: skip

    def __call__(self, images: list[torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch(stack_batch([self.per_image(img) for img in images]), labels)

    def batch(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) uint8 crops -> mixed, RandAugmented, normalised floats and soft targets."""
        y = torch.nn.functional.one_hot(labels, self.num_classes).float()
        half = x.shape[0] // 2
        if self.mixup is not None or self.cutmix is not None:
            parts = []
            for mix, sl in ((self.mixup, slice(0, half)), (self.cutmix, slice(half, None))):
                xi, li = x[sl].float(), labels[sl]
                if mix is not None and xi.shape[0] > 1:
                    xi, yi = mix(xi, li)
                else:
                    yi = torch.nn.functional.one_hot(li, self.num_classes).float()
                parts.append((xi, yi))
            x = torch.cat([p[0] for p in parts]).round_().clamp_(0, 255).to(torch.uint8)
            y = torch.cat([p[1] for p in parts])
        if self.randaug is not None:
            x = stack_batch([self.randaug(img) for img in x])
        if self.cfg.label_smoothing > 0:
            y = y * (1 - self.cfg.label_smoothing) + self.cfg.label_smoothing / self.num_classes
        return x, y


class _ResizeCenterCrop:
    """Resize the shorter side to `short` (skipped when it already is) and centre-crop `crop`."""

    def __init__(self, short: int, crop: int, squash: bool = False):
        self.short, self.crop, self.squash = short, crop, squash

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        bicubic = InterpolationMode.BICUBIC
        if self.squash:
            if (h, w) != (self.short, self.short):
                img = v2.functional.resize(img, [self.short, self.short], interpolation=bicubic, antialias=True)
        elif min(h, w) != self.short:
            img = v2.functional.resize(img, self.short, interpolation=bicubic, antialias=True)
        return v2.functional.center_crop(img, [self.crop, self.crop])


class EvalTransform:
    """uint8 (3, H, W) -> uint8 (3, S, S); normalisation happens on the training device."""

    def __init__(self, cfg: AugmentConfig):
        if cfg.eval_crop not in ("squash", "center"):
            raise ValueError(f"eval_crop must be 'squash' or 'center', got {cfg.eval_crop!r}")
        self.res = cfg.eval_res
        self.tf = _ResizeCenterCrop(cfg.eval_res + cfg.eval_pad, cfg.eval_res, squash=cfg.eval_crop == "squash")

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return self.tf(img)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 batch (B, 3, H, W) from the loader -> float32 ImageNet-normalised, on x's device.

    The loader ships uint8 (4x less inter-process and host-to-device traffic than float32)."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1) * 255
    return (x.float() - mean) / std
