"""Outliers on real photos: how many planted images of another kind the audit ranks among its most outlying.

    python benchmarks/outliers.py [--rate 0.02] [--seeds 0 1 2] [--work DIR] [--figure FILE]

The 1,400 pet photos (``photos/`` and ``photos_other/`` of ``../shared/realdata``, read in place) get ``--rate``
of their number in images of another kind: EuroSAT satellite tiles, chest X-rays, or a mix of both, each given a
random pet label (what a stray file in a class folder looks like). Every image is embedded by the audit's own
featurizer (MobileNetV2 with real ImageNet features, 224 px centre crop; cached in ``--work``), and
``kennel.audit.outliers.outlier_scores`` ranks them all. The table says what share of the planted images sit among
the top 2 x (number planted) and the top 1 x (goal: >= 0.8 in the top 2 x), and the score of the lowest planted
one next to the highest pet photo's. ``--figure`` draws the audit's outlier grid of the first seed's mix.
"""

from __future__ import annotations

import argparse
import logging
import random
from pathlib import Path

import numpy as np
import yaml
from hostinfo import machine

SHARED = Path(__file__).resolve().parents[2] / "shared" / "realdata"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet_features.pth"
KINDS = {"eurosat": ["eurosat"], "xray": ["xray"], "mix": ["eurosat", "xray"]}


def files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*/*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def embed(paths: list[Path], cache: Path) -> np.ndarray:
    """The audit's vectors of ``paths`` (read from ``cache`` when there)."""
    if cache.exists():
        return np.load(cache)["x"]
    from kennel.audit.embeddings import choose_featurizer
    from kennel.data.parallel import pmap

    featurizer = choose_featurizer("mobilenet_v2", str(WEIGHTS), ["cat", "dog"], 224, "center_crop", "cpu", "auto")
    images = np.stack(list(pmap(_load, paths, desc="decode")))
    x = np.concatenate([featurizer.vectors(images[i:i + 64]) for i in range(0, len(images), 64)])
    np.savez(cache, x=x)
    return x


def _load(path: Path) -> np.ndarray:
    from kennel.data.images import load_array

    return load_array(path, 224, mode="center_crop")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=0.02)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=Path("/tmp/kennel-outliers"))
    parser.add_argument("--figure", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from kennel.audit.outliers import outlier_scores

    args.work.mkdir(parents=True, exist_ok=True)
    pets = files(SHARED / "photos") + files(SHARED / "photos_other")
    pet_x = embed(pets, args.work / "pets.npz")
    pet_labels = np.array([0 if p.parent.name == "cat" else 1 for p in pets])
    others = {name: (files(SHARED / name), embed(files(SHARED / name), args.work / f"{name}.npz"))
              for name in ("eurosat", "xray")}
    planted_n = round(args.rate * len(pets))
    for name, (paths, x) in {"pets": (pets, pet_x), **others}.items():  # each set alone: the clean tail
        classes = sorted({p.parent.name for p in paths})
        alone = outlier_scores(x, np.array([classes.index(p.parent.name) for p in paths]), classes)["score"]
        print(f"{name} alone ({len(paths)} images, no plants): score quantiles 0.5 / 0.9 / 0.99 / max "
              f"{' / '.join(f'{q:.2f}' for q in np.quantile(alone, [0.5, 0.9, 0.99, 1]))}")
    print(f"## outliers planted among {len(pets)} pet photos: {machine()}; {planted_n} planted ({args.rate:.0%})\n")
    cut = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())["audit"]["outlier_score"]
    print(f"| planted | seed | in top 2x planted | in top 1x planted | lowest planted score | highest pet score | "
          f"planted at or above {cut} (audit.outlier_score) | pets at or above |\n|---|---|---|---|---|---|---|---|")
    for kind, sources in KINDS.items():
        for seed in args.seeds:
            rng = random.Random(f"{kind}-{seed}")
            picked = [(name, i) for name, i in rng.sample([(n, i) for n in sources for i in range(len(others[n][0]))],
                                                           planted_n)]
            x = np.concatenate([pet_x, np.stack([others[n][1][i] for n, i in picked])])
            labels = np.concatenate([pet_labels, [rng.randrange(2) for _ in picked]])
            ranked = outlier_scores(x, labels, ["cat", "dog"])
            planted = set(range(len(pets), len(x)))
            order = ranked["index"].to_numpy()
            score = dict(zip(ranked["index"], ranked["score"], strict=True))
            print(f"| {kind} | {seed} | {len(planted & set(order[:2 * planted_n])) / planted_n:.3f} | "
                  f"{len(planted & set(order[:planted_n])) / planted_n:.3f} | "
                  f"{min(score[i] for i in planted):.2f} | {max(score[i] for i in range(len(pets))):.2f} | "
                  f"{sum(score[i] >= cut for i in planted)}/{planted_n} | "
                  f"{sum(score[i] >= cut for i in range(len(pets)))}/{len(pets)} |", flush=True)
            if args.figure and kind == "mix" and seed == args.seeds[0]:
                import pandas as pd

                from kennel.audit.figures import outlier_figure
                from kennel.data.report import thumbnail

                paths = [str(p) for p in pets] + [str(others[n][0][i]) for n, i in picked]
                table = pd.DataFrame({"path": [paths[i] for i in order],
                                      "label": [["cat", "dog"][labels[i]] for i in order],
                                      "nearest_class": ranked["nearest_class"], "score": ranked["score"]})
                outlier_figure(table, [thumbnail(Path(paths[i]), None) for i in order[:16]], args.figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
