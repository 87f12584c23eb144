"""The pipeline's files, relative to the workspace a stage runs in; dvc.yaml declares the same paths."""

import os
from pathlib import Path

PREPARED = Path("data/prepared")
MANIFEST = PREPARED / "manifest.csv"
SCAN = Path("data/scan.csv")  # persisted: what each file's bytes showed, so unchanged files are not decoded again
# This machine's file identities -> sha1, so unchanged files are not even read; not a DVC output (git-ignored):
# identities differ per machine, and a missing file only means hashing again.
SCAN_IDENTITIES = Path("data/.scan-identities.csv")
# A person's reviewed decisions, in git and read by prepare: files to leave out, labels to correct.
EXCLUDE = Path("data/exclude.csv")
RELABEL = Path("data/relabel.csv")
# `kennel review` drafts them from the audit's suspects for a person to edit (git-ignored; never the files above).
EXCLUDE_DRAFT = Path("data/exclude.draft.csv")
RELABEL_DRAFT = Path("data/relabel.draft.csv")
RESIZED = Path("data/resized")  # persisted: shards of unchanged images stay as they are
# The splits train and evaluate read: the resized index with near-copies kept in one split (the audit stage), its
# classes.json pointing at data/resized's shards, so no pixels are copied.
AUDITED = Path("data/audited")
EMBEDDINGS = Path("data/embeddings")  # persisted: pooled features (or hashes) per image sha1, computed once
MODEL = Path("models/model.pt")
ONNX_MODEL = Path("models/model.onnx")  # the export stage's: the model for onnxruntime (fp32, or int8 when asked)
RUN_FILE = Path("models/mlflow_run.json")  # hands the MLflow run from train to evaluate
CHECKPOINT = Path("models/checkpoint.pt")  # persisted across runs: a killed train stage resumes from it

REPORTS = Path("reports")
REJECTS = REPORTS / "rejects.csv"
DATA_SUMMARY = REPORTS / "data_summary.json"  # found / kept / rejected by reason and per class, with split counts
DATA_METRICS = REPORTS / "data_metrics.json"  # the headline of the summary: what `dvc exp show` compares
LIVE = Path("dvclive")  # DVCLive: the training curves (one row per epoch, step = epoch) and the train metrics
METRICS = REPORTS / "metrics.json"  # the test headline: what `dvc exp show` compares
EVALUATION = REPORTS / "evaluation.json"  # every number of the test evaluation (per class, confusion matrix)
CONFUSION = REPORTS / "confusion.csv"
PREDICTIONS = REPORTS / "predictions.csv"  # one row per test image
TOP_LOSSES = REPORTS / "top_losses.csv"  # the evaluate.top_losses rows of it with the highest loss
CALIBRATION = REPORTS / "calibration.csv"
EXPORT_REPORT = REPORTS / "export.json"  # the export stage's checks: parity with PyTorch, sizes, int8's accuracy
ROC_DIR = REPORTS / "roc"  # one table per class (binary: the positive class)
PR_DIR = REPORTS / "pr"
FIGURES = REPORTS / "figures"
DATA_REPORT = REPORTS / "data"  # prepare's look at the data: figures and class counts
AUDIT_REPORT = REPORTS / "audit"  # the audit stage's findings: near-copies, suspected label errors, metrics
NEAR_DUPLICATES = AUDIT_REPORT / "near_duplicates.csv"
NEAR_DUPLICATES_FIGURE = AUDIT_REPORT / "near_duplicates.png"
LABEL_ISSUES = AUDIT_REPORT / "label_issues.csv"  # every image, the ones whose label the embeddings contradict first
LABEL_ISSUES_FIGURE = AUDIT_REPORT / "label_issues.png"
OUTLIERS = AUDIT_REPORT / "outliers.csv"  # every image, the farthest from every class first
OUTLIERS_FIGURE = AUDIT_REPORT / "outliers.png"
AUDIT_METRICS = AUDIT_REPORT / "metrics.json"


def project_root(start: Path | None = None) -> Path:
    """``$DVC_ROOT`` if set, else the nearest folder up from ``start`` (cwd) holding ``.dvc`` or ``.git``."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir() or (folder / ".git").exists():
            return folder
    return here


def tracking_uri(root: Path) -> str:
    """``$MLFLOW_TRACKING_URI``, else the project's sqlite store at the repo root (also for queued experiments)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"
