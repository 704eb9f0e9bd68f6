"""Pack a corpus into exact-count webdataset shards: deterministic, resumable, parallel.

Three stages, each made of independent tasks that run inline, in a process pool, or as Ray tasks:

1. chunks: the ordered items are cut into fixed-size chunks (independent of the worker count).
   A task reads, hashes, decodes and encodes its items into `OUT/_staging/chunk-NNNNNN.bin`, one
   self-describing segment per sample, then writes `chunk-NNNNNN.json` (one record per item: ok
   with sha256 and its segment's (start, length), or rejected with a reason).
   The index is written last, so a chunk with an index is complete; resume skips it.
2. plan (driver, metadata only; data_prep/plan.py): dedup, heldout draw, seeded shuffle, cut into
   shards of exactly N samples, with a few dozen bytes of driver memory per item.
3. shards: a task reads exactly its samples' segments (ranged reads, never a whole chunk: with
   pack-time shuffling a shard's samples come from nearly every chunk, and reading the chunks whole
   made the bytes read grow with the square of the corpus) into `{split}-{index:06d}.tar`, written
   atomically, and records its size and sha256 in `_staging/shards/NAME.json`.

Then rejected.jsonl, duplicates.jsonl and finally manifest.json; `_staging/` is removed.
Tar headers use mtime 0 and JPEG encoding is deterministic, so a resumed pack produces the same
bytes and hashes as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import os
import platform
import sys
import tarfile
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .images import ImageOptions, Reject, encode_image
from .manifest import DUPLICATES, FORMAT, MANIFEST, REJECTED, write_offsets
from .plan import heldout_draw, make_plan  # noqa: F401 - heldout_draw is part of this module's API
from .sources import Corpus, SourceItem, TooLarge, load_corpus, read_item_bytes
from .storage import Store, split_s3
from .tasks import run_tasks

STAGING = "_staging"
# 2: a chunk blob holds one self-describing segment per sample (see _segment), and its index records
# the segment's (start, length); version 1 recorded per-field spans. Interrupted v1 stagings are refused.
STAGING_FORMAT = 2


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


def _segment(key: str, fields: dict[str, bytes]) -> bytes:
    """One sample in a staging blob: 4-byte big-endian header length, header JSON {"key", "fields":
    [[name, length], ...]}, then the fields' bytes in that order. A shard task reads a sample with one
    ranged read and needs nothing else from the driver: no key strings or spans per item in memory."""
    header = json.dumps({"key": key, "fields": [[n, len(b)] for n, b in fields.items()]}).encode()
    return len(header).to_bytes(4, "big") + header + b"".join(fields.values())


def _parse_segment(seg: bytes, where: str) -> tuple[str, dict[str, bytes]]:
    """`where` names the staging chunk and offset (chunk-NNNNNN.bin@start) in any error."""
    try:
        hlen = int.from_bytes(seg[:4], "big")
        header = json.loads(seg[4 : 4 + hlen])
        fields, pos = {}, 4 + hlen
        for name, n in header["fields"]:
            fields[name] = seg[pos : pos + n]
            pos += n
    except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise PackError(f"{where}: corrupt staging segment ({type(e).__name__}: {e}); pass --overwrite to start over") from e
    if pos != len(seg):
        raise PackError(f"{where}: staging segment of {header['key']} has {len(seg)} bytes, its header says {pos}; "
                        "pass --overwrite to start over")  # fmt: skip
    return header["key"], fields


def build_chunk(root: str, endpoint: str | None, chunk_id: int, items: Sequence[SourceItem],
                classes: Sequence[str], opts: ImageOptions) -> dict:  # fmt: skip
    """Stage-1 task: encode `items` into a staging blob plus its index. Returns counts for progress."""
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
            seg = _segment(it.key, fields)
            f.write(seg)
            records.append({**rec, "status": "ok", "sha256": sha, "segment": [offset, len(seg)]})
            offset += len(seg)
            counts["ok"] += 1
    # The index is the completion marker of the chunk: written after the blob is in place.
    store.write_bytes_atomic(f"{STAGING}/chunk-{chunk_id:06d}.json", json.dumps(records).encode())
    return {"chunk": chunk_id, "items": len(items), **counts}


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


def _read_segments(store: Store, members: np.ndarray) -> Iterator[tuple[str, bytes]]:
    """(where, bytes) of the segments `members` (rows: chunk id, start, length) name, in order, reading
    exactly their bytes. Local: pread on chunk files kept open (at most 256 at once). S3: ranged GETs,
    16 in flight to hide each request's latency (a sliding window: at most 16 segments buffered)."""
    name = lambda cid: f"{STAGING}/chunk-{int(cid):06d}.bin"  # noqa: E731
    if store.s3:
        rows = iter(members.tolist())
        with ThreadPoolExecutor(16, thread_name_prefix="segment") as pool:
            pending: deque = deque()
            for cid, start, length in itertools.islice(rows, 16):
                pending.append((f"{name(cid)}@{start}", pool.submit(store.read_range, name(cid), start, length)))
            while pending:
                where, fut = pending.popleft()
                for cid, start, length in itertools.islice(rows, 1):
                    pending.append((f"{name(cid)}@{start}", pool.submit(store.read_range, name(cid), start, length)))
                yield where, fut.result()
        return
    fds: OrderedDict[int, int] = OrderedDict()
    try:
        for cid, start, length in members.tolist():
            if cid not in fds:
                if len(fds) >= 256:
                    os.close(fds.popitem(last=False)[1])
                fds[cid] = os.open(store.url(name(cid)), os.O_RDONLY)
            fds.move_to_end(cid)
            seg = os.pread(fds[cid], length, start)
            if len(seg) != length:
                raise PackError(f"{store.url(name(cid))}: segment at {start} cut short ({len(seg)} of {length} bytes); "
                                "pass --overwrite to start over")  # fmt: skip
            yield f"{name(cid)}@{start}", seg
    finally:
        for fd in fds.values():
            os.close(fd)


def build_shard(root: str, endpoint: str | None, name: str, members: np.ndarray) -> dict:
    """Stage-3 task: copy samples out of staging chunks into one shard tar, atomically. Reads the
    members' segments and nothing else; holds one segment (S3: 64) at a time, not the shard."""
    store = Store(root, endpoint)
    sidecar = f"{STAGING}/shards/{name}.json"
    if store.exists(name) and store.exists(sidecar):  # finished by an earlier, interrupted run?
        info = json.loads(store.read_bytes(sidecar))
        if info.get("samples") == len(members) and _matches(store, name, info):
            return {**info, "offsets": np.asarray(info["offsets"], dtype=np.int64)}
        # a shard that does not match its sidecar (truncated, 0 bytes, replaced) is rebuilt, not trusted
    # offsets[i] = byte offset of sample i's first tar header; offsets[-1] = end of the last sample.
    # A USTAR member is one 512-byte header plus its data padded to 512 (names stay < 100 chars),
    # so the offsets follow from the field sizes; readers seek straight to a sample with them.
    offsets = [0]
    with store.open_write_atomic(name) as f:
        hw = _HashingWriter(f)
        writer = ShardWriter(hw)
        for where, seg in _read_segments(store, members):
            key, fields = _parse_segment(seg, store.url(where))
            writer.write(key, fields)
            offsets.append(offsets[-1] + sum(512 + -(-len(b) // 512) * 512 for b in fields.values()))
        writer.close()
    if offsets[-1] + 1024 > hw.n:  # the end-of-archive blocks follow the last sample
        raise PackError(f"{name}: sample offsets ({offsets[-1]}) do not fit the tar's {hw.n} bytes")
    info = {"name": name, "samples": len(members), "bytes": hw.n, "sha256": hw.sha.hexdigest(), "offsets": offsets}
    store.write_bytes_atomic(sidecar, json.dumps(info).encode())
    # int64 for the driver: ~8 bytes per sample until the offsets sidecar is written, not a Python int's ~36
    return {**info, "offsets": np.asarray(offsets, dtype=np.int64)}


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
        if started.get("staging", 1) != STAGING_FORMAT:
            raise PackError(f"{store.root} holds a pack interrupted under an older data_prep (staging format "
                            f"{started.get('staging', 1)}, now {STAGING_FORMAT}); pass --overwrite to start over")  # fmt: skip
        if not _same_listing(started.get("listing"), listing):  # resuming would mix two listings' chunks
            raise PackError(f"SOURCE {source} changed since the interrupted pack in {store.root} started "
                            f"({_describe(started['listing'])} then, {_describe(listing)} now); pass --overwrite to start over")  # fmt: skip
    else:
        if any(not n.startswith(".write-probe") for n in store.list()):
            raise PackError(f"{store.root} is not empty and holds no pack of ours; choose an empty OUT or pass --overwrite")
        store.write_bytes_atomic(marker, json.dumps({**identity, "listing": listing, "staging": STAGING_FORMAT}).encode())
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

    items = corpus.items  # an ItemTable: chunks are materialised one task at a time
    cs = opts.chunk_size
    n_chunks = -(-len(items) // cs)
    chunk = lambda i: items[i * cs : (i + 1) * cs]  # noqa: E731
    done = {int(n[len(STAGING) + 7 : -5]) for n in store.list(STAGING) if n.endswith(".json") and "/chunk-" in n}
    todo = [i for i in range(n_chunks) if i not in done]
    bar = tqdm(total=len(items), initial=len(items) - sum(min(cs, len(items) - i * cs) for i in todo), unit="img",
               desc="encode", disable=not progress, dynamic_ncols=True, file=sys.stderr)  # fmt: skip
    run_tasks(build_chunk, ((out, endpoint, i, chunk(i), corpus.classes, opts.image) for i in todo),
              workers, use_ray, ray_address, lambda r: bar.update(r["items"]))  # fmt: skip
    bar.close()

    def load_chunk(i: int) -> list[dict]:
        records = json.loads(store.read_bytes(f"{STAGING}/chunk-{i:06d}.json"))
        # encoded by an earlier run: same items, same labels (else two listings would mix)
        if i in done and [(r["key"], r["labels"]) for r in records] != [(it.key, list(it.labels)) for it in chunk(i)]:
            raise PackError(f"{store.root}: staging chunk {i} was encoded from another listing or labelling of SOURCE "
                            f"{source}; pass --overwrite to start over")  # fmt: skip
        return records

    plan = make_plan(load_chunk, n_chunks, cs, len(items), len(corpus.classes), opts.samples_per_shard,
                     opts.dedup, opts.heldout_fraction, opts.shuffle_seed)  # fmt: skip
    names = plan.shard_names()
    bar = tqdm(total=len(names), unit="shard", desc="shards", disable=not progress, dynamic_ncols=True, file=sys.stderr)
    # Member lists are made as tasks are submitted (run_tasks draws them lazily), never all at once.
    infos = run_tasks(build_shard, ((out, endpoint, name, members) for name, members in plan.shard_members()),
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
        shards = [i for i, (_, s) in zip(infos, names) if s == split]
        splits[split] = {"samples": count, "class_counts": plan.class_counts[split], "shards": shards}
    manifest = {
        "format": FORMAT, "classes": corpus.classes, "multi_label": corpus.multi_label, "splits": splits,
        "duplicates": len(plan.duplicates), "rejected": len(plan.rejected),
        "rejected_by_reason": dict(sorted(reasons.items())), "source": source,
        "options": opts.fingerprint(), "listing": corpus.listing, "versions": _versions(),
    }  # fmt: skip
    write_offsets(store, manifest, {i["name"]: i.pop("offsets") for i in infos})  # the sidecar, before the manifest
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
