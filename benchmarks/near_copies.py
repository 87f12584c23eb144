"""Near-copies planted in real image sets no one tuned the audit on: recall and precision of its rule per set.

    python benchmarks/near_copies.py [--sets photos photos_other eurosat xray] [--seeds 0 1 2] [--copies 40]
                                     [--work DIR] [--others FILE]

Per set (a folder of ``../shared/realdata``, read in place, byte-identical files kept once as prepare does) and
seed, ``--copies`` near-copies of random images are made in memory: a random crop keeping 80-95 % of each side,
a resize to 55-90 %, a mirror, or a mix of them (each seed deals the mixes out differently), always re-encoded as
JPEG at quality 45-70. The originals and copies are split by content hash and resized to 224 px as prepare and
resize do, embedded by the audit's own featurizer (MobileNetV2 with real ImageNet features; cached per image in
``--work``, so the originals are embedded once), and the audit's rule (``kennel.audit.neighbours``) is applied:
at the shipped params, and over a sweep of its params and of fixed thresholds for comparison. Recall counts the
planted pairs found (directly or through a group); precision counts every other pair found as wrong, so it is a
lower bound (the sets have near-copies of their own: ``--others`` draws them to look at).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import random
import time
from functools import partial
from pathlib import Path

import numpy as np
from health import ARCH, WEIGHTS, audit_config, build, default_params, edited
from hostinfo import machine
from PIL import Image

SHARED = Path(__file__).resolve().parents[2] / "shared" / "realdata"
SETS = ["photos", "photos_other", "eurosat", "xray"]
KINDS = ["crop", "resize", "mirror", "crop+resize", "crop+mirror", "resize+mirror", "crop+resize+mirror"]
THRESHOLDS = [0.85, 0.88, 0.91, 0.94]  # the old rule's fixed thresholds, for comparison
K = 10  # neighbours kept per image, as the audit keeps
# Unplanted pairs the rule finds that are the same photo under two names (looked at: --others); the rest it finds
# are different photos of one breed, pose or scene, and count as wrong.
KNOWN = {frozenset(p) for p in [("dog.180.jpg", "dog.74.jpg"),
                                ("catbreeds_train_Cat69.jpg", "catbreeds_train_Cat59.jpg"),
                                ("catbreeds_train_Cat1099.jpg", "catbreeds_train_Cat1042.jpg")]}


def near_copy(data: bytes, kind: str, rng: random.Random) -> bytes:
    """A near-copy of the image in ``data``: ``kind``'s edits, then JPEG at quality 45-70."""
    return edited(Image.open(io.BytesIO(data)), kind, rng, crop=(0.8, 0.95), scale=(0.55, 0.9), quality=(45, 70),
                  centred=False)


class CopyLoader:
    """The resize stage's loader for files, and for ``<file>::copy::<kind>::<seed>`` names: the copy, in memory."""

    def __call__(self, path, size: int) -> np.ndarray:
        from kennel.data.images import load_array

        photo, _, spec = str(path).partition("::")
        if not spec:
            return load_array(photo, size, mode="center_crop")
        _, kind, seed = spec.split("::")
        return load_array(io.BytesIO(near_copy(Path(photo).read_bytes(), kind, random.Random(seed))), size,
                          mode="center_crop")


def originals(folder: Path) -> list[tuple[str, str, str]]:
    """(path, label, sha1) of every image in an ImageFolder, each content once (prepare drops byte copies)."""
    rows, seen = [], set()
    for path in sorted(p for p in folder.glob("*/*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")):
        sha1 = hashlib.sha1(path.read_bytes()).hexdigest()
        if sha1 not in seen:
            seen.add(sha1)
            rows.append((str(path), path.parent.name, sha1))
    return rows


def planted_set(folder: Path, copies: int, seed: int, work: Path):
    """The set plus its copies, resized and embedded: (the audit's embeddings, paths, planted pairs by position)."""
    from kennel.audit.near_duplicates import find_near_duplicates

    rows = originals(folder)
    rng = random.Random(f"{folder.name}-{seed}")
    sources = rng.sample(range(len(rows)), copies)
    planted = []
    for k, i in enumerate(sources):
        path, label, _ = rows[i]
        kind = KINDS[(k + seed) % len(KINDS)]
        tag = f"{folder.name}-{seed}-{k}"
        data = near_copy(Path(path).read_bytes(), kind, random.Random(tag))
        planted.append((f"{path}::copy::{kind}::{tag}", label, hashlib.sha1(data).hexdigest()))
    out = work / f"{folder.name}-{seed}"
    manifest = build(rows + planted, out, CopyLoader())
    found = find_near_duplicates(out, manifest, work / "cache", audit_config(), arch=ARCH, weights=str(WEIGHTS),
                                 device="cpu", amp="auto")
    position = {p: i for i, p in enumerate(found.paths)}
    truth = {tuple(sorted((position[c[0]], position[rows[i][0]]))): c[0].split("::")[2]
             for c, i in zip(planted, sources, strict=True)}
    return found, truth


def fixed(sims: np.ndarray, ids: np.ndarray, threshold: float):
    """The old rule, for comparison: every pair at or above ``threshold`` (among the K nearest of each image, so in
    a dense set the pairs it would find are more than counted here)."""
    import pandas as pd

    a, k = np.nonzero((sims >= threshold) & (ids >= 0))
    b = ids[a, k]
    return pd.DataFrame({"a": np.minimum(a, b), "b": np.maximum(a, b)}).drop_duplicates()


def pair_similarity(sims: np.ndarray, ids: np.ndarray, a: int, b: int) -> float:
    """The cosine of a and b, from whichever's neighbour list holds the other (-1 if neither)."""
    return float(max(sims[a][ids[a] == b].max(initial=-1), sims[b][ids[b] == a].max(initial=-1)))


def score(pairs, groups: np.ndarray, truth: dict, paths: list[str]) -> tuple[float, float, float, int, list]:
    """(recall: planted pairs in one group, precision: planted pairs among the pairs found, precision counting the
    KNOWN copies the set came with as right, pairs found, the unplanted ones)."""
    found = set(zip(pairs["a"], pairs["b"], strict=True))
    hit = sum(groups[a] and groups[a] == groups[b] for a, b in truth)
    others = sorted(found - set(truth))
    known = sum(frozenset((Path(paths[a]).name, Path(paths[b]).name)) in KNOWN for a, b in others)
    right = len(found & set(truth))
    return (hit / len(truth), right / max(len(found), 1), (right + known) / max(len(found), 1), len(found),
            others)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=SETS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--copies", type=int, default=40)
    parser.add_argument("--work", type=Path, default=Path("/tmp/kennel-near-copies"))
    parser.add_argument("--reuse", action="store_true", help="read the neighbours of a set and seed from --work "
                        "when an earlier run saved them (to compare rules without embedding again)")
    parser.add_argument("--others", type=Path, help="draw the unplanted pairs found at the shipped params here")
    parser.add_argument("--floors", type=float, nargs="+", default=[0.8, 0.85, 0.88])
    parser.add_argument("--margins", type=float, nargs="+", default=[0.04, 0.06, 0.08])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from kennel.audit.neighbours import connected_groups, margin_pairs, nearest

    shipped = default_params()["audit"]
    print(f"## near-copies planted in real sets: {machine()}; {args.copies} copies per set and seed; shipped "
          f"duplicate_floor {shipped['duplicate_floor']}, duplicate_margin {shipped['duplicate_margin']}\n")
    rules = [("shipped", shipped["duplicate_floor"], shipped["duplicate_margin"])]
    rules += [("margin", f, m) for f in args.floors for m in args.margins]
    rules += [("threshold", t, None) for t in THRESHOLDS]
    results: dict[tuple, list] = {}
    drawn = []
    for name in args.sets:
        for seed in args.seeds:
            saved = args.work / f"{name}-{seed}.npz"
            start = time.perf_counter()
            if not (args.reuse and saved.exists()):
                found, truth = planted_set(SHARED / name, args.copies, seed, args.work)
                sims, ids = nearest(found.features.block, len(found.features), K)
                np.savez(saved, sims=sims, ids=ids, truth=np.array(sorted(truth)), paths=np.array(found.paths))
            kept = np.load(saved)
            sims, ids, paths = kept["sims"], kept["ids"], kept["paths"].tolist()
            truth = {(int(a), int(b)): paths[a if "::" in paths[a] else b].split("::")[2] for a, b in kept["truth"]}
            seconds = time.perf_counter() - start
            similarity = partial(pair_similarity, sims, ids)
            for rule in rules:
                pairs = margin_pairs(sims, ids, *rule[1:]) if rule[2] is not None else fixed(sims, ids, rule[1])
                result = score(pairs, connected_groups(len(sims), pairs), truth, paths)
                results.setdefault((name, rule), []).append(result)
                if rule[0] == "shipped":
                    found_pairs = set(zip(pairs["a"], pairs["b"], strict=True))
                    missed = [(kind, round(similarity(a, b), 3)) for (a, b), kind in truth.items()
                              if (a, b) not in found_pairs]
                    print(f"{name} seed {seed}: {len(paths)} images, {seconds:.0f} s; shipped rule: recall "
                          f"{result[0]:.3f}, precision {result[1]:.3f} ({result[2]:.3f} with known copies), "
                          f"{result[3]} pairs; missed {missed}; others "
                          + "; ".join(f"{Path(paths[a]).name} ~ {Path(paths[b]).name} {similarity(a, b):.3f}"
                                      for a, b in result[4]), flush=True)
                    if seed == args.seeds[0]:
                        drawn += [(paths[a], paths[b], similarity(a, b)) for a, b in result[4]]
    print("\n| set | rule | recall: mean (min over seeds) | precision: mean (min) | precision, known copies right "
          "| pairs found (mean) |\n|---|---|---|---|---|---|")
    for (name, rule), rows in results.items():
        label = (f"floor {rule[1]}, margin {rule[2]}" + (" (shipped)" if rule[0] == "shipped" else "")
                 if rule[2] is not None else f"fixed threshold {rule[1]}")
        print(f"| {name} | {label} | {np.mean([r[0] for r in rows]):.3f} ({min(r[0] for r in rows):.3f}) | "
              f"{np.mean([r[1] for r in rows]):.3f} ({min(r[1] for r in rows):.3f}) | "
              f"{np.mean([r[2] for r in rows]):.3f} ({min(r[2] for r in rows):.3f}) | "
              f"{np.mean([r[3] for r in rows]):.1f} |")
    if args.others and drawn:  # the files (a copy drawn as its original)
        from kennel.core.plots import image_grid
        from kennel.data.report import thumbnail

        image_grid([thumbnail(Path(p.split("::")[0]), None) for a, b, _ in drawn for p in (a, b)],
                   [f"{s:.3f}\n{Path(p).name[:30]}" for a, b, s in drawn for p in (a, b)],
                   args.others, "Unplanted pairs found at the shipped params (first seed)", cols=4)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
