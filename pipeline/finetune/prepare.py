"""The fine-tuning stage's data, prepared in the job's driver before any worker starts.

`data.source` (ImageNet's train/<wnid> + val/<wnid>, a flat val/ with `data.val_labels`, any
class-folder dataset, a manifest, an s3:// prefix) is packed by data_prep into `data.root`
(default {storage}/{name}/data): corrupt and non-image files are rejected and listed with a reason
in rejected.jsonl, an interrupted pack resumes, a finished one is reused. Duplicates are removed
within each split only, so a validation set keeps its published size. Then the manifest is the
one source of class names and order; `data.classes`, when given, must equal it.
"""

from __future__ import annotations

import os

from data_prep.images import ImageOptions
from data_prep.manifest import load_manifest
from data_prep.pack import PackOptions, pack

from pipeline.config import TrainConfig, check_objective

from .sources import check_classes, source_classes


def declared_classes(spec: str) -> list[str]:
    """`data.classes`: a file with one class per line, or comma-separated names."""
    if os.path.isfile(spec):
        with open(spec) as f:
            return [ln.strip() for ln in f if ln.strip()]
    return [c.strip() for c in spec.split(",") if c.strip()]


def prepare_data(cfg: TrainConfig, *, use_ray: bool = False, workers: int = 1, progress: bool = True) -> dict:
    """Pack `data.source` if set, check splits and classes; returns the manifest. Sets cfg.data.root."""
    d = cfg.data
    endpoint = d.s3_endpoint or None
    if d.source:
        if not d.root:
            storage = cfg.run.storage if cfg.run.storage.startswith("s3://") else os.path.abspath(cfg.run.storage)
            d.root = f"{storage.rstrip('/')}/{cfg.run.name}/data"
        opts = PackOptions(samples_per_shard=1000, dedup="split", val_labels=d.val_labels or None,
                           image=ImageOptions(resize_shorter=d.pack_resize))  # fmt: skip
        s = pack(d.source, d.root, opts, workers=workers, use_ray=use_ray, endpoint=endpoint, progress=progress)
        if s["status"] == "already complete":
            print(f"data: {d.root} already holds {d.source} packed ({s['samples']} images)", flush=True)
        else:
            print(f"data: packed {d.source} into {d.root}: {s['splits']}; duplicates {s['duplicates']}; rejected "
                  f"{s['rejected']} {s['rejected_by_reason'] or ''} (listed in {d.root}/rejected.jsonl)", flush=True)  # fmt: skip
    if not d.root:
        raise ValueError("set data.root (a data_prep output) or data.source (a dataset to pack)")
    manifest = load_manifest(d.root, endpoint)
    check_objective(cfg, manifest, f"{d.root}/manifest.json")  # a multi-label pack needs optim.objective=sigmoid
    needed = [d.eval_split] + ([d.train_split] if cfg.run.mode == "train" else [])
    for split in needed:
        if split not in manifest["splits"]:
            raise ValueError(f"{d.root} has no {split!r} split (it has {sorted(manifest['splits'])}); a class-folder "
                             f"dataset needs train/ and val/ folders, or set data.train_split / data.eval_split")  # fmt: skip
    if d.classes:
        check_classes(declared_classes(d.classes), manifest["classes"], "data.classes", d.root)
    if cfg.run.mode == "eval":  # the weights' classifier must mean the dataset's classes
        declared = source_classes(cfg.model.init_from)
        if declared is not None:
            check_classes(declared, manifest["classes"], cfg.model.init_from, f"{d.root} (split {d.eval_split})")
    return manifest
