"""Label unlabelled SVHN images by picking among their candidate ground-truth records.

Every image in ``unlabeled/`` is an original SVHN format-1 train photo whose size matches several
SVHN records (``svhn_train_candidates.json``); one of them holds its true boxes. A trained detector's
box classifier scores each candidate: the sum over its boxes of log p(claimed digit) - log
p(background). The best candidate is kept when it beats the runner-up by ``margin``, so the labels are
real SVHN boxes, not the detector's own guesses. ``--calibrate`` measures how often the pick is
right on ``valid`` (true record plus the nearest-size decoys, boxes rescaled), per margin.

    python -m train.resolve --checkpoint resnet18_fpn --out runs/pseudo/unlabeled.json
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import random
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from digit_demo.checkpoints import load_checkpoint
from digit_demo.data import CATEGORIES, clip_xywh, load_coco
from digit_demo.detect import set_threads, to_tensor

from .cli import DEFAULT_DATA

RAW = DEFAULT_DATA.parent / "svhn_raw"
CANDIDATES = RAW / "nycu_hw2_willy0921" / "annotations" / "svhn_train_candidates.json"
BOXES = RAW / "svhn_format1_voc_penny4860" / "svhn_format1_boxes.csv"

Record = list[tuple[int, list[float]]]  # (category_id, [x, y, w, h]) per digit, left to right


def read_records(path: Path = BOXES) -> dict[str, tuple[tuple[int, int], Record]]:
    """SVHN train records by file name: ((width, height), digits with their boxes)."""
    records: dict[str, tuple[tuple[int, int], Record]] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            if row["split"] != "train":
                continue
            size = (int(row["img_width"]), int(row["img_height"]))
            box = [float(row[k]) for k in ("left", "top", "width", "height")]
            records.setdefault(row["file_name"], (size, []))[1].append((int(row["digit"]) + 1, box))
    return records


@torch.no_grad()
def box_log_odds(model, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """For xyxy ``boxes`` on ``image`` (CHW, 0-1): log p(class) - log p(background), shape [N, 11]."""
    images, _ = model.transform([image])
    features = model.backbone(images.tensors)
    h, w = image.shape[-2:]
    rh, rw = images.image_sizes[0]
    scaled = boxes * torch.tensor([rw / w, rh / h, rw / w, rh / h])
    heads = model.roi_heads
    feats = heads.box_head(heads.box_roi_pool(features, [scaled], images.image_sizes))
    logits, _ = heads.box_predictor(feats)
    logp = F.log_softmax(logits, dim=1)
    return logp - logp[:, :1]


def score_records(model, image: torch.Tensor, records: list[Record]) -> list[float]:
    """Each record's evidence on ``image``: the sum over its digits of log p(digit) - log p(background)."""
    flat = [(i, c, b) for i, rec in enumerate(records) for c, b in rec]
    h, w = image.shape[-2:]
    xyxy = clip_xywh(torch.tensor([b for _, _, b in flat], dtype=torch.float32), w, h)
    xyxy[:, 2:] = torch.maximum(xyxy[:, 2:], xyxy[:, :2] + 1)  # keep every box (and the alignment): 1 px at least
    odds = box_log_odds(model, image, xyxy)
    per_box = odds[torch.arange(len(flat)), torch.tensor([c for _, c, _ in flat])]
    scores = [0.0] * len(records)
    for (i, _, _), s in zip(flat, per_box.tolist()):
        scores[i] += s
    return scores


def pick(scores: list[float]) -> tuple[int, float]:
    """The best candidate and its margin over the runner-up (infinite when it has none)."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    margin = scores[order[0]] - scores[order[1]] if len(order) > 1 else math.inf
    return order[0], margin


def _rescale(rec: Record, src: tuple[int, int], dst: tuple[int, int]) -> Record:
    sx, sy = dst[0] / src[0], dst[1] / src[1]
    return [(c, [x * sx, y * sy, w * sx, h * sy]) for c, (x, y, w, h) in rec]


def calibrate(model, data: Path, records: dict, decoys: int, seed: int = 0) -> list[tuple[int, float]]:
    """(right, margin) per ``valid`` image: its true record against the ``decoys`` records nearest in size."""
    rng = random.Random(seed)
    sizes = [(name, size) for name, (size, _) in records.items()]
    out = []
    for im in tqdm(load_coco(data / "valid.json")["images"], desc="calibrate", file=sys.stderr):
        true = im["svhn_format1_train_file"]
        dst = (im["width"], im["height"])
        near = sorted(sizes, key=lambda s: abs(math.log(s[1][0] / dst[0])) + abs(math.log(s[1][1] / dst[1])))
        pool = [n for n, _ in near[: decoys * 3] if n != true]
        names = [true] + rng.sample(pool, decoys)
        cands = [_rescale(records[n][1], records[n][0], dst) for n in names]
        image = to_tensor(Image.open(data / "valid" / im["file_name"]).convert("RGB"))
        best, margin = pick(score_records(model, image, cands))
        out.append((int(best == 0), margin))
    return out


def resolve(model, data: Path, records: dict, candidates: dict, min_margin: float) -> dict:
    """COCO json (HW2 layout) for the ``unlabeled/`` images whose best candidate wins by ``min_margin``."""
    claimed = {im["svhn_format1_train_file"] for split in ("train", "valid")
               for im in load_coco(data / f"{split}.json")["images"]}
    picks: dict[str, list[dict]] = defaultdict(list)
    files = sorted(p.name for p in (data / "unlabeled").iterdir())
    for name in tqdm(files, desc="resolve", file=sys.stderr):
        info = candidates[name]
        names = [f"{k}.png" for k in info["svhn_train_candidates"]
                 if f"{k}.png" not in claimed and f"{k}.png" in records]
        if not names:
            continue
        image = to_tensor(Image.open(data / "unlabeled" / name).convert("RGB"))
        best, margin = pick(score_records(model, image, [records[n][1] for n in names]))
        if margin >= min_margin:
            picks[names[best]].append({"file_name": name, "width": image.shape[-1], "height": image.shape[-2],
                                       "svhn_format1_train_file": names[best], "n_candidates": len(names),
                                       "resolver_margin": round(min(margin, 1e6), 3), "label_tier": "pseudo"})
    images, annotations = [], []
    for record, claims in picks.items():
        if len(claims) > 1:  # two images claim one record: at most one is right, trust neither
            continue
        im = claims[0]
        im["id"] = int(Path(im["file_name"]).stem)
        images.append(im)
        for c, (x, y, w, h) in records[record][1]:
            annotations.append({"id": len(annotations) + 1, "image_id": im["id"], "bbox": [x, y, w, h],
                                "category_id": c, "area": w * h, "iscrowd": 0})
    return {"images": sorted(images, key=lambda im: im["id"]), "annotations": annotations, "categories": CATEGORIES}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="resnet18_fpn", help="detector whose box classifier scores the candidates")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--candidates", type=Path, default=CANDIDATES)
    p.add_argument("--boxes", type=Path, default=BOXES, help="SVHN format-1 boxes CSV")
    p.add_argument("--min-margin", type=float, default=8.0)
    p.add_argument("--out", type=Path, help="write the resolved images as COCO json")
    p.add_argument("--calibrate", type=int, metavar="DECOYS", help="measure pick precision on valid with this many decoys")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    set_threads(args.threads)
    model, _ = load_checkpoint(args.checkpoint)  # in eval mode
    records = read_records(args.boxes)
    if args.calibrate:
        trials = calibrate(model, args.data, records, args.calibrate)
        for m in (0, 2, 4, 6, 8, 10, 15):
            kept = [r for r, margin in trials if margin >= m]
            print(json.dumps({"margin": m, "kept": round(len(kept) / len(trials), 3),
                              "precision": round(sum(kept) / max(len(kept), 1), 4), "errors": len(kept) - sum(kept)}))
    if args.out:
        coco = resolve(model, args.data, records, json.loads(args.candidates.read_text()), args.min_margin)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(coco))
        print(f"{args.out}: {len(coco['images'])} images, {len(coco['annotations'])} boxes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
