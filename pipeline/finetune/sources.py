"""Where a run's initial weights come from: scratch, a pretraining export, a Ray Train checkpoint,
or a timm / converted weights file, local or s3://.

Nothing is unpickled: exports and checkpoints are safetensors + JSON; a timm .pth file is read
with torch.load(weights_only=True). Every mismatch (missing or unexpected tensors, wrong shapes,
class lists that differ) is an error that names the tensors or classes.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import tempfile
from dataclasses import dataclass

import torch

from data_prep.storage import Store
from models import NFNet, create_model
from models.variants import NFNetConfig

from pipeline.config import ModelConfig

log = logging.getLogger(__name__)
WEIGHT_FILES = (".pth", ".pt", ".bin", ".safetensors")


class InitError(ValueError):
    """model.init_from cannot be used: missing, not ours, or not this architecture."""


@dataclass
class InitSource:
    kind: str  # export | checkpoint | timm | weights
    url: str
    arch: NFNetConfig
    raw: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    classes: list[str] | None  # None: the file does not say (timm weights)
    summary: dict | None  # an export's pretraining summary
    name: str = ""  # the model name the source was trained as, when it says

    @property
    def num_classes(self) -> int:
        w = self.raw.get("head.fc.weight")
        return int(w.shape[0]) if w is not None else 0


def _arch(d: dict) -> NFNetConfig:
    return NFNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _split(url: str) -> tuple[Store, str]:
    parent, _, leaf = url.rstrip("/").rpartition("/")
    return Store(parent or "."), leaf


def _read(store: Store, name: str, url: str) -> bytes:
    try:
        return store.read_bytes(name)
    except (FileNotFoundError, OSError) as e:
        raise InitError(f"{url}: cannot read {name} ({type(e).__name__}: {e})") from e


def _safetensors(data: bytes) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "w.safetensors")
        with open(path, "wb") as f:
            f.write(data)
        with safe_open(path, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _export_dir(url: str) -> tuple[str, Store]:
    """A run directory stands for its export/ folder; anything else for itself."""
    store = Store(url)
    if not store.exists("model.safetensors") and store.exists("export/model.safetensors"):
        url = f"{url.rstrip('/')}/export"
        store = Store(url)
    return url, store


def load_source(url: str, mc: ModelConfig) -> InitSource:
    """Read model.init_from in whichever of the four forms it has."""
    if url.endswith((".pth", ".pt", ".bin")):
        from models.convert import model_from_timm

        store, leaf = _split(url)
        sd = torch.load(io.BytesIO(_read(store, leaf, url)), map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
        try:
            model = model_from_timm(mc.name, sd, **mc.overrides)
        except ValueError as e:
            raise InitError(f"{url}: {e} (is model.name={mc.name!r} right?)") from e
        return InitSource("timm", url, model.cfg, model.state_dict(), None, None, None)
    if url.endswith(".safetensors"):  # `python -m models.convert` output: our names, arch in the metadata
        store, leaf = _split(url)
        tensors, meta = _safetensors(_read(store, leaf, url))
        arch = _arch(json.loads(meta["arch"])) if "arch" in meta else create_model(mc.name, 1, **mc.overrides).cfg
        classes = json.loads(meta["classes"]) if "classes" in meta else None
        return InitSource("weights", url, arch, tensors, None, classes, None)
    url, store = _export_dir(url)
    if store.exists("model.safetensors"):
        info = json.loads(_read(store, "config.json", url))
        raw, _ = _safetensors(_read(store, "model.safetensors", url))
        ema = _safetensors(_read(store, "ema.safetensors", url))[0] if store.exists("ema.safetensors") else None
        classes = json.loads(store.read_bytes("classes.json")) if store.exists("classes.json") else None
        summary = json.loads(store.read_bytes("summary.json")) if store.exists("summary.json") else None
        return InitSource("export", url, _arch(info["arch"]), raw, ema, classes, summary, info.get("name", ""))
    if store.exists("index-00000.json"):  # a sharded checkpoint of a pretraining run (train/checkpoint.py)
        from pipeline.formats.sharded import IncompleteCheckpoint, open_store

        try:
            ck = open_store(store)
        except IncompleteCheckpoint as e:
            raise InitError(str(e)) from e
        raw = {n: ck.full("param", n) for kind, n in ck.pieces if kind == "param"}
        ema = {n: ck.full("ema", n) for kind, n in ck.pieces if kind == "ema"} or None
        meta = ck.trainer
        return InitSource("checkpoint", url, _arch(meta["model"]["arch"]), raw, ema, meta.get("classes"), {"counters": meta.get("counters")})
    if store.exists("state.safetensors"):  # a consolidated checkpoint written before sharding
        meta = json.loads(_read(store, "trainer.json", url))
        tensors, _ = _safetensors(_read(store, "state.safetensors", url))
        raw = {k[6:]: v for k, v in tensors.items() if k.startswith("param/")}
        ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema/")} or None
        if "model" in meta:
            arch = _arch(meta["model"]["arch"])
        else:  # older checkpoints: rebuild from the run's model config
            m = meta["config"]["model"]
            n = int(raw["head.fc.weight"].shape[0])
            arch = create_model(m["name"], n, width_mult=m["width_mult"], depth_mult=m["depth_mult"], **m["overrides"]).cfg
        return InitSource("checkpoint", url, arch, raw, ema, meta.get("classes"), {"counters": meta.get("counters")})
    raise InitError(f"model.init_from={url}: not an export folder (model.safetensors + config.json), a run directory, "
                    "a Ray Train checkpoint (index-*.json + shards + trainer.json) or a weights file (.pth/.pt/.bin/.safetensors)")  # fmt: skip


def source_classes(url: str) -> list[str] | None:
    """The class list an export or checkpoint declares, read without loading weights (None: unknown)."""
    if url.endswith(WEIGHT_FILES):
        return None
    _, store = _export_dir(url)
    if store.exists("classes.json"):
        return json.loads(store.read_bytes("classes.json"))
    if store.exists("trainer.json"):
        return json.loads(store.read_bytes("trainer.json")).get("classes")
    if not any(store.exists(n) for n in ("model.safetensors", "state.safetensors", "index-00000.json")):
        load_source(url, ModelConfig())  # raises the InitError that says what is wrong
    return None


def load_strict(model: NFNet, weights: dict[str, torch.Tensor], url: str) -> None:
    """load_state_dict(strict) with an error that names missing, unexpected and mis-shaped tensors."""
    from models.convert import state_dict_mismatch

    problem = state_dict_mismatch(model.state_dict(), weights)
    if problem:
        raise InitError(f"{url} does not fit the architecture: {problem}")
    model.load_state_dict(weights, strict=True)


def model_from_source(src: InitSource, weights: str, overrides: dict) -> NFNet:
    """The source's own model (its class count) with raw or EMA weights."""
    arch = dataclasses.replace(src.arch, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
    model = NFNet(arch, num_classes=src.num_classes)
    chosen = src.ema if weights == "ema" and src.ema is not None else src.raw
    load_strict(model, chosen, src.url)
    return model


def check_classes(expected: list[str], got: list[str], expected_from: str, got_from: str) -> None:
    """Equal names in equal order, or an error that names the difference."""
    if list(expected) == list(got):
        return
    missing = [c for c in expected if c not in set(got)]
    extra = [c for c in got if c not in set(expected)]
    parts = [f"{len(expected)} classes in {expected_from}, {len(got)} in {got_from}"]
    if missing:
        parts.append(f"missing from {got_from}: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if extra:
        parts.append(f"not in {expected_from}: {extra[:10]}{' ...' if len(extra) > 10 else ''}")
    if not missing and not extra:
        i = next(i for i, (a, b) in enumerate(zip(expected, got)) if a != b)
        parts.append(f"same classes in another order (position {i}: {expected[i]!r} vs {got[i]!r})")
    raise ValueError("class mismatch: " + "; ".join(parts))


def build_model(mc: ModelConfig, num_classes: int) -> tuple[NFNet, dict, InitSource | None]:
    """Returns (model, model_info, source); model_info is written to exports as config.json."""
    src = None
    if mc.init_from:
        src = load_source(mc.init_from, mc)
        model = model_from_source(src, mc.init_weights, mc.overrides if src.kind != "timm" else {})
        if mc.reset_head or model.num_classes != num_classes:
            if not mc.reset_head:
                log.warning("%s has %d classes, the data %d: starting from a new zero head", src.url, model.num_classes, num_classes)
            model.reset_classifier(num_classes, zero_init=True)
    else:
        model = create_model(mc.name, num_classes, width_mult=mc.width_mult, depth_mult=mc.depth_mult, **mc.overrides)
    info = {"name": (src.name if src is not None and src.name else mc.name), "width_mult": mc.width_mult, "depth_mult": mc.depth_mult, "num_classes": num_classes,
            "arch": dataclasses.asdict(model.cfg),
            "params": sum(p.numel() for p in model.parameters())}  # fmt: skip
    return model, info, src
