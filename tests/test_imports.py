"""The import rules of the architecture (docs/DEVELOPING.md, "Layout"), checked on the whole package graph.

Every `import` statement of every module is read with `ast`, module-level and local ones alike, and resolved to the
package's own modules. The rules:
- the package never imports torch, diffusers, transformers, peft, tensorflow or `convert`;
- models/ imports no data, checkpoint, training, sampling, evaluation, conditioning or demo code;
- data/ imports no models; the pure-math modules (flow, schedulers, guidance) import no models;
- no production module reaches `pickstyle_jax.demo`, directly or through other modules;
- no import cycles, no module-level `__getattr__`, no imports of another module's private names;
- configs/*.py import only ml_collections (and modules that themselves import only ml_collections).
"""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = "pickstyle_jax"
FORBIDDEN_TOP = {"torch", "diffusers", "transformers", "peft", "tensorflow", "convert", "accelerate"}
MODEL_MAY_IMPORT = ("pickstyle_jax.models", "pickstyle_jax.sharding", "pickstyle_jax.errors", "pickstyle_jax.lora",
                    "pickstyle_jax.tokenizer")


def _modules(root: pathlib.Path, pkg: str) -> dict[str, pathlib.Path]:
    out = {}
    for path in sorted((root / pkg).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules(ROOT, PKG)


def _resolve(name: str) -> str | None:
    """The package module a dotted name refers to (an attribute of a module resolves to the module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: pathlib.Path):
    """(imported dotted name, imported symbol or None, line) for every import statement of a file."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[:len(anchor) - node.level + (1 if is_pkg else 0)]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                yield (full if _resolve(full) == full else base), a.name, node.lineno


def _graph():
    edges, private, top_level = {}, [], {}
    for mod, path in MODULES.items():
        deps = set()
        for name, symbol, line in _imports(mod, path):
            top_level.setdefault(mod, []).append((name.split(".")[0], line))
            target = _resolve(name) if name.startswith(PKG) else None
            if target and target != mod:
                deps.add(target)
                if symbol and symbol.startswith("_") and not symbol.startswith("__"):
                    private.append(f"{path.relative_to(ROOT)}:{line} imports private {target}.{symbol}")
        edges[mod] = deps
    return edges, private, top_level


EDGES, PRIVATE, TOP = _graph()


def _with_parents(mod: str) -> set[str]:
    """Importing a.b.c also runs a/__init__ and a/b/__init__."""
    parts = mod.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & set(MODULES)


def _reach(start: str) -> dict[str, str]:
    """Every module that importing `start` runs, each with the module that imported it first."""
    seen, todo = {start: ""}, [start]
    while todo:
        m = todo.pop()
        for d in set().union(*(EDGES[x] for x in _with_parents(m) | {m})):
            for dd in _with_parents(d):
                if dd not in seen:
                    seen[dd] = m
                    todo.append(dd)
    return seen


def _chain(seen, end):
    out = [end]
    while seen[out[-1]]:
        out.append(seen[out[-1]])
    return " <- ".join(out)


def test_graph_is_read():
    assert len(MODULES) > 30 and "pickstyle_jax.models.wan" in MODULES
    assert "pickstyle_jax.models.layers" in EDGES["pickstyle_jax.models.wan"]


def test_no_reference_or_converter_imports():
    bad = [f"{m}:{line} imports {top}" for m, tops in TOP.items() for top, line in tops if top in FORBIDDEN_TOP]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("layer,allowed", [
    ("pickstyle_jax.models", MODEL_MAY_IMPORT),
    ("pickstyle_jax.data", ("pickstyle_jax.data", "pickstyle_jax.errors", "pickstyle_jax.files")),
    ("pickstyle_jax.schedulers", ("pickstyle_jax.flow",)),
    ("pickstyle_jax.guidance", ()),
    ("pickstyle_jax.flow", ()),
])
def test_layer_rules(layer, allowed):
    bad = [f"{m} imports {d}" for m, deps in EDGES.items() if m == layer or m.startswith(layer + ".")
           for d in deps if not (d == layer or d.startswith(layer + ".") or d.startswith(allowed) and allowed)]
    assert not bad, "\n".join(bad)


def test_no_production_module_reaches_the_demo():
    demo = "pickstyle_jax.demo"
    assert demo in MODULES, "the demo package moved: update this test"
    bad = []
    for m in MODULES:
        if m == demo or m.startswith(demo + "."):
            continue
        seen = _reach(m)
        hits = [d for d in seen if d == demo or d.startswith(demo + ".")]
        if hits:
            bad.append(_chain(seen, hits[0]))
    assert not bad, "production modules reach the demo:\n" + "\n".join(bad)


def test_no_cycles():
    order, state, cycles = [], {}, []

    def visit(m, stack):
        state[m] = 1
        stack.append(m)
        for d in sorted(EDGES[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[m] = 2
        order.append(m)

    for m in sorted(MODULES):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _module_aliases(tree) -> set[str]:
    """Local names bound to one of the package's modules (`from pickstyle_jax import sharding`, `... as lib`)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PKG):
            names.update(a.asname or a.name for a in node.names if f"{node.module}.{a.name}" in MODULES)
        elif isinstance(node, ast.Import):
            names.update(a.asname for a in node.names if a.asname and a.name in MODULES)
    return names


def test_no_module_getattr_and_no_private_imports():
    bad = list(PRIVATE)
    for m, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} defines a module-level __getattr__")
        aliases = _module_aliases(tree)
        for node in ast.walk(tree):  # lib._private: another module's private name, reached by attribute
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} uses private {node.value.id}.{node.attr}")
    assert not bad, "\n".join(bad)


def test_configs_import_only_ml_collections():
    configs = sorted((ROOT / "configs").glob("*.py"))
    assert configs
    bad = []
    for path in configs:
        for name, _, line in _imports("configs." + path.stem, path):
            top = name.split(".")[0]
            if top in ("ml_collections", "__future__", "configs"):
                continue
            target = _resolve(name) if name.startswith(PKG) else None
            pure = target and all(t in ("ml_collections", "__future__") for t, _ in TOP.get(target, []))
            if not pure:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not bad, "\n".join(bad)
