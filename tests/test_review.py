"""``python -m kennel review``: drafts of data/relabel.csv and data/exclude.csv from the audit's reports, leaving
out what the reviewed files already decide and never replacing a draft a person may be editing."""

from __future__ import annotations

import pandas as pd
import pytest

from kennel.audit.labels import CSV_COLUMNS
from kennel.cli.main import main
from kennel.data.decisions import read_decisions

SHA = {name: name[0] * 40 for name in ("a", "b", "c", "d", "e", "f")}


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "reports/audit").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "data/exclude.csv").write_text("path,sha1,reason\n")
    (tmp_path / "data/relabel.csv").write_text(f"sha1,label,reason\n{SHA['b']},dog,seen before\n")
    # every image ranked: cleanlab's flagged ones first, then the rest by score
    pd.DataFrame([(1, "data/raw/cat/1.jpg", SHA["a"], "cat", "dog", 0.012, True, "test"),
                  (2, "data/raw/cat/2.jpg", SHA["b"], "cat", "dog", 0.05, True, "train"),
                  (3, "data/raw/dog/3.jpg", SHA["c"], "dog", "cat", 0.1, True, "val"),
                  (4, "data/raw/dog/4.jpg", SHA["d"], "dog", "cat", 0.2, False, "train"),
                  (5, "data/raw/dog/5.jpg", SHA["e"], "dog", "dog", 0.6, False, "train")],  # nothing to relabel
                 columns=CSV_COLUMNS).to_csv(tmp_path / "reports/audit/label_issues.csv", index=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_review_drafts_the_top_suspects_not_yet_decided(project, capsys):
    pd.DataFrame([(0, "data/raw/cat/5.jpg", SHA["e"], "cat", "train", 1.0),
                  (0, "data/raw/cat/6.jpg", SHA["f"], "cat", "test", 0.97),
                  (1, "data/raw/dog/7.jpg", "7" * 40, "dog", "train", 1.0),
                  (1, "data/raw/dog/8.jpg", "8" * 40, "dog", "val", 0.99)],
                 columns=["group", "path", "sha1", "label", "split", "similarity"]).to_csv(
        project / "reports/audit/near_duplicates.csv", index=False)
    assert main(["review", "--top", "2"]) == 0
    out = capsys.readouterr().out
    relabel = pd.read_csv(project / "data/relabel.draft.csv", dtype=str)
    assert relabel.values.tolist() == [  # b is in data/relabel.csv already: the next suspect takes its place
        [SHA["a"], "dog", "label issue: given cat, suggested dog, score 0.012, test: data/raw/cat/1.jpg"],
        [SHA["c"], "cat", "label issue: given dog, suggested cat, score 0.100, val: data/raw/dog/3.jpg"],
    ]
    exclude = pd.read_csv(project / "data/exclude.draft.csv", dtype=str)
    assert exclude.values.tolist() == [
        ["data/raw/cat/6.jpg", SHA["f"], "near duplicate of data/raw/cat/5.jpg (similarity 0.970)"],
        ["data/raw/dog/8.jpg", "8" * 40, "near duplicate of data/raw/dog/7.jpg (similarity 0.990)"],
    ]
    assert "data/relabel.draft.csv: 2 label suspect(s)" in out and "python -m kennel review --apply" in out
    assert "git add data/exclude.csv data/relabel.csv" in out and "dvc repro" in out
    assert (project / "data/relabel.csv").read_text() == f"sha1,label,reason\n{SHA['b']},dog,seen before\n"

    # the person keeps one relabel, moves the other suspect to the exclusions, and applies
    draft = (project / "data/relabel.draft.csv").read_text().splitlines()
    (project / "data/relabel.draft.csv").write_text("\n".join(draft[:2]) + "\n")
    with open(project / "data/exclude.draft.csv", "a") as f:
        f.write(f",{SHA['c']},a fox\n")
    assert main(["review", "--apply"]) == 0
    assert "data/exclude.csv: 3 row(s) added\ndata/relabel.csv: 1 row(s) added" in capsys.readouterr().out
    assert not (project / "data/relabel.draft.csv").exists() and not (project / "data/exclude.draft.csv").exists()
    assert (project / "data/relabel.csv").read_text().splitlines() == [
        "sha1,label,reason", f"{SHA['b']},dog,seen before",
        f"{SHA['a']},dog,\"label issue: given cat, suggested dog, score 0.012, test: data/raw/cat/1.jpg\""]
    decisions = read_decisions(project / "data/exclude.csv", project / "data/relabel.csv")
    assert [(r.path, r.sha1, r.reason) for r in decisions.exclude][-1] == ("", SHA["c"], "a fox")
    assert decisions.excluded("data/raw/dog/8.jpg", "8" * 40) and decisions.relabelled(SHA["a"]).label == "dog"


def test_review_keeps_a_draft_unless_forced_and_says_what_is_missing(project, capsys):
    assert main(["review"]) == 0
    assert "reports/audit/near_duplicates.csv not found" in capsys.readouterr().out
    assert not (project / "data/exclude.draft.csv").exists()
    (project / "data/relabel.draft.csv").write_text("edited by hand\n")
    assert main(["review"]) == 2
    assert "data/relabel.draft.csv: a draft is already there" in capsys.readouterr().err
    assert (project / "data/relabel.draft.csv").read_text() == "edited by hand\n"
    assert main(["review", "--force"]) == 0
    drafted = pd.read_csv(project / "data/relabel.draft.csv", dtype=str)  # a, c, then d (not flagged); never e
    assert drafted["sha1"].tolist() == [SHA["a"], SHA["c"], SHA["d"]]
    assert drafted["reason"].iloc[2].startswith("label issue (not flagged): given dog, suggested cat")

    (project / "data/relabel.draft.csv").write_text(f"sha1,label\n{SHA['b']},cat\n")
    assert main(["review", "--apply"]) == 2  # data/relabel.csv says dog
    assert "relabel.draft.csv, line 2: relabels bbbb" in capsys.readouterr().err

    (project / "reports/audit/label_issues.csv").unlink()
    assert main(["review"]) == 2
    assert "label_issues.csv: not found; run the audit stage first (dvc repro audit)" in capsys.readouterr().err
