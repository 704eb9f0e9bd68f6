"""A scaling sweep's SPEC (YAML or JSON), typed like every other config, and its grid of points.

    name: f-series            # the sweep's folder: {storage}/{name}/{runs,finetune,results.csv,report}
    preset: demo              # the pretraining preset every point starts from
    set: [data.workers=1]     # overrides for every point (pipeline.config keys)
    models: [nfnet_pico, {name: nfnet_pico, width_mult: 1.5}]
    budgets: [{epochs: 0.25, lr: [0.1, 0.2]}, {train_flops: 1e15}]
    lr_grid: [0.1, 0.2]       # optim.lr_base values for budgets without their own `lr`
    seeds: [0]
    finetune: {preset: demo_finetune, select: best_lr}

A point is (model, budget, lr, seed): one pretraining run of the same trainer, named
`{model}_{budget}_lr{lr}_s{seed}`, in {storage}/{name}/runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field

from pipeline.config import TrainConfig, resolve

BUDGET_KINDS = ("epochs", "samples", "train_flops")


@dataclass
class ModelSpec:
    name: str
    width_mult: float = 1.0
    depth_mult: float = 1.0
    label: str = ""

    def __post_init__(self):
        if not self.label:
            self.label = self.name + (f"-w{self.width_mult:g}" if self.width_mult != 1 else "") + (
                f"-d{self.depth_mult:g}" if self.depth_mult != 1 else "")  # fmt: skip


@dataclass
class BudgetSpec:
    epochs: float = 0.0
    samples: float = 0.0
    train_flops: float = 0.0
    lr: list = field(default_factory=list)  # optim.lr_base grid for this budget; [] = the sweep's lr_grid
    label: str = ""

    def __post_init__(self):
        for k in BUDGET_KINDS:  # YAML reads 1e15 (no dot) as a string
            setattr(self, k, float(getattr(self, k)))
        self.lr = [float(x) for x in (self.lr if isinstance(self.lr, list) else [self.lr])]
        set_ = [k for k in BUDGET_KINDS if getattr(self, k)]
        if len(set_) != 1:
            raise ValueError(f"a budget sets exactly one of {BUDGET_KINDS}, got {set_ or 'none'}")
        if not self.label:
            v = self.value
            self.label = {"epochs": f"{v:g}ep", "samples": f"{v:g}img", "train_flops": f"{v:.3g}flops"}[self.kind]

    @property
    def kind(self) -> str:
        return next(k for k in BUDGET_KINDS if getattr(self, k))

    @property
    def value(self) -> float:
        return float(getattr(self, self.kind))


@dataclass
class FinetuneSpec:
    preset: str = ""  # a fine-tuning preset (e.g. finetune, demo_finetune); "" = no fine-tuning
    select: str = "best_lr"  # best_lr: the best-lr run of every (model, budget); frontier: those on the frontier; all
    set: list = field(default_factory=list)


@dataclass
class SweepSpec:
    name: str
    models: list
    budgets: list
    preset: str = "demo"
    set: list = field(default_factory=list)
    storage: str = "runs"
    lr_grid: list = field(default_factory=lambda: [0.1])
    seeds: list = field(default_factory=lambda: [0])
    parallel: int = 1  # points trained side by side (each takes run.num_workers x cpus_per_worker CPUs / GPUs)
    max_retries: int = 1  # a failed point is re-run (resuming from its checkpoint) up to this many times
    metric: str = "raw"  # held-out loss the fits use: raw or ema weights
    diverged_factor: float = 1.5  # held-out loss above factor x ln(classes) (chance level) counts as diverged
    bootstrap: int = 500
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)

    def __post_init__(self):
        self.models = [ModelSpec(m) if isinstance(m, str) else m for m in self.models]
        for m in self.models:
            m.width_mult, m.depth_mult = float(m.width_mult), float(m.depth_mult)
        self.lr_grid = [float(x) for x in (self.lr_grid if isinstance(self.lr_grid, list) else [self.lr_grid])]
        self.seeds = [int(x) for x in (self.seeds if isinstance(self.seeds, list) else [self.seeds])]
        self.parallel, self.max_retries, self.bootstrap = int(self.parallel), int(self.max_retries), int(float(self.bootstrap))
        self.diverged_factor = float(self.diverged_factor)
        if not self.seeds or any(not (b.lr or self.lr_grid) for b in self.budgets):
            raise ValueError("seeds and every budget's lr grid (or lr_grid) must be non-empty")
        if not self.models or not self.budgets:
            raise ValueError("a sweep needs at least one model and one budget")
        if self.metric not in ("raw", "ema"):
            raise ValueError(f"metric must be raw or ema, got {self.metric!r}")
        if self.finetune.select not in ("best_lr", "frontier", "all"):
            raise ValueError(f"finetune.select must be best_lr, frontier or all, got {self.finetune.select!r}")
        if self.parallel < 1:
            raise ValueError("parallel must be >= 1")
        labels = [m.label for m in self.models]
        if len(set(labels)) != len(labels):
            raise ValueError(f"model labels must be unique, got {labels}")
        names = [p.name for p in points(self)]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"points with the same name (repeated budgets or lrs, or budget labels that round alike): {dup}; "
                             "remove the repeats or give the budgets distinct `label`s")  # fmt: skip

    @property
    def root(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.name}"

    @property
    def table(self) -> str:
        return f"{self.root}/results.csv"


@dataclass(frozen=True)
class Point:
    model: ModelSpec
    budget: BudgetSpec
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.model.label}_{self.budget.label}_lr{self.lr:g}_s{self.seed}"


def _typed(cls, d: dict, where: str):
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a mapping, got {d!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; {cls.__name__} has {sorted(names)}")
    try:
        return cls(**d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def spec_from_dict(d: dict, where: str = "spec") -> SweepSpec:
    d = dict(d)
    d["models"] = [m if isinstance(m, str) else _typed(ModelSpec, m, f"{where}: models[{i}]") for i, m in enumerate(d.get("models", []))]
    d["budgets"] = [_typed(BudgetSpec, b, f"{where}: budgets[{i}]") for i, b in enumerate(d.get("budgets", []))]
    if "finetune" in d:
        d["finetune"] = _typed(FinetuneSpec, d["finetune"] or {}, f"{where}: finetune")
    return _typed(SweepSpec, d, where)


def load_spec(path: str, overrides: list[str] | None = None) -> SweepSpec:
    """A YAML/JSON file; `overrides` are top-level `key=value` (value parsed as YAML: name=x, parallel=2)."""
    import yaml

    with open(path) as f:
        d = yaml.safe_load(f)
    for item in overrides or []:
        k, sep, v = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        d[k.strip()] = yaml.safe_load(v)
    return spec_from_dict(d, path)


def points(spec: SweepSpec) -> list[Point]:
    """Every (model, budget, lr, seed), small budgets first so early fits and failures show up soon."""
    order = sorted(spec.budgets, key=lambda b: (BUDGET_KINDS.index(b.kind), b.value))
    return [Point(m, b, float(lr), int(s)) for b in order for m in spec.models for lr in (b.lr or spec.lr_grid) for s in spec.seeds]


def _abs(path: str) -> str:
    return path if path.startswith("s3://") else os.path.abspath(path)


def point_config(spec: SweepSpec, p: Point) -> TrainConfig:
    sets = list(spec.set) + [
        f"model.name={p.model.name}", f"model.width_mult={p.model.width_mult}", f"model.depth_mult={p.model.depth_mult}",
        "schedule.epochs=0", "schedule.samples=0", "schedule.train_flops=0", f"schedule.{p.budget.kind}={int(p.budget.value) if p.budget.kind == 'samples' else p.budget.value}",
        f"optim.lr_base={p.lr}", f"run.seed={p.seed}", f"run.storage={_abs(spec.root)}/runs", f"run.name={p.name}",
        "run.max_failures=0",  # the sweep retries a failed point itself (and records diverged ones)
    ]  # fmt: skip
    cfg = resolve(spec.preset, sets)
    if not cfg.data.root.startswith("s3://"):
        cfg.data.root = os.path.abspath(cfg.data.root)
    return cfg


def finetune_config(spec: SweepSpec, p: Point, run_dir: str) -> TrainConfig:
    sets = list(spec.finetune.set) + [
        f"model.name={p.model.name}", f"model.width_mult={p.model.width_mult}", f"model.depth_mult={p.model.depth_mult}",
        f"model.init_from={run_dir}/export", f"run.storage={_abs(spec.root)}/finetune", f"run.name={p.name}",
        f"run.seed={p.seed}", "run.max_failures=0",
    ]  # fmt: skip
    cfg = resolve(spec.finetune.preset, sets)
    if cfg.data.source and not cfg.data.root:  # one packed copy for all of the sweep's fine-tuning runs
        cfg.data.root = f"{_abs(spec.root)}/finetune-data"
    for sec, key in (("data", "root"), ("data", "source")):
        v = getattr(getattr(cfg, sec), key)
        if v and not v.startswith("s3://") and os.path.exists(v):
            setattr(getattr(cfg, sec), key, os.path.abspath(v))
    return cfg


def config_hash(cfg: TrainConfig) -> str:
    """What makes a run this run: its whole config (storage and name included)."""
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
