"""The import graph of selfalign/, read with `ast`: used by the cycle test.

Imports inside functions count (they run when the function does). Imports under `if TYPE_CHECKING:` do not:
they never run, and a type may name a module above (a stage's context names the LoadedPipeline it is given).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent / "selfalign"


def module_name(path: Path, package_root: Path = PACKAGE_ROOT) -> str:
    """`<package_root>/a/b.py` -> `<package>.a.b`; a folder's `__init__.py` is the folder itself."""
    parts = path.relative_to(package_root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package_root: Path = PACKAGE_ROOT) -> dict[str, Path]:
    return {module_name(path, package_root): path for path in sorted(package_root.rglob("*.py"))}


def _resolve(importer: str, is_package: bool, level: int, target: str | None) -> str:
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, target] if target else base)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules in `known` that `name` imports anywhere in its file (module level or inside functions)."""
    found = set()
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    types_only = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node.test)
                  for statement in node.body for inner in ast.walk(statement)}
    for node in ast.walk(tree):
        if id(node) in types_only:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, is_package, node.level, node.module) if node.level else node.module or ""
            # `from . import x` names a submodule when x is one, else an attribute of the package.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import selfalign.a.b` -> the deepest known module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(package_root: Path = PACKAGE_ROOT) -> dict[str, set[str]]:
    """Each module of the package at `package_root` (selfalign/ unless given) -> the package's modules it imports."""
    found = modules(package_root)
    known = set(found)
    return {name: imports_of(name, path, known) for name, path in found.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


if __name__ == "__main__":
    graph = import_graph()
    fan_in: dict[str, int] = {}
    for targets in graph.values():
        for target in targets:
            fan_in[target] = fan_in.get(target, 0) + 1
    folders: dict[str, int] = {}
    for name in graph:
        folder = "/".join(name.split(".")[:-1]) if not modules()[name].name == "__init__.py" else name.replace(".", "/")
        folders[folder] = folders.get(folder, 0) + 1
    print("modules per folder:", dict(sorted(folders.items())))
    print("edges:", sum(len(t) for t in graph.values()))
    print("fan-in top 10:", sorted(fan_in.items(), key=lambda kv: -kv[1])[:10])
    print("cycles:", cycles(graph))
