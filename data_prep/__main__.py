"""python -m data_prep {pack,verify,inspect} ... (see --help of each)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter

from .images import ImageOptions
from .manifest import REJECTED, ManifestError, load_manifest, verify
from .pack import PackError, PackOptions, pack
from .sources import SourceError
from .storage import Store


def _add_s3(p: argparse.ArgumentParser) -> None:
    p.add_argument("--s3-endpoint", default=None, metavar="URL",
                   help="S3 endpoint URL (e.g. http://127.0.0.1:9000); default: AWS_ENDPOINT_URL or AWS's own")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m data_prep", description="Pack image corpora into verified webdataset shards.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pack", help="pack SOURCE into shards under OUT", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="SOURCE: a class-folder directory (optionally with train/ and val/), a .csv/.jsonl/.parquet "
                                   "manifest, s3://bucket/prefix in class-folder layout, or 'fashion-mnist' (sample corpus). "
                                   "OUT: a local directory or s3://bucket/prefix. Rerunning the same command after an "
                                   "interruption resumes it.")  # fmt: skip
    p.add_argument("source", help="what to pack (see above)")
    p.add_argument("out", help="output directory or s3://bucket/prefix")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="exact samples per shard; only a split's last shard may be short")
    p.add_argument("--heldout-fraction", type=float, default=0.0, help="fraction of train moved to a 'heldout' split by hashing each sample key")
    p.add_argument("--resize", type=int, default=0, metavar="N", help="shrink so the shorter side is N pixels (0: keep size)")
    p.add_argument("--upscale", action="store_true", help="with --resize, also enlarge images smaller than N")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality when re-encoding")
    p.add_argument("--max-pixels", type=int, default=100_000_000, help="reject images with more pixels (decompression bombs)")
    p.add_argument("--max-bytes", type=int, default=ImageOptions.max_bytes, help="reject source files larger than this, before reading them")
    p.add_argument("--classes", default=None, metavar="FILE", help="manifest sources: class names, one per line, line number = label")
    p.add_argument("--path-column", default=None, help="manifest column with the path or s3:// URI (default: path/uri/url/file/filename/image)")
    p.add_argument("--label-column", default=None, help="manifest column with the label(s) (default: label/labels/class/cls)")
    p.add_argument("--val-labels", default=None, metavar="CSV", help="class folders with a flat val/: CSV of image id -> class (e.g. LOC_val_solution.csv)")
    p.add_argument("--dedup", choices=("global", "split", "off"), default="global",
                   help="drop byte-identical images across the whole output (global), within each split, or not at all")
    p.add_argument("--limit-per-split", type=int, default=0, help="pack only the first N items of each split (0: all)")
    p.add_argument("--shuffle-seed", type=int, default=0, help="seed of the per-split sample order in the shards")
    p.add_argument("--no-shuffle", action="store_true", help="keep source order in the shards (class by class for folders)")
    p.add_argument("--chunk-size", type=int, default=512, help="items per staging chunk (resume granularity)")
    p.add_argument("--workers", type=int, default=1, help="processes on this machine")
    p.add_argument("--ray", action="store_true", help="run the tasks on a Ray cluster (RAY_ADDRESS, --ray-address, or a local one)")
    p.add_argument("--ray-address", default=None, help="Ray cluster address for --ray (default: RAY_ADDRESS or auto)")
    p.add_argument("--overwrite", action="store_true", help="delete what OUT holds and start over")
    p.add_argument("--keep-staging", action="store_true", help="keep OUT/_staging (encoded chunks) after success")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_s3(p)

    p = sub.add_parser("verify", help="re-read every shard and check counts and sha256 against the manifest")
    p.add_argument("out", help="a pack's OUT (local or s3://)")
    p.add_argument("--workers", type=int, default=1, help="processes on this machine reading shards in parallel")
    p.add_argument("--ray", action="store_true", help="read the shards as Ray tasks (RAY_ADDRESS, --ray-address, or a local one)")
    p.add_argument("--ray-address", default=None, help="Ray cluster address for --ray (default: RAY_ADDRESS or auto)")
    _add_s3(p)

    p = sub.add_parser("inspect", help="counts per split and class, sizes, rejected reasons")
    p.add_argument("out", help="a pack's OUT (local or s3://)")
    p.add_argument("--examples", type=int, default=3, help="rejected examples shown per reason")
    p.add_argument("--json", action="store_true", help="print the manifest summary as JSON")
    _add_s3(p)
    return ap


def cmd_pack(a: argparse.Namespace) -> int:
    opts = PackOptions(
        samples_per_shard=a.samples_per_shard, heldout_fraction=a.heldout_fraction,
        image=ImageOptions(resize_shorter=a.resize, upscale=a.upscale, quality=a.quality, max_pixels=a.max_pixels,
                           max_bytes=a.max_bytes),
        chunk_size=a.chunk_size, classes_file=a.classes, path_column=a.path_column, label_column=a.label_column,
        limit_per_split=a.limit_per_split, shuffle_seed=None if a.no_shuffle else a.shuffle_seed,
        dedup=a.dedup, val_labels=os.path.abspath(a.val_labels) if a.val_labels else None,
    )  # fmt: skip
    if opts.samples_per_shard < 1 or not 0.0 <= opts.heldout_fraction < 1.0:
        raise PackError("--samples-per-shard must be >= 1 and --heldout-fraction in [0, 1)")
    summary = pack(a.source, a.out, opts, workers=a.workers, use_ray=a.ray, ray_address=a.ray_address,
                   endpoint=a.s3_endpoint, overwrite=a.overwrite, keep_staging=a.keep_staging,
                   progress=not a.no_progress)  # fmt: skip
    if summary["status"] == "already complete":
        print(f"{a.out} already holds this finished pack ({summary['samples']} samples); nothing to do")
        return 0
    print(f"packed {summary['samples']} samples into {summary['shards']} shards ({summary['bytes'] / 1e6:.1f} MB) "
          f"in {summary['wall_s']} s, {summary['images_per_s']} images/s")  # fmt: skip
    print("  splits: " + ", ".join(f"{k} {v}" for k, v in summary["splits"].items()))
    print(f"  duplicates kept out: {summary['duplicates']} (listed in duplicates.jsonl)")
    print(f"  rejected: {summary['rejected']}" + "".join(f"\n    {n} x {r}" for r, n in sorted(summary["rejected_by_reason"].items())))
    print(f"  manifest: {Store(a.out).url('manifest.json')}")
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    t0 = time.time()
    n_shards, n_samples, problems = verify(a.out, a.s3_endpoint, a.workers, a.ray, a.ray_address)
    wall = max(time.time() - t0, 1e-9)
    size = sum(s["bytes"] for info in load_manifest(a.out, a.s3_endpoint)["splits"].values() for s in info["shards"])
    rate = f"{size / 1e6 / wall:.1f} MB/s, {n_samples / wall:.0f} samples/s in {wall:.1f} s"
    if problems:
        print(f"FAILED: {len(problems)} problem(s) in {a.out}", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    print(f"OK: {n_shards} shards, {n_samples} samples match {a.out}/manifest.json ({rate})")
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    m = load_manifest(a.out, a.s3_endpoint)
    store = Store(a.out, a.s3_endpoint)
    if a.json:
        print(json.dumps({k: v for k, v in m.items() if k != "splits" and not k.startswith("_")} | {
            "splits": {s: {k: v for k, v in info.items() if k != "shards"} | {"shards": len(info["shards"])}
                       for s, info in m["splits"].items()}}, indent=1))  # fmt: skip
        return 0
    print(f"{a.out}: {len(m['classes'])} classes, source {m['source']}")
    for split, info in m["splits"].items():
        size = sum(s["bytes"] for s in info["shards"])
        print(f"\n[{split}] {info['samples']} samples in {len(info['shards'])} shards, {size / 1e6:.2f} MB")
        width = max(len(c) for c in m["classes"])
        for name, count in zip(m["classes"], info["class_counts"]):
            print(f"  {name:<{width}} {count:>9}")
    print(f"\nduplicates kept out: {m['duplicates']}")
    print(f"rejected: {m['rejected']}")
    if m["rejected"] and store.exists(REJECTED):
        examples: dict[str, list[str]] = {}
        counts = Counter()
        for line in store.read_bytes(REJECTED).decode().splitlines():
            r = json.loads(line)
            cls = r["reason"].split(":", 1)[0]
            counts[cls] += 1
            if len(examples.setdefault(cls, [])) < a.examples:
                examples[cls].append(f"{r['path']}: {r['reason']}")
        for cls, n in counts.most_common():
            print(f"  {n} x {cls}")
            for e in examples[cls]:
                print(f"      e.g. {e}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"pack": cmd_pack, "verify": cmd_verify, "inspect": cmd_inspect}[args.command](args)
    except (PackError, SourceError, ManifestError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
