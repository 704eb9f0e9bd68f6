"""manifest.json: the one source of truth for shard names, exact counts and hashes.

Written last by `pack`; read by `verify`, `inspect`, the training loader, the trainer's compute
accounting and the scaling fits. Layout:

    {"format": "nfnet-scale/wds-v2",
     "classes": ["cat", "dog", ...],            # index = label
     "multi_label": false,
     "splits": {"train": {"samples": 1000, "class_counts": [..], "shards": [
                   {"name": "train-000000.tar", "samples": 256, "bytes": 1234, "sha256": "..."}, ...]},
                "heldout": {...}, "val": {...}},
     "duplicates": 3, "rejected": 2, "rejected_by_reason": {"empty file (0 bytes)": 1, ...},
     "offsets": {"file": "offsets.npy", "sha256": "...", "count": N},
     "source": "...", "options": {...}, "versions": {...}}

Per-sample byte offsets live in the `offsets.npy` sidecar (int64, every shard's samples + 1 offsets
back to back; a shard's record says where its run starts: "offsets_at"), not in the JSON: at 10M
samples they are 80 MB of int64 instead of ~170 MB of indented JSON re-read by every rank at every
evaluation, and shards_of hands out numpy views instead of tuples of Python ints (~360 MB).
Packs written before the sidecar keep their offsets inline and still load.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass

import numpy as np

from .storage import Store

FORMAT = "nfnet-scale/wds-v2"  # v2: offsets in the offsets.npy sidecar (shard records carry "offsets_at")
READABLE = ("nfnet-scale/wds-v1", FORMAT)  # v1 packs (inline offsets) still load
MANIFEST = "manifest.json"
REJECTED = "rejected.jsonl"
DUPLICATES = "duplicates.jsonl"
SAMPLE_FIELDS = ("jpg", "cls", "json")
OFFSETS = "offsets.npy"


class ManifestError(Exception):
    pass


@dataclass(frozen=True, eq=False)  # eq=False: `offsets` is a numpy view
class ShardInfo:
    name: str
    split: str
    samples: int
    bytes: int
    sha256: str
    offsets: np.ndarray | tuple[int, ...] | None = None  # byte offset of each sample, plus the end (packs since 0.2)


def write_offsets(store: Store, manifest: dict, shard_offsets: dict[str, list[int]]) -> None:
    """Move per-shard offsets into the OFFSETS sidecar (written before the manifest that records its
    sha256); each shard record gets "offsets_at" instead of its list."""
    parts, at = [], 0
    for info in manifest["splits"].values():
        for s in info["shards"]:
            offs = shard_offsets[s["name"]]
            s.pop("offsets", None)
            s["offsets_at"] = at
            parts.append(np.asarray(offs, dtype=np.int64))
            at += len(offs)
    buf = io.BytesIO()
    np.save(buf, np.concatenate(parts) if parts else np.zeros(0, np.int64), allow_pickle=False)
    data = buf.getvalue()
    store.write_bytes_atomic(OFFSETS, data)
    manifest["offsets"] = {"file": OFFSETS, "sha256": hashlib.sha256(data).hexdigest(), "count": at}


def _load_offsets(store: Store, manifest: dict) -> np.ndarray | None:
    side = manifest.get("offsets")
    if not side:
        return None
    data = store.read_if_exists(side["file"]) or b""
    if hashlib.sha256(data).hexdigest() != side["sha256"]:
        raise ManifestError(f"{store.url(side['file'])} is missing or does not match the sha256 in {MANIFEST}")
    # A view over the bytes already in memory (np.load would copy them: 80 MB more at 10M samples).
    f = io.BytesIO(data)
    version = np.lib.format.read_magic(f)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = reader(f)
    arr = np.frombuffer(data, dtype=dtype, count=int(np.prod(shape)), offset=f.tell()).reshape(shape)
    if arr.dtype != np.int64 or arr.shape != (side["count"],):
        raise ManifestError(f"{store.url(side['file'])}: {arr.dtype} {arr.shape}, expected int64 ({side['count']},)")
    return arr


def load_manifest(root: str, endpoint: str | None = None, offsets: bool = True) -> dict:
    """The manifest; with `offsets`, also the offsets.npy sidecar (hash-checked: 80 MB at 10M samples),
    which only readers of samples need, not checks of counts and labels."""
    store = Store(root, endpoint)
    data = store.read_if_exists(MANIFEST)
    if data is None:
        raise ManifestError(f"{store.url(MANIFEST)} not found: not a data_prep output, or the pack did not finish (rerun it to resume)")
    manifest = json.loads(data)
    if manifest.get("format") not in READABLE:
        raise ManifestError(f"{store.url(MANIFEST)}: unknown format {manifest.get('format')!r}, expected one of {list(READABLE)}")
    flat = _load_offsets(store, manifest) if offsets else None
    if flat is not None:  # not JSON: a key no JSON dump of the manifest should include
        manifest["_offsets"] = flat
    return manifest


def shards_of(manifest: dict, split: str) -> list[ShardInfo]:
    if split not in manifest["splits"]:
        raise ManifestError(f"split {split!r} not in manifest; splits are {sorted(manifest['splits'])}")
    flat = manifest.get("_offsets")
    out = []
    for s in manifest["splits"][split]["shards"]:
        rec = {k: v for k, v in s.items() if k not in ("offsets", "offsets_at")}
        if "offsets_at" in s and flat is not None:
            offsets = flat[s["offsets_at"] : s["offsets_at"] + s["samples"] + 1]  # a view, no copy
        else:
            offsets = tuple(s["offsets"]) if s.get("offsets") else None
        out.append(ShardInfo(split=split, **rec, offsets=offsets))
    return out


def count_tar_samples(fileobj) -> tuple[int, list[str]]:
    """Samples (distinct keys, in order) in a webdataset tar stream; problems as messages."""
    problems, fields_by_key, order = [], {}, []
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            key_part, _, ext = base.partition(".")
            key = member.name[: len(member.name) - len(base)] + key_part
            if key not in fields_by_key:
                fields_by_key[key] = set()
                order.append(key)
            fields_by_key[key].add(ext)
            tar.extractfile(member).read()  # read through, so truncation surfaces here
    for key in order:
        missing = [f for f in SAMPLE_FIELDS if f not in fields_by_key[key]]
        if missing:
            problems.append(f"sample {key} lacks {', '.join(missing)}")
    return len(order), problems


class _HashingReader:
    def __init__(self, raw):
        self.raw, self.sha, self.n = raw, hashlib.sha256(), 0

    def read(self, size=-1):
        data = self.raw.read(size) if size is not None and size >= 0 else self.raw.read()
        self.sha.update(data)
        self.n += len(data)
        return data


def verify_shard(store: Store, shard: ShardInfo) -> list[str]:
    """Re-read one shard; returns problems (empty when it matches the manifest)."""
    if not store.exists(shard.name):
        return [f"{shard.name}: missing"]
    try:
        with store.open_read(shard.name) as raw:
            reader = _HashingReader(raw)
            count, problems = count_tar_samples(reader)
            while reader.read(1 << 20):  # hash any trailing bytes after the tar end marker
                pass
    except (tarfile.TarError, OSError, EOFError) as e:
        return [f"{shard.name}: unreadable tar ({type(e).__name__}: {e})"]
    out = [f"{shard.name}: {p}" for p in problems]
    if count != shard.samples:
        out.append(f"{shard.name}: {count} samples, manifest says {shard.samples}")
    if reader.n != shard.bytes:
        out.append(f"{shard.name}: {reader.n} bytes, manifest says {shard.bytes}")
    if reader.sha.hexdigest() != shard.sha256:
        out.append(f"{shard.name}: sha256 {reader.sha.hexdigest()[:16]}... differs from the manifest's {shard.sha256[:16]}...")
    return out


def _verify_task(root: str, endpoint: str | None, shard: ShardInfo) -> dict:
    return {"problems": verify_shard(Store(root, endpoint), shard), "bytes": shard.bytes}


def verify(root: str, endpoint: str | None = None, workers: int = 1, use_ray: bool = False,
           ray_address: str | None = None) -> tuple[int, int, list[str]]:  # fmt: skip
    """(shards checked, samples, problems) for every shard of every split; shards are re-read in
    `workers` processes or as Ray tasks (each task gets its shard's record, not the manifest)."""
    from .tasks import run_tasks

    manifest = load_manifest(root, endpoint)
    problems, shards = [], []
    for split, info in sorted(manifest["splits"].items()):
        split_shards = shards_of(manifest, split)
        if sum(s.samples for s in split_shards) != info["samples"]:
            problems.append(f"split {split}: shard counts add to {sum(s.samples for s in split_shards)}, manifest says {info['samples']}")
        shards += split_shards
    results = run_tasks(_verify_task, [(root, endpoint, s) for s in shards], workers, use_ray, ray_address, lambda r: None)
    for r in results:
        problems += r["problems"]
    return len(shards), sum(s.samples for s in shards), problems
