"""safetensors files written one tensor at a time and read by byte range, through any pyarrow filesystem.

Why by hand: the safetensors package writes only from a dict of tensors that are all in host memory
at once (save_file) and reads ranges only from local files (safe_open). A checkpoint shard or an F7
export (~1.5 GB of weights, same again of EMA) should cost one tensor of host memory, and a rank
restoring its momentum partition from S3 should fetch its own bytes, not every shard. The format is
small: 8 bytes little-endian header length N, N bytes of JSON {key: {dtype, shape, data_offsets}},
padded with spaces to a multiple of 8, then the tensors' bytes. Files written here load with
safetensors.torch.load_file (tests/test_checkpoint.py checks it).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from typing import BinaryIO

import numpy as np
import torch

F32 = 4  # every tensor we write is fp32


def write_streamed(f: BinaryIO, items: Iterable[tuple[str, tuple[int, ...], Callable[[], torch.Tensor]]],
                   metadata: dict[str, str] | None = None) -> int:  # fmt: skip
    """Write (key, shape, produce) items: `produce()` is called once per tensor, just before its bytes
    are written, so host memory holds one tensor at a time. Returns bytes written."""
    items = list(items)
    header, offset = {}, 0
    for key, shape, _ in items:
        n = int(np.prod(shape)) if shape else 1
        header[key] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n * F32]}
        offset += n * F32
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for key, shape, produce in items:
        t = produce().detach().to("cpu", torch.float32).contiguous()
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{key}: produced shape {tuple(t.shape)}, declared {tuple(shape)}")
        f.write(memoryview(t.numpy()).cast("B"))
    return 8 + len(raw) + offset


class RangedReader:
    """Reads elements [lo, hi) of a tensor's flattened fp32 data without reading the rest of the file.
    `f` is any seekable binary file (a local file, or pyarrow's S3 input file: each read is a ranged GET)."""

    def __init__(self, f: BinaryIO, name: str = ""):
        self.f, self.name = f, name
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        self.metadata = header.pop("__metadata__", {})
        self.entries = header
        self.data_start = 8 + n

    def keys(self) -> list[str]:
        return list(self.entries)

    def read(self, key: str, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        e = self.entries[key]
        if e["dtype"] != "F32":
            raise ValueError(f"{self.name}: {key} is {e['dtype']}, expected F32")
        begin, end = e["data_offsets"]
        numel = (end - begin) // F32
        hi = numel if hi is None else hi
        if not 0 <= lo <= hi <= numel:
            raise ValueError(f"{self.name}: range [{lo}, {hi}) outside {key} ({numel} elements)")
        self.f.seek(self.data_start + begin + lo * F32)
        buf = self.f.read((hi - lo) * F32)
        if len(buf) != (hi - lo) * F32:
            raise ValueError(f"{self.name}: truncated at {key} (file shorter than its header says)")
        return torch.frombuffer(bytearray(buf), dtype=torch.float32)
