"""Packing throughput against the decode+resize+encode ceiling, same cores, one invocation.

    python bench/pack.py [--images 2400] [--workers 2] [--resize 256] [--growth 300,1200] [--plan-items 25000,100000]

Corpus: photo-sized JPEGs (500x375, quality 90, ~ImageNet's mean size) made here with smooth
structure plus noise, written as class folders. Ceiling: the exact per-image PIL work of a pack
(data_prep.images.encode_image on in-memory bytes) in a tight loop over `workers` processes, no
I/O, no hashing, no tar. Pack: `data_prep.pack` over the folder with the same workers.
The ceiling is measured before and after the pack and averaged, to cancel machine drift.

Growth (cost that must stay linear), each at two sizes in the same invocation:
- bytes read per byte needed: an inline pack (one process, so /proc/self/io's rchar sees every read)
  with pack-time shuffling, 16 items per chunk and 64 per shard; needed = corpus + output bytes.
- the plan stage's memory per item (tracemalloc) on synthetic chunk indexes, no images.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.images import ImageOptions, encode_image  # noqa: E402
from data_prep.pack import PackOptions, pack  # noqa: E402


def make_corpus(root: Path, n: int, classes: int = 10) -> list[Path]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
    paths = []
    for i in range(n):
        f = rng.uniform(0.005, 0.05, 3)
        phase = rng.uniform(0, 6.28, 3)
        base = np.stack([127 + 100 * np.sin(f[c] * xx + phase[c]) * np.cos(f[(c + 1) % 3] * yy) for c in range(3)], -1)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        p = root / f"c{i % classes}" / f"img_{i:05d}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(p, quality=90)
        paths.append(p)
    return paths


def _encode_all(blobs: list[bytes], opts: ImageOptions) -> int:
    for b in blobs:
        encode_image(b, opts)
    return len(blobs)


def ceiling(blobs: list[bytes], opts: ImageOptions, workers: int) -> float:
    parts = [blobs[i::workers] for i in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        pool.submit(_encode_all, blobs[:2], opts).result()  # start the workers before timing
        t0 = time.perf_counter()
        n = sum(f.result() for f in [pool.submit(_encode_all, p, opts) for p in parts])
        return n / (time.perf_counter() - t0)


def _rchar() -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/io") if line.startswith("rchar"))


def read_growth(tmp: Path, sizes: list[int], resize: int) -> None:
    ratios = []
    for n in sizes:
        src = tmp / f"growth{n}"
        make_corpus(src, n)
        corpus = sum(p.stat().st_size for p in src.rglob("*.jpg"))
        before = _rchar()
        summary = pack(str(src), str(tmp / f"growth{n}-out"), PackOptions(samples_per_shard=64, chunk_size=16,
                       image=ImageOptions(resize_shorter=resize)), progress=False)  # fmt: skip
        ratios.append((_rchar() - before) / (corpus + summary["bytes"]))
        print(f"{n} images: read {(_rchar() - before) / 1e6:.1f} MB for {(corpus + summary['bytes']) / 1e6:.1f} MB "
              f"needed (corpus + output): {ratios[-1]:.3f} bytes read per byte needed")  # fmt: skip
    print(f"GROWTH bytes read per byte needed, {sizes[-1]} vs {sizes[0]} images: {ratios[-1] / ratios[0]:.3f}  (goal ~1: linear)")


def plan_growth(sizes: list[int]) -> None:
    import hashlib
    import tracemalloc

    from data_prep.plan import make_plan

    def loader(n: int, cs: int):
        def load(c: int) -> list[dict]:
            return [{"key": f"n{g % 1000:08d}_{g:09d}_1a2b3c4d", "split": "train", "labels": [g % 1000],
                     "path": f"train/n{g % 1000:08d}/n{g % 1000:08d}_{g}.JPEG", "location": f"/data/imagenet/train/n{g % 1000:08d}/n{g % 1000:08d}_{g}.JPEG",
                     "status": "ok", "sha256": hashlib.sha256(str(g % (n - n // 100)).encode()).hexdigest(), "segment": [g, 110_000]}
                    for g in range(c * cs, min(n, (c + 1) * cs))]  # fmt: skip

        return load

    per = []
    for n in sizes:
        tracemalloc.start()
        plan = make_plan(loader(n, 512), -(-n // 512), 512, n, 1000, 1000, "global", 0.01, 0)
        held, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        per.append(peak / n)
        print(f"plan of {n} items ({len(plan.duplicates)} duplicates): peak {peak / n:.0f} B/item, held {held / n:.0f} B/item "
              f"(records held whole: ~1.4 KB/item)")  # fmt: skip
    print(f"GROWTH plan peak memory per item, {sizes[-1]} vs {sizes[0]} items: {per[-1] / per[0]:.3f}  (goal ~1)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2400)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--resize", type=int, default=256)
    ap.add_argument("--growth", default="300,1200", help="corpus sizes for bytes read per byte needed ('' skips)")
    ap.add_argument("--plan-items", default="25000,100000", help="synthetic item counts for the plan's memory ('' skips)")
    args = ap.parse_args()
    opts = ImageOptions(resize_shorter=args.resize)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = make_corpus(tmp / "src", args.images)
        blobs = [p.read_bytes() for p in paths]
        print(f"{len(blobs)} JPEGs 500x375, mean {np.mean([len(b) for b in blobs]) / 1e3:.0f} kB; resize shorter side to {args.resize}; {args.workers} workers")
        c1 = ceiling(blobs, opts, args.workers)
        t0 = time.perf_counter()
        summary = pack(str(tmp / "src"), str(tmp / "out"), PackOptions(samples_per_shard=256, image=opts, chunk_size=64),
                       workers=args.workers, progress=False)  # fmt: skip
        packed = len(blobs) / (time.perf_counter() - t0)
        c2 = ceiling(blobs, opts, args.workers)
    ceil = (c1 + c2) / 2
    print(f"ceiling (encode_image in a tight loop): {c1:.1f} / {c2:.1f} img/s, mean {ceil:.1f}")
    print(f"pack end to end ({summary['samples']} samples, {summary['shards']} shards): {packed:.1f} img/s")
    print(f"RATIO pack/ceiling: {packed / ceil:.3f}  (goal >= 0.8)")
    if args.growth:
        with tempfile.TemporaryDirectory() as tmp:
            read_growth(Path(tmp), [int(x) for x in args.growth.split(",")], args.resize)
    if args.plan_items:
        plan_growth([int(x) for x in args.plan_items.split(",")])


if __name__ == "__main__":
    main()
