"""One typed config for every stage (pretraining, fine-tuning, sweep points), presets as data.

    cfg = resolve("demo", ["optim.lr_base=0.2", "schedule.epochs=3"])

Batch identity: global_batch = micro_batch x accum_steps x num_workers. Users set global_batch and
micro_batch; accum_steps is derived and must divide exactly.
Training length is set in exactly one of: epochs, samples, train_flops (all map to steps).
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class AugmentConfig:
    train_res: int = 192  # training crop side in pixels
    eval_res: int = 256  # evaluation crop side in pixels
    eval_crop: str = "squash"  # or "center"
    # Eval resizes to S + eval_pad, then centre-crops S. DM's +32 keeps 86% of the side at 224 px;
    # at 32 px it would keep only half of the image, so tiny presets use a proportional pad.
    eval_pad: int = 32
    random_resized_crop: bool = True  # Inception crop (else resize and centre crop)
    min_area: float = 0.08  # smallest crop area fraction of the Inception crop
    hflip: bool = True  # random horizontal flip
    randaug_layers: int = 4  # 0: off
    randaug_magnitude: int = 5  # RandAugment magnitude on DM's 0-10 scale (above 10 is capped at 10)
    mixup_alpha: float = 0.2  # 0: off
    cutmix_alpha: float = 1.0  # 0: off
    label_smoothing: float = 0.1  # target = (1 - s) one-hot + s / classes


@dataclass
class ModelConfig:
    name: str = "nfnet_f0"  # nfnet_f0..f7, nfnet_f0plus..f7plus, or the CPU family nfnet_pico/nano/micro/tiny
    width_mult: float = 1.0  # scales every stage width (group width scales with it)
    depth_mult: float = 1.0  # scales blocks per stage
    overrides: dict = field(default_factory=dict)  # NFNetConfig fields (drop_rate, stochdepth_rate, ...)
    init_from: str = ""  # an export folder, a Ray Train checkpoint dir, or a timm/converted weights file (local or s3://)
    init_weights: str = "ema"  # from an export/checkpoint: "ema" (falls back to raw when absent) or "raw"
    reset_head: bool = False  # a new zero-initialised classifier for the dataset's classes (fine-tuning)


@dataclass
class DataConfig:
    root: str = "data/fashion-mnist"  # a data_prep OUT (local or s3://); "" with `source`: {storage}/{name}/data
    source: str = ""  # optional: a class-folder dataset / manifest packed into `root` before training
    val_labels: str = ""  # with `source`: labels CSV of a flat val/ (ImageNet's LOC_val_solution.csv)
    classes: str = ""  # declared classes: a file (one per line) or comma-separated; must equal the dataset's
    pack_resize: int = 0  # with `source`: shorter side of the packed images (0: keep)
    train_split: str = "train"  # the manifest split trained on
    eval_split: str = "heldout"  # the manifest split evaluated on
    workers: int = 2  # DataLoader processes per training worker
    # Threads decoding JPEGs inside each loader process (0/1: inline). libjpeg-turbo releases the
    # GIL, so with light augmentation `workers=0, decode_threads=N` decodes in the training
    # process itself and skips the shared-memory hand-over (docs/data-loading.md, "Speed").
    decode_threads: int = 0
    # An S3 outage is waited out (exponential backoff, at most 30 s a wait) for this long, then the
    # step fails and Ray Train restores the last checkpoint: the epoch stays exact.
    s3_retry_s: float = 600.0
    substitute_on_s3_outage: bool = False  # instead: replace unreadable samples (counted in data/bad_samples)
    prefetch: int = 2  # batches each DataLoader process prepares ahead
    shuffle_window: int = 4096  # samples permuted together within a slot's span of the epoch
    s3_endpoint: str = ""  # S3 endpoint URL (else AWS_ENDPOINT_URL, else AWS)


@dataclass
class OptimConfig:
    lr_base: float = 0.1  # per 256 images: peak lr = lr_base * global_batch / 256
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = True  # Nesterov momentum
    weight_decay: float = 2e-5  # coupled L2; never on gains, biases, skip gains
    warmup_epochs: float = 5.0  # linear warm-up from 0 to the peak lr, then cosine to 0
    agc_clip: float = 0.01  # 0 disables AGC
    agc_eps: float = 1e-3  # AGC floor on the weight norm
    ema_decay: float = 0.99999  # tf1_ema form: min(decay, (1+t)/(10+t)); 0 disables EMA
    sam_rho: float = 0.0  # SAM radius (0: off); needs run.zero_stage=0 (pipeline/train/sam.py)
    # softmax: cross-entropy on one label per image. sigmoid: binary cross-entropy per class on
    # multi-hot targets from every label of a sample (multi-label corpora, JFT-like); held-out
    # metrics are then top-1/top-5 against any true label and mAP (docs/data-loading.md, "Multi-label corpora").
    objective: Literal["softmax", "sigmoid"] = "softmax"


@dataclass
class ScheduleConfig:
    global_batch: int = 4096  # images per optimizer step = micro_batch x accumulation x num_workers
    micro_batch: int = 64  # images per worker per forward/backward
    epochs: float = 0.0  # training length in epochs (exactly one of epochs, samples, train_flops)
    samples: int = 0  # training length in images
    train_flops: float = 0.0  # training length in FLOPs (sweeps)
    eval_every: int = 0  # steps; 0: only at the end
    ckpt_every: int = 0  # steps; 0: only at the end
    keep_checkpoints: int = 2  # newest checkpoints kept
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    log_every: int = 1  # steps between step lines and TensorBoard points


@dataclass
class RunConfig:
    name: str = "nfnet"  # run directory {storage}/{name}; the same name continues the run
    mode: str = "train"  # "train", or "eval": evaluate model.init_from on data.eval_split, write results.json
    storage: str = "runs"  # local path or s3://bucket/prefix
    num_workers: int = 2  # training workers (one per GPU)
    use_gpu: bool = False  # one GPU per worker
    cpus_per_worker: int = 1  # CPUs reserved per worker (its DataLoader processes run on them)
    # ZeRO-3 partitions the weights themselves, which the EMA copy and the checkpoint gather do not handle.
    zero_stage: Literal[0, 1, 2] = 0  # DeepSpeed ZeRO stage: 1 partitions momentum, 2 also gradients
    # bf16: fp32 weights, gradients, all-reduce, AGC, SGD and EMA; forward/backward math in bf16 autocast
    # (docs/precision.md). auto: bf16 on GPU, fp32 on CPU. No fp16: it needs loss scaling, NFNets train in bf16.
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU (docs/precision.md)
    compile: bool = False  # torch.compile the model through DeepSpeed's engine.compile()
    channels_last: bool = False  # NHWC input batches (timm measured NFNet-F0 2.4x slower channels-last on an RTX 3090)
    seed: int = 0  # seeds sample order, augmentation, stochastic depth, init
    # Worker-group restarts from the latest checkpoint before fit() gives up. A multi-day run on 64
    # GPUs sees several node losses, each costing at most ckpt_every steps; Ray Train counts per
    # fit() call, so a re-submission starts a fresh count. Sweeps set 0 (they retry points themselves).
    max_failures: int = 10
    placement: str = "PACK"  # Ray placement of the workers: PACK (fill nodes), SPREAD (one per node where possible), STRICT_*
    # Elastic training (docs/multi-node.md). With min_workers > 0 the run starts as soon as min_workers
    # can be placed, grows up to num_workers when workers can be placed, and continues on the survivors
    # after losing workers. It only uses the sizes that divide the V = global_batch / micro_batch
    # micro-batches of a step (TrainConfig.world_sizes): accumulation = V / workers keeps the samples
    # of every optimizer step, the global batch and the lr schedule unchanged at any size.
    min_workers: int = 0  # 0: not elastic, exactly num_workers; else the fewest workers the run goes on with
    # Elastic: how often (seconds) Ray's controller looks for more placeable workers. It grows only right
    # after a checkpoint is registered, so a resize discards at most one poll of steps.
    resize_check_s: float = 60.0
    export: bool = True  # write {storage}/{name}/export at the end (the folder fine-tuning reads)
    device_peak_flops: float = 0.0  # per worker; for MFU (0: known GPUs only)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    run: RunConfig = field(default_factory=RunConfig)

    # ---- derived quantities -----------------------------------------------------------------
    @property
    def accum_steps(self) -> int:
        per_step = self.schedule.micro_batch * self.run.num_workers
        if self.schedule.global_batch % per_step:
            raise ValueError(
                f"global_batch {self.schedule.global_batch} is not divisible by micro_batch {self.schedule.micro_batch} "
                f"x num_workers {self.run.num_workers} = {per_step}; choose values with global = micro x accum x workers"
            )
        return self.schedule.global_batch // per_step

    @property
    def slots(self) -> int:
        """V: micro-batches in one optimizer step across all workers (the loader's slots)."""
        return self.schedule.global_batch // self.schedule.micro_batch

    @property
    def elastic(self) -> bool:
        return 0 < self.run.min_workers < self.run.num_workers

    def world_sizes(self) -> list[int]:
        """The worker counts this run can train at: num_workers alone, or (elastic) the divisors of V in
        [min_workers, num_workers]. At each the accumulation V / workers is whole, so every step sums
        the same V micro-batches."""
        lo = self.run.min_workers if self.elastic else self.run.num_workers
        return [w for w in range(lo, self.run.num_workers + 1) if self.slots % w == 0]

    def accum_for(self, world: int) -> int:
        """Micro-batches each worker accumulates per step at `world` workers: V / world."""
        if world not in self.world_sizes():
            raise ValueError(f"this run cannot train on {world} workers: global_batch {self.schedule.global_batch} / "
                             f"micro_batch {self.schedule.micro_batch} = {self.slots} micro-batches per step, and the sizes "
                             f"it can use are {_sizes(self.world_sizes())}")  # fmt: skip
        return self.slots // world

    @property
    def peak_lr(self) -> float:
        return self.optim.lr_base * self.schedule.global_batch / 256

    def total_steps(self, train_samples: int, flops_per_image: float) -> int:
        """Steps from whichever of epochs / samples / train_flops is set (exactly one)."""
        s = self.schedule
        set_ = [n for n, v in (("epochs", s.epochs), ("samples", s.samples), ("train_flops", s.train_flops)) if v]
        if len(set_) != 1:
            raise ValueError(f"set exactly one of schedule.epochs / samples / train_flops (got {set_ or 'none'})")
        if s.epochs:
            samples = s.epochs * train_samples
        elif s.samples:
            samples = s.samples
        else:
            samples = s.train_flops / flops_per_image
        return max(1, math.ceil(samples / s.global_batch))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return _build(cls, d)


# ---- resume / re-submission: which changes keep it the same run ----------------------------------
# A run directory with checkpoints is continued by any submission with the same run.storage and
# run.name. These keys may differ from the config that started it: they change how or where the run
# is executed or logged, not the weights it computes (up to the order of fp32 sums). Every other key
# defines the run (model, data, augmentation, optimizer, schedule, batches, seed, precision, mode) and
# a change is refused by check_resume_config.
RESUME_SAFE_KEYS = frozenset({
    # Logging, evaluation and checkpoint cadence. Evaluation only reads the weights, and stochastic
    # depth/dropout are re-seeded per (seed, step, slot) before every micro-batch, so evaluating more
    # or less often leaves training untouched; a resumed run recomputes the same steps bit for bit.
    "schedule.log_every", "schedule.eval_every", "schedule.ckpt_every", "schedule.keep_checkpoints",
    # When to give up on consecutive non-finite losses (those steps are skipped either way).
    "schedule.max_bad_steps",
    # Resources, placement and retries.
    "run.cpus_per_worker", "run.max_failures", "run.placement",
    # The elastic range and how often it is checked: which world sizes run, not what they compute.
    "run.min_workers", "run.resize_check_s",
    # Whether the export folder is written at the end; the MFU denominator (reporting only).
    "run.export", "run.device_peak_flops",
    # World size and ZeRO stage: checkpoints hold full fp32 weights, momentum and EMA gathered the
    # same way at ZeRO 0/1/2 and restore at any world size; with global and micro batch unchanged
    # the loader's slots (world x accum) are the same, and batches, augmentation and stochastic depth
    # are seeded per (seed, step, slot), whichever rank owns a slot. (global_batch and micro_batch
    # themselves are not here: they re-cut the epoch and change the lr.)
    "run.num_workers", "run.zero_stage",
    # GPU or CPU: the same math on other kernels. With run.precision=auto it also switches bf16 on
    # or off, so resume_changes refuses it then (see _refused).
    "run.use_gpu",
    # torch.compile and NHWC batches: the same operations, other kernels and memory layout.
    "run.compile", "run.channels_last",
    # Where the run directory is: the check only runs when config.json was found at the current
    # {storage}/{name}, so a difference means the run was moved or copied, not changed.
    "run.storage", "run.name",
    # Where the same bytes come from (endpoint; credentials are never in the config).
    "data.s3_endpoint",
    # Input pipeline speed. DataLoader worker w of W produces a rank's micro-batches j with
    # j % W == w and torch yields them in order, and each batch's samples and augmentation are a
    # function of (seed, epoch, slot, batch) (pipeline/data/loader.py), so the worker count does not
    # change the batches; decoding draws no random numbers, so decode threads do not either.
    "data.workers", "data.prefetch", "data.decode_threads",
    # How long an S3 outage is waited out; whether it substitutes samples instead of failing the step
    # (only during an outage, and counted).
    "data.s3_retry_s", "data.substitute_on_s3_outage",
    # Held-out evaluation only: what it is evaluated on and at which resolution; training never reads them.
    "data.eval_split", "aug.eval_res", "aug.eval_crop", "aug.eval_pad",
})  # fmt: skip

_ABSENT = object()  # a key one side does not have and the current TrainConfig has no default for


def _flat(d: dict) -> dict:
    """{section: {field: value}} -> {"section.field": value}. Only the sections are opened: a
    dict-valued field (model.overrides) is compared as one value."""
    out = {}
    for section, fields in d.items():
        if isinstance(fields, dict):
            out.update({f"{section}.{k}": v for k, v in fields.items()})
        else:
            out[section] = fields
    return out


def _changes(saved: dict, current: dict) -> dict[str, tuple]:
    """Dotted key -> (old, new) for every differing value. A key missing on one side takes the current
    dataclass default (a config saved before a field existed ran with what is now its default)."""
    default = _flat(TrainConfig().to_dict())
    # Both as JSON would store them (tuples -> lists), so a saved config.json compares to a live dict.
    old, new = _flat(json.loads(json.dumps(saved))), _flat(json.loads(json.dumps(current)))
    out = {}
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key, default.get(key, _ABSENT)), new.get(key, default.get(key, _ABSENT))
        if a is _ABSENT or b is _ABSENT or a != b:
            out[key] = (a, b)
    return out


def _refused(key: str, saved: dict, current: dict) -> bool:
    if key not in RESUME_SAFE_KEYS:
        return True
    if key == "run.use_gpu":  # precision=auto is bf16 on GPU and fp32 on CPU: moving changes the arithmetic
        default = TrainConfig().run.precision
        return "auto" in (d.get("run", {}).get("precision", default) for d in (saved, current))
    return False


def resume_changes(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(refused, allowed): sorted dotted keys whose values differ between the config a run was started
    with and the one continuing it (both TrainConfig.to_dict() dicts). Allowed keys are those of
    RESUME_SAFE_KEYS (run.use_gpu only with an explicit run.precision); the rest define the run."""
    changed = _changes(saved, current)
    refused = [k for k in changed if _refused(k, saved, current)]
    return refused, [k for k in changed if k not in refused]


def _show(v) -> str:
    if v is _ABSENT:
        return "(absent)"
    text = json.dumps(v, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


def format_changes(saved: dict, current: dict, keys: list[str], limit: int = 6) -> str:
    """`key old -> new` for at most `limit` of `keys`, then `(+N more)`; one line."""
    changed = _changes(saved, current)
    shown = [f"{k} {_show(changed[k][0])} -> {_show(changed[k][1])}" for k in keys[:limit] if k in changed]
    return ", ".join(shown) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def check_resume_config(saved: dict, current: dict, where: str) -> list[str]:
    """Refuse to continue the run at `where` (its run directory) under a config that computes something
    else: a ValueError in one line naming each refused key with its old and new value. Returns the
    allowed changed keys, for the caller to log."""
    refused, allowed = resume_changes(saved, current)
    if refused:
        name = current.get("run", {}).get("name", saved.get("run", {}).get("name", ""))
        raise ValueError(f"run {name!r} at {where} was started with a different config: "
                         f"{format_changes(saved, current, refused)}; these define the run. "
                         "Use a new run.name (or restore the old values).")  # fmt: skip
    return allowed


_SECTIONS = {"ModelConfig": "model", "DataConfig": "data", "AugmentConfig": "aug", "OptimConfig": "optim",
             "ScheduleConfig": "schedule", "RunConfig": "run"}


def _check_choice(key: str, value, typ):
    """A Literal-typed field (an enum of allowed values): the value, or an error naming key and choices."""
    choices = typing.get_args(typ)
    if value in choices and type(value) is type(choices[choices.index(value)]):
        return value
    raise ValueError(f"{key} must be one of {list(choices)}, got {value!r}")


def _build(cls, d: dict):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        t = hints[f.name]
        v = d[f.name]
        if typing.get_origin(t) is Literal:
            v = _check_choice(f"{_SECTIONS.get(cls.__name__, cls.__name__)}.{f.name}", v, t)
        kwargs[f.name] = _build(t, v) if dataclasses.is_dataclass(t) and isinstance(v, dict) else v
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        import difflib

        section = _SECTIONS.get(cls.__name__, cls.__name__)
        names = [f.name for f in dataclasses.fields(cls)]
        hints = [m for u in sorted(unknown) for m in difflib.get_close_matches(u, names, n=1)]
        raise ValueError(f"unknown {section} fields {sorted(unknown)}" + (f"; did you mean {', '.join(hints)}?" if hints else ""))
    return cls(**kwargs)


def _parse_value(text: str, typ):
    if typing.get_origin(typ) is Literal:  # an enum: the choice whose text matches; else the value, for the error
        match = [c for c in typing.get_args(typ) if str(c) == text]
        return match[0] if match else (int(text) if text.lstrip("-").isdigit() else text)
    if typ is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {text!r}")
    if typ in (int, float):
        return typ(float(text)) if typ is int and "e" in text.lower() else typ(text)
    if typ is str:
        return text
    return json.loads(text)  # dict / list fields take JSON


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """`section.field=value` strings, typed by the dataclass field; unknown keys are errors."""
    d = cfg.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if len(parts) != 2 or parts[0] not in d or not isinstance(d[parts[0]], dict) or parts[1] not in d[parts[0]]:
            raise ValueError(f"unknown config key {key!r}{_did_you_mean(key, d)}")
        section, leaf = parts
        typ = typing.get_type_hints(typing.get_type_hints(TrainConfig)[section])[leaf]
        try:
            d[section][leaf] = _parse_value(value.strip(), typ)
        except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"{key}={value}: expected {_type_name(typ)} ({e})") from None
    return TrainConfig.from_dict(d)


def _did_you_mean(key: str, d: dict) -> str:
    """'; did you mean x.y?' from every section.field (a misspelt field, or a field under another
    section: `optim.global_batch` -> schedule.global_batch), else where the list is."""
    import difflib

    keys = [f"{s}.{f}" for s, fields in d.items() if isinstance(fields, dict) for f in fields]
    leaf = key.rsplit(".", 1)[-1]
    near = difflib.get_close_matches(key, keys, n=3, cutoff=0.6) or [k for k in keys if k.endswith(f".{leaf}")]
    near = near or [k for k in keys if difflib.get_close_matches(leaf, [k.split(".")[1]], cutoff=0.75)]
    return f"; did you mean {' or '.join(near[:3])}?" if near else "; `--help` lists every key"


def _type_name(typ) -> str:
    if typing.get_origin(typ) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(typ)))
    return {int: "an integer", float: "a number", bool: "true or false", str: "text"}.get(typ, "JSON")


# ---- presets: data, not code -------------------------------------------------------------------
PRESETS: dict[str, dict] = {
    # The paper-scale recipe (spec sections 5-6): F7 at 480 px train / 608 px eval, batch 4096,
    # lr 0.1 x 4096/256 = 1.6, 5 warmup epochs then cosine, 360 epochs, bf16 on GPUs.
    "f7": {
        "model": {"name": "nfnet_f7"},
        "data": {"root": "s3://YOUR-BUCKET/imagenet-wds", "workers": 8, "shuffle_window": 8192},
        "aug": {"train_res": 480, "eval_res": 608, "randaug_layers": 4, "randaug_magnitude": 15},
        "schedule": {"global_batch": 4096, "micro_batch": 16, "epochs": 360, "eval_every": 2000, "ckpt_every": 1000},
        "run": {"name": "nfnet-f7", "storage": "s3://YOUR-BUCKET/runs", "num_workers": 64, "use_gpu": True,
                "cpus_per_worker": 10, "zero_stage": 1},
    },
    # The embedded default: a tiny member of the family on the sample corpus, 2 CPU workers,
    # still a large global batch (1024 = 128 x 4 accumulation x 2 workers).
    "demo": {
        "model": {"name": "nfnet_pico"},
        "data": {"root": "data/fashion-mnist", "workers": 1, "shuffle_window": 1024},
        # 28 px source images: crops of >= 25% area (8% would be 8x8 pixels) and a +4 eval pad.
        "aug": {"train_res": 32, "eval_res": 32, "eval_pad": 4, "min_area": 0.25, "randaug_layers": 2, "randaug_magnitude": 5},
        "optim": {"lr_base": 0.1, "warmup_epochs": 0.5},
        "schedule": {"global_batch": 1024, "micro_batch": 128, "epochs": 2, "eval_every": 50, "ckpt_every": 25, "log_every": 5},
        "run": {"name": "demo", "storage": "runs", "num_workers": 2, "use_gpu": False},
    },
    # ImageNet fine-tuning of a pretraining export (train/<wnid>, val/<wnid> or flat val + labels
    # CSV, packed into {storage}/{name}/data first). The scaling paper fine-tunes with SAM,
    # stochastic depth and dropout (spec 6) but its resolution, epochs and lr are not retrievable:
    # 384 px train / 448 px eval, 10 epochs, peak lr 0.1 at batch 512 are our defaults, not the paper's.
    "finetune": {
        "model": {"name": "nfnet_f7", "init_from": "runs/nfnet-f7/export", "reset_head": True},
        "data": {"root": "", "source": "imagenet", "train_split": "train", "eval_split": "val", "workers": 8, "shuffle_window": 8192},
        "aug": {"train_res": 384, "eval_res": 448, "randaug_layers": 4, "randaug_magnitude": 15},
        "optim": {"lr_base": 0.05, "warmup_epochs": 1.0, "weight_decay": 1e-5, "ema_decay": 0.9999, "sam_rho": 0.05},
        "schedule": {"global_batch": 512, "micro_batch": 16, "epochs": 10, "eval_every": 2500, "ckpt_every": 1000},
        "run": {"name": "nfnet-f7-imagenet", "storage": "runs", "num_workers": 32, "use_gpu": True, "cpus_per_worker": 10},
    },
    # The demo's second stage: fine-tune the demo export at a higher resolution on a 4-class
    # clothing-group task built from the sample package's test images (launch/demo.py writes it
    # in class-folder layout), with SAM; 256 = 64 x 2 accumulation x 2 workers.
    "demo_finetune": {
        "model": {"name": "nfnet_pico", "init_from": "runs/demo/export", "reset_head": True},
        "data": {"root": "", "source": "data/fashion-mnist-groups", "train_split": "train", "eval_split": "val",
                 "workers": 1, "shuffle_window": 512},
        "aug": {"train_res": 40, "eval_res": 40, "eval_pad": 4, "min_area": 0.25, "randaug_layers": 2, "randaug_magnitude": 5},
        "optim": {"lr_base": 0.2, "warmup_epochs": 0.25, "ema_decay": 0.99, "sam_rho": 0.05},
        "schedule": {"global_batch": 256, "micro_batch": 64, "epochs": 3, "eval_every": 0, "ckpt_every": 20, "log_every": 5},
        "run": {"name": "demo-finetune", "storage": "runs", "num_workers": 2, "use_gpu": False},
    },
}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "overrides" else v
    return out


def resolve(preset: str, overrides: list[str] | None = None) -> TrainConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {sorted(PRESETS)}")
    cfg = TrainConfig.from_dict(_merge(TrainConfig().to_dict(), PRESETS[preset]))
    cfg = apply_overrides(cfg, overrides or [])
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Clear errors for combinations that cannot run, before any worker starts."""
    cfg.accum_steps  # noqa: B018 - the batch identity, with its own message
    check_elastic(cfg)
    if cfg.run.mode not in ("train", "eval"):
        raise ValueError(f"run.mode must be 'train' or 'eval', got {cfg.run.mode!r}")
    if cfg.run.mode == "eval" and not cfg.model.init_from:
        raise ValueError("run.mode=eval evaluates model.init_from: set it to an export folder, checkpoint or weights file")
    if cfg.run.placement not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
        raise ValueError(f"run.placement must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD, got {cfg.run.placement!r}")
    if cfg.model.init_weights not in ("ema", "raw"):
        raise ValueError(f"model.init_weights must be 'ema' or 'raw', got {cfg.model.init_weights!r}")
    if cfg.optim.sam_rho > 0 and cfg.run.zero_stage != 0:
        raise ValueError(f"optim.sam_rho > 0 (SAM) needs run.zero_stage=0, got {cfg.run.zero_stage}: its ascent "
                         "step reads full local gradients, which ZeRO-1/2 partition")  # fmt: skip
    check_ranges(cfg)
    check_choices(cfg)


def _sizes(sizes: list[int]) -> str:
    return ", ".join(map(str, sizes[:-1])) + (" or " if len(sizes) > 1 else "") + str(sizes[-1])


def check_elastic(cfg: TrainConfig) -> None:
    """run.min_workers: at most num_workers, and a size the run can train at (a divisor of V), so that
    a run that has lost workers never waits for a size it could not use. The message lists the sizes."""
    r = cfg.run
    if r.min_workers < 0 or r.min_workers > r.num_workers:
        raise ValueError(f"run.min_workers must be in [0, run.num_workers={r.num_workers}] (0: not elastic), got {r.min_workers}")
    if r.min_workers and cfg.slots % r.min_workers:
        ok = [w for w in range(1, r.num_workers + 1) if cfg.slots % w == 0]
        raise ValueError(f"run.min_workers={r.min_workers} does not divide the {cfg.slots} micro-batches of a step "
                         f"(global_batch {cfg.schedule.global_batch} / micro_batch {cfg.schedule.micro_batch}): an elastic "
                         f"run with run.num_workers={r.num_workers} can use {_sizes(ok)} workers")  # fmt: skip


def check_objective(cfg: TrainConfig, manifest: dict, where: str) -> None:
    """Refuse a multi-label pack (manifest "multi_label": true, written by data_prep when samples carry
    label lists) under optim.objective=softmax: softmax sees one label per image, the first, and would
    silently drop the others. `where` names the manifest in the one-line message. A single-label pack
    is fine under either objective (sigmoid trains it on one-hot targets)."""
    if manifest.get("multi_label") and cfg.optim.objective == "softmax":
        verb = "evaluate against" if cfg.run.mode == "eval" else "train on"
        raise ValueError(f"{where} is multi-label but optim.objective is 'softmax', which would {verb} each sample's "
                         "first label only: set optim.objective=sigmoid")  # fmt: skip


# ---- ranges and exclusive choices: the domains the math has (a negative learning rate or a smoothing
# of 1 trains nothing useful, and used to be found late, in the workers, or not at all) ----------------
# (dotted key, predicate, what is valid). Probabilities and decays live in [0, 1) or (0, 1].
RANGES: tuple[tuple[str, object, str], ...] = (
    ("model.width_mult", lambda v: v > 0, "> 0"),
    ("model.depth_mult", lambda v: v > 0, "> 0"),
    ("data.workers", lambda v: v >= 0, ">= 0"),
    ("data.decode_threads", lambda v: v >= 0, ">= 0"),
    ("data.prefetch", lambda v: v >= 1, ">= 1"),
    ("data.shuffle_window", lambda v: v >= 1, ">= 1"),
    ("data.s3_retry_s", lambda v: v >= 0, ">= 0 seconds"),
    ("data.pack_resize", lambda v: v >= 0, ">= 0 (0: keep)"),
    ("aug.train_res", lambda v: v >= 8, ">= 8 pixels"),
    ("aug.eval_res", lambda v: v >= 8, ">= 8 pixels"),
    ("aug.eval_pad", lambda v: v >= 0, ">= 0 pixels"),
    ("aug.min_area", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("aug.randaug_layers", lambda v: v >= 0, ">= 0 (0: off)"),
    ("aug.randaug_magnitude", lambda v: v >= 0, ">= 0 (DM's 0-10 scale; above 10 is capped, pipeline/data/augment.py)"),
    ("aug.mixup_alpha", lambda v: v >= 0, ">= 0 (0: off)"),
    ("aug.cutmix_alpha", lambda v: v >= 0, ">= 0 (0: off)"),
    ("aug.label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.lr_base", lambda v: v > 0, "> 0 (per 256 images)"),
    ("optim.momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.weight_decay", lambda v: v >= 0, ">= 0"),
    ("optim.warmup_epochs", lambda v: v >= 0, ">= 0"),
    ("optim.agc_clip", lambda v: v >= 0, ">= 0 (0: off)"),
    ("optim.agc_eps", lambda v: v > 0, "> 0"),
    ("optim.ema_decay", lambda v: 0 <= v < 1, "in [0, 1) (0: off)"),
    ("optim.sam_rho", lambda v: v >= 0, ">= 0 (0: off)"),
    ("schedule.global_batch", lambda v: v >= 1, ">= 1"),
    ("schedule.micro_batch", lambda v: v >= 1, ">= 1"),
    ("schedule.epochs", lambda v: v >= 0, ">= 0"),
    ("schedule.samples", lambda v: v >= 0, ">= 0"),
    ("schedule.train_flops", lambda v: v >= 0, ">= 0"),
    ("schedule.eval_every", lambda v: v >= 0, ">= 0 steps (0: at the end)"),
    ("schedule.ckpt_every", lambda v: v >= 0, ">= 0 steps (0: at the end)"),
    ("schedule.keep_checkpoints", lambda v: v >= 1, ">= 1"),
    ("schedule.max_bad_steps", lambda v: v >= 1, ">= 1"),
    ("schedule.log_every", lambda v: v >= 1, ">= 1"),
    ("run.num_workers", lambda v: v >= 1, ">= 1"),
    ("run.cpus_per_worker", lambda v: v > 0, "> 0"),
    ("run.max_failures", lambda v: v >= -1, ">= -1 (-1: unlimited)"),
    ("run.resize_check_s", lambda v: v >= 0, ">= 0 seconds"),
    ("run.device_peak_flops", lambda v: v >= 0, ">= 0 (0: known GPUs only)"),
)

PLACEHOLDER = "YOUR-BUCKET"  # the f7 preset's (and infra/kuberay's) stand-in for the user's bucket


def check_ranges(cfg) -> None:
    for key, ok, valid in RANGES:
        section, name = key.split(".")
        v = getattr(getattr(cfg, section), name)
        if isinstance(v, float) and not math.isfinite(v) or not ok(v):
            raise ValueError(f"{key} must be {valid}, got {v!r}")


def check_choices(cfg) -> None:
    s = cfg.schedule
    lengths = [f"schedule.{n}={v:g}" for n, v in (("epochs", s.epochs), ("samples", s.samples), ("train_flops", s.train_flops)) if v]
    if len(lengths) > 1:
        raise ValueError(f"set exactly one training length, got {' and '.join(lengths)}: schedule.epochs, samples and "
                         "train_flops exclude each other (the others 0)")  # fmt: skip
    if not lengths and cfg.run.mode == "train":
        raise ValueError("no training length: set exactly one of schedule.epochs, schedule.samples or schedule.train_flops")
    if cfg.aug.eval_crop not in ("squash", "center"):
        raise ValueError(f"aug.eval_crop must be 'squash' or 'center', got {cfg.aug.eval_crop!r}")


def check_placeholders(cfg) -> None:
    """The f7 preset ships with s3://YOUR-BUCKET paths: run only once they name a real bucket. Not part
    of validate(): --print-config shows the preset as it is, placeholder included."""
    for key in ("data.root", "run.storage", "model.init_from", "data.source"):
        section, name = key.split(".")
        v = getattr(getattr(cfg, section), name)
        if PLACEHOLDER in str(v):
            raise ValueError(f"{key}={v} is the preset's placeholder bucket: set --set {key}=s3://<your bucket>/... "
                             "(or a local path)")  # fmt: skip
