"""Export benchmark: the ONNX files `kennel export` writes against the PyTorch model, on the same real photos.

    python benchmarks/export.py [--photos ../shared/realdata] [--weights FILE] [--project DIR]

1. A real pipeline (`dvc repro`, MobileNetV2 with its real ImageNet features, ``finetune: head``) trained on
   ``photos/`` in a temporary project, with ``export.quantize: int8`` (``export.max_drop: 1``: the drop is reported
   here, not enforced): the export stage's own checks (reports/export.json); then `kennel export` for the fp32 file
   (every test image compared).
2. Every photo of ``photos/`` and ``photos_other/`` (1,400) through PyTorch fp32, ONNX fp32 and ONNX int8: top-1
   agreement, largest probability difference, and accuracy on ``photos_other/`` (labels from the folders) with
   95 % Wilson intervals.
3. Speed, each row in its own process on the same 1,400 files (benchmarks/predict.py's children): PyTorch fp32
   (serial decode), PyTorch as shipped (`--amp auto`), ONNX fp32 and int8; for this MobileNetV2 and for a
   random-init resnet18 (speed only).
4. Start-up (import + model load, fresh process) and the installed size of the predict-only environment
   (requirements-predict.txt) against the full one (requirements.lock).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hostinfo import machine
from predict import measure
from project import make_project

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
BIN = Path(sys.executable).parent
SHARED = ROOT.parent / "shared" / "realdata"
sys.path.insert(0, str(SRC))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def sh(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(cwd / "src"), "KENNEL_OFFLINE": "1"}
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
    return out.stdout


def train_project(dest: Path, photos: Path, weights: Path) -> Path:
    def params(p: dict) -> dict:
        p["data"].update(source="folder", raw_dir=str(photos))
        p["model"].update(arch="mobilenet_v2", weights=str(weights), finetune="head")
        p["export"].update(quantize="int8", max_drop=1.0)
        p["mlflow"]["system_metrics"] = False
        return p

    root = make_project(dest, params)
    start = time.perf_counter()
    sh([str(BIN / "dvc"), "repro"], root)
    print(f"dvc repro (head, int8 export): {time.perf_counter() - start:.0f} s")
    start = time.perf_counter()
    sh([str(BIN / "python"), "-m", "kennel", "export", "--sample", "100000", "--output", "models/fp32.onnx"], root)
    print(f"kennel export (fp32, every test image): {time.perf_counter() - start:.0f} s")
    return root


def score(root: Path, files: list[Path]) -> dict:
    """PyTorch fp32, ONNX fp32 and ONNX int8 on ``files``: agreement and accuracy."""
    import numpy as np

    from kennel.cli.predict import predict_files
    from kennel.model.inference import load_model_file
    from kennel.model.onnx_inference import load_onnx_model

    frames = {"torch": predict_files(files, load_model_file(root / "models/model.pt")),
              "onnx": predict_files(files, load_onnx_model(root / "models/fp32.onnx")),
              "int8": predict_files(files, load_onnx_model(root / "models/model.onnx"))}
    classes = [c for c in frames["torch"].columns if c.startswith("p_")]
    probs = {k: f[classes].to_numpy(float) for k, f in frames.items()}
    truth = np.array([p.parent.name for p in files])
    other = np.array(["photos_other" in str(p) for p in files])
    out = {"files": len(files), "errors": int((frames["torch"]["error"] != "").sum())}
    for name in ("onnx", "int8"):
        out[f"{name}_top1_equal"] = int((frames[name]["class"] == frames["torch"]["class"]).sum())
        out[f"{name}_max_prob_diff"] = float(np.abs(probs[name] - probs["torch"]).max())
    for name, frame in frames.items():
        k = int((frame["class"].to_numpy()[other] == truth[other]).sum())
        out[f"{name}_other_accuracy"] = (k, int(other.sum()), *wilson(k, int(other.sum())))
    return out


def random_resnet18(out: Path, calibration: list[Path]) -> tuple[Path, Path, Path]:
    """A random-init resnet18 model file and its fp32 and int8 ONNX files (for speed only)."""
    import numpy as np
    import torch

    from kennel.data.images import load_array
    from kennel.export.onnx_export import Images, export_onnx
    from kennel.model.file import save_model
    from kennel.model.inference import load_model_file
    from kennel.model.network import build_model

    torch.manual_seed(0)
    model, _ = build_model("resnet18", ["cat", "dog"], weights="none")
    save_model(model.eval(), out / "resnet18.pt", size=224, arch="resnet18", mode="center_crop")
    loaded = load_model_file(out / "resnet18.pt")
    arrays = np.stack([load_array(p, 224, mode="center_crop") for p in calibration])
    names = [str(p) for p in calibration]
    check = Images(arrays[:32], names[:32])
    export_onnx(loaded, out / "resnet18.onnx", check=check)
    labels = np.array([0 if p.parent.name == "cat" else 1 for p in calibration])
    export_onnx(loaded, out / "resnet18.int8.onnx", check=check, quantize="int8", calibration=arrays,
                score=Images(arrays, names, labels), max_drop=1.0)
    return out / "resnet18.pt", out / "resnet18.onnx", out / "resnet18.int8.onnx"


def speed(paths: list[str], torch_file: Path, fp32: Path, int8: Path, work: Path) -> dict:
    rows = {}
    for label, method, model in (("PyTorch fp32, serial decode", "before", torch_file),
                                 ("PyTorch as shipped (--amp auto)", "predict", torch_file),
                                 ("ONNX fp32 (--runtime onnx)", "onnx", fp32), ("ONNX int8", "onnx", int8)):
        seconds, rss = measure(method, paths, model, work)
        rows[label] = (seconds, len(paths) / seconds, rss)
    return rows


STARTUP = {  # a fresh interpreter: import the runtime, load the model
    "torch": "from kennel.model.inference import load_model_file as load; load(__import__('pathlib').Path({!r}))",
    "onnx": "from kennel.model.onnx_inference import load_onnx_model as load; load(__import__('pathlib').Path({!r}))",
}


def startup(kind: str, model: Path, repeats: int = 3) -> float:
    """Median seconds of a fresh interpreter importing the runtime and loading ``model``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", STARTUP[kind].format(str(model))], check=True,
                       env={**os.environ, "PYTHONPATH": str(SRC)})
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def installed_mib(requirements: Path) -> tuple[int, float]:
    """(distributions, MiB on disk) of the pinned names in ``requirements`` as installed here."""
    names = [re.split(r"[=<>;\s]", line.strip())[0] for line in requirements.read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    total, found = 0, 0
    for name in names:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found += 1
        total += sum(f.size or 0 for f in dist.files or [] if f.size)
    return found, total / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=Path, default=SHARED)
    parser.add_argument("--weights", type=Path, default=SHARED / "weights" / "mobilenet_v2_imagenet_features.pth")
    parser.add_argument("--project", type=Path, help="a project step 1 made before (kept with --keep): skips it")
    parser.add_argument("--keep", type=Path, help="make the project here and keep it")
    args = parser.parse_args()
    files = sorted(p for d in ("photos", "photos_other") for p in (args.photos / d).rglob("*.jpg"))
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="kennel-export-bench-") as tmp:
        work = Path(tmp)
        root = args.project or train_project(args.keep or work / "project", args.photos / "photos", args.weights)
        report = json.loads((root / "reports/export.json").read_text())
        print("export stage (int8):", json.dumps(report))
        print("scores:", json.dumps(score(root, files)))
        sizes = {f.name: f.stat().st_size / 2**20 for f in (root / "models").glob("*") if f.suffix in (".pt", ".onnx")}
        print("sizes (MiB):", json.dumps(sizes))
        paths = [str(p) for p in files]
        for arch, (torch_file, fp32, int8) in (
                ("mobilenet_v2", (root / "models/model.pt", root / "models/fp32.onnx", root / "models/model.onnx")),
                ("resnet18", random_resnet18(work, files[::11]))):
            print(f"\n{arch}: {len(paths)} photos")
            print("| runtime | seconds | images/s | peak RSS (MiB) |")
            print("|---|---|---|---|")
            rows = speed(paths, torch_file, fp32, int8, work)
            for label, (seconds, rate, rss) in rows.items():
                print(f"| {label} | {seconds:.1f} | {rate:.0f} | {rss:.0f} |")
            base = rows["PyTorch as shipped (--amp auto)"][1]
            print("onnx / shipped: " + ", ".join(f"{k}: {v[1] / base:.2f}x" for k, v in rows.items()))
            print(f"start-up (import + load, median of 3): torch {startup('torch', torch_file):.2f} s, "
                  f"onnx {startup('onnx', fp32):.2f} s")
        for req in ("requirements-predict.txt", "requirements.lock"):
            n, mib = installed_mib(ROOT / req)
            print(f"installed: {req}: {n} distributions, {mib:.0f} MiB")


if __name__ == "__main__":
    main()
