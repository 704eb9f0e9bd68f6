"""The NFNet augmentation recipe with torchvision.transforms.v2 (spec section 5, 1a).

Train, per image: decode -> Inception crop (area 8-100%, aspect 3/4-4/3, bicubic) -> flip.
Per batch: MixUp (Beta(0.2, 0.2)) on the first half, CutMix (Beta(1, 1)) on the second half,
then RandAugment per image (DM applies it after mixing), label smoothing on the mixed targets
(y <- (1 - eps) y + eps / C; multi-hot targets of the sigmoid objective are mixed and smoothed the
same way, see TrainAugment). Every part can be switched off. Batches stay uint8; `normalize`
(ImageNet mean/std) runs on the training device.

Eval: squash-resize the whole image to (S+32)^2, centre-crop S ("squash", DM's resize_crop_32),
or resize the shorter side to S+32 and centre-crop ("center"); the +32 is `eval_pad`.

RandAugment as DM's (the TPU autoaugment code): nearest-neighbour rotate/shear/translate with
grey (128) fill. Where the time goes and the fast paths: docs/data-loading.md, "Speed".

Differences from DM, on purpose: DM draws 2B images for a batch of B mixes; we mix pairs within
the batch (torchvision's MixUp/CutMix), so one sample is one position in the epoch. RandAugment
magnitudes are on DM's 0-10 scale (torchvision with 11 bins); DM's 15 exceeds its own maximum
for some ops and is capped at 10 here.
"""

from __future__ import annotations

import numpy as np
import simplejpeg
import torch
from PIL import Image
from torch.utils.data import get_worker_info
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import InterpolationMode, v2

from pipeline.config import AugmentConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def stack_batch(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Stack same-shape (C, H, W) images into a (B, C, H, W) batch; inside a DataLoader worker,
    straight into shared memory, so sending the batch to the training process does not copy it
    again (what default_collate does; batch_size=None loaders bypass it).

    The batch keeps the memory layout of its images: channels-last views of decoder or PIL output
    (C, H, W with stride 1 on C) give a channels-last batch, copied row by row (~0.02 ms per 256 px
    image, where a transposing uint8 copy costs 0.30 ms); `normalize` makes it contiguous NCHW on
    the training device."""
    first = tensors[0]
    c, h, w = first.shape
    if get_worker_info() is not None:
        out = first.new(first._typed_storage()._new_shared(len(tensors) * first.numel(), device=first.device))
    else:
        out = first.new_empty(0)
    if first.stride(0) == 1 and c > 1:
        out = out.resize_(len(tensors), h, w, c)
        for i, t in enumerate(tensors):
            out[i].copy_(t.permute(1, 2, 0))
        return out.permute(0, 3, 1, 2)
    return torch.stack(tensors, out=out.resize_(len(tensors), c, h, w))


def decode(jpg: bytes, target: int | None = None) -> torch.Tensor:
    """JPEG bytes -> uint8 (3, H, W), a channels-last view of the decoder's (H, W, 3) array.

    libjpeg-turbo through simplejpeg writes HWC directly: ~0.50 ms for a 341x256 JPEG on one core,
    against 0.63 ms for torchvision.io.decode_jpeg (which transposes to CHW) and 0.88 ms for PIL +
    numpy, with pixels identical to torchvision's. With `target`, the image is decoded at a reduced
    DCT scale (1/2 ... 1/8, never below `target` on either side: what PIL's draft mode does) for
    callers that shrink the whole image, i.e. evaluation. Anything libjpeg-turbo refuses (CMYK,
    a PNG in a foreign shard) goes through torchvision's generic decoder; corrupt bytes raise.
    """
    t = target or 0
    try:
        arr = simplejpeg.decode_jpeg(jpg, colorspace="RGB", min_height=t, min_width=t, min_factor=2 if t else 1)
    except ValueError:
        # Not a JPEG (a PNG in a foreign shard) or one libjpeg-turbo cannot turn into RGB (CMYK):
        # torchvision's generic decoder. A corrupt or truncated JPEG raises: the loader skips and
        # counts it instead of training on a half-decoded image.
        if jpg[:2] != b"\xff\xd8" or _colorspace(jpg) in ("CMYK", "YCCK"):
            return decode_image(torch.frombuffer(bytearray(jpg), dtype=torch.uint8), mode=ImageReadMode.RGB)
        raise
    return torch.from_numpy(arr).permute(2, 0, 1)


def _colorspace(jpg: bytes) -> str | None:
    try:
        return simplejpeg.decode_jpeg_header(jpg)[2]
    except ValueError:
        return None


def multi_hot(labels: list[list[int]], num_classes: int) -> torch.Tensor:
    """Label lists -> (B, C) float targets, 1 at each of a sample's labels (optim.objective=sigmoid)."""
    y = torch.zeros(len(labels), num_classes)
    for i, labs in enumerate(labels):
        y[i, labs] = 1.0
    return y


class TrainAugment:
    """Callable in the loader workers: (list of uint8 images, labels) -> (float batch, soft targets).

    Labels are (B,) class indices (softmax) or (B, C) multi-hot targets (sigmoid, from multi_hot).
    MixUp and CutMix blend multi-hot targets as they blend one-hot ones: lam * y_a + (1 - lam) * y_b,
    so a class present in both images keeps target 1 and one present in one gets its share of the
    pixels."""

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
        # DM's RandAugment (the TPU autoaugment code) fills the uncovered corners of rotate, shear
        # and translate with grey 128 and samples them with nearest neighbour; so do we. On PIL
        # images (converted once per batch, below) the ops cost ~0.45 ms per 224 px image per
        # layer, against ~1.0 ms on uint8 tensors, where torchvision's affine ops go through
        # float grid_sample.
        self.randaug = (
            v2.RandAugment(cfg.randaug_layers, min(cfg.randaug_magnitude, 10), num_magnitude_bins=11,
                          interpolation=InterpolationMode.NEAREST, fill=128)
            if cfg.randaug_layers > 0 else None
        )  # fmt: skip

    def __call__(self, images: list[torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch(stack_batch([self.per_image(img) for img in images]), labels)

    def batch(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) uint8 crops -> mixed, RandAugmented uint8 batch and soft targets (B, C)."""
        y = self._targets(labels)
        half = x.shape[0] // 2
        if self.mixup is not None or self.cutmix is not None:
            # MixUp blends, so it runs in float and rounds back; CutMix only pastes a box of the
            # partner image, which is exact on uint8 (no float copy of its half).
            xa, ya = self._mix(self.mixup, x[:half], labels[:half], blend=True)
            xb, yb = self._mix(self.cutmix, x[half:], labels[half:], blend=False)
            x, y = torch.cat([xa, xb]), torch.cat([ya, yb])
        if self.randaug is not None:
            x = self._randaug(x)
        elif get_worker_info() is not None and not x.is_shared():
            x = stack_batch(list(x))  # mixed batches too go out through shared memory
        if self.cfg.label_smoothing > 0:
            # The same y <- (1 - eps) y + eps / C for multi-hot (sigmoid) targets: positives go to
            # ~1 - eps, negatives to eps / C. Not the per-class binary form y (1 - eps) + eps / 2:
            # it asks for probability eps / 2 on every absent class, targets summing to ~900 per
            # image on JFT (18k classes x 0.05) against ~2 true labels, and the loss sums over
            # classes; eps / C puts at most eps in total on absent classes, as softmax smoothing does.
            y = y * (1 - self.cfg.label_smoothing) + self.cfg.label_smoothing / self.num_classes
        return x, y

    def _targets(self, labels: torch.Tensor) -> torch.Tensor:
        """(B,) class indices -> one-hot (B, C); (B, C) multi-hot targets pass through as float."""
        return labels.float() if labels.dim() == 2 else torch.nn.functional.one_hot(labels, self.num_classes).float()

    def _mix(self, mix, x: torch.Tensor, labels: torch.Tensor, blend: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if mix is None or x.shape[0] < 2:
            return x, self._targets(labels)
        if not blend:
            return mix(x, labels)
        xf, y = mix(x.float(), labels)
        return xf.round_().clamp_(0, 255).to(torch.uint8), y

    def _randaug(self, x: torch.Tensor) -> torch.Tensor:
        """RandAugment per image of a (B, 3, S, S) uint8 batch, on PIL images.

        A channels-last batch hands PIL its HWC rows; a contiguous one crosses as three planes
        (Image.merge: 0.11 ms per 224 px image, where permute().contiguous() costs 0.30 ms). The
        results come back as HWC views, stacked into a channels-last batch."""
        if x.is_contiguous(memory_format=torch.channels_last):
            images = [Image.fromarray(im) for im in x.permute(0, 2, 3, 1).numpy()]
        else:
            h, w = x.shape[-2:]
            planes = x.contiguous().numpy()
            images = [Image.merge("RGB", [Image.frombuffer("L", (w, h), ch, "raw", "L", 0, 1) for ch in im]) for im in planes]
        return stack_batch([torch.from_numpy(np.array(self.randaug(im))).permute(2, 0, 1) for im in images])


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


def normalize(x: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """uint8 batch (B, 3, H, W) from the loader -> float32 ImageNet-normalised, on x's device, in
    `memory_format` (loader batches may be channels-last; run.channels_last keeps them so).

    The loader ships uint8 (4x less inter-process and host-to-device traffic than float32)."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1) * 255
    return ((x.float() - mean) / std).contiguous(memory_format=memory_format)
