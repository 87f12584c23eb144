"""Every kennel source file a stage runs is a dependency of that stage in dvc.yaml, so editing it reruns the stage.

Each stage script is imported in a fresh interpreter (what it loads at import time), and the kennel modules those
files import inside functions are followed too (loaded later, while the stage runs).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]

LOADED = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("stage_under_test", sys.argv[1])
spec.loader.exec_module(importlib.util.module_from_spec(spec))
print(json.dumps(sorted({m.__file__ for m in list(sys.modules.values()) if getattr(m, "__file__", None)})))
"""


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


@pytest.fixture(scope="module")
def loaded() -> dict[str, set[Path]]:
    """Per stage, the kennel files it loads; the interpreters run side by side."""
    procs = {
        name: subprocess.Popen([sys.executable, "-c", LOADED, str(REPO / f"stages/{name}.py")], cwd=REPO,
                               env={"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(REPO / "src"),
                                    "KENNEL_OFFLINE": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name in STAGES
    }
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr
        src = (REPO / "src" / "kennel").resolve()
        files = {Path(f).resolve() for f in json.loads(stdout)}
        files = {f for f in files if f.is_relative_to(src)}
        for f in list(files):
            files |= imported_later(f)
        out[name] = files
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
