"""No import cycle in selfalign/, imports inside functions included (issue 12), and the graph builder that says so
(tests/module_graph.py) checked on a small package written here."""

from pathlib import Path

from tests.module_graph import cycles, import_graph


def describe(graph: dict[str, set[str]], cycle: list[str]) -> str:
    """A cycle as the imports that close it: `a -> b, b -> a`."""
    members = set(cycle)
    return ", ".join(f"{a} -> {b}" for a in cycle for b in sorted(graph[a] & members))


def test_selfalign_has_no_import_cycle():
    graph = import_graph()
    found = cycles(graph)
    assert found == [], "selfalign/ has import cycles (imports inside functions count; arrows must point down, " \
                        "cli -> run -> stages -> calls -> backends):\n" + "\n".join(describe(graph, c) for c in found)


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root / "pkg"


# pkg.a -> pkg.b at module level, pkg.b -> pkg.c and pkg.c -> pkg.a only inside functions: still a cycle.
PACKAGE = {
    "pkg/__init__.py": "",
    "pkg/a.py": "import os\n\nfrom . import b\n",
    "pkg/b.py": "def later():\n    from .c import helper\n    return helper()\n",
    "pkg/c.py": "def helper():\n    from pkg import a\n    return a\n",
    "pkg/d.py": "VALUE = 1\n",
    "pkg/sub/__init__.py": "from ..d import VALUE\n",
    # `from . import NAME` where NAME is no module: the package itself. Under TYPE_CHECKING: never runs, no edge.
    "pkg/sub/e.py": "from typing import TYPE_CHECKING\n\nfrom . import VALUE\nimport pkg.d.missing\n\n"
                    "if TYPE_CHECKING:\n    from pkg.a import b\n",
}


def test_the_graph_counts_imports_inside_functions_and_finds_their_cycle(tmp_path):
    package = write_package(tmp_path, PACKAGE)
    graph = import_graph(package)
    assert graph == {
        "pkg": set(),
        "pkg.a": {"pkg.b"},
        "pkg.b": {"pkg.c"},
        "pkg.c": {"pkg.a"},
        "pkg.d": set(),
        "pkg.sub": {"pkg.d"},
        "pkg.sub.e": {"pkg.sub", "pkg.d"},
    }
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert describe(graph, ["pkg.a", "pkg.b", "pkg.c"]) == "pkg.a -> pkg.b, pkg.b -> pkg.c, pkg.c -> pkg.a"


def test_without_the_function_level_import_there_is_no_cycle(tmp_path):
    package = write_package(tmp_path, {**PACKAGE, "pkg/c.py": "def helper():\n    return 1\n"})
    assert cycles(import_graph(package)) == []


# The layers of selfalign/, top to bottom (README "How the code is laid out"). A module may import its own layer
# and the layers below, never one above. A new module gets a row here: where it sits is part of its design.
LAYERS = [
    ("command line", ["cli"]),
    ("runs and their readers", ["runner", "render", "report", "inspect_run", "finished_run", "plan",
                                "evaluate_run"]),
    ("the pipeline file", ["config", "check", "reuse", "calibrate"]),
    ("stages and what they publish", ["stages", "stages.*", "publish", "card", "plots", "evaluate",
                                      "evaluate_view", "evaluate_arms"]),
    ("model calls", ["calls", "cache", "progress", "ray_executor", "trainer_formats", "input_formats", "prompts",
                     "budget", "tokens", "embeddings", "reward_finetune", "reward_probe"]),
    ("backends", ["backends", "backends.*"]),
    ("foundations", ["selfalign", "errors", "atomic", "fingerprint", "markup", "metrics", "manifest", "rundir",
                     "paths", "yaml_source", "config_base", "model_costs", "textmatch",
                     "calibration"]),
]


def layer_of(module: str) -> int | None:
    short = module.removeprefix("selfalign.") if module != "selfalign" else "selfalign"
    for rank, (_, members) in enumerate(LAYERS):
        for member in members:
            if short == member or (member.endswith(".*") and short.startswith(member[:-1])):
                return rank
    return None


def test_every_import_points_down_the_layers():
    graph = import_graph()
    unplaced = sorted(module for module in graph if layer_of(module) is None)
    assert unplaced == [], f"modules with no layer in LAYERS (add each to the layer it belongs to): {unplaced}"
    upward = [f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})"
              for module, targets in sorted(graph.items()) for target in sorted(targets)
              if layer_of(target) < layer_of(module)]
    assert upward == [], "imports that point up the layers:\n" + "\n".join(upward)
