"""Label issues on real photos: how many planted label flips confident learning puts among its top suspects.

    python benchmarks/label_flips.py [--photos ../shared/realdata] [--weights FILE] [--rate 0.025] [--seeds 5]
                                     [--cache FILE] [--grid FILE] [--time-n 25000]

The photos (photos/ and photos_other/, ImageFolder, read in place) are embedded once with the real ImageNet
MobileNetV2 features (kennel's own model and preprocessing: 224 px centre crop, pooled features before the head).
Then, per seed and rate, that share of the labels is flipped at random to another class,
``kennel.audit.labels.label_issues`` ranks every image, and the table says what share of the planted flips sit
among the top 2 x (number planted) suspects (the goal: >= 0.8) and the top 1 x, and how many of cleanlab's flagged
images are planted. Last, the ranking of the labels as given (no flips): real label errors or hard images;
``--grid`` draws its top 16.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
from hostinfo import machine

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
SHARED = ROOT.parent / "shared" / "realdata"
sys.path.insert(0, str(SRC))


def photos(folders: list[Path]) -> tuple[list[Path], list[str]]:
    from kennel.data.sources import from_folder

    found = [c for folder in folders for c in from_folder(folder) if c.label]
    return [c.path for c in found], [c.label for c in found]


def embed(paths: list[Path], weights: Path, batch_size: int = 32) -> np.ndarray:
    """Pooled MobileNetV2 features (N x 1280) of each file, through the resize stage's own decode."""
    import torch

    from kennel.data.parallel import pmap
    from kennel.model.network import build_model

    model, _ = build_model("mobilenet_v2", ["a", "b"], weights=str(weights))
    model.eval()
    images = np.stack(list(pmap(_load, paths, desc="decode")))
    out = []
    with torch.inference_mode(), model.without_head():
        for start in range(0, len(images), batch_size):
            out.append(model(torch.from_numpy(images[start:start + batch_size])).float().numpy())
    return np.concatenate(out)


def _load(path: Path) -> np.ndarray:
    from kennel.data.images import load_array

    return load_array(path, 224, mode="center_crop")


def flip(labels: np.ndarray, n_classes: int, rate: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(labels with round(rate * N) of them moved to another class at random, the flipped rows)."""
    rows = rng.choice(len(labels), size=round(rate * len(labels)), replace=False)
    noisy = labels.copy()
    noisy[rows] = (labels[rows] + rng.integers(1, n_classes, size=len(rows))) % n_classes
    return noisy, rows


def measure(x: np.ndarray, labels: np.ndarray, classes: list[str], rate: float, seed: int) -> dict:
    from kennel.audit.labels import label_issues

    noisy, planted = flip(labels, len(classes), rate, np.random.default_rng(seed))
    start = time.perf_counter()
    issues = label_issues(x, noisy, classes, seed=seed)
    seconds = time.perf_counter() - start
    planted_set = set(planted.tolist())
    ranked = issues["index"].to_numpy()
    flagged = set(issues.loc[issues["is_issue"], "index"])
    return {"seed": seed, "planted": len(planted),
            "found_in_top": len(planted_set & set(ranked[:2 * len(planted)])) / len(planted),
            "found_in_top1": len(planted_set & set(ranked[:len(planted)])) / len(planted), "flagged": len(flagged),
            "flagged_planted": len(flagged & planted_set), "seconds": seconds}


def as_given(x: np.ndarray, labels: np.ndarray, classes: list[str], paths: list[Path], grid: Path | None) -> None:
    """What ranks highest on the labels as they are (no flips): real label errors, or images that are hard."""
    import pandas as pd

    from kennel.audit.label_figures import label_issues_png
    from kennel.audit.labels import label_issues

    issues = label_issues(x, labels, classes, seed=0)
    top = issues.head(16)
    table = pd.DataFrame({"path": [str(paths[i]) for i in top["index"]], "sha1": "", "split": "",
                          "given_label": top["given_label"], "suggested_label": top["suggested_label"],
                          "score": top["score"], "flagged": top["is_issue"]})
    print(f"labels as given: {int(issues['is_issue'].sum())} flagged, "
          f"{int((issues['given'] != issues['suggested']).sum())} with another class most probable; the top 16:")
    print(table[["path", "given_label", "suggested_label", "score", "flagged"]].to_string(index=False))
    if grid:
        label_issues_png(table, grid, root=Path("/"))
        print(f"wrote {grid}")


def time_at(n: int, dim: int = 1280, classes: int = 2, seed: int = 0) -> float:
    """Seconds of label_issues on random embeddings of ``n`` rows (the cost does not depend on the content much)."""
    from kennel.audit.labels import label_issues

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    x = rng.normal(size=(n, dim)).astype(np.float32) + labels[:, None] * 0.05  # a weak signal, like real data
    start = time.perf_counter()
    label_issues(x, labels, [str(c) for c in range(classes)], seed=seed)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=Path, default=SHARED)
    parser.add_argument("--weights", type=Path, default=SHARED / "weights" / "mobilenet_v2_imagenet_features.pth")
    parser.add_argument("--rate", type=float, nargs="+", default=[0.02, 0.03], help="flip rates, each measured")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--cache", type=Path, help="embeddings file (.npz): read when there, else written")
    parser.add_argument("--grid", type=Path, help="PNG of the top-ranked images of the labels as given")
    parser.add_argument("--time-n", type=int, default=0, help="also time label_issues on N random 1280-d rows")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    paths, names = photos([args.photos / "photos", args.photos / "photos_other"])
    classes = sorted(set(names))
    labels = np.array([classes.index(n) for n in names])
    if args.cache and args.cache.exists():
        x = np.load(args.cache)["x"]
    else:
        start = time.perf_counter()
        x = embed(paths, args.weights)
        print(f"embedded {len(x)} photos in {time.perf_counter() - start:.0f}s")
        if args.cache:
            np.savez(args.cache, x=x)
    print(f"{machine()}; {len(x)} photos, {x.shape[1]}-d MobileNetV2 features")
    for rate in args.rate:
        print(f"\nflip rate {rate}\nseed  planted  in top 2x planted  in top 1x planted  flagged  flagged planted  "
              "seconds")
        rows = [measure(x, labels, classes, rate, seed) for seed in range(args.seeds)]
        for r in rows:
            print(f"{r['seed']:4d}  {r['planted']:7d}  {r['found_in_top']:17.3f}  {r['found_in_top1']:17.3f}  "
                  f"{r['flagged']:7d}  {r['flagged_planted']:15d}  {r['seconds']:7.2f}")
        print(f"planted flips in the top 2x planted: mean {np.mean([r['found_in_top'] for r in rows]):.3f}, "
              f"min {min(r['found_in_top'] for r in rows):.3f}; in the top 1x planted: mean "
              f"{np.mean([r['found_in_top1'] for r in rows]):.3f}")
    print()
    as_given(x, labels, classes, paths, args.grid)
    if args.time_n:
        print(f"label_issues on {args.time_n} random 1280-d rows: {time_at(args.time_n):.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
