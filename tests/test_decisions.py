"""data/exclude.csv and data/relabel.csv: prepare applies them exactly as written, and a row it cannot use is an
error naming the file and the line."""

from __future__ import annotations

import hashlib
import json
import logging

import pandas as pd
import pytest

from kennel.core.errors import DataError
from kennel.data.decisions import EXCLUDED, NO_DECISIONS, read_decisions
from kennel.data.manifest import REJECT_COLUMNS, account
from kennel.data.sources import find_images
from kennel.data.validate import DUPLICATE, inspect_all
from tests.conftest import dvc, make_project, own_images, run, small_params


@pytest.fixture
def raw(tmp_path):
    own_images(tmp_path / "data/raw", per_class=6)
    (tmp_path / "data/raw/cat/copy.jpg").write_bytes((tmp_path / "data/raw/cat/cat.0.jpg").read_bytes())
    return tmp_path


def accounted(root, decisions=NO_DECISIONS):
    candidates = find_images("folder", root / "data/raw")
    return account(candidates, inspect_all(candidates, 8, 10**8), root, 0.2, 0.2, 0, decisions)


def write(path, text: str):
    path.write_text(text)
    return path


def sha1_of(acc, path: str) -> str:
    return acc.manifest.set_index("path").loc[path, "sha1"]


def test_exclude_and_relabel_change_the_manifest_and_rejects_exactly_as_written(raw, caplog):
    before = accounted(raw)
    cat0, dog1 = sha1_of(before, "data/raw/cat/cat.0.jpg"), sha1_of(before, "data/raw/dog/dog.1.jpg")
    cat2 = sha1_of(before, "data/raw/cat/cat.2.jpg")
    exclude = write(raw / "exclude.csv", f"path,sha1,reason\ndata/raw/cat/cat.3.jpg,,blurred\n,{cat0},not a cat\n")
    relabel = write(raw / "relabel.csv",
                    f"sha1,label,reason\n{dog1},cat,a cat on a dog's photo\n{cat2},cat,\n{dog1},cat,twice\n")
    after = accounted(raw, read_decisions(exclude, relabel))

    excluded = after.rejects[after.rejects["reason"] == EXCLUDED]
    assert excluded.values.tolist() == [  # both copies of cat.0's bytes, by sha1; cat.3 by path
        ["data/raw/cat/cat.0.jpg", "cat", EXCLUDED, "not a cat"],
        ["data/raw/cat/cat.3.jpg", "cat", EXCLUDED, "blurred"],
        ["data/raw/cat/copy.jpg", "cat", EXCLUDED, "not a cat"],
    ]
    assert list(after.rejects.columns) == REJECT_COLUMNS and DUPLICATE not in set(after.rejects["reason"])
    assert len(before.rejects) == 1  # the copy, as a duplicate
    kept = after.manifest.set_index("path")
    assert kept.loc["data/raw/dog/dog.1.jpg", "label"] == "cat"
    changed = before.manifest.merge(after.manifest, on="path", suffixes=("", "_after"))
    assert (changed["split"] == changed["split_after"]).all()  # a relabel never moves an image between splits
    assert changed.loc[changed["label"] != changed["label_after"], "path"].tolist() == ["data/raw/dog/dog.1.jpg"]
    assert set(before.manifest["path"]) - set(after.manifest["path"]) == {"data/raw/cat/cat.0.jpg",
                                                                          "data/raw/cat/cat.3.jpg"}
    s = after.summary
    assert s["found"] == s["kept"] + s["rejected"] == 13
    assert (s["relabelled"], s["relabelled_by_class"]) == (1, {"dog -> cat": 1})  # cat.2's row changes nothing
    assert s["rejected_by_reason"] == {EXCLUDED: 3}
    assert "matches no image" not in caplog.text  # a repeated row is no stale one


def test_a_relabel_resolves_a_label_conflict(raw):
    (raw / "data/raw/dog/same.jpg").write_bytes((raw / "data/raw/cat/cat.1.jpg").read_bytes())
    conflict = accounted(raw).rejects.set_index("path")
    assert conflict.loc["data/raw/dog/same.jpg", "detail"].startswith("same bytes labelled cat, dog")
    sha1 = hashlib.sha1((raw / "data/raw/cat/cat.1.jpg").read_bytes()).hexdigest()
    acc = accounted(raw, read_decisions(raw / "none.csv", write(raw / "relabel.csv", f"sha1,label\n{sha1},dog\n")))
    assert acc.manifest.set_index("path").loc["data/raw/cat/cat.1.jpg", "label"] == "dog"
    assert acc.rejects.set_index("path").loc["data/raw/dog/same.jpg", "reason"] == DUPLICATE


def test_rows_that_match_nothing_are_reported_not_fatal(raw, caplog):
    decisions = read_decisions(write(raw / "exclude.csv", f"path,sha1,reason\ndata/raw/cat/gone.jpg,,\n,{'a' * 40},\n"),
                               write(raw / "relabel.csv", f"sha1,label,reason\n{'B' * 40},dog,\n"))
    with caplog.at_level(logging.WARNING, logger="kennel.data.decisions"):
        acc = accounted(raw, decisions)
    assert len(acc.manifest) == 12
    for line in ("exclude.csv, line 2: path data/raw/cat/gone.jpg matches no image found",
                 f"exclude.csv, line 3: sha1 {'a' * 40} matches no image found",
                 f"relabel.csv, line 2: sha1 {'b' * 40} matches no image found"):
        assert line in caplog.text


def test_missing_files_hold_no_decisions(tmp_path):
    decisions = read_decisions(tmp_path / "exclude.csv", tmp_path / "relabel.csv")
    assert not decisions.exclude and not decisions.relabel


@pytest.mark.parametrize(("exclude", "relabel", "message"), [
    ("path,reason\n", "sha1,label,reason\n", "exclude.csv: header path,reason lacks column(s) sha1; expected "
                                             "path,sha1,reason"),
    ("path,sha1,reason\n,,no file named\n", "sha1,label,reason\n", "exclude.csv, line 2: names no file"),
    ("path,sha1,reason\na.jpg,12ab,\n", "sha1,label,reason\n", "exclude.csv, line 2: sha1 '12ab' is not 40 "
                                                              "hexadecimal digits"),
    ("path,sha1,reason\na.jpg,,blurry, dark\n", "sha1,label,reason\n", "exclude.csv, line 2: more fields than"),
    ("path,sha1,reason\n", f"sha1,label,reason\n{'c' * 40},,\n", "relabel.csv, line 2: label is empty"),
    ("path,sha1,reason\n", f"sha1,label\n{'c' * 40},cat\n\n{'c' * 40},dog\n",
     f"relabel.csv, line 4: sha1 {'c' * 40} relabelled 'dog', but line 2 says 'cat'; keep one"),
    ("path,sha1,reason\n", "sha1\n", "relabel.csv: header sha1 lacks column(s) label; expected sha1,label,reason"),
])
def test_unusable_rows_name_the_file_and_line(tmp_path, exclude, relabel, message):
    with pytest.raises(DataError) as err:
        read_decisions(write(tmp_path / "exclude.csv", exclude), write(tmp_path / "relabel.csv", relabel))
    assert message in str(err.value)


def test_a_relabel_to_a_class_the_data_lacks_names_the_allowed_ones(raw):
    decisions = read_decisions(raw / "none.csv", write(raw / "relabel.csv", f"sha1,label\n{'d' * 40},wolf\n"))
    with pytest.raises(DataError, match=r"relabel.csv, line 2: label 'wolf' is not a class of the data; "
                                        r"allowed: cat, dog"):
        accounted(raw, decisions)


@pytest.mark.slow
def test_a_review_is_a_commit_and_a_rerun_of_prepare(tmp_path):
    root = make_project(tmp_path / "p", small_params())
    assert (root / "data/exclude.csv").read_text() == "path,sha1,reason\n"  # shipped: a header, no decisions
    dvc(["repro", "prepare"], root)
    manifest = pd.read_csv(root / "data/prepared/manifest.csv")
    first, second = manifest.iloc[0], manifest.iloc[1]
    other = next(c for c in manifest["label"].unique() if c != second["label"])
    (root / "data/exclude.csv").write_text(f"path,sha1,reason\n{first['path']},,a reviewer's reason\n")
    (root / "data/relabel.csv").write_text(f"sha1,label,reason\n{second['sha1']},{other},\n")
    run(["git", "commit", "-qam", "review"], root)
    changed = json.dumps(json.loads(dvc(["status", "--json"], root).stdout)["prepare"])
    assert '"data/exclude.csv": "modified"' in changed and '"data/relabel.csv": "modified"' in changed
    dvc(["repro", "prepare"], root)
    rejects = pd.read_csv(root / "reports/rejects.csv", keep_default_na=False)
    assert rejects.values.tolist() == [[first["path"], first["label"], EXCLUDED, "a reviewer's reason"]]
    after = pd.read_csv(root / "data/prepared/manifest.csv").set_index("path")
    assert first["path"] not in after.index and after.loc[second["path"], "label"] == other
    assert json.loads((root / "reports/data_summary.json").read_text())["relabelled"] == 1
