import copy
import importlib

import pytest

from kennel.core.errors import ConfigError
from kennel.core.params import load_params, params_from_dict
from tests.conftest import REPO, default_params, write_params


def test_shipped_params_load_and_flatten():
    params = load_params(REPO / "params.yaml")
    flat = params.flat()
    assert flat["train.lr"] == params.train.lr
    assert flat["resize.size"] == 224
    assert flat["data.source"] == "synthetic"
    assert all("." in k for k in flat if k != "seed")


def _with(dotted: str, value, delete: bool = False) -> dict:
    p = copy.deepcopy(default_params())
    *parents, key = dotted.split(".")
    node = p
    for part in parents:
        node = node[part]
    if delete:
        del node[key]
    else:
        node[key] = value
    return p


BAD = [
    # (dotted key, bad value, words the message must contain)
    ("train.lrr", 0.1, ["unknown key train.lrr", "lr"]),
    ("colour", "red", ["unknown key colour", "seed"]),
    ("train.lr", 0, ["train.lr", "0", "> 0"]),
    ("train.lr", -1e-3, ["train.lr", "-0.001"]),
    ("train.lr", "fast", ["train.lr", "'fast'", "number"]),
    ("train.batch_size", 0, ["train.batch_size", "0", ">= 1"]),
    ("train.batch_size", 3.5, ["train.batch_size", "3.5", "integer"]),
    ("train.epochs", True, ["train.epochs", "True", "integer"]),
    ("data.val_fraction", 1.0, ["data.val_fraction", "1.0", "[0, 1)"]),
    ("data.test_fraction", -0.1, ["data.test_fraction", "-0.1", "[0, 1)"]),
    ("data.source", "kaggle-zip", ["data.source", "'kaggle-zip'", "synthetic | folder"]),
    ("model.finetune", "partial", ["model.finetune", "'partial'", "full | head"]),
    ("model.arch", "vgg16", ["model.arch", "'vgg16'", "resnet18"]),
    ("train.device", "tpu", ["train.device", "'tpu'", "auto | cpu | cuda | mps"]),
    ("train.optimizer", "lion", ["train.optimizer", "'lion'", "sgd | adam | adamw"]),
    ("resize.size", 8, ["resize.size", "8", ">= 32"]),
    ("mlflow.experiment", 3, ["mlflow.experiment", "3", "string"]),
    ("evaluate.top_losses", 0, ["evaluate.top_losses", "0", ">= 1"]),
    ("evaluate.calibration_bins", 1, ["evaluate.calibration_bins", "1", ">= 2"]),
    ("mlflow.system_metrics", "yes", ["mlflow.system_metrics", "'yes'", "true"]),
    ("train", "fast", ["train", "'fast'", "mapping"]),
    ("audit.duplicate_floor", 1.5, ["audit.duplicate_floor", "1.5", "(0, 1]"]),
    ("audit.duplicate_floor", "high", ["audit.duplicate_floor", "'high'", "number"]),
    ("audit.duplicate_margin", 1, ["audit.duplicate_margin", "1", "[0, 1)"]),
    ("audit.outlier_score", 0, ["audit.outlier_score", "0", "> 0"]),
    ("audit.hash_distance", 256, ["audit.hash_distance", "256", "[0, 255]"]),
    ("audit.group_splits", "yes", ["audit.group_splits", "'yes'", "true or false"]),
    ("audit.figure_pairs", 0, ["audit.figure_pairs", "0", ">= 1"]),
    ("audit.batch_size", 0, ["audit.batch_size", "0", ">= 1"]),
    ("audit.batch_size", "many", ["audit.batch_size", "'many'", "an integer or auto"]),
    ("audit.neighbours", 5, ["unknown key audit.neighbours", "duplicate_floor"]),
    ("train.blend", 1.5, ["train.blend", "1.5", "[0, 1]"]),
    ("train.blend", -0.1, ["train.blend", "-0.1", "[0, 1]"]),
    ("train.blend", "half", ["train.blend", "'half'", "number"]),
    ("train.refit", "yes", ["train.refit", "'yes'", "auto | members | true | false"]),
    ("train.head_init", "zeros", ["train.head_init", "'zeros'", "probe | random"]),
]


@pytest.mark.parametrize("key,value,words", BAD, ids=[b[0] + "=" + repr(b[1]) for b in BAD])
def test_bad_value_names_key_value_and_allowed(key, value, words):
    with pytest.raises(ConfigError) as err:
        params_from_dict(_with(key, value))
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("key", ["seed", "train.lr", "data.raw_dir", "mlflow.experiment", "model", "audit",
                                 "audit.group_splits"])
def test_missing_key_is_named(key):
    with pytest.raises(ConfigError, match=f"missing key {key}"):
        params_from_dict(_with(key, None, delete=True))


def test_fractions_must_leave_training_data():
    p = _with("data.val_fraction", 0.5)
    p["data"]["test_fraction"] = 0.5
    with pytest.raises(ConfigError, match="val_fraction \\+ data.test_fraction"):
        params_from_dict(p)


def test_own_images_on_the_synthetic_placeholder_are_refused():
    p = default_params()
    assert p["data"]["raw_dir"] == "data/synthetic"  # the shipped default, with the synthetic source
    params_from_dict(p)
    p["data"]["source"] = "folder"
    with pytest.raises(ConfigError, match=r"data.raw_dir = 'data/synthetic' with data.source = 'folder'.*data/raw"):
        params_from_dict(p)
    p["data"]["raw_dir"] = "data/raw"
    params_from_dict(p)


def test_scientific_notation_lr_is_a_number():
    assert params_from_dict(_with("train.lr", "1e-4")).train.lr == pytest.approx(1e-4)


def test_an_unquoted_off_in_yaml_is_the_word_off(tmp_path):
    # PyYAML and `dvc exp run -S train.amp=off` read an unquoted `off` as false
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text().replace("amp: auto", "amp: off"))
    assert load_params(path).train.amp == "off"
    with pytest.raises(ConfigError, match="train.amp = True: allowed: auto"):
        params_from_dict(_with("train.amp", True))


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_params(bad)
    write_params(bad, _with("train.lr", 0))
    with pytest.raises(ConfigError, match="bad.yaml: train.lr"):
        load_params(bad)


@pytest.mark.parametrize("stage", ["prepare", "resize", "audit", "train", "evaluate", "export"])
def test_stage_rejects_bad_params_before_any_work(tmp_path, stage, monkeypatch, capsys):
    write_params(tmp_path / "params.yaml", _with("train.batch_size", 0))
    monkeypatch.chdir(tmp_path)  # in-process: each stage also runs as a script under `dvc repro` in test_pipeline.py
    assert importlib.import_module(f"stages.{stage}").main([]) == 2
    err = capsys.readouterr().err
    assert "train.batch_size = 0" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def _readme_table(heading: str) -> list[dict[str, str]]:
    """The rows of the first Markdown table in the section ``heading`` of README.md or the docs/ page that has it, as
    {column: cell}."""
    from tests.conftest import doc_section

    lines = doc_section(heading).text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), None)
    assert start is not None, f"no table in the section {heading!r}"
    stop = next((i for i, line in enumerate(lines[start:], start) if not line.startswith("|")), len(lines))
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[start:stop]]
    return [dict(zip(cells[0], row, strict=True)) for row in cells[2:]]


def test_every_params_key_is_in_the_readme_table_with_its_shipped_default():
    rows = {r["key"].strip("`"): r["default"] for r in _readme_table("## Params")}
    flat = load_params(REPO / "params.yaml").flat()
    documented = {}
    for key, default in rows.items():  # "train.augment.scale_min`, `scale_max" rows name two keys
        names = [k.strip("` ") for k in key.split(",")]
        values = [v.strip() for v in default.split(",")] if len(names) > 1 else [default]
        prefix = names[0].rpartition(".")[0]
        for name, value in zip(names, values, strict=True):
            documented[name if "." in name or not prefix else f"{prefix}.{name}"] = value
    assert set(documented) == set(flat)
    for key, value in flat.items():
        shipped = str(value).lower() if isinstance(value, bool) else str(value)
        cell = documented[key].split(" (")[0]  # "data/synthetic (placeholder)": a note may follow the value
        assert cell in (shipped, f"{value:g}" if isinstance(value, float) else shipped, '""'), key


def test_what_each_mode_does_is_what_the_readme_says():
    import dataclasses

    from kennel.train.recipe import Recipe

    params = load_params(REPO / "params.yaml")
    rows = _readme_table("### What each mode does with the shipped params")
    assert [r["model.finetune"] for r in rows] == ["`head`", "`staged`", "`full`"]
    for row in rows:
        mode = row["model.finetune"].strip("`")
        p = dataclasses.replace(params, model=dataclasses.replace(params.model, finetune=mode))
        assert row["with pretrained weights"] == "; then ".join(Recipe.from_params(p, pretrained=True).describe()), mode
