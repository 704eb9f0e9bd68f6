"""optim.objective=sigmoid on multi-label packs: the loss, multi-hot targets through augmentation and
the loaders, held-out top-1-any-label and mAP (also split over ranks), the softmax refusal, and
fine-tuning from a sigmoid-pretrained export. No Ray: each piece is called directly."""

from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path

import pytest
import torch
from corpus_utils import rand_image, save
from torchvision.transforms import v2

from data_prep.pack import PackOptions, pack
from pipeline.config import AugmentConfig, ModelConfig, TrainConfig, apply_overrides, check_objective, resume_changes
from pipeline.data.augment import TrainAugment, multi_hot
from pipeline.data.loader import EvalStream, Layout, TrainStream
from pipeline.train.evaluate import average_precision, evaluate, metric_names, split_map
from pipeline.train.step import loss_for, sigmoid_cross_entropy, soft_cross_entropy

CLASSES = ["bird", "cat", "dog", "emu"]
LABELS = [["cat", "dog"], "bird", ["bird", "emu"], "dog", ["cat", "dog", "emu"], "cat"]  # train rows 0-5


@pytest.fixture(scope="module")
def multilabel_pack(tmp_path_factory) -> Path:
    """A JSONL manifest with label lists packed by data_prep: 6 train images, 2 val."""
    tmp = tmp_path_factory.mktemp("ml")
    rows = [{"uri": str(save(rand_image(i), tmp / "imgs" / f"{i}.jpg")), "labels": lab, "split": "train"}
            for i, lab in enumerate(LABELS)]  # fmt: skip
    rows += [{"uri": str(save(rand_image(10 + i), tmp / "imgs" / f"v{i}.jpg")), "labels": lab, "split": "val"}
             for i, lab in enumerate((["dog", "bird"], "emu"))]  # fmt: skip
    (tmp / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (tmp / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp / "out"
    pack(str(tmp / "m.jsonl"), str(out), PackOptions(samples_per_shard=4, classes_file=str(tmp / "classes.txt")), progress=False)
    return out


def _labels_by_key(out: Path) -> dict[str, list[int]]:
    """Each packed sample's label list, read from its json member."""
    found = {}
    for shard in out.glob("*.tar"):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".json"):
                    found[m.name.split(".")[0]] = json.loads(tf.extractfile(m).read())["labels"]
    return found


def _plain_aug(**kw) -> AugmentConfig:
    return AugmentConfig(train_res=16, eval_res=16, eval_pad=0, random_resized_crop=False, hflip=False, randaug_layers=0,
                         mixup_alpha=0, cutmix_alpha=0, label_smoothing=0, **kw)  # fmt: skip


# ---- the loss ----------------------------------------------------------------------------------
def test_sigmoid_loss_is_batch_mean_of_class_sum_of_binary_cross_entropy():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    target = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.5, 0.0]])  # soft (mixed) targets are allowed

    def bce(z, y):  # -[y log s(z) + (1 - y) log(1 - s(z))]
        s = 1 / (1 + math.exp(-z))
        return -(y * math.log(s) + (1 - y) * math.log(1 - s))

    per_image = [sum(bce(z, y) for z, y in zip(zr, yr)) for zr, yr in zip(logits.tolist(), target.tolist())]
    loss = sigmoid_cross_entropy(logits.bfloat16(), target)
    assert loss.dtype == torch.float32  # bf16 logits are cast before the loss
    assert loss.item() == pytest.approx(sum(per_image) / 2, rel=1e-2)  # bf16 rounding of the logits
    assert sigmoid_cross_entropy(logits, target).item() == pytest.approx(sum(per_image) / 2, rel=1e-6)
    assert loss_for("sigmoid") is sigmoid_cross_entropy and loss_for("softmax") is soft_cross_entropy


# ---- targets: augmentation and loaders ----------------------------------------------------------
def test_mixing_and_smoothing_treat_multi_hot_like_one_hot():
    cfg = AugmentConfig(train_res=16, randaug_layers=0, label_smoothing=0.1)  # MixUp and CutMix on
    aug, c = TrainAugment(cfg, 4), 4
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    idx = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    torch.manual_seed(5)
    x_idx, y_idx = aug.batch(x, idx)
    torch.manual_seed(5)  # single-label rows as multi-hot: the very same batch and targets
    x_mh, y_mh = aug.batch(x, multi_hot([[int(i)] for i in idx], c))
    assert torch.equal(x_idx, x_mh) and torch.allclose(y_idx, y_mh)

    labels = [[0, 1], [1], [1, 2], [3], [0, 1, 2, 3], [2], [1, 3], [0]]
    y0 = multi_hot(labels, c)
    torch.manual_seed(5)
    _, y = aug.batch(x, y0)
    torch.manual_seed(5)  # torchvision's MixUp/CutMix on the same multi-hot targets, then smoothing
    ya = v2.MixUp(alpha=0.2, num_classes=c)(x[:4].float(), y0[:4])[1]
    yb = v2.CutMix(alpha=1.0, num_classes=c)(x[4:].float(), y0[4:])[1]
    assert torch.allclose(y, torch.cat([ya, yb]) * 0.9 + 0.1 / c)
    # image i is mixed with image i-1 of its half: a class of both stays (1 - eps) + eps / C = 0.925,
    # a class of neither gets eps / C = 0.025, a class of one lies between
    assert y[2, 1].item() == pytest.approx(0.925) and y[5, 2].item() == pytest.approx(0.925)
    assert y[1, 3].item() == pytest.approx(0.025, rel=1e-6) and 0.025 < y[1, 0].item() < 0.925
    assert (y <= 1).all()


def test_loaders_yield_multi_hot_targets_of_every_label(multilabel_pack):
    truth = _labels_by_key(multilabel_pack)
    assert sorted(map(sorted, (truth[k] for k in truth))).count([1, 2]) == 1  # the pack kept the label lists
    ds = TrainStream(str(multilabel_pack), Layout(micro_batch=2), 0, _plain_aug(), multi_hot=True)
    it = iter(ds)
    seen = {}
    for _ in range(ds.steps_per_epoch):  # one epoch: every train sample once
        b = next(it)
        assert b["target"].shape == (2, len(CLASSES)) and b["bad"] == 0
        seen.update({k: sorted(torch.nonzero(t).flatten().tolist()) for k, t in zip(b["keys"], b["target"])})
    assert len(seen) == 6 and all(seen[k] == sorted(truth[k]) for k in seen)
    assert any(len(v) > 1 for v in seen.values())

    ev = next(iter(EvalStream(str(multilabel_pack), "val", 4, 0, 1, _plain_aug(), multi_hot=True)))
    assert "label" not in ev and ev["target"].shape == (4, len(CLASSES))
    got = {k: sorted(torch.nonzero(t).flatten().tolist()) for k, t in zip(ev["keys"], ev["target"])}
    assert got == {k: sorted(truth[k]) for k in got} and sorted(got.values()) == [[0, 2], [3]]
    assert ev["target"][2:].sum() == 0 and ev["mask"].tolist() == [1, 1, 0, 0]  # padding: masked, no positives
    soft = next(iter(EvalStream(str(multilabel_pack), "val", 4, 0, 1, _plain_aug())))  # softmax: unchanged
    assert "target" not in soft and soft["label"].dtype == torch.long
    assert soft["label"][:2].tolist() == [truth[k][0] for k in soft["keys"]]


# ---- held-out metrics ---------------------------------------------------------------------------
class _Replay(torch.nn.Module):
    """Returns the given logits, one batch per call (the metrics, not a network, are under test)."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = iter(outputs)

    def forward(self, x):
        return next(self.outputs)


# 3 real samples and 1 padding row, 4 classes; class 3 has no positive
LOGITS = torch.tensor([[2.0, 1.0, -1.0, 0.3], [0.5, 3.0, 0.0, 0.1], [1.5, -2.0, 0.2, 4.0], [9.0, 9.0, 9.0, 9.0]])
TARGET = torch.tensor([[0.0, 1, 1, 0], [0, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 0]])
MASK = torch.tensor([1.0, 1, 1, 0])


def test_sigmoid_metrics_top1_any_label_and_map_by_hand():
    batches = [{"image": torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "target": TARGET[i : i + 2], "mask": MASK[i : i + 2],
                "bad": 0} for i in (0, 2)]  # fmt: skip
    r = evaluate(_Replay([LOGITS[:2], LOGITS[2:]]), batches, torch.device("cpu"), objective="sigmoid")
    # argmax: class 0 (not a label of sample 0), class 1 (a label of 1), class 3 (not a label of 2)
    assert r["top1"] == pytest.approx(1 / 3) and r["top5"] == 1.0 and r["samples"] == 3
    # AP by class over the 3 real samples, in descending score order (+ positive, - negative):
    # 0: 2.0-, 1.5+, 0.5- -> 1/2; 1: 3.0+, 1.0+ -> 1; 2: 0.2+, 0.0-, -1.0+ -> (1 + 2/3) / 2;
    # 3: no positive, left out of the mean.
    assert r["map"] == pytest.approx((1 / 2 + 1 + 5 / 6) / 3)
    softplus = torch.nn.functional.softplus
    by_hand = sum(float((softplus(z) - y * z).sum()) for z, y in zip(LOGITS[:3], TARGET[:3])) / 3
    assert r["loss"] == pytest.approx(by_hand, rel=1e-6)
    assert metric_names("sigmoid") == ("top1", "top5", "loss", "map") and metric_names("softmax") == ("top1", "top5", "loss")


def test_softmax_metrics_unchanged():
    batch = {"image": torch.zeros(4, 3, 4, 4, dtype=torch.uint8), "label": torch.tensor([1, 1, 3, 0]), "mask": MASK, "bad": 1}
    r = evaluate(_Replay([LOGITS]), [batch], torch.device("cpu"))
    ce = torch.nn.functional.cross_entropy(LOGITS[:3], torch.tensor([1, 1, 3]), reduction="sum").item() / 3
    assert r == {"loss": pytest.approx(ce), "top1": pytest.approx(2 / 3), "top5": 1.0, "samples": 3, "bad": 1}


def test_average_precision_counts_tied_scores_together():
    scores = torch.tensor([[0.9], [0.2], [0.2], [0.1]])
    positives = torch.tensor([[0], [1], [1], [0]])
    assert average_precision(scores, positives).item() == pytest.approx(2 / 3)  # both at precision 2/3, either order
    assert average_precision(scores, torch.zeros(4, 1)).isnan().all()


def _map_worker(rank: int, world: int, init: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        n = 2  # every rank has the same (padded) row count, as the eval loader guarantees
        rows = slice(rank * n, rank * n + n)
        value = split_map(LOGITS[rows], TARGET[rows].to(torch.uint8), MASK[rows].to(torch.uint8))
        Path(f"{out}.{rank}").write_text(repr(value))
    finally:
        torch.distributed.destroy_process_group()


def test_map_split_over_ranks_equals_one_process(tmp_path):
    """Two gloo processes, each holding half of the split: each computes the APs of its chunk of classes."""
    import torch.multiprocessing as mp

    init, out = f"file://{tmp_path / 'pg'}", str(tmp_path / "map")
    mp.spawn(_map_worker, args=(2, init, out), nprocs=2, join=True)
    whole = split_map(LOGITS, TARGET.to(torch.uint8), MASK.to(torch.uint8))
    assert whole == pytest.approx((1 / 2 + 1 + 5 / 6) / 3)
    assert [float(Path(f"{out}.{r}").read_text()) for r in (0, 1)] == [pytest.approx(whole)] * 2


# ---- config and the refusal ---------------------------------------------------------------------
def test_objective_config_key():
    cfg = TrainConfig()
    assert cfg.optim.objective == "softmax"
    assert apply_overrides(cfg, ["optim.objective=sigmoid"]).optim.objective == "sigmoid"
    with pytest.raises(ValueError, match=r"optim.objective must be one of \['softmax', 'sigmoid'\], got 'bce'"):
        apply_overrides(cfg, ["optim.objective=bce"])
    saved = cfg.to_dict()
    assert resume_changes(saved, apply_overrides(cfg, ["optim.objective=sigmoid"]).to_dict())[0] == ["optim.objective"]


def test_softmax_on_a_multi_label_pack_is_refused_before_training(multilabel_pack):
    from pipeline.finetune.prepare import prepare_data
    from pipeline.train.ray_job import check_data_objective

    where = f"{multilabel_pack}/manifest.json"
    msg = (f"{where} is multi-label but optim.objective is 'softmax', which would train on each sample's first label "
           "only: set optim.objective=sigmoid")  # fmt: skip
    cfg = apply_overrides(TrainConfig(), [f"data.root={multilabel_pack}", "data.train_split=train", "data.eval_split=val"])
    with pytest.raises(ValueError) as e:
        check_data_objective(cfg)  # what ray_job.fit runs in the driver before any worker starts
    assert str(e.value) == msg and "\n" not in msg
    with pytest.raises(ValueError, match="optim.objective=sigmoid"):
        prepare_data(cfg, progress=False)  # the fine-tuning launcher's data check
    with pytest.raises(ValueError, match="would evaluate against each sample's first label"):
        check_objective(apply_overrides(cfg, ["run.mode=eval", "model.init_from=x"]), {"multi_label": True}, where)
    sigmoid = apply_overrides(cfg, ["optim.objective=sigmoid"])
    check_data_objective(sigmoid)
    assert prepare_data(sigmoid, progress=False)["multi_label"]
    check_objective(cfg, {"multi_label": False}, where)  # single-label packs: either objective


# ---- fine-tuning from a sigmoid-pretrained export -----------------------------------------------
def test_finetuning_from_a_sigmoid_export_works_as_from_a_softmax_one(tmp_path):
    from pipeline.finetune.sources import build_model
    from pipeline.train.checkpoint import write_export

    torch.manual_seed(0)
    model, info, _ = build_model(ModelConfig(name="nfnet_pico"), len(CLASSES))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 32, 32), multi_hot([[0, 1], [2], [1, 3], [0, 2, 3]], len(CLASSES))
    for _ in range(2):  # a couple of sigmoid-objective steps, so the head is not the initial one
        opt.zero_grad()
        sigmoid_cross_entropy(model(x), y).backward()
        opt.step()
    for objective in ("softmax", "sigmoid"):
        write_export(str(tmp_path / objective), model, None, info, CLASSES, {"objective": objective, "steps": 2})

    built = {}
    for objective in ("softmax", "sigmoid"):
        mc = ModelConfig(name="nfnet_pico", init_from=str(tmp_path / objective), init_weights="raw", reset_head=True)
        built[objective] = build_model(mc, 3)  # a 3-class fine-tuning task: new zero head
    (soft, _, soft_src), (sig, sig_info, sig_src) = built["softmax"], built["sigmoid"]
    assert sig_src.summary["objective"] == "sigmoid" and sig_src.classes == CLASSES
    assert sig_info["num_classes"] == 3 and sig.head.fc.weight.shape[0] == 3 and not sig.head.fc.weight.any()
    assert soft.state_dict().keys() == sig.state_dict().keys()
    assert all(torch.equal(soft.state_dict()[k], v) for k, v in sig.state_dict().items())
    body = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    assert all(torch.equal(sig.state_dict()[k], v) for k, v in body.items())
    loss = soft_cross_entropy(sig(x), torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0]), 3).float())
    loss.backward()  # the fine-tuning (softmax) step runs: zero head -> uniform prediction, log 3
    assert loss.item() == pytest.approx(math.log(3), rel=1e-5) and sig.head.fc.weight.grad.abs().sum() > 0
