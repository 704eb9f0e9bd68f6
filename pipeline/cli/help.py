"""`--help` text for the launchers, generated from the config dataclasses: every field with its type,
default and one line of doc, and the presets.

The doc of a field is the comment on its line in pipeline/config.py, or the comment block just above
it, so the dataclasses stay the single place where a field is described (no second table to keep in
sync). A well-kept CLI library (tyro) would generate the same from docstrings, but it would replace
`--set section.key=value`, which presets, sweeps and the KubeRay manifests use.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing

from pipeline.config import PRESETS, TrainConfig


def _field_docs(cls) -> dict[str, str]:
    docs, block = {}, []
    for line in inspect.getsource(cls).splitlines():
        text = line.strip()
        if text.startswith("#"):
            block.append(text.lstrip("# ").strip())
            continue
        m = re.match(r"(\w+)\s*:\s*[^=]+(?:=.*?)?(?:#\s*(.*))?$", text)
        if m and not text.startswith(("class ", "def ", "@")):
            doc = m.group(2) or " ".join(block)
            docs[m.group(1)] = doc.split(". ")[0].rstrip(".")
        block = []
    return docs


def _type(t) -> str:
    if typing.get_origin(t) is typing.Literal:
        return "|".join(map(str, typing.get_args(t)))
    return getattr(t, "__name__", str(t))


def fields_help() -> str:
    default = TrainConfig()
    hints = typing.get_type_hints(TrainConfig)
    lines = ["config fields (--set section.field=value):"]
    for section in dataclasses.fields(TrainConfig):
        cls = hints[section.name]
        docs, field_hints = _field_docs(cls), typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            value = getattr(getattr(default, section.name), f.name)
            doc = docs.get(f.name, "")
            lines.append(f"  {section.name}.{f.name} ({_type(field_hints[f.name])}, default {value!r})" + (f": {doc}" if doc else ""))
    return "\n".join(lines)


def presets_help() -> str:
    lines = ["presets (--preset NAME; each sets the fields shown, the rest keep their defaults):"]
    for name, preset in PRESETS.items():
        keys = ", ".join(f"{s}.{k}={v}" for s, fields in preset.items() for k, v in fields.items())
        lines.append(f"  {name}: {keys}")
    return "\n".join(lines)


def non_default(cfg: TrainConfig) -> list[str]:
    """`section.field=value` for every value that differs from the dataclass default."""
    base, now = TrainConfig().to_dict(), cfg.to_dict()
    return [f"{s}.{k}={v}" for s, fields in now.items() for k, v in fields.items() if base[s][k] != v]
