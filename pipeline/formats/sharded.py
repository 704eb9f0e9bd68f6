"""The sharded checkpoint format: what a checkpoint directory holds, when it is complete, and reading it
by byte range. Written by pipeline/train/checkpoint.py; read there (resume) and by fine-tuning
(model.init_from pointing at a checkpoint).

    shard-RRRRR-of-WWWWW.safetensors   fp32 tensors: kind/name (whole) or kind/name@start (flat fragment)
    index-RRRRR.json                   what the shard holds (kind, name, start, numel, shape), its size
                                       and sha256; written last: a rank's shard counts only with it
    trainer.json                       rank 0: counters, config, model, classes
kind is param, momentum or ema. A checkpoint is complete when all `world` indexes are present, every
shard has its recorded size and the pieces of every tensor tile it exactly, with no gap or overlap;
ShardedCheckpoint refuses anything else in one line naming the directory and what is missing. Whole-
file readers (open_local, open_store) also check each shard's sha256; a resuming rank, which reads
only byte ranges, relies on the size check and on Ray registering only checkpoints that every rank
finished uploading (the writer publishes a shard before its index).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch

from .safetensors_io import RangedReader

FORMAT = "nfnet-sharded-1"


def shard_name(rank: int, world: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}.safetensors"


def index_name(rank: int) -> str:
    return f"index-{rank:05d}.json"


class IncompleteCheckpoint(ValueError):
    pass


class ShardedCheckpoint:
    """A complete checkpoint opened for reading by range. `names`: the files in it; `open_file(name)`:
    a seekable binary file (local file, pyarrow S3 input file, or bytes in memory)."""

    def __init__(self, names: list[str], open_file: Callable[[str], BinaryIO], where: str, size: Callable[[str], int]):
        self.where, self._open, self._readers = where, open_file, {}
        indexes = [json.loads(self._open(n).read()) for n in sorted(names) if n.startswith("index-") and n.endswith(".json")]
        if "trainer.json" not in names or not indexes:
            raise IncompleteCheckpoint(f"{where}: not a complete checkpoint (trainer.json: {'trainer.json' in names}, "
                                       f"{len(indexes)} shard indexes)")  # fmt: skip
        self.trainer = json.loads(self._open("trainer.json").read())
        world = indexes[0]["world"]
        ranks = sorted(i["rank"] for i in indexes)
        if ranks != list(range(world)) or any(i["world"] != world for i in indexes):
            missing = sorted(set(range(world)) - set(ranks))
            raise IncompleteCheckpoint(f"{where}: incomplete checkpoint, shards of ranks {missing} of {world} have no index "
                                       "(the writer stopped before finishing)")  # fmt: skip
        self.world, self.step, self.indexes = world, indexes[0]["step"], indexes
        self.pieces: dict[tuple[str, str], list[tuple[int, int, str, str]]] = {}  # (kind, name) -> (start, numel, file, key)
        self.shapes: dict[str, list[int]] = {}
        for i in indexes:
            if i["file"] not in names or size(i["file"]) != i["bytes"]:
                raise IncompleteCheckpoint(f"{where}: {i['file']} is missing or not {i['bytes']} bytes long")
            for key, e in i["entries"].items():
                self.pieces.setdefault((e["kind"], e["name"]), []).append((e["start"], e["numel"], i["file"], key))
                self.shapes[e["name"]] = e["shape"]
        for (kind, name), ps in self.pieces.items():
            ps.sort()
            numel, pos = _numel(self.shapes[name]), 0
            for start, n, file, _ in ps:
                if start != pos:
                    raise IncompleteCheckpoint(f"{where}: {kind}/{name} has a gap or overlap at element {pos} ({file})")
                pos += n
            if pos != numel:
                raise IncompleteCheckpoint(f"{where}: {kind}/{name} covers {pos} of {numel} elements")

    def has(self, kind: str, name: str) -> bool:
        return (kind, name) in self.pieces

    def _reader(self, file: str) -> RangedReader:
        if file not in self._readers:
            self._readers[file] = RangedReader(self._open(file), f"{self.where}/{file}")
        return self._readers[file]

    def read(self, kind: str, name: str, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """Elements [lo, hi) of the flattened tensor, fetched only from the pieces that overlap them."""
        hi = _numel(self.shapes[name]) if hi is None else hi
        out = torch.empty(hi - lo, dtype=torch.float32)
        for start, n, file, key in self.pieces[(kind, name)]:
            a, b = max(lo, start), min(hi, start + n)
            if a < b:
                out[a - lo : b - lo] = self._reader(file).read(key, a - start, b - start)
        return out

    def full(self, kind: str, name: str) -> torch.Tensor:
        return self.read(kind, name).view(self.shapes[name])


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def verify_hashes(ck: ShardedCheckpoint, read: Callable[[str], bytes]) -> None:
    """Every shard against the sha256 its index recorded (a same-size corruption passes the size check)."""
    for i in ck.indexes:
        if hashlib.sha256(read(i["file"])).hexdigest() != i["sha256"]:
            raise IncompleteCheckpoint(f"{ck.where}: {i['file']} does not match the sha256 in its index (corrupt)")


def open_local(directory: str, verify: bool = True) -> ShardedCheckpoint:
    names = os.listdir(directory)
    ck = ShardedCheckpoint(names, lambda n: open(os.path.join(directory, n), "rb"), directory,
                           lambda n: os.path.getsize(os.path.join(directory, n)))  # fmt: skip
    if verify:
        verify_hashes(ck, lambda n: Path(directory, n).read_bytes())
    return ck


def open_store(store) -> ShardedCheckpoint:
    """From a data_prep Store (local or s3://; list, read_bytes, size, root): whole files, each fetched
    once and hash-checked, for model.init_from (read once, in one process, whole anyway)."""
    names = [n for n in store.list() if "/" not in n]
    cache: dict[str, bytes] = {}

    def read(n: str) -> bytes:
        if n not in cache:
            cache[n] = store.read_bytes(n)
        return cache[n]

    ck = ShardedCheckpoint(names, lambda n: io.BytesIO(read(n)), store.root, store.size)
    verify_hashes(ck, read)
    return ck


def open_ray(ckpt) -> ShardedCheckpoint:
    """A ray.train.Checkpoint in its storage (local or S3) through its pyarrow filesystem, without
    downloading it: each rank fetches the byte ranges it restores."""
    import pyarrow.fs

    infos = ckpt.filesystem.get_file_info(pyarrow.fs.FileSelector(ckpt.path))
    sizes = {Path(i.path).name: i.size for i in infos if i.type == pyarrow.fs.FileType.File}
    return ShardedCheckpoint(list(sizes), lambda n: ckpt.filesystem.open_input_file(f"{ckpt.path}/{n}"), str(ckpt.path),
                             sizes.__getitem__)  # fmt: skip


