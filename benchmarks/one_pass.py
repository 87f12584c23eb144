"""Head mode end to end on N views of real photos, before and after training read the audit's features.

    python benchmarks/one_pass.py ../shared/realdata/photos ../shared/realdata/photos_other \\
        --weights ../shared/realdata/weights/mobilenet_v2_imagenet_features.pth --n 25000 --old <commit>

N JPEG views of the real photos (a random crop of 40-90 % of the area, a random mirror, the longer side at
300-500 px, quality 85: distinct files of photo size) are written once into ``--work``/views/<class>/. Two
real git + DVC projects, the files of ``--old`` and of this checkout, each with the views in data/raw, train
``model.finetune: head`` with ``--arch`` and ``--weights`` (the shipped params otherwise); each runs the pipeline
stage by stage (``dvc repro -s``: prepare, resize, audit, train, evaluate), the two projects alternating stage by
stage so that both see the same machine (each goes first on every other stage; dirty pages flushed before
each). Prints each stage's seconds, the totals, their ratio, and the two models'
test accuracy and predictions (the head should be the same model either way).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
from hostinfo import machine
from PIL import Image, ImageOps
from project import BIN, make_project

STAGES = ("prepare", "resize", "audit", "train", "evaluate")


def make_view(job: tuple[str, str, int]) -> None:
    source, dest, seed = job
    rng = random.Random(seed)
    with Image.open(source) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
    w, h = im.size
    area = rng.uniform(0.4, 0.9)
    aspect = rng.uniform(0.8, 1.25)
    cw, ch = min(w, round((area * w * h * aspect) ** 0.5)), min(h, round((area * w * h / aspect) ** 0.5))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    view = im.crop((x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        view = ImageOps.mirror(view)
    side = rng.randint(300, 500)
    view.thumbnail((side, side))  # only ever shrinks
    buf = io.BytesIO()
    view.save(buf, "JPEG", quality=85)
    Path(dest).write_bytes(buf.getvalue())


def build_views(photos: list[Path], out: Path, n: int) -> None:
    sources = sorted(p for folder in photos for p in folder.glob("*/*.jpg"))
    jobs = []
    for k in range(n):
        src = sources[k % len(sources)]
        dest = out / src.parent.name / f"view{k:06d}.jpg"
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            jobs.append((str(src), str(dest), k))
    with ProcessPoolExecutor() as pool:
        list(pool.map(make_view, jobs, chunksize=64))


def project(dest: Path, ref: str | None, views: Path, arch: str, weights: Path) -> Path:
    def head(params: dict) -> dict:
        params["data"].update(source="folder", raw_dir="data/raw")
        params["model"].update(arch=arch, weights=str(weights), finetune="head")
        return params

    if not dest.exists():
        make_project(dest, head, ref)
        subprocess.run(["cp", "-al", str(views), str(dest / "data/raw")], check=True)
    return dest


def stage(root: Path, name: str) -> tuple[float, str]:
    """Seconds of ``dvc repro -s name`` and what it printed."""
    start = time.perf_counter()
    out = subprocess.run([str(BIN / "dvc"), "repro", "--no-run-cache", "-s", name], cwd=root, capture_output=True,
                         text=True, env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"})
    if out.returncode:
        raise SystemExit(f"{root}: dvc repro -s {name} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return time.perf_counter() - start, out.stdout + out.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("photos", type=Path, nargs="+", help="ImageFolders of real photos")
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--arch", default="mobilenet_v2")
    parser.add_argument("--n", type=int, default=25000)
    parser.add_argument("--old", required=True, help="the commit to compare against (git ref)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/kennel-one-pass"))
    args = parser.parse_args()
    views = args.work / "views"
    start = time.perf_counter()
    build_views(args.photos, views, args.n)
    print(f"{machine()}; {args.n} views of {len(args.photos)} photo folder(s) in {time.perf_counter() - start:.0f} s;"
          f" {args.arch}, weights {args.weights.name}, model.finetune head; old {args.old}", flush=True)
    roots = {"old": project(args.work / "old", args.old, views, args.arch, args.weights.resolve()),
             "new": project(args.work / "new", None, views, args.arch, args.weights.resolve())}
    seconds: dict[str, dict[str, float]] = {name: {} for name in roots}
    for k, s in enumerate(STAGES):
        # each project goes first on every other stage: the one that follows a stage writing gigabytes (resize)
        # would otherwise always pay for the other's writeback; dirty pages are flushed before every timing
        for name in ("old", "new") if k % 2 == 0 else ("new", "old"):
            os.sync()
            seconds[name][s], printed = stage(roots[name], s)
            print(f"{name} {s}: {seconds[name][s]:.0f} s", flush=True)
            for line in printed.splitlines():  # where the features came from, and the stages' own summaries
                if any(said in line for said in ("pretrained features of", "features (", "computed (the rest",
                                                 "the head on the audit's features")):
                    print(f"    {line.strip()[:200]}", flush=True)
    print("\n| stage | old (s) | new (s) |\n|---|--:|--:|")
    for s in STAGES:
        print(f"| {s} | {seconds['old'][s]:.0f} | {seconds['new'][s]:.0f} |")
    total = {name: sum(v.values()) for name, v in seconds.items()}
    print(f"| **prepare → evaluate** | **{total['old']:.0f}** | **{total['new']:.0f}** |")
    print(f"\nnew / old: {total['new'] / total['old']:.3f}")
    metrics = {name: json.loads((root / "reports/metrics.json").read_text()) for name, root in roots.items()}
    preds = {name: pd.read_csv(root / "reports/predictions.csv") for name, root in roots.items()}
    same = preds["old"].equals(preds["new"])
    print(f"test accuracy: old {metrics['old']['test_accuracy']:.6f}, new {metrics['new']['test_accuracy']:.6f}; "
          f"predictions.csv identical: {same}")


if __name__ == "__main__":
    main()
