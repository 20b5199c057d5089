"""Labelling unlabelled images by picking among candidate SVHN records, with the shipped detector."""
import csv
import json
import math
import shutil

import pytest
from PIL import Image

from digit_demo.checkpoints import load_checkpoint
from digit_demo.data import DigitDataset, annotations_by_image, load_coco
from digit_demo.detect import to_tensor
from train.resolve import pick, read_records, resolve, score_records

from .conftest import FIXTURES

CLEAR = {1108: "35", 1120: "48"}  # fixtures the default model reads with confidence


def true_record(gt: dict, image_id: int) -> list:
    anns = sorted(annotations_by_image(gt)[image_id], key=lambda a: a["id"])
    return [(a["category_id"], a["bbox"]) for a in anns]


def wrong_digits(record: list) -> list:
    return [(c % 10 + 1, box) for c, box in record]  # every digit moved on by one: 3 -> 4, 9 -> 0


@pytest.fixture(scope="module")
def model():
    return load_checkpoint("resnet18_fpn")[0]


def test_true_record_beats_same_boxes_with_other_digits(model, fixture_gt):
    for image_id in CLEAR:
        rec = true_record(fixture_gt, image_id)
        image = to_tensor(Image.open(FIXTURES / "valid" / f"{image_id}.png").convert("RGB"))
        scores = score_records(model, image, [wrong_digits(rec), rec, rec[:1]])
        best, margin = pick(scores)
        assert best == 1 and margin > 2, scores
        assert scores[1] > scores[2]  # the whole number has more evidence than its first digit alone


def test_pick_margin():
    assert pick([1.0, 5.0, 3.5]) == (1, 1.5)
    assert pick([2.0]) == (0, math.inf)


def test_resolve_keeps_confident_unclaimed_unique_picks(model, fixture_gt, tmp_path):
    """Image 901 (a copy of 1108): its true record 1 wins once record 3, an identical record already claimed
    by a train image, is left out. Images 902 and 903 (both copies of 1120) claim the same record: both dropped."""
    (tmp_path / "unlabeled").mkdir()
    for dst, src in ((901, 1108), (902, 1120), (903, 1120)):
        shutil.copy(FIXTURES / "valid" / f"{src}.png", tmp_path / "unlabeled" / f"{dst}.png")
    a, b = true_record(fixture_gt, 1108), true_record(fixture_gt, 1120)
    records = {1: a, 2: wrong_digits(a), 3: a, 4: b, 5: wrong_digits(b)}
    with (tmp_path / "boxes.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["split", "file_name", "img_width", "img_height", "digit", "left", "top", "width", "height"])
        for k, rec in records.items():
            for c, (x, y, bw, bh) in rec:
                w.writerow(["train", f"{k}.png", 300, 150, c - 1, x, y, bw, bh])
    (tmp_path / "train.json").write_text(json.dumps({"images": [{"id": 1, "svhn_format1_train_file": "3.png"}]}))
    (tmp_path / "valid.json").write_text(json.dumps({"images": []}))
    candidates = {"901.png": {"svhn_train_candidates": [1, 2, 3]}, "902.png": {"svhn_train_candidates": [4, 5]},
                  "903.png": {"svhn_train_candidates": [4, 5]}}

    coco = resolve(model, tmp_path, read_records(tmp_path / "boxes.csv"), candidates, min_margin=2)
    assert [im["id"] for im in coco["images"]] == [901]
    im = coco["images"][0]
    assert im["svhn_format1_train_file"] == "1.png" and im["n_candidates"] == 2 and im["label_tier"] == "pseudo"
    assert im["resolver_margin"] > 2
    assert [(x["category_id"], x["bbox"]) for x in coco["annotations"]] == [(c, [float(v) for v in box]) for c, box in a]
    # the file is a training set as it stands
    path = tmp_path / "pseudo.json"
    path.write_text(json.dumps(coco))
    image, target = DigitDataset(tmp_path / "unlabeled", path)[0]
    assert target["labels"].tolist() == [int(d) + 1 for d in CLEAR[1108]]
    assert load_coco(path)["categories"][0] == {"id": 1, "name": "0"}
