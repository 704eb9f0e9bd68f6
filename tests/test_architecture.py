"""The import map: no cycle between any two modules of models/ data_prep/ pipeline/ launch/ infra/, and
every import of this repository's own code allowed by the importing package's MAY_IMPORT.

Every import counts, also those inside functions (ast.walk sees them all). Each package's __init__.py
declares, as literals read here with ast (nothing is imported):
    MAY_IMPORT   the parts of this repository its modules may import, besides their own package
    NEVER_IMPORT (optional) third-party modules its modules must not import (e.g. data_prep: torch)
A module belongs to the deepest package above it; modules of a subpackage are not their parent's,
so pipeline/config.py (owner: pipeline) may not import pipeline.train just because both are in pipeline/.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("models", "data_prep", "pipeline", "launch", "infra")


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def scan(root: Path, roots=ROOTS) -> tuple[dict[str, Path], dict[str, dict]]:
    """Modules {name: path} and packages {name: {"may": (...), "never": (...)}} under `roots`."""
    modules, packages = {}, {}
    for top in roots:
        for path in sorted((root / top).rglob("*.py")):
            name = _module_name(root, path)
            modules[name] = path
            if path.name == "__init__.py":
                decl = {}
                for node in ast.parse(path.read_text()).body:
                    target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
                    if isinstance(target, ast.Name) and target.id in ("MAY_IMPORT", "NEVER_IMPORT") and node.value is not None:
                        decl[target.id] = tuple(ast.literal_eval(node.value))
                packages[name] = {"may": decl.get("MAY_IMPORT"), "never": decl.get("NEVER_IMPORT", ())}
    return modules, packages


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported module, line, ours) for every import statement in the module, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    launcher_dir = name.split(".")[0] == "launch"  # launchers import `_common` through sys.path
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            # `from pkg import sub` imports the module pkg.sub when there is one
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        else:
            continue
        for t in targets:
            if launcher_dir and t.split(".")[0] not in ROOTS and f"launch.{t}" in modules:
                t = f"launch.{t}"
            ours = t.split(".")[0] in ROOTS
            out.append((t, node.lineno, ours))
    return out


def owner(name: str, packages: dict[str, dict], modules: dict[str, Path]) -> str:
    if name in packages:
        return name
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:i]) in packages:
            return ".".join(parts[:i])
    return parts[0]


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def check(root: Path, roots=ROOTS) -> tuple[list[str], list[list[str]]]:
    """(direction violations, import cycles) for the tree at `root`."""
    modules, packages = scan(root, roots)
    problems, graph = [], {m: set() for m in modules}
    for pkg, decl in packages.items():
        if decl["may"] is None:
            problems.append(f"{modules[pkg].relative_to(root)}: declares no MAY_IMPORT (what this package may import)")
    for name, path in modules.items():
        own = owner(name, packages, modules)
        may = packages.get(own, {}).get("may") or ()
        never = packages.get(own, {}).get("never") or ()
        where = f"{path.relative_to(root)}"
        for target, line, ours in imports_of(name, path, modules):
            if not ours:
                bad = [n for n in never if _under(target, n)]
                if bad:
                    problems.append(f"{where}:{line} imports {target}, which {own} never imports (NEVER_IMPORT)")
                continue
            resolved = target if target in modules else target.rpartition(".")[0]
            if resolved not in modules:
                problems.append(f"{where}:{line} imports {target}, which is not a module of this repository")
                continue
            graph[name].add(resolved)
            if owner(resolved, packages, modules) != own and not any(_under(resolved, p) for p in may):
                problems.append(f"{where}:{line} imports {resolved}: {own} may import only {list(may)}")
    return problems, _cycles(graph)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_repository_has_no_cycles_and_follows_directions():
    problems, cycles = check(REPO)
    assert not cycles, f"import cycles: {cycles}"
    assert not problems, "imports against the declared directions:\n" + "\n".join(problems)


def test_pipeline_is_split_into_declared_stages():
    modules, packages = scan(REPO)
    stages = {p for p in packages if p.startswith("pipeline.")}
    assert stages == {"pipeline.data", "pipeline.finetune", "pipeline.train", "pipeline.sweep", "pipeline.scaling", "pipeline.formats",
                      "pipeline.cli"}
    loose = sorted(m for m in modules if owner(m, packages, modules) == "pipeline" and m != "pipeline")
    assert loose == ["pipeline.config"], loose  # only the one config sits beside the stages


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def test_checker_finds_cycles_and_wrong_directions(tmp_path):
    """The checker itself: a function-level import that closes a cycle, a relative import against the
    direction, a forbidden third-party import and an undeclared package are all reported."""
    _write(tmp_path, {
        "pipeline/__init__.py": "MAY_IMPORT = ()\n",
        "pipeline/config.py": "def f():\n    from pipeline.train.other import go\n",  # config -> train: wrong way
        "pipeline/data/__init__.py": "MAY_IMPORT = ('pipeline.config',)\nNEVER_IMPORT = ('deepspeed',)\n",
        "pipeline/data/loader.py": "import deepspeed\nfrom ..train import run\n",  # both forbidden
        "pipeline/train/__init__.py": "MAY_IMPORT = ('pipeline.config', 'pipeline.data')\n",
        "pipeline/train/run.py": "from pipeline.config import x\nfrom . import step\n",
        "pipeline/train/step.py": "def g():\n    from .run import go\n",  # run <-> step cycle inside a function
        "pipeline/train/other.py": "",
        "pipeline/sweep/__init__.py": "",  # no declaration
    })  # fmt: skip
    problems, cycles = check(tmp_path, roots=("pipeline",))
    text = "\n".join(problems)
    assert cycles == [["pipeline.train.run", "pipeline.train.step"]]
    assert "pipeline/config.py:2 imports pipeline.train.other" in text
    assert "pipeline/data/loader.py:2 imports pipeline.train.run" in text
    assert "pipeline/data/loader.py:1 imports deepspeed" in text
    assert "pipeline/sweep/__init__.py: declares no MAY_IMPORT" in text
    assert "pipeline/train/run.py" not in text  # allowed imports are not reported


@pytest.mark.parametrize("pkg", ["pipeline.data", "pipeline.scaling", "data_prep", "models"])
def test_lower_layers_never_import_the_trainer(pkg):
    """The directions a reader relies on, stated once more as plain facts."""
    modules, _ = scan(REPO)
    for name, path in modules.items():
        if _under(name, pkg):
            for target, line, _ in imports_of(name, path, modules):
                assert not _under(target, "pipeline.train"), f"{path}:{line} imports {target}"
                assert not _under(target, "pipeline.sweep"), f"{path}:{line} imports {target}"
