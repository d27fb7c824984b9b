"""The package's folders show its layers, and the imports keep to them (issue 18).

README.md's "Layers" table names every module of `metaflowlib` once, layer by layer, bottom up. A module may
import metaflowlib modules of its own layer and the layers below, never above (statically, including imports
inside functions). The core imports nothing from outside but torch, numpy and the standard library at module
level, and nothing that tracks, validates params or runs pipelines anywhere: it runs on a bare GPU machine.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "metaflowlib"
TRACKING_LIBRARIES = ("mlflow", "pydantic", "yaml", "dvc")  # never imported by the core, not even inside a function


def layers() -> list[tuple[str, list[str]]]:
    """(layer name, its module paths relative to metaflowlib/) from the README's table, bottom up."""
    section = README_TEXT.split("### Layers", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith(("| layer", "|---"))]
    assert rows, "README.md has no Layers table"
    return [(row.split("|")[1].strip(), re.findall(r"`metaflowlib/([\w/.]+)`", row.split("|")[2])) for row in rows]


README_TEXT = (ROOT / "README.md").read_text()


def layer_of(path: Path, table: list[tuple[str, list[str]]]) -> int:
    relative = path.relative_to(PACKAGE).as_posix()
    for index, (_, modules) in enumerate(table):
        if any(relative == m or relative.startswith(m.rstrip("/") + "/") for m in modules):
            return index
    raise LookupError(relative)


def imported_modules(path: Path) -> list[tuple[str, int]]:
    """(module name, line) of every absolute import in the file, top level or not."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.module, node.lineno)] + [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names]
    return found


def target_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] != "metaflowlib":
        return None
    for end in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:end])
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_the_readme_table_names_every_module_once() -> None:
    table = layers()
    for path in SOURCES:
        relative = path.relative_to(PACKAGE).as_posix()
        matches = [name for name, modules in table for m in modules if relative == m or relative.startswith(m.rstrip("/") + "/")]
        assert len(matches) == 1, f"metaflowlib/{relative} is in {len(matches)} rows of README.md's Layers table: {matches}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_no_module_imports_a_layer_above_its_own(path: Path) -> None:
    table = layers()
    own = layer_of(path, table)
    for name, line in imported_modules(path):
        target = target_file(name)
        if target is not None and target != path and layer_of(target, table) > own:
            pytest.fail(f"metaflowlib/{path.relative_to(PACKAGE)}:{line} ({table[own][0]}) imports {name} "
                        f"({table[layer_of(target, table)][0]}), a layer above")
        if own == 0:
            assert name.split(".")[0] not in TRACKING_LIBRARIES, f"metaflowlib/{path.relative_to(PACKAGE)}:{line} imports {name}"


def test_the_core_imports_with_torch_and_numpy_alone() -> None:
    """Every core module imports in a process where the tracking libraries, pydantic, datasets and PIL cannot."""
    table = layers()
    core = [p for p in SOURCES if layer_of(p, table) == 0]
    names = [".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__") for p in core]
    blocked = (*TRACKING_LIBRARIES, "datasets", "PIL", "matplotlib", "scipy")
    code = (
        "import importlib, sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {blocked!r}:\n"
        "            raise ImportError(f'{name} is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print(len(sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
