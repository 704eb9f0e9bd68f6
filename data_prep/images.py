"""Turn source bytes into the JPEG we store, or a reason to reject them.

Decode with PIL, apply EXIF orientation, convert to RGB (palette, alpha, CMYK, 16-bit and float
modes handled as a user would expect), optionally shrink the shorter side to N, encode JPEG.
A baseline RGB JPEG that needs no change keeps its original bytes.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# We enforce our own pixel limit with a clear reason, instead of PIL's warning/error pair.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is a rejection, never a grey half image


class Reject(Exception):
    """This input is skipped and recorded in rejected.jsonl with str(exception) as the reason."""


@dataclass(frozen=True)
class ImageOptions:
    resize_shorter: int = 0  # 0: keep the size
    upscale: bool = False  # with resize_shorter: also enlarge images whose shorter side is below N
    quality: int = 95
    max_pixels: int = 100_000_000  # decompression-bomb guard (W * H)
    # Files above this are rejected before they are read (a 1 GB "image" once was read whole first).
    # 64 MiB is above any camera JPEG/PNG a vision corpus holds; raise it with --max-bytes.
    max_bytes: int = 64 << 20


@dataclass(frozen=True)
class Encoded:
    jpg: bytes
    original_size: tuple[int, int]  # (width, height) before any orientation or resize
    kept_original: bool


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        # Transparent pixels become white, as a viewer on a white page shows them.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode == "F" and arr.size and arr.max() <= 1.0:
            arr = arr * 255.0  # float images in [0, 1]
        elif mode != "F" and arr.size and arr.max() > 255:
            arr = arr / 257.0  # 16-bit range 0..65535 -> 0..255
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _target_size(size: tuple[int, int], opts: ImageOptions) -> tuple[int, int] | None:
    w, h = size
    n = opts.resize_shorter
    short = min(w, h)
    if n <= 0 or short == n or (short < n and not opts.upscale):
        return None
    scale = n / short
    return (max(1, round(w * scale)), max(1, round(h * scale)))


def _encode(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_image(data: bytes, opts: ImageOptions, raw: tuple[str, tuple[int, int]] | None = None) -> Encoded:
    """raw=(mode, (w, h)) for undecoded pixel buffers (the IDX sample corpus)."""
    if not data:
        raise Reject("empty file (0 bytes)")
    if raw is not None:
        img = Image.frombytes(raw[0], raw[1], data)
    else:
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise Reject("not an image: PIL cannot identify the file format") from None
        except Exception as e:  # noqa: BLE001 - any decoder failure is a reason, not a crash
            raise Reject(f"unreadable image header: {type(e).__name__}: {e}") from None
    w, h = img.size
    if w * h > opts.max_pixels:
        raise Reject(f"too many pixels: {w}x{h} = {w * h} > limit {opts.max_pixels}")
    if w == 0 or h == 0:
        raise Reject(f"empty image: {w}x{h}")
    orientation = img.getexif().get(0x0112, 1) if raw is None else 1
    target = _target_size((w, h), opts)
    keep = (
        raw is None and target is None and img.format == "JPEG" and img.mode == "RGB"
        and orientation == 1 and not img.info.get("progressive") and not img.info.get("progression")
    )  # fmt: skip
    try:
        if img.format == "JPEG":
            if keep:
                # Validate the whole entropy-coded stream at 1/8 scale: truncation still fails,
                # at a fraction of a full decode.
                img.draft("RGB", (max(1, w // 8), max(1, h // 8)))
            elif target is not None:
                # DCT-domain downscaling to the smallest scale still >= the target (PIL draft mode).
                tw, th = target if orientation in (1, 2, 3, 4) else target[::-1]
                img.draft("RGB", (tw, th))
        img.load()
    except Exception as e:  # noqa: BLE001
        raise Reject(f"corrupt or truncated image: {type(e).__name__}: {e}") from None
    if keep:
        return Encoded(data, (w, h), True)
    try:
        img = ImageOps.exif_transpose(img) if orientation != 1 else img
        img = _to_rgb(img)
        if target is not None:
            # exif_transpose may have swapped the axes: recompute from the oriented size.
            target = _target_size(img.size, opts) or img.size
            if img.size != target:
                img = img.resize(target, Image.Resampling.BICUBIC)
        return Encoded(_encode(img, opts.quality), (w, h), False)
    except Reject:
        raise
    except Exception as e:  # noqa: BLE001
        raise Reject(f"cannot convert image (mode {img.mode}): {type(e).__name__}: {e}") from None
