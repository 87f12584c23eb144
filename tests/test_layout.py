"""The folder layout is the pipeline: imports point down (core <- data <- model <- train, audit, evaluate <- track
<- serve),
and only track imports MLflow. Checked on the source (every import, also those inside functions)."""

from __future__ import annotations

import ast

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
    "track": {"core", "data", "model", "train"},
    "serve": {"core", "data", "model", "train", "evaluate", "track", "audit"},
}


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
