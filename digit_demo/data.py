"""Datasets: HW2-style COCO digit data, and original SVHN format-1 ``digitStruct.mat`` converted to it."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.ops import box_convert, clip_boxes_to_image

CATEGORIES = [{"id": d + 1, "name": str(d)} for d in range(10)]


def load_coco(path: str | Path) -> dict:
    with open(path) as f:
        return json.load(f)


def annotations_by_image(coco: dict) -> dict[int, list[dict]]:
    by_image: dict[int, list[dict]] = defaultdict(list)
    for a in coco["annotations"]:
        by_image[a["image_id"]].append(a)
    return by_image


def subset(coco: dict, ids) -> dict:
    """``coco`` with only the images whose id is in ``ids`` (in their order there) and their annotations."""
    ids = set(ids)
    return {**coco, "images": [im for im in coco["images"] if im["id"] in ids],
            "annotations": [a for a in coco["annotations"] if a["image_id"] in ids]}


def gt_numbers(coco: dict) -> dict[int, str]:
    """Each image's house number: its digits in annotation order (SVHN's reading order)."""
    by_image = annotations_by_image(coco)
    return {
        im["id"]: "".join(str(a["category_id"] - 1) for a in sorted(by_image.get(im["id"], []), key=lambda a: a["id"]))
        for im in coco["images"]
    }


def clip_xywh(xywh: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """COCO [x, y, w, h] boxes as xyxy, clipped to the image (SVHN boxes can poke a pixel outside)."""
    return clip_boxes_to_image(box_convert(xywh, "xywh", "xyxy"), (height, width))


def clipped_boxes(anns: list[dict], width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """xyxy boxes clipped to the image, empty ones dropped."""
    if not anns:
        return torch.zeros((0, 4)), torch.zeros(0, dtype=torch.int64)
    xyxy = clip_xywh(torch.tensor([a["bbox"] for a in anns], dtype=torch.float32), width, height)
    labels = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
    ok = (xyxy[:, 2] > xyxy[:, 0] + 0.5) & (xyxy[:, 3] > xyxy[:, 1] + 0.5)
    return xyxy[ok], labels[ok]


class DigitDataset(torch.utils.data.Dataset):
    """COCO-layout digit images: ``(image, target)`` with tv_tensors for box-aware transforms.

    ``tiers`` keeps only images of those ``label_tier`` values; ``min_margin`` drops resolved images
    whose ``resolver_margin`` is lower (exact images have no margin and are always kept).
    """

    def __init__(self, root: str | Path, ann_file: str | Path, transforms=None,
                 tiers: list[str] | None = None, min_margin: float | None = None, limit: int | None = None):
        self.root = Path(root)
        self.coco = load_coco(ann_file)
        self.transforms = transforms
        images = self.coco["images"]
        if tiers:
            images = [im for im in images if im.get("label_tier", "exact") in tiers]
        if min_margin is not None:
            images = [im for im in images if im.get("resolver_margin", float("inf")) >= min_margin]
        self.images = images[:limit] if limit else images
        self.anns = annotations_by_image(self.coco)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        info = self.images[i]
        img = Image.open(self.root / info["file_name"]).convert("RGB")
        boxes, labels = clipped_boxes(self.anns.get(info["id"], []), img.width, img.height)
        image = tv_tensors.Image(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(img.height, img.width)),
            "labels": labels,
            "image_id": info["id"],
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


def collate(batch):
    return tuple(zip(*batch))


def _mat_values(f, ds) -> list[float]:
    """A MATLAB v7.3 field: the values themselves, or (for several digits) references to them."""
    import h5py

    if h5py.check_ref_dtype(ds.dtype) is not None:
        return [float(f[r][()].item()) for r in ds[()].ravel()]
    return [float(v) for v in ds[()].ravel()]


def digitstruct_to_coco(mat_path: str | Path, image_dir: str | Path | None = None) -> dict:
    """Convert SVHN format-1 ``digitStruct.mat`` (HDF5) to the HW2 COCO layout.

    SVHN labels the digit 0 as 10; here ``category_id = digit + 1``. Image sizes are read from
    ``image_dir`` (default: the .mat's folder).
    """
    import h5py

    mat_path = Path(mat_path)
    image_dir = Path(image_dir or mat_path.parent)
    images, annotations = [], []
    with h5py.File(mat_path, "r") as f:
        names, bboxes = f["digitStruct"]["name"], f["digitStruct"]["bbox"]
        for i in range(names.shape[0]):
            name = "".join(chr(int(c)) for c in f[names[i][0]][()].ravel())
            box = f[bboxes[i][0]]
            fields = {k: _mat_values(f, box[k]) for k in ("label", "left", "top", "width", "height")}
            image_id = i + 1
            with Image.open(image_dir / name) as im:
                width, height = im.size
            images.append({"id": image_id, "file_name": name, "width": width, "height": height})
            for label, left, top, w, h in zip(*(fields[k] for k in ("label", "left", "top", "width", "height"))):
                digit = int(label) % 10
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "bbox": [left, top, w, h],
                    "category_id": digit + 1, "area": w * h, "iscrowd": 0,
                })
    return {"images": images, "annotations": annotations, "categories": CATEGORIES}
