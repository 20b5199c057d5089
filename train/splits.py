"""The fixed tuning split: ``exact``-tier ``train`` images set apart to choose on, so ``valid`` only reports.

Every threshold, margin, input size, epoch and weight the reproduction (:mod:`train.reproduce`) picks
is picked on ``tune.json``; the models train on ``fit.json`` (the rest of ``train``, every tier). The
split is a pure function of the image ids and ``--seed``: the ``--size`` exact images with the lowest
``sha256(f"{seed}:{id}")`` are the tuning split, whatever order ``train.json`` lists them in.

    python -m train.splits --data ../shared/data/svhn --out runs/splits
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from digit_demo.data import load_coco, subset

from .cli import DEFAULT_DATA

TUNE_SIZE = 300
TUNE_TIER = "exact"  # official SVHN boxes: the only tier fit to choose on


def tuning_ids(images: list[dict], size: int = TUNE_SIZE, seed: int = 0) -> set[int]:
    """The ids of the tuning split among ``images`` (COCO image entries)."""
    exact = [im["id"] for im in images if im.get("label_tier") == TUNE_TIER]
    if len(exact) < size:
        raise ValueError(f"only {len(exact)} {TUNE_TIER}-tier images; the tuning split needs {size}")
    return set(sorted(exact, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())[:size])


def split(coco: dict, ids: set[int]) -> tuple[dict, dict]:
    """(fit, tune): ``coco`` without and with the images in ``ids``, each with its own annotations."""
    return subset(coco, [im["id"] for im in coco["images"] if im["id"] not in ids]), subset(coco, ids)


def write_splits(data: Path, out: Path, size: int = TUNE_SIZE, seed: int = 0) -> dict[str, Path]:
    """Write ``fit.json`` and ``tune.json`` (both over ``data/train/``) into ``out``; returns their paths."""
    coco = load_coco(data / "train.json")
    fit, tune = split(coco, tuning_ids(coco["images"], size, seed))
    out.mkdir(parents=True, exist_ok=True)
    paths = {"fit": out / "fit.json", "tune": out / "tune.json"}
    for name, part in (("fit", fit), ("tune", tune)):
        part = {**part, "split": {"of": str(data / "train.json"), "part": name, "tune_size": size, "seed": seed,
                                  "tier": TUNE_TIER}}
        paths[name].write_text(json.dumps(part))
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.splits", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=Path("runs/splits"))
    p.add_argument("--size", type=int, default=TUNE_SIZE)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    paths = write_splits(args.data, args.out, args.size, args.seed)
    for name, path in paths.items():
        print(f"{path}: {len(json.loads(path.read_text())['images'])} images", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
