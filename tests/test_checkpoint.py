"""Sharded checkpoints (pipeline/train/checkpoint.py, pipeline/formats/): written by 2 ranks at ZeRO-2,
restored by 3 ranks at ZeRO-1 and by 1 at ZeRO-0 to the same weights, momentum and EMA; each rank
snapshots only its share; an incomplete directory is refused. Real DeepSpeed engines in processes
joined by a gloo process group (no Ray needed; tests/test_train.py covers the trainer end to end)."""

from __future__ import annotations

import io
import json
import os
import shutil

import pytest
import torch
from gloo_utils import join_gloo, spawn
from safetensors.torch import load_file

from pipeline.formats.safetensors_io import RangedReader, write_streamed
from pipeline.formats.sharded import IncompleteCheckpoint
from pipeline.train.checkpoint import owners


def test_streamed_safetensors_load_with_the_library_and_read_by_range(tmp_path):
    torch.manual_seed(0)
    tensors = {"a.weight": torch.randn(5, 3, 2), "b": torch.randn(7), "s": torch.tensor(2.5)}
    path = tmp_path / "x.safetensors"
    with open(path, "wb") as f:
        n = write_streamed(f, [(k, tuple(v.shape), (lambda v=v: v)) for k, v in tensors.items()])
    assert n == path.stat().st_size
    back = load_file(str(path))  # the safetensors library reads what we stream
    assert all(torch.equal(back[k], v) for k, v in tensors.items())
    with open(path, "rb") as f:
        r = RangedReader(f)
        assert torch.equal(r.read("a.weight", 7, 19), tensors["a.weight"].flatten()[7:19])
        with pytest.raises(ValueError, match=r"range \[0, 31\) outside b"):
            r.read("b", 0, 31)
    truncated = path.read_bytes()[:-8]
    with pytest.raises(ValueError, match="truncated at s"):
        RangedReader(io.BytesIO(truncated)).read("s")


def test_owners_balance_within_one_tensor():
    sizes = [(f"t{i}", s) for i, s in enumerate([1000, 700, 650, 300, 20, 20, 5, 1, 1])]
    for world in (1, 2, 3, 4):
        own = owners(sizes, world)
        loads = [sum(s for n, s in sizes if own[n] == r) for r in range(world)]
        assert max(loads) <= sum(s for _, s in sizes) / world + 1000


def _engine(stage: int, world: int):
    import deepspeed

    from models import create_model
    from pipeline.train.step import SkippableSGD, make_ema

    torch.manual_seed(0)
    model = create_model("nfnet_pico", num_classes=10)
    opt = SkippableSGD(model.param_groups(2e-5), lr=0.2, momentum=0.9, nesterov=True)
    opt.skip = True
    cfg = {"train_micro_batch_size_per_gpu": 6 // world, "gradient_accumulation_steps": 1, "train_batch_size": 6,
           "gradient_clipping": 0.0, "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
           "steps_per_print": 10**9}  # fmt: skip
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, dist_init_required=False)
    opt.skip = False
    return engine, opt, make_ema(engine.module, 0.9)


def _full_state(engine, opt, ema) -> dict[str, torch.Tensor]:
    """Every tensor whole, through DeepSpeed's own (collective) gather: the reference."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from pipeline.train.checkpoint import relink_optimizer_state

    relink_optimizer_state(engine.optimizer)
    out, ema_p = {}, dict(ema.module.named_parameters())
    for n, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        out[f"param/{n}"] = (full if full is not None else p.detach()).clone()
        mom = safe_get_full_optimizer_state(p, "momentum_buffer") if hasattr(p, "_hp_mapping") else opt.state[p]["momentum_buffer"]
        out[f"momentum/{n}"] = mom.clone()
        out[f"ema/{n}"] = ema_p[n].detach().clone()
    return out


def _worker(rank: int, world: int, port: int, stage: int, out: str, mode: str) -> None:
    join_gloo(rank, world, port)
    import torch.distributed as dist

    from pipeline.formats.sharded import open_local
    from pipeline.train.checkpoint import restore, snapshot, write_shard

    engine, opt, ema = _engine(stage, world)
    ckpt = os.path.join(out, "ckpt")
    if mode == "write":
        for step in range(2):  # two SGD steps: momentum and EMA are not trivial
            gen = torch.Generator().manual_seed(10 * step + rank)
            x, y = torch.randn(6 // world, 3, 32, 32, generator=gen), torch.randint(0, 10, (6 // world,), generator=gen)
            engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
            engine.step()
            ema.update_parameters(engine.module)
        ref = _full_state(engine, opt, ema)
        snap = snapshot(engine.module, opt, ema, engine.optimizer, rank, world, step=2)
        # training goes on while the shard is written in the background: the snapshot must not alias
        gen = torch.Generator().manual_seed(99 + rank)
        x, y = torch.randn(6 // world, 3, 32, 32, generator=gen), torch.randint(0, 10, (6 // world,), generator=gen)
        engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
        engine.step()
        ema.update_parameters(engine.module)
        write_shard(ckpt, snap, {"counters": {"step": 2}} if rank == 0 else None)
        state_bytes = sum(v.numel() * 4 for v in ref.values())
        largest = max(v.numel() * 4 for v in ref.values())
        if rank == 0:
            torch.save(ref, os.path.join(out, "ref.pt"))
        with open(os.path.join(out, f"mem-{rank}.json"), "w") as f:
            json.dump({"snapshot": snap.nbytes, "state": state_bytes, "largest": largest}, f)
    else:
        dist.barrier()
        restore(open_local(ckpt), engine.module, opt, ema, engine.optimizer)
        got = _full_state(engine, opt, ema)
        ref = torch.load(os.path.join(out, "ref.pt"))
        worst = max((got[k] - ref[k]).abs().max().item() for k in ref)
        # the fp32 masters restored, not only the module's copy: one more step must start from them
        if hasattr(next(engine.module.parameters()), "_hp_mapping"):
            for p in engine.module.parameters():
                m = p._hp_mapping
                if m is not None:
                    a = m.lp_fragment_address
                    worst = max(worst, (m.get_hp_fragment() - p.detach().flatten()[a.start : a.start + a.numel]).abs().max().item())
        with open(os.path.join(out, f"restore-{world}-{stage}-{rank}.json"), "w") as f:
            json.dump({"worst": worst, "keys": len(ref)}, f)
    dist.destroy_process_group()


def test_written_by_two_ranks_restored_at_another_world_size_and_stage(tmp_path):
    out = str(tmp_path)
    spawn(_worker, 2, 2, out, "write")
    for r in range(2):  # each rank held only its share: weights/EMA by tensor, momentum its partition
        m = json.loads((tmp_path / f"mem-{r}.json").read_text())
        assert m["snapshot"] <= m["state"] / 2 + m["largest"], m
    ckpt = tmp_path / "ckpt"
    assert sorted(os.listdir(ckpt)) == ["index-00000.json", "index-00001.json", "shard-00000-of-00002.safetensors",
                                        "shard-00001-of-00002.safetensors", "trainer.json"]  # fmt: skip
    for world, stage in ((3, 1), (1, 0)):
        spawn(_worker, world, stage, out, "read")
        for r in range(world):
            res = json.loads((tmp_path / f"restore-{world}-{stage}-{r}.json").read_text())
            assert res["worst"] == 0.0 and res["keys"] > 100, (world, stage, r, res)

    # an index missing (a writer killed before finishing) or a short shard: refused in one line
    from pipeline.formats.sharded import open_local

    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "index-00001.json").unlink()
    with pytest.raises(IncompleteCheckpoint, match=r"ranks \[1\] of 2 have no index"):
        open_local(str(broken))
    shutil.copy(ckpt / "index-00001.json", broken)
    shard = broken / "shard-00000-of-00002.safetensors"
    good = shard.read_bytes()
    shard.write_bytes(good[:100])
    with pytest.raises(IncompleteCheckpoint, match="shard-00000-of-00002.safetensors is missing or not"):
        open_local(str(broken))
    shard.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # one bit flipped, same size
    with pytest.raises(IncompleteCheckpoint, match="does not match the sha256 in its index"):
        open_local(str(broken))
