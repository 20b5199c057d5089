import json

import h5py
import numpy as np
import torch
from PIL import Image

from digit_demo.data import DigitDataset, clipped_boxes, digitstruct_to_coco, gt_numbers

from .conftest import FIXTURES


def write_digitstruct(path, records):
    """A digitStruct.mat in MATLAB v7.3 (HDF5) layout, as SVHN format 1 ships it."""
    ref = h5py.special_dtype(ref=h5py.Reference)
    with h5py.File(path, "w") as f:
        g = f.create_group("digitStruct")
        refs = f.create_group("#refs#")
        names = g.create_dataset("name", (len(records), 1), dtype=ref)
        bboxes = g.create_dataset("bbox", (len(records), 1), dtype=ref)
        for i, (name, digits) in enumerate(records):
            n = refs.create_dataset(f"n{i}", data=np.array([[ord(c)] for c in name], np.uint16))
            names[i, 0] = n.ref
            b = refs.create_group(f"b{i}")
            for key in ("label", "left", "top", "width", "height"):
                vals = [d[key] for d in digits]
                if len(vals) == 1:
                    b.create_dataset(key, data=np.array([[vals[0]]], np.float64))
                else:
                    ds = b.create_dataset(key, (len(vals), 1), dtype=ref)
                    for j, v in enumerate(vals):
                        ds[j, 0] = refs.create_dataset(f"v{i}_{key}_{j}", data=np.array([[v]], np.float64)).ref
            bboxes[i, 0] = b.ref


def test_digitstruct_converts_to_hw2_coco(tmp_path):
    Image.new("RGB", (60, 30)).save(tmp_path / "1.png")
    Image.new("RGB", (40, 20)).save(tmp_path / "2.png")
    write_digitstruct(tmp_path / "digitStruct.mat", [
        ("1.png", [dict(label=1, left=5, top=2, width=10, height=20), dict(label=10, left=18, top=3, width=11, height=20)]),
        ("2.png", [dict(label=7, left=4, top=1, width=9, height=15)]),
    ])
    coco = digitstruct_to_coco(tmp_path / "digitStruct.mat")
    assert [im["file_name"] for im in coco["images"]] == ["1.png", "2.png"]
    assert coco["images"][0]["width"] == 60 and coco["images"][1]["height"] == 20
    assert [a["category_id"] for a in coco["annotations"]] == [2, 1, 8]  # SVHN 10 is the digit 0
    assert coco["annotations"][1]["bbox"] == [18.0, 3.0, 11.0, 20.0]
    assert gt_numbers(coco) == {1: "10", 2: "7"}


def test_convert_command(tmp_path):
    from digit_demo.cli import main

    Image.new("RGB", (60, 30)).save(tmp_path / "1.png")
    write_digitstruct(tmp_path / "digitStruct.mat", [("1.png", [dict(label=4, left=5, top=2, width=10, height=20)])])
    assert main(["convert", str(tmp_path / "digitStruct.mat"), "--out", str(tmp_path / "train.json")]) == 0
    coco = json.loads((tmp_path / "train.json").read_text())
    assert coco["annotations"][0]["category_id"] == 5 and coco["categories"][0] == {"id": 1, "name": "0"}
    ds = DigitDataset(tmp_path, tmp_path / "train.json")  # and it trains like HW2 data
    assert ds[0][1]["labels"].tolist() == [5]


def test_boxes_are_clipped_and_empty_ones_dropped():
    anns = [{"bbox": [-2, 1, 10, 12], "category_id": 3}, {"bbox": [55, 5, 10, 10], "category_id": 4},
            {"bbox": [70, 5, 4, 4], "category_id": 5}]
    boxes, labels = clipped_boxes(anns, 60, 30)
    assert boxes.tolist() == [[0, 1, 8, 13], [55, 5, 60, 15]] and labels.tolist() == [3, 4]


def test_dataset_filters_tiers_and_margin(tmp_path):
    ds = DigitDataset(FIXTURES / "valid", FIXTURES / "valid.json")
    image, target = ds[0]
    assert image.shape[0] == 3 and image.dtype == torch.uint8 and len(target["boxes"]) == len(target["labels"])
    assert len(DigitDataset(FIXTURES / "valid", FIXTURES / "valid.json", tiers=["resolved"])) == 0
    assert len(DigitDataset(FIXTURES / "valid", FIXTURES / "valid.json", min_margin=8)) == 8  # exact images stay
