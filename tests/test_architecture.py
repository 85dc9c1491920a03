"""The package's dependency order, checked on the source (no imports run).

Layers, bottom first (docs/architecture.md draws them): a module may import from its own layer's package and
from the layers below it, never above, and the import graph has no cycle. Function-level imports count the same
as top-level ones: a lazy import may put off loading a module (start-up time), never break the order.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rdr_jax"

# Bottom first. A module belongs to the first entry that is a prefix of its dotted name.
LAYERS = [
    ("rdr_jax.errors",),
    ("rdr_jax.runtime",),
    ("rdr_jax.convert",),
    ("rdr_jax.models",),
    ("rdr_jax.losses", "rdr_jax.ranking_losses"),
    ("rdr_jax.data",),
    ("rdr_jax.decoding",),
    ("rdr_jax.retrieval",),
    ("rdr_jax.training",),
    ("rdr_jax.tasks",),
    ("rdr_jax.commands", "rdr_jax.cli", "rdr_jax.launch"),
]

# (importer, imported): the upward imports that are part of the design, each with its reason.
ALLOWED_UPWARD = {
    # The documented one-line delegate: ``model.constrained_beam_search(...)`` calls
    # ``rdr_jax.decoding.constrained_beam_search(model, ...)``, imported when called, never at import time.
    ("rdr_jax.models.seq2seq", "rdr_jax.decoding.beam_search"),
    ("rdr_jax.models.seq2seq", "rdr_jax.decoding"),
}


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _type_checking_only(tree: ast.Module) -> set[int]:
    """The import statements under ``if TYPE_CHECKING:``: annotations only, never run."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return out


def imports_of(path: Path, name: str, known: set[str], *, runtime_only: bool = False) -> list[tuple[str, int, bool]]:
    """(imported rdr_jax module, line, at module level) for every import statement of the file (``runtime_only``:
    leaving out those under ``if TYPE_CHECKING:``); ``from pkg import sub`` counts as importing ``pkg.sub`` when
    that is a module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top_level = {id(node) for node in tree.body}
    skip = _type_checking_only(tree) if runtime_only else set()
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:   # relative: resolve against this module's package
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[:len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            if target == "rdr_jax" or target.startswith("rdr_jax."):
                out.append((target, node.lineno, id(node) in top_level))
    return out


def layer_of(name: str) -> int | None:
    for i, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    return None


def violations(root: Path = PACKAGE, allowed=frozenset(ALLOWED_UPWARD)) -> list[str]:
    """Every import that goes up the layers, or leaves a module outside every layer, as ``file:line: message``."""
    found = modules(root)
    out = []
    for name, path in found.items():
        if name == "rdr_jax":   # the package root only re-exports, lazily (PEP 562)
            continue
        own = layer_of(name)
        if own is None:
            out.append(f"{path}: module {name} is in no layer (add it to LAYERS in tests/test_architecture.py)")
            continue
        for target, line, _ in imports_of(path, name, set(found)):
            layer = layer_of(target)
            if target == "rdr_jax" or layer is None or (name, target) in allowed:
                continue
            if layer > own:
                out.append(f"{path}:{line}: {name} imports {target}, a layer above it "
                           f"({LAYERS[own][0]} < {LAYERS[layer][0]})")
    return out


def cycles(root: Path = PACKAGE, allowed=frozenset(ALLOWED_UPWARD)) -> list[list[str]]:
    """Import cycles among the package's modules (every import statement that runs, at any depth: annotations
    under ``if TYPE_CHECKING:`` cannot make a cycle at run time; allowed edges left out)."""
    found = modules(root)
    graph = {name: sorted({t for t, _, _ in imports_of(path, name, set(found), runtime_only=True)
                           if t in found and t != name and (name, t) not in allowed})
             for name, path in found.items()}
    # Tarjan's strongly connected components
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_module_imports_a_layer_above_it():
    assert violations() == []


def test_no_import_cycles():
    # A package's __init__ that re-exports its submodules and a submodule that imports the package would make a
    # cycle: submodules import each other by their full names instead.
    assert cycles() == []


def test_the_allowed_upward_import_happens_only_when_called():
    seq2seq = PACKAGE / "models" / "seq2seq.py"
    names = set(modules())
    upward = [(t, line, top) for t, line, top in imports_of(seq2seq, "rdr_jax.models.seq2seq", names)
              if t.startswith("rdr_jax.decoding")]
    assert all(not top for _, _, top in upward), f"models/seq2seq.py imports decoding at import time: {upward}"


@pytest.fixture
def planted(tmp_path):
    """A copy of the package to plant imports in."""
    import shutil

    root = tmp_path / "rdr_jax"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_a_planted_upward_import_is_caught(planted):
    target = planted / "data" / "files.py"
    target.write_text(target.read_text() + "\n\ndef _planted():\n    from rdr_jax.training import loop  # noqa\n")
    found = violations(planted)
    assert len(found) == 1
    assert "data/files.py:" in found[0] and "rdr_jax.data.files imports rdr_jax.training.loop" in found[0]


def test_a_planted_cycle_is_caught(planted):
    target = planted / "data" / "readers.py"
    target.write_text(target.read_text() + "\nfrom rdr_jax.data import files  # noqa\n")
    assert ["rdr_jax.data.files", "rdr_jax.data.readers"] in cycles(planted)


def test_a_module_outside_the_layers_is_caught(planted):
    (planted / "helpers.py").write_text("X = 1\n")
    assert any("module rdr_jax.helpers is in no layer" in v for v in violations(planted))


MAX_LINES = 400


def test_modules_are_small_or_say_why():
    """No module over ~400 lines without a line near its top saying why it is one file."""
    long = []
    for path in PACKAGE.rglob("*.py"):
        lines = path.read_text().splitlines()
        if len(lines) > MAX_LINES and not any("longer than" in line.lower() or "one file" in line.lower()
                                              for line in lines[:40]):
            long.append(f"{path.relative_to(PACKAGE)} ({len(lines)} lines)")
    assert long == []
