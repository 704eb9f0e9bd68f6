"""Pack a corpus into exact-count webdataset shards: deterministic, resumable, parallel.

Three stages, each made of independent tasks that run inline, in a process pool, or as Ray tasks:

1. chunks: the ordered items are cut into fixed-size chunks (independent of the worker count).
   A task reads, hashes, decodes and encodes its items into `OUT/_staging/chunk-NNNNNN.bin`, then
   writes `chunk-NNNNNN.json` (one record per item: ok with sha256 and byte spans, or rejected
   with a reason).
   The index is written last, so a chunk with an index is complete; resume skips it.
2. plan (driver, metadata only): walk every record in source order; drop rejects; keep the first
   copy of each sha256 (later copies are duplicates); move a train item to `heldout` when
   hash(key) < heldout_fraction; shuffle each split with a fixed seed (unless disabled); cut each
   split into shards of exactly N samples.
3. shards: a task copies its samples out of the staging chunks into `{split}-{index:06d}.tar`,
   written atomically, and records its size and sha256 in `_staging/shards/NAME.json`.

Then rejected.jsonl, duplicates.jsonl and finally manifest.json; `_staging/` is removed.
Tar headers use mtime 0 and JPEG encoding is deterministic, so a resumed pack produces the same
bytes and hashes as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import platform
import random
import tarfile
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .images import ImageOptions, Reject, encode_image
from .manifest import DUPLICATES, FORMAT, MANIFEST, REJECTED, write_offsets
from .sources import Corpus, SourceItem, TooLarge, load_corpus, read_item_bytes
from .storage import Store, split_s3
from .tasks import run_tasks

STAGING = "_staging"
SPLIT_ORDER = ("train", "heldout", "val")


@dataclass(frozen=True)
class PackOptions:
    samples_per_shard: int = 1000
    heldout_fraction: float = 0.0
    image: ImageOptions = field(default_factory=ImageOptions)
    chunk_size: int = 512  # items per staging chunk; resume granularity of stage 1
    # Shards are written in a seeded random order per split, so a shard mixes classes (class
    # folders enumerate class by class) and a streaming reader needs only a small shuffle window.
    shuffle_seed: int | None = 0
    classes_file: str | None = None
    path_column: str | None = None
    label_column: str | None = None
    limit_per_split: int = 0
    # "global": a byte-identical image is kept once in the whole output (first in source order:
    # train before val, so val images that duplicate train images are dropped: no leakage);
    # "split": once per split (ImageNet's val keeps its published count); "off".
    dedup: str = "global"
    val_labels: str | None = None  # labels CSV for a flat val/ folder (see sources.py)

    def fingerprint(self) -> dict:
        """Everything that changes the output (and the staging layout), not how it is executed.
        Options at their defaults that were added later are left out, so older packs still match."""
        d = dataclasses.asdict(self)
        for late, default in (("dedup", "global"), ("val_labels", None)):
            if d[late] == default:
                del d[late]
        if d["image"].get("max_bytes") == ImageOptions.max_bytes:  # added later; no output changes below it
            del d["image"]["max_bytes"]
        return d


class PackError(Exception):
    """The pack cannot start or continue; the message says why and what to do."""


# ---- stage 1: chunks ---------------------------------------------------------------------------
class ShardWriter:
    """Writes webdataset samples to a tar stream the way webdataset.TarWriter does (one member per
    field, `key.field`, fields sorted), with mtime 0 so the bytes are reproducible.

    We use tarfile directly because importing webdataset imports torch (~2.3 s per process), which
    packing does not otherwise need; the format is plain POSIX tar either way.
    """

    def __init__(self, fileobj):
        self.tar = tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.USTAR_FORMAT)

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        for name in sorted(fields):
            data = fields[name]
            info = tarfile.TarInfo(f"{key}.{name}")
            info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o444, "bigdata", "bigdata"
            self.tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self.tar.close()


def build_chunk(root: str, endpoint: str | None, chunk_id: int, items: Sequence[SourceItem],
                classes: Sequence[str], opts: ImageOptions) -> dict:  # fmt: skip
    """Stage-1 task: encode `items` into a staging blob plus its index. Returns counts for progress.

    The blob is the samples' fields back to back; the index records (offset, length) per field,
    so stage 3 slices bytes instead of parsing a tar (tarfile costs ~0.2 ms per entry).
    """
    store = Store(root, endpoint)
    records, counts = [], Counter()
    with store.open_write_atomic(f"{STAGING}/chunk-{chunk_id:06d}.bin") as f:
        offset = 0
        for it in items:
            rec = {"key": it.key, "split": it.split, "labels": list(it.labels), "path": it.rel, "location": it.location}
            reason = it.reject
            if reason is None:
                try:
                    data = read_item_bytes(it, endpoint, opts.max_bytes)
                except TooLarge as e:
                    reason = str(e)
                except FileNotFoundError:
                    reason = "missing file"
                except OSError as e:
                    reason = f"unreadable file: {type(e).__name__}: {e.strerror or e}"
            if reason is None:
                raw = ("L", (28, 28)) if it.location.startswith("fashion-mnist:") else None
                sha = hashlib.sha256(data).hexdigest()
                try:
                    enc = encode_image(data, opts, raw=raw)
                except Reject as e:
                    reason = str(e)
            if reason is not None:
                records.append({**rec, "status": "rejected", "reason": reason})
                counts["rejected"] += 1
                continue
            meta = {"source": it.rel, "class_name": classes[it.labels[0]], "labels": list(it.labels),
                    "original_size": list(enc.original_size), "sha256": sha}  # fmt: skip
            fields = {"cls": str(it.labels[0]).encode(), "jpg": enc.jpg, "json": json.dumps(meta, sort_keys=True).encode()}
            spans = {}
            for name, blob in fields.items():
                f.write(blob)
                spans[name] = (offset, len(blob))
                offset += len(blob)
            records.append({**rec, "status": "ok", "sha256": sha, "spans": spans})
            counts["ok"] += 1
    # The index is the completion marker of the chunk: written after the blob is in place.
    store.write_bytes_atomic(f"{STAGING}/chunk-{chunk_id:06d}.json", json.dumps(records).encode())
    return {"chunk": chunk_id, "items": len(items), **counts}


# ---- stage 2: plan -----------------------------------------------------------------------------
def heldout_draw(key: str) -> float:
    """A uniform number in [0, 1) from the sample key alone: same on every machine and worker count."""
    return int.from_bytes(hashlib.sha256(f"heldout:{key}".encode()).digest()[:8], "big") / 2**64


@dataclass
class Plan:
    shards: list[dict]  # {"name", "split", "members": [(chunk_id, key, {field: (offset, length)})]}
    rejected: list[dict]
    duplicates: list[dict]
    split_counts: dict[str, int]
    class_counts: dict[str, list[int]]


def make_plan(chunk_records: list[list[dict]], n_classes: int, opts: PackOptions) -> Plan:
    rejected, duplicates, first_seen = [], [], {}
    by_split: dict[str, list[tuple[int, dict]]] = {}
    for chunk_id, records in enumerate(chunk_records):
        for rec in records:
            if rec["status"] != "ok":
                rejected.append({k: rec[k] for k in ("path", "location", "key", "split", "reason")})
                continue
            ident = (rec["split"], rec["sha256"]) if opts.dedup == "split" else rec["sha256"]
            if opts.dedup != "off" and ident in first_seen:
                kept = first_seen[ident]
                duplicates.append({"key": rec["key"], "path": rec["path"], "sha256": rec["sha256"],
                                   "duplicate_of_key": kept["key"], "duplicate_of_path": kept["path"]})  # fmt: skip
                continue
            first_seen[ident] = rec
            split = rec["split"]
            if split == "train" and opts.heldout_fraction > 0 and heldout_draw(rec["key"]) < opts.heldout_fraction:
                split = "heldout"
            by_split.setdefault(split, []).append((chunk_id, rec))
    order = [s for s in SPLIT_ORDER if s in by_split] + sorted(s for s in by_split if s not in SPLIT_ORDER)
    if opts.shuffle_seed is not None:
        for split in order:
            random.Random(f"{opts.shuffle_seed}:{split}").shuffle(by_split[split])
    shards, split_counts, class_counts = [], {}, {}
    n = opts.samples_per_shard
    for split in order:
        members = by_split[split]
        split_counts[split] = len(members)
        totals = [0] * n_classes
        for start in range(0, len(members), n):
            group = members[start : start + n]
            counts = Counter(lab for _, rec in group for lab in rec["labels"])
            for lab, c in counts.items():
                totals[lab] += c
            shards.append({"name": f"{split}-{start // n:06d}.tar", "split": split,
                           "members": [(cid, rec["key"], rec["spans"]) for cid, rec in group]})  # fmt: skip
        class_counts[split] = totals
    return Plan(shards, rejected, duplicates, split_counts, class_counts)


# ---- stage 3: shards ---------------------------------------------------------------------------
class _HashingWriter(io.RawIOBase):
    def __init__(self, raw):
        self.raw, self.sha, self.n = raw, hashlib.sha256(), 0

    def writable(self):
        return True

    def write(self, data):
        self.raw.write(data)
        self.sha.update(data)
        self.n += len(data)
        return len(data)


def _matches(store: Store, name: str, info: dict) -> bool:
    """The shard's size, then its sha256 (one streamed read), equal what its sidecar recorded."""
    if store.size(name) != info.get("bytes"):
        return False
    sha = hashlib.sha256()
    with store.open_read(name) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest() == info.get("sha256")


def build_shard(root: str, endpoint: str | None, name: str, members: Sequence[tuple[int, str, dict]]) -> dict:
    """Stage-3 task: copy samples out of staging chunks into one shard tar, atomically."""
    store = Store(root, endpoint)
    sidecar = f"{STAGING}/shards/{name}.json"
    if store.exists(name) and store.exists(sidecar):  # finished by an earlier, interrupted run?
        info = json.loads(store.read_bytes(sidecar))
        if info.get("samples") == len(members) and _matches(store, name, info):
            return info
        # a shard that does not match its sidecar (truncated, 0 bytes, replaced) is rebuilt, not trusted
    blobs = {cid: store.read_bytes(f"{STAGING}/chunk-{cid:06d}.bin") for cid in sorted({m[0] for m in members})}
    # offsets[i] = byte offset of sample i's first tar header; offsets[-1] = end of the last sample.
    # A USTAR member is one 512-byte header plus its data padded to 512 (names stay < 100 chars),
    # so the offsets follow from the field sizes; readers seek straight to a sample with them.
    offsets = [0]
    with store.open_write_atomic(name) as f:
        hw = _HashingWriter(f)
        writer = ShardWriter(hw)
        for cid, key, spans in members:
            blob = blobs[cid]
            writer.write(key, {field: blob[o : o + n] for field, (o, n) in spans.items()})
            offsets.append(offsets[-1] + sum(512 + -(-n // 512) * 512 for _, n in spans.values()))
        writer.close()
    if offsets[-1] + 1024 > hw.n:  # the end-of-archive blocks follow the last sample
        raise PackError(f"{name}: sample offsets ({offsets[-1]}) do not fit the tar's {hw.n} bytes")
    info = {"name": name, "samples": len(members), "bytes": hw.n, "sha256": hw.sha.hexdigest(), "offsets": offsets}
    store.write_bytes_atomic(sidecar, json.dumps(info).encode())
    return info


# ---- execution ---------------------------------------------------------------------------------
def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "format": FORMAT}
    for pkg in ("pillow", "numpy", "webdataset", "boto3"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _refuse_overlap(source: str, out: str) -> None:
    """SOURCE and OUT must not overlap either way: OUT inside SOURCE reads its own shards as input, and
    SOURCE inside OUT is deleted by --overwrite (OUT=x, SOURCE=x/src once deleted the corpus)."""
    if source == "fashion-mnist" or Store(source).s3 != Store(out).s3:
        return
    if Store(source).s3:
        a, b = (("/".join(split_s3(u)).rstrip("/") + "/") for u in (source, out))
    else:
        a, b = (str(Path(u).resolve()).rstrip("/") + "/" for u in (source, out))
    if b.startswith(a):
        raise PackError(f"OUT {out} lies inside SOURCE {source}; its shards would be read as input")
    if a.startswith(b):
        raise PackError(f"SOURCE {source} lies inside OUT {out}; OUT must be a separate place (--overwrite would delete SOURCE)")


def _describe(listing: dict) -> str:
    return f"{listing.get('files', '?')} files, {listing.get('bytes', 0) / 1e6:.1f} MB"


def _same_listing(old: dict | None, new: dict) -> bool:
    """Packs and markers written before listings were recorded have none: they match any listing."""
    return not old or not new or old == new


def _prepare_out(store: Store, source: str, opts: PackOptions, overwrite: bool, listing: dict | None = None) -> bool:
    """Returns True when OUT already holds this exact finished pack. Raises on a conflicting OUT.
    A pack's identity is SOURCE, the options and what SOURCE held (its listing fingerprint)."""
    store.check_writable()
    listing = listing or {}
    identity = {"source": source, "options": opts.fingerprint()}
    if overwrite:
        for name in store.list():
            if not name.startswith(".write-probe"):
                store.delete(name)
    if store.exists(MANIFEST):
        previous = json.loads(store.read_bytes(MANIFEST))
        if {"source": previous.get("source"), "options": previous.get("options")} == identity:
            if not _same_listing(previous.get("listing"), listing):
                raise PackError(f"SOURCE {source} changed since {store.root} was packed ({_describe(previous['listing'])} "
                                f"then, {_describe(listing)} now); pass --overwrite to repack (fine-tuning: delete "
                                f"{store.root}), or choose a new OUT")  # fmt: skip
            return True
        raise PackError(f"{store.root} already holds a finished pack made with other options or SOURCE; "
                        "choose another OUT or pass --overwrite")  # fmt: skip
    marker = f"{STAGING}/pack.json"
    if store.exists(marker):
        started = json.loads(store.read_bytes(marker))
        if {k: started.get(k) for k in identity} != identity:
            raise PackError(f"{store.root} holds an interrupted pack with other options or SOURCE; rerun "
                            "that exact command to resume it, or pass --overwrite to start over")  # fmt: skip
        if not _same_listing(started.get("listing"), listing):  # resuming would mix two listings' chunks
            raise PackError(f"SOURCE {source} changed since the interrupted pack in {store.root} started "
                            f"({_describe(started['listing'])} then, {_describe(listing)} now); pass --overwrite to start over")  # fmt: skip
    else:
        if any(not n.startswith(".write-probe") for n in store.list()):
            raise PackError(f"{store.root} is not empty and holds no pack of ours; choose an empty OUT or pass --overwrite")
        store.write_bytes_atomic(marker, json.dumps({**identity, "listing": listing}).encode())
    if not store.s3:  # temp files of a killed run
        for name in store.list():
            if ".tmp-" in name:
                store.delete(name)
    return False


def pack(source: str, out: str, opts: PackOptions, *, workers: int = 1, use_ray: bool = False,
         ray_address: str | None = None, endpoint: str | None = None, overwrite: bool = False,
         keep_staging: bool = False, progress: bool = True) -> dict:  # fmt: skip
    """Pack SOURCE into OUT; returns the summary (also printed by the CLI)."""
    from tqdm import tqdm

    t0 = time.time()
    if opts.dedup not in ("global", "split", "off"):
        raise PackError(f"dedup must be 'global', 'split' or 'off', got {opts.dedup!r}")
    _refuse_overlap(source, out)
    corpus: Corpus = load_corpus(source, classes_file=opts.classes_file, path_column=opts.path_column,
                                 label_column=opts.label_column, limit_per_split=opts.limit_per_split,
                                 endpoint=endpoint, val_labels=opts.val_labels)  # fmt: skip
    store = Store(out, endpoint)
    if _prepare_out(store, source, opts, overwrite, corpus.listing):
        manifest = json.loads(store.read_bytes(MANIFEST))
        return {"status": "already complete", "out": out, "samples": sum(s["samples"] for s in manifest["splits"].values())}

    items = corpus.items
    cs = opts.chunk_size
    chunks = [items[i : i + cs] for i in range(0, len(items), cs)]
    done = {int(n[len(STAGING) + 7 : -5]) for n in store.list(STAGING) if n.endswith(".json") and "/chunk-" in n}
    todo = [i for i in range(len(chunks)) if i not in done]
    bar = tqdm(total=len(items), initial=sum(len(chunks[i]) for i in done), unit="img", desc="encode",
               disable=not progress, dynamic_ncols=True, file=sys.stderr)  # fmt: skip
    run_tasks(build_chunk, [(out, endpoint, i, chunks[i], corpus.classes, opts.image) for i in todo],
              workers, use_ray, ray_address, lambda r: bar.update(r["items"]))  # fmt: skip
    bar.close()

    records = [json.loads(store.read_bytes(f"{STAGING}/chunk-{i:06d}.json")) for i in range(len(chunks))]
    for i in sorted(done):  # encoded by an earlier run: same items, same labels (else two listings would mix)
        if [(r["key"], r["labels"]) for r in records[i]] != [(it.key, list(it.labels)) for it in chunks[i]]:
            raise PackError(f"{store.root}: staging chunk {i} was encoded from another listing or labelling of SOURCE "
                            f"{source}; pass --overwrite to start over")  # fmt: skip
    plan = make_plan(records, len(corpus.classes), opts)
    bar = tqdm(total=len(plan.shards), unit="shard", desc="shards", disable=not progress, dynamic_ncols=True, file=sys.stderr)
    infos = run_tasks(build_shard, [(out, endpoint, s["name"], s["members"]) for s in plan.shards],
                      workers, use_ray, ray_address, lambda r: bar.update(1))  # fmt: skip
    bar.close()

    plan.rejected.extend(corpus.skipped)  # folders not walked (symlink loops): recorded, not silent
    store.write_bytes_atomic(REJECTED, "".join(json.dumps(r) + "\n" for r in plan.rejected).encode())
    store.write_bytes_atomic(DUPLICATES, "".join(json.dumps(d) + "\n" for d in plan.duplicates).encode())
    reasons = Counter(_reason_class(r["reason"]) for r in plan.rejected)
    if not sum(plan.split_counts.values()):  # no manifest: an empty pack must not look like a finished one
        listed = ", ".join(f"{n} x {r}" for r, n in reasons.most_common())
        raise PackError(f"nothing packed: all {len(plan.rejected)} items were rejected ({listed}); "
                        f"see {store.url(REJECTED)}")  # fmt: skip
    splits = {}
    for split, count in plan.split_counts.items():
        shards = [i for i, s in zip(infos, plan.shards) if s["split"] == split]
        splits[split] = {"samples": count, "class_counts": plan.class_counts[split], "shards": shards}
    manifest = {
        "format": FORMAT, "classes": corpus.classes, "multi_label": corpus.multi_label, "splits": splits,
        "duplicates": len(plan.duplicates), "rejected": len(plan.rejected),
        "rejected_by_reason": dict(sorted(reasons.items())), "source": source,
        "options": opts.fingerprint(), "listing": corpus.listing, "versions": _versions(),
    }  # fmt: skip
    write_offsets(store, manifest, {i["name"]: i["offsets"] for i in infos})  # the sidecar, before the manifest
    store.write_bytes_atomic(MANIFEST, json.dumps(manifest, indent=1).encode())  # last: the pack is complete
    if not keep_staging:
        store.delete_tree(STAGING)
    wall = time.time() - t0
    packed = sum(plan.split_counts.values())
    return {"status": "packed", "out": out, "samples": packed, "splits": plan.split_counts,
            "duplicates": len(plan.duplicates), "rejected": len(plan.rejected),
            "rejected_by_reason": dict(reasons), "bytes": sum(i["bytes"] for i in infos),
            "shards": len(infos), "wall_s": round(wall, 2), "images_per_s": round(len(items) / max(wall, 1e-9), 1)}  # fmt: skip


def _reason_class(reason: str) -> str:
    """Group reasons for counting: the text before the first ':' ("corrupt or truncated image")."""
    return reason.split(":", 1)[0].split(" in row ")[0]
