"""The package's layers point one way, down the data flow, and `expo-dist plan` stays light.

Every module of expo_dist belongs to a layer (its folder). A module may import from its own layer and the layers
below it, never from one above: any import statement at any depth counts (module level, inside a function, under
TYPE_CHECKING), relative or absolute. No import cycles either, inside a layer or across one.
"""

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "expo_dist"

# bottom to top; "top" is cli, merge, spec, checks and the package's own __init__; nothing in the package imports testing
LAYERS = ("errors", "formats", "sources", "planning", "runtime", "output", "verify", "top", "testing")
BOTTOM = {"errors", "_version", "settings"}
TOP = {"spec", "checks", "merge", "cli"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def layer_of(module: str) -> str:
    """The layer of an expo_dist module or package (KeyError for one that belongs to none)."""
    parts = module.split(".")
    assert parts[0] == "expo_dist", module
    if len(parts) == 1 or parts[1] in TOP:
        return "top"
    if parts[1] in BOTTOM:
        return "errors"
    if parts[1] in LAYERS and parts[1] not in ("errors", "top") and (PKG / parts[1]).is_dir():
        return parts[1]
    raise KeyError(f"{module} belongs to no layer: put it in one of the layer folders or add it to LAYERS")


def imports_of(path: Path, modules: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, imported expo_dist module) for every import statement of the file, at any depth."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "expo_dist"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "expo_dist":
                continue
            for a in node.names:  # `from P import m` imports the module P.m where there is one, else names of P
                sub = f"{target}.{a.name}"
                out.append((node.lineno, sub if sub in modules else target))
    return out


def import_graph() -> dict[str, list[tuple[int, str]]]:
    modules = all_modules()
    return {name: imports_of(path, modules) for name, path in modules.items()}


def back_edges(graph) -> list[str]:
    bad = []
    for mod, edges in graph.items():
        mine = LAYERS.index(layer_of(mod))
        for line, target in edges:
            theirs = LAYERS.index(layer_of(target))
            if theirs > mine:
                bad.append(f"{mod} (line {line}, layer {LAYERS[mine]}) imports {target} (layer {LAYERS[theirs]})")
    return bad


def cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself), Tarjan's way."""
    succ = {m: sorted({t for _, t in edges if t in graph}) for m, edges in graph.items()}
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in succ[v]:
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
            if len(comp) > 1 or v in succ[v]:
                found.append(sorted(comp))

    for v in succ:
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    for name in all_modules():
        layer_of(name)


def test_imports_point_down():
    bad = back_edges(import_graph())
    assert not bad, "imports of a higher layer:\n  " + "\n  ".join(bad)


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles:\n  " + "\n  ".join(" <-> ".join(c) for c in found)


def test_the_reference_shares_no_code_with_the_package():
    """The float64 reference the tests trust must not lean on what it checks: it imports nothing of expo_dist."""
    path = PKG / "testing" / "reference.py"
    assert imports_of(path, all_modules()) == []


def test_subpackages_say_what_they_do_and_export_their_api():
    """Each layer's __init__ has a one-line docstring and an __all__ of names it really provides."""
    import importlib

    for layer in LAYERS:
        if not (PKG / layer / "__init__.py").is_file():
            continue
        tree = ast.parse((PKG / layer / "__init__.py").read_text())
        doc = ast.get_docstring(tree)
        assert doc and len(doc.strip().splitlines()) == 1, f"expo_dist/{layer}/__init__.py: a one-line docstring"
        mod = importlib.import_module(f"expo_dist.{layer}")
        assert mod.__all__, layer
        for name in mod.__all__:
            assert getattr(mod, name) is not None, f"expo_dist.{layer}.{name}"


def test_the_checker_sees_a_back_edge_and_a_cycle():
    """The checks themselves: a planning module importing the runtime, and two modules importing each other."""
    graph = {"expo_dist.planning.plan": [(3, "expo_dist.runtime.fileio")], "expo_dist.runtime.fileio": [],
             "expo_dist.formats.a": [(1, "expo_dist.formats.b")], "expo_dist.formats.b": [(9, "expo_dist.formats.a")]}
    assert back_edges(graph) == ["expo_dist.planning.plan (line 3, layer planning) imports expo_dist.runtime.fileio "
                                 "(layer runtime)"]
    assert cycles(graph) == [["expo_dist.formats.a", "expo_dist.formats.b"]]
    # relative imports at any depth resolve to the module they name
    modules = all_modules()
    edges = dict((t, n) for n, t in imports_of(PKG / "runtime" / "worker.py", modules))
    assert "expo_dist.runtime.runner" in edges  # imported inside MergeWorker.__init__


def readme_tree() -> set[str]:
    """The modules the README's layout tree lists (one line each, folders by their indentation)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Layout"):]
    found, stack = set(), []
    for line in section.splitlines():
        m = re.match(r"    ( *)(\S+)", line)
        if not m or not (m.group(2).endswith((".py", "/"))):
            continue
        depth = len(m.group(1)) // 2
        if depth == 0 and m.group(2) != "expo_dist/":
            break
        stack[depth:] = [m.group(2).rstrip("/")]
        if m.group(2).endswith(".py"):
            found.add("/".join(stack))
    return found


def test_readme_tree_lists_every_module():
    have = {str(p.relative_to(ROOT)) for p in PKG.rglob("*.py") if p.name != "__init__.py"}
    listed = readme_tree()
    assert listed == have, f"README's layout tree: missing {sorted(have - listed)}, stale {sorted(listed - have)}"


HEAVY = ("ray", "torch", "numpy", "transformers")


def test_plan_command_loads_neither_ray_nor_torch(pair_factory, tmp_path):
    """`expo-dist plan` reads headers only: no Ray, no torch, no numpy (safetensors headers are JSON; the
    planner is pure Python)."""
    sft, aligned = pair_factory(seed=2)
    code = ("import sys, json; from expo_dist.cli import main; "
            f"rc = main(['plan', '--sft', {str(sft)!r}, '--aligned', {str(aligned)!r}, '--alpha', '0.3', '--json']); "
            "print(json.dumps({'rc': rc, 'modules': sorted(sys.modules)}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    assert doc["rc"] == 0
    loaded = {m.split(".")[0] for m in doc["modules"]}
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
    assert "expo_dist.runtime.worker" not in doc["modules"] and "expo_dist.runtime.runner" not in doc["modules"]


@pytest.mark.parametrize("layer", ["formats", "sources", "planning", "runtime", "output", "verify"])
def test_layers_import_without_ray_or_torch(layer):
    """Importing a layer's package (and so every module it re-exports) loads neither Ray nor torch: the runtime
    loads them on first use."""
    code = f"import sys, expo_dist.{layer}; print(sorted({{m.split('.')[0] for m in sys.modules}}))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert r.returncode == 0, r.stderr
    loaded = set(ast.literal_eval(r.stdout.strip()))
    assert not loaded & {"ray", "torch"}, (layer, sorted(loaded & {"ray", "torch"}))
