"""Every command's user errors take one path: exit status 2 and one line on stderr, ``kennel <command>: error: ...``
naming the file, key or reference, no traceback; a bad command line is argparse's error (its usage line, then the
message naming the option). In-process through the dispatcher, on tiny folders: no command gets far enough to work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kennel.cli.command import DEFAULT_MLFLOW, MlflowNames, mlflow_names
from kennel.cli.main import COMMANDS, main
from kennel.core.errors import ConfigError, DataError
from kennel.core.stage import run_stage
from tests.conftest import REPO, small_params, write_params

ONE_LINE, USAGE = "one line", "usage"
BAD_PARAMS = {"params.yaml": small_params(**{"train.batch_size": 0})}
GOOD_PARAMS = {"params.yaml": small_params()}
AN_IMAGE = {"a.png": b"\x89PNG not really, and never read"}

# (command line, files in the project, how it fails, what the message says)
CASES = {
    "predict-missing-file": (["predict", "nothing.jpg"], {}, ONE_LINE, "no such file or folder: nothing.jpg"),
    "predict-missing-model": (["predict", "a.png", "--model", "missing.pt"], AN_IMAGE, ONE_LINE,
                              "cannot load model: 'missing.pt': no such model file"),
    "predict-no-model-file": (["predict", "a.png"], AN_IMAGE, ONE_LINE, "models/model.pt: no model file"),
    "predict-bad-batch-size": (["predict", "a.png", "--batch-size", "0"], AN_IMAGE, USAGE,
                               "argument --batch-size: expected a whole number >= 1, got '0'"),
    "predict-bad-workers": (["predict", "a.png", "--workers", "many"], AN_IMAGE, USAGE,
                            "argument --workers: expected auto or a whole number >= 0, got 'many'"),
    "predict-resume-alone": (["predict", "a.png", "--resume"], AN_IMAGE, USAGE, "--resume needs --output"),
    "predict-onnx-no-model-file": (["predict", "a.png", "--runtime", "onnx"], AN_IMAGE, ONE_LINE,
                                   "models/model.onnx: no ONNX model file"),
    "predict-onnx-not-onnx": (["predict", "a.png", "--runtime", "onnx", "--model", "a.png"], AN_IMAGE, ONE_LINE,
                              "cannot load model: a.png: not a kennel ONNX model"),
    "export-no-model-file": (["export"], {}, ONE_LINE, "models/model.pt: no model file"),
    "export-not-a-model": (["export", "--model", "a.png"], AN_IMAGE, ONE_LINE, "'a.png': not a kennel model file"),
    "export-missing-run": (["export", "--model", "0" * 32], {}, ONE_LINE, f"'{'0' * 32}': no MLflow store at"),
    "export-bad-format": (["export", "--format", "tflite"], {}, USAGE,
                          "argument --format: invalid choice: 'tflite'"),
    "export-bad-quantize": (["export", "--quantize", "int4"], {}, USAGE, "argument --quantize: invalid choice: 'int4'"),
    "compare-missing-run": (["compare", "a", "b"], {}, ONE_LINE, "'a': no MLflow store at"),
    "compare-one-run": (["compare", "a"], {}, USAGE, "give at least two runs to compare"),
    "compare-bad-top": (["compare", "a", "b", "--top", "0"], {}, USAGE, "argument --top: expected a whole number"),
    "compare-bad-params": (["compare", "a", "b"], BAD_PARAMS, ONE_LINE, "params.yaml: train.batch_size = 0"),
    "reproduce-missing-run": (["reproduce", "no-such-thing"], {}, ONE_LINE,
                              "'no-such-thing' is neither an MLflow run id, a DVC experiment name nor a git commit"),
    "reproduce-bad-tolerance": (["reproduce", "HEAD", "--tolerance", "-1"], {}, USAGE,
                                "argument --tolerance: expected a number >= 0, got '-1'"),
    "lr-find-missing-data": (["lr-find"], GOOD_PARAMS, ONE_LINE, "data/audited: no audited splits"),
    "lr-find-missing-params": (["lr-find", "--params", "other.yaml"], {}, ONE_LINE, "other.yaml: file not found"),
    "lr-find-bad-steps": (["lr-find", "--steps", "none"], {}, USAGE, "argument --steps: expected a whole number"),
    "lr-find-bad-range": (["lr-find", "--start-lr", "1", "--end-lr", "0.1"], {}, USAGE,
                          "--start-lr 1 must be below --end-lr 0.1"),
    "lr-find-bad-params": (["lr-find"], BAD_PARAMS, ONE_LINE, "params.yaml: train.batch_size = 0"),
    "review-missing-report": (["review"], {}, ONE_LINE, "reports/audit/label_issues.csv: not found"),
    "review-nothing-to-apply": (["review", "--apply"], {}, ONE_LINE, "data/exclude.draft.csv, data/relabel.draft.csv"),
    "review-bad-top": (["review", "--top", "0"], {}, USAGE, "argument --top: expected a whole number >= 1, got '0'"),
    "ui-missing-store": (["ui"], {}, ONE_LINE, "mlflow.db: no runs yet; run `dvc repro` first"),
    "ui-bad-port": (["ui", "--port", "http"], {}, USAGE, "argument --port: invalid int value: 'http'"),
    "ui-bad-params": (["ui"], BAD_PARAMS, ONE_LINE, "params.yaml: train.batch_size = 0"),
    "ui-params-not-yaml": (["ui"], {"params.yaml": "train: [\n"}, ONE_LINE, "params.yaml: not valid YAML"),
}


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """An empty git repository with a DVC folder, as the working directory."""
    (tmp_path / ".dvc").mkdir()
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_files(root: Path, files: dict[str, dict | str | bytes]) -> None:
    for name, content in files.items():
        if isinstance(content, dict):
            write_params(root / name, content)
        elif isinstance(content, bytes):
            (root / name).write_bytes(content)
        else:
            (root / name).write_text(content)


def one_line(err: str, command: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kennel {command}: error: "), err
    return lines[0]


def usage_error(err: str, command: str) -> str:
    lines = err.splitlines()
    assert lines[0].startswith(f"usage: python -m kennel {command} "), err
    assert lines[-1].startswith(f"python -m kennel {command}: error: "), err
    return lines[-1]


def test_every_command_has_cases():
    assert {argv[0] for argv, *_ in CASES.values()} == set(COMMANDS)
    commands_reading_params = {"compare", "lr-find", "ui"}
    assert {argv[0] for argv, files, *_ in CASES.values() if files is BAD_PARAMS} == commands_reading_params


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_user_error_is_exit_2_and_one_line(project, capsys, case):
    argv, files, kind, says = CASES[case]
    write_files(project, files)
    assert main(argv) == 2
    out = capsys.readouterr()
    line = (one_line if kind == ONE_LINE else usage_error)(out.err, argv[0])
    assert says in line and "Traceback" not in out.err + out.out


def test_reproduce_refuses_bad_recorded_params_before_running_anything(project, capsys):
    """A commit whose params.yaml is wrong: refused once its worktree is out, before any dvc, and the worktree goes."""
    write_files(project, BAD_PARAMS)
    (project / "reports").mkdir()
    (project / "reports/metrics.json").write_text('{"test_accuracy": 0.5}')
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    subprocess.run(["git", "commit", "-qm", "bad params"], cwd=project, check=True)
    assert main(["reproduce", "HEAD"]) == 2
    line = one_line(capsys.readouterr().err, "reproduce")
    assert "params.yaml: train.batch_size = 0" in line
    listed = subprocess.run(["git", "worktree", "list"], cwd=project, capture_output=True, text=True).stdout
    assert listed.count("\n") == 1


def test_no_command_or_an_unknown_one_prints_the_usage(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m kennel {ui,predict,") and all(f"\n  {name} " in err for name in COMMANDS)
    assert main(["serve"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"kennel: error: unknown command 'serve'; choose from {', '.join(COMMANDS)}")
    assert main(["--help"]) == 0
    assert "lr-find     learning-rate range test" in capsys.readouterr().out
    assert main(["review", "--help"]) == 0 and "usage: python -m kennel review" in capsys.readouterr().out


def test_the_mlflow_names_come_from_params_yaml_or_kennels_defaults(tmp_path):
    assert mlflow_names(tmp_path) == DEFAULT_MLFLOW == MlflowNames("kennel", "kennel")  # no params.yaml: browse
    params = small_params(**{"mlflow.experiment": "pets", "mlflow.registered_model": ""})
    write_params(tmp_path / "params.yaml", params)
    assert mlflow_names(tmp_path) == MlflowNames("pets", "")
    write_params(tmp_path / "params.yaml", {**params, "mlflow": {"experiment": "pets"}})
    with pytest.raises(ConfigError, match="missing key mlflow.registered_model"):
        mlflow_names(tmp_path)


def test_a_stage_reports_a_user_error_as_the_commands_do(tmp_path, capsys):
    def body(params):
        raise DataError(f"{tmp_path / 'raw'}: no images\nin any class folder")

    assert run_stage("prepare", body, ["--params", str(write_params(tmp_path / "p.yaml", small_params()))]) == 2
    assert capsys.readouterr().err == f"kennel prepare: error: {tmp_path / 'raw'}: no images in any class folder\n"


def test_python_m_kennel_prints_a_user_error_without_a_traceback(tmp_path):
    (tmp_path / ".dvc").mkdir()
    yaml.safe_dump({"train": {"batch_size": 0}}, (tmp_path / "params.yaml").open("w"))
    out = subprocess.run([sys.executable, "-m", "kennel", "review"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")}, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr == "kennel review: error: reports/audit/label_issues.csv: not found; run the audit stage " \
                         "first (dvc repro audit)\n"
