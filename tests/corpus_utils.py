"""Small real corpora built on the fly: class folders, manifests, and a zoo of bad files."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
from PIL import Image


def rand_image(seed: int, size=(40, 30), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    if mode in ("RGB", "CMYK", "RGBA"):
        arr = rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8)
        return Image.fromarray(arr, mode)
    return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L").convert(mode)


def save(img: Image.Image, path: Path, fmt: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **kw)
    return path


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def make_class_folders(root: Path, per_class: int = 6, classes=("cat", "dog", "emu"), splits=("train", "val")) -> dict:
    """Good images only: `root/<split>/<class>/img_i.jpg` (or no split level when splits is None)."""
    n = 0
    for si, split in enumerate(splits or ("",)):
        for ci, cls in enumerate(classes):
            for i in range(per_class):
                base = root / split / cls if split else root / cls
                save(rand_image(10000 * si + 1000 * ci + i), base / f"img_{i}.jpg", quality=90)
                n += 1
    return {"images": n}


def add_bad_zoo(cls_dir: Path, tmp: Path) -> dict[str, str]:
    """Bad and odd inputs in one class folder; returns file name -> expected reason prefix
    (None for files that must be converted and packed)."""
    cls_dir.mkdir(parents=True, exist_ok=True)
    good = jpeg_bytes(rand_image(7, (64, 48)))
    (cls_dir / "zero.jpg").write_bytes(b"")
    (cls_dir / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (cls_dir / "garbage.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    (cls_dir / "text.png").write_text("this is not a png\n")
    (cls_dir / "notes.txt").write_text("a stray file\n")
    save(Image.new("RGB", (4000, 3000), (10, 20, 30)), cls_dir / "bomb.png")
    (cls_dir / "broken_link.jpg").symlink_to(tmp / "does-not-exist.jpg")
    # modes a user expects to be converted
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    pal.info["transparency"] = 0
    save(pal, cls_dir / "palette_transparent.png", transparency=0)
    save(Image.new("RGBA", (16, 16), (0, 0, 0, 0)), cls_dir / "rgba_clear.png")
    save(Image.new("LA", (16, 16), (0, 255)), cls_dir / "la.png")
    save(rand_image(3, (16, 16), "CMYK"), cls_dir / "cmyk.jpg")
    save(Image.fromarray(np.full((16, 16), 65535, dtype=np.uint16)), cls_dir / "gray16.png")
    save(Image.new("1", (16, 16), 1), cls_dir / "bilevel.png")
    return {
        "zero.jpg": "empty file", "truncated.jpg": "corrupt or truncated image", "garbage.jpg": "not an image",
        "text.png": "not an image", "notes.txt": "unsupported file extension", "bomb.png": "too many pixels",
        "broken_link.jpg": "missing file", "palette_transparent.png": None, "rgba_clear.png": None, "la.png": None,
        "cmyk.jpg": None, "gray16.png": None, "bilevel.png": None,
    }  # fmt: skip


def copy_duplicate(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
