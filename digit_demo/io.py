"""HW2 output formats: ``pred.json`` (COCO results) and ``pred.csv`` (``image_id,pred_label``)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from .types import Detections


def coco_results(dets: dict[int, Detections]) -> list[dict]:
    """COCO results: one dict per box, ``bbox`` = [x, y, w, h], ``category_id`` = digit + 1."""
    out = []
    for image_id, d in dets.items():
        for (x1, y1, x2, y2), s, k in zip(d.boxes.tolist(), d.scores.tolist(), d.digits.tolist()):
            out.append({
                "image_id": int(image_id),
                "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                "score": round(float(s), 5),
                "category_id": int(k) + 1,
            })
    return out


def write_pred_json(path: str | Path, dets: dict[int, Detections]) -> Path:
    path = Path(path)
    path.write_text(json.dumps(coco_results(dets)))
    return path


def read_pred_json(path: str | Path) -> list[dict]:
    return json.loads(Path(path).read_text())


def write_pred_csv(path: str | Path, labels: dict[int, int]) -> Path:
    """``image_id,pred_label`` rows sorted by image id; -1 where no digit was found."""
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["image_id", "pred_label"])
        for image_id in sorted(labels):
            w.writerow([image_id, labels[image_id]])
    return path


def read_pred_csv(path: str | Path) -> dict[int, int]:
    with Path(path).open(newline="") as f:
        return {int(r["image_id"]): int(r["pred_label"]) for r in csv.DictReader(f)}


def image_id_for(path: Path, fallback: int) -> int:
    """HW2 image ids are file stems (``123.png`` -> 123); other names get ``fallback``."""
    return int(path.stem) if path.stem.isdigit() else fallback
