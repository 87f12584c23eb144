import pytest

from kennel.evaluate.note import run_note

METRICS = {"accuracy": 0.9375, "macro_f1": 0.93, "roc_auc": 0.981, "ece": 0.0412,
           "per_class": {"cat": {"support": 9}, "dog": {"support": 7}}}
DATA = {"found": 70, "kept": 66, "rejected": 4, "rejected_by_reason": {"duplicate": 1, "empty file": 3},
        "per_class": {"cat": {"kept": 34, "train": 24, "val": 5, "test": 5},
                      "dog": {"kept": 32, "train": 20, "val": 1, "test": 11}}}


def test_the_note_says_how_good_on_what_and_links_the_figures():
    note = run_note(METRICS, DATA, experiment_id="7", run_id="abc123", selected_epoch="3", epochs=4, select="best",
                    figures=[("top losses", "evaluation/top losses.png")])
    assert note.startswith("**Test accuracy 0.938** (95 % interval 0.717-0.989) on 16 test images (macro F1 0.930, "
                           "ROC AUC 0.981, ECE 0.041)")
    assert "epoch 3 of 4 (train.select: best" in note
    assert "70 files found, 66 kept, 4 rejected (duplicate: 1, empty file: 3); train/val/test 44/6/16" in note
    assert "classes cat (34), dog (32)" in note
    assert "[top losses](#/experiments/7/runs/abc123/artifacts/evaluation/top%20losses.png)" in note
    assert "Decided from the data" not in note  # nothing decided, no line


def test_what_the_recipe_decided_from_the_data_is_in_the_note():
    decisions = {"batchnorm": "updated: the train images sit 0.30 from the pretrained statistics",
                 "finetune": "staged: the linear probe on the pretrained features scores 0.9255 on val"}
    note = run_note(METRICS, DATA, experiment_id="7", run_id="r", selected_epoch="3", epochs=4, select="best",
                    figures=[], decisions=decisions)
    assert ("Decided from the data: batchnorm: updated: the train images sit 0.30 from the pretrained statistics; "
            "finetune: staged: the linear probe on the pretrained features scores 0.9255 on val.") in note


def test_a_weights_warning_leads_the_note():
    note = run_note(METRICS, DATA, experiment_id="7", run_id="r", selected_epoch="", epochs=2, select="last",
                    figures=[], warnings=["ImageNet weights unavailable", ""])
    assert note.startswith("Warning: ImageNet weights unavailable\n") and "epoch ? of 2" in note


def test_all_but_the_metrics_and_the_data_are_passed_by_name():
    with pytest.raises(TypeError, match="positional"):
        run_note(METRICS, DATA, "7", "r", "", 2, "last", [])  # type: ignore[misc]
