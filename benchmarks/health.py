"""Data audit health on real photos: planted near-copies found, leaks reported and closed, and the cost at scale.

    python benchmarks/health.py planted [--photos DIR ...] [--weights FILE] [--copies 60] [--seed 0]
    python benchmarks/health.py scale [--sizes 2000 5000 10000 25000]

``planted``: the real photos (read in place, never copied) plus ``--copies`` near-copies of random ones made in
memory (JPEG quality 50-70 always, and resized to 60-90 %, centre-cropped to 85-95 % and/or mirrored), each image
split by its content hash as prepare does, resized to 224 px as the resize stage does, then audited by the library
the audit stage runs (pretrained MobileNetV2 features). Prints recall and precision of the planted pairs over a
sweep of thresholds (precision counts every other pair found as wrong, so it is a lower bound: the photo sets
have near-copies of their own, listed so they can be looked at), the leaks among the planted pairs and whether a
planted group straddles splits after the split policy; then the same for the perceptual hash (no weights).

``scale``: N distinct-enough images for N up to 25,000 + 4 %: random views of the real photos (crop of 30-60 % of
the area at a random place, random flip), one shard set written once; for each N a fresh process audits the first N
(cold cache), then N + 4 % (the cache holds the first N), and reports seconds (features, neighbours) and its peak
RSS. Views of one photo are often above the threshold, so pairs and groups are far more than in a real collection.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from hostinfo import machine
from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "realdata"
PHOTOS = [SHARED / "photos", SHARED / "photos_other"]
WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet_features.pth"
ARCH, SIZE, MODE, SEED, VAL, TEST = "mobilenet_v2", 224, "center_crop", 42, 0.15, 0.15
KINDS = ["jpeg", "resize", "crop", "mirror", "crop+resize", "resize+mirror", "crop+mirror", "crop+resize+mirror"]
THRESHOLDS = [0.80, 0.84, 0.86, 0.88, 0.89, 0.90, 0.91, 0.92, 0.93, 0.94, 0.96]
HASH_BITS = [8, 12, 16, 20, 24, 28, 32, 40]


def near_copy(path: Path, kind: str, rng: random.Random) -> bytes:
    """The bytes of a near-copy of the photo at ``path``: ``kind``'s edits, then JPEG at quality 50-70."""
    return edited(Image.open(path), kind, rng, crop=(0.85, 0.95), scale=(0.6, 0.9), quality=(50, 70), centred=True)


def edited(img: Image.Image, kind: str, rng: random.Random, *, crop: tuple[float, float], scale: tuple[float, float],
           quality: tuple[int, int], centred: bool) -> bytes:
    """JPEG bytes of ``img`` after ``kind``'s edits: "crop" keeps a share in ``crop`` of each side (one share for
    both, centred; or one per side at a random place), "resize" scales by a factor in ``scale``, "mirror"."""
    img = img.convert("RGB")
    if "crop" in kind:
        if centred:
            f = rng.uniform(*crop)
            w, h = round(img.width * f), round(img.height * f)
            left, top = (img.width - w) // 2, (img.height - h) // 2
        else:
            w, h = round(img.width * rng.uniform(*crop)), round(img.height * rng.uniform(*crop))
            left, top = rng.randint(0, img.width - w), rng.randint(0, img.height - h)
        img = img.crop((left, top, left + w, top + h))
    if "resize" in kind:
        f = rng.uniform(*scale)
        img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.Resampling.BICUBIC)
    if "mirror" in kind:
        img = ImageOps.mirror(img)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=rng.randint(*quality))
    return buf.getvalue()


def default_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def audit_config(**changes):
    from kennel.core.params import params_from_dict

    p = default_params()
    p["audit"].update(changes)
    return params_from_dict(p).audit


class Loader:
    """The resize stage's loader for files, and for ``<photo>::copy::<kind>::<seed>`` / ``<photo>::view::<k>``
    names: a near-copy or a random view made in memory, never written."""

    def __call__(self, path, size: int) -> np.ndarray:
        from kennel.data.images import load_array

        photo, _, spec = str(path).partition("::")
        if not spec:
            return load_array(photo, size, mode=MODE)
        what, *rest = spec.split("::")
        if what == "copy":
            return load_array(io.BytesIO(near_copy(Path(photo), rest[0], random.Random(rest[1]))), size, mode=MODE)
        rng = random.Random(spec)
        img = Image.open(photo).convert("RGB")
        area, ratio = rng.uniform(0.3, 0.6), rng.uniform(0.8, 1.25)
        w = min(img.width, round((area * img.width * img.height * ratio) ** 0.5))
        h = min(img.height, round((area * img.width * img.height / ratio) ** 0.5))
        left, top = rng.randint(0, img.width - w), rng.randint(0, img.height - h)
        img = img.crop((left, top, left + w, top + h))
        if rng.random() < 0.5:
            img = ImageOps.mirror(img)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        return load_array(io.BytesIO(buf.getvalue()), size, mode=MODE)


def build(rows: list[tuple[str, str, str]], out: Path, loader=None) -> pd.DataFrame:
    """(path, label, sha1) rows -> a manifest with hash splits and resized shards in ``out``, as prepare + resize."""
    from kennel.data.manifest import assign_splits
    from kennel.data.shard_writer import write_splits

    manifest = assign_splits(pd.DataFrame(rows, columns=["path", "label", "sha1"]), VAL, TEST, SEED)
    write_splits(manifest, Path("/"), SIZE, out, loader or Loader(), workers="auto", recipe=MODE)
    return manifest


def photo_rows(folders: list[Path]) -> list[tuple[str, str, str]]:
    rows = []
    for folder in folders:
        for path in sorted(folder.glob("*/*.jpg")):
            rows.append((str(path), path.parent.name, hashlib.sha1(path.read_bytes()).hexdigest()))
    return rows


def planted(args) -> None:
    from kennel.audit.near_duplicates import find_near_duplicates
    from kennel.audit.neighbours import cosine_pairs

    originals = photo_rows(args.photos)
    rng = random.Random(args.seed)
    sources = rng.sample(range(len(originals)), args.copies)
    copies = []
    for k, i in enumerate(sources):
        path, label, _ = originals[i]
        kind = KINDS[k % len(KINDS)]
        seed = f"{args.seed}-{k}"
        data = near_copy(Path(path), kind, random.Random(seed))
        copies.append((f"{path}::copy::{kind}::{seed}", label, hashlib.sha1(data).hexdigest()))
    work = Path(args.work or tempfile.mkdtemp(prefix="kennel-health-"))
    manifest = build(originals + copies, work / f"resized-{args.seed}")
    start = time.perf_counter()
    low = find_near_duplicates(work / f"resized-{args.seed}", manifest, work / "cache",
                               audit_config(group_splits=False), arch=ARCH, weights=str(args.weights), device="cpu",
                               amp="auto")
    seconds = time.perf_counter() - start
    sweep = cosine_pairs(low.features.block, len(low.features), min(THRESHOLDS))  # the old fixed-threshold rule
    position = {p: i for i, p in enumerate(low.paths)}
    truth = {tuple(sorted((position[c[0]], position[originals[i][0]]))): c[0].split("::")[2]
             for c, i in zip(copies, sources, strict=True)}
    print(f"## planted near-copies: {len(originals)} real photos + {len(copies)} copies (seed {args.seed}); "
          f"{machine()}; features + neighbours {seconds:.0f} s ({low.computed} computed)\n")
    print("| threshold | recall | precision (lower bound) | planted found | other pairs |\n|---|---|---|---|---|")
    found_at = {}
    for t in THRESHOLDS:
        pairs = sweep[sweep["similarity"] >= t]
        found = {(a, b) for a, b in zip(pairs["a"], pairs["b"], strict=True)}
        hit = found & set(truth)
        found_at[t] = found
        print(f"| {t:.2f} | {len(hit) / len(truth):.3f} | {len(hit) / max(len(found), 1):.3f} | "
              f"{len(hit)}/{len(truth)} | {len(found - set(truth))} |")
    shipped = set(zip(low.pairs["a"], low.pairs["b"], strict=True))
    hit = shipped & set(truth)
    print(f"| the shipped rule (audit.duplicate_floor, duplicate_margin) | {len(hit) / len(truth):.3f} | "
          f"{len(hit) / max(len(shipped), 1):.3f} | {len(hit)}/{len(truth)} | {len(shipped - set(truth))} |")
    sims = {pair: s for pair, s in zip(zip(sweep["a"], sweep["b"], strict=True), sweep["similarity"], strict=True)}
    print("\nlowest similarity of a planted pair per kind: " + ", ".join(
        f"{kind} {min(sims.get(p, 0) for p, k in truth.items() if k == kind):.3f}" for kind in KINDS))
    others = sorted(found_at[min(t for t in THRESHOLDS if t >= 0.9)] - set(truth), key=lambda p: -sims[p])
    print("\nother pairs at 0.90 and above: " + "; ".join(
        f"{Path(low.paths[a].split('::')[0]).name} ~ {Path(low.paths[b].split('::')[0]).name} "
        f"{sims[(a, b)]:.3f}" for a, b in others))
    if args.others:  # to look at: are they near-copies the photo sets came with?
        from kennel.core.plots import image_grid

        image_grid([np.asarray(low.images[int(i)]) for pair in others for i in pair],
                   [f"{sims[pair]:.3f}\n{Path(low.paths[i]).name[:30]}" for pair in others for i in pair],
                   Path(args.others), "Pairs at cosine 0.90 and above that were not planted", cols=4)

    # the stage's default: leaks reported, and with group_splits no planted group straddles splits
    run = find_near_duplicates(work / f"resized-{args.seed}", manifest, work / "cache", audit_config(), arch=ARCH,
                               weights=str(args.weights), device="cpu", amp="auto")
    group, hash_split, split = run.groups, run.index["split"].to_numpy(), run.audited["split"].to_numpy()
    leaks = [p for p in truth if hash_split[p[0]] != hash_split[p[1]]]
    leak_groups = set(run.table.groupby("group").filter(lambda g: g["hash_split"].nunique() > 1)["group"])
    reported = [p for p in leaks if group[p[0]] and group[p[0]] == group[p[1]] and group[p[0]] in leak_groups]
    straddle = [p for p in truth if split[p[0]] != split[p[1]]]  # found or not
    print(f"\nplanted pairs across hash splits (leaks): {len(leaks)}, reported in a leak group: {len(reported)}; "
          f"planted pairs in two splits after the policy: {len(straddle)}; moved images: {run.moved}; "
          f"groups {run.table['group'].nunique()}")
    if args.figure:
        from kennel.audit.figures import pair_figure

        pair_figure(run.pairs, run.groups, run.table, run.images, run.paths, Path(args.figure), 24, "cosine")

    # without pretrained weights: the perceptual hash
    hashed = find_near_duplicates(work / f"resized-{args.seed}", manifest, work / "cache-hash",
                                  audit_config(hash_distance=max(HASH_BITS), group_splits=False), arch=ARCH,
                                  weights="none", device="cpu", amp="auto")
    hsims = {pair: s for pair, s in zip(zip(hashed.pairs["a"], hashed.pairs["b"], strict=True),
                                        hashed.pairs["similarity"], strict=True)}
    print("\n| hash bits (of 256) | recall | precision (lower bound) | recall by kind |\n|---|---|---|---|")
    for bits in HASH_BITS:
        found = {p for p, s in hsims.items() if (1 - s) * 256 <= bits + 1e-9}
        hit = found & set(truth)
        by_kind = ", ".join(f"{kind} {sum(p in hit for p, k in truth.items() if k == kind)}/"
                            f"{sum(k == kind for k in truth.values())}" for kind in KINDS)
        print(f"| {bits} | {len(hit) / len(truth):.3f} | {len(hit) / max(len(found), 1):.3f} | {by_kind} |")


def scale(args) -> None:
    work = Path(args.work or tempfile.mkdtemp(prefix="kennel-scale-"))
    top = round(max(args.sizes) * 1.04)
    if not (work / "all" / "index.csv").exists():
        photos = photo_rows(PHOTOS)
        rows = []
        for k in range(top):
            path, label, _ = photos[k % len(photos)]
            name = f"{path}::view::{k}"
            rows.append((name, label, hashlib.sha1(name.encode()).hexdigest()))
        start = time.perf_counter()
        build(rows, work / "all")
        print(f"built {top} views in {time.perf_counter() - start:.0f} s", flush=True)
    index = pd.read_csv(work / "all" / "index.csv", dtype=str, keep_default_na=False)
    rank = np.random.default_rng(0).permutation(len(index))  # which images the first N are
    meta = json.loads((work / "all" / "classes.json").read_text())
    print(f"## audit at scale: {machine()}\n")
    print("| images | first run: features s | neighbours s | pairs | second run (+4 %): computed | seconds | "
          "ratio | peak RSS MiB |\n|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        for m in (n, round(n * 1.04)):
            folder = work / f"n{m}"
            folder.mkdir(exist_ok=True)
            index[rank < m].to_csv(folder / "index.csv", index=False)
            (folder / "classes.json").write_text(json.dumps({**meta, "shards": "../all/shards"}))
        cmd = [sys.executable, __file__, "scale-one", str(work), str(n), str(round(n * 1.04))]
        out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        ratio = out["second"] / (out["features"] + out["neighbours"])
        print(f"| {n} | {out['features']:.0f} | {out['neighbours']:.1f} | {out['pairs']} | {out['computed']} | "
              f"{out['second']:.1f} | {ratio:.2f} | {out['rss']:.0f} |", flush=True)


def scale_one(work: Path, n: int, grown: int) -> None:
    """One process: audit the first ``n`` (cold cache), then ``grown``; print a JSON line."""
    from kennel.audit.near_duplicates import find_near_duplicates

    cache = work / f"cache-{n}"
    results = {}
    for m in (n, grown):
        index = pd.read_csv(work / f"n{m}" / "index.csv", dtype=str, keep_default_na=False)
        manifest = pd.DataFrame({"sha1": index["sha1"], "path": index["sha1"]})
        start = time.perf_counter()
        found = find_near_duplicates(work / f"n{m}", manifest, cache, audit_config(), arch=ARCH,
                                     weights=str(WEIGHTS), device="cpu", amp="auto")
        results[m] = (time.perf_counter() - start, found)
    first, again = results[n][1], results[grown]
    print(json.dumps({"features": first.seconds["features"], "neighbours": first.seconds["neighbours"],
                      "pairs": len(first.pairs), "computed": again[1].computed, "second": again[0],
                      "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def neighbours(args) -> None:
    """The neighbour search alone at larger N: random unit vectors of MobileNetV2's 1280 dims (plus one near-copy
    per 100), cached as the stage caches features, searched and grouped in a fresh process per N."""
    work = Path(args.work or tempfile.mkdtemp(prefix="kennel-neighbours-"))
    print(f"## neighbour search alone: {machine()}\n")
    print("| vectors | cache write s | search + groups s | pairs | peak RSS MiB |\n|---|---|---|---|---|")
    for n in args.sizes:
        cmd = [sys.executable, __file__, "neighbours-one", str(work / f"v{n}"), str(n)]
        out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        print(f"| {n} | {out['write']:.1f} | {out['search']:.1f} | {out['pairs']} | {out['rss']:.0f} |", flush=True)


def neighbours_one(work: Path, n: int) -> None:
    from kennel.audit.neighbours import NEIGHBOURS, connected_groups, margin_pairs, nearest
    from kennel.data.vectors import Featurizer, update_cache

    def random_unit(ids: np.ndarray) -> np.ndarray:
        out = np.empty((len(ids), 1280), np.float32)
        for k, i in enumerate(ids):  # row i depends on i alone; every 100th is a near-copy of the one before
            base = np.random.default_rng(int(i) - (int(i) % 100 == 1)).normal(size=1280)
            out[k] = base + (np.random.default_rng([int(i), 1]).normal(size=1280) * 0.2 if int(i) % 100 == 1 else 0)
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    start = time.perf_counter()
    cache, _ = update_cache(work, Featurizer("embedding", "random", 1280, "float16", random_unit),
                            [f"{i:040x}" for i in range(n)], np.arange(n), batch_size=1024, desc="random")
    write = time.perf_counter() - start
    start = time.perf_counter()
    cfg = audit_config()
    pairs = margin_pairs(*nearest(cache.block, n, NEIGHBOURS, exact_max=cfg.exact_search_max), cfg.duplicate_floor,
                         cfg.duplicate_margin)
    connected_groups(n, pairs)
    print(json.dumps({"write": write, "search": time.perf_counter() - start, "pairs": len(pairs),
                      "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("planted")
    p.add_argument("--photos", type=Path, nargs="+", default=PHOTOS)
    p.add_argument("--weights", type=Path, default=WEIGHTS)
    p.add_argument("--copies", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", help="a folder to keep the shards and the feature cache in (default: a temp dir)")
    p.add_argument("--figure", help="write the near-duplicates figure of the default run here")
    p.add_argument("--others", help="draw the pairs found at 0.90 and above that were not planted here")
    s = sub.add_parser("scale")
    s.add_argument("--sizes", type=int, nargs="+", default=[2000, 5000, 10000, 25000])
    s.add_argument("--work")
    nb = sub.add_parser("neighbours")
    nb.add_argument("--sizes", type=int, nargs="+", default=[5000, 10000, 25000])
    nb.add_argument("--work")
    nb_one = sub.add_parser("neighbours-one")
    nb_one.add_argument("work", type=Path)
    nb_one.add_argument("n", type=int)
    one = sub.add_parser("scale-one")
    one.add_argument("work", type=Path)
    one.add_argument("n", type=int)
    one.add_argument("grown", type=int)
    args = parser.parse_args()
    if args.what == "planted":
        planted(args)
    elif args.what == "scale":
        scale(args)
    elif args.what == "neighbours":
        neighbours(args)
    elif args.what == "neighbours-one":
        neighbours_one(args.work, args.n)
    else:
        scale_one(args.work, args.n, args.grown)


if __name__ == "__main__":
    main()
