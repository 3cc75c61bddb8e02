"""The package's layers and import rules (l2t_jax/__init__.py), read from the source.

Every import of a package module is collected from the AST, at module level and inside
functions (lazy imports count the same), and checked against :data:`ALLOWED`: the method
never imports the runtime or the tools, the networks import nothing above them, and only
the tools and the entry points import the tools. The module graph has no cycle.
"""
import ast
import os

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO_ROOT, "l2t_jax")
ENTRY_POINTS = ("l2t_jax.main", "l2t_jax.convert", "l2t_jax.export", "l2t_jax.evaluate",
                "l2t_jax.prepare")
# layer -> the layers its modules may import (besides their own).
ALLOWED = {
    "package": (),
    "configs": ("transfer.pair_lists",),
    "models": (),
    "transfer": ("models",),
    "data": (),
    "training": ("models", "transfer", "data", "configs"),
    "tools": ("models", "transfer", "data", "configs", "training"),
    "entry": ("models", "transfer", "data", "configs", "training", "tools"),
}


def module_names() -> dict[str, str]:
    """Dotted module name -> file path, for every module of the package."""
    found = {}
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            parts = os.path.relpath(path, REPO_ROOT)[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def layer(module: str) -> str:
    """``l2t_jax.transfer.bilevel`` -> ``transfer``; entry points -> ``entry``."""
    if module in ENTRY_POINTS:
        return "entry"
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "package"


def imports(module: str, path: str, modules: dict) -> set[str]:
    """The package modules ``module`` imports anywhere in its source (absolute and relative
    ``import`` / ``from ... import``), resolved to module names: ``from l2t_jax.models
    import taps`` is ``l2t_jax.models.taps``, ``from l2t_jax.models import get_model`` the
    package ``l2t_jax.models``."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "l2t_jax":
                    found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "l2t_jax":
                continue
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in modules else base)
    return found - {module}


@pytest.fixture(scope="module")
def graph():
    modules = module_names()
    return {m: imports(m, p, modules) for m, p in modules.items()}


def test_the_layout_has_the_layers_it_documents(graph):
    layers = {layer(m) for m in graph}
    assert layers == set(ALLOWED), layers
    for module in graph:
        if layer(module) == "entry":
            assert module.count(".") == 1, module


def test_each_layer_imports_only_what_it_may(graph):
    broken = []
    for module, targets in sorted(graph.items()):
        own = layer(module)
        for target in sorted(targets):
            theirs = layer(target)
            # Own layer, or the package itself (it defines __version__ and nothing else).
            if theirs == own or target == "l2t_jax":
                continue
            # A layer by name, or one module of it (configs: transfer.pair_lists).
            if theirs in ALLOWED[own] or ".".join(target.split(".")[1:3]) in ALLOWED[own]:
                continue
            broken.append(f"{module} ({own}) imports {target} ({theirs})")
    assert not broken, "\n".join(broken)


def test_configs_import_only_the_jax_free_pair_lists(graph):
    for module, targets in graph.items():
        if layer(module) == "configs":
            assert targets <= {"l2t_jax.transfer.pair_lists"} | {
                t for t in targets if layer(t) == "configs"}, (module, targets)


def test_the_import_graph_has_no_cycle(graph):
    state, stack, cycles = {}, [], []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_rules_catch_a_broken_import(tmp_path):
    """The checker itself: a method module importing the runtime, and a cycle, are found."""
    modules = {"l2t_jax.transfer.x": str(tmp_path / "x.py"),
               "l2t_jax.training.train": "", "l2t_jax.models.a": str(tmp_path / "a.py"),
               "l2t_jax.models.b": str(tmp_path / "b.py")}
    (tmp_path / "x.py").write_text("def f():\n    from l2t_jax.training import train\n")
    (tmp_path / "a.py").write_text("from l2t_jax.models import b\n")
    (tmp_path / "b.py").write_text("import l2t_jax.models.a\n")
    assert imports("l2t_jax.transfer.x", modules["l2t_jax.transfer.x"], modules) == {
        "l2t_jax.training.train"}
    assert "training" not in ALLOWED["transfer"]
    assert imports("l2t_jax.models.a", modules["l2t_jax.models.a"], modules) == {
        "l2t_jax.models.b"}
    assert imports("l2t_jax.models.b", modules["l2t_jax.models.b"], modules) == {
        "l2t_jax.models.a"}


def test_every_module_says_what_it_owns(graph):
    for module, path in module_names().items():
        with open(path) as f:
            docstring = ast.get_docstring(ast.parse(f.read()))
        assert docstring and len(docstring.split()) >= 5, module
