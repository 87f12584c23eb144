"""The folder layout is the pipeline: imports point down (core <- data <- model <- train, audit, evaluate, export
<- track <- cli), only track imports MLflow, no command imports another, and no import goes round in a circle.
Checked on the source (every import, also those inside functions)."""

from __future__ import annotations

import ast
import graphlib

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "src" / "kennel"
# What each folder may import from kennel, besides itself.
ALLOWED = {
    "core": set(),
    "data": {"core"},
    "model": {"core", "data"},  # the network, its weights and file, inference: no training code
    "train": {"core", "data", "model"},
    "audit": {"core", "data", "model"},  # the backbone embeds the images; the splits it writes are data
    "evaluate": {"core", "data", "model", "train"},  # batched prediction is the training loop's
    "export": {"core", "data", "model"},  # the model file as ONNX, checked; running it is the model's
    "track": {"core", "data", "model", "train"},
    "cli": {"core", "data", "model", "train", "evaluate", "track", "audit", "export"},  # the commands: everything
}
# What a command module (cli/<command>.py) may import of cli/: the shared module only; the dispatcher imports the
# commands by name from its table.
CLI_SHARED = {"kennel.cli", "kennel.cli.command"}


def imports(path) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found += [(node.module, node.lineno)] + [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
    return found


def test_every_module_sits_in_a_folder_of_the_pipeline():
    loose = [p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert not loose and {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(ALLOWED)


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_imports_point_down(folder):
    wrong = []
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        for name, line in imports(path):
            parts = name.split(".")
            if parts[0] == "kennel" and len(parts) > 1 and parts[1] in ALLOWED:
                if parts[1] != folder and parts[1] not in ALLOWED[folder]:
                    wrong.append(f"{path.relative_to(REPO)}:{line} imports {name}")
            if parts[0] == "mlflow" and folder != "track":
                wrong.append(f"{path.relative_to(REPO)}:{line} imports {name} (only track/ imports mlflow)")
    assert not wrong, "\n".join(wrong)


def test_the_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from kennel.track import store\n    import mlflow\n")
    assert ("kennel.track", 2) in imports(bad) and ("mlflow", 3) in imports(bad)


def module_name(path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """Module -> the kennel modules it imports: ``from a import b`` is module ``a.b`` where that is one, else ``a``."""
    graph = {}
    for name, path in MODULES.items():
        targets = set()
        for imported, _ in imports(path):
            while imported and imported not in MODULES:  # a name inside a module: the module
                imported = imported.rpartition(".")[0]
            if imported.startswith("kennel") and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle of ``graph`` (its modules, the first repeated at the end), or [] when there is none."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as err:
        return list(reversed(err.args[1]))  # graphlib lists it against the arrows
    return []


def test_no_import_circle():
    found = cycle(import_graph())
    assert not found, " -> ".join(found)


def test_the_circle_check_can_fail():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) in (["a", "b", "c", "a"], ["b", "c", "a", "b"],
                                                                        ["c", "a", "b", "c"])
    assert cycle({"a": {"b"}, "b": set()}) == []
    graph = import_graph()
    assert "kennel.core.params" in graph["kennel.cli.command"]  # a module-level import
    assert "kennel.track.refs" in graph["kennel.cli.predict"]  # a function-level one


def test_no_command_imports_another_or_the_dispatcher():
    wrong = []
    for path in sorted((PACKAGE / "cli").glob("*.py")):
        for name, line in imports(path):
            if name.startswith("kennel.cli") and name not in CLI_SHARED and not name.startswith("kennel.cli.command."):
                wrong.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_the_dispatch_table_names_a_module_with_run_for_every_command_module():
    from kennel.cli.main import COMMANDS

    modules = {path for path, _ in COMMANDS.values()}
    assert all(m.startswith("kennel.cli.") and m in MODULES for m in modules)
    own = {"kennel.cli", "kennel.cli.main", "kennel.cli.command"}
    assert modules == {m for m in MODULES if m.startswith("kennel.cli")} - own  # every command, once
    assert all("def run(" in MODULES[m].read_text() for m in modules)
