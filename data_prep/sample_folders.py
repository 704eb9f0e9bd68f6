"""A real dataset in ImageNet's class-folder layout, built offline from the sample package.

`fashion-mnist-groups`: the sample corpus's *test* images (never seen by the demo's pretraining,
which packs the train images) relabelled into 4 clothing groups, written as PNG files:

    DEST/train/<group>/t10k_NNNNN.png      test images 0 .. n_train-1
    DEST/val/<group>/t10k_NNNNN.png        the next n_val test images

A different label set from pretraining's 10 classes, so fine-tuning needs the new head.

    python -m data_prep.sample_folders data/fashion-mnist-groups
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .sources import FASHION_MNIST_CLASSES, fashion_mnist_arrays

GROUPS = {  # fashion-mnist class -> group
    "T-shirt_top": "tops", "Pullover": "tops", "Coat": "tops", "Shirt": "tops",
    "Trouser": "trousers_dresses", "Dress": "trousers_dresses",
    "Sandal": "footwear", "Sneaker": "footwear", "Ankle_boot": "footwear",
    "Bag": "bags",
}  # fmt: skip


def write_groups(dest: str, n_train: int = 6000, n_val: int = 2000) -> dict[str, int]:
    """Write the dataset (idempotent: existing files are kept); returns images per split."""
    from PIL import Image

    images, labels = fashion_mnist_arrays("t10k")
    if n_train + n_val > len(images):
        raise ValueError(f"n_train + n_val = {n_train + n_val} exceeds the {len(images)} test images")
    counts = {"train": 0, "val": 0}
    for i in range(n_train + n_val):
        split = "train" if i < n_train else "val"
        folder = Path(dest, split, GROUPS[FASHION_MNIST_CLASSES[int(labels[i])]])
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"t10k_{i:05d}.png"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            Image.fromarray(images[i]).save(tmp, format="PNG")
            os.replace(tmp, path)
        counts[split] += 1
    return counts


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dest")
    ap.add_argument("--train", type=int, default=6000)
    ap.add_argument("--val", type=int, default=2000)
    a = ap.parse_args(argv)
    print(write_groups(a.dest, a.train, a.val))


if __name__ == "__main__":
    main()
