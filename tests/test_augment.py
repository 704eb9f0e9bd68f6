"""pipeline.data.augment fast paths give the same pixels as the plain torchvision route they replace."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from pipeline.data.augment import AugmentConfig, TrainAugment, decode, stack_batch


def _photo(h: int, w: int, seed: int = 0) -> Image.Image:
    """Smooth colour gradients plus noise: compresses like a photo, not like white noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))


def _bytes(img: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_decode_matches_torchvision_and_handles_other_inputs():
    jpg = _bytes(_photo(48, 64))
    ours = decode(jpg)
    assert ours.shape == (3, 48, 64) and ours.dtype == torch.uint8
    assert torch.equal(ours, decode_jpeg(torch.frombuffer(bytearray(jpg), dtype=torch.uint8), mode=ImageReadMode.RGB))
    grey = decode(_bytes(_photo(20, 30).convert("L")))
    assert grey.shape == (3, 20, 30) and torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    cmyk = decode(_bytes(_photo(20, 30).convert("CMYK")))  # libjpeg-turbo refuses CMYK -> RGB: fallback
    assert cmyk.shape == (3, 20, 30)
    png = decode(_bytes(_photo(20, 30), "PNG"))  # not a JPEG at all: fallback, lossless
    assert torch.equal(png, torch.from_numpy(np.array(_photo(20, 30))).permute(2, 0, 1))
    with pytest.raises(ValueError):  # truncated: skipped by the loader, never half-decoded
        decode(jpg[: len(jpg) // 2])


def test_eval_decode_shrinks_by_dct_scale_but_never_below_target():
    jpg = _bytes(_photo(384, 512))
    assert decode(jpg, 100).shape == (3, 144, 192)  # 3/8: the smallest scale with both sides >= 100
    assert decode(jpg, 192).shape == (3, 192, 256)  # 1/2
    assert decode(jpg, 300).shape == (3, 384, 512)  # a 1/2 decode would be 192 < 300: full size


def test_stack_batch_keeps_layout_and_normalize_makes_nchw():
    from pipeline.data.augment import normalize

    hwc = torch.randint(0, 256, (4, 10, 14, 3), dtype=torch.uint8)
    views = [h.permute(2, 0, 1)[:, 1:9, 2:12] for h in hwc] + [torch.randint(0, 256, (3, 8, 10), dtype=torch.uint8)]
    out = stack_batch(views)  # decoder output: channels-last views
    assert out.is_contiguous(memory_format=torch.channels_last) and torch.equal(out, torch.stack(views))
    chw = [v.contiguous() for v in views]
    assert stack_batch(chw).is_contiguous() and torch.equal(stack_batch(chw), out)
    assert normalize(out).is_contiguous() and torch.equal(normalize(out), normalize(stack_batch(chw)))


def test_uint8_mixing_equals_torchvision_float_mixing():
    """CutMix runs on uint8 and MixUp on float only for its half; same pixels and targets as both
    in float, drawn from the same seed."""
    cfg = AugmentConfig(train_res=16, randaug_layers=0, label_smoothing=0.1)
    aug = TrainAugment(cfg, 5)
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2])
    torch.manual_seed(3)
    ours, y = aug.batch(x, labels)
    torch.manual_seed(3)
    mixup, cutmix = v2.MixUp(alpha=0.2, num_classes=5), v2.CutMix(alpha=1.0, num_classes=5)
    (xa, ya), (xb, yb) = mixup(x[:4].float(), labels[:4]), cutmix(x[4:].float(), labels[4:])
    assert torch.equal(ours, torch.cat([xa, xb]).round().clamp(0, 255).to(torch.uint8))
    assert torch.allclose(y, torch.cat([ya, yb]) * 0.9 + 0.1 / 5)


def test_randaug_on_pil_equals_torchvision_on_pil_images():
    """The batch crosses to PIL as planes and back; non-square to catch a width/height swap."""
    cfg = AugmentConfig(train_res=16, randaug_layers=3, randaug_magnitude=9, mixup_alpha=0, cutmix_alpha=0)
    aug = TrainAugment(cfg, 5)
    x = torch.from_numpy(np.stack([np.asarray(_photo(20, 30, s)) for s in range(6)])).permute(0, 3, 1, 2).contiguous()
    torch.manual_seed(7)
    ours, _ = aug.batch(x, torch.zeros(6, dtype=torch.long))
    torch.manual_seed(7)
    ref = torch.stack([v2.functional.pil_to_tensor(aug.randaug(v2.functional.to_pil_image(img))) for img in x])
    assert ours.shape == (6, 3, 20, 30) and torch.equal(ours, ref) and not torch.equal(ours, x)
    torch.manual_seed(7)  # a channels-last batch (what the loader's decode gives) takes the HWC route
    cl, _ = aug.batch(x.to(memory_format=torch.channels_last), torch.zeros(6, dtype=torch.long))
    assert torch.equal(cl, ref)
