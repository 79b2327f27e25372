"""The shape of the code: no import cycle among metacli's modules, and group options that
are exactly the registered components."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from metacli.build import build
from metacli.errors import ConfigError
from metacli.registry import available
from tests.conftest import CONF, compose_config

SOURCE = Path(__file__).resolve().parents[1] / "src" / "metacli"


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every metacli module -> the metacli modules it imports anywhere in its file
    (top level, inside functions, or only for type checking)."""
    modules = {module_name(p): p for p in SOURCE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for target in targets:
                if target in modules and target != name and target != "metacli":
                    graph[name].add(target)
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, if there is any (depth-first search)."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle_among_metacli_modules() -> None:
    graph = import_graph()
    assert len(graph) > 30 and graph["metacli.run"]  # the walk found the package
    assert cycle(graph) is None, " -> ".join(cycle(graph) or [])
    assert cycle({**graph, "metacli.loop": graph["metacli.loop"] | {"metacli.run"}})  # it can fail


def test_the_import_graph_check_runs_as_a_command() -> None:
    code = (
        "import sys; sys.path.insert(0, '.'); from tests.test_structure import cycle, "
        "import_graph; c = cycle(import_graph()); print(c or 'no cycle'); sys.exit(bool(c))"
    )
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0 and "no cycle" in result.stdout, result.stdout + result.stderr


# The layers, lowest first (docs/architecture.md draws them): a module imports only modules
# of its own layer or of lower ones. A package stands for all its modules.
LAYERS = (
    # what everything shares: errors, schemas, named tensors, per-task random streams
    (
        "foundation",
        ("errors", "config", "params", "streams", "files", "extras", "figures", "stats"),
    ),
    # the process around a run: locks, ranks, signals, the console, the registries
    ("infrastructure", ("lock", "distributed", "signals", "console", "registry", "machine")),
    ("components", ("models", "tasks", "updates")),
    ("engine", ("engine", "regularizers")),
    ("algorithms", ("algorithms",)),
    # from a config to built components, and back from a checkpoint
    ("assembly", ("options", "optim", "build", "checkpoint", "composition", "resources")),
    ("running", ("evaluation", "loop", "loggers", "run_folder")),
    (
        "commands",
        (
            *("run", "precheck", "contract", "api", "comparison", "tables", "plots"),
            *("sweep", "data_command", "runs_command"),
        ),
    ),
    ("entry", ("cli", "__main__", "")),  # "": the package itself, the API's lazy facade
)


def layer_of(module: str) -> int:
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else ""
    for index, (_, members) in enumerate(LAYERS):
        if name in members:
            return index
    raise AssertionError(f"{module} has no layer in tests/test_structure.py LAYERS")


def imports_up(graph: dict[str, set[str]]) -> list[str]:
    """``a -> b`` for every import of a module of a higher layer."""
    return sorted(
        f"{source} ({LAYERS[layer_of(source)][0]}) -> {target} ({LAYERS[layer_of(target)][0]})"
        for source, targets in graph.items()
        for target in targets
        if layer_of(target) > layer_of(source)
    )


def test_no_module_imports_a_module_of_a_higher_layer() -> None:
    graph = import_graph()
    assert imports_up(graph) == []
    # it can fail: the engine reading the random streams is fine, the streams reading the
    # engine is not
    wrong = {**graph, "metacli.streams": {"metacli.engine.executor"}}
    assert imports_up(wrong) == ["metacli.streams (foundation) -> metacli.engine.executor (engine)"]


def test_the_loop_never_imports_the_run_folder_and_figures_never_import_compare() -> None:
    graph = import_graph()
    assert "metacli.run" not in graph["metacli.loop"]
    assert "metacli.run_folder" not in graph["metacli.loop"]
    assert "metacli.comparison" not in graph["metacli.plots"]
    importers = {name for name, targets in graph.items() if "metacli.cli" in targets}
    assert importers == {"metacli.__main__"}  # the command is imported by nothing else


@pytest.mark.parametrize("group", ["algo", "task", "model", "update"])
def test_group_options_are_the_registered_components(group: str) -> None:
    """The options Hydra offers are the modules that register a class as themselves (and
    any installed plug-ins); conf/ has no file for these groups."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from metacli.options import register

    options = available(group)
    assert "base" not in options and "images" not in options and "maml" in available("algo")
    assert not list((CONF / group).glob("*.yaml"))
    register()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        offered = GlobalHydra.instance().config_loader().get_group_options(group)
    assert sorted(offered) == options


def test_a_helper_module_is_not_an_option() -> None:
    with pytest.raises(
        ConfigError, match=r"task='images' is not an option \(options: cifarfs, cub, fc100, image_"
    ):
        build(compose_config("device=cpu", "task.name=images"))


def blocks(text: str, language: str) -> list[str]:
    return [b.split("```", 1)[0] for b in text.split(f"```{language}\n")[1:]]


def test_the_worked_examples_are_the_shipped_code() -> None:
    """The code blocks of docs/architecture.md are the shipped components' code, and those
    of the README's "Your own method" the examples/ project's, verbatim."""
    root = SOURCE.parents[1]
    architecture = (root / "docs" / "architecture.md").read_text(encoding="utf-8")
    shipped = "".join(
        (SOURCE / name).read_text(encoding="utf-8")
        for name in ("updates/momentum.py", "algorithms/hybrid.py", "tasks/sinusoid.py")
    ) + (root / "examples" / "metacli_example" / "models.py").read_text(encoding="utf-8")
    code = blocks(architecture, "python")
    assert len(code) == 6 and all(block in shipped for block in code)
    readme = (root / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Your own method", 1)[1].split("\n## ", 1)[0]
    example = root / "examples"
    project = "".join(p.read_text(encoding="utf-8") for p in example.rglob("*.py"))
    classes = [b for b in blocks(section, "python") if "def " in b or "class " in b]
    assert len(classes) == 2 and all(block in project for block in classes)
    configs = "".join(p.read_text(encoding="utf-8") for p in example.rglob("*.yaml"))
    (yaml_block,) = blocks(section, "yaml")
    assert all(line in configs for line in yaml_block.splitlines() if not line.startswith("#"))
    (toml,) = blocks(section, "toml")
    assert toml in (example / "pyproject.toml").read_text(encoding="utf-8")
