"""``python -m kennel reproduce REF``: rerun a past result from its commit and compare the metrics.

REF is an MLflow run id, a git commit (or branch/tag) or a DVC experiment name. The code comes from a git
worktree of the recorded commit in a temp dir (removed afterwards, whatever happens); the params are the ones
recorded on the run; the data stages are restored from the DVC cache when it has them (else rerun); train and
evaluate always run again. Recorded and reproduced test metrics are printed side by side.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kennel.cli.command import command_parser, number
from kennel.core.errors import ReproduceError
from kennel.core.params import load_params
from kennel.core.paths import project_root, tracking_uri
from kennel.core.versioning import RUN_ID, commit_unversioned_reason, committed_files, git
from kennel.track import find_run

METRICS = ("accuracy", "macro_f1", "roc_auc")
DATA_STAGES = ("prepare", "resize", "audit")  # restored from the cache, in pipeline order


@dataclass
class Target:
    ref: str
    commit: str
    recorded: dict[str, float]
    params: dict[str, str] = field(default_factory=dict)  # flat, as MLflow recorded them; empty: the commit's
    run_id: str = ""


def _metrics_at(commit: str, root: Path) -> dict[str, float]:
    text = git(["show", f"{commit}:reports/metrics.json"], root)
    return compared_metrics(json.loads(text)) if text else {}


def compared_metrics(metrics_json: dict) -> dict[str, float]:
    """The compared metrics from a reports/metrics.json: flat ``test_<name>`` keys, or the ``{"test": {...}}`` that
    commits made before the headline file wrote."""
    test = metrics_json.get("test") or {k.removeprefix("test_"): v for k, v in metrics_json.items()}
    return {k: float(test[k]) for k in METRICS if k in test}


def _from_run(run_id: str, root: Path) -> Target | None:
    found = find_run(root, run_id)
    if found is None:
        return None
    tags = found.data.tags
    if "git.commit" not in tags:
        raise ReproduceError(f"run {run_id} records no git commit: it was not made inside a git repository")
    if tags.get("git.dirty") == "true":
        raise ReproduceError(
            f"run {run_id} was made from uncommitted changes ({tags.get('git.changed_files', 'unknown files')}): "
            "its code is in no commit, so it cannot be reproduced"
        )
    if tags.get("kennel.data_versioned") == "false":
        raise ReproduceError(f"run {run_id} is {tags.get('kennel.data_warning', 'not reproducible from its commit')}")
    recorded = {k: found.data.metrics[f"test_{k}"] for k in METRICS if f"test_{k}" in found.data.metrics}
    return Target(run_id, tags["git.commit"], recorded, dict(found.data.params), run_id)


def resolve(ref: str, root: Path) -> Target:
    """What to reproduce: an MLflow run id, else a DVC experiment name, else a git commit-ish."""
    target = _from_run(ref, root) if RUN_ID.fullmatch(ref) else None
    if target is None:
        exp_refs = git(["for-each-ref", "--format=%(refname) %(objectname)", "refs/exps"], root).splitlines()
        for line in exp_refs:
            name, commit = line.split()
            if name.rsplit("/", 1)[-1] == ref:
                target = Target(ref, commit, _metrics_at(commit, root))
                break
    if target is None:
        commit = git(["rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], root)
        if not commit:
            raise ReproduceError(f"{ref!r} is neither an MLflow run id, a DVC experiment name nor a git commit here")
        target = Target(ref, commit, _metrics_at(commit, root))
    if subprocess.run(["git", "cat-file", "-e", f"{target.commit}^{{commit}}"], cwd=root,
                      capture_output=True).returncode:
        raise ReproduceError(f"commit {target.commit} recorded for {ref} is not in this repository (git fetch it?)")
    source, raw_dir = _data_params(target, root)
    if why := commit_unversioned_reason(root, target.commit, source, raw_dir):
        raise ReproduceError(f"{ref} is not reproducible from its commit {target.commit[:12]}: {why}")
    if not target.recorded:
        raise ReproduceError(f"no recorded test metrics for {ref} (not on an MLflow run, not in reports/metrics.json)")
    return target


def _data_params(target: Target, root: Path) -> tuple[str, str]:
    """``data.source`` and ``data.raw_dir`` the target used: recorded on the run, else the commit's params.yaml."""
    data = (yaml.safe_load(git(["show", f"{target.commit}:params.yaml"], root) or "{}") or {}).get("data", {})
    source = target.params.get("data.source", data.get("source", "synthetic"))
    return source, target.params.get("data.raw_dir", data.get("raw_dir", ""))


def apply_params(params_file: Path, flat: dict[str, str]) -> None:
    """Write MLflow's flat string params back into params.yaml, with the types the file already has."""
    tree = yaml.safe_load(params_file.read_text())
    for key, text in flat.items():
        *parents, last = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        old = node.get(last)
        node[last] = yaml.safe_load(text) if not isinstance(old, str) else text
    params_file.write_text(yaml.safe_dump(tree, sort_keys=False))


def _dvc(args: Sequence[str], cwd: Path, env: dict, check: bool = True) -> int:
    out = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, text=True,
                         stdout=sys.stderr, stderr=subprocess.STDOUT)
    if check and out.returncode:
        raise ReproduceError(f"dvc {' '.join(args)} failed (exit {out.returncode}) in the worktree")
    return out.returncode


def restore_inputs(tree: Path, commit: str, root: Path, env: dict) -> None:
    """Bring back every DVC-tracked input of ``commit`` (the ``.dvc`` files: raw images and the like) from the
    cache, or from the default remote when the cache lacks it; refuse, naming the path, when neither has it."""
    remote = subprocess.run([sys.executable, "-m", "dvc", "remote", "default"], cwd=tree, env=env,
                            capture_output=True, text=True).stdout.strip()
    for dvc_file in sorted(f for f in committed_files(root, commit)
                           if f.endswith(".dvc")):
        if _dvc(["checkout", dvc_file], tree, env, check=False) == 0:
            continue
        if remote and _dvc(["pull", dvc_file], tree, env, check=False) == 0:
            continue
        where = f"nor on the default remote {remote!r}" if remote else "and no default DVC remote is configured"
        raise ReproduceError(
            f"{dvc_file.removesuffix('.dvc')} ({dvc_file} at {commit[:12]}) is not in the DVC cache {where}: "
            f"run `dvc pull {dvc_file}` (with the remote that has it), or `dvc push` on the machine that made it"
        )


def reproduce(target: Target, root: Path) -> dict[str, float]:
    """Rerun ``target`` in a temporary worktree; returns the reproduced test metrics."""
    tmp = Path(tempfile.mkdtemp(prefix="kennel-reproduce-"))
    tree = tmp / "worktree"
    git(["worktree", "add", "--detach", str(tree), target.commit], root, check=True)
    try:
        if target.params:
            apply_params(tree / "params.yaml", target.params)
        load_params(tree / "params.yaml")  # bad recorded params fail here, not half way
        env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(root), "KENNEL_REPRODUCES": target.ref}
        env.pop("DVC_ROOT", None)
        if (root / ".dvc" / "config.local").is_file():  # remotes configured on this machine only
            shutil.copy(root / ".dvc" / "config.local", tree / ".dvc" / "config.local")
        cache = subprocess.run([sys.executable, "-m", "dvc", "cache", "dir"], cwd=root, env=env, capture_output=True,
                               text=True).stdout.strip() or str(root / ".dvc" / "cache")
        _dvc(["cache", "dir", "--local", cache], tree, env)  # this repository's cache: the data is already there
        restore_inputs(tree, target.commit, root, env)
        # Data: restored from the cache when it has it, else recomputed. Checked out, not left to the run cache:
        # the data stages keep persistent outputs (to redo only what changed), which DVC's run cache skips.
        # Commits made before the audit stage existed have only prepare and resize.
        data = [s for s in DATA_STAGES if s in yaml.safe_load((tree / "dvc.yaml").read_text())["stages"]]
        _dvc(["checkout", "--allow-missing", *data], tree, env)
        _dvc(["repro", data[-1]], tree, env)
        # the result itself is always recomputed: both stages, in this order, in one dvc call
        _dvc(["repro", "--force", "--single-item", "--no-run-cache", "train", "evaluate"], tree, env)
        return compared_metrics(json.loads((tree / "reports" / "metrics.json").read_text()))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=root, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
        git(["worktree", "prune"], root)


def compare(recorded: dict[str, float], reproduced: dict[str, float], tolerance: float) -> tuple[bool, str]:
    lines = [f"{'metric':<10} {'recorded':>12} {'reproduced':>12} {'difference':>12}"]
    ok = True
    for key in recorded:
        got = reproduced.get(key)
        diff = abs(got - recorded[key]) if got is not None else float("inf")
        ok &= diff <= tolerance
        lines.append(f"{key:<10} {recorded[key]:>12.6f} {got if got is not None else float('nan'):>12.6f} "
                     f"{diff:>12.3g}{'' if diff <= tolerance else '  MISMATCH'}")
    return ok, "\n".join(lines)


def run(argv: Sequence[str]) -> int:
    parser = command_parser("reproduce", __doc__)
    parser.add_argument("ref", help="MLflow run id, git commit/branch/tag, or DVC experiment name")
    parser.add_argument("--tolerance", type=number(float, 0.0), default=0.0,
                        help="largest allowed absolute difference per metric (default 0: exact, as on a CPU)")
    args = parser.parse_args(argv)
    root = project_root()
    target = resolve(args.ref, root)
    print(f"reproducing {args.ref} at commit {target.commit[:12]}"
          + (f" with the params of run {target.run_id}" if target.run_id else ""), flush=True)
    ok, table = compare(target.recorded, reproduce(target, root), args.tolerance)
    print(table)
    print("reproduced" if ok else f"NOT reproduced (tolerance {args.tolerance:g})")
    return 0 if ok else 1

