"""Training-loader throughput against (a) the JPEG decode ceiling and (b) ImageFolder + DataLoader.

    python bench/loader.py [--images 2048] [--workers 2] [--res 224] [--s3]

Corpus: photo-like JPEGs (bench/pack.py's generator), packed by data_prep into shards at 256 px
(shorter side) and also written as class-folder files. All run in this one invocation on the same
cores:
  ceiling  : the loader's decoder (pipeline.data.augment.decode) over the shard JPEG bytes, `workers`
             processes, no I/O; torchvision.io.decode_jpeg's rate is printed beside it;
  ours/off : pipeline.data with augmentation off (decode, centre crop at 256), `workers` loader
             processes; and again in the training process itself (workers=0) with `workers`
             decode threads (data.decode_threads), which skips the shared-memory hand-over;
  ours/on  : the NFNet recipe (Inception crop to --res, flip, MixUp/CutMix, RandAugment 2x5);
  folder   : torchvision.datasets.ImageFolder + DataLoader (PIL decode, as ImageFolder does) with
             the same recipe written the way torchvision documents it: v2 ops on tensors per
             image, MixUp/CutMix on the float batch in collate_fn, then RandAugment per image on
             the uint8 tensors (DM's order), label smoothing; same parameters as ours;
  folder+  : ImageFolder + DataLoader running our own TrainAugment, to separate what the loader
             gains from what our augmentation engineering gains.

--s3 (instead of the above): the shards on moto's S3 server behind a counting proxy
(tests/s3_counting.py). Four epochs at 1, 2 and 4 loader workers (the loader's prefetch into the
next epoch is a few windows, spread over four), augmentation off, print bytes
fetched per epoch / shard bytes, GET and HEAD requests per epoch and img/s; the baseline in the
same invocation is the same loader streaming whole shards (the path packs without offsets take).
moto answers each request in a few ms of this machine's two cores, which the loader shares, so the
img/s here are request-bound: ranged reads send up to one GET per sample where streaming sends one
per shard. On S3 a GET's latency (~20-50 ms) is hidden by S3_CONCURRENCY requests in flight per worker.
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
from pipeline.data.augment import AugmentConfig, TrainAugment  # noqa: E402
from pipeline.data.loader import Layout, train_loader  # noqa: E402


def _decode_all(blobs: list[bytes], torchvision_io: bool) -> int:
    from torchvision.io import ImageReadMode, decode_jpeg

    from pipeline.data.augment import decode

    torch.set_num_threads(1)
    for b in blobs:
        if torchvision_io:
            decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=ImageReadMode.RGB)
        else:
            decode(b)
    return len(blobs)


def ceiling(blobs, workers, torchvision_io=False):
    with ProcessPoolExecutor(workers) as pool:
        pool.submit(_decode_all, blobs[:2], torchvision_io).result()
        t0 = time.perf_counter()
        futures = [pool.submit(_decode_all, blobs[i::workers], torchvision_io) for i in range(workers)]
        return sum(f.result() for f in futures) / (time.perf_counter() - t0)


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


class TorchvisionRecipe:
    """The recipe as a torchvision user writes it (tensor ops throughout; parameters as ours)."""

    def __init__(self, cfg: AugmentConfig, num_classes: int):
        from torchvision.transforms import InterpolationMode, v2

        self.cfg, self.num_classes = cfg, num_classes
        self.per_image = v2.Compose([
            v2.PILToTensor(),
            v2.RandomResizedCrop(cfg.train_res, scale=(cfg.min_area, 1.0), interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(),
        ])  # fmt: skip
        self.mixup = v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes)
        self.cutmix = v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes)
        self.randaug = v2.RandAugment(cfg.randaug_layers, cfg.randaug_magnitude, num_magnitude_bins=11,
                                      interpolation=InterpolationMode.NEAREST, fill=128)  # fmt: skip

    def batch(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        half, x = x.shape[0] // 2, x.float()
        (xa, ya), (xb, yb) = self.mixup(x[:half], labels[:half]), self.cutmix(x[half:], labels[half:])
        x = torch.cat([xa, xb]).round_().clamp_(0, 255).to(torch.uint8)
        y = torch.cat([ya, yb]) * (1 - self.cfg.label_smoothing) + self.cfg.label_smoothing / self.num_classes
        return torch.stack([self.randaug(img) for img in x]), y


def folder_rate(folder: Path, per_image, aug, args, n_batches: int) -> float:
    import torchvision

    ds = torchvision.datasets.ImageFolder(str(folder), transform=per_image)
    dl = torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=args.workers, collate_fn=_Collate(aug))
    return rate(dl, n_batches, args.batch)


def s3_mode(shards: Path, batch: int, off: AugmentConfig) -> None:
    import dataclasses
    import json
    import os

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import start_moto
    from s3_counting import CountingProxy

    from data_prep.storage import Store, s3_client

    server, endpoint = start_moto()
    for k, v in dict(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1").items():
        os.environ.setdefault(k, v)
    proxy = CountingProxy(endpoint)
    try:
        s3_client(endpoint).create_bucket(Bucket="bench")
        dst = Store("s3://bench/shards", endpoint)
        for p in sorted(shards.iterdir()):
            dst.write_bytes_atomic(p.name, p.read_bytes())
        manifest = json.loads((shards / "manifest.json").read_text())
        train = manifest["splits"]["train"]["shards"]
        total = sum(s["bytes"] for s in train)
        epochs = 4
        print(f"S3 (moto behind a counting proxy): {len(train)} train shards, {total / 1e6:.1f} MB; {epochs} epochs each, batch {batch}")
        for workers in (1, 2, 4):
            row = {}
            for mode in ("ranged", "streamed"):
                dl, ds = train_loader("s3://bench/shards", Layout(batch), 0, off, workers=workers, shuffle_window=4 * batch,
                                      endpoint=proxy.endpoint)  # fmt: skip
                if mode == "streamed":
                    ds.shards = [dataclasses.replace(sh, offsets=None) for sh in ds.shards]
                proxy.reset()
                r = rate(dl, epochs * ds.steps_per_epoch, batch)
                fetched = sum(n for path, n in proxy.get_bytes.items() if path.endswith(".tar")) / epochs
                row[mode] = (fetched / total, proxy.requests["GET"] / epochs, proxy.requests["HEAD"] / epochs, r)
            (f, g, h, r), (f0, _, h0, r0) = row["ranged"], row["streamed"]
            print(f"  {workers} workers: fetched/epoch {f:.3f} x shard bytes (streamed {f0:.3f}), GETs/epoch {g:.0f}, "
                  f"HEADs/epoch {h:.0f} (streamed {h0:.0f}; shards {len(train)}), {r:.1f} img/s (streamed {r0:.1f})")  # fmt: skip
            print(f"RATIO S3 bytes fetched per epoch / shard bytes, {workers} workers: {f:.3f}  (goal <= 1.2; streamed {f0:.3f})")
    finally:
        proxy.close()
        server.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2048)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--res", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--s3", action="store_true", help="S3 mode: bytes and requests fetched per epoch (see above)")
    args = ap.parse_args()
    from torchvision.transforms import v2

    on = AugmentConfig(train_res=args.res, randaug_layers=2, randaug_magnitude=5)
    off = AugmentConfig(train_res=256, random_resized_crop=False, hflip=False, randaug_layers=0, mixup_alpha=0,
                        cutmix_alpha=0, label_smoothing=0)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_corpus(tmp / "src", args.images)
        pack(str(tmp / "src"), str(tmp / "shards"), PackOptions(samples_per_shard=256, image=ImageOptions(resize_shorter=256)),
             workers=args.workers, progress=False)  # fmt: skip
        if args.s3:
            return s3_mode(tmp / "shards", args.batch, off)
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
        c_tv = ceiling(blobs, args.workers, torchvision_io=True)
        r_off1 = rate(train_loader(str(tmp / "shards"), layout, 0, off, **kw)[0], n_batches, args.batch)
        threads = dict(workers=0, decode_threads=args.workers, shuffle_window=args.batch)
        r_thr = rate(train_loader(str(tmp / "shards"), layout, 0, off, **threads)[0], n_batches, args.batch)
        r_on = rate(train_loader(str(tmp / "shards"), layout, 0, on, **kw)[0], n_batches, args.batch)
        tv = TorchvisionRecipe(on, 10)
        r_folder = folder_rate(folder, tv.per_image, tv, args, n_batches)
        ours = TrainAugment(on, 10)
        r_folder_ours = folder_rate(folder, v2.Compose([v2.PILToTensor(), ours.per_image]), ours, args, n_batches)
        # The machine drifts by +-15% within a minute: the ceiling and ours(off) are measured at
        # both ends of the run (ceiling, off, ..., off, ceiling) and each pair averaged.
        r_off2 = rate(train_loader(str(tmp / "shards"), layout, 0, off, **kw)[0], n_batches, args.batch)
        c2 = ceiling(blobs, args.workers)
    ceil, r_off = (c + c2) / 2, (r_off1 + r_off2) / 2
    print(f"{len(blobs)} JPEGs 256px (shorter side), batch {args.batch}, {args.workers} workers, train res {args.res}")
    print(f"  decode ceiling               {ceil:8.1f} img/s  ({c:.1f} before, {c2:.1f} after; torchvision.io {c_tv:.1f})")
    print(f"  ours, augmentation off       {r_off:8.1f} img/s  ({r_off1:.1f} before, {r_off2:.1f} after)")
    print(f"  ours, off, in-process threads{r_thr:8.1f} img/s  (workers=0, decode_threads={args.workers})")
    print(f"  ours, NFNet recipe           {r_on:8.1f} img/s")
    print(f"  ImageFolder, torchvision way {r_folder:8.1f} img/s")
    print(f"  ImageFolder, our TrainAugment{r_folder_ours:8.1f} img/s")
    print(f"RATIO ours(off)/ceiling: {r_off / ceil:.3f}  (goal >= 0.8; {args.workers} loader processes)")
    print(f"RATIO ours(off, in-process threads)/ceiling: {r_thr / ceil:.3f}  (goal >= 0.8)")
    print(f"RATIO ours(on)/ImageFolder(on): {r_on / r_folder:.3f}  (goal >= 1.2)")
    print(f"RATIO ours(on)/ImageFolder(on, our TrainAugment): {r_on / r_folder_ours:.3f}  (the loader alone)")


if __name__ == "__main__":
    main()
