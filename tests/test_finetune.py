"""The fine-tuning stage: class-folder data (incl. ImageNet's flat val + labels CSV), init sources
(exports, checkpoints, timm files, on S3), SAM, eval-only mode, results.json. The end-to-end tests
run real Ray Train + DeepSpeed workers on a `ray start` cluster and read the export from moto's S3."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.manifest import load_manifest
from data_prep.pack import PackOptions, pack
from data_prep.sample_folders import GROUPS, write_groups
from data_prep.sources import SourceError
from data_prep.storage import Store
from pipeline.config import resolve
from pipeline.finetune.prepare import prepare_data
from pipeline.finetune.sources import InitError, check_classes, load_source
from pipeline.train.sam import sam_ascend, sam_restore

GROUP_NAMES = sorted(set(GROUPS.values()))


def _png(value: int, size: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# ---- data: ImageNet layouts ----------------------------------------------------------------------
def test_flat_val_with_labels_csv_rejects_named_files_and_dedups_per_split(tmp_path):
    src = tmp_path / "imagenet"
    for wnid, base in (("n01440764", 10), ("n01443537", 100)):
        for i in range(3):
            (src / "train" / wnid).mkdir(parents=True, exist_ok=True)
            (src / "train" / wnid / f"{wnid}_{i}.JPEG").write_bytes(_png(base + i))
    val = src / "val"
    val.mkdir()
    (val / "ILSVRC2012_val_00000001.JPEG").write_bytes(_png(10))  # byte-identical to a train image
    (val / "ILSVRC2012_val_00000002.JPEG").write_bytes(_png(150))
    (val / "ILSVRC2012_val_00000003.JPEG").write_bytes(_png(160))  # label not a train class
    (val / "ILSVRC2012_val_00000004.JPEG").write_bytes(_png(170))  # not in the labels file
    (val / "ILSVRC2012_val_00000005.JPEG").write_bytes(b"\xff\xd8\xff\xe0 truncated")  # corrupt
    (val / "notes.txt").write_text("not an image")
    labels = tmp_path / "LOC_val_solution.csv"
    labels.write_text("ImageId,PredictionString\n"
                      "ILSVRC2012_val_00000001,n01440764 1 2 3 4\n"
                      "ILSVRC2012_val_00000002,n01443537 5 6 7 8 n01443537 1 1 2 2\n"
                      "ILSVRC2012_val_00000003,n99999999 1 2 3 4\n"
                      "ILSVRC2012_val_00000005,n01440764 1 2 3 4\n")  # fmt: skip
    out = tmp_path / "split"
    pack(str(src), str(out), PackOptions(samples_per_shard=4, dedup="split", val_labels=str(labels)), progress=False)
    m = load_manifest(str(out))
    assert m["classes"] == ["n01440764", "n01443537"]
    assert m["splits"]["train"]["samples"] == 6
    assert m["splits"]["val"]["samples"] == 2  # 1 (duplicate of train, kept: dedup per split) and 2
    assert m["splits"]["val"]["class_counts"] == [1, 1]
    rejected = {Path(r["path"]).name: r["reason"] for r in map(json.loads, (out / "rejected.jsonl").read_text().splitlines())}
    assert "n99999999" in rejected["ILSVRC2012_val_00000003.JPEG"] and "not a class folder of train/" in rejected["ILSVRC2012_val_00000003.JPEG"]
    assert "no label for val/ILSVRC2012_val_00000004.JPEG" in rejected["ILSVRC2012_val_00000004.JPEG"]
    assert "unsupported file extension .txt" in rejected["notes.txt"]
    assert "ILSVRC2012_val_00000005.JPEG" in rejected and len(rejected) == 4
    # Global dedup (the pretraining default) drops the val image that duplicates a train image.
    out2 = tmp_path / "global"
    pack(str(src), str(out2), PackOptions(samples_per_shard=4, val_labels=str(labels)), progress=False)
    assert load_manifest(str(out2))["splits"]["val"]["samples"] == 1


def test_dataset_problems_are_clear_errors(tmp_path):
    empty = tmp_path / "empty"
    (empty / "train" / "a").mkdir(parents=True)
    (empty / "val" / "a").mkdir(parents=True)
    cfg = resolve("demo_finetune", [f"data.source={empty}", f"run.storage={tmp_path / 'runs'}"])
    with pytest.raises(SourceError, match=f"SOURCE {empty} holds no images"):
        prepare_data(cfg, progress=False)
    only_train = tmp_path / "only_train"
    (only_train / "a").mkdir(parents=True)
    (only_train / "a" / "x.png").write_bytes(_png(1))
    cfg = resolve("demo_finetune", [f"data.source={only_train}", f"run.storage={tmp_path / 'runs'}", "run.name=t2"])
    with pytest.raises(ValueError, match="has no 'val' split .* needs train/ and val/ folders"):
        prepare_data(cfg, progress=False)


def test_class_mismatch_names_the_classes():
    check_classes(["a", "b"], ["a", "b"], "x", "y")
    with pytest.raises(ValueError, match=r"missing from data: \['cat'\]; not in decl: \['dog'\]"):
        check_classes(["ant", "cat"], ["ant", "dog"], "decl", "data")
    with pytest.raises(ValueError, match=r"another order \(position 0: 'a' vs 'b'\)"):
        check_classes(["a", "b"], ["b", "a"], "decl", "data")


# ---- SAM ---------------------------------------------------------------------------------------
def test_sam_moves_rho_along_the_gradient_and_restores_exactly():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.GELU(), torch.nn.Linear(5, 3))
    batches = [(torch.randn(4, 6), torch.randint(0, 3, (4,))) for _ in range(3)]

    def loss_fn(m, a, b):
        return torch.nn.functional.cross_entropy(m(b[0]), b[1])

    w0 = [p.detach().clone() for p in module.parameters()]
    total = sum(loss_fn(module, a, b) for a, b in enumerate(batches)) / len(batches)
    grads = torch.autograd.grad(total, list(module.parameters()))
    gnorm = torch.sqrt(sum((g**2).sum() for g in grads))
    originals, norm = sam_ascend(module, batches, loss_fn, rho=0.05)
    assert norm == pytest.approx(gnorm.item(), rel=1e-5)
    for p, w, g in zip(module.parameters(), w0, grads):
        torch.testing.assert_close(p.detach() - w, 0.05 * g / gnorm, rtol=1e-4, atol=1e-7)
    sam_restore(module, originals)
    assert all(torch.equal(p, w) for p, w in zip(module.parameters(), w0))


def test_sam_needs_zero_stage_0():
    with pytest.raises(ValueError, match="SAM.*needs run.zero_stage=0"):
        resolve("demo_finetune", ["run.zero_stage=1"])
    with pytest.raises(ValueError, match="run.mode=eval evaluates model.init_from"):
        resolve("demo", ["run.mode=eval"])


# ---- init sources ------------------------------------------------------------------------------
def test_bad_init_sources_are_named(tmp_path):
    from safetensors.torch import save_file

    from models import create_model

    cfg = resolve("demo_finetune")
    with pytest.raises(InitError, match="not an export folder"):
        load_source(str(tmp_path), cfg.model)
    model = create_model("nfnet_pico", 10)
    export = tmp_path / "export"
    export.mkdir()
    sd = {k: v for k, v in model.state_dict().items() if k != "stem.conv2.weight"}
    save_file(sd, str(export / "model.safetensors"))
    import dataclasses

    (export / "config.json").write_text(json.dumps({"name": "nfnet_pico", "arch": dataclasses.asdict(model.cfg)}))
    from pipeline.finetune.sources import build_model

    with pytest.raises(InitError, match=r"missing tensors \['stem.conv2.weight'\]"):
        build_model(dataclasses.replace(cfg.model, init_from=str(export)), 4)
    timm_file = tmp_path / "w.pth"
    torch.save(create_model("nfnet_pico", 10).state_dict(), timm_file)
    with pytest.raises(InitError, match="do not fit this architecture.*is model.name='nfnet_f0' right"):
        load_source(str(timm_file), dataclasses.replace(cfg.model, name="nfnet_f0"))


# ---- end to end --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def groups(tmp_path_factory) -> str:
    dest = tmp_path_factory.mktemp("groups") / "fashion-mnist-groups"
    write_groups(str(dest), n_train=1536, n_val=512)
    return str(dest)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, ray_cluster, s3_server) -> dict:
    """A short pretraining run of the demo model on 10 fashion-mnist classes, stored on S3."""
    from data_prep.storage import s3_client

    data = tmp_path_factory.mktemp("fm") / "out"
    pack("fashion-mnist", str(data), PackOptions(samples_per_shard=250, limit_per_split=1200, heldout_fraction=0.1), progress=False)
    bucket = "pretrain-runs"
    s3_client(s3_server).create_bucket(Bucket=bucket)
    cfg = resolve("demo", [
        f"data.root={data}", "data.workers=0", "data.shuffle_window=64", "aug.train_res=24", "aug.eval_res=24",
        "optim.lr_base=0.2", "optim.warmup_epochs=0.2", "optim.ema_decay=0.9",
        "schedule.global_batch=128", "schedule.micro_batch=32", "schedule.epochs=2", "schedule.ckpt_every=4",
        "schedule.eval_every=0", f"run.storage=s3://{bucket}/runs", "run.name=pre", "run.max_failures=0",
        f"data.s3_endpoint={s3_server}",
    ])  # fmt: skip
    _fit(cfg, ray_cluster)
    return {"export": f"s3://{bucket}/runs/pre/export", "run": f"s3://{bucket}/runs/pre", "data": str(data)}


def _fit(cfg, ray_cluster):
    import ray

    from pipeline.train.ray_job import fit

    if not ray.is_initialized():
        ray.init(address=ray_cluster["address"], log_to_driver=False)
    return fit(cfg)


def _finetune_cfg(groups: str, storage: str, name: str, init_from: str, endpoint: str, *sets: str):
    return resolve("demo_finetune", [
        f"data.source={groups}", f"model.init_from={init_from}", f"data.s3_endpoint={endpoint}",
        # The recipe's heavy augmentations off: 4 epochs of 1,536 tiny images must show learning.
        "aug.train_res=32", "aug.eval_res=32", "aug.min_area=0.5", "aug.randaug_layers=0", "aug.mixup_alpha=0",
        "aug.cutmix_alpha=0", "data.workers=0", "schedule.global_batch=128", "schedule.micro_batch=32",
        "schedule.epochs=4", "schedule.ckpt_every=0", "optim.lr_base=0.8", "optim.ema_decay=0.95", "run.max_failures=0",
        f"run.storage={storage}", f"run.name={name}", *sets,
    ])  # fmt: skip


def _results(storage: str, name: str) -> dict:
    return json.loads(Path(storage, name, "results.json").read_text())


def test_finetune_export_from_s3_with_sam_then_eval_only(groups, pretrained, tmp_path, ray_cluster, s3_server):
    storage = str(tmp_path / "runs")
    cfg = _finetune_cfg(groups, storage, "ft", pretrained["export"], s3_server, "data.classes=" + ",".join(GROUP_NAMES))
    manifest = prepare_data(cfg, progress=False)
    assert manifest["classes"] == GROUP_NAMES and cfg.data.root == f"{storage}/ft/data"
    _fit(cfg, ray_cluster)
    res = _results(storage, "ft")
    counts = manifest["splits"]["val"]["class_counts"]
    majority = max(counts) / sum(counts)  # always answering "tops"
    assert res["samples"] == 512 and res["split"] == "val" and res["classes"] == 4
    assert res["raw"]["top1"] > majority + 0.3 and res["ema"]["top1"] > majority + 0.3, (res, majority)
    assert res["raw"]["top5"] == 1.0  # 4 classes: the true one is always among the top 5
    pre_summary = json.loads(Store(pretrained["export"], s3_server).read_bytes("summary.json"))
    assert res["pretraining"]["samples_seen"] == pre_summary["samples_seen"] > 0
    assert res["training"]["step"] == 4 * 1536 // 128
    export = Path(storage, "ft", "export")
    assert json.loads((export / "classes.json").read_text()) == GROUP_NAMES
    assert json.loads((export / "summary.json").read_text())["train_flops_per_image"] > 0

    # Eval-only of the fine-tuned export (another batch size and worker layout): the fine-tuning run's
    # final numbers. (tests/test_launchers.py evaluates a local fine-tuned export through `ray job submit`.)
    ev = resolve("demo_finetune", [f"data.root={cfg.data.root}", "data.source=", f"model.init_from={export}", "aug.eval_res=32",
                                   "data.workers=0", "schedule.global_batch=128", "schedule.micro_batch=32",
                                   "run.mode=eval", "run.export=false", f"run.storage={storage}", "run.name=ev1"])  # fmt: skip
    prepare_data(ev, progress=False)
    _fit(ev, ray_cluster)
    a = _results(storage, "ev1")
    assert a["raw"]["top1"] == pytest.approx(res["raw"]["top1"]) and a["ema"]["loss"] == pytest.approx(res["ema"]["loss"], rel=1e-6)
    assert a["raw"]["loss"] == pytest.approx(res["raw"]["loss"], rel=1e-6) and a["ema"]["top1"] == pytest.approx(res["ema"]["top1"])

    # The fine-tuned (4-class) export on the 10-class data: refused in the driver, naming classes.
    bad = resolve("demo", [f"data.root={pretrained['data']}", f"model.init_from={export}", "run.mode=eval"])
    with pytest.raises(ValueError, match=r"class mismatch: 4 classes in .*export, 10 in .*missing from .*\['bags'"):
        prepare_data(bad, progress=False)


def test_eval_only_of_an_s3_ray_train_checkpoint(groups, pretrained, tmp_path, ray_cluster, s3_server):
    """A Ray Train checkpoint of the pretraining run (on S3) evaluates on its own held-out split."""
    from data_prep.storage import s3_client, split_s3

    bucket, prefix = split_s3(pretrained["run"])
    keys = [o["Key"] for o in s3_client(s3_server).list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]]
    ckpts = sorted({k.split("/")[2] for k in keys if "/checkpoint_" in k and k.endswith("/index-00000.json")})
    assert ckpts, keys
    ckpt = f"{pretrained['run']}/{ckpts[-1]}"
    storage = str(tmp_path / "runs")
    ev = resolve("demo", [f"data.root={pretrained['data']}", "data.eval_split=heldout", f"model.init_from={ckpt}",
                          "aug.eval_res=24", "data.workers=0", "schedule.global_batch=128", "schedule.micro_batch=32",
                          "run.mode=eval", "run.export=false", f"run.storage={storage}", "run.name=evck",
                          f"data.s3_endpoint={s3_server}"])  # fmt: skip
    prepare_data(ev, progress=False)
    _fit(ev, ray_cluster)
    res = _results(storage, "evck")
    pre = json.loads(Store(pretrained["export"], s3_server).read_bytes("summary.json"))
    # The last checkpoint is the final step: the same weights the export holds, the same held-out numbers.
    assert res["samples"] == pre["heldout_samples"]
    assert res["raw"]["loss"] == pytest.approx(pre["heldout_raw_loss"], rel=1e-5)
    assert res["ema"]["top1"] == pytest.approx(pre["heldout_ema_top1"])


def test_timm_converted_weights_evaluate_like_timm(groups, tmp_path, ray_cluster):
    """timm's dm_nfnet_f0 (randomised, 4 classes) -> `python -m models.convert` -> eval-only; the loss
    equals timm's own forward on the same evaluation batches."""
    from models.convert import main as convert
    from pipeline.data.augment import normalize
    from pipeline.data.loader import eval_loader

    from test_convert import _randomised_timm

    ref = _randomised_timm("dm_nfnet_f0", num_classes=4)
    with torch.no_grad():
        ref.head.fc.weight.normal_(0, 0.05)
    torch.save(ref.state_dict(), tmp_path / "dm_nfnet_f0.pth")
    weights = tmp_path / "f0.safetensors"
    convert([str(tmp_path / "dm_nfnet_f0.pth"), str(weights), "--model", "nfnet_f0"])

    data = tmp_path / "groups-wds"
    pack(groups, str(data), PackOptions(samples_per_shard=200, dedup="split", limit_per_split=96), progress=False)
    storage = str(tmp_path / "runs")
    ev = resolve("demo", [f"data.root={data}", "data.eval_split=val", f"model.init_from={weights}", "model.name=nfnet_f0",
                          "aug.eval_res=64", "data.workers=0", "schedule.global_batch=64", "schedule.micro_batch=32",
                          "run.mode=eval", "run.export=false", f"run.storage={storage}", "run.name=timm"])  # fmt: skip
    prepare_data(ev, progress=False)
    _fit(ev, ray_cluster)
    res = _results(storage, "timm")
    assert "ema" not in res and res["samples"] == 96

    dl, _ = eval_loader(str(data), "val", 32, 0, 1, ev.aug, workers=0)
    losses, hits = [], []
    with torch.no_grad():
        for batch in dl:
            m = batch["mask"].bool()
            logits = ref(normalize(batch["image"]))[m]
            losses.append(torch.nn.functional.cross_entropy(logits, batch["label"][m], reduction="none"))
            hits.append(logits.argmax(-1) == batch["label"][m])
    assert res["raw"]["loss"] == pytest.approx(torch.cat(losses).mean().item(), rel=1e-4)
    assert res["raw"]["top1"] == pytest.approx(torch.cat(hits).float().mean().item())


def test_eval_only_refuses_a_class_count_mismatch_for_unlabelled_weights(groups, tmp_path, ray_cluster):
    """timm weights carry no class names: a head of another size fails in the worker with a clear error."""
    from models import create_model

    pth = tmp_path / "w.pth"
    torch.save(create_model("nfnet_pico", 7).state_dict(), pth)
    data = tmp_path / "groups-wds"
    pack(groups, str(data), PackOptions(samples_per_shard=200, dedup="split", limit_per_split=64), progress=False)
    ev = resolve("demo", [f"data.root={data}", "data.eval_split=val", f"model.init_from={pth}", "run.mode=eval",
                          "data.workers=0", f"run.storage={tmp_path / 'runs'}", "run.name=bad", "run.max_failures=0"])  # fmt: skip
    with pytest.raises(Exception, match="class mismatch: .*w.pth has 7 classes, .* has 4"):
        _fit(ev, ray_cluster)
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)


def test_finetune_launcher_resolves_eval_only_and_paths(tmp_path):
    """The launcher's --eval-only and path handling, through its real command line (no Ray needed)."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "launch/finetune_imagenet.py", "--preset", "demo_finetune", "--eval-only",
                          "--set", "model.init_from=runs/x/export", "--set", "data.source=fashion-mnist", "--print-config"],
                         cwd=repo, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr
    cfg = json.loads(out.stdout.split("resolved config:\n", 1)[1])
    assert cfg["run"]["mode"] == "eval" and cfg["run"]["export"] is False
    assert cfg["model"]["init_from"] == str(repo / "runs/x/export") and cfg["data"]["source"] == "fashion-mnist"
    bad = subprocess.run([sys.executable, "launch/finetune_imagenet.py", "--preset", "finetune", "--set", "run.zero_stage=2",
                          "--print-config"], cwd=repo, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode != 0 and "needs run.zero_stage=0" in bad.stderr
