"""Every library the package imports is declared in setup.cfg (install_requires or an
extra): the imports are read from the source (AST, lazy ones included) and each one's
distribution looked up in this environment (importlib.metadata)."""
import ast
import configparser
import importlib.metadata
import os
import re
import sys

from helpers import REPO_ROOT


def declared() -> set[str]:
    """Distribution names of install_requires and of every extra, normalised."""
    parser = configparser.ConfigParser()
    parser.read(os.path.join(REPO_ROOT, "setup.cfg"))
    text = parser["options"]["install_requires"] + "\n" + "\n".join(
        parser["options.extras_require"].values())
    names = set()
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.add(_normalise(re.split(r"[\s\[<>=!~;]", line, maxsplit=1)[0]))
    return names


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_libraries() -> dict[str, str]:
    """Top-level module -> a file of the package importing it, for every module outside
    the standard library and the package."""
    found = {}
    for directory, _, files in os.walk(os.path.join(REPO_ROOT, "l2t_jax")):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    tops = [alias.name.split(".")[0] for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level:
                    tops = [node.module.split(".")[0]]
                else:
                    continue
                for top in tops:
                    if top != "l2t_jax" and top not in sys.stdlib_module_names:
                        found.setdefault(top, os.path.relpath(path, REPO_ROOT))
    return found


def test_every_imported_library_is_declared():
    distributions = importlib.metadata.packages_distributions()
    wanted = declared()
    missing = []
    for module, where in sorted(imported_libraries().items()):
        names = {_normalise(d) for d in distributions.get(module, [module])}
        if not names & wanted:
            missing.append(f"{module} (imported in {where}; distribution "
                           f"{', '.join(sorted(names))})")
    assert not missing, "not declared in setup.cfg: " + "; ".join(missing)
