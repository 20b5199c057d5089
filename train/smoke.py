"""A miniature dataset for ``python -m train.reproduce --smoke``, built from the test fixtures.

It has the layout of ``../shared/data/svhn`` and ``../shared/data/svhn_raw`` that the stages read:
``train/`` + ``train.json`` and ``valid/`` + ``valid.json`` (the eight fixture crops, exact tier),
``unlabeled/`` (copies of three of them) with an SVHN candidate list and box table in which each has
its true record and a decoy with every digit changed, ``backgrounds/`` (three plain synthetic
photos for the locator's scenes and the synthetic numbers) and ``fonts/`` (the tests' DejaVu cut). Nothing here is measured: it only proves every stage runs and
writes what the next one reads.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


def make_smoke_data(out: Path, fixtures: Path = FIXTURES) -> Path:
    """Write the miniature dataset into ``out`` (once; kept if there) and return ``out``."""
    if (out / "done").is_file():
        return out
    if out.exists():
        shutil.rmtree(out)
    coco = json.loads((fixtures / "valid.json").read_text())
    for split in ("train", "valid"):
        shutil.copytree(fixtures / "valid", out / split)
        (out / f"{split}.json").write_text(json.dumps(coco))
    (out / "unlabeled").mkdir()
    candidates, rows = {}, []
    for k, im in enumerate(coco["images"][:3]):
        name = f"{9001 + k}.png"
        shutil.copy(fixtures / "valid" / im["file_name"], out / "unlabeled" / name)
        true, decoy = f"{90001 + 2 * k}", f"{90002 + 2 * k}"
        candidates[name] = {"svhn_train_candidates": [int(true), int(decoy)]}
        for a in sorted((a for a in coco["annotations"] if a["image_id"] == im["id"]), key=lambda a: a["id"]):
            x, y, w, h = a["bbox"]
            digit = a["category_id"] - 1
            for record, d in ((true, digit), (decoy, (digit + 1) % 10)):
                rows.append(["train", f"{record}.png", im["width"], im["height"], d, x, y, w, h])
    (out / "candidates.json").write_text(json.dumps(candidates))
    with (out / "boxes.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["split", "file_name", "img_width", "img_height", "digit", "left", "top", "width", "height"])
        w.writerows(rows)
    (out / "backgrounds").mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):
        base = rng.uniform(40, 215, 3)
        ramp = np.linspace(0, 60, 1200)[None, :, None]
        pixels = np.clip(base + ramp + rng.normal(0, 12, (900, 1200, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(out / "backgrounds" / f"background{k}.jpg", quality=90)
    shutil.copytree(fixtures / "fonts", out / "fonts")  # the synthetic numbers' font
    (out / "done").write_text("ok\n")
    return out
