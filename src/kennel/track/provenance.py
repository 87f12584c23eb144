"""What made a run: code (git commit, uncommitted files), data (dvc.lock hashes) and machine, as run tags."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch
import torchvision
import yaml

import kennel
from kennel.core.machine import cpu_name
from kennel.core.versioning import base_commit, git


def provenance_tags(root: Path) -> dict[str, str]:
    """Code, data and environment identity, so a run can be traced back to what made it."""
    here = Path.cwd()
    tags = {
        "kennel.version": kennel.__version__,
        "torch.version": torch.__version__,
        "torchvision.version": torchvision.__version__,
        "cuda.version": torch.version.cuda or "none",
        "host.python": platform.python_version(),
        "host.device": device_name(),
    }
    # In a DVC experiment the workspace sits on a temporary commit; the baseline is the one the repo keeps.
    commit = base_commit(here)
    if commit:
        changed = [f for f in git(["diff", "--name-only", commit], here).splitlines() if not _is_result(f, here)]
        tags.update({
            "mlflow.source.git.commit": commit,
            "git.commit": commit,
            "git.branch": git(["rev-parse", "--abbrev-ref", "HEAD"], here),
            "git.dirty": str(bool(changed)).lower(),
        })
        if changed:
            tags["git.changed_files"] = ", ".join(changed)[:5000]
    for env, tag in (("DVC_EXP_NAME", "dvc.exp_name"), ("DVC_EXP_BASELINE_REV", "dvc.exp_baseline_rev"),
                     ("KENNEL_REPRODUCES", "kennel.reproduces")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    tags.update(data_fingerprint(here / "dvc.lock"))
    return tags


def _is_result(path: str, workspace: Path) -> bool:
    """Files that differ from the commit without making the code differ: params (recorded on the run), the
    lock, the .gitignore entries DVC keeps for outputs, and pipeline outputs being rewritten (reports, plots)."""
    if path in ("params.yaml", "dvc.lock") or Path(path).name == ".gitignore":
        return True
    return any(path == out or path.startswith(out.rstrip("/") + "/") for out in _pipeline_outputs(workspace))


def _pipeline_outputs(workspace: Path) -> list[str]:
    try:
        stages = yaml.safe_load((workspace / "dvc.yaml").read_text()).get("stages", {})
    except (OSError, AttributeError, yaml.YAMLError):
        return []
    outs = []
    for stage in stages.values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []) or []:
                outs.append(next(iter(entry)) if isinstance(entry, dict) else str(entry))
    return outs


def data_fingerprint(lock: Path) -> dict[str, str]:
    """The dvc.lock hashes of the data outputs a run used: the same hash means the same bytes."""
    try:
        stages = yaml.safe_load(lock.read_text()).get("stages", {})
    except (OSError, AttributeError, yaml.YAMLError):
        return {}
    tags = {}
    for stage in ("prepare", "resize"):
        for out in stages.get(stage, {}).get("outs", []):
            if out.get("path", "").startswith("data/") and out.get("md5"):
                tags[f"dvc.data.{out['path']}"] = out["md5"]
    return tags


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return cpu_name()
