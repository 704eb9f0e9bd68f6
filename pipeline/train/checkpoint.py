"""Sharded checkpoints (each rank writes what it owns, in the background) and streamed exports.

What a rank owns (never a full copy of the state):
- weights and EMA: whole tensors, split across ranks by a size-balanced assignment (`owners`);
- SGD momentum: at ZeRO-1/2 its own partition, i.e. the fragments of DeepSpeed's flat fp32 optimizer
  partition (param._hp_mapping), which may split a tensor between ranks; at ZeRO-0 whole tensors by
  the same assignment as the weights.
At ZeRO-1/2 with our fp32 model the weights on every rank equal DeepSpeed's fp32 masters (DeepSpeed
all-gathers the updated partitions into them after every step), so writing weights by tensor is
writing the masters. Host memory per rank at a checkpoint: its share, ~state / world (+ one tensor).

The directory layout and its completeness rule are in pipeline/formats/sharded.py. Ray Train
registers a checkpoint only after every rank reported it, so a crash while writing leaves one Ray
never offers; the completeness check guards a directory opened by hand (e.g. model.init_from).

Restore reads, per rank, the weights and EMA whole (ZeRO-0/1/2 keep them whole on every rank) and
only its own momentum range, by byte range: any world size and ZeRO stage restores any checkpoint.
Nothing is unpickled (DeepSpeed's own save/load_checkpoint unpickles with torch.load(weights_only=False)).

An export folder (what fine-tuning consumes), streamed tensor by tensor by rank 0:
    model.safetensors, ema.safetensors, config.json, classes.json, summary.json
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data_prep.storage import Store
from pipeline.formats.safetensors_io import F32, write_streamed
from pipeline.formats.sharded import FORMAT, ShardedCheckpoint, index_name, shard_name


def owners(named_shapes: list[tuple[str, int]], world: int) -> dict[str, int]:
    """name -> rank: largest tensors first, each to the least-loaded rank (ties: lowest rank). Balanced
    within one tensor of state / world; the same on every rank (depends only on the architecture)."""
    heap = [(0, r) for r in range(world)]
    out = {}
    for name, numel in sorted(named_shapes, key=lambda x: (-x[1], x[0])):
        load, r = heapq.heappop(heap)
        out[name] = r
        heapq.heappush(heap, (load + numel, r))
    return out


def relink_optimizer_state(zero_opt, create_momentum: bool = False) -> None:
    """Make DeepSpeed's per-parameter views of the optimizer state see SGD's momentum buffers.

    ZeRO-1/2 link those views once, after the optimizer's first step; for SGD that first step is
    DeepSpeed's own state-initialising step at engine creation, when no momentum buffer exists yet,
    so the views stay empty. We re-link (a private DeepSpeed 0.19 method; no public one exists),
    creating zero buffers first when restoring into a fresh optimizer.
    """
    if not hasattr(zero_opt, "_lazy_init_hp_params_optimizer_state"):
        return  # ZeRO-0: the client optimizer holds full tensors
    if create_momentum:
        for group in zero_opt.optimizer.param_groups:
            for flat in group["params"]:
                zero_opt.optimizer.state[flat].setdefault("momentum_buffer", torch.zeros_like(flat))
    zero_opt._hp_optimizer_states_linked = False
    zero_opt._lazy_init_hp_params_optimizer_state()


@dataclass
class Snapshot:
    """Host copies of what one rank owns, taken between steps (the only part of a checkpoint that stalls
    training); written later by write_shard."""

    rank: int
    world: int
    step: int
    tensors: list[tuple[str, torch.Tensor]] = field(default_factory=list)  # (key in the file, host copy)
    entries: dict[str, dict] = field(default_factory=dict)  # key -> kind, name, start, numel, shape

    def add(self, kind: str, name: str, value: torch.Tensor, shape: torch.Size, start: int | None = None) -> None:
        key = f"{kind}/{name}" if start is None else f"{kind}/{name}@{start}"
        # copy=True: on a CPU run .to("cpu") would alias the live tensor that the next step overwrites
        host = value.detach().to("cpu", torch.float32, copy=True)
        self.tensors.append((key, host))
        self.entries[key] = {"kind": kind, "name": name, "start": start or 0, "numel": host.numel(), "shape": list(shape)}

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * F32 for _, t in self.tensors)


def snapshot(module: torch.nn.Module, client_opt: torch.optim.Optimizer, ema: torch.nn.Module | None, zero_opt,
             rank: int, world: int, step: int) -> Snapshot:  # fmt: skip
    """No communication. At ZeRO-1/2 the momentum comes from this rank's optimizer partition."""
    named = list(module.named_parameters())
    own = owners([(n, p.numel()) for n, p in named], world)
    partitioned = any(hasattr(p, "_hp_mapping") for _, p in named)
    if partitioned:
        relink_optimizer_state(zero_opt)
    ema_params = dict(ema.module.named_parameters()) if ema is not None else {}
    snap = Snapshot(rank, world, step)
    for name, p in named:
        mine = own[name] == rank
        if mine:
            snap.add("param", name, p, p.shape)
            if name in ema_params:
                snap.add("ema", name, ema_params[name], p.shape)
        if partitioned:
            m = p._hp_mapping
            if m is not None and m.optim_fragment and "momentum_buffer" in m.optim_fragment:  # none before step 1
                snap.add("momentum", name, m.get_hp_fragment("momentum_buffer").view(-1), p.shape, m.lp_fragment_address.start)
        elif mine and (mom := client_opt.state.get(p, {}).get("momentum_buffer")) is not None:
            snap.add("momentum", name, mom, p.shape)
    return snap


def _pause_for_tests(directory: str, snap: Snapshot) -> None:
    """tests/test_checkpoint.py kills a worker while its shard is written; NFNET_TEST_CKPT_PAUSE names a
    folder where a writer announces itself (once per rank and step) and waits. Unset in real runs."""
    folder = os.environ.get("NFNET_TEST_CKPT_PAUSE")
    if not folder or int(os.environ.get("NFNET_TEST_CKPT_PAUSE_STEP", "-1")) != snap.step:
        return
    marker = Path(folder, f"writing-{snap.rank}-{snap.step}")
    if marker.exists():  # the resumed attempt writes this checkpoint again: no pause
        return
    marker.write_text(f"{os.getpid()} {directory}")
    time.sleep(float(os.environ.get("NFNET_TEST_CKPT_PAUSE_S", "60")))


def write_shard(directory: str, snap: Snapshot, trainer_doc: dict | None = None,
                publish: Callable[[str], None] | None = None) -> dict:  # fmt: skip
    """Write this rank's shard and (rank 0) trainer.json, then the index that makes the shard count.
    Runs in Ray Train's checkpoint-upload thread while training continues.

    `publish(folder)` copies a folder's files into the checkpoint in storage (Ray's copy of a folder has
    no order): the shard is published first and the index in a second copy, so storage never holds an
    index whose shard is still on its way. Without `publish` everything is written to `directory`."""
    os.makedirs(directory, exist_ok=True)
    name = shard_name(snap.rank, snap.world)
    path = os.path.join(directory, name)
    with open(path + ".part", "wb") as f:
        size = write_streamed(f, [(k, tuple(t.shape), (lambda t=t: t)) for k, t in snap.tensors])
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".part", path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    if trainer_doc is not None:
        Path(directory, "trainer.json").write_text(json.dumps(trainer_doc, indent=1))
    if publish is not None:
        publish(directory)
    _pause_for_tests(directory, snap)
    index = {"format": FORMAT, "rank": snap.rank, "world": snap.world, "step": snap.step, "file": name, "bytes": size,
             "sha256": h.hexdigest(), "entries": snap.entries}  # fmt: skip
    if publish is None:
        Path(directory, index_name(snap.rank)).write_text(json.dumps(index))
        return index
    with tempfile.TemporaryDirectory(prefix="nfnet-index-") as tmp:
        Path(tmp, index_name(snap.rank)).write_text(json.dumps(index))
        publish(tmp)
    return index


@torch.no_grad()
def restore(ck: ShardedCheckpoint, module: torch.nn.Module, client_opt: torch.optim.Optimizer, ema: torch.nn.Module | None,
            zero_opt=None) -> None:  # fmt: skip
    named = list(module.named_parameters())
    missing = [n for n, _ in named if not ck.has("param", n)]
    if missing:
        raise ValueError(f"{ck.where}: checkpoint lacks parameters {missing[:5]} (architecture differs?)")
    partitioned = any(hasattr(p, "_hp_mapping") for _, p in named)
    has_momentum = any(ck.has("momentum", n) for n, _ in named)
    if partitioned and has_momentum:
        relink_optimizer_state(zero_opt, create_momentum=True)
    ema_params = dict(ema.module.named_parameters()) if ema is not None else {}
    for name, p in named:
        value = ck.full("param", name)
        p.copy_(value.to(p.device, p.dtype))
        if name in ema_params and ck.has("ema", name):
            ema_params[name].copy_(ck.full("ema", name).to(ema_params[name].device))
        if partitioned:
            m = p._hp_mapping
            if m is None:  # no element of this parameter in this rank's optimizer partition
                continue
            lo, hi = m.lp_fragment_address.start, m.lp_fragment_address.start + m.lp_fragment_address.numel
            m.get_hp_fragment().copy_(value.view(-1)[lo:hi].to(p.device))  # the fp32 master partition
            if ck.has("momentum", name):
                m.get_hp_fragment("momentum_buffer").copy_(ck.read("momentum", name, lo, hi).to(p.device))
        elif ck.has("momentum", name):
            client_opt.state[p]["momentum_buffer"] = ck.full("momentum", name).to(p.device)


def write_export(dest: str, module: torch.nn.Module, ema: torch.nn.Module | None, model_info: dict, classes: list[str],
                 summary: dict, endpoint: str | None = None) -> None:  # fmt: skip
    """The hand-off folder for fine-tuning, at a local path or s3:// prefix; weights streamed one tensor
    at a time from the live modules (whole on rank 0 at every ZeRO stage we run)."""
    store = Store(dest, endpoint)
    for fname, mod in (("model.safetensors", module), ("ema.safetensors", ema.module if ema is not None else None)):
        if mod is None:
            continue
        items = [(n, tuple(p.shape), (lambda p=p: p)) for n, p in mod.named_parameters()]
        with store.open_write_atomic(fname) as f:
            write_streamed(f, items)
    files = {"config.json": json.dumps(model_info, indent=1), "classes.json": json.dumps(classes),
             "summary.json": json.dumps(summary, indent=1)}  # fmt: skip
    for name, text in files.items():
        store.write_bytes_atomic(name, text.encode())
