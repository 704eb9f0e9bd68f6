"""Stage 2 of a pack: decide, from the staging chunks' indexes alone, which samples go to which shard.

Walk every record in source order; drop rejects; keep the first copy of each sha256 (later copies
are duplicates); move a train item to `heldout` when hash(key) < heldout_fraction; shuffle each
split with a fixed seed (unless disabled); cut each split into shards of exactly N samples.

Memory grows by a few dozen bytes per item, not by a record per item. The chunk indexes are
streamed twice and never held together: pass 1 fills fixed-width numpy columns (where a sample's
segment lies in its chunk, its split, 128 bits of its sha256), the dedup is a stable sort over those
bits, and pass 2 adds the class counts and the duplicates' names. Holding the parsed records instead
cost ~1.4 KB per item (18 GB at 10M items); the columns cost 36 bytes per item (16 + 2 + 2 + 16), and the sort's
temporaries about as much again while it runs. 128 of sha256's 256 bits decide identity: two
different images collide with probability ~n^2/2^129, below 1e-24 at 10M items.

The shuffle is Python's `random.Random(seed).shuffle` over an int64 `array`, the same permutation a
list of the same length gets (it depends only on the length and the seed), so packs stay
byte-identical to those made before this module.
"""

from __future__ import annotations

import hashlib
import random
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

SPLIT_ORDER = ("train", "heldout", "val")


def heldout_draw(key: str) -> float:
    """A uniform number in [0, 1) from the sample key alone: same on every machine and worker count."""
    return int.from_bytes(hashlib.sha256(f"heldout:{key}".encode()).digest()[:8], "big") / 2**64


@dataclass
class Plan:
    split_counts: dict[str, int]  # in output order
    class_counts: dict[str, list[int]]
    rejected: list[dict]
    duplicates: list[dict]
    samples_per_shard: int
    chunk_size: int
    order: dict[str, np.ndarray]  # split -> global item indices (chunk * chunk_size + row), output order
    segment: np.ndarray  # (items, 2) int64: where item g's sample lies in its chunk's blob (start, length)

    def shard_names(self) -> list[tuple[str, str]]:
        """(name, split) of every shard, in output order."""
        n = self.samples_per_shard
        return [(f"{split}-{k:06d}.tar", split) for split, idx in self.order.items() for k in range(-(-len(idx) // n))]

    def shard_members(self) -> Iterator[tuple[str, np.ndarray]]:
        """(name, members) per shard, built one shard at a time; members is (samples, 3) int64:
        chunk id, start and length of each sample's segment in that chunk's blob."""
        n = self.samples_per_shard
        for split, idx in self.order.items():
            for k, lo in enumerate(range(0, len(idx), n)):
                g = idx[lo : lo + n]
                yield f"{split}-{k:06d}.tar", np.column_stack([g // self.chunk_size, self.segment[g, 0], self.segment[g, 1]])


def _first_copies(idx_ok: np.ndarray, digest: np.ndarray, split_code: np.ndarray | None) -> np.ndarray:
    """For each ok item (global index idx_ok[i]), the global index of the first item in source order
    with the same 128-bit digest (and split, when given). A stable lexsort keeps source order within
    a run of equal digests, so the run's first element is the first copy."""
    cols = [digest[idx_ok, 1], digest[idx_ok, 0]] + ([split_code[idx_ok]] if split_code is not None else [])
    order = np.lexsort([idx_ok, *cols])  # last key is the primary one; idx_ok breaks ties
    same = np.ones(max(len(order) - 1, 0), bool)  # same[i]: sorted item i+1 equals sorted item i
    for c in cols:
        s = c[order]
        same &= s[1:] == s[:-1]
    new_run = np.concatenate([np.ones(min(len(order), 1), bool), ~same])
    run_start = np.maximum.accumulate(np.where(new_run, np.arange(len(order)), 0))
    first = np.empty_like(idx_ok)
    first[order] = idx_ok[order][run_start]
    return first


def make_plan(load_chunk: Callable[[int], list[dict]], n_chunks: int, chunk_size: int, n_items: int,
              n_classes: int, samples_per_shard: int, dedup: str, heldout_fraction: float,
              shuffle_seed: int | None) -> Plan:  # fmt: skip
    """`load_chunk(c)` returns chunk c's index records (ok: sha256, segment, labels; or rejected with
    a reason); it is called twice per chunk, so no more than one chunk's records are alive at once."""
    segment = np.full((n_items, 2), -1, np.int64)
    split_code = np.full(n_items, -1, np.int16)  # the split as listed (dedup "split" compares these)
    final_code = np.full(n_items, -1, np.int16)  # after the heldout draw
    digest = np.zeros((n_items, 2), np.uint64)
    codes: dict[str, int] = {}
    rejected = []
    for c in range(n_chunks):  # pass 1: columns
        for row, rec in enumerate(load_chunk(c)):
            g = c * chunk_size + row
            if rec["status"] != "ok":
                rejected.append({k: rec[k] for k in ("path", "location", "key", "split", "reason")})
                continue
            code = codes.setdefault(rec["split"], len(codes))
            split_code[g] = final_code[g] = code
            if rec["split"] == "train" and heldout_fraction > 0 and heldout_draw(rec["key"]) < heldout_fraction:
                final_code[g] = codes.setdefault("heldout", len(codes))
            digest[g] = np.frombuffer(bytes.fromhex(rec["sha256"][:32]), ">u8")
            segment[g] = rec["segment"]
    idx_ok = np.flatnonzero(split_code >= 0)
    if dedup == "off":
        first = idx_ok
    else:
        first = _first_copies(idx_ok, digest, split_code if dedup == "split" else None)
    del digest
    is_dup = first != idx_ok
    dup_of = dict(zip(idx_ok[is_dup].tolist(), first[is_dup].tolist()))  # duplicates only: usually few
    final_code[idx_ok[is_dup]] = -1  # out of every split
    names = {code: name for name, code in codes.items()}
    splits = [s for s in SPLIT_ORDER if s in codes] + sorted(s for s in codes if s not in SPLIT_ORDER)
    order = {}
    for split in splits:
        idx = np.flatnonzero(final_code == codes[split])  # source order
        if not len(idx):
            continue
        if shuffle_seed is not None:
            arr = array("q")
            arr.frombytes(idx.astype(np.int64).tobytes())
            random.Random(f"{shuffle_seed}:{split}").shuffle(arr)
            idx = np.frombuffer(arr, dtype=np.int64).copy()
        order[split] = idx
    # pass 2: class counts of what is kept, and the duplicates' names next to their first copy's
    class_counts = {s: [0] * n_classes for s in order}
    wanted, named, duplicates = set(dup_of.values()), {}, []
    for c in range(n_chunks):
        for row, rec in enumerate(load_chunk(c)):
            g = c * chunk_size + row
            code = int(final_code[g])
            if code >= 0:
                totals = class_counts[names[code]]
                for lab in rec["labels"]:
                    totals[lab] += 1
            if g in wanted:
                named[g] = {"key": rec["key"], "path": rec["path"]}
            elif g in dup_of:
                kept = named[dup_of[g]]  # the first copy comes earlier in source order
                duplicates.append({"key": rec["key"], "path": rec["path"], "sha256": rec["sha256"],
                                   "duplicate_of_key": kept["key"], "duplicate_of_path": kept["path"]})  # fmt: skip
    return Plan({s: len(i) for s, i in order.items()}, class_counts, rejected, duplicates,
                samples_per_shard, chunk_size, order, segment)  # fmt: skip
