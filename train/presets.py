"""Training augmentation that keeps digits readable (never flips: a flipped 2 is not a 2)."""
from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F


class RandomCropAroundDigits(v2.Transform):
    """Crop a random window that still holds every digit box whole (at least ``margin`` of the
    digits' height around them, where the image has it)."""

    def __init__(self, p: float = 0.5, margin: float = 0.15):
        super().__init__()
        self.p = p
        self.margin = margin

    def make_params(self, flat_inputs):
        boxes = next((x for x in flat_inputs if isinstance(x, tv_tensors.BoundingBoxes)), None)
        if boxes is None or len(boxes) == 0 or torch.rand(()) >= self.p:
            return {"crop": None}
        h, w = boxes.canvas_size
        x1, y1 = boxes[:, 0].min().item(), boxes[:, 1].min().item()
        x2, y2 = boxes[:, 2].max().item(), boxes[:, 3].max().item()
        m = self.margin * (y2 - y1)
        lo_x, lo_y = max(0.0, x1 - m), max(0.0, y1 - m)
        hi_x, hi_y = min(float(w), x2 + m), min(float(h), y2 + m)
        left = int(torch.empty(()).uniform_(0, lo_x).item()) if lo_x > 0 else 0
        top = int(torch.empty(()).uniform_(0, lo_y).item()) if lo_y > 0 else 0
        right = int(torch.empty(()).uniform_(hi_x, w).item()) if hi_x < w else w
        bottom = int(torch.empty(()).uniform_(hi_y, h).item()) if hi_y < h else h
        return {"crop": (top, left, max(bottom - top, 1), max(right - left, 1))}

    def transform(self, inpt, params):
        if params["crop"] is None or not isinstance(inpt, (tv_tensors.Image, tv_tensors.BoundingBoxes, torch.Tensor)):
            return inpt
        top, left, height, width = params["crop"]
        return F.crop(inpt, top, left, height, width)


def train_transforms(strength: str = "default") -> v2.Compose:
    """Box-aware augmentation for training; ``none`` only converts to float."""
    ops = []
    if strength != "none":
        ops += [
            RandomCropAroundDigits(p=0.5),
            v2.RandomApply([v2.RandomAffine(degrees=6, translate=(0.04, 0.04), scale=(0.85, 1.1), shear=(-8, 8, -3, 3))], p=0.5),
            v2.RandomPerspective(distortion_scale=0.15, p=0.2),
            v2.ColorJitter(brightness=0.35, contrast=0.35, saturation=0.4, hue=0.05),
            v2.RandomGrayscale(p=0.1),
            v2.RandomInvert(p=0.15),  # light-on-dark and dark-on-light plates both occur
            v2.RandomApply([v2.GaussianBlur(3, sigma=(0.1, 1.2))], p=0.15),
        ]
    ops += [v2.ToDtype(torch.float32, scale=True), v2.SanitizeBoundingBoxes(min_size=2)]
    return v2.Compose(ops)


def eval_transforms() -> v2.Compose:
    return v2.Compose([v2.ToDtype(torch.float32, scale=True)])
