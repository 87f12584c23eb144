"""Transfer learning over three domains in one run: pets, satellite tiles and chest X-rays, each judged on images
of the same kind it never saw.

    python benchmarks/domains.py REALDATA --weights FILE --arch NAME [--domains pets,eurosat,xray]
                                 [--modes auto,head,staged,full] [--set KEY=VALUE ...] [--json FILE]

REALDATA holds ``photos``/``photos_other`` (cats and dogs of two sources), ``eurosat``/``eurosat_other`` (EuroSAT
RGB, 10 land-use classes) and ``xray``/``xray_other`` (chest X-rays, NORMAL vs PNEUMONIA), each an ImageFolder.
Per domain it runs ``benchmarks/realdata.py``'s measurement (the real pipeline per mode with the shipped params
but ``data.*``, ``model.arch``, ``model.weights``, ``model.finetune`` and any ``--set``; ``kennel predict`` on the
other images; the linear probe fit on the same features) and prints one table: per domain and mode, own test and
other images with 95 % intervals, the run's probe, the epoch kept and the seconds after resize. ``auto`` shows
the mode it chose. Choose defaults on the training images and their val split; the other images are for scoring.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import yaml
from realdata import interval, measure, table

DOMAINS = {"pets": ("photos", "photos_other"), "eurosat": ("eurosat", "eurosat_other"),
           "xray": ("xray", "xray_other")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("realdata", type=Path, help="folder holding the domains' ImageFolders")
    parser.add_argument("--weights", type=Path, required=True, help="state dict for --arch (full or backbone only)")
    parser.add_argument("--arch", default="mobilenet_v2")
    parser.add_argument("--domains", default=",".join(DOMAINS))
    parser.add_argument("--modes", default="auto,head,staged,full")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a params.yaml change for every run (YAML value)")
    parser.add_argument("--json", type=Path, help="also write every row here")
    args = parser.parse_args(argv)
    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.set)}
    results, tables = {}, []
    for domain in args.domains.split(","):
        own, other = DOMAINS[domain]
        result = measure(args.realdata / own, args.weights, args.arch, args.realdata / other,
                         args.modes.split(","), overrides)
        results[domain] = result
        rows = table(result["rows"])
        rows.insert(0, "data", f"{domain} ({result['kept']} → {result['rows'][0]['other_images']})")
        probe = result["probe"]
        tables += [rows, pd.DataFrame([{"data": f"{domain}", "mode": "linear probe (here)",
                                        "own test": f"{probe['probe_test']:.4f}",
                                        "other source": interval(probe, "probe_other"),
                                        "probe (run) val / test": f"{probe['probe_val']:.4f} / "
                                                                  f"{probe['probe_test']:.4f}"}])]
        if args.json:  # after each domain: a long run keeps what it measured
            args.json.write_text(json.dumps(results, indent=2, default=str))
    print(f"\n{next(iter(results.values()))['machine'].split('; photos')[0]}\n")
    print(pd.concat(tables, ignore_index=True).fillna("").to_markdown(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
