"""Manifest-driven streaming input: exact per-rank balance, sample-exact resume, S3.

Layout. A global batch of G samples is V = world_size x accum_steps "slots" of B samples (the
micro-batch). Rank r owns slots r*A .. r*A+A-1 and feeds slot r*A+a at micro-step a. With G and
B fixed, V is fixed, so a 1-worker run with accumulation and a 2-worker run read the same samples
for every optimizer step (the data-parallel correctness test relies on it).

Epoch e (training). The split's shards are put in a seeded order (seed, e); their samples form a
sequence of N positions. steps_per_epoch = N // G; slot v owns the contiguous span
[v*P, (v+1)*P) with P = steps_per_epoch * B, so every rank reads ~N/world samples and yields
exactly steps_per_epoch * A micro-batches. The N - steps_per_epoch*G leftover positions (a
different random subset every epoch) are not used in that epoch. Within a span, windows of
`shuffle_window` positions are permuted with a seeded generator (seed, e, v, window); pack-time
shuffling already mixes classes across shards.

Resume. The position is the number of optimizer steps done; (epoch, step in epoch) follow from it,
and every batch is a pure function of (seed, epoch, slot, index), so a resumed run reads exactly
the samples an uninterrupted run would. Changing world size on resume is exact as long as the
global batch and micro-batch stay the same (V unchanged: only which rank reads a slot changes).
Changing the micro-batch or global batch mid-epoch changes the slot spans; the interrupted epoch's
remainder is then re-cut and samples of it may repeat or be skipped; from the next epoch on
everything is exact again.

Workers. DataLoader worker w of a rank produces the rank's micro-batches j with j % workers == w;
torch's in-order round-robin then yields them in the logical order, whatever the worker count.
A worker reads only the samples of its own batches of a window (1/W of it), located with the
manifest's per-sample offsets: from local disk by seeking, from S3 by ranged GETs (runs of adjacent
samples coalesced into one GET, up to S3_CONCURRENCY in flight per worker), so an epoch fetches each
byte once whatever W is. Streaming the window's shards instead fetched W x the bytes. Shard sizes
come from one listing (LIST, 1,000 keys a request), not a HEAD per shard. Packs without offsets
(before 0.2) still stream. Each of a rank's A slots has its own reader, so alternating
micro-batches from different slots do not re-open shards.

Evaluation sees each sample of the split exactly once across ranks: rank r takes a contiguous
span of ceil(N/world) positions, padded to the same number of batches with mask 0.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_prep.manifest import ManifestError, ShardInfo, load_manifest, shards_of
from data_prep.storage import Store

from . import s3io  # registers the s3:// opener before workers fork
from .augment import AugmentConfig, EvalTransform, TrainAugment, decode, multi_hot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    micro_batch: int
    world_size: int = 1
    accum_steps: int = 1

    @property
    def slots(self) -> int:
        return self.world_size * self.accum_steps

    @property
    def global_batch(self) -> int:
        return self.slots * self.micro_batch


def check_shards(root: str, shards: list[ShardInfo], endpoint: str | None = None) -> None:
    """Fail at start-up, naming the shard, when a shard is missing or differs in size from the manifest.
    One listing gives every size (S3: a LIST per 1,000 keys, where a HEAD per shard was ~82k requests
    per evaluation at 64 ranks on ImageNet)."""
    store = Store(root, endpoint)
    sizes = store.sizes()
    for s in shards:
        if s.name not in sizes:
            raise ManifestError(f"shard {store.url(s.name)} is listed in the manifest but missing")
        size = sizes[s.name]
        if size != s.bytes:
            raise ManifestError(f"shard {store.url(s.name)} has {size} bytes, the manifest says {s.bytes}: rerun `python -m data_prep verify {root}`")


def _sample_from_bytes(buf: bytes) -> dict:
    """One sample's tar members (as data_prep writes them: `key.field`, one USTAR header each)
    -> webdataset's sample dict.

    Reads only the three header fields we need (name, size, checksum) instead of
    tarfile.TarInfo.frombuf's full parse, which cost ~0.1 ms per member, a third of a 256 px
    JPEG decode for three members. The checksum is verified as tarfile does."""
    if not buf:
        raise EOFError("sample lies beyond the end of the shard")
    sample, pos = {}, 0
    while pos < len(buf):
        hdr = buf[pos : pos + 512]
        if len(hdr) < 512:
            raise EOFError(f"tar header cut short at byte {pos}")
        try:
            chk, size = int(hdr[148:156].strip(b" \0") or b"-1", 8), int(hdr[124:136].strip(b" \0") or b"0", 8)
        except ValueError as e:
            raise tarfile.HeaderError(f"malformed tar header at byte {pos}") from e
        if chk != sum(hdr[:148]) + 256 + sum(hdr[156:]):  # checksum field counted as 8 spaces
            raise tarfile.HeaderError(f"bad tar header checksum at byte {pos}")
        name = hdr[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        key, _, fld = name.partition(".")
        data = buf[pos + 512 : pos + 512 + size]
        if len(data) != size:
            raise EOFError(f"member {name} cut short ({len(data)} of {size} bytes)")
        sample.setdefault("__key__", key)
        sample[fld] = data
        pos += 512 + -(-size // 512) * 512
    return sample


S3_CONCURRENCY = 8  # ranged GETs in flight per DataLoader worker: hides S3's ~20-50 ms first-byte latency


class _ShardReader:
    """Reads the samples at given offsets of a shard.

    With per-sample offsets in the manifest (every pack since 0.2): local shards are read by seeking
    to each wanted sample; S3 shards by ranged GETs of the wanted samples only (adjacent ones in one
    GET), so a DataLoader worker fetches just its own samples. Older packs stream through
    webdataset's tar stages, keeping the last shard's stream open: consecutive windows of a slot
    usually lie in the same shard at increasing offsets, so reading continues where it stopped.
    """

    def __init__(self, root: str, endpoint: str | None, retry_s: float = s3io.DEFAULT_RETRY_S, substitute_outage: bool = False):
        self.store = Store(root, endpoint)
        self.endpoint, self.retry_s, self.substitute_outage = endpoint, retry_s, substitute_outage
        self._name, self._it, self._next = None, None, 0
        self._file_name, self._file = None, None

    def _read_indexed(self, shard: ShardInfo, offsets: set[int]) -> dict[int, dict]:
        if self._file_name != shard.name:
            if self._file is not None:
                self._file.close()
            self._file_name, self._file = shard.name, open(self.store.url(shard.name), "rb")
        out = {}
        for i in sorted(offsets):
            start, end = shard.offsets[i], shard.offsets[i + 1]
            self._file.seek(start)
            try:
                out[i] = _sample_from_bytes(self._file.read(end - start))
            except (tarfile.HeaderError, EOFError, UnicodeDecodeError) as e:
                log.warning("shard %s sample %d unreadable (%s: %s); skipped and counted", shard.name, i, type(e).__name__, e)
        return out

    def _pool(self) -> ThreadPoolExecutor:
        if getattr(self, "_threads", None) is None or self._threads[0] != os.getpid():  # not inherited across a fork
            self._threads = (os.getpid(), ThreadPoolExecutor(S3_CONCURRENCY, thread_name_prefix="s3-range"))
        return self._threads[1]

    def read_ranged(self, wanted: list[tuple[ShardInfo, set[int]]]) -> list[dict[int, dict]]:
        """S3 with offsets: every wanted sample of every shard by ranged GETs, all submitted before
        any is awaited. A range that fails for good (missing object, cut short) loses its samples,
        logged and counted; an outage raises S3Unavailable unless substitution is asked for."""
        jobs = []  # (shard index in `wanted`, sample indices, future)
        for n, (shard, offsets) in enumerate(wanted):
            idx = sorted(offsets)
            spans = [(int(shard.offsets[i]), int(shard.offsets[i + 1])) for i in idx]
            url = self.store.url(shard.name)
            pos = 0
            for a, b in s3io.coalesce(spans):
                members = []
                while pos < len(idx) and spans[pos][1] <= b:
                    members.append(idx[pos])
                    pos += 1
                fut = self._pool().submit(s3io.read_range, url, a, b, self.endpoint, self.retry_s)
                jobs.append((n, members, a, fut))
        out: list[dict[int, dict]] = [{} for _ in wanted]
        for n, members, a, fut in jobs:
            shard = wanted[n][0]
            try:
                blob = fut.result()
            except Exception as e:  # noqa: BLE001
                if isinstance(e, s3io.S3Unavailable) and not self.substitute_outage:
                    for *_, f in jobs:
                        f.cancel()
                    raise  # an outage is not bad data: fail the step; Ray Train restores the last checkpoint
                log.warning("shard %s samples %s unreadable (%s: %s); skipped and counted", shard.name, members, type(e).__name__, e)
                continue
            for i in members:
                lo, hi = int(shard.offsets[i]) - a, int(shard.offsets[i + 1]) - a
                try:
                    out[n][i] = _sample_from_bytes(blob[lo:hi])
                except (tarfile.HeaderError, EOFError, UnicodeDecodeError) as e:
                    log.warning("shard %s sample %d unreadable (%s: %s); skipped and counted", shard.name, i, type(e).__name__, e)
        return out

    def read_all(self, wanted: list[tuple[ShardInfo, set[int]]]) -> list[dict[int, dict]]:
        if self.store.s3 and all(shard.offsets is not None for shard, _ in wanted):
            return self.read_ranged(wanted)
        return [self.read(shard, offsets) for shard, offsets in wanted]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_threads": None}

    def _open(self, shard: ShardInfo) -> None:
        from webdataset import tariterators

        stream = tariterators.url_opener([{"url": self.store.url(shard.name)}], endpoint=self.endpoint, retry_s=self.retry_s)
        self._name, self._it, self._next = shard.name, tariterators.group_by_keys(tariterators.tar_file_expander(stream)), 0

    def read(self, shard: ShardInfo, offsets: set[int]) -> dict[int, dict]:
        if shard.offsets is not None and not self.store.s3:
            return self._read_indexed(shard, offsets)
        out: dict[int, dict] = {}
        last = max(offsets)
        try:
            if self._name != shard.name or self._next > min(offsets):
                self._open(shard)
            while self._next <= last:
                sample = next(self._it)
                if self._next in offsets:
                    out[self._next] = sample
                self._next += 1
        except Exception as e:  # noqa: BLE001 - a truncated/corrupt shard: keep what was read, count the rest
            self._name = None
            if isinstance(e, s3io.S3Unavailable) and not self.substitute_outage:
                raise  # an outage is not bad data: fail the step; Ray Train restores the last checkpoint
            if not isinstance(e, StopIteration) or len(out) < len(offsets):
                log.warning("shard %s unreadable after %d samples (%s: %s); missing samples are skipped and counted",
                            shard.name, self._next, type(e).__name__, e)  # fmt: skip
        return out


class _Stream(IterableDataset):
    """Shared machinery: positions -> samples -> decoded batch, split across DataLoader workers."""

    # optim.objective=sigmoid: a sample's label is the list of all its labels (data_prep's json
    # "labels"), batches carry multi-hot (B, C) targets; else the one label of `cls`.
    multi_hot = False

    def __init__(self, root: str, split: str, endpoint: str | None, decode_threads: int = 0):
        super().__init__()
        self.root, self.split, self.endpoint, self.decode_threads = root, split, endpoint, decode_threads
        # data.s3_retry_s / data.substitute_on_s3_outage; set by train_loader / eval_loader
        self.s3_retry_s, self.substitute_outage = s3io.DEFAULT_RETRY_S, False
        self._pool: tuple[int, ThreadPoolExecutor] | None = None
        manifest = load_manifest(root, endpoint)
        self.classes = manifest["classes"]
        self.shards = shards_of(manifest, split)
        if not self.shards:
            raise ManifestError(f"split {split!r} of {root} has no shards")
        self.counts = np.array([s.samples for s in self.shards], dtype=np.int64)
        self.total = int(self.counts.sum())

    def _locate(self, order: np.ndarray, positions: np.ndarray) -> list[tuple[int, int]]:
        """Sequence positions under shard `order` -> (shard index, offset within shard)."""
        ends = np.cumsum(self.counts[order])
        idx = np.searchsorted(ends, positions, side="right")
        starts = ends[idx] - self.counts[order][idx]
        return [(int(order[i]), int(p - s)) for i, p, s in zip(idx, positions, starts)]

    def _fetch(self, reader: _ShardReader, locs: list[tuple[int, int]]) -> dict[tuple[int, int], dict]:
        by_shard: dict[int, set[int]] = {}
        for sh, off in locs:
            by_shard.setdefault(sh, set()).add(off)
        found = {}
        # In sequence order, so the reader's open stream continues into the next window.
        order = list(dict.fromkeys(sh for sh, _ in locs))
        for sh, samples in zip(order, reader.read_all([(self.shards[sh], by_shard[sh]) for sh in order])):
            for off, sample in samples.items():
                found[(sh, off)] = sample
        return found

    def _label(self, sample: dict) -> int | list[int]:
        """`cls` (the first label), or with multi_hot every label: json "labels" (a pack made before
        label lists has none: its one label)."""
        if not self.multi_hot:
            return int(sample["cls"])
        labels = json.loads(sample["json"]).get("labels") if "json" in sample else None
        return [int(v) for v in labels] if labels else [int(sample["cls"])]

    def _decode(self, sample: dict | None, where: str, res: int | None) -> tuple[torch.Tensor | None, int | list[int]]:
        if sample is None:
            log.warning("sample %s missing (truncated shard); skipped", where)
            return None, -1
        try:
            return decode(sample["jpg"], res), self._label(sample)
        except Exception as e:  # noqa: BLE001
            log.warning("sample %s (key %s) undecodable (%s: %s); skipped", where, sample.get("__key__"), type(e).__name__, e)
            return None, -1

    def _decode_many(self, items: list[tuple[dict | None, str]], res: int | None) -> list[tuple[torch.Tensor | None, int | list[int]]]:  # fmt: skip
        """_decode over a batch, on `decode_threads` threads when set (libjpeg-turbo releases the
        GIL). Decoding draws no random numbers, so the batch is the same either way; the random
        per-image transforms stay on the calling thread, in sample order."""
        if self.decode_threads <= 1 or len(items) < 2:
            return [self._decode(sample, where, res) for sample, where in items]
        if self._pool is None or self._pool[0] != os.getpid():  # not inherited across a fork
            self._pool = (os.getpid(), ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode"))
        return list(self._pool[1].map(lambda it: self._decode(it[0], it[1], res), items))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pool": None}  # DataLoader workers under spawn get their own

    @staticmethod
    def _worker() -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)


class TrainStream(_Stream):
    """Infinite stream of a rank's training micro-batches from optimizer step `start_step` on."""

    def __init__(self, root: str, layout: Layout, rank: int, aug: AugmentConfig, *, split: str = "train",
                 seed: int = 0, start_step: int = 0, shuffle_window: int = 4096, endpoint: str | None = None,
                 decode_threads: int = 0, multi_hot: bool = False):  # fmt: skip
        super().__init__(root, split, endpoint, decode_threads)
        self.multi_hot = multi_hot
        self.layout, self.rank, self.aug, self.seed, self.start_step = layout, rank, aug, seed, start_step
        self.steps_per_epoch = self.total // layout.global_batch
        if self.steps_per_epoch == 0:
            raise ManifestError(f"split {split!r} has {self.total} samples, fewer than one global batch ({layout.global_batch})")
        b = layout.micro_batch
        self.window = max(b, math.ceil(shuffle_window / b) * b)  # whole batches per window
        self.per_slot = self.steps_per_epoch * b

    def shard_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))

    def window_positions(self, epoch: int, slot: int, w: int) -> np.ndarray:
        """Sequence positions of window w of a slot's span, in their shuffled order."""
        start = slot * self.per_slot + w * self.window
        stop = min(start + self.window, (slot + 1) * self.per_slot)
        return np.random.default_rng([self.seed, epoch, slot, w]).permutation(np.arange(start, stop))

    def batch_positions(self, epoch: int, slot: int, k: int) -> np.ndarray:
        per_window = self.window // self.layout.micro_batch
        w, i = divmod(k, per_window)
        b = self.layout.micro_batch
        return self.window_positions(epoch, slot, w)[i * b : (i + 1) * b]

    def schedule(self, step: int) -> Iterator[tuple[int, int, int, int]]:
        """(logical batch index j, epoch, slot, batch-in-slot k) of this rank from `step` on."""
        a_steps = self.layout.accum_steps
        j = 0
        while True:
            epoch, k = divmod(step, self.steps_per_epoch)
            for a in range(a_steps):
                yield j, epoch, self.rank * a_steps + a, k
                j += 1
            step += 1

    def _mine(self, epoch: int, slot: int, w: int, wid: int, nw: int) -> list[int]:
        """Batches k of window w of `slot` that DataLoader worker `wid` of `nw` produces."""
        per_window = self.window // self.layout.micro_batch
        a_steps, a = self.layout.accum_steps, slot - self.rank * self.layout.accum_steps
        ks = range(w * per_window, min((w + 1) * per_window, self.steps_per_epoch))
        steps = ((epoch * self.steps_per_epoch + k, k) for k in ks)
        return [k for step, k in steps if step >= self.start_step and ((step - self.start_step) * a_steps + a) % nw == wid]

    def __iter__(self):
        wid, nw = self._worker()
        augment = TrainAugment(self.aug, len(self.classes))
        # Per slot: its own reader (a slot's windows advance through its own span of shards, so
        # the open tar stream continues into the next window) and the samples of the current
        # window that this worker's batches need (1/nw of the window, not all of it).
        readers: dict[int, _ShardReader] = {}
        cached: dict[int, tuple[tuple[int, int], np.ndarray, dict]] = {}  # slot -> ((epoch, w), window order, samples)
        per_window = self.window // self.layout.micro_batch
        for j, epoch, slot, k in self.schedule(self.start_step):
            if j % nw != wid:
                continue
            order = self.shard_order(epoch)
            w = k // per_window
            b = self.layout.micro_batch
            if slot not in cached or cached[slot][0] != (epoch, w):
                perm = self.window_positions(epoch, slot, w)  # batch k of the window = perm[i*b:(i+1)*b]
                mine = [perm[(kk - w * per_window) * b : (kk - w * per_window + 1) * b] for kk in self._mine(epoch, slot, w, wid, nw)]
                reader = readers.setdefault(slot, _ShardReader(self.root, self.endpoint, self.s3_retry_s, self.substitute_outage))
                cached[slot] = ((epoch, w), perm, self._fetch(reader, self._locate(order, np.sort(np.concatenate(mine)))))
            i = k - w * per_window
            locs = self._locate(order, cached[slot][1][i * b : (i + 1) * b])
            yield self._make_batch(locs, cached[slot][2], augment, (self.seed, epoch, slot, k), epoch, k)

    def _make_batch(self, locs, cache, augment, rng_key, epoch, k) -> dict:
        images, labels, keys, bad = [], [], [], 0
        items = [(cache.get((sh, off)), f"{self.shards[sh].name}#{off}") for sh, off in locs]
        for (sh, off), (sample, _), (img, lab) in zip(locs, items, self._decode_many(items, None)):
            if img is None:
                bad += 1
            images.append(img)
            labels.append(lab)
            keys.append(sample["__key__"] if sample else f"{self.shards[sh].name}#{off}")
        good = [i for i, im in enumerate(images) if im is not None]
        for i, im in enumerate(images):  # keep the batch shape: reuse a good sample of the same batch
            if im is None:
                src = good[i % len(good)] if good else None
                images[i] = images[src] if src is not None else torch.zeros(3, self.aug.train_res, self.aug.train_res, dtype=torch.uint8)
                labels[i] = labels[src] if src is not None else ([] if self.multi_hot else 0)
        # multi_hot: (B, C) 0/1 targets, which TrainAugment mixes and smooths like its one-hot ones
        targets = multi_hot(labels, len(self.classes)) if self.multi_hot else torch.tensor(labels)
        # Augmentation randomness is a function of (seed, epoch, slot, k): resume-exact, and it
        # leaves the trainer's own RNG (stochastic depth, dropout) untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(np.random.default_rng(list(rng_key)).integers(2**62)))
            x, y = augment(images, targets)
        return {"image": x, "target": y, "keys": keys, "bad": bad, "epoch": epoch, "step_in_epoch": k}


class EvalStream(_Stream):
    """A rank's share of a split for exact evaluation: every sample once across ranks, padded batches."""

    def __init__(self, root: str, split: str, batch: int, rank: int, world: int, aug: AugmentConfig, endpoint: str | None = None,
                 decode_threads: int = 0, multi_hot: bool = False):  # fmt: skip
        super().__init__(root, split, endpoint, decode_threads)
        self.multi_hot = multi_hot
        self.batch, self.rank, self.world, self.aug = batch, rank, world, aug
        per_rank = math.ceil(self.total / world)
        self.start, self.stop = min(rank * per_rank, self.total), min((rank + 1) * per_rank, self.total)
        self.num_batches = max(1, math.ceil(per_rank / batch))  # identical on every rank

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        wid, nw = self._worker()
        reader = _ShardReader(self.root, self.endpoint, self.s3_retry_s, self.substitute_outage)
        transform = EvalTransform(self.aug)
        order = np.arange(len(self.shards))
        res = self.aug.eval_res
        # JPEG DCT scaling never below the resize target (eval_res + eval_pad), which is then cropped to
        # eval_res: decoding at eval_res upscaled a 560 px image from 280 to 288.
        decode_at = self.aug.eval_res + self.aug.eval_pad
        for j in range(self.num_batches):
            if j % nw != wid:
                continue
            positions = np.arange(self.start + j * self.batch, min(self.start + (j + 1) * self.batch, self.stop))
            locs = self._locate(order, positions) if len(positions) else []
            cache = self._fetch(reader, locs) if locs else {}
            images = torch.zeros(self.batch, 3, res, res, dtype=torch.uint8)
            # multi_hot: (B, C) 0/1 "target" (all labels) instead of the (B,) "label" (the first)
            shape, dtype = ((self.batch, len(self.classes)), torch.float32) if self.multi_hot else ((self.batch,), torch.long)
            labels = torch.zeros(shape, dtype=dtype)
            mask = torch.zeros(self.batch)
            keys, bad = [], 0
            items = [(cache.get((sh, off)), f"{self.shards[sh].name}#{off}") for sh, off in locs]
            for i, ((sample, _), (img, lab)) in enumerate(zip(items, self._decode_many(items, decode_at))):
                if img is None:
                    bad += 1
                    continue
                images[i], mask[i] = transform(img), 1.0
                if self.multi_hot:
                    labels[i, lab] = 1.0
                else:
                    labels[i] = lab
                keys.append(sample["__key__"])
            name = "target" if self.multi_hot else "label"
            yield {"image": images, name: labels, "mask": mask, "keys": keys, "bad": bad}


def _loader(ds: IterableDataset, workers: int, prefetch: int) -> DataLoader:
    return DataLoader(ds, batch_size=None, num_workers=workers, prefetch_factor=prefetch if workers else None,
                      pin_memory=torch.cuda.is_available(), persistent_workers=False)  # fmt: skip


def train_loader(root: str, layout: Layout, rank: int, aug: AugmentConfig, *, workers: int = 2, prefetch: int = 2,
                 check: bool = True, s3_retry_s: float = s3io.DEFAULT_RETRY_S, substitute_on_s3_outage: bool = False,
                 **kw) -> tuple[DataLoader, TrainStream]:  # fmt: skip
    ds = TrainStream(root, layout, rank, aug, **kw)
    ds.s3_retry_s, ds.substitute_outage = s3_retry_s, substitute_on_s3_outage
    if check:
        check_shards(root, ds.shards, ds.endpoint)
    return _loader(ds, workers, prefetch), ds


def eval_loader(root: str, split: str, batch: int, rank: int, world: int, aug: AugmentConfig, *, workers: int = 2,
                prefetch: int = 2, endpoint: str | None = None, check: bool = True, decode_threads: int = 0,
                s3_retry_s: float = s3io.DEFAULT_RETRY_S, substitute_on_s3_outage: bool = False,
                multi_hot: bool = False) -> tuple[DataLoader, EvalStream]:  # fmt: skip
    ds = EvalStream(root, split, batch, rank, world, aug, endpoint, decode_threads, multi_hot)
    ds.s3_retry_s, ds.substitute_outage = s3_retry_s, substitute_on_s3_outage
    if check:
        check_shards(root, ds.shards, endpoint)
    return _loader(ds, workers, prefetch), ds
