"""Every kennel source file a stage runs is a dependency of that stage in dvc.yaml, so editing it reruns the stage.

What a stage runs is followed from its script through every kennel import statement, at the top of a file or inside
a function (loaded while the stage runs), with the packages each module sits in: the same files a fresh interpreter
loads, without starting one per stage. Imports by name at run time (importlib) are listed in DYNAMIC below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]

def kennel_file(module: str) -> Path | None:
    parts = module.split(".")
    if parts[0] != "kennel":
        return None
    base = REPO / "src" / Path(*parts)
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.exists()), None)


def imported_later(path: Path) -> set[Path]:
    """kennel files that ``path`` imports inside functions (and what those import, recursively)."""
    seen: set[Path] = set()
    todo = [path]
    while todo:
        tree = ast.parse(todo.pop().read_text())
        # Imports under `if TYPE_CHECKING:` never run.
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(block.test) for n in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
                if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            for found in filter(None, map(kennel_file, names)):
                if found not in seen:
                    seen.add(found)
                    todo.append(found)
    return seen


def packages(path: Path) -> set[Path]:
    """The ``__init__.py`` of each package above ``path`` in src/: importing a module runs them first."""
    src = REPO / "src"
    return {parent / "__init__.py" for parent in path.parents
            if parent.is_relative_to(src) and parent != src and (parent / "__init__.py").exists()}


@pytest.fixture(scope="module")
def loaded() -> dict[str, set[Path]]:
    """Per stage, the kennel files it loads."""
    out = {}
    for name in STAGES:
        files = imported_later(REPO / f"stages/{name}.py")
        out[name] = {f.resolve() for found in files for f in (found, *packages(found))}
    return out


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_depends_on_every_kennel_file_it_runs(stage, loaded):
    assert loaded[stage], "the stage loaded no kennel code: is PYTHONPATH right?"
    deps = {(REPO / d).resolve() for d in STAGES[stage]["deps"] if isinstance(d, str) and "${" not in d}
    covered = lambda f: any(f == d or f.is_relative_to(d) for d in deps)  # a folder dep covers its files
    missing = sorted(str(f.relative_to(REPO)) for f in loaded[stage] if not covered(f))
    assert not missing, f"dvc.yaml stage {stage!r} runs these files but does not list them in deps: {missing}"
    assert (REPO / f"stages/{stage}.py").resolve() in deps


def test_the_guard_sees_a_missing_dependency(loaded):
    """The check above can fail: train loads the tracking code, and without that folder it would be reported."""
    assert (REPO / "src/kennel/track/store.py").resolve() in loaded["train"]
    assert not any(f.is_relative_to(REPO / "src/kennel/track") for f in loaded["prepare"] | loaded["resize"])


def test_code_deps_are_a_few_folders():
    for name, stage in STAGES.items():
        code = [d for d in stage["deps"] if d.startswith("src/")]
        folders = [d for d in code if (REPO / d).is_dir()]
        assert len(folders) <= 6 and set(code) - set(folders) == {"src/kennel/__init__.py"}, (name, code)


def test_train_reruns_when_any_training_param_changes():
    """`dvc exp run -S train.X=...` reruns train only if train.X is one of the stage's params."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    listed = {p for p in STAGES["train"]["params"] if isinstance(p, str)}
    keys = [f"{section}.{key}" for section in ("model", "train") for key in params[section]]
    missing = [k for k in keys if k not in listed]
    assert not missing, f"dvc.yaml stage 'train' does not list these params: {missing}"


# Modules that import other kennel modules by name at run time, which the import statements above do not show, and
# the folder each loads from: a stage that runs one depends on that folder already.
DYNAMIC = {"src/kennel/cli/main.py": "src/kennel/cli", "src/kennel/track/__init__.py": "src/kennel/track"}


def test_imports_by_name_stay_in_their_folder():
    calls = {str(path.relative_to(REPO)) for path in (REPO / "src/kennel").rglob("*.py")
             if "import_module(" in path.read_text()}
    assert calls == set(DYNAMIC), (
        f"{sorted(calls - set(DYNAMIC))} import kennel modules by name: the stage dependency check cannot follow "
        "them; list each in DYNAMIC with the folder it loads from (and make that folder a dependency of the stages "
        "that run it)")
    for path, folder in DYNAMIC.items():
        tree = ast.parse((REPO / path).read_text())
        strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                   and n.value.startswith("kennel.")}
        assert strings and all(kennel_file(m) and kennel_file(m).is_relative_to(REPO / folder) for m in strings), \
            (path, strings)
