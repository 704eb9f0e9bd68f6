"""Training-loader throughput against (a) the JPEG decode ceiling and (b) ImageFolder + DataLoader.

    python bench/loader.py [--images 2048] [--workers 2] [--res 224]

Corpus: 256x256 photo-like JPEGs (bench/pack.py's generator), packed by data_prep into shards and
also written as class-folder files. All three run in this one invocation on the same cores:
  ceiling  : torchvision.io.decode_jpeg over the shard JPEG bytes, `workers` processes, no I/O;
  ours/off : pipeline.data with augmentation off (decode, centre crop at 256, normalise);
  ours/on  : the NFNet recipe (Inception crop to --res, flip, MixUp/CutMix, RandAugment 2x5);
  folder   : torchvision.datasets.ImageFolder + DataLoader with the same per-image and per-batch
             augmentation (PIL decode, as ImageFolder does).
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pack import make_corpus  # noqa: E402

from data_prep.images import ImageOptions  # noqa: E402
from data_prep.pack import PackOptions, pack  # noqa: E402
from pipeline.augment import AugmentConfig, TrainAugment  # noqa: E402
from pipeline.data import Layout, train_loader  # noqa: E402


def _decode_all(blobs: list[bytes]) -> int:
    from torchvision.io import ImageReadMode, decode_jpeg

    torch.set_num_threads(1)
    for b in blobs:
        decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=ImageReadMode.RGB)
    return len(blobs)


def ceiling(blobs, workers):
    with ProcessPoolExecutor(workers) as pool:
        pool.submit(_decode_all, blobs[:2]).result()
        t0 = time.perf_counter()
        n = sum(f.result() for f in [pool.submit(_decode_all, blobs[i::workers]) for i in range(workers)])
        return n / (time.perf_counter() - t0)


def rate(loader, batches: int, batch: int) -> float:
    it = iter(loader)
    next(it)  # workers started, first batch out
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - t0)


class _Collate:
    def __init__(self, aug):
        self.aug = aug

    def __call__(self, items):
        x = torch.stack([i[0] for i in items])
        return self.aug.batch(x, torch.tensor([i[1] for i in items]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    import torchvision
    from torchvision.transforms import v2

    on = AugmentConfig(train_res=args.res, randaug_layers=2, randaug_magnitude=5)
    off = AugmentConfig(train_res=256, random_resized_crop=False, hflip=False, randaug_layers=0, mixup_alpha=0,
                        cutmix_alpha=0, label_smoothing=0)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_corpus(tmp / "src", args.images)
        pack(str(tmp / "src"), str(tmp / "shards"), PackOptions(samples_per_shard=256, image=ImageOptions(resize_shorter=256)),
             workers=args.workers, progress=False)  # fmt: skip
        blobs, folder = [], tmp / "files"
        for shard in sorted((tmp / "shards").glob("train-*.tar")):
            with tarfile.open(shard) as tar:
                for m in tar:
                    if m.name.endswith(".jpg"):
                        data = tar.extractfile(m).read()
                        blobs.append(data)
                        cls = folder / f"c{len(blobs) % 10}"
                        cls.mkdir(parents=True, exist_ok=True)
                        (cls / m.name).write_bytes(data)
        n_batches = max(4, len(blobs) // args.batch - 2)
        layout = Layout(args.batch)
        kw = dict(workers=args.workers, shuffle_window=args.batch)
        c = ceiling(blobs, args.workers)
        r_off = rate(train_loader(str(tmp / "shards"), layout, 0, off, **kw)[0], n_batches, args.batch)
        r_on = rate(train_loader(str(tmp / "shards"), layout, 0, on, **kw)[0], n_batches, args.batch)
        aug = TrainAugment(on, 10)
        ds = torchvision.datasets.ImageFolder(str(folder), transform=v2.Compose([v2.PILToTensor(), aug.per_image]))
        dl = torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=args.workers, collate_fn=_Collate(aug))
        r_folder = rate(dl, n_batches, args.batch)
        c2 = ceiling(blobs, args.workers)
    ceil = (c + c2) / 2
    print(f"{len(blobs)} JPEGs 256px (shorter side), batch {args.batch}, {args.workers} workers, train res {args.res}")
    print(f"  decode ceiling          {ceil:8.1f} img/s  ({c:.1f} before, {c2:.1f} after)")
    print(f"  ours, augmentation off  {r_off:8.1f} img/s")
    print(f"  ours, NFNet recipe      {r_on:8.1f} img/s")
    print(f"  ImageFolder, same recipe{r_folder:8.1f} img/s")
    print(f"RATIO ours(off)/ceiling: {r_off / ceil:.3f}  (goal >= 0.8)")
    print(f"RATIO ours(on)/ImageFolder(on): {r_on / r_folder:.3f}  (goal >= 1.2)")


if __name__ == "__main__":
    main()
